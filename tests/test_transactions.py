"""@transactional against real contention on every driver cell.

Sync cells run the sync decorator with a Session; async cells run the ``async def`` variant with
an AsyncSession *and* the sync variant through ``run_sync``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InvalidRequestError, PendingRollbackError
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Session, scoped_session, sessionmaker

import locksafe
import locksafe.sqlite
from harness.cells import Cell
from locksafe import LockErrorKind, LockUnavailable, RetryDetails, transactional
from locksafe.classify import RETRYABLE_KINDS

metadata = MetaData()
accounts = Table(
    "tx_accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("balance", Integer, nullable=False),
    Column("note", String(40)),
)


class Base(DeclarativeBase):
    pass


class Account(Base):
    """The ORM view of ``accounts``: its changes are written by a flush."""

    __table__ = accounts


BARRIER_TIMEOUT = 10


@pytest.fixture(autouse=True)
def _no_backoff() -> Iterator[None]:
    locksafe.set_testing(True)
    try:
        yield
    finally:
        locksafe.set_testing(False)


def engine_for(cell: Cell, *, lock_wait: int = 10, **kw: Any) -> Any:
    """The cell's engine, with fast deadlock detection and lock waits bounded by
    ``lock_wait`` seconds (at least 1: MariaDB's unit)."""
    if cell.backend == "sqlite":
        kw.setdefault("connect_args", {}).setdefault("timeout", min(lock_wait, 5))
    engine = cell.engine(**kw)
    sync = engine.sync_engine if cell.is_async else engine
    if cell.backend == "sqlite":
        locksafe.sqlite.configure(engine, busy_timeout=min(lock_wait, 5), begin="deferred")
    else:
        settings = (
            ["SET deadlock_timeout = '100ms'", f"SET lock_timeout = '{lock_wait}s'"]
            if cell.backend == "postgresql"
            else [f"SET SESSION innodb_lock_wait_timeout = {lock_wait}"]
        )

        @event.listens_for(sync, "connect")
        def _session_settings(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            for sql in settings:
                cursor.execute(sql)
            cursor.close()
            dbapi_connection.commit()

    return cell.warm_up(engine)


def seed(cell: Cell, rows: dict[int, int]) -> None:
    cell.create_all(metadata)
    if cell.backend == "sqlite":  # WAL is persistent: switch once, before any contention
        with cell.sync_engine().connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode = wal")
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(accounts), [{"id": k, "balance": v} for k, v in rows.items()])


def balances(cell: Cell) -> dict[int, int]:
    with cell.sync_engine().connect() as conn:
        return {r.id: r.balance for r in conn.execute(select(accounts))}


def variants(cell: Cell) -> list[str]:
    return ["async", "sync-through-run_sync"] if cell.is_async else ["sync"]


def run_concurrently(*jobs: Callable[[], Any], timeout: float = 60) -> list[Any]:
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def runner(index: int, job: Callable[[], Any]) -> None:
        try:
            results[index] = job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(i, j)) for i, j in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a worker did not finish in time"
    if errors:
        raise errors[0]
    return results


# -- the conflicting work, per backend -------------------------------------------------------


def conflicting_step(
    cell: Cell, session: Session, mine: int, theirs: int, first: bool, barrier: threading.Barrier
) -> None:
    """One transaction of a pair that the server must resolve by failing one of them.

    PostgreSQL / MariaDB: lock my row, then the other's (opposite orders: a deadlock).
    SQLite: read both rows, then write (two deferred read→write upgrades: SQLITE_BUSY).
    """
    if cell.backend == "sqlite":
        session.execute(select(accounts)).all()
        if first:
            barrier.wait(BARRIER_TIMEOUT)
        session.execute(
            update(accounts).where(accounts.c.id == mine).values(balance=accounts.c.balance - 1)
        )
        session.execute(
            update(accounts).where(accounts.c.id == theirs).values(balance=accounts.c.balance + 1)
        )
        return
    session.execute(
        locksafe.with_row_locks(select(accounts).where(accounts.c.id == mine), session)
    ).all()
    if first:
        barrier.wait(BARRIER_TIMEOUT)
    session.execute(
        locksafe.with_row_locks(select(accounts).where(accounts.c.id == theirs), session)
    ).all()
    session.execute(
        update(accounts).where(accounts.c.id == mine).values(balance=accounts.c.balance - 1)
    )
    session.execute(
        update(accounts).where(accounts.c.id == theirs).values(balance=accounts.c.balance + 1)
    )


def test_conflict_is_retried_to_success(cell: Cell) -> None:
    """Deadlocks (PostgreSQL, MariaDB) and busy upgrades (SQLite) are retried until both
    transactions succeed; the money is conserved and both transfers happened exactly once."""
    for variant in variants(cell):
        _conflict_round(cell, variant)


def _conflict_round(cell: Cell, variant: str) -> None:
    seed(cell, {1: 100, 2: 100})
    engine = engine_for(cell)
    barrier = threading.Barrier(2)
    seen: list[RetryDetails] = []
    attempts = {1: 0, 2: 0}
    # Backoff is zero under set_testing, so a loser that retried at once could spin through
    # all its attempts while the winner still waits for the GIL to commit (seen on CI, 2 cores:
    # 10 SQLite attempts in 10 ms). A real backoff leaves the winner that time; here a retry
    # waits, bounded, for the other transfer to finish instead.
    finished = {1: threading.Event(), 2: threading.Event()}

    def step(session: Session, mine: int, theirs: int) -> str:
        attempts[mine] += 1
        if attempts[mine] > 1:
            assert finished[theirs].wait(BARRIER_TIMEOUT), "the winner did not finish"
        conflicting_step(cell, session, mine, theirs, attempts[mine] == 1, barrier)
        return f"{mine}->{theirs}"

    # The server's own deadlock detection: without early_lock_timeout, PostgreSQL's deadlock
    # ends with one victim, as MariaDB's does (with it, both waits may end as lock timeouts,
    # and each loser here would wait for the other to finish: test_deadlock_storm.py covers it).
    @transactional(attempts=10, on_retry=seen.append, early_lock_timeout=None)
    def transfer_sync(mine: int, theirs: int, *, session: Session) -> str:
        return step(session, mine, theirs)

    @transactional(attempts=10, on_retry=seen.append, early_lock_timeout=None)
    async def transfer_async(mine: int, theirs: int, *, session: AsyncSession) -> str:
        return await session.run_sync(step, mine, theirs)

    def job(mine: int, theirs: int) -> str:
        try:
            if variant == "async":

                async def main() -> str:
                    async with AsyncSession(engine) as session:
                        return await transfer_async(mine, theirs, session=session)

                return cell.run_async(main)
            return cell.run_session(lambda s: transfer_sync(mine, theirs, session=s), engine=engine)
        finally:
            finished[mine].set()

    results = run_concurrently(lambda: job(1, 2), lambda: job(2, 1))
    assert sorted(results) == ["1->2", "2->1"]
    assert balances(cell) == {1: 100, 2: 100}, "each transfer applied exactly once"
    assert sum(attempts.values()) >= 3, f"no conflict was provoked: {attempts}"
    assert seen, "on_retry was not called"
    expected = LockErrorKind.DATABASE_BUSY if cell.backend == "sqlite" else LockErrorKind.DEADLOCK
    assert {d.kind for d in seen} == {expected}, [d.kind for d in seen]
    assert all(d.wait == 0 for d in seen)  # set_testing(True)


