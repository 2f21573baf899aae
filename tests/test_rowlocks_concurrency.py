"""with_row_locks under real concurrency: threads, each with its own connection of the cell's
driver (async cells: each thread runs its own event loop), racing on the same rows.

- Lost update: read, wait a little, write ``read + 1``. Under with_row_locks the final value is
  the number of increments on every backend; the same loop without locksafe loses updates
  (shown on SQLite in both journal modes, and on PostgreSQL and MariaDB), so the check can fail.
- SKIP LOCKED: workers claim queued jobs; no job is claimed twice (each claim also increments a
  per-row counter in the database). Without locks, the same loop does claim jobs twice.

Every wait is bounded: thread joins, barriers, a deadline on every loop, lock waits (SQLite
busy timeout 5 s, PostgreSQL / MariaDB lock wait timeouts).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from harness.cells import Cell
from locksafe import with_row_locks
from locksafe.dialects import support_for

metadata = MetaData()
counter = Table(
    "rlc_counter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("v", Integer, nullable=False),
)
jobs = Table(
    "rlc_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("state", String(10), nullable=False),
    Column("claimed_by", Integer),
    Column("claims", Integer, nullable=False),
)

THREADS = 4
INCREMENTS = 8  # per thread
#: Between the read and the write: long enough that unlocked transactions overlap for sure.
RACE_WINDOW = 0.03
#: The same window under locks (the transactions then run one after the other).
LOCKED_WINDOW = 0.005
JOBS = 24
LOCK_WAIT = 10.0
DEADLINE = 30.0


def bound_lock_waits(conn: Connection) -> None:
    support = support_for(conn.dialect.name)
    assert support is not None
    assert support.lock_timeout_sql is not None
    for sql in support.lock_timeout_sql(LOCK_WAIT):
        conn.exec_driver_sql(sql)
    conn.commit()


@pytest.fixture(params=["wal", "delete"])
def journal(request: pytest.FixtureRequest, cell: Cell) -> str:
    """The journal mode of the SQLite database file (for SQLite cells only)."""
    assert cell.backend == "sqlite"
    mode: str = request.param
    with cell.sync_engine().connect() as conn:
        assert conn.exec_driver_sql(f"PRAGMA journal_mode = {mode}").scalar_one() == mode
    return mode


@dataclass
class Workers:
    """Runs ``fn(conn, index)`` in ``count`` threads, each on its own connection of the cell's
    driver, started together; collects results and errors; every wait bounded."""

    cell: Cell
    count: int
    engine: Any = None
    results: dict[int, Any] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)

    def run(self, fn: Callable[[Connection, int], Any]) -> dict[int, Any]:
        # Connect once first: SQLAlchemy guards an engine's first connect (dialect
        # initialisation) with an asyncio.Lock on async engines, which threads running their
        # own event loops must not contend for (a thread can hang on it).
        self.cell.run(lambda conn: None, engine=self.engine)
        barrier = threading.Barrier(self.count, timeout=DEADLINE)

        def thread_main(index: int) -> None:
            def with_connection(conn: Connection) -> Any:
                bound_lock_waits(conn)
                barrier.wait()
                return fn(conn, index)

            try:
                self.results[index] = self.cell.run(with_connection, engine=self.engine)
            except BaseException as exc:
                self.errors.append(exc)
                barrier.abort()

        threads = [
            threading.Thread(target=thread_main, args=(i,), name=f"worker-{i}")
            for i in range(self.count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE + LOCK_WAIT)
        assert not any(thread.is_alive() for thread in threads), "a worker is stuck"
        if self.errors:
            raise self.errors[0]
        return self.results


# -- lost updates -----------------------------------------------------------------------------


def run_increments(cell: Cell, *, locked: bool, engine: Any = None) -> int:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(counter), [{"id": 1, "v": 0}])
    window = LOCKED_WINDOW if locked else RACE_WINDOW

    def increments(conn: Connection, index: int) -> None:
        read = select(counter.c.v).where(counter.c.id == 1)
        if locked:
            read = with_row_locks(read)
        for _ in range(INCREMENTS):
            with conn.begin():
                value = conn.execute(read).scalar_one()
                time.sleep(window)
                conn.execute(update(counter).where(counter.c.id == 1).values(v=value + 1))

    Workers(cell, THREADS, engine).run(increments)
    with cell.sync_engine().connect() as conn:
        final: int = conn.execute(select(counter.c.v).where(counter.c.id == 1)).scalar_one()
    return final


def check_no_lost_update(cell: Cell, journal: str, engine: Any = None) -> None:
    expected = THREADS * INCREMENTS
    final = run_increments(cell, locked=True, engine=engine)
    print(f"\n[lost-update] with locksafe    {cell.name:28} {journal:6} {final}/{expected}")
    assert final == expected


def check_updates_are_lost(cell: Cell, journal: str) -> None:
    expected = THREADS * INCREMENTS
    final = run_increments(cell, locked=False)
    print(f"\n[lost-update] without locksafe {cell.name:28} {journal:6} {final}/{expected}")
    assert final < expected


@pytest.mark.cells("sqlite")
@pytest.mark.parametrize("transactions", ["driver", "explicit-begin"])
def test_no_lost_update_with_row_locks_sqlite(cell: Cell, journal: str, transactions: str) -> None:
    """``driver``: the drivers' own transaction handling (SQLAlchemy's default); the locking
    read comes first, so locksafe begins the transaction with ``BEGIN IMMEDIATE``.
    ``explicit-begin``: SQLAlchemy's documented recipe (driver handling off, SQLAlchemy emits
    ``BEGIN``), as ``locksafe.sqlite.configure()`` sets up; locksafe then takes the write lock
    inside the open transaction."""
    engine = None
    if transactions == "explicit-begin":
        engine = cell.engine()
        sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

        @event.listens_for(sync, "connect")
        def driver_transactions_off(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(sync, "begin")
        def emit_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN")

    check_no_lost_update(cell, f"{journal}/{transactions}", engine)


# slow (not in the compat leg): server cells' threads taking turns on a row; with_row_locks on
# each of these drivers locks for real there in test_rowlocks_real.py, and the SQLite race runs
# there in test_no_lost_update_with_row_locks_sqlite.
@pytest.mark.slow
@pytest.mark.cells("postgresql", "mariadb")
def test_no_lost_update_with_row_locks(cell: Cell) -> None:
    check_no_lost_update(cell, "-")


@pytest.mark.cells("sqlite")
def test_updates_are_lost_without_row_locks_sqlite(cell: Cell, journal: str) -> None:
    """The control: the very same loop, without with_row_locks, loses updates. If it did not,
    the tests above could not tell a lock from no lock."""
    check_updates_are_lost(cell, journal)


# slow (not in the compat leg): a control, no locksafe code.
@pytest.mark.slow
@pytest.mark.cells("postgresql+psycopg2", "postgresql+asyncpg", "mysql+pymysql", "mysql+aiomysql")
def test_updates_are_lost_without_row_locks(cell: Cell) -> None:
    check_updates_are_lost(cell, "-")


# -- SKIP LOCKED claims --------------------------------------------------------------------------


@dataclass
class Claims:
    claimed: dict[int, list[int]]
    empty_polls: dict[int, int]
    per_row: dict[int, int]  # job id -> claims counted in the database
    claimed_by: dict[int, int | None]


def run_claims(cell: Cell, *, locked: bool, hold: float = 0.005) -> Claims:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(
            insert(jobs),
            [{"id": i, "state": "queued", "claimed_by": None, "claims": 0} for i in range(JOBS)],
        )
    empty_polls: dict[int, int] = {}

    def worker(conn: Connection, index: int) -> list[int]:
        claimed: list[int] = []
        empty_polls[index] = 0
        pick = select(jobs.c.id).where(jobs.c.state == "queued").order_by(jobs.c.id).limit(1)
        if locked:
            pick = with_row_locks(pick, skip_locked=True)
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            with conn.begin():
                row = conn.execute(pick).first()
                if row is not None:
                    time.sleep(hold)
                    conn.execute(
                        update(jobs)
                        .where(jobs.c.id == row.id)
                        .values(state="done", claimed_by=index, claims=jobs.c.claims + 1)
                    )
                    claimed.append(row.id)
                    continue
            empty_polls[index] += 1
            with conn.begin():
                left = conn.execute(
                    select(func.count()).select_from(jobs).where(jobs.c.state == "queued")
                ).scalar_one()
            if left == 0:
                return claimed
            time.sleep(0.002)
        raise AssertionError(f"worker {index} still polling after {DEADLINE}s")

    claimed = Workers(cell, THREADS).run(worker)
    with cell.sync_engine().connect() as conn:
        rows = conn.execute(select(jobs.c.id, jobs.c.claims, jobs.c.claimed_by)).all()
    return Claims(
        claimed=claimed,
        empty_polls=empty_polls,
        per_row={row.id: row.claims for row in rows},
        claimed_by={row.id: row.claimed_by for row in rows},
    )


@pytest.mark.cells("postgresql", "mariadb", "sqlite")
def test_skip_locked_workers_never_claim_a_job_twice(cell: Cell) -> None:
    result = run_claims(cell, locked=True)
    all_claims = [job for jobs_of_worker in result.claimed.values() for job in jobs_of_worker]
    assert sorted(all_claims) == list(range(JOBS))  # every job once, none twice
    assert result.per_row == dict.fromkeys(range(JOBS), 1)
    for index, own in result.claimed.items():
        assert all(result.claimed_by[job] == index for job in own)
    if cell.backend == "sqlite":
        # While one worker holds the write lock, the others' skip_locked reads come back
        # empty instead of waiting; the loop goes on and still never double-claims.
        assert sum(result.empty_polls.values()) > THREADS
    else:
        # Row locks: the workers claimed side by side, skipping each other's rows.
        assert sum(1 for own in result.claimed.values() if own) >= 2, result.claimed


# slow (not in the compat leg): a control, no locksafe code.
@pytest.mark.slow
@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
def test_claims_collide_without_row_locks(cell: Cell) -> None:
    """The control: the same claim loop without with_row_locks claims jobs twice."""
    result = run_claims(cell, locked=False, hold=RACE_WINDOW)
    all_claims = [job for jobs_of_worker in result.claimed.values() for job in jobs_of_worker]
    assert len(all_claims) > len(set(all_claims))
    assert max(result.per_row.values()) > 1
