"""Real lock contention on demand, for your own test suite.

Mocked lock errors prove little: every driver reports them differently, and the code under test
must see the real thing. :class:`OtherConnection` is a second connection to the same database,
running in its own thread, that a test drives step by step — it can hold a row lock, a table
lock or SQLite's write lock while the code under test runs, or wait for a lock itself to build a
deadlock. Every wait is bounded: a holder gives up its locks after ``hold_timeout`` seconds even
if the test forgets it, and its own lock waits time out after ``lock_timeout`` seconds.

>>> import tempfile
>>> from sqlalchemy import create_engine
>>> from locksafe import classify
>>> path = f"{tempfile.mkdtemp()}/app.db"
>>> engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
>>> with hold_write_lock(engine), engine.connect() as conn:
...     try:
...         conn.exec_driver_sql("CREATE TABLE t (id INTEGER)")
...     except Exception as exc:
...         print(classify(exc))
database_busy

With PostgreSQL or MySQL, hold a row lock and watch ``nowait`` fail for real::

    with hold_row_lock(engine, select(Job).where(Job.id == 1)):
        with Session(engine) as session, pytest.raises(DBAPIError) as info:
            session.execute(with_row_locks(select(Job).where(Job.id == 1), session, nowait=True))
        assert classify(info.value) is LockErrorKind.LOCK_NOT_AVAILABLE
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Table, create_engine, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.base import Executable

from locksafe.dialects import support_for

if TYPE_CHECKING:  # imported when used: the base install has no greenlet
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "OtherConnection",
    "hold_row_lock",
    "hold_table_lock",
    "hold_write_lock",
]

T = TypeVar("T")

_STOP = object()


def _url_of(bind: Engine | AsyncEngine | URL | str) -> tuple[URL, bool]:
    if isinstance(bind, (URL, str)):
        url = make_url(bind)
        return url, bool(getattr(url.get_dialect(), "is_async", False))
    if isinstance(bind, Engine):
        return bind.url, False
    # An AsyncEngine, told without importing sqlalchemy.ext.asyncio (it needs greenlet).
    url = bind.url
    return url, bool(getattr(url.get_dialect(), "is_async", False))


class OtherConnection:
    """A second connection in its own thread, with one open transaction, driven by the test.

    ``bind`` is an Engine, AsyncEngine or URL of the database; the connection uses the same
    driver (its own engine, no pool). Use it as a context manager: on exit the transaction is
    rolled back and the connection closed.

    - :meth:`execute` runs a statement in the transaction and waits for it (at most
      ``timeout`` seconds), returning the rows of a SELECT;
    - :meth:`submit` starts a statement and returns at once with a
      :class:`concurrent.futures.Future` — for a statement that will block on a lock;
    - :meth:`commit` / :meth:`rollback` end the transaction (a new one begins with the next
      statement).

    ``lock_timeout`` bounds this connection's own lock waits (the dialect's lock-wait timeout,
    or SQLite's busy timeout); ``hold_timeout`` bounds how long it keeps its transaction open:
    after that it rolls back by itself, so a test can never hang on a forgotten lock.

    >>> import os, tempfile
    >>> from sqlalchemy import column, create_engine, select, table
    >>> from locksafe import classify, with_row_locks
    >>> tmp = tempfile.TemporaryDirectory()
    >>> url = f"sqlite:///{os.path.join(tmp.name, 'app.db')}"
    >>> engine = create_engine(url, connect_args={"timeout": 0.1})  # busy after 0.1 s
    >>> with engine.begin() as conn:
    ...     _ = conn.exec_driver_sql("CREATE TABLE job (id INTEGER PRIMARY KEY)")
    ...     _ = conn.exec_driver_sql("INSERT INTO job VALUES (1)")
    >>> job = table("job", column("id"))
    >>> def count() -> int:
    ...     with engine.connect() as conn:
    ...         return conn.exec_driver_sql("SELECT count(*) FROM job").scalar_one()
    >>> with OtherConnection(engine) as other:
    ...     other.execute("INSERT INTO job VALUES (2)")
    ...     print("before its commit:", count())
    ...     other.commit()
    ...     print("after:", count())
    before its commit: 1
    after: 2
    >>> engine.dispose(); tmp.cleanup()
    """

    def __init__(
        self,
        bind: Engine | AsyncEngine | URL | str,
        *,
        lock_timeout: float = 10.0,
        hold_timeout: float = 60.0,
        timeout: float = 30.0,
        setup: Sequence[str] = (),
    ) -> None:
        self.url, self.is_async = _url_of(bind)
        self.lock_timeout = lock_timeout
        self.hold_timeout = hold_timeout
        self.timeout = timeout
        self.setup = tuple(setup)
        self._commands: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        support = support_for(self.url.get_backend_name())
        self._support = support

    # -- public API ----------------------------------------------------------------------------

    def __enter__(self) -> OtherConnection:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Connect (in the thread) and wait until the connection is ready."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._main, name=f"locksafe-other-{self.url.drivername}", daemon=True
        )
        self._thread.start()
        self._ready.result(timeout=self.timeout)

    def submit(
        self, statement: str | Executable | Callable[[Connection], T], params: Any = None
    ) -> concurrent.futures.Future[Any]:
        """Start ``statement`` (SQL text, a Core statement, or a function of the sync-style
        :class:`~sqlalchemy.engine.Connection`) and return its future at once."""
        if self._thread is None:
            self.start()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._commands.put((statement, params, future))
        return future

    def execute(
        self,
        statement: str | Executable | Callable[[Connection], T],
        params: Any = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run ``statement`` in this connection's transaction and return its result: a list of
        rows for a statement that returns rows, else ``None`` (or the function's value)."""
        return self.submit(statement, params).result(timeout=timeout or self.timeout)

    def commit(self) -> None:
        """Commit the open transaction."""
        self.execute(lambda conn: conn.commit())

    def rollback(self) -> None:
        """Roll back the open transaction, releasing every lock it holds."""
        self.execute(lambda conn: conn.rollback())

    def close(self) -> None:
        """Roll back, close the connection and stop the thread (bounded by ``timeout``)."""
        thread = self._thread
        if thread is None:
            return
        self._commands.put(_STOP)
        thread.join(self.timeout + self.lock_timeout)
        self._thread = None

    # -- the thread ----------------------------------------------------------------------------

    def _run_step(self, conn: Connection, *, statement: Any, params: Any) -> Any:
        if callable(statement) and not isinstance(statement, Executable):
            return statement(conn)
        if isinstance(statement, str):
            statement = text(statement)
        result = conn.execute(statement, params)
        if result.returns_rows:
            return list(result)
        return None

    def _prepare(self, conn: Connection) -> None:
        sql: list[str] = []
        if self._support is not None and self._support.lock_timeout_sql is not None:
            sql.extend(self._support.lock_timeout_sql(self.lock_timeout))
        sql.extend(self.setup)
        for statement in sql:
            conn.exec_driver_sql(statement)
        conn.commit()

    def _serve(self, call: Callable[[Callable[[Connection], Any]], Any]) -> None:
        """The command loop; ``call`` runs a function with the sync-style Connection."""
        call(self._prepare)
        self._ready.set_result(None)
        deadline = time.monotonic() + self.hold_timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    command = self._commands.get(timeout=max(remaining, 0.0))
                except queue.Empty:
                    break  # held too long: give the locks up
                if command is _STOP:
                    break
                statement, params, future = command
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    step = functools.partial(self._run_step, statement=statement, params=params)
                    value = call(step)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(value)
        finally:
            with contextlib.suppress(Exception):
                call(lambda conn: conn.rollback())
            while True:  # fail whatever was still queued
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command is not _STOP:
                    command[2].set_exception(RuntimeError("the other connection was closed"))

    def _main(self) -> None:
        try:
            if self.is_async:
                self._main_async()
            else:
                self._main_sync()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)

    def _main_sync(self) -> None:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                self._serve(lambda fn: fn(conn))
        finally:
            engine.dispose()

    def _main_async(self) -> None:
        # The thread owns an event loop that runs only while a step runs; between steps it
        # blocks on the command queue like the sync variant.
        loop = asyncio.new_event_loop()
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(self.url, poolclass=NullPool)
        try:
            aconn = loop.run_until_complete(engine.connect().start())
            try:
                self._serve(lambda fn: loop.run_until_complete(aconn.run_sync(fn)))
            finally:
                loop.run_until_complete(aconn.close())
        finally:
            loop.run_until_complete(engine.dispose())
            loop.close()


