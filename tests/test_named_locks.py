"""Named locks (issue 11): ``locksafe.named_lock`` / ``try_named_lock`` on every cell.

- Exclusion: workers (threads, each with its own connection of the cell's driver, sync or
  ``async with``; and spawned processes) increment one counter read-sleep-write under the lock;
  the final count is exact. Without the lock the same loop loses updates (the check can fail).
- Shared holders at once, an exclusive one waits; MySQL / MariaDB refuse ``shared=True``.
- Timeouts end within tolerance; ``timeout=0`` tries once; the try form answers ``False``.
- The lock is released when the block raises; no lock outlives its scope, checked on the
  server (``pg_locks``, ``IS_USED_LOCK``) or by another holder (SQLite's lock file).
- Hostile names (quotes, semicolons, unicode, 10 kB) lock, exclude, and inject nothing.

Every wait is bounded (thread joins, lock timeouts).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import pickle
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, QueuePool

from harness.cells import Cell
from locksafe import (
    LockErrorKind,
    LockUnavailable,
    NamedLockError,
    UnsupportedLockOption,
    named_lock,
    try_named_lock,
)
from locksafe.dialects.mysql import lock_name
from locksafe.dialects.postgresql import advisory_key

metadata = MetaData()
counter = Table(
    "nl_counter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("n", Integer, nullable=False),
)

THREADS = 4
INCREMENTS = 5  # per worker
PROCESSES = 3
#: Between the read and the write: long enough that unlocked workers overlap for sure.
WINDOW = 0.02
JOIN = 120.0
#: Upper bounds of timing checks: generous, the machine is a loaded 2-core box.
SLACK = 3.0

HOSTILE = {
    "quotes": "it's a \"quoted\" `name` \\ '' --",
    "semicolon": "x'); DROP TABLE nl_counter; --",
    "mysql-injection": "a', 0) OR GET_LOCK('b', 0) -- ",
    "unicode": "ロック 🔒 naïve ÅÄÖ \u200b",
    "10kB": "ä;'\"" * 2560,
}

SERVER = ("postgresql", "mariadb")


class EqualsAnything(str):
    """A str whose ``==`` says yes to everything (a hostile subclass)."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


def unique(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# -- helpers: hold a lock elsewhere, try one, time one -----------------------------------------


@contextlib.contextmanager
def holding(cell: Cell, name: str, *, session: bool = False, **options: Any) -> Iterator[Any]:
    """Hold ``name`` in a thread of its own (its own connection of the cell's driver, ``async
    with`` on async cells) until the block ends; yields the entered lock."""
    ready, done = threading.Event(), threading.Event()
    box: dict[str, Any] = {}
    engine = cell.default_engine

    def sync_main() -> None:
        with contextlib.ExitStack() as stack:
            bind: Any = stack.enter_context(engine.connect())
            if session:
                bind = stack.enter_context(Session(bind=bind))
            box["lock"] = stack.enter_context(named_lock(bind, name, **options))
            ready.set()
            done.wait(JOIN)

    async def async_main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            bind: Any = await stack.enter_async_context(engine.connect())
            if session:
                bind = await stack.enter_async_context(AsyncSession(bind=bind))
            box["lock"] = await stack.enter_async_context(named_lock(bind, name, **options))
            ready.set()
            while not done.is_set():  # noqa: ASYNC110 (a threading.Event)
                await asyncio.sleep(0.005)

    def main() -> None:
        try:
            if cell.is_async:
                cell.run_async(async_main)
            else:
                sync_main()
        except BaseException as exc:
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=main, name="holder")
    thread.start()
    try:
        assert ready.wait(JOIN), "the holder never got the lock"
        if "error" in box:
            raise box["error"]
        yield box["lock"]
    finally:
        done.set()
        thread.join(JOIN)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]


