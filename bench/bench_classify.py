"""What one call of ``locksafe.classify`` costs, per driver, against a naive baseline.

Run from the repository root::

    python bench/bench_classify.py            # about 15 s
    python bench/bench_classify.py --quick    # fewer repeats, a few seconds

For each driver it takes a typical lock error *as the application receives it* (SQLAlchemy's
wrapper around the driver's own exception): it starts throw-away PostgreSQL and MariaDB servers
(tests/harness/servers.py) and provokes a NOWAIT failure on a row held by another connection once
per driver, makes SQLite busy for real, and builds MySQL 8's ER_LOCK_NOWAIT (3572), which no server
here raises, from the recorded fixtures (tests/harness/mysql8_errors.py). If a server cannot be
started, its rows are left out and the reason printed.

Each row is timed timeit-style: the number of calls per run is calibrated to ~20 ms, the run is
repeated, and the median per call is reported, for ``classify`` and for the baseline on the same
exception. The ratio is classify / baseline, both measured in this run. The process exits 1 if
``classify`` gets a provoked error wrong (a timing of a wrong answer means nothing), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the harness: servers and the recorded fixtures

import sqlalchemy  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.exc import IntegrityError  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

import locksafe  # noqa: E402
from locksafe import LockErrorKind, classify  # noqa: E402


# ---------------------------------------------------------------------------------------------
# BASELINE: the naive check an application writes by hand (Airflow's is_lock_not_available_error
# reads the code the same way). It is what classify's cost is compared with: it reads psycopg2's
# ``pgcode`` or else ``args[0]`` of the wrapped exception, and compares with three numbers. It
# knows nothing of other drivers, SQLite, deadlocks, NOWAIT vs timeout, or exception chains.
# ---------------------------------------------------------------------------------------------
def baseline_is_lock_not_available_error(error: Any) -> bool:
    orig = getattr(error, "orig", None) or error
    code = getattr(orig, "pgcode", None)
    if code is None:
        args = getattr(orig, "args", ())
        code = args[0] if args else None
    return code in ("55P03", 1205, 3572)


@dataclass
class Sample:
    driver: str
    error: str
    exc: BaseException
    expected: LockErrorKind | None


# -- provoking real errors -----------------------------------------------------------------------


def _first_error(url: Any, statements: list[str], *, connect_args: Any = None) -> BaseException:
    """Run ``statements`` on one new connection of ``url``'s driver; return what it raised."""
    kw: dict[str, Any] = {"poolclass": NullPool}
    if connect_args:
        kw["connect_args"] = connect_args

    def work(conn: Any) -> BaseException:
        try:
            for sql in statements:
                conn.exec_driver_sql(sql)
        except Exception as exc:
            return exc
        raise RuntimeError(f"{url.drivername}: no error from {statements!r}")

    if url.get_dialect().is_async:

        async def main() -> BaseException:
            engine = create_async_engine(url, **kw)
            try:
                async with engine.connect() as conn:
                    return await conn.run_sync(work)
            finally:
                await engine.dispose()

        return asyncio.run(main())
    engine = create_engine(url, **kw)
    try:
        with engine.connect() as conn:
            return work(conn)
    finally:
        engine.dispose()