@contextlib.contextmanager
def hold_row_lock(
    bind: Engine | AsyncEngine | URL | str,
    statement: Executable,
    *,
    read: bool = False,
    hold_timeout: float = 60.0,
    lock_timeout: float = 10.0,
) -> Iterator[OtherConnection]:
    """Hold row locks on the rows ``statement`` (a ``select()``) returns, from another
    connection, until the block ends. On SQLite this holds the database write lock.

    >>> import os, tempfile
    >>> from sqlalchemy import column, create_engine, select, table
    >>> from locksafe import classify, with_row_locks
    >>> tmp = tempfile.TemporaryDirectory()
    >>> url = f"sqlite:///{os.path.join(tmp.name, 'app.db')}"
    >>> engine = create_engine(url, connect_args={"timeout": 0.1})  # busy after 0.1 s
    >>> with engine.begin() as conn:
    ...     _ = conn.exec_driver_sql("CREATE TABLE job (id INTEGER PRIMARY KEY)")
    ...     _ = conn.exec_driver_sql("INSERT INTO job VALUES (1)")
    >>> job = table("job", column("id"))
    >>> with hold_row_lock(engine, select(job).where(job.c.id == 1)), engine.connect() as conn:
    ...     try:
    ...         conn.execute(with_row_locks(select(job), conn, nowait=True)).all()
    ...     except Exception as error:
    ...         print(classify(error))  # lock_not_available on PostgreSQL and MySQL
    database_busy
    >>> engine.dispose(); tmp.cleanup()
    """
    from locksafe.rowlocks import with_row_locks

    other = OtherConnection(bind, hold_timeout=hold_timeout, lock_timeout=lock_timeout)
    with other:
        locked = with_row_locks(statement, read=read, on_unsupported="degrade")  # type: ignore[type-var]
        other.execute(locked)
        yield other