def attempt(cell: Cell, name: str, *, raising: bool = False, **options: Any) -> Any:
    """From a new connection of the cell's driver: ``try_named_lock`` (the bool it gives), or
    with ``raising``, ``named_lock`` (``None`` or the exception it raised) and the seconds
    it took."""
    engine = cell.default_engine

    def outcome(started: float, error: BaseException | None, got: bool) -> Any:
        elapsed = time.monotonic() - started
        return (error, elapsed) if raising else got

    async def async_main() -> Any:
        async with engine.connect() as aconn:
            started = time.monotonic()
            if raising:
                try:
                    async with named_lock(aconn, name, **options):
                        pass
                except LockUnavailable as exc:
                    return outcome(started, exc, False)
                return outcome(started, None, True)
            async with try_named_lock(aconn, name, **options) as got:
                return outcome(started, None, got)

    if cell.is_async:
        return cell.run_async(async_main)
    with engine.connect() as conn:
        started = time.monotonic()
        if raising:
            try:
                with named_lock(conn, name, **options):
                    pass
            except LockUnavailable as exc:
                return outcome(started, exc, False)
            return outcome(started, None, True)
        with try_named_lock(conn, name, **options) as got:
            return outcome(started, None, got)


def pooled_engine(cell: Cell) -> Any:
    """An engine of the cell's driver with a real pool of one connection (warmed up)."""
    poolclass = AsyncAdaptedQueuePool if cell.is_async else QueuePool
    return cell.warm_up(cell.engine(poolclass=poolclass, pool_size=1, max_overflow=0))


def server_holds(cell: Cell, key: Any) -> int:
    """How many holders the server shows for a lock, asked from another connection (the admin
    driver): PostgreSQL ``pg_locks``, MySQL / MariaDB ``IS_USED_LOCK``."""
    with cell.sync_engine().connect() as conn:
        if cell.backend == "postgresql":
            unsigned = key & 0xFFFFFFFFFFFFFFFF
            found: int = conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND classid::bigint = :hi AND objid::bigint = :lo AND objsubid = 1"
                ),
                {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
            ).scalar_one()
            return found
        owner = conn.execute(text("SELECT IS_USED_LOCK(:name)"), {"name": key}).scalar_one()
        return 0 if owner is None else 1


# -- options are checked at call time -----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"name": 1}, TypeError, "name=1"),
        ({"name": b"job"}, TypeError, "name=b'job'"),
        ({"name": ""}, ValueError, "name=''"),
        ({"timeout": "1"}, TypeError, "timeout='1'"),
        ({"timeout": True}, TypeError, "timeout=True"),
        ({"timeout": -0.5}, ValueError, "timeout=-0.5"),
        ({"timeout": float("nan")}, ValueError, "timeout=nan"),
        ({"timeout": float("inf")}, ValueError, "timeout=inf"),
        ({"shared": 1}, TypeError, "shared=1"),
        ({"shared": None}, TypeError, "shared=None"),
        ({"scope": "statement"}, ValueError, "scope='statement'"),
        ({"scope": None}, TypeError, "scope=None"),
        # what a str subclass holds decides, not its ==
        ({"scope": EqualsAnything("statement")}, ValueError, "scope='statement'"),
    ],
)
@pytest.mark.parametrize("factory", [named_lock, try_named_lock])
def test_options_are_checked_at_call_time(
    factory: Callable[..., Any], options: dict[str, Any], error: type[Exception], words: str
) -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        arguments: dict[str, Any] = {"name": "job", **options}
        name = arguments.pop("name")
        with pytest.raises(error, match=words.replace("(", r"\(")):
            factory(conn, name, **arguments)
    engine.dispose()


@pytest.mark.cells("postgresql")
def test_a_scope_that_is_a_str_subclass_means_the_str_it_holds(cell: Cell) -> None:
    """``scope=`` a str subclass whose ``==`` says yes to everything: a session lock, as its
    value says (PostgreSQL took a transaction lock for it, and then failed to release it)."""
    name = unique()

    def body(conn: Connection) -> None:
        lock = named_lock(conn, name, scope=EqualsAnything("session"))
        assert type(lock.scope) is str
        assert lock.scope == "session"
        with lock:
            conn.execute(text("SELECT 1"))
            conn.commit()
            assert server_holds(cell, lock.key) == 1, "a session lock ended with the transaction"
        assert server_holds(cell, lock.key) == 0

    cell.run(body)


