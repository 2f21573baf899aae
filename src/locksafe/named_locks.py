"""Named (advisory) locks that exclude on every database: :func:`named_lock`,
:func:`try_named_lock`.

A named lock protects work that has no row to lock: one scheduler's critical section, one
migration at a time, one job per key. The options are checked when the lock is made (a wrong
type or value is a ``TypeError`` / ``ValueError`` naming the option); the lock is taken when the
block is entered and given back when it ends, raising or not.

This module is the generic part. What a database does is in its dialect module, as a
:class:`NamedLockSupport` named ``NAMED_LOCKS`` (PostgreSQL: advisory locks; MySQL / MariaDB:
``GET_LOCK``; SQLite: a lock file next to the database); this module finds it through
:data:`locksafe.dialects.MODULES` and never branches on a dialect's name.

Server-side statements run on the DB-API connection of the bind, with the name (or its key)
as a bound parameter, not through SQLAlchemy's ``execute``: taking a lock is not work of the
caller's transaction (a lock that times out inside a PostgreSQL transaction is rolled back to
a savepoint, and is not a lock error of that transaction for
:class:`~locksafe.TransactionAborted`), and a lock held by the connection itself (MySQL, and
PostgreSQL's ``scope="session"``) is released when the connection goes back to the pool if the
block has not released it by then: a connection never carries a lock into the pool.
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import sys
import time
import weakref
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from locksafe._steps import Call, Sleep, Steps, run_async, run_sync
from locksafe.dialects import named_lock_support_for as support_for
from locksafe.dialects.base import NamedLockSupport, autocommit, end_own_transaction
from locksafe.kinds import LockErrorKind, LockUnavailable, NamedLockError

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = [
    "NamedLock",
    "NamedLockError",
    "TryNamedLock",
    "named_lock",
    "try_named_lock",
]

log = logging.getLogger(__name__)

Scope = Literal["transaction", "session"]
SCOPES: tuple[str, ...] = ("transaction", "session")

#: The lock errors that mean "not obtained in time" (LockUnavailable), not a failure.
_NOT_OBTAINED = frozenset(
    {LockErrorKind.LOCK_TIMEOUT, LockErrorKind.LOCK_NOT_AVAILABLE, LockErrorKind.DEADLOCK}
)

#: ``connection_record.info`` key: the named locks the DB-API connection holds itself.
_HELD = "locksafe.named_locks.held"

#: The longest wait handed to a server (seconds, about 31.7 years): a finite timeout past it is
#: as good as none (the servers bound it further: MySQL / MariaDB a year, PostgreSQL 24.8 days),
#: and a dialect that scales it (PostgreSQL: milliseconds) then cannot overflow.
_LONGEST_SERVER_WAIT = 1e9


# -- option checks ---------------------------------------------------------------------------


def _check_options(
    name: object, timeout: object, shared: object, scope: object
) -> tuple[float | None, str]:
    """The timeout in seconds and the scope as a plain str (a str subclass's own ``==`` decides
    nothing: what it holds does)."""
    if not isinstance(name, str):
        raise TypeError(f"name={name!r} must be a str")
    if not name:
        raise ValueError("name='' must be a non-empty str")
    seconds: float | None = None
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
            raise TypeError(
                f"timeout={timeout!r} must be a number of seconds (int or float) or None"
            )
        try:
            seconds = float(timeout)
        except OverflowError:  # an int past float's range
            seconds = math.inf
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(
                f"timeout={timeout!r} must be a finite number of seconds ≥ 0 (0: try once), "
                "or None to wait without a bound"
            )
    if not isinstance(shared, bool):
        raise TypeError(f"shared={shared!r} must be a bool")
    if not isinstance(scope, str):
        raise TypeError(f"scope={scope!r} must be 'transaction' or 'session'")
    scope = str.__str__(scope)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} must be 'transaction' or 'session'")
    return seconds, scope


def _async_types() -> tuple[type, type] | None:
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    if module is None:
        return None
    return module.AsyncConnection, module.AsyncSession


def _is_async_bind(bind: object) -> bool:
    types = _async_types()
    return types is not None and isinstance(bind, types)


def _check_bind(bind: object) -> None:
    if isinstance(bind, (Connection, Session)) or _is_async_bind(bind):
        return
    hint = ""
    if hasattr(bind, "connect") and hasattr(bind, "dialect"):
        hint = " (an Engine is not one: `with engine.connect() as conn:` and pass conn)"
    raise TypeError(
        f"bind={bind!r} must be a Connection or a Session (AsyncConnection / AsyncSession "
        f"for `async with`){hint}"
    )


def _in_transaction(bind: Connection | Session) -> bool:
    if isinstance(bind, Connection) and bind.closed:
        return False
    return bind.in_transaction()


def _short(name: str) -> str:
    return repr(name) if len(name) <= 80 else repr(name[:77] + "...")


# -- the lock ----------------------------------------------------------------------------------


class _Held:
    """A lock the DB-API connection holds itself, until released (registered in its pool
    record's ``info``, so that the pool's check-in releases it if the block has not)."""

    __slots__ = ("dialect", "key", "released_at_checkin", "scope", "shared", "support")

    def __init__(
        self, support: NamedLockSupport, dialect: Dialect, key: Hashable, shared: bool, scope: str
    ) -> None:
        self.support = support
        self.dialect = dialect
        self.key = key
        self.shared = shared
        self.scope = scope
        self.released_at_checkin = False


_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _on_checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    """Pool check-in: give back the named locks the connection still holds."""
    held: dict[int, _Held] | None = record.info.pop(_HELD, None)
    if not held or dbapi_connection is None:
        return
    try:
        for entry in held.values():
            assert entry.support.release is not None
            entry.support.release(
                entry.dialect, dbapi_connection, entry.key, entry.shared, entry.scope
            )
            entry.released_at_checkin = True
        dbapi_connection.rollback()  # the transaction the driver began for the release
    except Exception:
        # The lock must not ride into the pool: closing the connection ends it on the server.
        log.warning("named lock release at check-in failed; invalidating", exc_info=True)
        for entry in held.values():
            entry.released_at_checkin = True
        try:
            record.invalidate()
        except Exception:  # pragma: no cover - nothing more can be done here
            log.warning("invalidating after a failed named lock release failed", exc_info=True)


def _watch_pool(pool: Pool) -> None:
    if pool not in _pools:
        event.listen(pool, "checkin", _on_checkin)
        _pools.add(pool)


class _LockBase:
    """The shared machinery of :class:`NamedLock` and :class:`TryNamedLock` (they differ in
    what entering gives)."""

    _raises = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit_sync(exc is not None)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._exit_async(exc is not None)

    def __init__(
        self,
        bind: Any,
        name: str,
        *,
        timeout: float | None,
        shared: bool,
        scope: str,
    ) -> None:
        self.timeout, self.scope = _check_options(name, timeout, shared, scope)
        _check_bind(bind)
        self.bind = bind
        self.name = name
        self.shared = shared
        #: Whether the block holds the lock (``True`` inside the block after entering).
        self.acquired = False
        #: What is locked on the server (PostgreSQL: the int64 key; MySQL: the lock name;
        #: SQLite: the lock file), known once the block is entered.
        self.key: Hashable | None = None
        self._support: NamedLockSupport | None = None
        self._connection: Connection | None = None
        self._record_info: dict[Any, Any] | None = None
        self._held: _Held | None = None
        self._handle: object | None = None
        self._transaction: object | None = None
        self._entered = False
        self._started = 0.0

    def __repr__(self) -> str:
        state = "acquired" if self.acquired else "not acquired"
        return f"<{type(self).__name__} {_short(self.name)} {self.scope} {state}>"

    # -- sync steps (on the sync Connection / Session, also inside run_sync) ----------------

    def _prepare(self, bind: Connection | Session) -> None:
        connection = bind if isinstance(bind, Connection) else bind.connection()
        support = support_for(connection.dialect.name)
        if support is None:
            from locksafe.kinds import UnsupportedLockOption

            raise UnsupportedLockOption(
                ("named_lock",),
                dialect=connection.dialect.name,
                server_version=getattr(connection.dialect, "server_version_info", None),
                reason="locksafe knows no named lock for this database",
            )
        if support.check is not None:
            support.check(connection, self.shared, self.scope)
        if support.holds_in_transaction(self.scope):
            if autocommit(connection):
                from locksafe.kinds import UnsupportedLockOption

                raise UnsupportedLockOption(
                    ("scope='transaction'",),
                    dialect=connection.dialect.name,
                    server_version=getattr(connection.dialect, "server_version_info", None),
                    reason=(
                        "the connection runs in AUTOCOMMIT, so a transaction-scoped lock "
                        "would end with its statement; use scope='session', or a transaction"
                    ),
                )
            if not connection.in_transaction():
                connection.begin()
        self._transaction = bind.get_transaction()
        self._support = support
        self._connection = connection
        self.key = support.key(connection, self.name)

    def _acquire_on_server(self, bind: Connection | Session) -> bool:
        support, connection = self._support, self._connection
        assert support is not None
        assert support.acquire is not None
        assert connection is not None
        timeout = self.timeout if self.timeout is None else min(self.timeout, _LONGEST_SERVER_WAIT)
        got = support.acquire(connection, self.key, self.shared, self.scope, timeout)
        if got and support.release is not None and support.needs_release(self.scope):
            fairy = connection.connection
            self._held = _Held(support, connection.dialect, self.key, self.shared, self.scope)
            _watch_pool(connection.engine.pool)
            self._record_info = fairy.info
            fairy.info.setdefault(_HELD, {})[id(self)] = self._held
        return got

    def _release_on_server(self, bind: Connection | Session, failed: bool) -> None:
        support = self._support
        assert support is not None
        lost = None
        if support.holds_in_transaction(self.scope) and not failed:
            current = bind.get_transaction()
            if current is not None and current is not self._transaction:
                lost = (
                    "its transaction ended inside the block (a commit or rollback) and the "
                    "block went on in a new one"
                )
        held, info, connection = self._held, self._record_info, self._connection
        self._held = self._record_info = None
        if held is not None and info is not None and connection is not None:
            entries: dict[int, _Held] | None = info.get(_HELD)
            if entries is not None and entries.get(id(self)) is held:
                del entries[id(self)]
                self._give_back_on_server(held, connection, failed)
            elif held.released_at_checkin and not failed and _in_transaction(bind):
                lost = (
                    "its connection went back to the pool inside the block (a Session's "
                    "commit, rollback or close) and the block went on with another one"
                )
        if lost is not None:
            raise NamedLockError(
                f"named lock {_short(self.name)} ended before the block did: {lost}, without "
                "the lock; commit as the block's last step, or hold the lock on a Connection"
            )

    def _give_back_on_server(self, held: _Held, connection: Connection, failed: bool) -> None:
        assert held.support.release is not None
        try:
            dbapi_connection = connection.connection.dbapi_connection
            was_held = held.support.release(
                held.dialect, dbapi_connection, held.key, held.shared, held.scope
            )
            end_own_transaction(connection)
        except Exception:
            # The release could not run (a transaction the block's error aborted, a broken
            # connection): closing the connection is what gives the lock back on the server.
            log.debug("named lock release failed; invalidating the connection", exc_info=True)
            connection.invalidate()
            if failed:
                return
            raise
        if not was_held and not failed:
            raise NamedLockError(
                f"named lock {_short(self.name)} was not held any more when the block ended "
                "(the connection was reset or reconnected): the block may have run without it"
            )

    # -- outcome -------------------------------------------------------------------------------

    def _obtained(self, got: bool, error: BaseException | None = None) -> bool:
        self.acquired = got
        if got or not self._raises:
            return got
        kind = LockErrorKind.LOCK_NOT_AVAILABLE if self.timeout == 0 else LockErrorKind.LOCK_TIMEOUT
        if error is not None:
            from locksafe.classify import classify

            kind = classify(error) or kind
        exc = LockUnavailable(
            kind,
            attempts=1,
            elapsed=time.monotonic() - self._started,
            retry_after=1.0,
            operation=f"named lock {_short(self.name)}",
        )
        exc.lock_name = self.name  # type: ignore[attr-defined]
        raise exc from error

    def _not_obtained_error(self, error: DBAPIError) -> bool:
        """Whether a driver error while waiting means "not obtained" (lock timeout,
        NOWAIT, deadlock) rather than a failure."""
        from locksafe.classify import classify

        return classify(error) in _NOT_OBTAINED

    def _start(self) -> None:
        if self._entered:
            raise RuntimeError(f"{self!r} was already entered: make a new lock for each block")
        self._entered = True
        self._started = time.monotonic()

    # -- polling (local locks) -----------------------------------------------------------------

    def _poll_delays(self) -> Callable[[], float | None]:
        """The next sleep before another attempt, or ``None`` when the time is up."""
        deadline = None if self.timeout is None else self._started + self.timeout
        step = [0.001]

        def next_delay() -> float | None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            delay = step[0] * random.uniform(0.5, 1.0)
            step[0] = min(step[0] * 2, 0.05)
            if deadline is not None:
                delay = min(delay, deadline - now)
            return delay

        return next_delay

    def _attempt(self) -> bool:
        support = self._support
        assert support is not None
        assert support.attempt is not None
        handle = support.attempt(self.key, self.shared)
        if handle is None:
            return False
        self._handle = handle
        return True

    def _give_back(self) -> None:
        handle, self._handle = self._handle, None
        support = self._support
        if handle is not None and support is not None and support.give_back is not None:
            support.give_back(handle)

    # -- entering and leaving: one algorithm, run by a sync or an async driver ------------------

    def _enter_steps(self) -> Steps[bool]:
        self._start()
        yield Call(self._prepare)
        support = self._support
        assert support is not None
        if support.polls:
            next_delay = self._poll_delays()
            while not self._attempt():
                delay = next_delay()
                if delay is None:
                    return self._obtained(False)
                yield Sleep(delay)
            return self._obtained(True)
        try:
            got = yield Call(self._acquire_on_server)
        except DBAPIError as error:
            if self._not_obtained_error(error):
                return self._obtained(False, error)
            raise
        return self._obtained(bool(got))

    def _exit_steps(self, failed: bool) -> Steps[None]:
        if not self.acquired:
            return
        self.acquired = False
        if self._support is not None and self._support.polls:
            self._give_back()
            return
        yield Call(self._release_on_server, failed)

    def _check_async(self, async_: bool) -> None:
        if _is_async_bind(self.bind) == async_:
            return
        kind = type(self.bind).__name__
        name = type(self).__name__.lower()
        if async_:
            raise TypeError(
                f"{kind} is not async: use `with` {name} (async with needs an AsyncConnection "
                "or AsyncSession)"
            )
        raise TypeError(f"{kind} is async: use `async with` {name}")

    def _enter_sync(self) -> bool:
        self._check_async(False)
        return run_sync(self._enter_steps(), self.bind)

    def _exit_sync(self, failed: bool) -> None:
        run_sync(self._exit_steps(failed), self.bind)

    async def _enter_async(self) -> bool:
        self._check_async(True)
        return await run_async(self._enter_steps(), self.bind)

    async def _exit_async(self, failed: bool) -> None:
        await run_async(self._exit_steps(failed), self.bind)


class NamedLock(_LockBase):
    """A named lock to use in a ``with`` (``async with``) block: see :func:`named_lock`.

    >>> from sqlalchemy import create_engine
    >>> with create_engine("sqlite://").connect() as conn:
    ...     lock = named_lock(conn, "nightly-report", timeout=5)
    ...     print(repr(lock))
    ...     with lock:
    ...         print(repr(lock))
    <NamedLock 'nightly-report' transaction not acquired>
    <NamedLock 'nightly-report' transaction acquired>
    """

    def __enter__(self) -> NamedLock:
        self._enter_sync()
        return self

    async def __aenter__(self) -> NamedLock:
        await self._enter_async()
        return self


class TryNamedLock(_LockBase):
    """A named lock whose ``with`` (``async with``) gives whether it was obtained: see
    :func:`try_named_lock`.

    >>> from sqlalchemy import create_engine
    >>> with create_engine("sqlite://").connect() as conn:
    ...     with try_named_lock(conn, "nightly-report") as acquired:
    ...         print(acquired)
    True
    """

    _raises = False

    def __enter__(self) -> bool:
        return self._enter_sync()

    async def __aenter__(self) -> bool:
        return await self._enter_async()


def named_lock(
    bind: Any,
    name: str,
    *,
    timeout: float | None = None,
    shared: bool = False,
    scope: Scope = "transaction",
) -> NamedLock:
    """A lock called ``name``, held for a ``with`` block (``async with`` for an
    ``AsyncConnection`` / ``AsyncSession``), excluding every other holder of the same name on
    the same database — other connections, threads, processes and hosts.

    - ``bind``: a ``Connection`` or ``Session`` (or their async twins); the lock is taken on
      its connection.
    - ``timeout``: seconds to wait (floats allowed); ``None`` waits without a bound, ``0``
      tries once. When the lock is not obtained in time, entering the block raises
      :class:`~locksafe.LockUnavailable` (kind ``lock_timeout``, or ``lock_not_available``
      for ``timeout=0``; ``deadlock`` when the server found one), whose ``lock_name`` is
      ``name``.
    - ``shared``: a shared lock (any number of shared holders at once, no exclusive one);
      MySQL / MariaDB have none (:class:`~locksafe.UnsupportedLockOption`).
    - ``scope``: ``"transaction"`` (PostgreSQL: ends with the bind's transaction, begun if
      needed; elsewhere: ends with the block) or ``"session"`` (held by the connection until
      the block ends; PostgreSQL's session-level advisory lock).

    Every option is checked now: ``TypeError`` / ``ValueError`` naming it.

    >>> named_lock(None, "nightly-report", timeout=-1)
    Traceback (most recent call last):
    ...
    ValueError: timeout=-1 must be a finite number of seconds ≥ 0 (0: try once), or None to wait without a bound
    """  # noqa: E501
    return NamedLock(bind, name, timeout=timeout, shared=shared, scope=scope)


def try_named_lock(
    bind: Any,
    name: str,
    *,
    timeout: float | None = 0,
    shared: bool = False,
    scope: Scope = "transaction",
) -> TryNamedLock:
    """:func:`named_lock` that does not raise when the lock is not obtained in time: its
    ``with`` gives ``True`` when the block holds the lock, ``False`` when it does not.
    ``timeout`` defaults to ``0`` (try once)::

        with try_named_lock(conn, "nightly-report") as acquired:
            if not acquired:
                return  # another worker runs it
            run_report(conn)

    Other errors (a broken connection, an option the server cannot honour) still raise.

    Two connections to one SQLite database file (the same holds on PostgreSQL and MySQL):

    >>> import os, tempfile
    >>> from sqlalchemy import create_engine
    >>> tmp = tempfile.TemporaryDirectory()
    >>> engine = create_engine(f"sqlite:///{os.path.join(tmp.name, 'app.db')}")
    >>> with engine.connect() as first, engine.connect() as second:
    ...     with named_lock(first, "nightly-report"):
    ...         with try_named_lock(second, "nightly-report") as acquired:
    ...             print("while held:", acquired)
    ...     with try_named_lock(second, "nightly-report") as acquired:
    ...         print("after:", acquired)
    while held: False
    after: True
    >>> engine.dispose(); tmp.cleanup()
    """
    return TryNamedLock(bind, name, timeout=timeout, shared=shared, scope=scope)