@pytest.mark.cells("postgresql")
def test_serialization_failure_is_retried_to_success(cell: Cell) -> None:
    seed(cell, {1: 0})
    engine = engine_for(cell, isolation_level="REPEATABLE READ")
    barrier = threading.Barrier(2)
    calls: list[int] = []
    kinds: list[LockErrorKind] = []

    def increment(session: Session, first: bool) -> None:
        value = session.execute(select(accounts.c.balance).where(accounts.c.id == 1)).scalar_one()
        if first:
            barrier.wait(BARRIER_TIMEOUT)
        session.execute(update(accounts).where(accounts.c.id == 1).values(balance=value + 1))

    @transactional(attempts=10, on_retry=lambda d: kinds.append(d.kind))
    def work_sync(*, session: Session) -> None:
        calls.append(1)
        increment(session, len(calls) <= 2)

    @transactional(attempts=10, on_retry=lambda d: kinds.append(d.kind))
    async def work_async(*, session: AsyncSession) -> None:
        calls.append(1)
        first = len(calls) <= 2
        await session.run_sync(increment, first)

    def job() -> None:
        if cell.is_async:

            async def main() -> None:
                async with AsyncSession(engine) as session:
                    await work_async(session=session)

            cell.run_async(main)
        else:
            cell.run_session(lambda s: work_sync(session=s), engine=engine)

    run_concurrently(job, job)
    assert balances(cell) == {1: 2}, "a lost update: the serialization failure was not retried"
    assert LockErrorKind.SERIALIZATION_FAILURE in kinds
    assert len(calls) >= 3


def test_integrity_error_is_raised_at_once_untouched(cell: Cell) -> None:
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []

    def insert_duplicate(session: Session) -> None:
        calls.append(1)
        session.execute(insert(accounts).values(id=2, balance=0, note="new"))
        session.execute(insert(accounts).values(id=1, balance=0))

    @transactional(attempts=5)
    def work(*, session: Session) -> None:
        insert_duplicate(session)

    def check(session: Session) -> tuple[type[BaseException], int]:
        with pytest.raises(IntegrityError) as info:
            work(session=session)
        # the session is usable at once: no PendingRollbackError, nothing half-written
        count = session.execute(select(accounts.c.id)).all()
        return type(info.value), len(count)

    if cell.is_async:

        @transactional(attempts=5)
        async def work_async(*, session: AsyncSession) -> None:
            await session.run_sync(insert_duplicate)

        async def main() -> int:
            async with AsyncSession(engine) as session:
                with pytest.raises(IntegrityError):
                    await work_async(session=session)
                return len((await session.execute(select(accounts.c.id))).all())

        assert cell.run_async(main) == 1
    error_type, count = cell.run_session(check, engine=engine)
    assert issubclass(error_type, IntegrityError)
    assert count == 1, "the row inserted before the failure was not rolled back"
    assert len(calls) == (2 if cell.is_async else 1), "an IntegrityError was retried"


def test_exhausted_retries_raise_lock_unavailable(cell: Cell) -> None:
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []

    def grab(session: Session) -> None:
        calls.append(1)
        session.execute(
            locksafe.with_row_locks(
                select(accounts).where(accounts.c.id == 1), session, nowait=True
            )
        ).all()

    @transactional(attempts=3, retry_after=7)
    def work(*, session: Session) -> None:
        grab(session)

    @transactional(attempts=3, retry_after=7)
    async def work_async(*, session: AsyncSession) -> None:
        await session.run_sync(grab)

    def attempt(session: Session) -> LockUnavailable:
        with pytest.raises(LockUnavailable) as info:
            work(session=session)
        assert not session.in_transaction()
        session.execute(select(accounts)).all()  # still usable
        return info.value

    with locksafe.testing.hold_row_lock(cell.url, select(accounts).where(accounts.c.id == 1)):
        error = cell.run_session(attempt, engine=engine)
        if cell.is_async:

            async def main() -> LockUnavailable:
                async with AsyncSession(engine) as session:
                    with pytest.raises(LockUnavailable) as info:
                        await work_async(session=session)
                    return info.value

            async_error = cell.run_async(main)
            assert async_error.attempts == 3
    assert error.attempts == 3
    assert len(calls) == (6 if cell.is_async else 3)
    expected = (
        LockErrorKind.DATABASE_BUSY
        if cell.backend == "sqlite"
        else LockErrorKind.LOCK_NOT_AVAILABLE
    )
    assert error.kind is expected
    assert error.retry_after == 7
    assert error.elapsed >= 0
    assert isinstance(error.__cause__, DBAPIError)
    assert locksafe.classify(error.__cause__) is expected
    assert "work" in str(error)


def test_nested_use_runs_once_and_leaves_the_callers_transaction_alone(cell: Cell) -> None:
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []

    @transactional(attempts=5)
    def inner(*, session: Session) -> None:
        calls.append(1)
        session.execute(
            locksafe.with_row_locks(
                select(accounts).where(accounts.c.id == 1), session, nowait=True
            )
        ).all()

    def outer(session: Session) -> tuple[bool, int]:
        session.begin()
        session.execute(select(accounts)).all()  # the caller's own work
        with pytest.raises(DBAPIError) as info:
            inner(session=session)
        assert not isinstance(info.value, LockUnavailable)
        still_open = session.in_transaction()
        session.rollback()
        return still_open, len(calls)

    with locksafe.testing.hold_row_lock(cell.url, select(accounts).where(accounts.c.id == 1)):
        still_open, count = cell.run_session(outer, engine=engine)
    assert still_open, "the decorator ended a transaction it did not begin"
    assert count == 1, "nested use was retried"