def test_options_are_keyword_only_and_bind_is_checked() -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as conn, pytest.raises(TypeError):
        named_lock(conn, "job", 1)  # type: ignore[misc]
    with pytest.raises(TypeError, match="an Engine is not one"):
        named_lock(engine, "job")
    with pytest.raises(TypeError, match="must be a Connection or a Session"):
        try_named_lock("sqlite://", "job")
    engine.dispose()


def test_lock_unavailable_pickles_with_the_lock_name() -> None:
    exc = LockUnavailable(LockErrorKind.LOCK_TIMEOUT, attempts=1, elapsed=0.5, retry_after=1.0)
    exc.lock_name = "job"  # type: ignore[attr-defined]
    again = pickle.loads(pickle.dumps(exc))
    assert again.lock_name == "job"
    assert again.kind is LockErrorKind.LOCK_TIMEOUT


def test_keys_are_stable_and_namespaced() -> None:
    assert advisory_key("job", "app") == advisory_key("job", "app")
    assert advisory_key("job", "app") != advisory_key("job", "other")
    assert -(2**63) <= advisory_key("x" * 10_000, "app") < 2**63
    assert lock_name("job", "app") == "locksafe:app:job"
    assert lock_name("job", "app") != lock_name("job", "other")
    long = lock_name("x" * 100, "app")
    assert len(long) <= 64
    assert long != lock_name("x" * 101, "app")
    assert lock_name("ロック", "app").isascii()


# -- the sync / async protocol ------------------------------------------------------------------


@pytest.mark.cells("async")
def test_async_bind_needs_async_with(cell: Cell) -> None:
    engine = cell.default_engine

    async def main() -> None:
        async with engine.connect() as aconn:
            with pytest.raises(TypeError, match="async with"), named_lock(aconn, unique()):
                pass

    cell.run_async(main)


@pytest.mark.cells("sync")
def test_sync_bind_needs_with(cell: Cell) -> None:
    async def main() -> None:
        with cell.default_engine.connect() as conn, pytest.raises(TypeError, match="use `with`"):
            async with named_lock(conn, unique()):
                pass

    asyncio.run(main())


def test_a_lock_is_entered_once(cell: Cell) -> None:
    name = unique()

    def body(conn: Connection) -> None:
        lock = named_lock(conn, name, scope="session")
        with lock:
            pass
        with pytest.raises(RuntimeError, match="already entered"), lock:
            pass

    cell.run(body)


# -- exclusion: a counter read-sleep-written by concurrent workers -------------------------------


def make_counter(cell: Cell) -> None:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(counter), [{"id": 1, "n": 0}])


def read_counter(cell: Cell) -> int:
    with cell.sync_engine().connect() as conn:
        value: int = conn.execute(select(counter.c.n).where(counter.c.id == 1)).scalar_one()
    return value


READ = select(counter.c.n).where(counter.c.id == 1)


def bump(value: int) -> Any:
    return update(counter).where(counter.c.id == 1).values(n=value + 1)


def increments_sync(bind: Connection | Session, name: str | None, scope: str) -> None:
    """Read, sleep, write ``read + 1``, commit as the block's last step; under the lock."""
    for _ in range(INCREMENTS):
        lock = named_lock(bind, name, scope=scope, timeout=60) if name else None
        with lock or contextlib.nullcontext():
            value = bind.execute(READ).scalar_one()
            time.sleep(WINDOW)
            bind.execute(bump(value))
            bind.commit()


async def increments_async(bind: Any, name: str | None, scope: str) -> None:
    for _ in range(INCREMENTS):
        lock = named_lock(bind, name, scope=scope, timeout=60) if name else None
        async with lock or contextlib.nullcontext():
            value = (await bind.execute(READ)).scalar_one()
            await asyncio.sleep(WINDOW)
            await bind.execute(bump(value))
            await bind.commit()


def run_workers(cell: Cell, name: str | None, scope: str) -> int:
    """``THREADS`` threads, each with its own connection (even workers) or Session (odd
    workers) of the cell's driver; the final counter."""
    make_counter(cell)
    engine = cell.default_engine
    barrier = threading.Barrier(THREADS, timeout=JOIN)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            if cell.is_async:

                async def main() -> None:
                    async with engine.connect() as aconn, AsyncSession(bind=aconn) as session:
                        bind: Any = aconn if index % 2 == 0 else session
                        barrier.wait()
                        await increments_async(bind, name, scope)

                cell.run_async(main)
            else:
                with engine.connect() as conn, Session(bind=conn) as session:
                    bind = conn if index % 2 == 0 else session
                    barrier.wait()
                    increments_sync(bind, name, scope)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert not any(thread.is_alive() for thread in threads), "a worker is stuck"
    if errors:
        raise errors[0]
    return read_counter(cell)


