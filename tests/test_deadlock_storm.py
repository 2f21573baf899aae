"""``@transactional(early_lock_timeout=...)`` against PostgreSQL's delayed deadlock detection
(issue 13).

PostgreSQL looks for a deadlock only after a transaction has waited ``deadlock_timeout`` (1 s
by default): every deadlock costs that long. On such a server (``DialectSupport.
deadlock_detection_delayed``) ``@transactional`` bounds the lock waits of its early attempts
to a short, growing bound, so a deadlock ends as a lock timeout, retried, long before the
detector runs; its last attempt waits as long as ``timeout`` allows, so a legitimate long wait
still succeeds.

Real servers, real contention: the tests set ``deadlock_timeout`` to seconds on their
connections (the harness connects as a superuser), so a deadlock the server had to detect
would show in the time taken. MariaDB (deadlocks detected at once) is left as it was.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, event, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import locksafe
from harness.cells import Cell
from locksafe import LockErrorKind, RetryDetails, transactional
from locksafe.dialects.postgresql import lock_timeout_seconds

metadata = MetaData()
accounts = Table(
    "storm_accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("balance", Integer, nullable=False),
)

BARRIER_TIMEOUT = 10


pytestmark = pytest.mark.usefixtures("quiet_retries")


def engine_for(cell: Cell, *, deadlock_timeout: float = 5.0) -> Any:
    """The cell's engine; on PostgreSQL with ``deadlock_timeout`` seconds on every connection
    (slow detection, to be seen in the time taken)."""
    engine = cell.engine()
    sync = engine.sync_engine if cell.is_async else engine
    if cell.backend == "postgresql":
        ms = round(deadlock_timeout * 1000)

        @event.listens_for(sync, "connect")
        def _slow_detector(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"SET deadlock_timeout = '{ms}ms'")
            cursor.close()
            dbapi_connection.commit()

    return cell.warm_up(engine)


def seed(cell: Cell, count: int, balance: int = 100) -> None:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(accounts), [{"id": i, "balance": balance} for i in range(1, count + 1)])


def total(cell: Cell) -> int:
    with cell.sync_engine().connect() as conn:
        return sum(r.balance for r in conn.execute(select(accounts)))


def lock(session: Session, account: int) -> None:
    session.execute(
        locksafe.with_row_locks(select(accounts).where(accounts.c.id == account), session)
    ).all()


def move(session: Session, source: int, target: int, amount: int) -> None:
    session.execute(
        update(accounts).where(accounts.c.id == source).values(balance=accounts.c.balance - amount)
    )
    session.execute(
        update(accounts).where(accounts.c.id == target).values(balance=accounts.c.balance + amount)
    )


def run_threads(jobs: list[Callable[[], Any]], timeout: float = 60) -> list[Any]:
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def runner(index: int) -> None:
        try:
            results[index] = jobs[index]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a worker did not finish in time"
    if errors:
        raise errors[0]
    return results


def transfer_function(
    cell: Cell, step: Callable[[Session], Any], **options: Any
) -> Callable[[Any], Any]:
    """``step(session)`` inside ``@transactional(**options)``, called with an engine: sync
    cells in a Session, async cells in an AsyncSession (``run_sync``)."""

    @transactional(**options)
    def sync_call(*, session: Session) -> Any:
        return step(session)

    @transactional(**options)
    async def async_call(*, session: AsyncSession) -> Any:
        return await session.run_sync(step)

    def call(engine: Any) -> Any:
        if cell.is_async:

            async def main() -> Any:
                async with AsyncSession(engine) as session:
                    return await async_call(session=session)

            return cell.run_async(main)
        with Session(engine) as session:
            return sync_call(session=session)

    return call


def opposite_transfers(
    cell: Cell, engine: Any, **options: Any
) -> tuple[float, list[RetryDetails], list[int]]:
    """Two transfers that lock accounts 1 and 2 in opposite orders, both holding their first
    lock before either asks for its second (a deadlock on their first attempts): the time
    both took, the retries, and each one's attempts."""
    seed(cell, 2)
    barrier = threading.Barrier(2)
    seen: list[RetryDetails] = []
    attempts = [0, 0]

    def job(index: int) -> Callable[[], Any]:
        first, second = (1, 2) if index == 0 else (2, 1)

        def step(session: Session) -> None:
            attempts[index] += 1
            lock(session, first)
            if attempts[index] == 1:
                barrier.wait(BARRIER_TIMEOUT)
            lock(session, second)
            move(session, first, second, 10)

        call = transfer_function(cell, step, on_retry=seen.append, **options)
        return lambda: call(engine)

    began = time.monotonic()
    run_threads([job(0), job(1)])
    elapsed = time.monotonic() - began
    assert total(cell) == 200, "the money is conserved"
    return elapsed, seen, attempts