def test_sessionmaker_gives_a_fresh_session_per_attempt(cell: Cell) -> None:
    seed(cell, {1: 0})
    engine = engine_for(cell)
    sessions: list[Any] = []
    failures: list[RetryDetails] = []

    if cell.is_async:
        factory: Any = async_sessionmaker(engine)

        @transactional(attempts=4, sessionmaker=factory, on_retry=failures.append)
        async def work(*, session: AsyncSession) -> int:
            sessions.append(session)
            if len(sessions) < 3:
                await session.run_sync(
                    lambda s: s.execute(
                        locksafe.with_row_locks(
                            select(accounts).where(accounts.c.id == 1), s, nowait=True
                        )
                    ).all()
                )
            await session.execute(update(accounts).values(balance=accounts.c.balance + 1))
            return len(sessions)

        def call() -> int:
            return cell.run_async(work)

    else:
        factory = sessionmaker(engine)

        @transactional(attempts=4, sessionmaker=factory, on_retry=failures.append)
        def work_sync(*, session: Session) -> int:
            sessions.append(session)
            if len(sessions) < 3:
                session.execute(
                    locksafe.with_row_locks(
                        select(accounts).where(accounts.c.id == 1), session, nowait=True
                    )
                ).all()
            session.execute(update(accounts).values(balance=accounts.c.balance + 1))
            return len(sessions)

        def call() -> int:
            return work_sync()

    other = locksafe.testing.OtherConnection(cell.url)
    with other:
        other.execute(locksafe.with_row_locks(select(accounts).where(accounts.c.id == 1)))

        def release_after_two() -> None:
            # the third attempt must succeed: release once two attempts have failed
            for _ in range(1000):
                if len(failures) >= 2:
                    break
                threading.Event().wait(0.01)
            other.rollback()

        releaser = threading.Thread(target=release_after_two)
        releaser.start()
        try:
            # attempts 1 and 2 fail on NOWAIT while the lock is held; attempt 3 does no NOWAIT
            result = call()
        finally:
            releaser.join(15)
    assert result == 3
    assert len({id(s) for s in sessions}) == 3, "sessions were reused across attempts"
    assert balances(cell) == {1: 1}, "only the successful attempt's write is committed"


@pytest.mark.cells("postgresql", "mariadb")
@pytest.mark.parametrize("committer", ["decorator", "function"])
def test_commit_that_may_have_succeeded_is_never_retried(cell: Cell, committer: str) -> None:
    """The connection dies during COMMIT (killed for real by another connection): the outcome
    is unknown, so the error goes up as it is — even with a retry_on that accepts anything.
    The same when the function sends that COMMIT itself, as its last act."""
    seed(cell, {1: 0})
    engine = engine_for(cell)
    sync = engine.sync_engine if cell.is_async else engine
    calls: list[int] = []
    killer = locksafe.testing.OtherConnection(cell.admin_url)

    @event.listens_for(sync, "commit")
    def kill_own_connection(conn: Any) -> None:
        pid = conn.exec_driver_sql(
            "SELECT pg_backend_pid()" if cell.backend == "postgresql" else "SELECT CONNECTION_ID()"
        ).scalar_one()
        sql = (
            f"SELECT pg_terminate_backend({pid}, 5000)"
            if cell.backend == "postgresql"
            else f"KILL CONNECTION {pid}"
        )
        killer.execute(sql)

    def body(session: Session) -> None:
        calls.append(1)
        session.execute(update(accounts).values(balance=accounts.c.balance + 1))

    @transactional(attempts=5, retry_on=lambda exc: True)
    def work(*, session: Session) -> None:
        body(session)
        if committer == "function":
            session.commit()  # its last act: allowed, nothing runs after it

    @transactional(attempts=5, retry_on=lambda exc: True)
    async def work_async(*, session: AsyncSession) -> None:
        await session.run_sync(body)
        if committer == "function":
            await session.commit()

    with killer:
        if cell.is_async:

            async def main() -> BaseException:
                async with AsyncSession(engine) as session:
                    with pytest.raises(DBAPIError) as info:
                        await work_async(session=session)
                    assert not session.in_transaction()
                    await session.execute(select(1))  # usable: a new connection
                    return info.value

            error = cell.run_async(main)
        else:

            def run(session: Session) -> BaseException:
                with pytest.raises(DBAPIError) as info:
                    work(session=session)
                assert not session.in_transaction()
                session.execute(select(1))  # usable: a new connection
                return info.value

            error = cell.run_session(run, engine=engine)
    assert not isinstance(error, LockUnavailable)
    assert locksafe.classify(error) is None
    assert calls == [1], "a COMMIT with an unknown outcome was retried"
    assert balances(cell) == {1: 0}


def test_retries_are_logged(cell: Cell, caplog: pytest.LogCaptureFixture) -> None:
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []

    @transactional(attempts=2)
    def work(*, session: Session) -> None:
        calls.append(1)
        session.execute(
            locksafe.with_row_locks(
                select(accounts).where(accounts.c.id == 1), session, nowait=True
            )
        ).all()

    with (
        caplog.at_level(logging.WARNING, logger="locksafe.transactions"),
        locksafe.testing.hold_row_lock(cell.url, select(accounts).where(accounts.c.id == 1)),
    ):

        def run(session: Session) -> None:
            with pytest.raises(LockUnavailable):
                work(session=session)

        cell.run_session(run, engine=engine)
    records: list[Any] = [r for r in caplog.records if r.name == "locksafe.transactions"]
    assert len(records) == 2  # one retry between two attempts, then giving up, once
    retry, gave_up = records
    kinds = {"lock_not_available", "database_busy"}
    assert retry.levelno == logging.WARNING
    assert retry.locksafe_attempt == 1
    assert retry.locksafe_kind in kinds
    assert retry.locksafe_wait == 0
    assert retry.locksafe_elapsed >= 0
    assert "work" in retry.locksafe_operation
    assert gave_up.levelno == logging.WARNING
    assert "giving up" in gave_up.getMessage()
    assert gave_up.locksafe_attempts == 2
    assert gave_up.locksafe_kind == retry.locksafe_kind
    assert gave_up.locksafe_elapsed >= retry.locksafe_elapsed


