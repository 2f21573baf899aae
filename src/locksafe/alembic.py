"""One Alembic migration run at a time: :func:`migration_lock` for ``env.py``.

Alembic has no lock of its own (sqlalchemy/alembic#633): two processes that run
``alembic upgrade head`` at once (two replicas of a service starting, a deploy job and a
developer) both read the same version and both apply the same revisions. Taken around
``context.configure`` / ``run_migrations`` in ``env.py``, :func:`migration_lock` makes the
second run wait until the first has committed, then read the new version and find nothing to
do::

    from locksafe.alembic import migration_lock

    with connectable.connect() as connection, migration_lock(connection):
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()

The lock is a :func:`locksafe.named_lock` (PostgreSQL: a session-level advisory lock; MySQL /
MariaDB: ``GET_LOCK``; SQLite: a lock file next to the database), held on a **dedicated
connection** of the same engine, in ``AUTOCOMMIT`` and idle while the migration runs: the
migration's own COMMITs, ``op.get_context().autocommit_block()`` and PostgreSQL's
``CREATE INDEX CONCURRENTLY`` do not end it (nor wait for it). On PostgreSQL a waiting run
polls ``pg_try_advisory_lock`` instead of blocking in ``pg_advisory_lock``: a blocked waiter
holds a snapshot, and ``CREATE INDEX CONCURRENTLY`` in the holder's migration waits for every
older snapshot — the holder would wait for the waiter, which waits for the holder.

``docs/migrations.md`` has the recipes (sync and async ``env.py``), what the lock protects and
what it does not, and how to bound DDL lock waits so that a migration cannot freeze the
application. :func:`locksafe.compat.airflow.create_global_lock` is built on the same lock.
"""

from __future__ import annotations

import contextvars
import logging
import math
import numbers
import os
import random
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from locksafe import (
    CallerTransactionError,
    LockErrorKind,
    LockUnavailable,
    NamedLock,
    NamedLockError,
    TryNamedLock,
    named_lock,
    try_named_lock,
)
from locksafe._steps import Call, Sleep, Steps, run_async, run_sync
from locksafe.dialects import named_lock_support_for

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "DEFAULT_NAME",
    "DEFAULT_TIMEOUT",
    "MigrationLock",
    "MigrationLockTimeout",
    "migration_lock",
]

log = logging.getLogger(__name__)

#: How long :func:`migration_lock` waits for a migration running elsewhere, in seconds.
DEFAULT_TIMEOUT = 1800.0
#: The lock's name: one Alembic run at a time per database, whatever its version table.
DEFAULT_NAME = "alembic"

#: PostgreSQL: the first and the longest sleep between two tries of the advisory lock.
POLL_FIRST = 0.05
POLL_MAX = 0.5
#: SQLite (a lock file): the first and the longest sleep between two tries, as
#: :func:`locksafe.named_lock` polls it.
LOCAL_POLL_FIRST = 0.001
LOCAL_POLL_MAX = 0.05
#: MySQL / MariaDB: the longest single ``GET_LOCK`` wait. The server wakes a waiter the moment
#: the lock is free, but a C driver (mysqlclient, the MariaDB connector) blocked in it does not
#: see a ``KeyboardInterrupt`` until it returns: the wait is made of waits this long.
MYSQL_WAIT_CHUNK = 1.0
#: MySQL / MariaDB: the dedicated connection's ``wait_timeout`` (the largest the servers take),
#: so that a long migration does not see the server close its idle lock connection.
MYSQL_WAIT_TIMEOUT = 31536000