@pytest.mark.cells("postgresql")
def test_a_deadlock_ends_far_sooner_than_the_servers_detector(cell: Cell) -> None:
    """With deadlock_timeout = 5 s, the default @transactional resolves a real deadlock in a
    fraction of that: one transfer's wait ends as a lock timeout, retried; both commit."""
    engine = engine_for(cell, deadlock_timeout=5.0)
    elapsed, seen, _ = opposite_transfers(cell, engine)
    assert elapsed < 2.5, f"took {elapsed:.2f} s: the server's detector (5 s) ended it"
    assert seen, "no deadlock was provoked"
    assert {d.kind for d in seen} == {LockErrorKind.LOCK_TIMEOUT}, [d.kind for d in seen]


@pytest.mark.cells("postgresql+psycopg2")
def test_without_the_early_bound_the_server_takes_deadlock_timeout(cell: Cell) -> None:
    """The contrast (what the test above would see without the feature): with
    ``early_lock_timeout=None`` the same deadlock lasts the server's deadlock_timeout."""
    engine = engine_for(cell, deadlock_timeout=1.0)
    elapsed, seen, _ = opposite_transfers(cell, engine, early_lock_timeout=None)
    assert elapsed >= 1.0, elapsed
    assert {d.kind for d in seen} == {LockErrorKind.DEADLOCK}, [d.kind for d in seen]


@pytest.mark.cells("postgresql+psycopg2", "postgresql+psycopg", "postgresql+asyncpg")
def test_a_storm_of_deadlocks_never_waits_for_the_detector(cell: Cell) -> None:
    """Four threads, random pairs of three accounts locked in random order with a pause in
    between: many deadlocks. None lasts until the server's detector (5 s) fires, every
    transfer commits, and the total balance is conserved."""
    seed(cell, 3)
    engine = engine_for(cell, deadlock_timeout=5.0)
    seen: list[RetryDetails] = []
    committed: list[int] = []

    def worker(index: int) -> Callable[[], None]:
        rng = random.Random(index)

        def run() -> None:
            for _ in range(10):
                first, second = rng.sample((1, 2, 3), 2)
                amount = rng.randint(1, 5)

                def step(
                    session: Session, first: int = first, second: int = second, amount: int = amount
                ) -> None:
                    lock(session, first)
                    time.sleep(0.005)
                    lock(session, second)
                    move(session, first, second, amount)

                transfer_function(cell, step, attempts=10, on_retry=seen.append)(engine)
                committed.append(1)

        return run

    began = time.monotonic()
    run_threads([worker(i) for i in range(4)])
    elapsed = time.monotonic() - began
    assert len(committed) == 40
    assert total(cell) == 300, "the money is conserved"
    kinds = [d.kind for d in seen]
    assert LockErrorKind.LOCK_TIMEOUT in kinds, "no deadlock was provoked"
    assert LockErrorKind.DEADLOCK not in kinds, "the server's detector had to end one"
    assert elapsed < 5.0, f"took {elapsed:.2f} s"


def hold_row(cell: Cell, account: int, seconds: float, held: threading.Event) -> None:
    """Another connection locks ``account`` for ``seconds``, then commits."""
    with cell.sync_engine().begin() as conn:
        conn.execute(select(accounts).where(accounts.c.id == account).with_for_update()).all()
        held.set()
        time.sleep(seconds)


def wait_behind_holder(
    cell: Cell, engine: Any, seconds: float, *, first_lock: bool = True, **options: Any
) -> tuple[float, int, list[RetryDetails]]:
    """A transfer that (with ``first_lock``) locks account 1, then waits for account 2, which
    another connection holds ``seconds``: the time it took, its attempts, its retries."""
    seed(cell, 2)
    held = threading.Event()
    holder = threading.Thread(target=hold_row, args=(cell, 2, seconds, held))
    holder.start()
    assert held.wait(BARRIER_TIMEOUT)
    attempts = [0]
    seen: list[RetryDetails] = []

    def step(session: Session) -> str:
        attempts[0] += 1
        if first_lock:
            lock(session, 1)
        lock(session, 2)
        move(session, 2, 1, 5)
        return "done"

    began = time.monotonic()
    try:
        result = transfer_function(cell, step, on_retry=seen.append, **options)(engine)
    finally:
        holder.join(BARRIER_TIMEOUT + seconds)
    assert result == "done"
    assert total(cell) == 200
    return time.monotonic() - began, attempts[0], seen


