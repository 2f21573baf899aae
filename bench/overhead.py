"""What a locked SELECT costs through locksafe, against raw ``with_for_update()``; and what one
``classify`` call costs, and where.

**Execute.** The same primary-key SELECT, locked, executed again and again inside one open
transaction (the lock is held after the first, so what is timed is the statement's path
through SQLAlchemy and locksafe, not a lock wait):

- ``raw``: ``select(...).with_for_update()``, in a fresh Python process that never imported
  locksafe (SQLAlchemy switches its event dispatch on for good once any listener exists, so a
  baseline measured after locksafe's hooks were installed would pay part of their cost);
- ``locksafe``: ``with_row_locks(select(...), connection)``, built once, in another fresh
  process;
- ``noop``: raw, with no-op listeners on the two events locksafe's row locks use: the share of
  SQLAlchemy's own event dispatch, which any listener switches on.

And the same with the statement built anew before every execution (``build + execute``), as an
application does. SQLite in memory (``locksafe.sqlite.configure()`` in both modes: the
documented set-up, whose ``BEGIN`` handling both pay) and PostgreSQL (psycopg2, loopback).
Each mode runs in ``ROUNDS`` fresh processes, interleaved; in each the fastest of several
repeats is kept, and of those the fastest process (on a shared machine the slower ones
measure the neighbours). Wall clock per execute, and this process's CPU time per execute
(without the server's work and the round trip: what locksafe adds on the client).

**Statement cache.** In each mode, after the timing, a listener reads SQLAlchemy's own verdict
for every SELECT (``ExecutionContext.cache_hit``, what its ``[cached since ...]`` log line
shows) over ``CACHE_CALLS`` executions of statements built anew: the hit rate must be the
same with locksafe as without.

**Hooks.** In the ``locksafe`` process, locksafe's two row-lock hooks called directly with the
arguments of a real execution (and, on SQLite, the no-op write that takes the write lock,
alone): what locksafe's own code costs per execute, without SQLAlchemy's event dispatch.

**Build.** ``with_row_locks(stmt, connection)`` vs ``stmt.with_for_update()``, and its parts
(profiled), without a database round trip.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

from _common import ROOT

ROUNDS = 5
CACHE_CALLS = 200


def _per_call_us(
    fn: Callable[[], object], seconds: float, repeats: int = 5, *, cpu: bool = False
) -> float:
    """µs per call, the fastest of ``repeats`` runs of about ``seconds``; ``cpu``: this
    process's CPU time (``time.process_time``) instead of the wall clock, which leaves out
    the server's work and the round trip, and what the neighbours take."""
    timer = timeit.Timer(fn, timer=time.process_time) if cpu else timeit.Timer(fn)
    number = 1
    while True:
        took = timer.timeit(number)
        if took >= seconds / 4 or number >= 1 << 20:
            break
        number *= 2
    number = max(1, int(number * seconds / max(took, 1e-9)))
    # the fastest repeat: on a shared machine the others measure the neighbours too
    return min(timer.repeat(repeat=repeats, number=number)) / number * 1e6


def child(mode: str, url: str, seconds: float) -> dict[str, Any]:
    """One mode in this (fresh) process: µs per execute and per build+execute, and the cache
    verdicts. ``mode``: ``raw`` or ``locksafe``."""
    from collections import Counter

    from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, select

    metadata = MetaData()
    t = Table(
        "bench_overhead", metadata, Column("id", Integer, primary_key=True), Column("v", Integer)
    )
    sqlite = url.startswith("sqlite")
    if sqlite:
        import locksafe.sqlite

        engine = locksafe.sqlite.configure(create_engine(url), journal_mode=None)
    else:
        engine = create_engine(url)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": i, "v": i} for i in range(1, 11)])
    base = select(t.c.v).where(t.c.id == 1)
    if mode == "locksafe":
        import locksafe

        def build(conn: Any) -> Any:
            return locksafe.with_row_locks(base, conn)
    elif mode == "noop":
        # plain SQLAlchemy with no-op listeners on the two events locksafe's row locks use:
        # what SQLAlchemy's event dispatch costs, switched on for every engine by any listener
        from sqlalchemy.engine import Engine

        def before_execute(conn: Any, elem: Any, multi: Any, params: Any, opts: Any) -> Any:
            return elem, multi, params

        def before_cursor_execute(conn: Any, cur: Any, sql: str, params: Any, *rest: Any) -> Any:
            return sql, params

        event.listen(Engine, "before_execute", before_execute, retval=True)
        event.listen(Engine, "before_cursor_execute", before_cursor_execute, retval=True)

        def build(conn: Any) -> Any:
            return base.with_for_update()
    elif mode == "raw":
        if "locksafe" in sys.modules and not sqlite:
            raise SystemExit("raw mode must not import locksafe")

        def build(conn: Any) -> Any:
            return base.with_for_update()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        conn.begin()
        stmt = build(conn)
        conn.execute(stmt).all()  # takes the lock, fills the cache

        def execute() -> None:
            conn.execute(stmt).all()

        def build_execute() -> None:
            conn.execute(build(conn)).all()

        out["execute_us"] = _per_call_us(execute, seconds)
        out["execute_cpu_us"] = _per_call_us(execute, seconds, cpu=True)
        out["build_execute_us"] = _per_call_us(build_execute, seconds)
        out["build_us"] = _per_call_us(lambda: build(conn), seconds)
        verdicts: Counter[str] = Counter()

        def seen(conn_: Any, cursor: Any, statement: str, *rest: Any) -> None:
            context = rest[1]
            if statement.lstrip().upper().startswith("SELECT"):
                verdicts[str(context.cache_hit).split(".")[-1]] += 1

        if mode == "locksafe":
            out["hooks"] = _hooks_alone(conn, stmt, seconds)
        event.listen(engine, "before_cursor_execute", seen)
        for _ in range(CACHE_CALLS):
            conn.execute(build(conn)).all()
        event.remove(engine, "before_cursor_execute", seen)
        conn.rollback()
        out["cache"] = dict(verdicts)
        out["compiled_cache_entries"] = len(engine._compiled_cache or {})
    metadata.drop_all(engine)
    engine.dispose()
    return out


