"""``locksafe.lock_timeout`` and ``@transactional(timeout=...)`` as a deadline (issue 11), on
every driver cell, against a lock held by a second real connection.

- a wait inside the block ends near the requested time (rounded as the server needs), with an
  error ``classify`` calls ``lock_timeout`` (``database_busy`` on SQLite);
- the previous setting is back after the block: when it ends, when it raised, and on the next
  checkout of a pooled connection that went back to the pool inside the block, or whose
  setting back failed;
- bad arguments raise at call time, naming the option;
- ``@transactional(timeout=1)`` blocked on a held row ends within 1.5 s with
  ``LockUnavailable``, where the connection itself has no bound (PostgreSQL
  ``lock_timeout = 0``) or a longer one.

Timing bounds are generous upward (a loaded 2-core machine); the lower bounds show the wait
was the requested one, not an immediate failure.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, insert, select, text
from sqlalchemy import update as sql_update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

import locksafe
import locksafe.timeouts
from harness.cells import Cell
from locksafe import LockErrorKind, LockUnavailable
from locksafe.dialects import LockWaitSetting, support_for
from locksafe.testing import hold_row_lock

metadata = MetaData()
rows = Table(
    "lt_rows",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("value", Integer, nullable=False),
)


class Base(DeclarativeBase):
    pass


class Row(Base):
    """The ORM view of ``lt_rows``: a change is written by the flush at the commit."""

    __table__ = rows


ROW = select(rows).where(rows.c.id == 1)
BUMP = sql_update(rows).where(rows.c.id == 1).values(value=rows.c.value + 1)
HOLD = 30.0  # the holder keeps its lock longer than any wait here


def seed(cell: Cell) -> None:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(rows), [{"id": 1, "value": 0}])


def setting_of(cell: Cell) -> LockWaitSetting:
    support = support_for(cell.dialect_name)
    assert support is not None
    assert support.lock_wait is not None
    return support.lock_wait


def current(target: Session | Connection, setting: LockWaitSetting) -> float:
    """The lock-wait bound the target's connection has now, in seconds."""
    return setting.seconds(target.execute(text(setting.read_sql)).scalar())


def expected_wait(cell: Cell, engine: Any, seconds: float) -> float:
    """What the server is given for ``seconds`` (MySQL / MariaDB: whole seconds)."""
    sync = engine.sync_engine if cell.is_async else engine
    setting = setting_of(cell)
    return setting.seconds(setting.value(seconds, sync.dialect))


def kind_for(cell: Cell) -> LockErrorKind:
    return LockErrorKind.DATABASE_BUSY if cell.backend == "sqlite" else LockErrorKind.LOCK_TIMEOUT


def in_block(
    cell: Cell,
    engine: Any,
    kind: str,
    seconds: float,
    inside: Callable[[Any], Any],
    after: Callable[[Any], Any] = lambda target: None,
) -> tuple[Any, BaseException | None, Any]:
    """On a new Session or Connection (``kind``) of ``engine``: ``inside(target)`` in
    ``lock_timeout(target, seconds)`` — ``with`` on sync cells, ``async with`` on the
    AsyncSession / AsyncConnection of async cells — then ``after(target)`` on the same
    target. Returns (inside's value, the error that left the block, after's value);
    ``inside`` and ``after`` get the sync Session / Connection."""
    if not cell.is_async:
        target_cm: Any = Session(engine) if kind == "session" else engine.connect()
        with target_cm as target:
            value, error = None, None
            try:
                with locksafe.lock_timeout(target, seconds):
                    value = inside(target)
            except Exception as exc:
                error = exc
            return value, error, after(target)

    async def main() -> tuple[Any, BaseException | None, Any]:
        target_cm: Any = AsyncSession(engine) if kind == "session" else engine.connect()
        async with target_cm as target:
            value, error = None, None
            try:
                async with locksafe.lock_timeout(target, seconds):
                    value = await target.run_sync(inside)
            except Exception as exc:
                error = exc
            return value, error, await target.run_sync(after)

    return cell.run_async(main)


def timed_bump(target: Session | Connection) -> tuple[float, BaseException | None]:
    """Run the UPDATE of the held row; (seconds it took, the error it raised)."""
    started = time.monotonic()
    try:
        target.execute(BUMP)
    except DBAPIError as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


# -- the wait ends near the requested time ---------------------------------------------------