@pytest.mark.cells("sqlite+pysqlite")
def test_backoff_waits_with_jitter_when_not_testing(cell: Cell) -> None:
    locksafe.set_testing(False)
    seed(cell, {1: 0})
    engine = engine_for(cell)
    waits: list[float] = []

    @transactional(
        attempts=4, wait_initial=0.001, wait_max=0.004, on_retry=lambda d: waits.append(d.wait)
    )
    def work(*, session: Session) -> None:
        session.execute(locksafe.with_row_locks(select(accounts), session, nowait=True)).all()

    held = locksafe.testing.hold_row_lock(cell.url, select(accounts))
    with held, pytest.raises(LockUnavailable):
        cell.run_session(lambda s: work(session=s), engine=engine)
    assert len(waits) == 3
    assert all(0 <= w <= 0.004 for w in waits)
    assert any(w > 0 for w in waits)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("options", "error", "name"),
    [
        ({"attempts": 0}, ValueError, "attempts"),
        ({"attempts": -3}, ValueError, "attempts"),
        ({"attempts": True}, TypeError, "attempts"),
        ({"attempts": 2.0}, TypeError, "attempts"),
        ({"attempts": "3"}, TypeError, "attempts"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": -1.5}, ValueError, "timeout"),
        ({"timeout": NAN}, ValueError, "timeout"),
        ({"timeout": True}, TypeError, "timeout"),
        ({"timeout": "5"}, TypeError, "timeout"),
        ({"wait_initial": 2, "wait_max": 1}, ValueError, "wait_initial"),
        ({"wait_initial": -0.1}, ValueError, "wait_initial"),
        ({"wait_initial": NAN}, ValueError, "wait_initial"),
        ({"wait_initial": INF, "wait_max": INF}, ValueError, "wait_initial"),
        ({"wait_max": INF}, ValueError, "wait_max"),
        ({"wait_max": NAN}, ValueError, "wait_max"),
        ({"wait_max": False}, TypeError, "wait_max"),
        ({"wait_max": "2"}, TypeError, "wait_max"),
        ({"retry_after": NAN}, ValueError, "retry_after"),
        ({"retry_after": INF}, ValueError, "retry_after"),
        ({"retry_after": -5}, ValueError, "retry_after"),
        ({"retry_after": True}, TypeError, "retry_after"),
        ({"retry_after": "1"}, TypeError, "retry_after"),
        ({"retry_on": "deadlock"}, TypeError, "retry_on"),
        ({"retry_on": ["deadlock", "nonsense"]}, ValueError, "retry_on"),
        ({"retry_on": 3}, TypeError, "retry_on"),
        ({"on_retry": "log"}, TypeError, "on_retry"),
        ({"sessionmaker": "factory"}, TypeError, "sessionmaker"),
    ],
)
def test_bad_options_fail_at_decoration_time_naming_the_option(
    options: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=f"^{name}="):
        transactional(**options)


@pytest.mark.cells("sqlite+pysqlite")
def test_edge_options_are_accepted_and_work(cell: Cell) -> None:
    """An infinite timeout means no time limit; zero waits, retry_after=0 and attempts=1 are
    valid; kinds may be given by value."""
    seed(cell, {1: 0})
    factory = sessionmaker(engine_for(cell))

    @transactional(
        attempts=1,
        timeout=INF,
        wait_initial=0,
        wait_max=0,
        retry_after=0,
        retry_on=["deadlock", LockErrorKind.DATABASE_BUSY],
        sessionmaker=factory,
    )
    def work(*, session: Session = locksafe.NEW_SESSION) -> int:
        return len(session.execute(select(accounts)).all())

    assert work() == 1


def test_bad_arguments_fail_at_decoration_time() -> None:
    with pytest.raises(TypeError, match="session"):
        transactional()(lambda x: x)

    @transactional
    def needs_session(*, session: Session | None = None) -> None:
        pass

    with pytest.raises(TypeError, match="no session"):
        needs_session()


def test_retry_if_lock_error_is_a_tenacity_predicate(tmp_path: Any) -> None:
    import sqlite3

    import tenacity

    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    policy = tenacity.Retrying(
        retry=locksafe.retry_if_lock_error, stop=tenacity.stop_after_attempt(5)
    )
    assert policy(flaky) == "ok"
    assert len(calls) == 3
    with pytest.raises(ValueError):
        tenacity.Retrying(retry=locksafe.retry_if_lock_error, reraise=True)(
            lambda: (_ for _ in ()).throw(ValueError("x"))
        )


# -- what is never retried ------------------------------------------------------------------


ROW_1 = select(accounts).where(accounts.c.id == 1)


def grab_row_1(session: Session) -> None:
    """Lock row 1 with NOWAIT: fails at once with a real lock error while it is held."""
    session.execute(locksafe.with_row_locks(ROW_1, session, nowait=True)).all()


#: @transactional options: the default retry rule, and a retry_on that accepts anything.
RETRY_ON: dict[str, dict[str, Any]] = {
    "default": {},
    "anything": {"retry_on": lambda exc: True},
}


@pytest.mark.parametrize("retry_on", sorted(RETRY_ON))
def test_an_interruption_while_handling_a_lock_error_runs_once_and_propagates(
    cell: Cell, retry_on: str
) -> None:
    """KeyboardInterrupt (sync) or the task's cancellation (async), arriving while the function
    handles a real lock error: never retried nor wrapped, whatever retry_on says; the session
    is rolled back and usable."""
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []
    raised: list[BaseException] = []
    handled: list[bool] = []

    if not cell.is_async:

        @transactional(attempts=3, **RETRY_ON[retry_on])
        def work(*, session: Session) -> None:
            calls.append(1)
            try:
                grab_row_1(session)
            except DBAPIError as exc:
                handled.append(locksafe.is_retryable_lock_error(exc))
                interrupt = KeyboardInterrupt("Ctrl-C")
                raised.append(interrupt)
                raise interrupt  # noqa: B904  (the lock error is its __context__)

        def run(session: Session) -> tuple[BaseException, bool]:
            with pytest.raises(KeyboardInterrupt) as info:
                work(session=session)
            in_transaction = session.in_transaction()
            session.execute(select(accounts)).all()  # still usable
            return info.value, in_transaction

        with locksafe.testing.hold_row_lock(cell.url, ROW_1):
            error, in_transaction = cell.run_session(run, engine=engine)
        assert handled == [True], "no real lock error was handled"
        assert error is raised[0], "the interruption was replaced"
        assert not in_transaction
        assert calls == [1], "an interruption was retried"
        return

    @transactional(attempts=3, **RETRY_ON[retry_on])
    async def work_async(handling: asyncio.Event, *, session: AsyncSession) -> None:
        calls.append(1)
        try:
            await session.run_sync(grab_row_1)
        except DBAPIError:
            handling.set()
            await asyncio.sleep(BARRIER_TIMEOUT * 6)  # e.g. a clean-up await: cancelled here
            raise

    async def main() -> tuple[bool, bool, bool]:
        handling = asyncio.Event()
        async with AsyncSession(engine) as session:
            task = asyncio.ensure_future(work_async(handling, session=session))
            await asyncio.wait_for(handling.wait(), BARRIER_TIMEOUT)
            task.cancel()
            # bounded, so that a retried cancellation fails the test instead of hanging it
            done, _ = await asyncio.wait({task}, timeout=BARRIER_TIMEOUT)
            ended = task in done
            cancelled = ended and task.cancelled()
            if not ended:
                task.cancel()
            in_transaction = session.in_transaction()
            await session.execute(select(accounts))  # still usable
            return ended, cancelled, in_transaction

    with locksafe.testing.hold_row_lock(cell.url, ROW_1):
        ended, cancelled, in_transaction = cell.run_async(main)
    assert ended, "the cancelled task went on (the cancellation was retried)"
    assert cancelled, "the task did not end cancelled"
    assert not in_transaction
    assert calls == [1], "a cancellation was retried"


class Conflict(Exception):
    """An application's own answer to a lock error (say, HTTP 409)."""


