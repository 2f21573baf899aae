"""SQLite: SQLITE_BUSY / SQLITE_LOCKED families, and row locks as the database write lock.

SQLite has no row locks, and SQLAlchemy renders nothing for ``with_for_update()`` there. A
transaction that must not race takes SQLite's single write lock (RESERVED, or the WAL write
lock) *before* its SELECT runs and keeps it until it ends; locksafe does that with a write
statement that changes nothing (``DELETE FROM t WHERE 0``), which waits for the busy timeout
like any write, and fails at once with SQLITE_BUSY_SNAPSHOT when a WAL snapshot the transaction
already read is stale (the write lock can then never be had: the transaction must start again).

Each database file has its own write lock: the lock is taken on every database the SELECT's
tables live in (main, attached schemas, temp). A name that is a view (or a virtual table that
cannot be written) takes its database's lock with ``PRAGMA <schema>.incremental_vacuum(1)``,
which needs no table and reads nothing first; a SELECT whose tables locksafe cannot name (a
textual FROM) takes every database's; a database this connection opened read-only is left out,
as SQLite's ``BEGIN IMMEDIATE`` leaves it out. Outside a transaction the ``BEGIN`` that starts
one takes the lock (``BEGIN IMMEDIATE``); a connection that has no transaction at all
(SQLAlchemy's ``AUTOCOMMIT``) is refused, since nothing could hold the lock past the statement.
Under ``skip_locked`` a busy database makes the SELECT return no rows without reading anything.

:func:`locksafe.sqlite.configure` with ``begin="immediate"`` / ``"exclusive"`` leaves its
``BEGIN`` owed (:class:`OwedBegin`, per SQLAlchemy ``Connection``) until the transaction's first
statement, so that a ``nowait`` / ``skip_locked`` SELECT there takes the write lock without
waiting; this module pays it (:func:`pay_owed_begin`, :func:`take_write_lock`).

Result codes: https://www.sqlite.org/rescode.html (primary code = extended code & 0xFF).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import hashlib
import os
import random
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import CompoundSelect, Select, Table
from sqlalchemy.exc import DBAPIError, InvalidRequestError

from locksafe._sa import (
    adapted_driver_connection,
    is_autocommit_isolation,
    result_column_names,
    run_in_aiosqlite_thread,
    table_prefixes,
)
from locksafe.capabilities import LockCapabilities, unsupported, version_of
from locksafe.dialects.base import (
    Code,
    DialectSupport,
    DriverErrors,
    ErrorTable,
    LockRequest,
    LockWaitSetting,
    NamedLockSupport,
)
from locksafe.kinds import LockErrorKind, NamedLockError, SelfDeadlock, UnsupportedLockOption

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext
    from sqlalchemy.sql.expression import TableClause


SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_BUSY_SNAPSHOT = 517  # 5 | (2 << 8)
#: sqlite3_errstr(SQLITE_BUSY): the only clue to SQLITE_BUSY where a driver carries no code.
BUSY_MESSAGE = "database is locked"

_NAMES = {"SQLITE_BUSY": SQLITE_BUSY, "SQLITE_LOCKED": SQLITE_LOCKED}


def _read_sqlite(exc: BaseException) -> Code | None:
    """``sqlite_errorcode`` (Python ≥ 3.11), else the name in ``sqlite_errorname``."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str) and name:
        for prefix, primary in _NAMES.items():
            if name == prefix or name.startswith(prefix + "_"):
                return primary
        return name
    return None


ERRORS = ErrorTable(
    drivers=(
        # pysqlite and aiosqlite both raise the sqlite3 module's classes.
        DriverErrors("sqlite3", ("sqlite3", "_sqlite3"), _read_sqlite, ("sqlite3:Error",)),
    ),
    codes={
        SQLITE_BUSY: LockErrorKind.DATABASE_BUSY,
        SQLITE_LOCKED: LockErrorKind.TABLE_LOCKED,
    },
    # The code alone decides (no refine): every SQLITE_BUSY / SQLITE_LOCKED extended code is
    # the same kind as its primary code.
    # Python 3.10's sqlite3 exceptions carry no code: fall back to SQLite's fixed messages for
    # SQLITE_BUSY / SQLITE_LOCKED, matched from the start of the message ("no such table:
    # database is locked" is another error), on OperationalError only (a trigger's
    # RAISE(ABORT, 'database is locked') is an IntegrityError).
    messages=(
        ("OperationalError", "database table is locked", LockErrorKind.TABLE_LOCKED),
        ("OperationalError", "database schema is locked", LockErrorKind.TABLE_LOCKED),
        ("OperationalError", BUSY_MESSAGE, LockErrorKind.DATABASE_BUSY),
    ),
)


def capabilities(dialect: Dialect) -> LockCapabilities:
    return LockCapabilities(
        product="SQLite",
        dialect=dialect.name,
        flavour="sqlite",
        server_version=version_of(dialect) or tuple(sqlite3.sqlite_version_info),
        mechanism="database",
        for_update=True,
        for_share=True,
        key_share=True,
        nowait=True,
        skip_locked=True,
        of=True,
        summary=(
            "no row locks: every lock is the database write lock, taken before the SELECT "
            "and held to the end of the transaction"
        ),
    )


# -- the write lock ---------------------------------------------------------------------------

SQLITE_READONLY = 8
#: sqlite3_errstr(SQLITE_READONLY): the only clue where the exception carries no code.
READONLY_MESSAGE = "attempt to write a readonly database"


def _busy_timeout(cursor: DBAPICursor) -> int:
    cursor.execute("PRAGMA busy_timeout")
    row = cursor.fetchone()
    return int(row[0]) if row else 0


def _primary_code(exc: BaseException) -> int | None:
    code = _read_sqlite(exc)
    if isinstance(code, int):
        return code
    if (
        code is None
        and type(exc).__name__ == "OperationalError"
        and str(exc).lower().lstrip().startswith(BUSY_MESSAGE)
    ):
        # Python 3.10's sqlite3 exceptions carry no code: SQLite's SQLITE_BUSY message, read
        # from its start as the classifier reads it (see ERRORS.messages).
        return SQLITE_BUSY
    return None


def _extended_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code if isinstance(code, int) else None


