"""The shapes real applications give SQLite, under locksafe.sqlite.configure()'s default
(``begin="first_write"``) and beside stock pysqlite / aiosqlite: several sessions in one call,
per-session PRAGMAs, read-then-write transactions from several writers, SKIP LOCKED on a stale
snapshot, a shared sqlite3 connection (StaticPool), a thread pool that moves on while a
transaction it began is finished elsewhere (FastAPI's dependency teardown).

The rule (issue 8): plugged into an app that works stock, locksafe keeps every success a
success and every constraint enforced; where a call really waits on itself, a clear error at
once instead of a busy-timeout-long hang."""

from __future__ import annotations

import contextvars
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
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
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

import locksafe
import locksafe.sqlite
from harness.cells import Cell
from harness.probes import sqlite_write_locked
from locksafe import with_row_locks

pytestmark = pytest.mark.cells("sqlite")

MODES = ["first_write", "deferred", "immediate"]

metadata = MetaData()
parent = Table("shape_parent", metadata, Column("id", Integer, primary_key=True))
child = Table(
    "shape_child",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("parent_id", Integer, ForeignKey("shape_parent.id"), nullable=False),
)
counter = Table(
    "shape_counter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("value", Integer, nullable=False),
)
events = Table(
    "shape_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(40), nullable=False),
)


def setup(cell: Cell) -> str:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode = wal")
        conn.execute(insert(counter).values(id=1, value=0))
        conn.execute(insert(parent).values(id=1))
    path = cell.url.database
    assert path
    return path


def engine_for(cell: Cell, mode: str | None, **kw: Any) -> Any:
    """The cell's engine: stock (``mode=None``), or configured with ``begin=mode``."""
    engine = cell.engine(**kw)
    if mode is not None:
        locksafe.sqlite.configure(engine, busy_timeout=5, begin=mode)  # type: ignore[arg-type]
    return cell.warm_up(engine)


def value_of_counter(cell: Cell) -> int:
    with cell.sync_engine().connect() as conn:
        return int(conn.execute(select(counter.c.value)).scalar_one())


def count(cell: Cell, table: Table) -> int:
    with cell.sync_engine().connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def sessions(cell: Cell, engine: Any, fn: Callable[[Callable[[], Session]], Any]) -> Any:
    """``fn(open_session)`` where ``open_session()`` opens another (sync-facing) Session of this
    cell's driver in the same call: on the async cell, AsyncSessions driven from one greenlet
    (``run_sync`` of the first)."""
    if not cell.is_async:
        opened: list[Session] = []

        def open_sync() -> Session:
            opened.append(Session(engine))
            return opened[-1]

        try:
            return fn(open_sync)
        finally:
            for session in opened:
                session.close()

    from sqlalchemy.ext.asyncio import AsyncSession

    async def main() -> Any:
        opened: list[AsyncSession] = []

        def open_async() -> Session:
            opened.append(AsyncSession(engine))
            return opened[-1].sync_session

        async with AsyncSession(engine) as first:
            try:
                return await first.run_sync(lambda _: fn(open_async))
            finally:
                for session in opened:
                    await session.close()

    return cell.run_async(main)


# -- two sessions in one call -------------------------------------------------------------------


@pytest.mark.parametrize("mode", [None, "first_write", "deferred"])
def test_a_request_session_that_read_and_a_service_session_that_writes(
    cell: Cell, mode: str | None
) -> None:
    """The FastAPI shape: the request's dependency session reads (auth check, a lookup), then a
    service function opens its own session, writes and commits, then the request session
    commits. Stock succeeds; so must every locksafe mode that does not lock reads — at once,
    not after a busy timeout."""
    setup(cell)
    engine = engine_for(cell, mode)

    def request(open_session: Callable[[], Session]) -> float:
        request_session = open_session()
        assert request_session.execute(select(counter.c.value)).scalar_one() == 0
        started = time.monotonic()
        service = open_session()
        service.execute(update(counter).values(value=counter.c.value + 1))
        service.execute(insert(events).values(name="service"))
        service.commit()
        request_session.execute(select(func.count()).select_from(events)).scalar_one()
        request_session.commit()
        return time.monotonic() - started

    took = sessions(cell, engine, request)
    assert took < 2.0, took
    assert value_of_counter(cell) == 1
    assert count(cell, events) == 1