# slow (not in the compat leg): a 0.3 s lock wait run out on the server per case; the block's
# setting and its reading back run there in test_the_previous_setting_is_back_after_the_block
# and test_the_setting_is_back_after_a_lock_error_left_the_block.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["session", "connection"])
def test_a_wait_ends_near_the_requested_time(cell: Cell, kind: str) -> None:
    seed(cell)
    engine = cell.default_engine
    requested = 0.3
    wanted = expected_wait(cell, engine, requested)
    setting = setting_of(cell)

    def after(target: Session | Connection) -> float:
        target.rollback()  # PostgreSQL: the failed transaction; elsewhere the UPDATE
        return current(target, setting)

    with hold_row_lock(cell.url, ROW, hold_timeout=HOLD):
        before = cell.run(lambda conn: current(conn, setting), engine=engine)
        (elapsed, error), left, back = in_block(cell, engine, kind, requested, timed_bump, after)
    assert left is None
    assert error is not None, f"the UPDATE did not wait for the held lock ({elapsed:.3f}s)"
    assert locksafe.classify(error) is kind_for(cell)
    assert wanted - 0.05 <= elapsed <= wanted + 1.2, (
        f"asked {requested}s (the server got {wanted}s), waited {elapsed:.3f}s"
    )
    assert back == before
    print(f"\n{cell.name} {kind}: asked {requested}s, server {wanted}s, waited {elapsed:.3f}s")


# -- the previous setting is back ------------------------------------------------------------


def test_the_previous_setting_is_back_after_the_block(cell: Cell) -> None:
    """At the block's end (the transaction going on), after an exception that left it, after
    nested blocks; a session that ran nothing in the block is in no transaction."""
    engine = cell.default_engine
    setting = setting_of(cell)
    wanted = expected_wait(cell, engine, 2.5)
    inner_wanted = expected_wait(cell, engine, 1.2)

    def nested(target: Session | Connection) -> tuple[float, float, float, float]:
        before = current(target, setting)
        with locksafe.lock_timeout(target, 2.5):
            outer = current(target, setting)
            with locksafe.lock_timeout(target, 1.2):
                inner = current(target, setting)
            return before, outer, inner, current(target, setting)

    for kind in ("session", "connection"):
        (before, outer, inner, outer_again), left, now = in_block(
            cell, engine, kind, 0.5, nested, lambda target: current(target, setting)
        )
        assert left is None
        assert before == expected_wait(cell, engine, 0.5)  # the surrounding block's
        assert (outer, inner, outer_again) == (wanted, inner_wanted, wanted)
        assert now != before
        assert now == cell.run(lambda conn: current(conn, setting))

        def raises(target: Session | Connection) -> None:
            assert current(target, setting) == wanted
            raise KeyError("the block's own error")

        _, error, now = in_block(
            cell, engine, kind, 2.5, raises, lambda target: current(target, setting)
        )
        assert isinstance(error, KeyError)
        assert now == cell.run(lambda conn: current(conn, setting))

    def idle(session: Session) -> bool:
        with locksafe.lock_timeout(session, 1):
            pass
        return session.in_transaction()

    assert cell.run_session(idle) is False


def test_the_setting_is_back_after_a_lock_error_left_the_block(cell: Cell) -> None:
    """The block raised the database's lock-timeout error: on the same connection (still
    checked out) the previous value is back once the transaction is rolled back."""
    seed(cell)
    engine = cell.default_engine
    setting = setting_of(cell)

    def bump(target: Connection) -> None:
        target.execute(BUMP)

    def after(target: Connection) -> float:
        target.rollback()
        return current(target, setting)

    with hold_row_lock(cell.url, ROW, hold_timeout=HOLD):
        before = cell.run(lambda conn: current(conn, setting), engine=engine)
        _, error, back = in_block(cell, engine, "connection", 0.2, bump, after)
    assert isinstance(error, DBAPIError)
    assert locksafe.classify(error) is kind_for(cell)
    assert back == before


def pooled_engine(cell: Cell) -> Any:
    """One pooled DB-API connection, so that every checkout gets the same one."""
    pool = AsyncAdaptedQueuePool if cell.is_async else QueuePool
    return cell.warm_up(cell.engine(poolclass=pool, pool_size=1, max_overflow=0))


