"""Bounding lock waits in seconds, on every database: :func:`lock_timeout`.

The generic part: checking the arguments, finding the connections a block uses, saving,
setting and setting back. What the setting is, and its SQL, is each dialect module's
:class:`~locksafe.dialects.LockWaitSetting` (PostgreSQL's ``lock_timeout``, InnoDB's
``innodb_lock_wait_timeout``, SQLite's busy timeout).

Two kinds of setting:

- *transaction-scoped* (PostgreSQL, ``set_config(..., true)``: ``SET LOCAL``): set and read
  through SQLAlchemy, in the transaction (a Connection autobegins one, as for any statement;
  a Session's transaction gets it when it takes a connection). The transaction's end sets it
  back by itself; the block's end sets it back while that transaction goes on.
- *connection-scoped* (MySQL/MariaDB, SQLite): read and set on the DB-API connection, which
  begins no transaction. Set back at the block's end, also when the block raised; and should
  that not happen (the block's connection went back to the pool inside it, setting back
  failed, the task was cancelled), before the pool takes the connection back (a pool
  ``reset`` listener), or else the pool discards the connection.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeAlias, cast

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, Transaction
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.pool import Pool, PoolResetState

from locksafe._sa import is_autocommit_isolation, transaction_connections
from locksafe.capabilities import version_of
from locksafe.dialects import LockWaitSetting, support_for
from locksafe.kinds import UnsupportedLockOption

if TYPE_CHECKING:  # imported when used: the base install has no greenlet
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

__all__ = ["LockTimeout", "lock_timeout"]

#: What :func:`lock_timeout` bounds.
Target: TypeAlias = (
    "Session | Connection | scoped_session[Any] | AsyncSession | AsyncConnection"
    " | async_scoped_session[Any]"
)

log = logging.getLogger("locksafe.timeouts")

#: In the pool's ``info`` of a connection whose connection-scoped setting locksafe changed:
#: the SQL that sets it back (the value before the outermost block).
RESTORE_KEY: Final = "locksafe.lock_timeout.restore"

#: In the pool's ``info``: a connection-scoped setting as locksafe last read it, in seconds (to
#: pick the cheaper way next time; never taken for the value).
SEEN_KEY: Final = "locksafe.lock_timeout.seen"

#: Connection (a checkout: gone with it) -> the block whose early bound governs its lock waits
#: (see :func:`lock_waits_until`), told when a statement there fails.
_early_blocks: weakref.WeakKeyDictionary[Connection, LockTimeout] = weakref.WeakKeyDictionary()

#: Connection -> how many blocks inside that one set their own bound on it (while one does, a
#: lock timeout there is theirs, not the early bound's).
_overrides: weakref.WeakKeyDictionary[Connection, int] = weakref.WeakKeyDictionary()

#: The class-level listeners installed (each once, on first use).
_listening: set[str] = set()
_listening_lock = threading.Lock()


def _check_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"lock_timeout(): seconds={value!r} must be a number of seconds (int or float)"
        )
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"lock_timeout(): seconds={value!r} must be a finite number of seconds ≥ 0"
        )
    return seconds


def _async_types() -> tuple[type, type, type] | None:
    """SQLAlchemy's AsyncSession, AsyncConnection and async_scoped_session; ``None`` when its
    asyncio extension was never imported (then nothing is one of them)."""
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    if module is None:
        return None
    return module.AsyncSession, module.AsyncConnection, module.async_scoped_session


def _resolve(bind: Any) -> tuple[Session | Connection | None, Any]:
    """(the sync Session or Connection, the AsyncSession or AsyncConnection or ``None``)."""
    if isinstance(bind, scoped_session):
        bind = bind()
    if isinstance(bind, Session | Connection):
        return bind, None
    types = _async_types()
    if types is not None:
        scoped, session_type, connection_type = types[2], types[0], types[1]
        if isinstance(bind, scoped):
            bind = cast(Any, bind)()
        if isinstance(bind, session_type):
            return cast(Any, bind).sync_session, bind
        if isinstance(bind, connection_type):
            return None, bind  # its sync Connection exists once it is started
    hint = (
        " (an Engine is no one connection: use engine.connect() or a Session)"
        if isinstance(bind, Engine) or isinstance(getattr(bind, "sync_engine", None), Engine)
        else ""
    )
    raise TypeError(
        f"lock_timeout(): session_or_connection={bind!r} must be a Session, a Connection, an "
        f"AsyncSession or an AsyncConnection{hint}"
    )


#: The SQL that sets a setting back, and its bound parameters.
_Restore: TypeAlias = tuple[str, dict[str, Any]]


class _Applied:
    """One connection whose setting a block changed, and the SQL that sets it back."""

    __slots__ = (
        "connection",
        "early",
        "overrides",
        "owns_key",
        "restore",
        "setting",
        "transaction",
    )

    def __init__(
        self,
        connection: Connection,
        setting: LockWaitSetting,
        restore: _Restore,
        transaction: Transaction | None,
        owns_key: bool,
    ) -> None:
        self.connection = connection
        self.setting = setting
        self.restore = restore
        self.transaction = transaction
        self.owns_key = owns_key
        #: This block's early bound governs the connection's waits (``EARLY_KEY``).
        self.early = False
        #: This block set its own bound inside an early-bound one (``OVERRIDE_KEY``).
        self.overrides = False

    def live(self) -> bool:
        """Whether the setting is still this block's to set back: the connection is checked
        out, and for a transaction-scoped setting its transaction goes on."""
        conn = self.connection
        if conn.closed or conn.invalidated:
            return False  # the pool set it back, or discarded the connection
        return not self.setting.transaction_scoped or conn.get_transaction() is self.transaction


def _on_dbapi(conn: Connection, sql: str, *, fetch: bool = False) -> Any:
    """Run ``sql`` (no parameters) on the DB-API connection: no transaction begun, no
    SQLAlchemy event (a connection setting is not the transaction's work)."""
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    dialect = conn.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    cursor = None
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute(sql)
        if not fetch:
            return None
        rows = cursor.fetchall()  # all of them: some drivers refuse a cursor left unread
        return rows[0][0] if rows else None
    except dbapi_error as error:
        # As SQLAlchemy reports a driver error: wrapped (what callers and classify() read),
        # and a lost connection invalidated, so that the pool does not hand it out again.
        lost = dialect.is_disconnect(error, dbapi_connection, cursor)
        wrapped = DBAPIError.instance(
            sql, None, error, dbapi_error, connection_invalidated=lost, dialect=dialect
        )
        if lost:
            conn.invalidate(wrapped)
        raise wrapped from error
    finally:
        if cursor is not None:
            with contextlib.suppress(Exception):
                cursor.close()


def _set_back_before_checkin(
    dbapi_connection: Any, record: Any, reset_state: PoolResetState
) -> None:
    """Pool ``reset``: a connection going back to the pool with a setting a block changed
    gets it set back. Raising here makes the pool discard the connection instead."""
    info = getattr(record, "info", None)
    if not info or RESTORE_KEY not in info:
        return
    sql = info.pop(RESTORE_KEY)
    if dbapi_connection is None or reset_state.terminate_only or not reset_state.asyncio_safe:
        return  # the connection is being closed, not reused
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


def _listen_once(target: type, name: str, listener: Callable[..., Any]) -> None:
    key = f"{target.__name__}.{name}"
    if key in _listening:
        return
    with _listening_lock:
        if key not in _listening:
            event.listen(target, name, listener)
            _listening.add(key)


def _listen_to_pools() -> None:
    _listen_once(Pool, "reset", _set_back_before_checkin)


#: Session -> the blocks on it, outermost first: each bounds the connections the session takes
#: while it is open. One ``after_begin`` listener on ``Session`` serves them all (no listener
#: added and removed per block: ``@transactional``'s deadline opens one per attempt).
_blocks: weakref.WeakKeyDictionary[Session, list[LockTimeout]] = weakref.WeakKeyDictionary()


def _session_began(session: Session, transaction: object, conn: Connection) -> None:
    """Session ``after_begin``: the blocks open on ``session`` bound ``conn``."""
    blocks = _blocks.get(session)
    if blocks:
        for block in tuple(blocks):
            block._on_begin(session, transaction, conn)


def _autocommit(conn: Connection) -> bool:
    """Whether ``conn`` runs each statement in a transaction of its own (``isolation_level=
    "AUTOCOMMIT"``, on the engine or the connection)."""
    return is_autocommit_isolation(conn)


class LockTimeout:
    """What :func:`lock_timeout` returns: a context manager, ``with`` for a Session or a
    Connection, ``async with`` for an AsyncSession or an AsyncConnection.

    >>> from sqlalchemy import create_engine
    >>> import locksafe
    >>> with create_engine("sqlite://").connect() as conn:
    ...     block = locksafe.lock_timeout(conn, 1.5)
    ...     with block:
    ...         pass
    >>> isinstance(block, LockTimeout)
    True
    """

    def __init__(
        self,
        bind: object,
        seconds: float | Callable[[], float],
        *,
        only_lower: bool = False,
        strict: bool = True,
        early: float | None = None,
    ) -> None:
        self._sync, self._async = _resolve(bind)
        self._seconds = seconds
        self._only_lower = only_lower
        self._strict = strict
        #: @transactional's early bound (seconds), on servers whose deadlock detection is
        #: delayed (:func:`lock_waits_until`).
        self._early = early
        #: Called with the error when a statement's lock wait on a connection this block's
        #: early bound governs ends in an error (the bound may have ended it).
        self.on_early_error: Callable[[BaseException], object] | None = None
        self._session: Session | None = None
        self._applied: list[_Applied] = []
        self._entered = False
        self._early_now = False

    # -- with / async with ---------------------------------------------------------------------

    def __enter__(self) -> None:
        if self._async is not None:
            raise TypeError(
                "lock_timeout() on an AsyncSession or AsyncConnection: use `async with`"
            )
        assert self._sync is not None
        self._start(self._sync)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._finish(failed=exc_type is not None)

    async def __aenter__(self) -> None:
        if self._async is None:
            raise TypeError("lock_timeout() on a Session or Connection: use `with`")
        if isinstance(self._sync, Session) and self._sync.get_transaction() is None:
            self._start(self._sync)  # nothing to send before its transaction: no greenlet
            return
        await self._async.run_sync(self._start)

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not any(applied.live() for applied in self._applied):
            self._finish(failed=exc_type is not None)  # nothing to send: no greenlet needed
            return
        from sqlalchemy.util import greenlet_spawn

        await greenlet_spawn(self._finish, failed=exc_type is not None)

    # -- the work ------------------------------------------------------------------------------

    def _start(self, target: Session | Connection) -> None:
        if self._entered:
            raise RuntimeError("lock_timeout(): this block is already in use; call it again")
        self._entered = True
        try:
            if isinstance(target, Session):
                # every connection the session takes inside the block, in every transaction
                self._session = target
                _listen_once(Session, "after_begin", _session_began)
                _blocks.setdefault(target, []).append(self)
                root = target.get_transaction()
                if root is not None:
                    for conn in transaction_connections(root):
                        self._apply(conn)
            else:
                self._apply(target)
        except BaseException:
            self._finish(failed=True)
            raise

    def _on_begin(self, session: Session, transaction: object, conn: Connection) -> None:
        if not any(applied.connection is conn and applied.live() for applied in self._applied):
            self._apply(conn)

    def _apply(self, conn: Connection) -> None:
        support = support_for(conn.dialect.name)
        setting = support.lock_wait if support is not None else None
        scoped = setting is not None and setting.transaction_scoped
        why = (
            "locksafe knows no lock-wait setting there"
            if setting is None
            else "the connection is in AUTOCOMMIT, and the setting lasts a transaction"
            if scoped and _autocommit(conn)
            else None
        )
        if why is not None:
            if self._strict:
                raise UnsupportedLockOption(
                    ["lock_timeout"],
                    dialect=conn.dialect.name,
                    server_version=version_of(conn.dialect),
                    reason=why,
                )
            return
        assert setting is not None
        seconds = self._seconds() if callable(self._seconds) else self._seconds
        early = (
            self._early is not None
            and support is not None
            and support.deadlock_detection_delayed
            and self._early < seconds
        )
        if early:
            assert self._early is not None
            seconds = self._early
        self._early_now = early
        if not math.isfinite(seconds):
            return  # no deadline, no early bound: nothing to bound
        wanted = setting.value(max(0.0, seconds), conn.dialect)
        in_one = setting.read_and_set
        if in_one is not None and self._in_one_statement(conn, setting, wanted):
            restore = in_one(conn, setting, wanted, self._only_lower, _on_dbapi)
            if restore is not None:
                self._record(conn, setting, restore)
            return
        if scoped:
            previous = conn.execute(text(setting.read_sql)).scalar()
        else:
            previous = _on_dbapi(conn, setting.read_sql, fetch=True)
            conn.info[SEEN_KEY] = setting.seconds(previous)
        if self._only_lower and setting.seconds(previous) <= setting.seconds(wanted):
            return  # already bounded at least as tightly
        self._record(conn, setting, setting.write(previous))
        sql, params = setting.write(wanted)
        if scoped:
            conn.execute(text(sql), params)
        else:
            _on_dbapi(conn, sql)

    def _in_one_statement(self, conn: Connection, setting: LockWaitSetting, wanted: Any) -> bool:
        """Whether to read and set in one statement, where the dialect has a form for that:
        always for a transaction-scoped setting. A connection-scoped form keeps the value in one
        place on the server: only the outermost block on a connection uses it; and with
        ``only_lower`` only where the connection's bound, as last read, was looser than
        ``wanted``. Otherwise reading alone (one round trip) is likely to find nothing to
        change, where saving and setting costs one more to set back. A guess of which way is
        cheaper, never of the value: both ways leave a tighter bound as it is."""
        if setting.transaction_scoped:
            return True
        if RESTORE_KEY in conn.info:
            return False
        if not self._only_lower:
            return True
        seen = conn.info.get(SEEN_KEY)
        return isinstance(seen, float) and seen > setting.seconds(wanted)

    def _record(self, conn: Connection, setting: LockWaitSetting, restore: _Restore) -> None:
        """Remember to set ``conn``'s setting back with ``restore``: at the block's end, and
        for a connection-scoped setting changed by the outermost block, before the pool takes
        the connection back if that end does not come."""
        scoped = setting.transaction_scoped
        owns_key = False
        if not scoped:
            owns_key = RESTORE_KEY not in conn.info
            if owns_key:  # the outermost block's value, for the pool to set back if need be
                _listen_to_pools()
                conn.info[RESTORE_KEY] = restore[0]
        applied = _Applied(
            conn, setting, restore, conn.get_transaction() if scoped else None, owns_key
        )
        if self._early_now:
            _listen_once(Engine, "handle_error", _early_bound_error)
            _early_blocks[conn] = self
            applied.early = True
        elif conn in _early_blocks:  # a bound of its own inside an early-bound block
            _overrides[conn] = _overrides.get(conn, 0) + 1
            applied.overrides = True
        self._applied.append(applied)

    def _finish(self, *, failed: bool) -> None:
        session, self._session = self._session, None
        if session is not None:
            blocks = _blocks.get(session, [])
            if self in blocks:
                blocks.remove(self)
            if not blocks:
                _blocks.pop(session, None)
        applied, self._applied = self._applied, []
        self._entered = False
        error: BaseException | None = None
        for one in reversed(applied):  # the innermost first
            _forget_early(one, self)
            try:
                self._set_back(one, quiet=failed or not self._strict)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    @staticmethod
    def _set_back(applied: _Applied, *, quiet: bool) -> None:
        if not applied.live():
            return
        conn, setting = applied.connection, applied.setting
        sql, params = applied.restore
        if setting.transaction_scoped:
            try:
                conn.execute(text(sql), params)
            except DBAPIError as error:
                if error.connection_invalidated:
                    raise  # the connection is gone: the block's work with it; never hidden
                # the transaction failed (PostgreSQL refuses every statement until its
                # ROLLBACK, which sets the value back itself)
                log.debug("lock_timeout(): not set back in a failed transaction", exc_info=True)
            return
        try:
            _on_dbapi(conn, sql)
        except Exception:
            if quiet:  # the block's error goes up; the pool sets it back, or discards it
                log.warning("lock_timeout(): setting back failed", exc_info=True)
                return
            raise
        if applied.owns_key:
            conn.info.pop(RESTORE_KEY, None)


def _forget_early(applied: _Applied, block: LockTimeout) -> None:
    """At a block's end: its early bound, or its own bound inside one, no longer governs."""
    conn = applied.connection
    if applied.early and _early_blocks.get(conn) is block:
        del _early_blocks[conn]
        _overrides.pop(conn, None)
    elif applied.overrides and conn in _overrides:
        left = _overrides[conn] - 1
        if left > 0:
            _overrides[conn] = left
        else:
            del _overrides[conn]


def _early_bound_error(context: Any) -> None:
    """``handle_error``: a statement failed on a connection an early bound governs (and no
    bound of the caller's own inside it): its block is told, and decides whether the early
    bound ended a lock wait."""
    conn = context.connection
    if conn is None or context.is_disconnect or not _early_blocks:
        return
    block = _early_blocks.get(conn)
    if block is None or _overrides.get(conn) or block.on_early_error is None:
        return
    block.on_early_error(context.sqlalchemy_exception or context.original_exception)


def lock_timeout(
    session_or_connection: Session
    | Connection
    | scoped_session[Any]
    | AsyncSession
    | AsyncConnection
    | async_scoped_session[Any],
    seconds: float,
) -> LockTimeout:
    """Bound how long the statements of a block wait for a lock, in seconds (floats allowed):

    .. code-block:: python

        with locksafe.lock_timeout(session, 2.5):
            session.execute(select(Job).with_for_update())   # waits 2.5 s at most

        async with locksafe.lock_timeout(async_session, 2.5):
            ...

    A wait that runs out raises the database's own error, which :func:`~locksafe.classify`
    calls ``lock_timeout`` (``database_busy`` on SQLite) and ``@transactional`` retries.

    ``session_or_connection`` is a ``Session`` or ``Connection`` (``with``) or an
    ``AsyncSession`` or ``AsyncConnection`` (``async with``). For a session, every connection
    it uses inside the block is bounded, in every transaction it begins there; a session
    outside a transaction begins none. ``seconds``: a finite number ≥ 0 (0: do not wait, or as
    little as the server allows); anything else raises ``TypeError`` (not a number, a
    ``bool``) or ``ValueError`` (negative, NaN, infinite) here, before anything runs.

    - PostgreSQL: ``lock_timeout`` for the transaction (``SET LOCAL``, the value a bound
      parameter), rounded to milliseconds (1 ms at least); it ends with the block, or with the
      transaction if that ends first.
    - MySQL / MariaDB: ``innodb_lock_wait_timeout`` for the connection, whole seconds (the
      nearest, 1 at least); set back at the block's end, also when it raised, and before the
      pool takes the connection back.
    - SQLite: the connection's busy timeout, in milliseconds, set back the same way.

    Raises :class:`~locksafe.UnsupportedLockOption` when the block would bound a connection
    where it cannot (never a silent no-op): a dialect locksafe has no setting for, or a
    PostgreSQL connection in ``AUTOCOMMIT`` (no transaction for ``SET LOCAL`` to last).

    Two connections to one SQLite file: the second waits 0.2 s for the write lock the first
    holds, then fails with an error :func:`~locksafe.classify` names:

    >>> import os, sqlite3, tempfile, time
    >>> from sqlalchemy import create_engine, text
    >>> from sqlalchemy.exc import OperationalError
    >>> import locksafe, locksafe.sqlite
    >>> path = os.path.join(tempfile.mkdtemp(), "app.db")
    >>> engine = locksafe.sqlite.configure(create_engine(f"sqlite:///{path}"), busy_timeout=30)
    >>> with engine.begin() as conn:
    ...     _ = conn.execute(text("CREATE TABLE t (x INTEGER)"))
    >>> holder = sqlite3.connect(path, isolation_level=None)   # another process, say
    >>> _ = holder.execute("BEGIN IMMEDIATE")                  # holds the write lock
    >>> with engine.connect() as other, other.begin():
    ...     started = time.monotonic()
    ...     try:
    ...         with locksafe.lock_timeout(other, 0.2):
    ...             _ = other.execute(text("INSERT INTO t VALUES (2)"))
    ...     except OperationalError as error:
    ...         waited = time.monotonic() - started
    ...         print(locksafe.classify(error).value, 0.2 <= waited < 5)
    database_busy True
    >>> _ = holder.execute("ROLLBACK"); holder.close(); engine.dispose()
    """
    return LockTimeout(session_or_connection, _check_seconds(seconds))


def lock_waits_until(session: object, deadline: float, early: float | None = None) -> LockTimeout:
    """For :func:`~locksafe.transactional`: bound the lock waits of ``session``'s connections
    to the time left until ``deadline`` (``time.monotonic()``, ``math.inf``: none), when that
    is tighter than their setting; nothing on a dialect that locksafe cannot bound. Setting
    back never raises (a failure is logged; the pool sets the value back, or discards the
    connection).

    ``early`` (seconds): tighter still, on a server whose deadlock detection is delayed
    (``DialectSupport.deadlock_detection_delayed``): an attempt's early bound, so that a
    deadlock ends as a lock timeout before the server's detector runs."""
    return LockTimeout(
        session, lambda: deadline - time.monotonic(), only_lower=True, strict=False, early=early
    )