def test_immediate_request_session_then_service_session_fails_at_once(cell: Cell) -> None:
    """Under begin="immediate" the request session's read takes the write lock, and the service
    session's write would wait for it until the busy timeout (issue 8: every Airflow backfill
    POST hung 120 s). locksafe raises SelfDeadlock at once instead, and nothing is written."""
    setup(cell)
    engine = engine_for(cell, "immediate")

    def request(open_session: Callable[[], Session]) -> tuple[float, BaseException | None]:
        request_session = open_session()
        request_session.execute(select(counter.c.value)).scalar_one()
        service = open_session()
        started = time.monotonic()
        try:
            service.execute(update(counter).values(value=5))
        except locksafe.SelfDeadlock as error:
            service.rollback()
            request_session.rollback()
            return time.monotonic() - started, error
        return time.monotonic() - started, None

    took, error = sessions(cell, engine, request)
    assert isinstance(error, locksafe.SelfDeadlock), error
    assert took < 1.0, took
    assert value_of_counter(cell) == 0


@pytest.mark.parametrize("mode", MODES)
def test_two_writing_sessions_in_one_call_fail_at_once(cell: Cell, mode: str) -> None:
    """A store method that wrote (and has not committed) calls another that opens its own
    session and writes: on SQLite (one writer at a time) the second waits for the first, which
    waits for the second to return — stock pysqlite waits the whole busy timeout, then "database
    is locked". locksafe: SelfDeadlock at once, classified as no lock error (not retried), and
    the first session's work is still its own to commit or roll back."""
    setup(cell)
    engine = engine_for(cell, mode)

    def store(open_session: Callable[[], Session]) -> tuple[float, BaseException | None]:
        outer = open_session()
        outer.execute(insert(events).values(name="outer"))
        inner = open_session()
        started = time.monotonic()
        try:
            inner.execute(insert(events).values(name="inner"))
            return time.monotonic() - started, None
        except locksafe.SelfDeadlock as error:
            inner.rollback()
            outer.commit()
            return time.monotonic() - started, error

    took, error = sessions(cell, engine, store)
    assert isinstance(error, locksafe.SelfDeadlock), error
    assert locksafe.classify(error) is None
    assert took < 1.0, took
    with cell.sync_engine().connect() as conn:
        assert conn.execute(select(events.c.name)).scalars().all() == ["outer"]


@pytest.mark.cells("sqlite+pysqlite")  # FastAPI's threadpool runs sync sessions
def test_a_thread_pool_moving_on_is_not_a_self_deadlock(cell: Cell) -> None:
    """FastAPI runs a sync route in a worker thread and its dependency's teardown (the COMMIT)
    in another one: the worker thread takes the next request while the first request's
    transaction still holds the write lock. That next request's write must wait for the lock
    (and get it once the teardown commits), not be called a self-deadlock: each job runs in a
    copy of the context it came from (anyio, Starlette, asyncio), which is what locksafe goes
    by — measured on a real Airflow, where heartbeats share worker threads."""
    setup(cell)
    engine = engine_for(cell, "first_write")
    pool = ThreadPoolExecutor(max_workers=1)  # one worker thread: both jobs run in it
    first = Session(engine)
    wrote = threading.Event()

    def route_one() -> None:
        first.execute(update(counter).values(value=counter.c.value + 1))
        wrote.set()

    def route_two() -> int:
        with Session(engine) as second:
            second.execute(update(counter).values(value=counter.c.value + 10))
            second.commit()
        return value_of_counter(cell)

    try:
        pool.submit(contextvars.copy_context().run, route_one).result()
        assert wrote.is_set()
        later = pool.submit(contextvars.copy_context().run, route_two)
        time.sleep(0.3)
        assert not later.done()  # waiting for the first request's write lock, not failed
        first.commit()  # the first request's teardown, in another thread
        assert later.result(timeout=5) == 11
    finally:
        first.close()
        pool.shutdown()


# -- per-session set-up statements ------------------------------------------------------------


@pytest.mark.parametrize("mode", [None, *MODES])
def test_per_session_foreign_keys_pragma_keeps_its_effect(cell: Cell, mode: str | None) -> None:
    """An app that runs ``PRAGMA foreign_keys = ON`` as the first statement of each session (a
    common recipe): the PRAGMA is a no-op inside a transaction, so it must run before the
    BEGIN. Stock refuses the orphan; so must every locksafe mode."""
    setup(cell)
    engine = engine_for(cell, mode)

    def orphan(session: Session) -> BaseException | None:
        session.connection().exec_driver_sql("PRAGMA foreign_keys = ON")
        try:
            session.execute(insert(child).values(id=1, parent_id=999))
            session.commit()
        except IntegrityError as error:
            session.rollback()
            return error
        return None

    error = cell.run_session(orphan, engine=engine)
    assert isinstance(error, IntegrityError), "the orphan row was accepted"
    assert count(cell, child) == 0