def _is_read_only(exc: BaseException) -> bool:
    """SQLITE_READONLY itself (not one of its extended codes, which report a broken or
    unwritable journal): this connection opened the database read-only (``mode=ro``,
    ``immutable=1``, a read-only file) or runs with ``PRAGMA query_only``."""
    if not isinstance(exc, sqlite3.Error):
        return False
    extended = _extended_code(exc)
    if extended is not None:
        return extended == SQLITE_READONLY
    return str(exc).lower().lstrip().startswith(READONLY_MESSAGE)  # Python 3.10


_SKIP_LOCKED_ATTEMPTS = 3


T = TypeVar("T")


def on_sqlite3(dbapi_connection: Any, fn: Callable[[Any], T]) -> T:
    """``fn(connection)`` on the ``sqlite3`` connection behind a DB-API connection, in the
    thread that owns it (``sqlite3`` refuses most calls from other threads): directly for
    pysqlite, through aiosqlite's worker thread for SQLAlchemy's aiosqlite adapter. The async
    path runs where SQLAlchemy runs an AsyncEngine's sync code (event handlers, cursor hooks).
    """
    if isinstance(dbapi_connection, sqlite3.Connection):
        return fn(dbapi_connection)
    awaitable = run_in_aiosqlite_thread(adapted_driver_connection(dbapi_connection), fn)
    if awaitable is None:
        return fn(dbapi_connection)
    from sqlalchemy.util import await_only

    result: T = await_only(awaitable)
    return result


def sqlalchemy_autocommit(connection: Connection) -> bool:
    """SQLAlchemy runs this connection in ``AUTOCOMMIT`` isolation: it opens no transaction."""
    return is_autocommit_isolation(connection)


def _driver_autocommit(dbapi_connection: Any) -> bool:
    """Python ≥ 3.12's ``sqlite3`` in ``autocommit=True``: ``commit()`` and ``rollback()`` do
    nothing, so a ``BEGIN`` sent behind its back would never end."""
    if getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", None) is None:
        return False
    return on_sqlite3(dbapi_connection, lambda conn: getattr(conn, "autocommit", None) is True)


def _in_transaction(dbapi_connection: Any, unknown: bool = True) -> bool:
    for candidate in (dbapi_connection, adapted_driver_connection(dbapi_connection)):
        value = getattr(candidate, "in_transaction", None)
        if isinstance(value, bool):
            return value
    return unknown


def adopt_a_transaction_in_progress(connection: Connection) -> bool:
    """Before ``connection`` sends the ``BEGIN`` of its transaction: whether its ``sqlite3``
    connection is already in a transaction that ``connection`` takes as its own — begun by
    the application itself (SQLAlchemy's pysqlite recipe, an ``exec_driver_sql("BEGIN
    IMMEDIATE")``), or by ``sqlite3`` before raw DB-API DML — so that no second ``BEGIN`` is
    sent. Raises when that transaction is another SQLAlchemy ``Connection``'s over the same
    ``sqlite3`` connection (``StaticPool``, ``SingletonThreadPool``): SQLite has one transaction
    per connection, and either one's COMMIT / ROLLBACK would end the other's."""
    dbapi_connection = connection.connection.dbapi_connection
    if not _in_transaction(dbapi_connection, unknown=False):
        return False
    owners = list(_begun.items())
    if any(other is not connection and held is dbapi_connection for other, held in owners):
        raise InvalidRequestError(
            "this SQLAlchemy Connection's sqlite3 connection is already in a transaction it did "
            "not begin: another Connection sharing the same sqlite3 connection "
            "(SingletonThreadPool for sqlite:// within one thread, StaticPool) is in a "
            "transaction. SQLite has one transaction per connection: end the other transaction "
            "first, or give each Connection its own sqlite3 connection (a file database and the "
            "default pool)"
        )
    begin_sent(connection)
    _owed.pop(connection, None)
    return True


# -- the BEGIN that configure(begin="immediate" | "exclusive") owes ------------------------------


@dataclass
class OwedBegin:
    """What :func:`locksafe.sqlite.configure` still owes one SQLAlchemy ``Connection``'s
    transaction: the ``BEGIN`` itself, sent right before the transaction's first statement that
    needs it (when that statement is known), or — once a plain ``BEGIN`` went out — the write
    lock that ``BEGIN IMMEDIATE`` would have taken.

    Under ``begin="first_write"`` (:attr:`lazy`) statements that only read run before the
    ``BEGIN``, each on its own (seeing the latest commit), and the ``BEGIN IMMEDIATE`` goes out
    right before the first statement that writes, a ``SAVEPOINT`` or a locking SELECT."""

    #: ``"BEGIN"``, ``"BEGIN IMMEDIATE"`` or ``"BEGIN EXCLUSIVE"``.
    sql: str
    #: Reads do not pay (``begin="first_write"``).
    lazy: bool = False
    #: A plain ``BEGIN`` was sent (the first statement was a ``SAVEPOINT``, or a
    #: ``skip_locked`` SELECT found the database busy); nothing has been read since, and the
    #: write lock is taken before the next statement that reads or writes.
    begun: bool = False
    #: The execution whose ``skip_locked`` SELECT the row-lock hook answered with no rows
    #: (it already did what this statement owed).
    answered: Any = None

    @property
    def takes_write_lock(self) -> bool:
        return self.sql != "BEGIN"


#: Per SQLAlchemy ``Connection`` (weakly: an entry goes with its connection). Not in
#: ``Connection.info``, which belongs to the DB-API connection and is shared by every
#: ``Connection`` that uses it (``SingletonThreadPool``, ``StaticPool``): each transaction's
#: debt is paid or forgotten by its own connection only.
_owed: weakref.WeakKeyDictionary[Connection, OwedBegin] = weakref.WeakKeyDictionary()

#: The SQLAlchemy ``Connection`` s that sent the ``BEGIN`` of their current transaction
#: themselves (``configure()``): their COMMIT must find ``sqlite3`` still in that transaction.
_begun: weakref.WeakKeyDictionary[Connection, Any] = weakref.WeakKeyDictionary()

#: Statements that read nothing and take no lock: a SAVEPOINT opening a transaction leaves the
#: write lock owed to the next statement.
_SAVEPOINT = re.compile(r"\s*(SAVEPOINT|RELEASE|ROLLBACK\s+TO)\b", re.IGNORECASE)

#: Leading SQL comments (``-- ...`` lines, ``/* ... */`` blocks) and blanks, skipped before a
#: statement's first keyword is read.
_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)