@pytest.mark.cells("postgresql+psycopg2", "postgresql+asyncpg")
def test_a_legitimate_long_wait_still_succeeds_with_the_default_attempts(cell: Cell) -> None:
    """The row is held 2 s by a transaction that then commits (no deadlock): the early
    attempts' short waits end and are retried, the last one waits as long as it takes."""
    engine = engine_for(cell)
    elapsed, attempts, seen = wait_behind_holder(cell, engine, 2.0)
    assert elapsed >= 1.9
    assert attempts > 1, "the early bound was not applied"
    assert attempts <= 5
    assert {d.kind for d in seen} == {LockErrorKind.LOCK_TIMEOUT}


@pytest.mark.cells("postgresql+psycopg2")
def test_one_attempt_has_no_early_bound(cell: Cell) -> None:
    """``attempts=1``: no retry would follow an early timeout, so none is set: the wait lasts
    as long as the holder holds the row, and succeeds."""
    engine = engine_for(cell)
    elapsed, attempts, seen = wait_behind_holder(cell, engine, 0.5, attempts=1)
    assert elapsed >= 0.45
    assert (attempts, seen) == (1, [])


@pytest.mark.cells("postgresql+psycopg2")
def test_the_users_own_lock_timeout_wins_inside_its_block(cell: Cell) -> None:
    """Inside ``lock_timeout(session, 5)`` the user's bound applies, not the early one."""
    seed(cell, 2)
    engine = engine_for(cell)
    held = threading.Event()
    holder = threading.Thread(target=hold_row, args=(cell, 2, 0.5, held))
    holder.start()
    assert held.wait(BARRIER_TIMEOUT)
    attempts = [0]

    def step(session: Session) -> None:
        attempts[0] += 1
        lock(session, 1)
        with locksafe.lock_timeout(session, 5):
            lock(session, 2)

    try:
        transfer_function(cell, step)(engine)
    finally:
        holder.join(BARRIER_TIMEOUT)
    assert attempts == [1]


def balances(cell: Cell) -> dict[int, int]:
    with cell.sync_engine().connect() as conn:
        return {r.id: r.balance for r in conn.execute(select(accounts))}


def held_for(cell: Cell, seconds: float) -> threading.Thread:
    """Account 2 locked by another connection for ``seconds`` (the thread to join)."""
    seed(cell, 2)
    held = threading.Event()
    holder = threading.Thread(target=hold_row, args=(cell, 2, seconds, held))
    holder.start()
    assert held.wait(BARRIER_TIMEOUT)
    return holder


@pytest.mark.cells("postgresql+psycopg2", "postgresql+asyncpg")
@pytest.mark.parametrize(
    "retry_on",
    [{LockErrorKind.DEADLOCK}, lambda exc: locksafe.classify(exc) is LockErrorKind.DEADLOCK],
    ids=["kinds", "predicate"],
)
def test_a_retry_on_without_lock_timeout_still_waits_for_a_held_row(
    cell: Cell, retry_on: Any
) -> None:
    """``retry_on`` that leaves lock timeouts out: a wait the early bound ended is locksafe's,
    not the server's, and goes on in the next attempt whatever ``retry_on`` says (found by a
    new-user review: the call failed after 50 ms on a row held 0.3 s)."""
    engine = engine_for(cell)
    elapsed, attempts, seen = wait_behind_holder(cell, engine, 0.3, retry_on=retry_on)
    assert elapsed >= 0.25
    assert attempts > 1, "the early bound was not applied"
    assert {d.kind for d in seen} == {LockErrorKind.LOCK_TIMEOUT}


