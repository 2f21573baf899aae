"""The bank invariant under contention (issue 13, reliability suite).

Worker threads move money between a few accounts through ``@transactional``, each transfer a
read-modify-write of two balances under ``with_row_locks`` plus a row in a committed-transfer
log, written in the same transaction. The transfers collide on purpose, in three ways mixed at
random: rows locked in random order with a pause in between (deadlocks on PostgreSQL and
MariaDB), a short ``locksafe.lock_timeout`` (lock timeouts), and ``with_row_locks(nowait=True)``
(NOWAIT failures). SQLite (a file, ``locksafe.sqlite.configure``) has one writer at a time: there
every collision is ``database_busy``.

Checked afterwards from a second connection: the total balance is conserved; no update is lost
(every balance is what the log says it must be); every call the caller saw commit is in the log,
and no call that raised is; every call either committed or raised ``LockUnavailable`` (0
unhandled errors). The failures must really have happened (counted per kind and mode), and most
calls must commit — a run where everything gave up would prove nothing.

``test_the_audit_sees_lost_updates_without_row_locks`` runs the same transfers without the row
locks, and the audit catches the updates they lose: the check can fail.

Sizes: CI runs 240 transfers on one sync driver per backend (sqlite+pysqlite, postgresql+psycopg,
mysql+pymysql); the full size runs 10,000 per driver cell on all 13 cells::

    LOCKSAFE_RELIABILITY=full pytest tests/test_reliability_bank.py
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

import locksafe
import locksafe.sqlite
from harness.cells import Cell
from harness.reliability import (
    MODES,
    SHORT_LOCK_TIMEOUT,
    SIZE,
    Tally,
    Transfer,
    apply_transfer,
    audit,
    metadata,
    on_connect,
    plan,
    run_threads,
    seed_bank,
)
from locksafe import NEW_SESSION, transactional

#: Attempts per call: enough that most calls commit despite the collisions.
ATTEMPTS = 10
#: The share of transfers that hold a lock longer than the short lock timeout.
LONG_FRACTION = 0.01 if SIZE.transfers > 1000 else 0.03


pytestmark = pytest.mark.usefixtures("quiet_retries")


def bank_engine(cell: Cell, threads: int) -> Any:
    """The cell's engine, pooled for sync drivers (one connection per worker), with the
    backend's deadlock detection and lock waits bounded so a run cannot hang."""
    if cell.is_async:
        engine = cell.engine()  # no pool: connections never cross the workers' event loops
    else:
        engine = cell.engine(poolclass=QueuePool, pool_size=threads, max_overflow=threads)
    if cell.backend == "sqlite":
        locksafe.sqlite.configure(engine, busy_timeout=10)
    elif cell.backend == "postgresql":
        # Detect deadlocks after 10 ms instead of 1 s: many per second in a short run, and
        # before @transactional's early lock-wait bound (20 ms on a first attempt) ends the
        # wait, so the run mixes the server's deadlock errors with early lock timeouts.
        on_connect(engine, "SET deadlock_timeout = '10ms'", "SET lock_timeout = '10s'")
    else:
        on_connect(engine, "SET SESSION innodb_lock_wait_timeout = 10")
    return cell.warm_up(engine)


def prepare(cell: Cell) -> Any:
    cell.create_all(metadata)
    admin = cell.sync_engine()
    if cell.backend == "sqlite":  # WAL is persistent: set once, before any contention
        with admin.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode = wal")
    seed_bank(admin)
    return admin


def run_bank(
    cell: Cell, engine: Any, plans: list[list[Transfer]], tally: Tally, *, locked: bool = True
) -> float:
    """Run each worker's transfers in its own thread; returns the seconds it took."""
    short = SHORT_LOCK_TIMEOUT[cell.backend]

    def body(session: Session, t: Transfer) -> None:
        tally.attempt(t)
        apply_transfer(session, t, short_timeout=short, locked=locked)

    options: dict[str, Any] = {
        "attempts": ATTEMPTS,
        "on_retry": tally.on_retry,
        "wait_initial": 0.002,
        "wait_max": 0.05,
    }

    if cell.is_async:
        maker = async_sessionmaker(engine)

        @transactional(sessionmaker=maker, **options)
        async def call_async(t: Transfer, *, session: AsyncSession = NEW_SESSION) -> None:
            await session.run_sync(body, t)

        def worker(transfers: list[Transfer]) -> None:
            async def main() -> None:
                for t in transfers:
                    tally.begin_call(t)
                    try:
                        await call_async(t)
                    except Exception as exc:
                        tally.outcome(t, exc)
                    else:
                        tally.outcome(t, None)

            cell.run_async(main)

    else:

        @transactional(sessionmaker=sessionmaker(engine), **options)
        def call(t: Transfer, *, session: Session = NEW_SESSION) -> None:
            body(session, t)

        def worker(transfers: list[Transfer]) -> None:
            for t in transfers:
                tally.begin_call(t)
                try:
                    call(t)
                except Exception as exc:
                    tally.outcome(t, exc)
                else:
                    tally.outcome(t, None)

    started = time.monotonic()
    run_threads(
        [lambda ts=ts: worker(ts) for ts in plans],  # type: ignore[misc]
        deadline=SIZE.bank_timeout - 20,
    )
    return time.monotonic() - started