class MigrationLockTimeout(LockUnavailable):
    """The migration lock was not obtained in time: a migration is running elsewhere (another
    process or host holds the lock). Nothing was run; run again once it has finished, or with a
    longer ``timeout``. A :class:`~locksafe.LockUnavailable` (kind ``lock_timeout``, or
    ``lock_not_available`` for ``timeout=0``) with :attr:`lock_name`, :attr:`timeout` and
    ``elapsed`` (seconds waited).

    A run in another thread finds the lock held (in the thread that holds it, the lock is
    re-entered instead: :attr:`MigrationLock.reentered`):

    >>> import tempfile
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> from sqlalchemy import create_engine
    >>> directory = tempfile.TemporaryDirectory()
    >>> engine = create_engine(f"sqlite:///{directory.name}/app.db")
    >>> def second_run(timeout):
    ...     with engine.connect() as connection, migration_lock(connection, timeout=timeout):
    ...         return "migrated"
    >>> with engine.connect() as connection, migration_lock(connection), ThreadPoolExecutor() as pool:
    ...     pool.submit(second_run, 0).result()
    Traceback (most recent call last):
    ...
    locksafe.alembic.MigrationLockTimeout: a migration is running elsewhere: the lock 'alembic' on this database is held by another process or connection; did not wait (timeout=0). Nothing was run: run again once it has finished, or give a longer timeout
    >>> with engine.connect() as connection, migration_lock(connection), ThreadPoolExecutor() as pool:
    ...     try:
    ...         pool.submit(second_run, 0.2).result()
    ...     except MigrationLockTimeout as error:
    ...         print(error.kind.value, error.lock_name, error.timeout, error.elapsed >= 0.2)
    lock_timeout alembic 0.2 True
    >>> with ThreadPoolExecutor() as pool:  # once the first run has ended
    ...     pool.submit(second_run, 0).result()
    'migrated'
    >>> engine.dispose(); directory.cleanup()
    """  # noqa: E501

    def __init__(self, name: str, *, timeout: float, elapsed: float, holder: str) -> None:
        kind = LockErrorKind.LOCK_NOT_AVAILABLE if timeout == 0 else LockErrorKind.LOCK_TIMEOUT
        super().__init__(
            kind,
            attempts=1,
            elapsed=elapsed,
            retry_after=5.0,
            operation=f"migration lock {_short(name)}",
        )
        #: The lock's name (as given, before namespacing).
        self.lock_name = name
        #: The timeout that ran out, in seconds.
        self.timeout = timeout
        waited = (
            "did not wait (timeout=0)"
            if timeout == 0
            else f"waited {elapsed:.2f} s (timeout={timeout:g} s)"
        )
        self.args = (
            f"{holder} is running elsewhere: the lock {_short(name)} on this database is held "
            f"by another process or connection; {waited}. Nothing was run: run again once it "
            "has finished, or give a longer timeout",
        )


def _short(name: str) -> str:
    return repr(name) if len(name) <= 80 else repr(name[:77] + "...")