@pytest.mark.parametrize("mode", MODES)
def test_per_session_busy_timeout_pragma_keeps_its_effect(cell: Cell, mode: str) -> None:
    """``PRAGMA busy_timeout`` set at the start of a session is what its writes wait."""
    path = setup(cell)
    engine = engine_for(cell, mode)

    def write(session: Session) -> tuple[float, BaseException | None]:
        session.connection().exec_driver_sql("PRAGMA busy_timeout = 300")
        started = time.monotonic()
        try:
            session.execute(insert(events).values(name="late"))
            session.commit()
        except Exception as error:
            session.rollback()
            return time.monotonic() - started, error
        return time.monotonic() - started, None

    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        took, error = cell.run_session(write, engine=engine)
    finally:
        holder.rollback()
        holder.close()
    assert error is not None
    assert locksafe.classify(error) is locksafe.LockErrorKind.DATABASE_BUSY
    assert 0.25 <= took < 2.0, took  # the session's 300 ms, not configure()'s 5 s


# -- several writers: read-then-write ---------------------------------------------------------


def read_then_write(cell: Cell, engine: Any, rounds: int) -> list[BaseException]:
    """One writer: ``rounds`` transactions that read the counter, then insert an event and
    bump the counter under with_row_locks (the app's own read first, as Airflow does)."""
    failures: list[BaseException] = []

    def one(session: Session) -> None:
        for _ in range(rounds):
            try:
                session.execute(select(func.count()).select_from(events)).scalar_one()
                time.sleep(0.002)  # another writer commits meanwhile
                session.execute(insert(events).values(name="w"))
                value = session.execute(
                    with_row_locks(select(counter.c.value).where(counter.c.id == 1))
                ).scalar_one()
                session.execute(update(counter).values(value=value + 1))
                session.commit()
            except Exception as error:
                session.rollback()
                failures.append(error)

    cell.run_session(one, engine=engine)
    return failures


def test_read_then_write_transactions_do_not_fail_on_a_stale_snapshot(cell: Cell) -> None:
    """Four writers, each transaction reading before it writes. Under "deferred" some fail at
    once (SQLITE_BUSY_SNAPSHOT: another writer committed after their read), whatever the busy
    timeout — on a real Airflow every read-then-write transaction did. Under the default every
    one succeeds, and the counter bumped under with_row_locks loses no update."""
    setup(cell)
    engine = engine_for(cell, "first_write")
    threads, rounds = 4, 10
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda _: read_then_write(cell, engine, rounds), range(threads)))
    failures = [error for result in results for error in result]
    assert failures == []
    assert count(cell, events) == threads * rounds
    assert value_of_counter(cell) == threads * rounds


# -- skip_locked on SQLite never fails because of a lock ----------------------------------------


@pytest.mark.parametrize("mode", ["first_write", "deferred"])
def test_skip_locked_on_a_stale_snapshot_gives_no_rows(cell: Cell, mode: str) -> None:
    """The scheduler's shape (issue 8): the transaction has read, another process committed,
    then ``with_row_locks(..., skip_locked=True)``. Stale snapshot: no rows, no error (the
    scheduler exited on this error); a busy database: no rows, at once. ("immediate" has no
    stale snapshot: its read took the write lock.)"""
    path = setup(cell)
    engine = engine_for(cell, mode)

    def scheduler_loop(session: Session) -> tuple[list[Any], list[Any]]:
        session.execute(select(counter.c.value)).scalar_one()  # the loop's earlier read
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute("UPDATE shape_counter SET value = value + 1")
        stale = session.execute(with_row_locks(select(counter), skip_locked=True)).all()
        session.rollback()
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            busy = session.execute(with_row_locks(select(counter), skip_locked=True)).all()
        finally:
            holder.rollback()
            holder.close()
        session.rollback()
        return stale, busy

    stale, busy = cell.run_session(scheduler_loop, engine=engine)
    # first_write reads before the first write see the latest commit: nothing is stale there,
    # and the lock is free, so the row is locked and returned.
    assert stale == ([] if mode != "first_write" else [(1, 1)])
    assert busy == []