def _keyword_start(statement: str) -> str:
    """``statement`` from its first keyword (comments and blanks skipped)."""
    found = _LEADING.match(statement)
    return statement[found.end() :] if found else statement


#: Statements that never open a transaction, as with stock ``sqlite3``: every ``PRAGMA`` (an
#: application's per-connection or per-session set-up — ``foreign_keys`` is a no-op inside a
#: transaction, ``synchronous`` / ``temp_store`` / ``journal_mode`` cannot change there — and
#: read-only ones such as ``table_info`` that schema reflection runs), ``VACUUM``, ``ATTACH`` and
#: ``DETACH`` (which fail inside one). Before the transaction has begun they run on their own;
#: after, inside it, as SQLite decides.
_OUTSIDE = re.compile(r"(?:PRAGMA|VACUUM|ATTACH|DETACH)\b", re.IGNORECASE)

#: Statements that only read, told by their first keyword (a ``WITH`` that names no
#: INSERT / UPDATE / DELETE / REPLACE reads). Anything else is taken as a write: taking the
#: write lock too early is slower, never unsafe.
_READS = re.compile(r"(?:SELECT|VALUES|EXPLAIN)\b", re.IGNORECASE)
_WITH = re.compile(r"WITH\b", re.IGNORECASE)
_DML = re.compile(r"\b(?:INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)
#: A ``BEGIN`` the application sends itself (SQLAlchemy's pysqlite recipe, a manual
#: ``BEGIN IMMEDIATE``): it takes the place of the one locksafe owes.
_BEGIN = re.compile(r"BEGIN\b(?:\s+(DEFERRED|IMMEDIATE|EXCLUSIVE)\b)?", re.IGNORECASE)


def outside(statement: str) -> bool:
    """Whether ``statement`` runs before a transaction's ``BEGIN`` (see ``_OUTSIDE``)."""
    return _OUTSIDE.match(_keyword_start(statement)) is not None


#: Set by :func:`locksafe.sqlite.immediate`: in this call, a transaction takes the write lock
#: before its next statement, reads included.
immediate_block: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "locksafe_sqlite_immediate", default=False
)


def only_reads(context: ExecutionContext | None, statement: str) -> bool:
    """Whether ``statement`` only reads (runs before a ``first_write`` transaction's
    ``BEGIN``). A compiled ``Select`` is told by SQLAlchemy; anything textual — ``text()``,
    ``text().columns()`` (whose ``UPDATE ... RETURNING`` SQLAlchemy calls a SELECT),
    ``exec_driver_sql`` — by its first keyword."""
    if any(getattr(context, flag, False) for flag in ("isinsert", "isupdate", "isdelete")):
        return False
    compiled = getattr(context, "compiled", None)
    element = getattr(compiled, "statement", None)
    if isinstance(element, (Select, CompoundSelect)):
        return True
    if getattr(element, "is_dml", False) or getattr(element, "is_ddl", False):
        return False
    start = _keyword_start(statement)
    if _READS.match(start):
        return True
    if _OUTSIDE.match(start):  # a PRAGMA that sets nothing reads; VACUUM, ATTACH... do not
        return start[:6].upper() == "PRAGMA" and "=" not in start
    if _WITH.match(start):
        return _DML.search(start) is None
    return False


# -- one thread waiting on itself ------------------------------------------------------------

#: ``connection_record.info`` key: the main database file of this DB-API connection ("" for an
#: in-memory or temporary database, private to the connection).
PATH = "locksafe.sqlite.path"

#: The SQLAlchemy ``Connection`` s whose transaction holds (or is taking) a database's write
#: lock: that database's file, the call that took it (:data:`_call`) and, for an asyncio
#: connection, its task.
_holders: weakref.WeakKeyDictionary[Connection, tuple[str, object, Any]] = (
    weakref.WeakKeyDictionary()
)
_holders_lock = threading.Lock()

#: The write locks taken in the current logical call: marker objects set in the current
#: ``contextvars`` context, one per lock still held. Each asyncio task, and each job a
#: framework hands to a worker thread (anyio / Starlette copy the context), runs in a copy of
#: the context it was started from, so a marker seen here means "taken in this call, or in one
#: this call is part of and waits for" — not merely in this thread: a thread pool's thread
#: moves on to other requests while a transaction it began is finished elsewhere.
_call: contextvars.ContextVar[tuple[object, ...]] = contextvars.ContextVar("locksafe_sqlite_call")
def main_file(dbapi_connection: Any) -> str:
    """The main database's file name ("" in memory), read without taking any lock."""
    cursor = dbapi_connection.cursor()
    try:
        for row in _database_list(cursor):
            if row[0] == "main":
                return row[1]
    finally:
        cursor.close()
    return ""


def _task() -> Any:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop runs in this thread
        return None


def _new_marker() -> object:
    """A marker for a write lock taken now, added to this call's (markers of locks no longer
    held are dropped, so a long-lived context does not grow)."""
    marker = object()
    held = _call.get(())
    if held:
        live = {entry[1] for entry in _holders.values()}
        held = tuple(m for m in held if m in live)
    _call.set((*held, marker))
    return marker


def _path_of(connection: Connection) -> str:
    try:
        return str(connection.connection.info.get(PATH, ""))
    except Exception:  # an invalidated or closed connection: nothing to guard
        return ""


def holds_write_lock(connection: Connection) -> None:
    """``connection``'s transaction now holds its database's write lock."""
    path = _path_of(connection)
    if path:
        with _holders_lock:
            if connection not in _holders:
                _holders[connection] = (path, _new_marker(), _task())


def released(connection: Connection) -> None:
    """``connection``'s transaction ended (COMMIT or ROLLBACK): it holds no lock, owes nothing."""
    with contextlib.suppress(Exception):  # closed or invalidated: the pool's events release it
        release_gate(connection.connection.dbapi_connection)
    _owed.pop(connection, None)
    _begun.pop(connection, None)
    _lost.pop(connection, None)
    if connection in _holders:
        with _holders_lock:
            _holders.pop(connection, None)