def check_timeout(timeout: object, option: str = "timeout") -> float | None:
    """``timeout`` in seconds as a float (``None``: no bound), or ``TypeError`` /
    ``ValueError`` naming ``option``."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{option}={timeout!r} must be a number of seconds (int or float) or None")
    seconds = float(timeout)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"{option}={timeout!r} must be a finite number of seconds ≥ 0 (0: try once), or "
            "None to wait without a bound"
        )
    return seconds


def check_name(name: object, option: str = "name") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{option}={name!r} must be a str")
    if not name:
        raise ValueError(f"{option}='' must be a non-empty str")
    return name


def _async_connection_type() -> type | None:
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    return None if module is None else module.AsyncConnection


def _is_async(bind: object) -> bool:
    kind = _async_connection_type()
    return kind is not None and isinstance(bind, kind)


# -- what this context holds (re-entrance in one thread / task) --------------------------------


@dataclass(eq=False)
class _Holding:
    key: tuple[str, str]
    held: bool = field(default=True)


#: The locks this thread (or task) holds: a run nested in a held lock's block (an ``env.py``
#: run from a migration, a database manager's migrations inside Airflow's) does not wait for
#: itself. Threads start with none; a task copies its creator's, so the flag is checked too.
_holding: contextvars.ContextVar[tuple[_Holding, ...]] = contextvars.ContextVar(
    "locksafe_migration_locks", default=()
)


def _lock_key(engine: Engine | AsyncEngine, name: str) -> tuple[str, str]:
    """Which database and lock: the same whatever the driver (``postgresql+asyncpg`` and
    ``postgresql+psycopg2`` reach the same database)."""
    url = engine.url
    backend = url.get_backend_name()
    database = url.database or ""
    if (
        backend == "sqlite"
        and database
        and database != ":memory:"
        and "mode=memory" not in (str(url.query.get("mode", "")) + database)
    ):
        database = os.path.realpath(database)
    backend = "mysql" if backend == "mariadb" else backend
    return f"{backend}://{url.host or ''}:{url.port or ''}/{database}", name


def _held_here(key: tuple[str, str]) -> bool:
    return any(entry.held and entry.key == key for entry in _holding.get())


# -- the lock ----------------------------------------------------------------------------------


class MigrationLock:
    """A lock for one migration run at a time, held for a ``with`` (``async with``) block on
    a dedicated connection: see :func:`migration_lock`, which makes it (by default named
    :data:`DEFAULT_NAME`, waiting up to :data:`DEFAULT_TIMEOUT` seconds).

    >>> import tempfile
    >>> from sqlalchemy import create_engine
    >>> directory = tempfile.TemporaryDirectory()
    >>> engine = create_engine(f"sqlite:///{directory.name}/app.db")
    >>> with engine.connect() as connection, migration_lock(connection) as lock:
    ...     print(lock, lock.name == DEFAULT_NAME, lock.timeout == DEFAULT_TIMEOUT)
    ...     with engine.connect() as other, migration_lock(other) as inner:  # env.py run again
    ...         print(inner, inner.reentered)
    <MigrationLock 'alembic' acquired> True True
    <MigrationLock 'alembic' acquired> True
    >>> lock, lock.reentered
    (<MigrationLock 'alembic' not acquired>, False)
    >>> engine.dispose(); directory.cleanup()
    """

    def __init__(
        self,
        source: Any,
        *,
        name: str,
        timeout: float | None,
        holder: str = "a migration",
        session: Any = None,
    ) -> None:
        #: The caller's ``Connection`` / ``AsyncConnection``, or an ``Engine`` (Airflow's).
        self._source = source
        self._session = session
        self.name = name
        self.timeout = timeout
        self._holder = holder
        #: Whether the block holds the lock (also when an enclosing block of this thread holds
        #: it: then :attr:`reentered`).
        self.acquired = False
        #: The block runs inside a block of the same thread / task holding the same lock.
        self.reentered = False
        #: What is locked, once held (as the ``key`` of a :class:`locksafe.NamedLock`:
        #: PostgreSQL's int64 advisory key, MySQL's lock name, SQLite's lock file and name);
        #: ``None`` in a re-entered block.
        self.key: Hashable | None = None
        self._entered = False
        self._started = 0.0
        self._dedicated: Connection | None = None
        self._discard = False
        self._lock: NamedLock | TryNamedLock | None = None
        self._holding: _Holding | None = None
        self._token: contextvars.Token[tuple[_Holding, ...]] | None = None

    def __repr__(self) -> str:
        state = "acquired" if self.acquired else "not acquired"
        return f"<{type(self).__name__} {_short(self.name)} {state}>"

    # -- shared steps ------------------------------------------------------------------------

    def _sync_engine(self) -> Engine:
        """The engine (an ``AsyncConnection``'s: its sync side, on which the lock's own
        connection is made inside the ``run_sync`` of a step)."""
        source = self._source
        engine = source if isinstance(source, Engine) else source.engine
        if not isinstance(engine, Engine):  # an AsyncEngine
            engine = engine.sync_engine
        assert isinstance(engine, Engine)
        return engine

    def _start(self, engine: Engine) -> bool:
        """Checks before taking the lock; False when this thread / task holds it already."""
        if self._entered:
            raise RuntimeError(f"{self!r} was already entered: make a new lock for each block")
        self._entered = True
        self._started = time.monotonic()
        key = _lock_key(engine, self.name)
        if _held_here(key):
            self.acquired = self.reentered = True
            return False
        source = self._source
        if (isinstance(source, Connection) or _is_async(source)) and source.in_transaction():
            raise CallerTransactionError(
                f"migration_lock({_short(self.name)}) was given a connection already in a "
                "transaction: the lock would end before that transaction commits, and the "
                "next migration run could start without seeing this one's work. Take the "
                "lock before the transaction begins (`with engine.connect() as connection, "
                "migration_lock(connection):` then `with connection.begin():` or "
                "`context.begin_transaction()`)",
                operation="migration_lock",
                reason="a transaction in progress",
            )
        self._holding = _Holding(key)
        return True

    def _held(self) -> None:
        assert self._holding is not None
        assert self._lock is not None
        self.acquired = True
        self.key = self._lock.key
        self._token = _holding.set((*_holding.get(), self._holding))

    def _let_go(self) -> None:
        self.acquired = False
        entry, token = self._holding, self._token
        self._holding = self._token = None
        if entry is not None:
            entry.held = False
        if token is not None:
            try:
                _holding.reset(token)
            except ValueError:  # left in another context than entered: drop the entry only
                _holding.set(tuple(e for e in _holding.get() if e is not entry))

    def _timed_out(self) -> MigrationLockTimeout:
        assert self.timeout is not None
        return MigrationLockTimeout(
            self.name,
            timeout=self.timeout,
            elapsed=time.monotonic() - self._started,
            holder=self._holder,
        )

    def _lost(self, error: Exception) -> NamedLockError:
        """The error for a release that failed after a block that did not raise (a block that
        raised keeps its own error: the release then only invalidates the connection)."""
        return NamedLockError(
            f"the lock {_short(self.name)} could not be given back: its connection failed "
            f"during the run ({type(error).__name__}: {error}), which ended the lock on the "
            "server, so another run may have started before this one ended: check the "
            "migration state"
        )

    def _time_left(self) -> float | None:
        """Seconds left to wait (``inf`` without a bound), or None when the time is up."""
        if self.timeout is None:
            return math.inf
        left = self._started + self.timeout - time.monotonic()
        return left if left > 0 else None

    def _next_delay(self, step: float) -> float | None:
        """The sleep before the next try of a polled lock, or None when the time is up."""
        delay = step * random.uniform(0.5, 1.0)
        if self.timeout is None:
            return delay
        left = self._started + self.timeout - time.monotonic()
        if left <= 0:
            return None
        return min(delay, left)

    @staticmethod
    def _keep_alive_sql(dialect: Any) -> list[str]:
        """Session settings of the dedicated connection: the server must not close it for being
        idle while the migration runs (that would end the lock in the middle of the run)."""
        if dialect.name == "postgresql":
            version = getattr(dialect, "server_version_info", None) or (0,)
            return ["SET idle_session_timeout = 0"] if version >= (14,) else []
        if dialect.name in ("mysql", "mariadb"):
            return [f"SET SESSION wait_timeout = {MYSQL_WAIT_TIMEOUT}"]
        return []

    # -- the steps on the database (each one a Call: a sync Connection, in ``run_sync`` for an
    # -- AsyncConnection, so that the sync side of an async engine does its I/O on the loop) --

    def _open(self, bind: Connection | Engine, engine: Engine) -> Connection:
        """The connection to lock on: a dedicated one (PostgreSQL, MySQL), or on SQLite, whose
        lock is a file the process locks, the caller's (an in-memory database has a single
        connection). ``bind``: the caller's connection (its sync side), or Airflow's engine."""
        if engine.dialect.name == "sqlite":
            if isinstance(bind, Connection):
                return bind
            if isinstance(engine.pool, StaticPool) and self._session is not None:
                # One DB-API connection for everyone: a second checkout's close would roll
                # back the session's work.
                connection: Connection = self._session.connection()
                return connection
            self._dedicated = engine.connect()
            return self._dedicated
        self._dedicated = dedicated = engine.connect()
        self._discard = True
        dedicated.execution_options(isolation_level="AUTOCOMMIT")
        for sql in self._keep_alive_sql(engine.dialect):
            dedicated.exec_driver_sql(sql)
        return dedicated

    def _drop(self, bind: object) -> None:
        dedicated, self._dedicated = self._dedicated, None
        if dedicated is None:
            return
        try:
            if self._discard:  # never back into the pool: closed, with what it held
                dedicated.invalidate()
            dedicated.close()
        except Exception:  # pragma: no cover - closing a connection that is gone
            log.warning("closing the migration lock's connection failed", exc_info=True)

    # -- entering and leaving: one algorithm, run by a sync or an async driver ------------------

    def _enter_steps(self) -> Steps[MigrationLock]:
        engine = self._sync_engine()
        if not self._start(engine):
            return self
        try:
            connection = yield Call(self._open, engine)
            self._lock = yield from self._take_steps(connection)
        except BaseException:
            # KeyboardInterrupt or cancellation in a wait: the server lets go with the socket
            yield Call(self._drop)
            raise
        self._held()
        return self

    def _take_steps(self, connection: Connection) -> Steps[NamedLock | TryNamedLock]:
        """One try; then (unless ``timeout=0``) a line in the log, and the wait: polled on
        PostgreSQL (a waiter blocked in the server would hold a snapshot) and SQLite (a lock
        file), in the server's waits of at most ``MYSQL_WAIT_CHUNK`` on MySQL / MariaDB."""
        first = try_named_lock(connection, self.name, timeout=0, scope="session")
        if (yield Call(_enter, first)):
            return first
        if self.timeout == 0:
            raise self._timed_out()
        holder = yield Call(_who_holds, connection, first.key)
        log.info(
            "waiting for the migration lock %s (%s), held by %s: %s is running elsewhere; %s",
            _short(self.name),
            _describe(connection, first.key),
            holder or "another process or connection",
            self._holder,
            "no time limit" if self.timeout is None else f"timeout={self.timeout:g} s",
        )
        dialect = connection.dialect.name
        if dialect in ("mysql", "mariadb"):
            lock: NamedLock | TryNamedLock = yield from self._wait_on_server(connection)
        elif dialect == "postgresql":
            lock = yield from self._poll(connection, POLL_FIRST, POLL_MAX)
        else:
            lock = yield from self._poll(connection, LOCAL_POLL_FIRST, LOCAL_POLL_MAX)
        log.info(
            "got the migration lock %s after waiting %.2f s",
            _short(self.name),
            time.monotonic() - self._started,
        )
        return lock

    def _poll(self, connection: Connection, first: float, longest: float) -> Steps[TryNamedLock]:
        step = first
        while True:
            delay = self._next_delay(step)
            if delay is None:
                raise self._timed_out()
            yield Sleep(delay)
            step = min(step * 2, longest)
            attempt = try_named_lock(connection, self.name, timeout=0, scope="session")
            if (yield Call(_enter, attempt)):
                return attempt

    def _wait_on_server(self, connection: Connection) -> Steps[NamedLock]:
        while True:
            left = self._time_left()
            wait = 0 if left is None else min(left, MYSQL_WAIT_CHUNK)
            lock = named_lock(connection, self.name, timeout=wait, scope="session")
            try:
                yield Call(_enter, lock)
            except LockUnavailable:
                if self._time_left() is None:
                    # not the chunk's "retry after 1s": this error says what to do
                    raise self._timed_out() from None
                continue
            return lock

    def _exit_steps(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Steps[None]:
        if self.reentered or not self.acquired:
            self.acquired = False
            return
        lock, self._lock = self._lock, None
        try:
            try:
                if lock is not None:
                    yield Call(_leave, lock, exc_type, exc, tb)
            except NamedLockError:  # locksafe saw the lock gone: it says so
                raise
            except Exception as error:
                raise self._lost(error) from error
        except BaseException:
            self._let_go()
            yield Call(self._drop)
            raise
        self._let_go()
        yield Call(self._drop)

    # -- the two drivers ---------------------------------------------------------------------

    def __enter__(self) -> MigrationLock:
        if _is_async(self._source):
            raise TypeError(
                "migration_lock() was given an AsyncConnection: use `async with`, or `with` on "
                "the sync connection inside `run_sync`"
            )
        return run_sync(self._enter_steps(), self._source)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run_sync(self._exit_steps(exc_type, exc, tb), self._source)

    async def __aenter__(self) -> MigrationLock:
        if not _is_async(self._source):
            raise TypeError(
                f"{type(self._source).__name__} is not async: use `with migration_lock(...)`"
            )
        return await run_async(self._enter_steps(), self._source)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await run_async(self._exit_steps(exc_type, exc, tb), self._source)


def _enter(bind: object, lock: NamedLock | TryNamedLock) -> object:
    """Enter ``lock`` (made on a sync connection): whether it was obtained."""
    return lock.__enter__()


def _leave(
    bind: object,
    lock: NamedLock | TryNamedLock,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    lock.__exit__(exc_type, exc, tb)


def _describe(connection: Connection, key: Hashable) -> str:
    """What is locked: the advisory key, the ``GET_LOCK`` name, the lock file."""
    support = named_lock_support_for(connection.dialect.name)
    return repr(key) if support is None else support.describe(key)


#: PostgreSQL: the session that holds an advisory lock (``pg_locks`` shows the int64 key as
#: ``classid`` (high half) and ``objid`` (low half), ``objsubid`` 1).
_PG_HOLDER = text(
    "SELECT a.pid, a.usename, a.application_name, CAST(a.client_addr AS TEXT)"
    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND CAST(l.classid AS BIGINT) = :hi AND CAST(l.objid AS BIGINT) = :lo"
)


def _who_holds(bind: object, connection: Connection, key: Hashable) -> str | None:
    """Who holds the lock, as far as the server tells (PostgreSQL: ``pg_locks`` and
    ``pg_stat_activity``; MySQL / MariaDB: ``IS_USED_LOCK`` and the process list); None when it
    cannot (a lock file does not say; a privilege is missing; it was let go meanwhile)."""
    dialect = connection.dialect.name
    try:
        if dialect == "postgresql" and isinstance(key, int):
            unsigned = key & 0xFFFFFFFFFFFFFFFF
            params = {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF}
            row = connection.execute(_PG_HOLDER, params).first()
            if row is None:
                return None
            pid, user, application, client = row
            details = [
                f"user {user!r}" if user else "",
                f"application {application!r}" if application else "",
                f"from {client}" if client else "",
            ]
            return _with_details(f"PostgreSQL backend pid {pid}", details)
        if dialect in ("mysql", "mariadb"):
            owner = connection.execute(text("SELECT IS_USED_LOCK(:key)"), {"key": key}).scalar()
            if owner is None:
                return None
            row = connection.execute(
                text("SELECT USER, HOST FROM information_schema.PROCESSLIST WHERE ID = :id"),
                {"id": owner},
            ).first()
            details = [] if row is None else [f"user {row[0]!r}", f"from {row[1]}"]
            return _with_details(f"connection id {owner}", details)
    except Exception:  # who holds it is only for the log: never a reason to fail
        log.debug("could not tell who holds the migration lock", exc_info=True)
    return None


def _with_details(what: str, details: list[str]) -> str:
    shown = [detail for detail in details if detail]
    return f"{what} ({', '.join(shown)})" if shown else what


def migration_lock(
    connection: Any,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    name: str = DEFAULT_NAME,
) -> MigrationLock:
    """One migration run at a time on this database, across processes and hosts: a lock for
    the ``with`` block of ``env.py`` that configures Alembic and runs the migrations
    (``async with`` for an ``AsyncConnection``)::

        with connectable.connect() as connection, migration_lock(connection):
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()

    A second run waits for the first to finish, then finds the version table at head and has
    nothing to do.

    - ``connection``: the ``Connection`` the migrations run on (``AsyncConnection`` with
      ``async with``), not in a transaction yet (:class:`~locksafe.CallerTransactionError`
      otherwise: the lock would end before that transaction's COMMIT). The lock is held on a
      new connection of the same engine (PostgreSQL, MySQL / MariaDB), in ``AUTOCOMMIT``,
      idle, closed at the end — never put back into the pool; on SQLite, where it is a file
      the process locks, no connection is opened.
    - ``timeout``: seconds to wait for a run elsewhere (floats allowed; default 30 minutes);
      ``None`` waits without a bound, ``0`` tries once. When it runs out,
      :class:`MigrationLockTimeout` (a :class:`~locksafe.LockUnavailable`) says a migration is
      running elsewhere and how long this one waited; nothing was run.
    - ``name``: the lock's name (namespaced per database by :func:`locksafe.named_lock`);
      the default serialises every Alembic environment of the database.

    The lock is given back when the block ends, raising or not (``KeyboardInterrupt``
    included; a process that dies lets go with its connection). Inside the block of a lock of
    the same name on the same database, in the same thread (or an ``asyncio`` task started in
    that block), the lock is already held and is not taken again
    (:attr:`MigrationLock.reentered`).

    >>> migration_lock(None, timeout=-1)
    Traceback (most recent call last):
    ...
    ValueError: timeout=-1 must be a finite number of seconds ≥ 0 (0: try once), or None to wait without a bound
    """  # noqa: E501
    seconds = check_timeout(timeout)
    check_name(name)
    if not (isinstance(connection, Connection) or _is_async(connection)):
        hint = ""
        if hasattr(connection, "connect") and hasattr(connection, "dialect"):
            hint = " (an Engine is not one: `with engine.connect() as connection:`)"
        raise TypeError(
            f"connection={connection!r} must be a Connection (`with`) or an AsyncConnection "
            f"(`async with`){hint}"
        )
    return MigrationLock(connection, name=name, timeout=seconds)
