"""SQLite under contention: 16 writers on one database file, and readers beside writers.

The transaction (the shape of issue 13's outside measurement): read the counter row with a row
lock, insert an event numbered after it, bump the counter. With locksafe it runs in
``@transactional`` and the read is ``with_row_locks`` on an engine set up by
``locksafe.sqlite.configure()`` (its defaults: WAL, 30 s busy timeout, ``begin="first_write"``).

- **A** (the physical limit): the same transaction, one writer alone: SQLite has one writer at
  a time, so 16 writers can at best share this rate.
- **locksafe, 16 threads** (one process, one engine) and **16 processes** (one engine each).
- **B** (the naive app): stock pysqlite, ``with_for_update()`` (SQLAlchemy renders nothing on
  SQLite), 16 threads. Its reads run outside any transaction, so concurrent writers read the
  same counter: lost updates, counted afterwards.

Afterwards, from a fresh connection: ``counter`` must equal the number of ``event`` rows (a
difference is a lost update), every event number must appear once, and the number of rows
must equal the number of calls that returned (a row without a successful call, or a call
without its row, is a partial write).

The readers scenario: 16 reader threads each run short SELECTs in a loop (by primary key,
every other one the counter row the writers update), alone and then beside 4 writer processes
doing the transaction above (WAL: readers never wait for the writer). Reader throughput
without writers / with them is the slowdown. The readers' process runs on one CPU and the
writers on the other: on a 2-core machine a reader slowed by a writer using its core says
nothing about the database.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    bindparam,
    create_engine,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import locksafe
import locksafe.sqlite
from _common import (
    Result,
    RetryCounter,
    WorkerOutcome,
    cpu_seconds,
    error_name,
    merge,
    progress,
    run_processes,
    run_threads,
)

metadata = MetaData()
counter = Table(
    "counter", metadata, Column("id", Integer, primary_key=True), Column("value", Integer)
)
event = Table(
    "event",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("writer", Integer, nullable=False),
)
ROWS = 2000  # rows the readers read from
lookup = Table("lookup", metadata, Column("id", Integer, primary_key=True), Column("v", Integer))


def make_database(directory: Path, name: str) -> Path:
    """A fresh database file in WAL mode with the counter at 0 and the readers' table."""
    path = directory / f"{name}.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, value INTEGER)")
    conn.execute(
        "CREATE TABLE event (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, writer INTEGER NOT NULL)"
    )
    conn.execute("CREATE TABLE lookup (id INTEGER PRIMARY KEY, v INTEGER)")
    conn.execute("INSERT INTO counter VALUES (1, 0)")
    conn.executemany("INSERT INTO lookup VALUES (?, ?)", [(i, i * 7) for i in range(ROWS)])
    conn.commit()
    conn.close()
    return path


def locksafe_engine(path: Path, pool_size: int) -> Engine:
    engine = create_engine(f"sqlite:///{path}", pool_size=pool_size, max_overflow=4)
    return locksafe.sqlite.configure(engine)


def locksafe_transaction(
    engine: Engine, retries: RetryCounter | None = None
) -> Callable[[int], int]:
    """The transaction through locksafe: ``@transactional`` + ``with_row_locks``."""
    factory = sessionmaker(engine)

    @locksafe.transactional(sessionmaker=factory, attempts=10, on_retry=retries)
    def bump(writer: int, *, session: Session = locksafe.NEW_SESSION) -> int:
        stmt = locksafe.with_row_locks(select(counter.c.value).where(counter.c.id == 1), session)
        value: int = session.execute(stmt).scalar_one()
        session.execute(insert(event).values(seq=value + 1, writer=writer))
        session.execute(update(counter).where(counter.c.id == 1).values(value=value + 1))
        return value + 1

    return bump


def naive_transaction(engine: Engine) -> Callable[[int], int]:
    """The same transaction as an application writes it without locksafe."""
    factory = sessionmaker(engine)

    def bump(writer: int) -> int:
        with factory.begin() as session:
            stmt = select(counter.c.value).where(counter.c.id == 1).with_for_update()
            value: int = session.execute(stmt).scalar_one()
            session.execute(insert(event).values(seq=value + 1, writer=writer))
            session.execute(update(counter).where(counter.c.id == 1).values(value=value + 1))
            return value + 1

    return bump