@pytest.mark.parametrize("style", ["implicit", "from None"])
@pytest.mark.parametrize("retry_on", ["default", "kinds"])
def test_an_error_raised_while_handling_a_lock_error_is_not_retried(
    cell: Cell, style: str, retry_on: str
) -> None:
    """``except OperationalError: raise Conflict()``: the function decided; no retry, no
    LockUnavailable, its exception goes up as it is."""
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []
    handled: list[bool] = []
    policy: dict[str, Any] = {} if retry_on == "default" else {"retry_on": list(LockErrorKind)}

    def body(session: Session) -> None:
        calls.append(1)
        try:
            grab_row_1(session)
        except DBAPIError as exc:
            handled.append(locksafe.is_retryable_lock_error(exc))
            if style == "from None":
                raise Conflict("row is busy") from None
            raise Conflict("row is busy")  # noqa: B904

    @transactional(attempts=3, **policy)
    def work(*, session: Session) -> None:
        body(session)

    @transactional(attempts=3, **policy)
    async def work_async(*, session: AsyncSession) -> None:
        await session.run_sync(body)

    def run(session: Session) -> BaseException:
        with pytest.raises(Conflict) as info:
            work(session=session)
        return info.value

    with locksafe.testing.hold_row_lock(cell.url, ROW_1):
        error = cell.run_session(run, engine=engine)
        if cell.is_async:

            async def main() -> BaseException:
                async with AsyncSession(engine) as session:
                    with pytest.raises(Conflict) as info:
                        await work_async(session=session)
                    return info.value

            cell.run_async(main)
    assert str(error) == "row is busy"
    assert all(handled), "no real lock error was handled"
    assert calls == [1] * (2 if cell.is_async else 1), "the application's answer was retried"


def test_lock_unavailable_from_an_inner_transactional_is_not_retried_again(cell: Cell) -> None:
    """An inner @transactional (its own transaction) gave up: the outer one neither retries
    it (attempts would multiply) nor wraps it again."""
    seed(cell, {1: 0})
    engine = engine_for(cell)
    inner_calls: list[int] = []
    outer_calls: list[int] = []

    if cell.is_async:
        factory: Any = async_sessionmaker(engine)

        @transactional(attempts=3, sessionmaker=factory)
        async def audit_async(*, session: AsyncSession = locksafe.NEW_SESSION) -> None:
            inner_calls.append(1)
            await session.run_sync(grab_row_1)

        @transactional(attempts=3, sessionmaker=factory)
        async def handler_async(*, session: AsyncSession = locksafe.NEW_SESSION) -> None:
            outer_calls.append(1)
            await session.execute(select(accounts))
            await audit_async()

        async def main() -> LockUnavailable:
            with pytest.raises(LockUnavailable) as info:
                await handler_async()
            return info.value

        def call() -> LockUnavailable:
            return cell.run_async(main)

    else:
        factory = sessionmaker(engine)

        @transactional(attempts=3, sessionmaker=factory)
        def audit(*, session: Session = locksafe.NEW_SESSION) -> None:
            inner_calls.append(1)
            grab_row_1(session)

        @transactional(attempts=3, sessionmaker=factory)
        def handler(*, session: Session = locksafe.NEW_SESSION) -> None:
            outer_calls.append(1)
            session.execute(select(accounts)).all()
            audit()

        def call() -> LockUnavailable:
            with pytest.raises(LockUnavailable) as info:
                handler()
            return info.value

    with locksafe.testing.hold_row_lock(cell.url, ROW_1):
        error = call()
    assert outer_calls == [1], "the outer transaction retried an inner one that gave up"
    assert inner_calls == [1, 1, 1]
    assert error.attempts == 3
    assert "audit" in str(error.operation), "the inner LockUnavailable was replaced"
    assert isinstance(error.__cause__, DBAPIError)


# -- the function must not end the transaction the decorator owns -------------------------


@pytest.mark.cells("sqlite")
def test_work_after_the_functions_own_commit_fails_and_is_not_retried(cell: Cell) -> None:
    """The review's case on a real SQLite file: the function commits midway, then another
    writer takes the write lock. Retrying would redo the committed half; SQLAlchemy's guard
    stops the function at its next statement instead, and that error is not retried."""
    seed(cell, {1: 0})
    engine = cell.engine(connect_args={"timeout": 0.05})
    locksafe.sqlite.configure(engine, busy_timeout=0.05, begin="immediate")
    path = cell.url.database
    assert path
    calls: list[int] = []
    holders: list[sqlite3.Connection] = []

    def release(details: RetryDetails) -> None:
        holders.pop().execute("ROLLBACK")  # the other writer finishes before the retry

    def first_half(session: Session) -> None:
        calls.append(1)
        session.execute(insert(accounts).values(id=10 + len(calls), balance=0, note="backfill"))

    def take_the_write_lock() -> None:
        if len(calls) == 1:  # another writer takes the write lock now
            holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            holder.execute("BEGIN IMMEDIATE")
            holders.append(holder)

    def second_half(session: Session) -> None:
        session.execute(insert(accounts).values(id=20 + len(calls), balance=0, note="run"))

    if cell.is_async:

        @transactional(attempts=3, on_retry=release)
        async def create_async(*, session: AsyncSession) -> None:
            await session.run_sync(first_half)
            await session.commit()  # Airflow-style commit in the middle of the function
            take_the_write_lock()
            await session.run_sync(second_half)

        async def main() -> BaseException:
            async with AsyncSession(engine) as session:
                with pytest.raises(InvalidRequestError) as info:
                    await create_async(session=session)
                return info.value

        error = cell.run_async(main)
    else:

        @transactional(attempts=3, on_retry=release)
        def create(*, session: Session) -> None:
            first_half(session)
            session.commit()  # Airflow-style commit in the middle of the function
            take_the_write_lock()
            second_half(session)

        def run(session: Session) -> BaseException:
            with pytest.raises(InvalidRequestError) as info:
                create(session=session)
            return info.value

        error = cell.run_session(run, engine=engine)
    for holder in holders:
        holder.close()
    assert "closed transaction inside context manager" in str(error)
    assert calls == [1], "the function was run again after it committed part of its work"
    with cell.sync_engine().connect() as conn:
        notes = conn.execute(select(accounts.c.note).where(accounts.c.id > 1)).scalars().all()
    assert notes == ["backfill"], "no duplicate of the committed half, nothing after it"


# -- what cannot be decorated -------------------------------------------------------------


def test_generator_functions_are_refused_at_decoration_time() -> None:
    def rows(*, session: Session) -> Iterator[int]:
        yield 1

    async def arows(*, session: AsyncSession) -> AsyncIterator[int]:
        yield 1

    for func in (rows, arows):
        with pytest.raises(TypeError, match=rf"{func.__name__}\(\) is a generator function"):
            transactional(func)