def refuse_to_wait_on_ourselves(connection: Connection) -> None:
    """Before ``connection`` waits for its database's write lock: raise
    :class:`~locksafe.SelfDeadlock` at once when another ``Connection`` holds that lock and
    was given it in this same call (:data:`_call`: the same function, or one this call is
    waiting for — a request's dependency session and the service function's own session, a
    store method calling another one that opens its own session). The holder cannot end its
    transaction before this call returns, so the wait could only end with the busy timeout. For
    an asyncio connection (whose wait lets the event loop run) only a holder of the same task
    counts."""
    if not _holders:
        return
    markers = _call.get(())
    if not markers:
        return
    path = _path_of(connection)
    if not path:
        return
    task = _task() if connection.dialect.is_async else None
    dbapi_connection = connection.connection.dbapi_connection
    with _holders_lock:
        others = [
            other
            for other, (held, by, in_task) in _holders.items()
            if other is not connection
            and held == path
            and any(by is marker for marker in markers)
            and (task is None or in_task is task)
        ]
    for other in others:
        try:
            shared = other.connection.dbapi_connection is dbapi_connection
        except Exception:
            continue
        if shared or other.closed:
            continue
        raise SelfDeadlock(
            f"this call would wait for SQLite's write lock on {path!r}, which another "
            "connection holds for the same call (or one it waits for): that transaction "
            "wrote and has not ended, and it cannot end while this call waits — two Sessions "
            "or Connections used one inside the other. Commit or roll back the first one "
            "before the second one writes, or do both in one session"
        )


# -- waiting for the write lock, fairly --------------------------------------------------------
#
# SQLite's own busy handler sleeps in growing steps (1, 2, 5, ... 100 ms) while the lock is
# taken: a writer that has waited long polls every 100 ms, one that just arrived every few
# milliseconds, so newcomers keep winning and a long waiter starves until its busy timeout
# ends in "database is locked" (measured on a real Airflow: a 30 s wait while no transaction
# held the lock for more than 4.4 s). locksafe waits instead:
#
# - in one process, writers to one database file queue in arrival order (:class:`_Gate`): the
#   first holds the gate until its transaction ends and hands it to the next;
# - the queue's head polls SQLite's lock with a zero busy timeout in short, flat, jittered
#   steps (0.5 ms growing to 5 ms), so each process's head has the same chance when the lock
#   is released — against processes that use locksafe and processes that do not.
#
# Both are bounded by the connection's busy timeout, read when the wait starts (so a
# ``PRAGMA busy_timeout`` the application sets keeps its effect). Only where the wait cannot
# meet a stale snapshot: a ``BEGIN IMMEDIATE`` / ``EXCLUSIVE``, or the write lock owed after a
# plain ``BEGIN`` that read nothing. asyncio connections (aiosqlite, which waits in its own
# thread) keep SQLite's handler: a gate would block the event loop.

_FIRST_STEP = 0.0005
_LAST_STEP = 0.005


class _Gate:
    """A first-come, first-served queue of one process's writers to one database file."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._holder: object | None = None
        self._waiting: collections.deque[tuple[threading.Event, object]] = collections.deque()

    def acquire(self, who: object, timeout: float) -> bool:
        with self._mutex:
            if self._holder is who:
                return True
            if self._holder is None and not self._waiting:
                self._holder = who
                return True
            ready = threading.Event()
            entry = (ready, who)
            self._waiting.append(entry)
        if ready.wait(max(0.0, timeout)):
            return True
        with self._mutex:
            if ready.is_set():
                return True
            self._waiting.remove(entry)
            return False

    def release(self, who: object) -> None:
        with self._mutex:
            if self._holder is not who:
                return
            if self._waiting:
                ready, self._holder = self._waiting.popleft()
                ready.set()
            else:
                self._holder = None


_gates: dict[str, _Gate] = {}
_gates_lock = threading.Lock()
#: DB-API connection -> the gate it holds (released when its transaction ends, and by the pool
#: when the connection is checked in, reset, invalidated or closed, whatever happened).
_gate_held: dict[int, tuple[_Gate, object]] = {}


def _gate(path: str) -> _Gate:
    with _gates_lock:
        gate = _gates.get(path)
        if gate is None:
            gate = _gates[path] = _Gate()
        return gate


def release_gate(dbapi_connection: Any) -> None:
    """The transaction of ``dbapi_connection`` ended: the next writer of its process may go."""
    held = _gate_held.pop(id(dbapi_connection), None)
    if held is not None:
        held[0].release(held[1])


def _forget_after_fork() -> None:
    """A forked child has none of its parent's threads: their queue places and locks are not
    its own."""
    global _gates_lock, _holders_lock
    _gates.clear()
    _gate_held.clear()
    _gates_lock = threading.Lock()
    _holders_lock = threading.Lock()
    _holders.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def wait_for_write_lock(
    connection: Connection, cursor: DBAPICursor, attempt: Callable[[], None]
) -> None:
    """Run ``attempt`` — a statement that takes the database's write lock and has read nothing
    before it in this transaction — until it gets the lock, fairly (see above), within the
    connection's busy timeout; the last failure is raised as it is (``database_busy``)."""
    if connection.dialect.is_async:
        attempt()
        return
    timeout_ms = _busy_timeout(cursor)
    if timeout_ms <= 0:
        attempt()
        return
    deadline = time.monotonic() + timeout_ms / 1000
    dbapi_connection = connection.connection.dbapi_connection
    path = _path_of(connection)
    queued = path and id(dbapi_connection) not in _gate_held
    if queued:
        gate = _gate(path)
        if gate.acquire(dbapi_connection, deadline - time.monotonic()):
            _gate_held[id(dbapi_connection)] = (gate, dbapi_connection)
    cursor.execute("PRAGMA busy_timeout = 0")
    try:
        step = _FIRST_STEP
        while True:
            try:
                attempt()
                return
            except Exception as error:
                left = deadline - time.monotonic()
                driver_error = error.orig if isinstance(error, DBAPIError) else error
                if (
                    driver_error is None
                    or _primary_code(driver_error) != SQLITE_BUSY
                    or _extended_code(driver_error) == SQLITE_BUSY_SNAPSHOT
                    or left <= 0
                ):
                    release_gate(dbapi_connection)
                    raise
            time.sleep(min(left, step * random.uniform(0.5, 1.5)))
            step = min(step * 2, _LAST_STEP)
    finally:
        cursor.execute(f"PRAGMA busy_timeout = {timeout_ms:d}")