# slow (not in the compat leg): worker threads taking turns on the lock (sleeps under it);
# taking and releasing it on a Connection / Session / AsyncSession runs there in
# test_released_when_the_block_raises, test_a_session_holds_the_lock_on_its_connection,
# test_no_lock_outlives_its_scope and test_hostile_names.
@pytest.mark.slow
@pytest.mark.parametrize("scope", ["transaction", "session"])
def test_threads_exclude_each_other(cell: Cell, scope: str) -> None:
    final = run_workers(cell, unique(), scope)
    print(f"\n[named-lock threads] {cell.name:28} {scope:11} {final}/{THREADS * INCREMENTS}")
    assert final == THREADS * INCREMENTS


# slow (not in the compat leg): the control of test_threads_exclude_each_other, no locksafe code.
@pytest.mark.slow
@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
def test_without_the_lock_updates_are_lost(cell: Cell) -> None:
    """The control: the counter check can fail."""
    final = run_workers(cell, None, "transaction")
    print(f"\n[no lock] {cell.name:28} {final}/{THREADS * INCREMENTS}")
    assert final < THREADS * INCREMENTS


def process_worker(url: str, name: str, scope: str) -> None:
    """One spawned process: its own engine (the admin driver), ``INCREMENTS`` increments."""
    connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            increments_sync(conn, name, scope)
    finally:
        engine.dispose()


# slow (not in the compat leg): spawned processes taking turns (sync admin driver); the same
# lock calls run there in the thread-free tests named above test_threads_exclude_each_other.
@pytest.mark.slow
@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
@pytest.mark.parametrize("scope", ["transaction", "session"])
def test_processes_exclude_each_other(cell: Cell, scope: str) -> None:
    make_counter(cell)
    url = cell.admin_url.render_as_string(hide_password=False)
    name = unique()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(PROCESSES, mp_context=context) as pool:
        futures = [pool.submit(process_worker, url, name, scope) for _ in range(PROCESSES)]
        for future in futures:
            future.result(timeout=JOIN)
    final = read_counter(cell)
    print(f"\n[named-lock processes] {cell.name:28} {scope:11} {final}/{PROCESSES * INCREMENTS}")
    assert final == PROCESSES * INCREMENTS


# -- shared and exclusive ------------------------------------------------------------------------


@pytest.mark.cells("sqlite", "postgresql")
@pytest.mark.parametrize("scope", ["transaction", "session"])
def test_shared_holders_at_once_exclusive_waits(cell: Cell, scope: str) -> None:
    name = unique()
    with holding(cell, name, shared=True, scope=scope) as first:
        assert first.acquired
        with holding(cell, name, shared=True, scope=scope, timeout=5) as second:
            assert second.acquired  # two shared holders at once
            assert attempt(cell, name, scope=scope) is False  # an exclusive one must wait
            error, elapsed = attempt(cell, name, scope=scope, raising=True, timeout=0.3)
            assert isinstance(error, LockUnavailable)
            assert error.kind is LockErrorKind.LOCK_TIMEOUT
            assert 0.25 <= elapsed < 0.3 + SLACK
        assert attempt(cell, name, scope=scope) is False  # one shared holder left
        assert attempt(cell, name, scope=scope, shared=True) is True
    assert attempt(cell, name, scope=scope) is True
    with holding(cell, name, scope=scope):  # exclusive: a shared one waits too
        assert attempt(cell, name, scope=scope, shared=True) is False


@pytest.mark.cells("mariadb")
def test_mysql_refuses_shared(cell: Cell) -> None:
    def body(conn: Connection) -> None:
        with pytest.raises(UnsupportedLockOption, match="shared=True"):  # noqa: SIM117
            with named_lock(conn, unique(), shared=True):
                pytest.fail("entered")

    cell.run(body)


# -- timeouts -----------------------------------------------------------------------------------