def _loop(
    bump: Callable[[int], int],
    writer: int,
    count: int,
    barrier: Any,
    gate: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
) -> WorkerOutcome:
    outcome = WorkerOutcome()
    # One transaction before the clock starts: connecting, compiling the statements and
    # planning the lock happen once per connection in a long-lived application, not per
    # transaction (16 processes doing it at the same moment would be measured otherwise).
    bump(writer)
    outcome.warmup = 1
    barrier.wait()
    outcome.started = time.monotonic()
    for _ in range(count):
        began = time.monotonic()
        try:
            if gate is not None:
                with gate():
                    bump(writer)
            else:
                bump(writer)
        except Exception as exc:
            outcome.errors[error_name(exc)] += 1
        else:
            outcome.done += 1
            outcome.latencies.append(time.monotonic() - began)
    outcome.ended = time.monotonic()
    return outcome


def check(path: Path, result: Result, *, expect_exact: bool) -> None:
    """The invariants, read from a fresh connection after the run."""
    conn = sqlite3.connect(path)
    try:
        value = conn.execute("SELECT value FROM counter WHERE id = 1").fetchone()[0]
        rows, distinct = conn.execute("SELECT count(*), count(DISTINCT seq) FROM event").fetchone()
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    result.checks.update(
        counter=value,
        events=rows,
        lost_updates=rows - value,
        duplicate_numbers=rows - distinct,
        partial=abs(rows - result.done - result.warmup) if expect_exact else None,
        integrity=integrity,
    )


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="locksafe-bench-sqlite-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """The diagnostic's gate: a blocking ``flock`` on a file beside the database, so waiting
    writers sleep in the kernel and the next one wakes when the lock is released (no polling).
    Held around the whole transaction: it stands for a write-lock queue across processes."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def run_writers(
    directory: Path,
    *,
    mode: str,
    writers: int,
    total: int,
    key: str,
    switch_interval: float | None = None,
    process_queue: bool = False,
    label: str | None = None,
) -> Result:
    """``writers`` writers (``mode``: ``"threads"``, ``"processes"``, ``"naive"`` = stock
    pysqlite threads) doing ``total`` transactions in all on a fresh database.

    Diagnostics (not locksafe's defaults): ``switch_interval`` sets ``sys.setswitchinterval``
    for the run (threads); ``process_queue`` makes each process's transaction wait on a
    blocking ``flock`` beside the database first (processes)."""
    path = make_database(directory, key)
    cpu_before = cpu_seconds()
    per_writer = [total // writers + (1 if i < total % writers else 0) for i in range(writers)]
    label = (
        label
        or {
            "threads": f"locksafe, {writers} thread{'s' if writers > 1 else ''}",
            "processes": f"locksafe, {writers} processes",
            "naive": f"B: stock pysqlite, {writers} threads",
        }[mode]
    )
    if mode == "processes":

        def in_process(index: int, barrier: Any) -> WorkerOutcome:
            own = RetryCounter()
            engine = locksafe_engine(path, 2)
            try:
                outcome = _loop(
                    locksafe_transaction(engine, own), index, per_writer[index], barrier
                )
            finally:
                engine.dispose()
            outcome.retries = own.count
            return outcome

        result = merge(key, label, run_processes(writers, in_process))
    else:
        retries = RetryCounter()
        if mode == "naive":
            engine = create_engine(f"sqlite:///{path}", pool_size=writers + 4)
            bump = naive_transaction(engine)
        else:
            engine = locksafe_engine(path, writers + 4)
            bump = locksafe_transaction(engine, retries)
        previous = sys.getswitchinterval()
        if switch_interval is not None:
            sys.setswitchinterval(switch_interval)
        try:
            outcomes = run_threads(writers, lambda i, b: _loop(bump, i, per_writer[i], b))
        finally:
            sys.setswitchinterval(previous)
            engine.dispose()
        result = merge(key, label, outcomes)
        result.retries = retries.count
    cpu = cpu_seconds() - cpu_before
    result.checks["cpu_ms_per_tx"] = cpu / max(result.done + result.warmup, 1) * 1000
    check(path, result, expect_exact=mode != "naive")
    path.unlink()
    return result


# -- readers beside writers ----------------------------------------------------------------------


def _reader_loop(engine: Engine, seconds: float, barrier: Any, index: int) -> WorkerOutcome:
    outcome = WorkerOutcome()
    stmt = select(lookup.c.v).where(lookup.c.id == bindparam("id"))
    hot = select(counter.c.value).where(counter.c.id == 1)  # the row the writers update
    with engine.connect() as conn:
        barrier.wait()
        outcome.started = time.monotonic()
        stop = outcome.started + seconds
        n = index
        while True:
            began = time.monotonic()
            if began >= stop:
                break
            try:
                if n % 2:
                    conn.execute(stmt, {"id": n % ROWS}).scalar_one()
                else:
                    conn.execute(hot).scalar_one()
                conn.rollback()
            except Exception as exc:
                outcome.errors[error_name(exc)] += 1
            else:
                outcome.done += 1
                outcome.latencies.append(time.monotonic() - began)
            n += 1
    outcome.ended = time.monotonic()
    return outcome


def _pin(cpu: int) -> None:
    """Keep this process on one CPU (when there are two or more): readers on the first,
    writers on the second, so that what the readers measure is the database, not a fight
    for one core (and the GIL's hand-offs between cores)."""
    with contextlib.suppress(AttributeError, OSError):
        cpus = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
        if len(cpus) >= 2:
            os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def _writer_process(path: Path, seconds: float, ready: Any, go: Any, out: Any) -> None:
    _pin(1)
    engine = locksafe_engine(path, 2)
    bump = locksafe_transaction(engine)
    outcome = WorkerOutcome()
    ready.release()
    go.wait()
    outcome.started = time.monotonic()
    while time.monotonic() < outcome.started + seconds:
        began = time.monotonic()
        try:
            bump(0)
        except Exception as exc:
            outcome.errors[error_name(exc)] += 1
        else:
            outcome.done += 1
            outcome.latencies.append(time.monotonic() - began)
    outcome.ended = time.monotonic()
    engine.dispose()
    out.put(outcome)


def run_readers(
    directory: Path,
    *,
    readers: int,
    writers: int,
    seconds: float,
    key: str,
    other_file: bool = False,
) -> tuple[Result, Result | None]:
    """Reader threads for ``seconds`` in a process of their own on one CPU, with ``writers``
    writer processes on the other CPU meanwhile. Returns (readers, writers or None)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out = ctx.SimpleQueue()

    def child() -> None:
        try:
            _pin(0)
            out.put(
                _run_readers(
                    directory,
                    readers=readers,
                    writers=writers,
                    seconds=seconds,
                    key=key,
                    other_file=other_file,
                )
            )
        except BaseException as exc:
            out.put(f"{type(exc).__name__}: {exc}")

    proc = ctx.Process(target=child, daemon=False)
    proc.start()
    got = out.get()
    proc.join()
    if isinstance(got, str):
        raise RuntimeError(f"the readers' process failed: {got}")
    return got  # type: ignore[no-any-return]


def _run_readers(
    directory: Path,
    *,
    readers: int,
    writers: int,
    seconds: float,
    key: str,
    other_file: bool = False,
) -> tuple[Result, Result | None]:
    import multiprocessing

    path = make_database(directory, key)
    target = make_database(directory, key + "_other") if other_file and writers else path
    engine = locksafe_engine(path, readers + 4)
    ctx = multiprocessing.get_context("fork")
    procs = []
    go = ctx.Event()
    ready = ctx.Semaphore(0)
    out = ctx.SimpleQueue()
    for _ in range(writers):
        proc = ctx.Process(target=_writer_process, args=(target, seconds, ready, go, out))
        proc.daemon = True
        proc.start()
        procs.append(proc)
    for _ in range(writers):
        ready.acquire()
    barrier = threading.Barrier(readers, action=go.set)
    try:
        outcomes = run_threads(readers, lambda i, b: _reader_loop(engine, seconds, barrier, i))
    finally:
        engine.dispose()
    label = f"{readers} readers" + (
        f" beside {writers} writer processes" + (" on another file" if other_file else "")
        if writers
        else " alone"
    )
    result = merge(key, label, outcomes)
    written = None
    if writers:
        writer_outcomes = [out.get() for _ in range(writers)]
        for proc in procs:
            proc.join(30)
        written = merge(key + "_writers", f"{writers} writer processes", writer_outcomes)
        check(target, written, expect_exact=True)
        result.checks["writes_beside"] = written.done
    for used in {path, target}:
        used.unlink()
    return result, written


def main() -> None:  # a quick manual look: python bench/sqlite_contention.py
    with _scratch() as tmp:
        for mode, writers in (("threads", 1), ("threads", 16), ("processes", 16), ("naive", 16)):
            result = run_writers(tmp, mode=mode, writers=writers, total=800, key=mode)
            progress(result.summary() + f" {result.checks}")
        for writers in (0, 4):
            readers, _ = run_readers(tmp, readers=16, writers=writers, seconds=3, key="r")
            progress(readers.summary())


if __name__ == "__main__":
    main()