def owe_begin(connection: Connection, sql: str, *, lazy: bool = False) -> None:
    """Record that ``connection``'s new transaction still needs ``sql`` (``BEGIN``,
    ``BEGIN IMMEDIATE`` or ``BEGIN EXCLUSIVE``; ``lazy``: not before the first statement that
    does more than read); see :func:`pay_owed_begin`."""
    _owed[connection] = OwedBegin(sql, lazy=lazy)


def begin_sent(connection: Connection) -> None:
    """``connection`` sent the ``BEGIN`` of its transaction itself."""
    _begun[connection] = connection.connection.dbapi_connection


#: Connections whose transaction was rolled back behind their back, and how.
_lost: weakref.WeakKeyDictionary[Connection, str] = weakref.WeakKeyDictionary()


def rolled_back_under(dbapi_connection: Any, how: str) -> None:
    """``dbapi_connection`` was rolled back (the pool's reset on return, SQLite's own rollback
    after an error): every other SQLAlchemy ``Connection`` whose transaction ran on it lost its
    work."""
    for other, held in list(_begun.items()):
        if held is dbapi_connection:
            _lost[other] = how


def lost(connection: Connection) -> str | None:
    """At ``connection``'s COMMIT: how its transaction was rolled back behind its back, or
    ``None``. Statements it ran after that are in a new transaction, which this COMMIT would
    commit as if it were the whole of it."""
    return _lost.pop(connection, None)


def after_error(connection: Connection) -> None:
    """After a statement error: SQLite rolls a transaction back by itself after some errors
    (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM, an interrupt...)."""
    if connection in _begun and connection not in _lost:
        with contextlib.suppress(Exception):
            if not _in_transaction(connection.connection.dbapi_connection, unknown=True):
                _lost[connection] = "SQLite rolled it back after an error"


def pay_owed_begin(
    connection: Connection,
    cursor: DBAPICursor,
    context: ExecutionContext | None,
    statement: str,
) -> None:
    """Right before a statement of ``connection``'s transaction, send what the transaction
    still owes (see :class:`OwedBegin`):

    - a statement of a connection's set-up (``PRAGMA foreign_keys`` ...; see ``_OUTSIDE``):
      nothing yet, the statement runs before the ``BEGIN``, keeping its effect;
    - ``begin="first_write"``: nothing before a statement that only reads;
    - nothing sent yet: the ``BEGIN`` (``IMMEDIATE`` / ``EXCLUSIVE``: waiting the busy
      timeout) — except before a ``SAVEPOINT``, which gets a plain ``BEGIN`` and leaves the
      write lock owed to the next statement (a ``nowait`` / ``skip_locked`` SELECT there must
      not wait);
    - a plain ``BEGIN`` sent: the write lock of every database of the connection, waiting the
      busy timeout, before anything is read (``SAVEPOINT`` / ``RELEASE`` / ``ROLLBACK TO``
      read nothing, and leave it owed).

    A locking SELECT is handled by the row-lock hook (:func:`take_write_lock`), which runs
    first, and pays with a zero busy timeout under ``nowait`` / ``skip_locked``. Before any
    wait for the write lock, :func:`refuse_to_wait_on_ourselves`.
    """
    owed = _owed.get(connection)
    if owed is None:
        return
    if owed.answered is not None:
        answered, owed.answered = owed.answered, None
        if answered is context:
            return
    if not owed.begun and outside(statement):
        return
    if not owed.begun:
        begin = _BEGIN.match(_keyword_start(statement))
        if begin is not None:  # the application begins the transaction itself
            _owed.pop(connection, None)
            begin_sent(connection)
            if (begin.group(1) or "").upper() in ("IMMEDIATE", "EXCLUSIVE"):
                refuse_to_wait_on_ourselves(connection)
                holds_write_lock(connection)
            return
        if adopt_a_transaction_in_progress(connection):
            return
    if _SAVEPOINT.match(statement):
        if not owed.begun:
            _execute_wrapped(connection, cursor, "BEGIN")
            begin_sent(connection)
            if not owed.takes_write_lock:
                _owed.pop(connection, None)
                return
            owed.begun = True
        return
    if not owed.begun and immediate_block.get():
        if not owed.takes_write_lock:  # a deferred BEGIN owed: take the lock with it
            owed.sql = "BEGIN IMMEDIATE"
    elif owed.lazy and not owed.begun and only_reads(context, statement):
        return
    if owed.begun:
        refuse_to_wait_on_ourselves(connection)
        locks = _every_database(cursor)
        wait_for_write_lock(
            connection, cursor, lambda: _take_or_raise(connection, cursor, locks)
        )
        holds_write_lock(connection)
    else:
        if owed.takes_write_lock:
            refuse_to_wait_on_ourselves(connection)
            sql = owed.sql
            wait_for_write_lock(
                connection, cursor, lambda: _execute_wrapped(connection, cursor, sql)
            )
        else:
            _execute_wrapped(connection, cursor, owed.sql)
        begin_sent(connection)
        if owed.takes_write_lock:
            holds_write_lock(connection)
    _owed.pop(connection, None)


def _execute_wrapped(connection: Connection, cursor: DBAPICursor, sql: str) -> None:
    """``cursor.execute(sql)``, a driver error raised as SQLAlchemy's ``DBAPIError`` (as from
    any statement; SQLAlchemy 2.0 does not wrap what a cursor hook raises)."""
    try:
        cursor.execute(sql)
    except Exception as error:
        raise _wrapped(connection, sql, error) from error


def _wrapped(connection: Connection, sql: str, error: Exception) -> Exception:
    dbapi = connection.dialect.loaded_dbapi
    if isinstance(error, dbapi.Error):
        return DBAPIError.instance(sql, (), error, dbapi.Error, dialect=connection.dialect)
    return error


def _take_or_raise(connection: Connection, cursor: DBAPICursor, locks: list[_Lock]) -> None:
    attempt = _Attempt()
    try:
        _take(cursor, locks, attempt)
    except Exception as error:
        failed = attempt.failed.sql if attempt.failed is not None else ""
        raise _wrapped(connection, failed, error) from error


# -- locking statements -----------------------------------------------------------------------


def _outside_a_transaction(plan: LockRequest, why: str) -> UnsupportedLockOption:
    return unsupported(
        plan.capabilities,
        "a row lock outside a transaction",
        reason=(
            f"{why}, so nothing could hold SQLite's write lock (its row lock) past this "
            "statement, and locksafe does not open a transaction SQLAlchemy does not know "
            "about; run the locking SELECT inside a transaction (a Session, engine.begin(), "
            "conn.begin())"
        ),
    )