def _hooks_alone(conn: Any, stmt: Any, seconds: float) -> dict[str, float]:
    """µs per call of locksafe's two row-lock hooks, called directly with the arguments of a
    real execution of ``stmt`` on ``conn`` (in its open transaction); on SQLite also the
    statement that takes the write lock, alone (part of the second hook)."""
    from sqlalchemy import event

    import locksafe.rowlocks as rowlocks

    got: dict[str, Any] = {}

    def grab(*args: Any) -> None:
        got["args"] = args

    event.listen(conn.engine, "before_cursor_execute", grab)
    conn.execute(stmt).all()
    event.remove(conn.engine, "before_cursor_execute", grab)
    connection, _, statement, parameters, context, _ = got["args"]
    cursor = connection.connection.dbapi_connection.cursor()  # the statement's is closed
    timings = {
        "before_execute": _per_call_us(
            lambda: rowlocks._before_execute(connection, stmt, (), {}, {}), seconds
        ),
        "before_cursor_execute": _per_call_us(
            lambda: rowlocks._before_cursor_execute(
                connection, cursor, statement, parameters, context, False
            ),
            seconds,
        ),
    }
    if connection.dialect.name == "sqlite":
        table_name = stmt.get_final_froms()[0].name
        timings["write lock statement"] = _per_call_us(
            lambda: cursor.execute(f'DELETE FROM "{table_name}" WHERE 0'), seconds
        )
    cursor.close()
    return timings


def measure_execute(url: str, *, rounds: int, seconds: float) -> dict[str, Any]:
    """Each mode in ``rounds`` fresh processes, interleaved; medians."""
    modes = ("raw", "noop", "locksafe")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for round_ in range(rounds):
        order = modes[round_ % 3 :] + modes[: round_ % 3]
        for mode in order:
            done = subprocess.run(
                [sys.executable, __file__, "--child", mode, url, str(seconds)],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            runs[mode].append(json.loads(done.stdout))
    summary: dict[str, Any] = {}
    for mode, results in runs.items():
        # the fastest process: the others measured the neighbours too
        summary[mode] = {
            key: min(r[key] for r in results)
            for key in ("execute_us", "execute_cpu_us", "build_execute_us", "build_us")
        }
        summary[mode]["cache"] = results[-1]["cache"]
        summary[mode]["compiled_cache_entries"] = results[-1]["compiled_cache_entries"]
        summary[mode]["runs"] = [r["execute_us"] for r in results]
        if "hooks" in results[0]:
            summary[mode]["hooks"] = {
                key: min(r["hooks"][key] for r in results) for key in results[0]["hooks"]
            }
    return summary


def cache_hit_rate(cache: dict[str, int]) -> float:
    total = sum(cache.values())
    return cache.get("CACHE_HIT", 0) / total if total else float("nan")


# -- where the build cost goes -------------------------------------------------------------------


def build_profile(url: str, calls: int = 20000) -> list[tuple[str, float]]:
    """cProfile of ``calls`` builds of ``with_row_locks(stmt, connection)``: the functions with
    the most own time, as (name, share of the total)."""
    import cProfile

    from sqlalchemy import Column, Integer, MetaData, Table, create_engine, select

    import locksafe

    metadata = MetaData()
    t = Table("bench_build", metadata, Column("id", Integer, primary_key=True))
    engine = create_engine(url)
    base = select(t.c.id).where(t.c.id == 1)
    with engine.connect() as conn:
        locksafe.with_row_locks(base, conn)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            locksafe.with_row_locks(base, conn)
        profiler.disable()
    engine.dispose()
    return _top(profiler, 8)


def _top(profiler: Any, count: int) -> list[tuple[str, float]]:
    import pstats

    stats = pstats.Stats(profiler)
    total = sum(row[2] for row in stats.stats.values())  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        where = filename.replace(str(ROOT) + "/", "")
        for marker in ("site-packages/", "lib/python3"):
            if marker in where:
                where = where.split(marker, 1)[1]
        rows.append((f"{where}:{line} {name}", row[2] / total if total else 0.0))
    rows.sort(key=lambda r: -r[1])
    return rows[:count]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT / "src"))
        print(json.dumps(child(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
        sys.exit(0)
    print(json.dumps(measure_execute("sqlite://", rounds=2, seconds=0.1), indent=1))