@contextlib.contextmanager
def _held_row(admin_url: Any, setup: list[str], lock_sql: str) -> Iterator[None]:
    """Create the table, then hold a row lock on row 1 from another connection."""
    engine = create_engine(admin_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for sql in setup:
                conn.exec_driver_sql(sql)
        with engine.connect() as holder:
            holder.exec_driver_sql(lock_sql)
            yield
            holder.rollback()
    finally:
        engine.dispose()


TABLE = "bench_jobs"
NOWAIT_SQL = f"SELECT id FROM {TABLE} WHERE id = 1 FOR UPDATE NOWAIT"


def postgresql_samples(url: Any) -> list[Sample]:
    setup = [
        f"DROP TABLE IF EXISTS {TABLE}",
        f"CREATE TABLE {TABLE} (id int PRIMARY KEY)",
        f"INSERT INTO {TABLE} VALUES (1)",
    ]
    samples = []
    admin = url.set(drivername="postgresql+psycopg2")
    with _held_row(admin, setup, f"SELECT id FROM {TABLE} WHERE id = 1 FOR UPDATE"):
        for driver in ("psycopg2", "psycopg", "psycopg_async", "asyncpg", "pg8000"):
            exc = _first_error(url.set(drivername=f"postgresql+{driver}"), [NOWAIT_SQL])
            kind = LockErrorKind.LOCK_NOT_AVAILABLE
            samples.append(Sample(f"postgresql+{driver}", "55P03 NOWAIT", exc, kind))
    # A non-lock error too: what a retry loop classifies most of the time.
    duplicate = _first_error(admin, [f"INSERT INTO {TABLE} VALUES (1)"])
    assert isinstance(duplicate, IntegrityError)
    samples.append(Sample("postgresql+psycopg2", "23505 (not a lock)", duplicate, None))
    return samples


def mariadb_samples(url: Any) -> list[Sample]:
    setup = [
        f"DROP TABLE IF EXISTS {TABLE}",
        f"CREATE TABLE {TABLE} (id int PRIMARY KEY) ENGINE=InnoDB",
        f"INSERT INTO {TABLE} VALUES (1)",
    ]
    samples = []
    admin = url.set(drivername="mysql+pymysql")
    drivers = ("mysql+pymysql", "mysql+mysqldb", "mysql+mysqlconnector", "mysql+aiomysql")
    with _held_row(admin, setup, f"SELECT id FROM {TABLE} WHERE id = 1 FOR UPDATE"):
        for driver in (*drivers, "mysql+asyncmy", "mariadb+mariadbconnector"):
            exc = _first_error(url.set(drivername=driver), [NOWAIT_SQL])
            samples.append(
                Sample(driver, "1205 NOWAIT (MariaDB)", exc, LockErrorKind.LOCK_NOT_AVAILABLE)
            )
    return samples


def sqlite_samples(directory: Path) -> list[Sample]:
    path = directory / "bench.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute(f"CREATE TABLE {TABLE} (id integer PRIMARY KEY)")
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held
    samples = []
    try:
        for driver in ("pysqlite", "aiosqlite"):
            url = sqlalchemy.make_url(f"sqlite+{driver}:///{path}")
            exc = _first_error(
                url, [f"INSERT INTO {TABLE} VALUES (1)"], connect_args={"timeout": 0}
            )
            samples.append(
                Sample(f"sqlite+{driver}", "SQLITE_BUSY (5)", exc, LockErrorKind.DATABASE_BUSY)
            )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    return samples


def mysql8_samples() -> list[Sample]:
    from harness import mysql8_errors

    samples = []
    for driver in mysql8_errors.DRIVERS:
        exc = mysql8_errors.recorded_error(driver, mysql8_errors.ER_LOCK_NOWAIT)
        samples.append(
            Sample(
                f"mysql+{driver} (MySQL 8)",
                "3572 NOWAIT (recorded)",
                exc,
                LockErrorKind.LOCK_NOT_AVAILABLE,
            )
        )
    return samples


def other_samples() -> list[Sample]:
    app = RuntimeError("the job failed")
    return [Sample("(no driver)", "RuntimeError", app, None)]


# -- timing ----------------------------------------------------------------------------------


def per_call_us(fn: Callable[[Any], Any], arg: Any, repeats: int, target: float) -> float:
    """Median per-call time in µs: calls per run calibrated to ``target`` seconds."""
    timer = timeit.Timer("fn(arg)", globals={"fn": fn, "arg": arg})
    number = 1
    while True:
        took = timer.timeit(number)
        if took >= target / 4 or number >= 1 << 22:
            break
        number *= 2
    number = max(1, int(number * target / max(took, 1e-9)))
    runs = timer.repeat(repeat=repeats, number=number)
    return statistics.median(runs) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats of ~5 ms")
    parser.add_argument("--no-servers", action="store_true", help="SQLite and recorded only")
    args = parser.parse_args(argv)
    repeats, target = (3, 0.005) if args.quick else (7, 0.02)

    began = time.monotonic()
    samples: list[Sample] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="locksafe-bench-") as tmp:
        samples += sqlite_samples(Path(tmp))
    if not args.no_servers:
        from harness import servers

        for name, start, make in (
            ("PostgreSQL", servers.start_postgresql, postgresql_samples),
            ("MariaDB", servers.start_mariadb, mariadb_samples),
        ):
            try:
                server = start()
            except Exception as exc:
                notes.append(f"{name} left out: the server could not be started ({exc})")
                continue
            try:
                samples += make(sqlalchemy.make_url(server.url))
            finally:
                server.stop()
    samples += mysql8_samples()
    samples += other_samples()
    prepared = time.monotonic() - began

    wrong = []
    rows = []
    for sample in samples:
        kind = classify(sample.exc)  # warms the caches too
        baseline_fn = baseline_is_lock_not_available_error
        baseline_answer = baseline_fn(sample.exc)
        if kind is not sample.expected:
            wrong.append(f"{sample.driver}: {sample.error}: {kind} != {sample.expected}")
        ours = per_call_us(classify, sample.exc, repeats, target)
        theirs = per_call_us(baseline_fn, sample.exc, repeats, target)
        rows.append((sample, kind, baseline_answer, ours, theirs))

    print(
        f"locksafe {locksafe.__version__}, SQLAlchemy {sqlalchemy.__version__}, "
        f"Python {platform.python_version()} ({platform.machine()}); median of {repeats} runs "
        f"of ~{target * 1000:g} ms each; errors provoked in {prepared:.1f} s"
    )
    header = (
        f"{'driver':<34} {'error':<24} {'classify ->':<20} {'baseline':<9}"
        f" {'classify µs':>11} {'baseline µs':>11} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for sample, kind, baseline_answer, ours, theirs in rows:
        print(
            f"{sample.driver:<34} {sample.error:<24} {kind!s:<20} {baseline_answer!s:<9}"
            f" {ours:>11.2f} {theirs:>11.2f} {ours / theirs:>6.1f}x"
        )
    ratios = [ours / theirs for _, _, _, ours, theirs in rows]
    print("-" * len(header))
    print(
        f"classify / baseline: median {statistics.median(ratios):.1f}x, "
        f"max {max(ratios):.1f}x; classify median {statistics.median(r[3] for r in rows):.2f} µs"
        f" per call ({time.monotonic() - began:.1f} s in all)"
    )
    print(
        "baseline = a naive Airflow-style is_lock_not_available_error (pgcode / args[0] in "
        "55P03, 1205, 3572); 'baseline' column = its True/False on the same exception."
    )
    for note in notes:
        print(f"note: {note}")
    if wrong:
        print("WRONG CLASSIFICATION:", *wrong, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