def _read_only(plan: LockRequest, databases: Sequence[str]) -> UnsupportedLockOption:
    names = ", ".join(databases)
    return unsupported(
        plan.capabilities,
        "a row lock on a read-only database",
        reason=(
            f"this connection opened {names} read-only (mode=ro, immutable=1, a read-only "
            "file, or PRAGMA query_only), so it cannot take the write lock (SQLite's row lock) "
            "of any database the SELECT reads; connections that opened the file read-write "
            "can still change it. Attach it read-write to lock its rows"
        ),
    )


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _is_temporary(table: TableClause) -> bool:
    prefixes = table_prefixes(table) if isinstance(table, Table) else ()
    return any(str(prefix).upper() in ("TEMP", "TEMPORARY") for prefix in prefixes)


@dataclass(frozen=True)
class _Lock:
    """One statement that takes a database's write lock and changes nothing; ``table`` (with
    its ``database``, ``None`` when SQLite resolves the name) when it writes to a table the
    SELECT names, which may turn out to be a view; ``begins`` for a ``BEGIN IMMEDIATE`` /
    ``EXCLUSIVE`` (every database, outside a transaction)."""

    sql: str
    database: str | None = None
    table: str | None = None
    begins: bool = False

    @property
    def what(self) -> str:
        """The database, for a message."""
        if self.database is not None:
            return repr(self.database)
        if self.table is not None:
            return f"the database of {self.table!r}"
        return "every database"


@dataclass
class _Attempt:
    """What one pass over the lock statements did."""

    taken: int = 0
    #: The databases left out because this connection cannot write them.
    read_only: list[str] = field(default_factory=list)
    #: The lock statement whose error is being raised.
    failed: _Lock | None = None


def _locks_for_tables(context: ExecutionContext, tables: Sequence[TableClause]) -> list[_Lock]:
    """One no-op write per database the SELECT's tables live in. A name without a schema is
    resolved by SQLite (temp, main, then each attached database), so each such table gets its
    own; databases come in a fixed order, so that two connections take them in the same order.
    """
    translate = context.execution_options.get("schema_translate_map") or {}
    found: dict[tuple[bool, str, str], _Lock] = {}
    for table in tables:
        schema = translate.get(table.schema, table.schema)
        if _is_temporary(table):
            schema = "temp"
        name = str(table.name)
        key = (schema is not None, schema or "", "" if schema is not None else name.lower())
        if key in found:
            continue
        target = f"{_quote(schema)}.{_quote(name)}" if schema is not None else _quote(name)
        found[key] = _Lock(f"DELETE FROM {target} WHERE 0", schema, name)
    return [found[key] for key in sorted(found)]


def write_lock_sql(context: ExecutionContext, tables: Sequence[TableClause]) -> list[str]:
    """The statements that take the write lock of every database the SELECT's tables (``Table``
    or ``table()``, with their ``.schema``) live in: main, attached schemas, temp."""
    return [lock.sql for lock in _locks_for_tables(context, tables)]


def _database_lock(database: str) -> _Lock:
    """A statement that takes ``database``'s write lock without reading anything first (a read
    would make it unable to wait for the lock) and without knowing its tables. It changes
    nothing, except in an ``auto_vacuum = INCREMENTAL`` database, where it frees at most one
    free page, as that mode's routine maintenance does."""
    return _Lock(f"PRAGMA {_quote(database)}.incremental_vacuum(1)", database)


def _database_list(cursor: DBAPICursor) -> list[tuple[str, str]]:
    """(name, file) of each database of the connection, in SQLite's order (main, temp once it
    is used, then the attached ones); ``file`` is empty for temp and in-memory databases."""
    cursor.execute("PRAGMA database_list")  # reads no database: takes no lock
    return [(str(row[1]), str(row[2] or "")) for row in cursor.fetchall()]


def _every_database(cursor: DBAPICursor) -> list[_Lock]:
    """The write lock of every database of the connection: main, each attached one, and temp
    when it has tables (temp is private to the connection: reading its schema locks nothing
    another connection needs), in SQLite's order, as ``BEGIN IMMEDIATE`` takes them. For a
    SELECT that reads something locksafe cannot name (a textual FROM), and for the write lock a
    transaction still owes, inside a transaction, where ``BEGIN IMMEDIATE`` is refused."""
    locks = []
    for database, _ in _database_list(cursor):
        if database == "temp":
            cursor.execute("SELECT 1 FROM temp.sqlite_master WHERE type = 'table' LIMIT 1")
            if cursor.fetchone() is None:
                continue
        locks.append(_database_lock(database))
    return locks


def _instead_of_table(cursor: DBAPICursor, lock: _Lock, error: BaseException) -> list[_Lock] | None:
    """The locks to take when a table's no-op write was refused as such (the name is a view,
    or a virtual table that cannot be written): the write lock of its database, or of every
    database when SQLite resolves the name or it is in temp (a temporary view may read any
    database). ``None``: the refusal is a lock error (or not SQLite's), raised as it is."""
    if (
        lock.table is None
        or not isinstance(error, sqlite3.Error)
        or _primary_code(error) in (SQLITE_BUSY, SQLITE_LOCKED)
    ):
        return None
    if lock.database is None or lock.database.lower() == "temp":
        return _every_database(cursor)
    return [_database_lock(lock.database)]


def _take(cursor: DBAPICursor, locks: list[_Lock], attempt: _Attempt) -> None:
    """Run each lock statement. A database this connection cannot write (opened read-only, or
    ``PRAGMA query_only``) is left out, as SQLite's own ``BEGIN IMMEDIATE`` leaves it out: its
    write lock does not exist for this connection. Any other error is raised, with the lock
    statement that failed in ``attempt.failed``."""
    for lock in locks:
        try:
            cursor.execute(lock.sql)
        except Exception as error:
            if _is_read_only(error):
                attempt.read_only.append(lock.what)
                continue
            instead = _instead_of_table(cursor, lock, error)
            if instead is None:
                attempt.failed = lock
                raise
            _take(cursor, instead, attempt)
        else:
            attempt.taken += 1


def _fresh(attempt: _Attempt) -> _Attempt:
    """``attempt`` emptied, for another pass over the same lock statements."""
    attempt.taken = 0
    attempt.read_only.clear()
    attempt.failed = None
    return attempt