@pytest.mark.cells("postgresql+psycopg2", "postgresql+asyncpg")
@pytest.mark.parametrize("handling", ["returns", "raises its own error"])
def test_a_function_that_catches_the_early_bounds_timeout_is_run_again(
    cell: Cell, handling: str
) -> None:
    """The function catches the lock error in a savepoint (as docs/row-locks.md shows) and
    answers "busy": it never asked for a 20 ms bound, and stock it would have waited for the
    row. The attempt is void (not committed: its "busy" is not the answer) and the wait goes
    on in the next one, so the work is done (found by a new-user review: "busy, skipped" was
    committed with the work not done)."""
    from sqlalchemy.exc import DBAPIError

    class Busy(Exception):
        pass

    engine = engine_for(cell)
    holder = held_for(cell, 0.5)
    answers: list[str] = []

    def step(session: Session) -> str:
        lock(session, 1)
        try:
            with session.begin_nested():
                lock(session, 2)
                move(session, 2, 1, 5)
            answers.append("processed")
            return "processed"
        except DBAPIError as exc:  # asyncpg's lock timeout is no OperationalError
            if locksafe.classify(exc) is None:
                raise
            answers.append("busy")
            session.execute(
                update(accounts).where(accounts.c.id == 1).values(balance=accounts.c.balance + 1)
            )
            if handling == "returns":
                return "busy"
            raise Busy from exc

    try:
        result = transfer_function(cell, step)(engine)
    finally:
        holder.join(BARRIER_TIMEOUT)
    assert result == "processed"
    assert answers[-1] == "processed", answers
    assert "busy" in answers, answers
    assert balances(cell) == {1: 105, 2: 95}  # the "busy" attempts' +1 rolled back