# slow (not in the compat leg): 0.5 s and 0.2 s waits run out per case; bounded waits that
# time out run there in test_shared_holders_at_once_exclusive_waits (SQLite, PostgreSQL) and
# test_postgresql_timeout_inside_a_transaction_keeps_it_usable, tries that fail in
# test_hostile_names.
@pytest.mark.slow
@pytest.mark.parametrize("scope", ["transaction", "session"])
def test_timeouts(cell: Cell, scope: str) -> None:
    name = unique()
    with holding(cell, name, scope=scope):
        error, elapsed = attempt(cell, name, scope=scope, raising=True, timeout=0)
        assert isinstance(error, LockUnavailable)
        assert error.kind is LockErrorKind.LOCK_NOT_AVAILABLE
        assert error.lock_name == name  # type: ignore[attr-defined]
        assert name in str(error)
        assert elapsed < SLACK

        error, elapsed = attempt(cell, name, scope=scope, raising=True, timeout=0.5)
        print(f"\n[named-lock timeout 0.5 s] {cell.name:28} {scope:11} {elapsed:.3f} s")
        assert isinstance(error, LockUnavailable)
        assert error.kind is LockErrorKind.LOCK_TIMEOUT
        assert 0.45 <= elapsed < 0.5 + SLACK

        assert attempt(cell, name, scope=scope) is False
        assert attempt(cell, name, scope=scope, timeout=0.2) is False
        assert attempt(cell, unique(), scope=scope) is True  # another name is free
    assert attempt(cell, name, scope=scope, timeout=0) is True


def test_wait_ends_when_the_holder_lets_go(cell: Cell) -> None:
    """``timeout=None`` waits without a bound (here: until the holder leaves, after 0.5 s)."""
    name = unique()
    with holding(cell, name, scope="session"):
        waiter = concurrent.futures.ThreadPoolExecutor(1)
        started = time.monotonic()
        future = waiter.submit(attempt, cell, name, raising=True, scope="session", timeout=None)
        time.sleep(0.5)
        assert not future.done()
    error, _ = future.result(timeout=JOIN)
    elapsed = time.monotonic() - started
    waiter.shutdown()
    assert error is None
    assert 0.5 <= elapsed < 0.5 + SLACK


#: Finite timeouts past what GET_LOCK takes. MariaDB 10.11, measured: from about 1.8e10 s (2**64
#: nanoseconds) it answers 0 at once, a wait that "timed out" without waiting; from 2**63 s on
#: it answers NULL (warning 1411 'Incorrect timeout value'). The largest float: in milliseconds
#: (PostgreSQL's lock_timeout) it is infinite.
HUGE_TIMEOUTS = [2e10, 1e19, 1e300, sys.float_info.max, 10**30]


@pytest.mark.cells("mariadb", "postgresql+psycopg", "sqlite+pysqlite")
def test_a_huge_timeout_waits_as_long_as_it_takes(cell: Cell) -> None:
    """A huge finite ``timeout`` waits (practically) without a bound on every backend: it
    neither gives up at once nor fails; here, one waiter per timeout at once, they wait until
    the holder leaves, after 0.5 s."""
    name = unique()
    waiters = concurrent.futures.ThreadPoolExecutor(len(HUGE_TIMEOUTS))
    try:
        with holding(cell, name, scope="session"):
            started = time.monotonic()
            futures = {
                timeout: waiters.submit(
                    attempt, cell, name, raising=True, scope="session", timeout=timeout
                )
                for timeout in HUGE_TIMEOUTS
            }
            time.sleep(0.5)
            # gave up or failed at once: show how
            early = {
                timeout: future.exception() or future.result()
                for timeout, future in futures.items()
                if future.done()
            }
            assert not early, f"did not wait: {early}"
        for timeout, future in futures.items():
            error, _ = future.result(timeout=JOIN)
            assert error is None, f"timeout={timeout!r}: {error!r}"
        elapsed = time.monotonic() - started
        assert 0.5 <= elapsed < 0.5 + SLACK
    finally:
        waiters.shutdown()
    # and free, it is taken at once
    for timeout in HUGE_TIMEOUTS:
        assert attempt(cell, name, scope="session", timeout=timeout) is True