def _held_by_another(cursor: DBAPICursor, lock: _Lock | None) -> bool | None:
    """Without an extended result code (Python 3.10), tell SQLITE_BUSY (another connection
    holds the write lock ``lock`` asked for: ``True``) from SQLITE_BUSY_SNAPSHOT (that lock is
    free, but this transaction's WAL snapshot of the database is stale: ``False``, also when
    the holder just left; the caller tries again before believing it). ``None``: cannot tell.

    Only the database whose lock statement failed is probed, from a fresh connection, without
    waiting: this transaction does not hold that lock (else its statement would have got it),
    while it may hold another database's, which a probe would mistake for someone else's.
    """
    if lock is None:
        return None
    if lock.begins:
        return True  # no transaction yet, so no snapshot: only another connection refuses it
    databases = _database_list(cursor)
    database = lock.database
    if database is None and lock.table is not None:
        resolved = _resolve(cursor, lock.table, [name for name, _ in databases])
        if resolved is None:
            return None
        database, took_it = resolved
        if took_it:
            return False  # the lock is free now: try again
    path = next((file for name, file in databases if name.lower() == (database or "").lower()), "")
    if not path:
        return None  # temp or in-memory: private to this connection, nobody else locks it
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
    except sqlite3.OperationalError as error:
        return None if _is_read_only(error) else True
    finally:
        probe.close()
    return False


def _resolve(cursor: DBAPICursor, table: str, databases: list[str]) -> tuple[str, bool] | None:
    """The database SQLite found the schema-less name ``table`` in (temp first, then main,
    then the attached ones), by the same no-op write qualified with each database in turn —
    reading no schema (a read would start a snapshot). Also whether that write took the lock
    (it is free now). ``None`` when no database has it."""
    ordered = sorted(databases, key=lambda name: name.lower() != "temp")  # stable: temp first
    for database in ordered:
        try:
            cursor.execute(f"DELETE FROM {_quote(database)}.{_quote(table)} WHERE 0")
        except sqlite3.Error as error:
            if _primary_code(error) != SQLITE_BUSY and str(error).startswith("no such table"):
                continue
            return database, False
        return database, True
    return None


def _no_rows(context: ExecutionContext, statement: str) -> str:
    """The SELECT that ``skip_locked`` runs instead of ``statement`` when every row is locked:
    the same columns, no rows, and nothing read — a read would start a snapshot (WAL) or take
    a shared lock (rollback journal) that the rest of the transaction would have to live with.
    ``statement`` stays in an unused CTE, which SQLite parses (so the parameters still bind)
    but never runs."""
    compiled = getattr(context, "compiled", None)
    names = result_column_names(compiled)
    if not names:  # not a compiled SELECT: keep its columns (this reads the tables)
        return f"SELECT * FROM ({statement}) WHERE 0"
    nulls = ", ".join(f"NULL AS {_quote(name)}" for name in names)
    return f"WITH {_quote('locksafe_skipped')} AS ({statement}) SELECT {nulls} WHERE 0"


def take_write_lock(
    cursor: DBAPICursor,
    context: ExecutionContext,
    plan: LockRequest,
    statement: str,
    tables: Sequence[TableClause],
) -> str | None:
    """Take SQLite's write lock before a locking SELECT; see the module docstring.

    Outside a transaction the lock is taken by the ``BEGIN`` that starts one: the
    ``BEGIN IMMEDIATE`` / ``EXCLUSIVE`` :func:`locksafe.sqlite.configure` owes (see
    :class:`OwedBegin`), else ``BEGIN IMMEDIATE`` (the driver's own transaction, which
    SQLAlchemy commits and rolls back). A connection with no transaction at all (SQLAlchemy's
    ``AUTOCOMMIT``, ``sqlite3``'s ``autocommit=True``) raises
    :class:`~locksafe.UnsupportedLockOption`. Inside a transaction, a no-op write on each
    database the SELECT reads (every database when locksafe cannot name them: ``tables``
    empty, or when the transaction still owes ``configure()``'s write lock).

    ``nowait`` and ``skip_locked`` use a zero busy timeout for the attempt. Under
    ``skip_locked`` a busy database makes the SELECT return no rows (every row is locked by
    the writer) without reading anything, instead of waiting; a write lock ``configure()``
    owes stays owed to the next statement. A stale WAL snapshot (SQLITE_BUSY_SNAPSHOT) always
    raises. Databases this connection opened read-only are left out; when that leaves none,
    :class:`~locksafe.UnsupportedLockOption`.
    """
    requested = plan.effective
    fail_fast = requested.nowait or requested.skip_locked
    connection = context.root_connection
    dbapi_connection = connection.connection.dbapi_connection
    owed = _owed.get(connection)
    if owed is not None and not owed.begun and adopt_a_transaction_in_progress(connection):
        owed = None  # begun by the application or by sqlite3 itself: lock inside it
    if owed is not None and not owed.begun:
        # Takes every database's lock (a deferred BEGIN owed becomes an immediate one).
        locks = [_Lock(owed.sql if owed.takes_write_lock else "BEGIN IMMEDIATE", begins=True)]
    elif owed is not None:
        locks = _every_database(cursor)  # what the BEGIN IMMEDIATE owed would have taken
    elif _in_transaction(dbapi_connection):
        locks = _locks_for_tables(context, tables) if tables else _every_database(cursor)
    elif sqlalchemy_autocommit(connection):
        raise _outside_a_transaction(plan, "the connection is in AUTOCOMMIT isolation")
    elif _driver_autocommit(dbapi_connection):
        raise _outside_a_transaction(
            plan,
            "sqlite3 runs this connection with autocommit=True, where its commit() and "
            "rollback() do nothing (locksafe.sqlite.configure() hands transactions to "
            "SQLAlchemy)",
        )
    else:
        locks = [_Lock("BEGIN IMMEDIATE", begins=True)]  # the driver's own (legacy) transaction
    if not fail_fast:
        refuse_to_wait_on_ourselves(connection)
    saved = _busy_timeout(cursor) if fail_fast else None
    try:
        if saved is not None:
            cursor.execute("PRAGMA busy_timeout = 0")
        for _attempt in range(_SKIP_LOCKED_ATTEMPTS):
            attempt = _Attempt()
            try:
                if not fail_fast and (owed is not None or locks[0].begins):
                    # Nothing read yet in this transaction: wait fairly.
                    wait_for_write_lock(
                        connection,
                        cursor,
                        lambda this=attempt: _take(cursor, locks, _fresh(this)),  # type: ignore[misc]
                    )
                else:
                    _take(cursor, locks, attempt)
            except Exception as exc:
                if not (
                    requested.skip_locked and _primary_code(exc) in (SQLITE_BUSY, SQLITE_LOCKED)
                ):
                    raise
                # Busy, locked (shared cache) or a stale WAL snapshot: whoever holds the lock,
                # or wrote since this transaction's snapshot, has the rows — skip them all. The
                # SELECT reads nothing, and a write lock configure() owes stays owed.
                if (
                    _extended_code(exc) is None
                    and _primary_code(exc) == SQLITE_BUSY
                    and _attempt < _SKIP_LOCKED_ATTEMPTS - 1
                    and not _held_by_another(cursor, attempt.failed)
                ):
                    # Python 3.10, and the lock looks free: the holder just left (take it
                    # now), or this transaction's snapshot is stale (it keeps failing).
                    continue
                if owed is not None:
                    if not owed.begun and not owed.lazy:
                        _execute_wrapped(connection, cursor, "BEGIN")
                        begin_sent(connection)
                        owed.begun = owed.takes_write_lock
                    owed.answered = context
                    if not owed.takes_write_lock and owed.begun is False and not owed.lazy:
                        _owed.pop(connection, None)  # a deferred BEGIN: nothing left owed
                return _no_rows(context, statement)
            if attempt.read_only and not attempt.taken:
                raise _read_only(plan, attempt.read_only)
            if owed is not None:
                _owed.pop(connection, None)
                if locks and locks[0].begins:
                    begin_sent(connection)
            if attempt.taken:
                holds_write_lock(connection)
            return None
    finally:
        if saved is not None:
            cursor.execute(f"PRAGMA busy_timeout = {saved:d}")
    raise AssertionError("unreachable")