# -- a shared sqlite3 connection ----------------------------------------------------------------


def test_a_commit_after_the_shared_connection_was_rolled_back_raises(cell: Cell) -> None:
    """Issue 9, item 5: StaticPool (FastAPI's testing recipe) gives every session the same
    sqlite3 connection. Session 1 debits under with_row_locks and flushes; session 2 is refused
    (another transaction is in progress) and closes, and the pool's reset rolls the shared
    connection back — session 1's debit is gone, and its credit runs in a new transaction. Its
    COMMIT must fail (TransactionLost), not "succeed" with half a transfer: nothing is committed
    and the total stays 2,000, checked from another connection (it was 2,100 before)."""
    setup(cell)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(counter).values(id=2, value=1000))
        conn.execute(update(counter).where(counter.c.id == 1).values(value=1000))

    def transfer(engine: Any) -> BaseException | None:
        sync = locksafe.sqlite.configure(engine, busy_timeout=5)
        sync = getattr(sync, "sync_engine", sync)
        first = Session(sync)
        try:
            value = first.execute(
                with_row_locks(select(counter.c.value).where(counter.c.id == 1))
            ).scalar_one()
            first.execute(update(counter).where(counter.c.id == 1).values(value=value - 100))
            second = Session(sync)
            with pytest.raises(Exception, match="already in a transaction"):
                second.execute(insert(events).values(name="refused"))
            second.close()  # the pool's reset rolls the shared sqlite3 connection back
            first.execute(update(counter).where(counter.c.id == 2).values(value=1100))
            try:
                first.commit()
            except locksafe.TransactionLost as error:
                first.rollback()
                return error
            return None
        finally:
            first.close()

    from sqlalchemy.util import greenlet_spawn

    engine = cell.engine(poolclass=StaticPool)
    sync_engine = getattr(engine, "sync_engine", engine)
    error = (
        transfer(engine)
        if not cell.is_async
        else cell.run_async(greenlet_spawn, transfer, sync_engine)
    )
    assert isinstance(error, locksafe.TransactionLost), error
    with cell.sync_engine().connect() as conn:
        total = conn.execute(select(func.sum(counter.c.value))).scalar_one()
    assert total == 2000


# -- the write lock is still taken before a locking SELECT, and released ------------------------


def test_first_write_reads_take_no_lock_and_writes_hold_it_to_the_end(cell: Cell) -> None:
    """Under the default, a transaction's reads before its first write hold nothing (another
    writer commits in between); its first write takes the write lock and keeps it to the end."""
    path = setup(cell)
    engine = engine_for(cell, "first_write")
    seen: dict[str, bool] = {}

    def work(session: Session) -> None:
        session.execute(select(counter.c.value)).scalar_one()
        seen["after read"] = sqlite_write_locked(path)
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute("UPDATE shape_counter SET value = 7")  # not blocked by our read
        assert session.execute(select(counter.c.value)).scalar_one() == 7  # the latest commit
        session.execute(insert(events).values(name="x"))
        seen["after write"] = sqlite_write_locked(path)
        session.execute(select(counter.c.value)).scalar_one()
        seen["after a later read"] = sqlite_write_locked(path)
        session.commit()
        seen["after commit"] = sqlite_write_locked(path)

    cell.run_session(work, engine=engine)
    assert seen == {
        "after read": False,
        "after write": True,
        "after a later read": True,
        "after commit": False,
    }