@pytest.mark.cells("postgresql+psycopg2")
def test_the_users_own_lock_timeout_is_not_taken_for_the_early_bound(
    cell: Cell, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock timeout of the user's own ``lock_timeout(session, 0.3)`` block is theirs: logged
    as a WARNING like any lock timeout, never as the early bound's (INFO), and each attempt
    waits the user's 0.3 s (found by a new-user review: "its early bound, 0.020s" was logged
    at INFO for a 0.3 s wait)."""
    import logging

    engine = engine_for(cell)
    holder = held_for(cell, 2.0)
    logging.getLogger("locksafe.transactions").setLevel(logging.INFO)
    caplog.set_level(logging.INFO, logger="locksafe.transactions")
    waits: list[float] = []

    def step(session: Session) -> None:
        lock(session, 1)
        began = time.monotonic()
        try:
            with locksafe.lock_timeout(session, 0.3):
                lock(session, 2)
        finally:
            waits.append(time.monotonic() - began)

    try:
        with pytest.raises(locksafe.LockUnavailable):
            transfer_function(cell, step, attempts=3, wait_initial=0.01, wait_max=0.01)(engine)
    finally:
        holder.join(BARRIER_TIMEOUT)
    assert len(waits) == 3, waits
    assert all(wait >= 0.25 for wait in waits), waits
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == 2, [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.WARNING for r in retried)
    assert not any("early bound" in r.getMessage() for r in caplog.records)


@pytest.mark.cells("mariadb")
def test_mariadb_lock_waits_are_left_to_the_server(cell: Cell) -> None:
    """InnoDB detects deadlocks at once (no ``deadlock_detection_delayed``): a legitimate
    wait is one attempt, as before."""
    engine = engine_for(cell)
    elapsed, attempts, seen = wait_behind_holder(cell, engine, 1.0)
    assert elapsed >= 0.95
    assert (attempts, seen) == (1, [])


def test_the_dialect_flag() -> None:
    from locksafe.dialects import support_for

    flags = {
        name: getattr(support_for(name), "deadlock_detection_delayed", None)
        for name in ("postgresql", "mysql", "mariadb", "sqlite", "oracle", "mssql")
    }
    assert flags == {
        "postgresql": True,
        "mysql": False,
        "mariadb": False,
        "sqlite": False,
        "oracle": False,
        "mssql": False,
    }


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("0.02", TypeError),
        (True, TypeError),
        ([0.02], TypeError),
        (0, ValueError),
        (-0.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
    ],
)
def test_bad_early_lock_timeout_raises_at_call_time_naming_the_option(
    value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="early_lock_timeout="):
        transactional(early_lock_timeout=value)


@pytest.mark.parametrize("value", [None, 0.001, 1, 2.5])
def test_good_early_lock_timeout_values_are_accepted(value: Any) -> None:
    transactional(early_lock_timeout=value)


def test_early_bounds_grow_and_the_last_attempt_has_none() -> None:
    from locksafe.transactions import _Policy

    def bounds(**kw: Any) -> list[float | None]:
        options: dict[str, Any] = {
            "attempts": 5,
            "timeout": 30.0,
            "retry_on": None,
            "on_retry": None,
            "wait_initial": 0.05,
            "wait_max": 2.0,
            "retry_after": None,
            "operation": "f",
            "early_lock_timeout": 0.02,
        }
        options.update(kw)
        policy = _Policy(**options)
        return [policy.early_bound(n) for n in range(1, policy.attempts + 1)]

    default = bounds()
    assert default[-1] is None
    early = [b for b in default[:-1] if b is not None]
    assert len(early) == 4
    assert early[0] == pytest.approx(0.02)
    assert all(a < b for a, b in itertools.pairwise(early))
    assert bounds(attempts=1) == [None]
    assert bounds(early_lock_timeout=None) == [None] * 5
    # never past the call's timeout: then the deadline alone bounds the wait
    assert bounds(timeout=0.05)[2:] == [None, None, None]


def bound_inside(cell: Cell, engine: Any, **options: Any) -> float:
    """The lock-wait bound (seconds) the first attempt of a ``@transactional(**options)``
    call sees on PostgreSQL."""

    def step(session: Session) -> float:
        value = session.execute(select(func.current_setting("lock_timeout"))).scalar_one()
        return lock_timeout_seconds(value)

    result: float = transfer_function(cell, step, **options)(engine)
    return result


@pytest.mark.cells("postgresql+psycopg2", "postgresql+asyncpg")
def test_the_early_bound_is_what_the_first_attempt_sees_and_never_loosens(cell: Cell) -> None:
    """The first attempt's lock waits are bounded by ``early_lock_timeout`` (tighter than the
    deadline); a connection bounded tighter still keeps its own bound; off, the deadline."""
    seed(cell, 1)
    engine = engine_for(cell)
    assert bound_inside(cell, engine) == pytest.approx(0.02)
    assert bound_inside(cell, engine, early_lock_timeout=0.25) == pytest.approx(0.25)
    assert 29 < bound_inside(cell, engine, early_lock_timeout=None) <= 30
    assert bound_inside(cell, engine, attempts=1) > 29  # one attempt: no early bound
    tight = cell.engine(connect_args=tight_connect_args(cell))
    try:
        assert bound_inside(cell, tight) == pytest.approx(0.005)
    finally:
        if cell.is_async:
            cell.run_async(tight.dispose)
        else:
            tight.dispose()


def tight_connect_args(cell: Cell) -> dict[str, Any]:
    """Connections bounded to 5 ms by the server setting (the application's own bound)."""
    if cell.driver == "asyncpg":
        return {"server_settings": {"lock_timeout": "5ms"}}
    return {"options": "-c lock_timeout=5ms"}


@pytest.mark.cells("postgresql+psycopg2")
def test_the_early_bound_costs_no_statement_with_a_deadline(cell: Cell) -> None:
    """With a finite ``timeout`` (the default), the statement that sets the deadline sets the
    early bound: the same statements per call as without it."""
    seed(cell, 1)
    engine = engine_for(cell)
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))

    def step(session: Session) -> None:
        lock(session, 1)

    for early in (0.02, None):  # warm: connected
        transfer_function(cell, step, early_lock_timeout=early)(engine)
    counts = {}
    for early in (0.02, None):
        sent.clear()
        transfer_function(cell, step, early_lock_timeout=early)(engine)
        counts[early] = len(sent)
    assert counts[0.02] == counts[None], counts


@pytest.mark.cells("postgresql+psycopg2")
def test_a_wait_the_deadline_allows_is_not_given_up_early(
    cell: Cell, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``timeout=1`` and a row held 0.8 s: the first attempt's early bound ends its wait, and
    its backoff (1.5 s here: the highest of the jitter) would cross the deadline. The call does
    not give up there, before its deadline, on a wait the deadline allowed: the time left goes
    to a last attempt at once, without the early bound, which gets the row."""
    import locksafe.transactions

    monkeypatch.setattr(locksafe.transactions.random, "uniform", lambda low, high: high)
    engine = engine_for(cell)
    elapsed, attempts, seen = wait_behind_holder(
        cell, engine, 0.8, timeout=1.0, attempts=5, wait_initial=1.5, wait_max=1.5
    )
    assert attempts == 2
    assert [d.wait for d in seen] == [0.0]
    # Got the row when the holder let go, without sleeping the 1.5 s backoff (that would be
    # >= 1.52 s); not "< 1.0": on a loaded machine the last attempt's wake-up took 1.19 s.
    assert 0.75 <= elapsed < 1.5