def lock_timeout_sql(seconds: float) -> list[str]:
    return [f"PRAGMA busy_timeout = {max(0, round(seconds * 1000)):d}"]


def lock_table_sql(quoted_table: str) -> list[str]:
    # No table locks in SQLite: the database write lock covers every table.
    return [f"DELETE FROM {quoted_table} WHERE 0"]


#: locksafe.lock_timeout: the connection's busy timeout (ms), saved, set and set back.
LOCK_WAIT = LockWaitSetting(
    read_sql="PRAGMA busy_timeout",
    seconds=lambda value: int(value) / 1000,
    value=lambda seconds, dialect: round(min(seconds * 1000, 2**31 - 1)),
    write=lambda value: (f"PRAGMA busy_timeout = {int(value):d}", {}),
)


SUPPORT = DialectSupport(
    names=("sqlite",),
    title="SQLite",
    capabilities=capabilities,
    errors=ERRORS,
    before_locking_select=take_write_lock,
    lock_timeout_sql=lock_timeout_sql,
    lock_wait=LOCK_WAIT,
    lock_table_sql=lock_table_sql,
    documented_versions=(("SQLite 3", "sqlite", None),),
    notes=(
        "SQLAlchemy renders nothing for FOR UPDATE on SQLite; locksafe takes the database "
        "write lock instead (see the row-locks page)."
    ),
)


# -- named locks (locksafe.named_lock): a lock file next to the database ------------------------



try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows: no flock
    _fcntl = None  # type: ignore[assignment]

#: In-memory and temporary databases (private to a process): name -> [shared holders, held
#: exclusively].
_memory_locks: dict[str, list[int]] = {}
_memory_locks_lock = threading.Lock()


def lock_file(database_file: str, name: str) -> str:
    """The lock file of ``name`` for the database at ``database_file``:
    ``<database file>-locksafe-<32 hex digits of BLAKE2b-128(name, UTF-8)>.lock``, next to it.

    >>> lock_file("/srv/app.db", "nightly-report")
    '/srv/app.db-locksafe-10adb6b116f4622b7bfa1f0346dff8bb.lock'
    """
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"{database_file}-locksafe-{digest}.lock"


def _lock_file_key(connection: Connection, name: str) -> Hashable:
    path = main_file(connection.connection.dbapi_connection)
    return ("", name) if not path else (lock_file(path, name), name)


def _check_lock_file(connection: Connection, shared: bool, scope: str) -> None:
    if _fcntl is None:  # pragma: no cover - Windows
        raise UnsupportedLockOption(
            ("named_lock",),
            dialect="sqlite",
            server_version=tuple(sqlite3.sqlite_version_info),
            reason="locksafe's SQLite named locks need flock() (POSIX); not on Windows",
        )


def _attempt_lock_file(key: Hashable, shared: bool) -> object | None:
    path, name = cast("tuple[str, str]", key)
    if not path:
        with _memory_locks_lock:
            state = _memory_locks.setdefault(name, [0, 0])
            if state[1] or (not shared and state[0]):
                return None
            state[0 if shared else 1] += 1
        return ("", name, shared)
    assert _fcntl is not None
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise NamedLockError(f"cannot open the lock file {path!r}: {error}") from error
    try:
        _fcntl.flock(fd, (_fcntl.LOCK_SH if shared else _fcntl.LOCK_EX) | _fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _give_back_lock_file(handle: object) -> None:
    if isinstance(handle, int):
        assert _fcntl is not None
        try:
            _fcntl.flock(handle, _fcntl.LOCK_UN)
        finally:
            os.close(handle)  # closing alone would release it too
        return
    _, name, shared = cast("tuple[str, str, bool]", handle)
    with _memory_locks_lock:
        state = _memory_locks[name]
        state[0 if shared else 1] -= 1
        if state == [0, 0]:
            del _memory_locks[name]


#: A ``flock()`` on a lock file per name next to the database file (shared: ``LOCK_SH``),
#: tried without waiting and polled with short sleeps up to the timeout; an in-memory database
#: gets a lock local to the process. The lock ends with the block, whatever the scope.
NAMED_LOCKS = NamedLockSupport(
    key=_lock_file_key,
    check=_check_lock_file,
    attempt=_attempt_lock_file,
    give_back=_give_back_lock_file,
    describe=lambda key: f"lock file {key[0]!r}" if key[0] else "in-process lock",  # type: ignore[index]
)