def test_positional_only_session_with_a_sessionmaker_is_refused() -> None:
    factory = sessionmaker()

    def by_position(session: Session | None = None, /, x: int = 0) -> None:
        pass

    with pytest.raises(TypeError, match=r"by_position\(\)'s `session` is positional-only"):
        transactional(sessionmaker=factory)(by_position)
    transactional(by_position)  # without a sessionmaker the caller passes it: fine


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
@pytest.mark.parametrize("retry_on", sorted(RETRY_ON))
def test_a_sync_function_returning_an_awaitable_is_refused_and_rolled_back(
    cell: Cell, retry_on: str
) -> None:
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []

    async def later() -> None:
        pass

    @transactional(attempts=3, **RETRY_ON[retry_on])
    def work(*, session: Session) -> Any:
        calls.append(1)
        session.execute(insert(accounts).values(id=2, balance=0))
        return later()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match=r"work\(\) returned an awaitable"):
            cell.run_session(lambda s: work(session=s), engine=engine)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert calls == [1]
    assert balances(cell) == {1: 0}, "the work before the awaitable was committed"


# -- custom retry_on ------------------------------------------------------------------------


def test_a_custom_retry_on_that_ran_out_raises_the_last_error_as_it_is(cell: Cell) -> None:
    """retry_on retried an IntegrityError: when attempts run out, that IntegrityError goes up
    (no LockUnavailable, no invented kind), and on_retry saw kind None."""
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []
    seen: list[RetryDetails] = []

    @transactional(
        attempts=3, retry_on=lambda exc: isinstance(exc, IntegrityError), on_retry=seen.append
    )
    def work(*, session: Session) -> None:
        calls.append(1)
        session.execute(insert(accounts).values(id=1, balance=0))

    def run(session: Session) -> BaseException:
        with pytest.raises(IntegrityError) as info:
            work(session=session)
        return info.value

    error = cell.run_session(run, engine=engine)
    assert not isinstance(error, LockUnavailable)
    assert calls == [1, 1, 1]
    assert [d.kind for d in seen] == [None, None]
    assert all(isinstance(d.exception, IntegrityError) for d in seen)


@pytest.mark.cells("postgresql+psycopg2", "postgresql+asyncpg", "mysql+pymysql", "mysql+aiomysql")
def test_an_inner_commit_that_may_have_succeeded_is_not_retried_around_it(cell: Cell) -> None:
    """An inner @transactional (its own session) loses its connection during COMMIT: the
    outer one, even with a retry_on that accepts anything, must not run it again."""
    seed(cell, {1: 0})
    engine = engine_for(cell)
    sync = engine.sync_engine if cell.is_async else engine
    inner_calls: list[int] = []
    outer_calls: list[int] = []
    killer = locksafe.testing.OtherConnection(cell.admin_url)

    @event.listens_for(sync, "commit")
    def kill_own_connection(conn: Any) -> None:
        pid = conn.exec_driver_sql(
            "SELECT pg_backend_pid()" if cell.backend == "postgresql" else "SELECT CONNECTION_ID()"
        ).scalar_one()
        sql = (
            f"SELECT pg_terminate_backend({pid}, 5000)"
            if cell.backend == "postgresql"
            else f"KILL CONNECTION {pid}"
        )
        killer.execute(sql)

    def audit_body(session: Session) -> None:
        inner_calls.append(1)
        session.execute(update(accounts).values(balance=accounts.c.balance + 1))

    if cell.is_async:
        factory: Any = async_sessionmaker(engine)

        @transactional(sessionmaker=factory)
        async def audit_async(*, session: AsyncSession = locksafe.NEW_SESSION) -> None:
            await session.run_sync(audit_body)

        @transactional(attempts=5, retry_on=lambda exc: True, sessionmaker=factory)
        async def handler_async(*, session: AsyncSession = locksafe.NEW_SESSION) -> None:
            outer_calls.append(1)
            await session.execute(select(accounts))
            await audit_async()

        async def main() -> BaseException:
            with pytest.raises(DBAPIError) as info:
                await handler_async()
            return info.value

        def call() -> BaseException:
            return cell.run_async(main)

    else:
        factory = sessionmaker(engine)

        @transactional(sessionmaker=factory)
        def audit(*, session: Session = locksafe.NEW_SESSION) -> None:
            audit_body(session)

        @transactional(attempts=5, retry_on=lambda exc: True, sessionmaker=factory)
        def handler(*, session: Session = locksafe.NEW_SESSION) -> None:
            outer_calls.append(1)
            session.execute(select(accounts)).all()
            audit()

        def call() -> BaseException:
            with pytest.raises(DBAPIError) as info:
                handler()
            return info.value

    with killer:
        error = call()
    assert locksafe.classify(error) is None
    assert inner_calls == [1]
    assert outer_calls == [1], "the outer call ran again an inner COMMIT with an unknown outcome"
    assert balances(cell) == {1: 0}


@pytest.mark.cells("sqlite")
def test_the_functions_own_commit_refused_with_a_lock_error_is_retried(cell: Cell) -> None:
    """SQLite (rollback journal) refuses the COMMIT the function sends itself: a reader holds
    the database, the COMMIT gets "database is locked". The server reported a lock error for
    that COMMIT, so nothing was committed, and the whole function runs again — as when the
    decorator's own COMMIT is refused."""
    cell.create_all(metadata)
    with cell.sync_engine().connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode = delete").scalar() == "delete"
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(accounts).values(id=1, balance=0))
    engine = cell.engine(connect_args={"timeout": 1})
    locksafe.sqlite.configure(engine, busy_timeout=1, journal_mode=None)  # keep "delete"
    path = cell.url.database
    assert path
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM tx_accounts").fetchall()  # a SHARED lock, held
    calls: list[int] = []
    seen: list[RetryDetails] = []
    refused: list[BaseException] = []  # what the function's own commit() raised

    def release(details: RetryDetails) -> None:
        seen.append(details)
        reader.execute("ROLLBACK")

    def body(session: Session) -> None:
        calls.append(1)
        session.execute(update(accounts).values(balance=accounts.c.balance + 1))

    try:
        if cell.is_async:

            @transactional(attempts=3, on_retry=release)
            async def work_async(*, session: AsyncSession) -> None:
                await session.run_sync(body)
                try:
                    await session.commit()
                except DBAPIError as exc:
                    refused.append(exc)
                    raise

            async def main() -> None:
                async with AsyncSession(engine) as session:
                    await work_async(session=session)

            cell.run_async(main)
        else:

            @transactional(attempts=3, on_retry=release)
            def work(*, session: Session) -> None:
                body(session)
                try:
                    session.commit()
                except DBAPIError as exc:
                    refused.append(exc)
                    raise

            cell.run_session(lambda s: work(session=s), engine=engine)
    finally:
        reader.close()
    assert [d.kind for d in seen] == [LockErrorKind.DATABASE_BUSY]
    assert [d.exception for d in seen] == refused, "not the COMMIT that was refused"
    assert calls == [1, 1]
    assert balances(cell) == {1: 1}