# -- release: on error, at the end of the scope, never into the pool -----------------------------


@pytest.mark.parametrize("scope", ["transaction", "session"])
def test_released_when_the_block_raises(cell: Cell, scope: str) -> None:
    name = unique()
    seen: dict[str, Any] = {}

    def fail_inside(conn: Connection) -> None:
        with named_lock(conn, name, scope=scope) as lock:
            seen["key"] = lock.key
            seen["during"] = attempt_elsewhere()
            1 / 0  # noqa: B018

    def body(conn: Connection) -> None:
        with pytest.raises(ZeroDivisionError):
            fail_inside(conn)
        conn.rollback()  # a transaction-scoped PostgreSQL lock ends with its transaction
        seen["after"] = attempt_elsewhere()

    def attempt_elsewhere() -> bool:
        with concurrent.futures.ThreadPoolExecutor(1) as other:
            got: bool = other.submit(attempt, cell, name, scope=scope).result(timeout=JOIN)
        return got

    cell.run(body)
    assert seen == {"key": seen["key"], "during": False, "after": True}
    if cell.backend in SERVER:
        assert server_holds(cell, seen["key"]) == 0


@pytest.mark.cells("postgresql", "mariadb")
@pytest.mark.parametrize("scope", ["transaction", "session"])
def test_no_lock_outlives_its_scope(cell: Cell, scope: str) -> None:
    """Checked on the server from another connection: ``pg_locks`` / ``IS_USED_LOCK``."""
    name = unique()
    seen: dict[str, Any] = {}

    def body(conn: Connection) -> None:
        with named_lock(conn, name, scope=scope) as lock:
            seen["key"] = lock.key
            seen["inside"] = server_holds(cell, lock.key)
            conn.execute(select(1))
        seen["after block"] = server_holds(cell, seen["key"])
        conn.commit()
        seen["after commit"] = server_holds(cell, seen["key"])

    cell.run(body)
    # PostgreSQL's transaction-scoped lock lasts until its transaction ends (the COMMIT after
    # the block); every other lock ends with the block.
    outlives_block = cell.backend == "postgresql" and scope == "transaction"
    assert seen["inside"] == 1
    assert seen["after block"] == (1 if outlives_block else 0)
    assert seen["after commit"] == 0


@pytest.mark.cells("postgresql", "mariadb")
def test_session_commit_inside_ends_the_lock_and_is_reported(cell: Cell) -> None:
    """A Session gives its connection back to the pool at each commit: the lock goes with it
    (released, never carried into the pool); going on in a new transaction inside the block
    raises NamedLockError at its end."""
    engine = pooled_engine(cell)
    name = unique()
    seen: dict[str, Any] = {}

    def go_on_after_commit(session: Session) -> None:
        with named_lock(session, name, scope="session") as lock:
            session.execute(select(1))
            session.commit()
            seen["after commit"] = server_holds(cell, lock.key)
            session.execute(select(1))  # a new transaction, without the lock

    def body(session: Session) -> None:
        with pytest.raises(NamedLockError, match="ended before the block did"):
            go_on_after_commit(session)
        session.rollback()
        with named_lock(session, name, scope="session") as lock:
            session.execute(select(1))
            session.commit()  # the last step: fine
        seen["last step"] = server_holds(cell, lock.key)

    cell.run_session(body, engine=engine)
    assert seen == {"after commit": 0, "last step": 0}


@pytest.mark.cells("postgresql", "mariadb")
def test_closing_the_connection_inside_the_block_releases(cell: Cell) -> None:
    engine = pooled_engine(cell)
    name = unique()

    def body(conn: Connection) -> Any:
        lock = named_lock(conn, name, scope="session")
        lock.__enter__()
        key = lock.key
        conn.close()  # back to the pool, still holding the lock: the pool's check-in frees it
        assert server_holds(cell, key) == 0
        lock.__exit__(None, None, None)
        return key

    key = cell.run(body, engine=engine)
    assert server_holds(cell, key) == 0
    assert attempt(cell, name) is True