def test_event_listener_order_does_not_matter(cell: Cell) -> None:
    """An app's own ``connect`` listener that runs PRAGMAs (Airflow sets foreign_keys and WAL
    there) before or after configure()'s: both keep their effect."""
    setup(cell)
    engine = cell.engine()
    sync = getattr(engine, "sync_engine", engine)

    @event.listens_for(sync, "connect")
    def app_pragmas(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    locksafe.sqlite.configure(engine, busy_timeout=5)

    def orphan(session: Session) -> bool:
        try:
            session.execute(insert(child).values(id=1, parent_id=999))
            session.commit()
        except IntegrityError:
            session.rollback()
            return True
        return False

    assert cell.run_session(orphan, engine=engine) is True


# -- a multi-process application: stock beside locksafe, same load ------------------------------


@pytest.mark.cells("sqlite+pysqlite")
@pytest.mark.parametrize("configured", [None, "first_write"], ids=["stock", "locksafe-default"])
def test_a_multi_process_app_keeps_working(
    cell: Cell, tmp_path: Any, configured: str | None
) -> None:
    """Four worker processes, a per-session PRAGMA busy_timeout, a multi-step call whose first
    step commits in a nested session while the outer session has read and will write, no
    retries: stock has no error and no partial write; with locksafe's default configure() the
    same (issue 8: "deferred" failed 53–68 % of such calls at once, "immediate" all of them).
    Invariants from a separate connection: stock conserved, every order audited, none
    negative."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from harness.apps import shapes as shapes_app

    url = f"sqlite:///{tmp_path / 'app.db'}"
    items, per_item, workers, calls = 4, 30, 4, 40
    shapes_app.create(url, items, per_item)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        results = list(
            pool.map(
                shapes_app.worker,
                [url] * workers,
                [configured] * workers,
                range(workers),
                [calls] * workers,
                [items] * workers,
            )
        )
    errors = sum(r["errors"] for r in results)
    assert errors == 0, [m for r in results for m in r["messages"]]
    assert sum(r["done"] + r["sold_out"] for r in results) == workers * calls
    checked = shapes_app.invariants(url, per_item)
    assert checked == {
        "sold": min(items * per_item, checked["sold"]),
        "conserved": 1,
        "orders_without_audit": 0,
        "negative_stock": 0,
    }
    assert checked["sold"] > 0


# -- locksafe.sqlite.immediate(): a check-then-insert with no row to lock ----------------------


def test_immediate_block_serialises_a_check_then_insert(cell: Cell) -> None:
    """Four writers each check that no "singleton" event exists, then insert one (Airflow's
    count of active backfills, then the insert). Under the default the check reads the latest
    commit without a lock and several can pass it; inside locksafe.sqlite.immediate() the check
    waits for the write lock, and exactly one row is inserted. The block ends with the call:
    a read outside it takes no lock."""
    path = setup(cell)
    engine = engine_for(cell, "first_write")
    barrier = threading.Barrier(4)

    def writer(_: int) -> bool:
        def work(session: Session) -> bool:
            barrier.wait(timeout=10)
            with locksafe.sqlite.immediate():
                exists = session.execute(
                    select(func.count()).select_from(events).where(events.c.name == "singleton")
                ).scalar_one()
                held = sqlite_write_locked(path)
                time.sleep(0.05)  # the window the race needs
                if not exists:
                    session.execute(insert(events).values(name="singleton"))
                session.commit()
            return held

        result: bool = cell.run_session(work, engine=engine)
        return result

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(writer, range(4)))
    assert count(cell, events) == 1
    assert all(results), "the check did not hold the write lock"

    def after_the_block(session: Session) -> bool:
        with locksafe.sqlite.immediate():
            session.execute(select(func.count()).select_from(events)).scalar_one()
            session.commit()
        session.execute(select(func.count()).select_from(events)).scalar_one()
        locked = sqlite_write_locked(path)
        session.rollback()
        return locked

    assert cell.run_session(after_the_block, engine=engine) is False


# -- statements told apart the way SQLite needs (a reviewer's reproductions) ---------------------


def names_of_events(cell: Cell) -> list[str]:
    with cell.sync_engine().connect() as conn:
        return list(conn.execute(select(events.c.name).order_by(events.c.id)).scalars())


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO shape_events (name) VALUES ('ghost') RETURNING id",
        "-- a comment first\nUPDATE shape_counter SET value = 9 RETURNING id",
        "/* c */ DELETE FROM shape_counter RETURNING id",
    ],
    ids=["insert-returning", "comment-update-returning", "comment-delete-returning"],
)
def test_a_textual_write_is_a_write(cell: Cell, sql: str) -> None:
    """``text("... RETURNING ...").columns(...)`` is a TextualSelect to SQLAlchemy, and a
    statement may start with a comment: either way a write, inside the transaction, undone by
    its rollback (it was committed on its own before: a write outside the transaction)."""
    from sqlalchemy import text

    setup(cell)
    engine = engine_for(cell, "first_write")

    def work(session: Session) -> None:
        session.execute(text(sql).columns(id=Integer)).all()
        session.execute(insert(events).values(name="later"))
        session.rollback()

    cell.run_session(work, engine=engine)
    assert names_of_events(cell) == []
    assert value_of_counter(cell) == 0


@pytest.mark.parametrize(
    "pragma",
    [
        "-- enforce foreign keys\nPRAGMA foreign_keys=ON",
        "/* fk */ PRAGMA foreign_keys = ON",
        'PRAGMA "main".foreign_keys=ON',
    ],
    ids=["line-comment", "block-comment", "quoted-schema"],
)
def test_a_set_up_pragma_is_recognised_in_any_spelling(cell: Cell, pragma: str) -> None:
    setup(cell)
    engine = engine_for(cell, "first_write")

    def orphan(session: Session) -> bool:
        session.connection().exec_driver_sql(pragma)
        try:
            session.execute(insert(child).values(id=1, parent_id=999))
            session.commit()
        except IntegrityError:
            session.rollback()
            return True
        return False

    assert cell.run_session(orphan, engine=engine) is True


@pytest.mark.parametrize(
    "pragma",
    ["PRAGMA synchronous=NORMAL", "PRAGMA temp_store=MEMORY", "PRAGMA cache_size=-20000"],
)
def test_session_tuning_pragmas_work_and_take_no_lock(cell: Cell, pragma: str) -> None:
    """Per-session tuning PRAGMAs, refused inside a transaction by SQLite (synchronous,
    temp_store) or merely harmless there (cache_size), run before the BEGIN as with stock: a
    read-only session that starts with one stays a reader (no write lock, no SelfDeadlock for
    two of them in one call)."""
    path = setup(cell)
    engine = engine_for(cell, "first_write")

    def two_readers(open_session: Callable[[], Session]) -> bool:
        first, second = open_session(), open_session()
        for session in (first, second):
            session.connection().exec_driver_sql(pragma)
            session.execute(select(counter.c.value)).scalar_one()
        locked = sqlite_write_locked(path)
        first.commit()
        second.commit()
        return locked

    assert sessions(cell, engine, two_readers) is False


def test_schema_reflection_is_a_read(cell: Cell) -> None:
    """``inspect(engine).has_table()`` runs ``PRAGMA table_info(...)``: a read, answered at
    once while another connection holds the write lock (it waited and failed before)."""
    from sqlalchemy import inspect as sa_inspect

    path = setup(cell)
    engine = engine_for(cell, "first_write")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()

        def reflect(conn: Any) -> bool:
            return bool(sa_inspect(conn).has_table("shape_events"))

        assert cell.run(reflect, engine=engine) is True
        assert time.monotonic() - started < 1.0
    finally:
        holder.rollback()
        holder.close()


@pytest.mark.parametrize("order", ["recipe-first", "configure-first", "manual-begin-immediate"])
def test_an_app_that_sends_its_own_begin(cell: Cell, order: str) -> None:
    """SQLAlchemy's pysqlite recipe (a ``begin`` listener that sends ``BEGIN``), registered
    before or after configure(), and a manual ``exec_driver_sql("BEGIN IMMEDIATE")``: locksafe
    takes that transaction as the Connection's own (it raised or sent a second BEGIN before),
    and the transaction is real — its rollback undoes everything."""
    setup(cell)
    engine = cell.engine()
    sync = getattr(engine, "sync_engine", engine)

    def recipe() -> None:
        @event.listens_for(sync, "begin")
        def do_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

    if order == "recipe-first":
        recipe()
    locksafe.sqlite.configure(engine, busy_timeout=5)
    if order == "configure-first":
        recipe()
    cell.warm_up(engine)

    def work(conn: Any) -> None:
        if order == "manual-begin-immediate":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.execute(insert(events).values(name="a"))
        conn.execute(update(counter).values(value=5))
        conn.rollback()
        conn.execute(insert(events).values(name="b"))
        conn.commit()

    cell.run(work, engine=engine)
    assert names_of_events(cell) == ["b"]
    assert value_of_counter(cell) == 0


@pytest.mark.cells("sqlite+pysqlite")
def test_executescript_in_a_transaction_is_not_called_a_loss(cell: Cell) -> None:
    """sqlite3's executescript() commits the open transaction before its script: the work
    before it is committed, not lost, so the COMMIT goes on as with stock (a TransactionLost
    there, advising to run the transaction again, would have duplicated the work)."""
    setup(cell)
    engine = engine_for(cell, "first_write")
    with Session(engine) as session:
        session.execute(insert(events).values(name="a"))
        session.connection().connection.driver_connection.executescript(
            "INSERT INTO shape_events (name) VALUES ('b');"
        )
        session.execute(insert(events).values(name="c"))
        session.commit()
    assert names_of_events(cell) == ["a", "b", "c"]