def test_a_pooled_connection_comes_back_from_the_pool_with_its_setting(
    cell: Cell, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection goes back to the pool inside the block (the session commits and
    closes), and a block whose setting back fails (as when its task is cancelled): the next
    checkout has the previous value, on the same DB-API connection."""
    engine = pooled_engine(cell)
    setting = setting_of(cell)

    def read(target: Session | Connection) -> tuple[float, object]:
        conn = target.connection() if isinstance(target, Session) else target
        return current(target, setting), conn.connection.driver_connection

    original, first = cell.run(read, engine=engine)

    def commit_inside(session: Session) -> tuple[float, tuple[float, object]]:
        inside = current(session, setting)
        session.commit()  # the connection goes back to the pool, the block goes on
        session.close()
        return inside, cell.run(read, engine=engine) if not cell.is_async else (0.0, None)

    (inside, seen), left, _ = in_block(cell, engine, "session", 1.5, commit_inside)
    assert left is None
    assert inside == expected_wait(cell, engine, 1.5)
    if not cell.is_async:  # the sync checkout inside the block, on the same connection
        assert seen == (original, first)
    assert cell.run(read, engine=engine) == (original, first)

    real = locksafe.timeouts._on_dbapi

    def failing_set_back(conn: Connection, sql: str, *, fetch: bool = False) -> Any:
        if not fetch and getattr(failing_set_back, "armed", False):
            raise RuntimeError("setting back failed")
        return real(conn, sql, fetch=fetch)

    def raises(target: Connection) -> None:
        assert current(target, setting) == expected_wait(cell, engine, 1.5)
        failing_set_back.armed = True  # type: ignore[attr-defined]
        raise KeyError("the block's own error")

    monkeypatch.setattr(locksafe.timeouts, "_on_dbapi", failing_set_back)
    with caplog.at_level(logging.WARNING, logger="locksafe.timeouts"):
        _, error, _ = in_block(cell, engine, "connection", 1.5, raises)
    monkeypatch.undo()
    assert isinstance(error, KeyError), "the block's error goes up, not the setting back's"
    assert cell.run(read, engine=engine) == (original, first)
    if not setting_of(cell).transaction_scoped:
        assert "setting back failed" in caplog.text


# -- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "error"),
    [
        (True, TypeError),
        ("1", TypeError),
        (None, TypeError),
        (-0.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
    ],
)
def test_bad_seconds_raise_at_call_time_naming_the_option(seconds: Any, error: type) -> None:
    with Session(create_engine("sqlite://")) as session:
        with pytest.raises(error, match="seconds"):
            locksafe.lock_timeout(session, seconds)
        assert not session.in_transaction()


def test_bad_targets_raise_at_call_time_naming_the_option() -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(TypeError, match=r"session_or_connection=.*engine\.connect"):
        locksafe.lock_timeout(engine, 1)
    with pytest.raises(TypeError, match="session_or_connection"):
        locksafe.lock_timeout("postgresql://", 1)
    async_engine = create_async_engine("sqlite+aiosqlite://")
    with (
        pytest.raises(TypeError, match="async with"),
        locksafe.lock_timeout(AsyncSession(async_engine), 1),
    ):
        pass


def test_zero_and_fractions_are_accepted() -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        for seconds, ms in ((0, 0), (0.25, 250), (3, 3000)):
            with locksafe.lock_timeout(conn, seconds):
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == ms


@pytest.mark.cells("postgresql")
def test_postgresql_autocommit_is_refused_not_ignored(cell: Cell) -> None:
    """``SET LOCAL`` in AUTOCOMMIT would end with its own statement: UnsupportedLockOption,
    not a bound that silently does nothing."""

    def block(conn: Connection) -> None:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        with (
            pytest.raises(locksafe.UnsupportedLockOption, match="AUTOCOMMIT"),
            locksafe.lock_timeout(conn, 1),
        ):
            pass

    cell.run(block)


# -- @transactional(timeout=...) is a deadline -----------------------------------------------


def bounded_engine(cell: Cell, seconds: int | None) -> Any:
    """The cell's engine, its connections bounded to ``seconds`` by their own setting; with
    ``None``, no bound to speak of: PostgreSQL's ``lock_timeout = 0`` (none), InnoDB's 100 s,
    SQLite's 30 s."""
    if cell.backend == "sqlite":
        return cell.warm_up(cell.engine(connect_args={"timeout": seconds or 30}))
    engine = cell.engine()
    sync = engine.sync_engine if cell.is_async else engine
    sql = (
        f"SET lock_timeout = '{seconds or 0}s'"
        if cell.backend == "postgresql"
        else f"SET SESSION innodb_lock_wait_timeout = {seconds or 100}"
    )

    @event.listens_for(sync, "connect")
    def _bound(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(sql)
        cursor.close()
        dbapi_connection.commit()

    return cell.warm_up(engine)


# slow (not in the compat leg): 1 s lock waits run out on the server (two per async cell); the
# deadline's bound set on the session's connection and reset for the pool runs there in
# test_transactional_never_loosens_a_tighter_bound and
# test_transactional_leaves_a_pooled_connection_as_it_was.
@pytest.mark.slow
@pytest.mark.parametrize("how", ["statement", "flush"])
def test_transactional_timeout_is_a_deadline_for_a_blocked_lock_wait(cell: Cell, how: str) -> None:
    """Blocked in a statement of the function, or in the flush of the decorator's commit (an
    ORM change): the call ends at its deadline."""
    seed(cell)
    engine = bounded_engine(cell, None)
    setting = setting_of(cell)

    @locksafe.transactional(timeout=1)
    def bump(*, session: Session) -> None:
        if how == "statement":
            session.execute(BUMP)
        else:
            row = session.get(Row, 1)
            assert row is not None
            row.value += 1

    @locksafe.transactional(timeout=1)
    async def bump_async(*, session: AsyncSession) -> None:
        if how == "statement":
            await session.execute(BUMP)
        else:
            row = await session.get(Row, 1)
            assert row is not None
            row.value += 1

    def call(session: Session) -> tuple[float, BaseException | None, float]:
        started = time.monotonic()
        try:
            bump(session=session)
        except Exception as exc:
            return time.monotonic() - started, exc, current(session, setting)
        return time.monotonic() - started, None, current(session, setting)

    async def call_async() -> tuple[float, BaseException | None, float]:
        async with AsyncSession(engine) as session:
            started = time.monotonic()
            try:
                await bump_async(session=session)
            except Exception as exc:
                error: BaseException | None = exc
            else:
                error = None
            elapsed = time.monotonic() - started
            return elapsed, error, await session.run_sync(current, setting)

    before = cell.run(lambda conn: current(conn, setting), engine=engine)
    assert before >= 30
    with hold_row_lock(cell.url, ROW, hold_timeout=HOLD):
        results = [cell.run_session(call, engine=engine)]
        if cell.is_async:
            results.append(cell.run_async(call_async))
    for elapsed, error, after in results:
        assert isinstance(error, LockUnavailable), error
        assert error.kind is kind_for(cell)
        assert 0.8 <= elapsed <= 1.5, f"@transactional(timeout=1) took {elapsed:.3f}s"
        assert after == before  # the connection's own bound, after the call
        print(f"\n{cell.name} {how}: @transactional(timeout=1) gave up after {elapsed:.3f}s")


def test_transactional_never_loosens_a_tighter_bound(cell: Cell) -> None:
    """``timeout=30`` on connections bounded to 1 s keeps 1 s inside the call (the deadline
    alone: PostgreSQL's early bound, tighter still, is in test_deadlock_storm.py)."""
    engine = bounded_engine(cell, 1)
    setting = setting_of(cell)

    @locksafe.transactional(timeout=30, early_lock_timeout=None)
    def inside(*, session: Session) -> float:
        return current(session, setting)

    assert cell.run_session(lambda s: inside(session=s), engine=engine) == 1.0


def test_transactional_leaves_a_pooled_connection_as_it_was(cell: Cell) -> None:
    """The deadline's bound lasts the call; the pool gets the connection back as it was."""
    engine = pooled_engine(cell)
    setting = setting_of(cell)

    def read(target: Session | Connection) -> tuple[float, object]:
        conn = target.connection() if isinstance(target, Session) else target
        return current(target, setting), conn.connection.driver_connection

    original, first = cell.run(read, engine=engine)

    @locksafe.transactional(timeout=1)
    def deadline(*, session: Session) -> float:
        return current(session, setting)

    assert cell.run_session(lambda s: deadline(session=s), engine=engine) <= 1.0 < original
    assert cell.run(read, engine=engine) == (original, first)


@pytest.mark.cells("postgresql")
def test_transactional_sets_nothing_in_autocommit(cell: Cell) -> None:
    """No transaction for ``SET LOCAL`` to last: the deadline leaves the server's bound."""
    setting = setting_of(cell)

    @locksafe.transactional(timeout=1)
    def inside(*, session: Session) -> float:
        return current(session, setting)

    engine = cell.default_engine.execution_options(isolation_level="AUTOCOMMIT")
    assert (
        cell.run_session(lambda s: inside(session=s), engine=engine) == 30.0
    )  # the server's, untouched


# -- what the deadline costs, and that it reads the bound a connection has now ---------------


def set_own_bound(cell: Cell, engine: Any, seconds: int) -> None:
    """Give the pooled connection of ``engine`` its own bound (the session's setting), as an
    application would, behind locksafe's back."""
    sql = (
        f"SET lock_timeout = '{seconds}s'"
        if cell.backend == "postgresql"
        else f"SET SESSION innodb_lock_wait_timeout = {seconds}"
    )

    def run(conn: Connection) -> None:
        conn.exec_driver_sql(sql)
        conn.commit()

    cell.run(run, engine=engine)


def deadline_calls(cell: Cell, engine: Any, timeout: float, calls: int) -> list[float]:
    """``calls`` calls of a ``@transactional(timeout=timeout)`` function (the ``async def`` one
    on async cells), each in a new session, one attempt each; the bound each saw inside (the
    deadline alone: PostgreSQL's early bound is in test_deadlock_storm.py)."""
    setting = setting_of(cell)

    @locksafe.transactional(timeout=timeout, early_lock_timeout=None)
    def inside(*, session: Session) -> float:
        return current(session, setting)

    @locksafe.transactional(timeout=timeout, early_lock_timeout=None)
    async def inside_async(*, session: AsyncSession) -> float:
        return await session.run_sync(current, setting)

    if not cell.is_async:
        return [cell.run_session(lambda s: inside(session=s), engine=engine) for _ in range(calls)]

    async def main() -> list[float]:
        seen = []
        for _ in range(calls):
            async with AsyncSession(engine) as session:
                seen.append(await inside_async(session=session))
        return seen

    return cell.run_async(main)


class Received:
    """Statements a server received: on PostgreSQL every statement of the engine (locksafe's
    go through SQLAlchemy there), on MariaDB the server's own count (``Questions``: whatever
    path a statement took: SQLAlchemy, the bare DB-API cursor, the pool), read on a
    connection of its own; the test session's servers serve this test alone."""

    def __init__(self, cell: Cell, engine: Any) -> None:
        self.cell = cell
        self.seen = 0
        if cell.backend == "postgresql":
            sync = engine.sync_engine if cell.is_async else engine
            event.listen(sync, "before_cursor_execute", self._count)
        else:
            self.admin = cell.sync_engine().connect()
            self.probe = self._questions() - self._questions()  # what one read adds: -1

    def _count(self, *args: Any) -> None:
        self.seen += 1

    def _questions(self) -> int:
        return int(self.admin.exec_driver_sql("SHOW GLOBAL STATUS LIKE 'Questions'").one()[1])

    def close(self) -> None:
        if self.cell.backend != "postgresql":
            self.admin.close()

    def during(self, work: Callable[[], object]) -> int:
        if self.cell.backend == "postgresql":
            before = self.seen
            work()
            return self.seen - before
        before = self._questions()
        work()
        return self._questions() - before + self.probe


@pytest.mark.cells("postgresql", "mariadb")
@pytest.mark.parametrize("own_bound", [100, 5])
def test_the_deadline_costs_one_statement_or_two(cell: Cell, own_bound: int) -> None:
    """What ``@transactional(timeout=30)`` sends beyond the same call without a deadline
    (``timeout=inf``), per attempt: PostgreSQL one statement (the value read and
    ``lock_timeout`` set in one); MySQL / MariaDB two where the deadline lowers the
    connection's own bound (saved and set in one, set back at check-in), one where the
    connection's bound is tighter already (read: nothing to change)."""
    engine = pooled_engine(cell)
    set_own_bound(cell, engine, own_bound)
    received = Received(cell, engine)
    for timeout in (math.inf, 30):
        deadline_calls(cell, engine, timeout, 1)  # warm: connected, the bound seen once
    calls = 3
    try:
        plain = received.during(lambda: deadline_calls(cell, engine, math.inf, calls))
        bounded = received.during(lambda: deadline_calls(cell, engine, 30, calls))
    finally:
        received.close()
    lowers = own_bound > 30
    expected = 1 if cell.backend == "postgresql" or not lowers else 2
    assert (bounded - plain) == expected * calls, (
        f"{cell.name}: {plain / calls} statements per call without the deadline, "
        f"{bounded / calls} with it"
    )
    seen = deadline_calls(cell, engine, 30, 1)[0]
    assert (29 < seen <= 30) if lowers else seen == own_bound
    print(f"\n{cell.name}, own bound {own_bound}s: the deadline costs {expected} per attempt")


@pytest.mark.cells("postgresql", "mariadb")
def test_the_deadline_reads_the_bound_a_connection_has_now(cell: Cell) -> None:
    """The connection's own bound changes between calls, behind locksafe's back, looser and
    tighter: each call bounds its waits by the lower of the deadline and the bound the
    connection has then, and leaves that bound as it found it."""
    engine = pooled_engine(cell)
    setting = setting_of(cell)
    for own in (100, 1, 100, 100, 2, 2, 100):
        set_own_bound(cell, engine, own)
        inside = deadline_calls(cell, engine, 30, 1)[0]
        assert (29 < inside <= 30) if own > 30 else inside == own, (own, inside)
        assert cell.run(lambda conn: current(conn, setting), engine=engine) == own