@contextlib.contextmanager
def hold_table_lock(
    bind: Engine | AsyncEngine | URL | str,
    table: Table | str,
    *,
    hold_timeout: float = 60.0,
    lock_timeout: float = 10.0,
) -> Iterator[OtherConnection]:
    """Lock a whole table from another connection until the block ends (PostgreSQL: ``LOCK
    TABLE ... ACCESS EXCLUSIVE``; MySQL/MariaDB: every row and gap; SQLite: the database
    write lock).

    >>> import os, tempfile
    >>> from sqlalchemy import column, create_engine, select, table
    >>> from locksafe import classify, with_row_locks
    >>> tmp = tempfile.TemporaryDirectory()
    >>> url = f"sqlite:///{os.path.join(tmp.name, 'app.db')}"
    >>> engine = create_engine(url, connect_args={"timeout": 0.1})  # busy after 0.1 s
    >>> with engine.begin() as conn:
    ...     _ = conn.exec_driver_sql("CREATE TABLE job (id INTEGER PRIMARY KEY)")
    ...     _ = conn.exec_driver_sql("INSERT INTO job VALUES (1)")
    >>> job = table("job", column("id"))
    >>> with hold_table_lock(engine, "job"), engine.connect() as conn:
    ...     try:
    ...         conn.exec_driver_sql("INSERT INTO job VALUES (2)")
    ...     except Exception as error:
    ...         print(classify(error))
    database_busy
    >>> engine.dispose(); tmp.cleanup()
    """
    other = OtherConnection(bind, hold_timeout=hold_timeout, lock_timeout=lock_timeout)
    support = other._support
    if support is None or support.lock_table_sql is None:
        raise NotImplementedError(f"no table lock known for {other.url.get_backend_name()!r}")
    lock_sql = support.lock_table_sql
    with other:

        def lock(conn: Connection) -> None:
            name = table if isinstance(table, str) else table.name
            schema = None if isinstance(table, str) else table.schema
            quoted = conn.dialect.identifier_preparer.quote(name)
            if schema:
                quoted = f"{conn.dialect.identifier_preparer.quote_schema(schema)}.{quoted}"
            for sql in lock_sql(quoted):
                conn.exec_driver_sql(sql)

        other.execute(lock)
        yield other


@contextlib.contextmanager
def hold_write_lock(
    bind: Engine | AsyncEngine | URL | str,
    *,
    hold_timeout: float = 60.0,
) -> Iterator[OtherConnection]:
    """SQLite: hold the database write lock (``BEGIN IMMEDIATE``) from another connection until
    the block ends; writers and locking readers then see SQLITE_BUSY after their busy timeout.

    >>> import os, tempfile
    >>> from sqlalchemy import column, create_engine, select, table
    >>> from locksafe import classify, with_row_locks
    >>> tmp = tempfile.TemporaryDirectory()
    >>> url = f"sqlite:///{os.path.join(tmp.name, 'app.db')}"
    >>> engine = create_engine(url, connect_args={"timeout": 0.1})  # busy after 0.1 s
    >>> with engine.begin() as conn:
    ...     _ = conn.exec_driver_sql("CREATE TABLE job (id INTEGER PRIMARY KEY)")
    ...     _ = conn.exec_driver_sql("INSERT INTO job VALUES (1)")
    >>> job = table("job", column("id"))
    >>> with hold_write_lock(engine), engine.connect() as conn:
    ...     conn.execute(with_row_locks(select(job), conn, skip_locked=True)).all()
    []
    >>> engine.dispose(); tmp.cleanup()
    """
    other = OtherConnection(bind, hold_timeout=hold_timeout)
    if other.url.get_backend_name() != "sqlite":
        raise ValueError("hold_write_lock() is for SQLite; use hold_table_lock() elsewhere")
    with other:

        def begin_immediate(conn: Connection) -> None:
            conn.rollback()
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            cursor = dbapi.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE")
            finally:
                cursor.close()

        other.execute(begin_immediate)
        yield other