def split(
    total: int, workers: int, seed: int, name: str, backend: str = "postgresql"
) -> list[list[Transfer]]:
    """``total`` transfers over ``workers``; a few hold their first lock 1.5 × the backend's
    short lock timeout, so that lock timeouts happen (MariaDB's shortest is 1 s)."""
    per = [total // workers + (1 if i < total % workers else 0) for i in range(workers)]
    return [
        plan(
            f"{name}{i}",
            n,
            seed * 100 + i,
            long_pause=1.5 * SHORT_LOCK_TIMEOUT[backend],
            long_fraction=LONG_FRACTION,
        )
        for i, n in enumerate(per)
    ]


@pytest.mark.timeout(SIZE.bank_timeout)
@pytest.mark.cells(*SIZE.bank_cells)
def test_bank_invariant_under_deadlocks_lock_timeouts_and_nowait(cell: Cell) -> None:
    admin = prepare(cell)
    engine = bank_engine(cell, SIZE.threads)
    tally = Tally()
    plans = split(SIZE.transfers, SIZE.threads, seed=13, name="w", backend=cell.backend)
    seconds = run_bank(cell, engine, plans, tally)
    calls = sum(len(p) for p in plans)
    print(
        f"\n{cell.name}: {calls} transfers by {SIZE.threads} threads in {seconds:.1f} s "
        f"({calls / seconds:.0f}/s): {tally.summary()}"
    )

    # every call committed or raised LockUnavailable
    assert not tally.errors, f"{len(tally.errors)} unhandled errors: {tally.unhandled()}"
    assert len(tally.committed) + sum(tally.unavailable.values()) == calls
    # the invariants, from a second connection
    audit(admin).check(tally.committed)
    # a call that committed ran once per retried failure, plus the attempt that committed
    for call_id in tally.committed:
        assert tally.attempts[call_id] == tally.retries[call_id] + 1, call_id
    # only lock errors were retried
    kinds = tally.retried_kinds()
    assert "NOT A LOCK ERROR" not in kinds, kinds
    # the collisions really happened, of every kind this backend has
    if cell.backend == "sqlite":
        # One writer at a time: a wait that runs out, NOWAIT included, is "database busy".
        assert kinds["database_busy"] > 0, kinds
        assert set(kinds) == {"database_busy"}, kinds
        assert tally.retried_modes()["nowait"] > 0, tally.retried
        assert tally.retried_modes()["timeout"] > 0, tally.retried
    else:
        assert kinds["deadlock"] > 0, kinds
        assert kinds["lock_not_available"] > 0, kinds
        assert kinds["lock_timeout"] > 0, kinds
    # ...and did not drown the work
    assert len(tally.committed) >= 0.5 * calls, tally.summary()


@pytest.mark.cells("postgresql+psycopg")
def test_the_audit_sees_lost_updates_without_row_locks(cell: Cell) -> None:
    """The same read-modify-write transfers, without ``with_row_locks``: PostgreSQL (READ
    COMMITTED) lets two transfers read the same balance, and the second write loses the first.
    The audit must say so, or the bank test above could not fail."""
    admin = prepare(cell)
    engine = bank_engine(cell, 4)
    tally = Tally()
    # Two accounts only, a pause between read and write: the reads overlap for sure.
    plans = [
        [
            Transfer(f"u{w}-{n}", 1 + (n + w) % 2, 2 - (n + w) % 2, 1 + n, "deadlock", 0.01)
            for n in range(10)
        ]
        for w in range(4)
    ]
    run_bank(cell, engine, plans, tally, locked=False)
    assert not tally.errors, tally.unhandled()
    found = audit(admin)
    assert found.lost_updates, "no update lost without row locks: the audit proves nothing"
    with pytest.raises(AssertionError):
        found.check(tally.committed, accounts_n=len(found.balances))


def test_the_modes_are_what_the_docstring_says() -> None:
    """Guard the mix itself: the three failure modes, each used by the planned transfers."""
    planned = [t for worker in split(600, 6, seed=13, name="w") for t in worker]
    assert {t.mode for t in planned} == set(MODES)
    assert all(t.src != t.dst for t in planned)