def test_a_lock_error_after_the_functions_own_rollback_is_retried(cell: Cell) -> None:
    """``except OperationalError: session.rollback(); raise``: the function ended the
    transaction, but by a rollback, which commits nothing. The lock error is retried like any
    other (the function's own *commit* is what makes an error final), on every cell: a real
    NOWAIT failure while another connection holds the row, released before the retry."""
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []
    other = locksafe.testing.OtherConnection(cell.url)

    def release(details: RetryDetails) -> None:
        other.rollback()

    def body(session: Session) -> None:
        calls.append(1)
        session.execute(
            locksafe.with_row_locks(
                select(accounts).where(accounts.c.id == 1), session, nowait=True
            )
        ).all()
        session.execute(update(accounts).values(balance=accounts.c.balance + 1))

    with other:
        other.execute(locksafe.with_row_locks(select(accounts).where(accounts.c.id == 1)))
        if cell.is_async:

            @transactional(attempts=3, on_retry=release)
            async def work_async(*, session: AsyncSession) -> None:
                try:
                    await session.run_sync(body)
                except DBAPIError:
                    await session.rollback()
                    raise

            async def main() -> None:
                async with AsyncSession(engine) as session:
                    await work_async(session=session)

            cell.run_async(main)
        else:

            @transactional(attempts=3, on_retry=release)
            def work(*, session: Session) -> None:
                try:
                    body(session)
                except DBAPIError:
                    session.rollback()
                    raise

            cell.run_session(lambda s: work(session=s), engine=engine)
    assert calls == [1, 1], "the lock error after the function's rollback was not retried"
    assert balances(cell) == {1: 1}


# -- a failed flush the function caught -----------------------------------------------------


@pytest.mark.cells("sqlite", "postgresql")
def test_a_flush_error_the_function_swallows_fails_the_call(cell: Cell) -> None:
    """The function catches the IntegrityError of a flush and returns: SQLAlchemy rolled the
    whole transaction back, so nothing can be committed. The call fails (it does not report a
    success with nothing committed), is not retried, and the session is usable."""
    seed(cell, {1: 0})
    engine = engine_for(cell)
    calls: list[int] = []
    swallowed: list[BaseException] = []

    if cell.is_async:

        @transactional(attempts=3)
        async def create_async(*, session: AsyncSession) -> str:
            calls.append(1)
            session.add(Account(id=2, balance=0, note="important"))
            await session.flush()
            try:
                session.add(Account(id=1, balance=0, note="optional duplicate"))
                await session.flush()
            except IntegrityError as exc:
                swallowed.append(exc)  # "optional row skipped"
            return "created"

        async def main() -> BaseException:
            async with AsyncSession(engine) as session:
                with pytest.raises(PendingRollbackError) as info:
                    await create_async(session=session)
                assert not session.in_transaction()
                await session.execute(select(accounts))  # usable
                return info.value

        error = cell.run_async(main)
    else:

        @transactional(attempts=3)
        def create(*, session: Session) -> str:
            calls.append(1)
            session.add(Account(id=2, balance=0, note="important"))
            session.flush()
            try:
                session.add(Account(id=1, balance=0, note="optional duplicate"))
                session.flush()
            except IntegrityError as exc:
                swallowed.append(exc)  # "optional row skipped"
            return "created"

        def run(session: Session) -> BaseException:
            with pytest.raises(PendingRollbackError) as info:
                create(session=session)
            assert not session.in_transaction()
            session.execute(select(accounts)).all()  # usable
            return info.value

        error = cell.run_session(run, engine=engine)
    assert len(swallowed) == 1, "no flush failed"
    assert error.__cause__ is swallowed[0], "not chained from the error SQLAlchemy recorded"
    assert "create" in str(error)
    assert calls == [1], "a non-lock error was retried"
    assert balances(cell) == {1: 0}, "work of a rolled-back transaction was committed"


@pytest.mark.cells("sqlite", "postgresql")
@pytest.mark.parametrize("savepoint", [False, True], ids=["flush", "flush-in-open-savepoint"])
def test_a_lock_error_the_function_swallows_in_a_flush_is_retried(
    cell: Cell, savepoint: bool
) -> None:
    """The function catches a real lock error raised by a flush and returns: the transaction
    (or the savepoint the function left open) is rolled back, so the decorator retries the
    whole function, which then commits."""
    seed(cell, {1: 0})
    engine = engine_for(cell, lock_wait=1)
    calls: list[int] = []
    handled: list[LockErrorKind | None] = []
    seen: list[RetryDetails] = []
    other = cell.other()

    def release(details: RetryDetails) -> None:
        seen.append(details)
        other.rollback()

    if cell.is_async:

        @transactional(attempts=3, on_retry=release)
        async def bump_async(*, session: AsyncSession) -> int:
            calls.append(1)
            account = await session.get(Account, 1)
            assert account is not None
            if savepoint:
                await session.begin_nested()  # left open: the decorator's commit releases it
            account.balance += 1
            try:
                await session.flush()
            except DBAPIError as exc:
                handled.append(locksafe.classify(exc))  # "busy: skip it this time"
            return len(calls)

        async def main() -> int:
            async with AsyncSession(engine) as session:
                return await bump_async(session=session)

        def call() -> int:
            return cell.run_async(main)

    else:

        @transactional(attempts=3, on_retry=release)
        def bump(*, session: Session) -> int:
            calls.append(1)
            account = session.get(Account, 1)
            assert account is not None
            if savepoint:
                session.begin_nested()  # left open: the decorator's commit releases it
            account.balance += 1
            try:
                session.flush()
            except DBAPIError as exc:
                handled.append(locksafe.classify(exc))  # "busy: skip it this time"
            return len(calls)

        def call() -> int:
            return cell.run_session(lambda s: bump(session=s), engine=engine)

    with other:
        other.execute(locksafe.with_row_locks(ROW_1))
        result = call()
    assert len(handled) == 1
    assert handled[0] in RETRYABLE_KINDS, "no real lock error was swallowed"
    assert result == 2, "the swallowed lock error was not retried"
    assert [d.kind for d in seen] == handled
    assert isinstance(seen[0].exception, PendingRollbackError)
    assert balances(cell) == {1: 1}, "the retried attempt's work was not committed"


# -- scoped sessions ------------------------------------------------------------------------

SCOPED_CELLS = ("sqlite+pysqlite", "sqlite+aiosqlite", "postgresql+psycopg2", "postgresql+asyncpg")


def bump_balance(session: Session) -> None:
    session.execute(update(accounts).values(balance=accounts.c.balance + 1))