@pytest.mark.cells("postgresql")
def test_postgresql_timeout_inside_a_transaction_keeps_it_usable(cell: Cell) -> None:
    """The lock wait that timed out is rolled back to a savepoint: the caller's transaction
    goes on and commits its work (no TransactionAborted)."""
    make_counter(cell)
    name = unique()
    with holding(cell, name):

        def body(conn: Connection) -> None:
            conn.execute(bump(0))
            with pytest.raises(LockUnavailable):  # noqa: SIM117
                with named_lock(conn, name, timeout=0.2):
                    pytest.fail("entered")
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "30s"
            conn.commit()

        cell.run(body)
    assert read_counter(cell) == 1


@pytest.mark.cells("postgresql")
def test_postgresql_transaction_scope_refuses_autocommit(cell: Cell) -> None:
    engine = cell.engine(isolation_level="AUTOCOMMIT")

    def body(conn: Connection) -> None:
        with pytest.raises(UnsupportedLockOption, match="AUTOCOMMIT"):  # noqa: SIM117
            with named_lock(conn, unique()):
                pytest.fail("entered")
        with named_lock(conn, unique(), scope="session") as lock:
            assert server_holds(cell, lock.key) == 1
        # a bounded wait too, after a statement SQLAlchemy "autobegan" (the server has no
        # transaction: lock_timeout is set in the statement, no SAVEPOINT)
        conn.exec_driver_sql("SELECT 1")
        name = unique()
        with named_lock(conn, name, scope="session", timeout=1) as lock:
            assert server_holds(cell, lock.key) == 1
        assert server_holds(cell, lock.key) == 0

    cell.run(body, engine=engine)


# -- hostile names ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_names(cell: Cell, kind: str) -> None:
    make_counter(cell)
    name = HOSTILE[kind] + unique("")
    with holding(cell, name, scope="session") as lock:
        assert attempt(cell, name, scope="session") is False
        assert attempt(cell, name[:-1], scope="session") is True  # a different name
        if cell.backend in SERVER:
            assert server_holds(cell, lock.key) == 1
    assert attempt(cell, name, scope="session") is True
    assert read_counter(cell) == 0  # the table is still there


@pytest.mark.parametrize("scope", ["transaction", "session"])
def test_a_session_holds_the_lock_on_its_connection(cell: Cell, scope: str) -> None:
    """Session / AsyncSession bound to a connection (``async with`` on async cells)."""
    name = unique()
    with holding(cell, name, session=True, scope=scope) as lock:
        assert lock.acquired
        assert attempt(cell, name, scope=scope) is False
    assert attempt(cell, name, scope=scope) is True


@pytest.mark.cells("postgresql", "mariadb")
def test_servers_let_a_connection_take_a_lock_it_holds(cell: Cell) -> None:
    """Re-entrant on the servers (PostgreSQL advisory locks stack, MySQL / MariaDB named
    locks are counted): each block takes and gives back its own."""
    name = unique()

    def body(conn: Connection) -> None:
        with named_lock(conn, name, scope="session") as outer:
            with named_lock(conn, name, scope="session", timeout=0):
                assert server_holds(cell, outer.key) == 1
            assert attempt_elsewhere() is False  # the outer block still holds it
        assert attempt_elsewhere() is True

    def attempt_elsewhere() -> bool:
        with concurrent.futures.ThreadPoolExecutor(1) as other:
            got: bool = other.submit(attempt, cell, name, scope="session").result(timeout=JOIN)
        return got

    cell.run(body)


@pytest.mark.cells("postgresql")
def test_postgresql_session_lock_is_released_when_an_error_aborted_the_transaction(
    cell: Cell,
) -> None:
    """The unlock cannot run in the aborted transaction: the connection is invalidated, which
    ends the session-level lock on the server; the block's own error propagates."""
    name = unique()
    seen: dict[str, Any] = {}

    def fail_inside(conn: Connection) -> None:
        with conn.begin(), named_lock(conn, name, scope="session") as lock:
            seen["key"] = lock.key
            conn.execute(text("SELECT 1 / 0"))

    def body(conn: Connection) -> None:
        with pytest.raises(DBAPIError, match="division by zero"):
            fail_inside(conn)
        seen["invalidated"] = conn.invalidated

    cell.run(body)
    assert seen["invalidated"] is True
    assert server_holds(cell, seen["key"]) == 0
    assert attempt(cell, name, scope="session") is True