@pytest.mark.cells(*SCOPED_CELLS)
def test_a_scoped_session_is_accepted_as_the_session(cell: Cell) -> None:
    """scoped_session / async_scoped_session passed as ``session``: the registry's session is
    the one the decorator begins and commits, or leaves alone when it is in a transaction."""
    seed(cell, {1: 0})
    engine = engine_for(cell)

    if cell.is_async:
        scoped_async = async_scoped_session(
            async_sessionmaker(engine), scopefunc=asyncio.current_task
        )

        @transactional
        async def bump_async(*, session: Any) -> None:
            await session.execute(update(accounts).values(balance=accounts.c.balance + 1))

        async def main() -> tuple[bool, bool]:
            await bump_async(session=scoped_async)  # owned: begun and committed
            owned_left_open = scoped_async().in_transaction()
            await scoped_async.begin()  # the caller's transaction
            await bump_async(session=scoped_async)  # nested: not committed
            still_open = scoped_async().in_transaction()
            await scoped_async.rollback()
            await scoped_async.remove()
            return owned_left_open, still_open

        owned_left_open, still_open = cell.run_async(main)
    else:
        scoped = scoped_session(sessionmaker(engine))

        @transactional
        def bump(*, session: Any) -> None:
            bump_balance(session)

        bump(session=scoped)
        owned_left_open = scoped().in_transaction()
        scoped.begin()
        bump(session=scoped)
        still_open = scoped().in_transaction()
        scoped.rollback()
        scoped.remove()
    assert not owned_left_open
    assert still_open, "the decorator ended the caller's transaction"
    assert balances(cell) == {1: 1}, "owned: committed once; nested: left to the caller"


@pytest.mark.cells(*SCOPED_CELLS)
def test_a_scoped_registry_as_sessionmaker_owns_only_what_it_creates(cell: Cell) -> None:
    """``sessionmaker=`` a scoped registry (Airflow's settings.Session): an inner call gets the
    caller's thread-local session. In a transaction the caller began explicitly, that is
    nested use: the caller's work and the inner work commit or roll back together. In an
    autobegun transaction holding the caller's write, the call is refused
    (CallerTransactionError) and changes nothing: the decorator would have to commit the
    caller's work unasked (before issue 9 it ran as nested use and committed nothing, silently).
    Out of a transaction, the decorator begins and commits it, but does not close it (the
    caller's objects stay attached). A session the decorator created is closed and removed
    from the registry."""
    seed(cell, {1: 0})
    engine = engine_for(cell)
    notes = update(accounts).where(accounts.c.id == 1)

    if cell.is_async:
        registry_async = async_scoped_session(
            async_sessionmaker(engine), scopefunc=asyncio.current_task
        )

        @transactional(sessionmaker=registry_async)
        async def inner_async(*, session: AsyncSession = locksafe.NEW_SESSION) -> None:
            await session.run_sync(bump_balance)

        async def main() -> dict[str, Any]:
            facts: dict[str, Any] = {}
            await inner_async()  # no session in the registry: created, committed, removed
            facts["created_removed"] = not registry_async.registry.has()
            outer = registry_async()
            await outer.execute(notes.values(note="outer before"))  # autobegun, a write
            try:
                await inner_async()
            except locksafe.CallerTransactionError as exc:
                facts["refused"] = exc
            facts["refused_left_open"] = outer.in_transaction()
            await outer.rollback()
            await outer.begin()  # explicitly the caller's: joined
            await outer.execute(notes.values(note="outer before"))
            await inner_async()
            facts["outer_open"] = outer.in_transaction()
            await outer.execute(notes.values(note="outer after"))
            facts["before_rollback"] = await outer.run_sync(lambda s: balances_in(s))
            await outer.rollback()  # the inner work goes with the caller's
            account = await outer.get(Account, 1)
            await outer.commit()  # out of a transaction; account stays in the session
            await inner_async()
            facts["attached"] = account in outer
            facts["same"] = registry_async() is outer
            await registry_async.remove()
            return facts

        facts = cell.run_async(main)
    else:
        registry = scoped_session(sessionmaker(engine))

        @transactional(sessionmaker=registry)
        def inner(*, session: Session = locksafe.NEW_SESSION) -> None:
            bump_balance(session)

        facts = {}
        inner()
        facts["created_removed"] = not registry.registry.has()
        outer = registry()
        outer.execute(notes.values(note="outer before"))  # autobegun, a write
        try:
            inner()
        except locksafe.CallerTransactionError as exc:
            facts["refused"] = exc
        facts["refused_left_open"] = outer.in_transaction()
        outer.rollback()
        outer.begin()  # explicitly the caller's: joined
        outer.execute(notes.values(note="outer before"))
        inner()
        facts["outer_open"] = outer.in_transaction()
        outer.execute(notes.values(note="outer after"))
        facts["before_rollback"] = balances_in(outer)
        outer.rollback()
        account = outer.get(Account, 1)
        outer.commit()
        inner()
        facts["attached"] = account in outer
        facts["same"] = registry() is outer
        registry.remove()
    assert facts["created_removed"], "the session the decorator created was left in the registry"
    assert isinstance(facts.get("refused"), locksafe.CallerTransactionError), (
        "an autobegun transaction holding the caller's write was joined silently"
    )
    assert facts["refused_left_open"], "the refusal ended the caller's transaction"
    assert facts["outer_open"], "the inner call ended the caller's transaction"
    assert facts["before_rollback"] == {1: 2}, "the inner work is not in the caller's transaction"
    assert facts["attached"], "the decorator closed a session it did not create"
    assert facts["same"]
    assert balances(cell) == {1: 2}, "first call and last call committed; the others not"


def balances_in(session: Session) -> dict[int, int]:
    return {r.id: r.balance for r in session.execute(select(accounts))}


# -- hostile exceptions ---------------------------------------------------------------------


class ProxyError(Exception):
    """A proxy exception (wrapt-style) whose target is gone: every attribute lookup fails,
    ``__cause__`` and ``__context__`` included."""

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("__") and name not in ("__cause__", "__context__"):
            return object.__getattribute__(self, name)
        raise RuntimeError(f"proxy target gone ({name})")


@pytest.mark.cells("sqlite+pysqlite")
@pytest.mark.parametrize("retry_on", sorted(RETRY_ON))
def test_an_exception_whose_attributes_raise_goes_up_as_it_is(cell: Cell, retry_on: str) -> None:
    seed(cell, {1: 0})
    calls: list[int] = []
    raised: list[BaseException] = []

    @transactional(attempts=3, **RETRY_ON[retry_on])
    def work(*, session: Session) -> None:
        calls.append(1)
        bump_balance(session)
        error = ProxyError("the real problem")
        raised.append(error)
        raise error

    def run(session: Session) -> BaseException:
        with pytest.raises(ProxyError) as info:
            work(session=session)
        return info.value

    error = cell.run_session(run, engine=engine_for(cell))
    assert error is raised[-1]
    assert len(calls) == (3 if retry_on == "anything" else 1)
    assert balances(cell) == {1: 0}
