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

import re
import sqlite3
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Table
from sqlalchemy.exc import DBAPIError, InvalidRequestError

from locksafe.capabilities import LockCapabilities, unsupported, version_of
from locksafe.dialects import (
    Code,
    DialectSupport,
    DriverErrors,
    ErrorTable,
)
from locksafe.kinds import LockErrorKind, UnsupportedLockOption

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext
    from sqlalchemy.sql.expression import TableClause

    from locksafe.rowlocks import RowLockPlan

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
    inner = getattr(dbapi_connection, "_connection", None)  # the adapter's aiosqlite.Connection
    run = getattr(inner, "_execute", None)
    if run is None or isinstance(dbapi_connection, sqlite3.Connection):
        return fn(dbapi_connection)
    from sqlalchemy.util import await_only

    result: T = await_only(run(fn, inner._conn))  # type: ignore[union-attr]
    return result


def sqlalchemy_autocommit(connection: Connection) -> bool:
    """SQLAlchemy runs this connection in ``AUTOCOMMIT`` isolation: it opens no transaction."""
    check = getattr(connection, "_is_autocommit_isolation", None)
    if callable(check):
        return bool(check())
    return connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT"


def _driver_autocommit(dbapi_connection: Any) -> bool:
    """Python ≥ 3.12's ``sqlite3`` in ``autocommit=True``: ``commit()`` and ``rollback()`` do
    nothing, so a ``BEGIN`` sent behind its back would never end."""
    if getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", None) is None:
        return False
    return on_sqlite3(dbapi_connection, lambda conn: getattr(conn, "autocommit", None) is True)


def _in_transaction(dbapi_connection: Any, unknown: bool = True) -> bool:
    for candidate in (dbapi_connection, getattr(dbapi_connection, "_connection", None)):
        value = getattr(candidate, "in_transaction", None)
        if isinstance(value, bool):
            return value
    return unknown


def refuse_a_transaction_in_progress(connection: Connection) -> None:
    """Before ``connection`` sends the ``BEGIN`` of its transaction: raise when its ``sqlite3``
    connection is already in a transaction, which is then not this ``Connection``'s. SQLite has
    one transaction per connection, and SQLAlchemy's COMMIT / ROLLBACK of either ``Connection``
    would end the other's (a ``BEGIN`` sent anyway fails, and SQLAlchemy's clean-up after that
    failure rolls the other transaction back)."""
    if _in_transaction(connection.connection.dbapi_connection, unknown=False):
        raise InvalidRequestError(
            "this SQLAlchemy Connection's sqlite3 connection is already in a transaction it did "
            "not begin: another Connection sharing the same sqlite3 connection "
            "(SingletonThreadPool for sqlite:// within one thread, StaticPool) is in a "
            "transaction, or BEGIN was sent on the raw DB-API connection. SQLite has one "
            "transaction per connection: end the other transaction first, or give each "
            "Connection its own sqlite3 connection (a file database and the default pool)"
        )


# -- the BEGIN that configure(begin="immediate" | "exclusive") owes ------------------------------


@dataclass
class OwedBegin:
    """What :func:`locksafe.sqlite.configure` still owes one SQLAlchemy ``Connection``'s
    transaction under ``begin="immediate"`` / ``"exclusive"``: the ``BEGIN`` itself, sent right
    before the transaction's first statement (when that statement is known), or — once a plain
    ``BEGIN`` went out — the write lock that ``BEGIN IMMEDIATE`` would have taken."""

    #: ``"BEGIN IMMEDIATE"`` or ``"BEGIN EXCLUSIVE"``.
    sql: str
    #: A plain ``BEGIN`` was sent (the first statement was a ``SAVEPOINT``, or a
    #: ``skip_locked`` SELECT found the database busy); nothing has been read since, and the
    #: write lock is taken before the next statement that reads or writes.
    begun: bool = False
    #: The execution whose ``skip_locked`` SELECT the row-lock hook answered with no rows
    #: (it already did what this statement owed).
    answered: Any = None


#: Per SQLAlchemy ``Connection`` (weakly: an entry goes with its connection). Not in
#: ``Connection.info``, which belongs to the DB-API connection and is shared by every
#: ``Connection`` that uses it (``SingletonThreadPool``, ``StaticPool``): each transaction's
#: debt is paid or forgotten by its own connection only.
_owed: weakref.WeakKeyDictionary[Connection, OwedBegin] = weakref.WeakKeyDictionary()

#: Statements that read nothing and take no lock: a SAVEPOINT opening a transaction leaves the
#: write lock owed to the next statement.
_SAVEPOINT = re.compile(r"\s*(SAVEPOINT|RELEASE|ROLLBACK\s+TO)\b", re.IGNORECASE)


def owe_begin(connection: Connection, sql: str) -> None:
    """Record that ``connection``'s new transaction still needs ``sql`` (``BEGIN IMMEDIATE``
    or ``BEGIN EXCLUSIVE``); see :func:`pay_owed_begin`."""
    _owed[connection] = OwedBegin(sql)


def forget_owed_begin(connection: Connection) -> None:
    """``connection``'s transaction ended: it owes nothing any more."""
    _owed.pop(connection, None)


def pay_owed_begin(
    connection: Connection,
    cursor: DBAPICursor,
    context: ExecutionContext | None,
    statement: str,
) -> None:
    """Right before a statement of ``connection``'s transaction, send what the transaction
    still owes (see :class:`OwedBegin`):

    - nothing sent yet: the ``BEGIN IMMEDIATE`` / ``EXCLUSIVE``, waiting the busy timeout —
      except before a ``SAVEPOINT``, which gets a plain ``BEGIN`` and leaves the write lock
      owed to the next statement (a ``nowait`` / ``skip_locked`` SELECT there must not wait);
    - a plain ``BEGIN`` sent: the write lock of every database of the connection, waiting the
      busy timeout, before anything is read (``SAVEPOINT`` / ``RELEASE`` / ``ROLLBACK TO``
      read nothing, and leave it owed).

    A locking SELECT is handled by the row-lock hook (:func:`take_write_lock`), which runs
    first, and pays with a zero busy timeout under ``nowait`` / ``skip_locked``.
    """
    owed = _owed.get(connection)
    if owed is None:
        return
    if owed.answered is not None:
        answered, owed.answered = owed.answered, None
        if answered is context:
            return
    if _SAVEPOINT.match(statement):
        if not owed.begun:
            refuse_a_transaction_in_progress(connection)
            _execute_wrapped(connection, cursor, "BEGIN")
            owed.begun = True
        return
    if owed.begun:
        _take_or_raise(connection, cursor, _every_database(cursor))
    else:
        refuse_a_transaction_in_progress(connection)
        _execute_wrapped(connection, cursor, owed.sql)
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


def _outside_a_transaction(plan: RowLockPlan, why: str) -> UnsupportedLockOption:
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


def _read_only(plan: RowLockPlan, databases: Sequence[str]) -> UnsupportedLockOption:
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
    prefixes = getattr(table, "_prefixes", ()) if isinstance(table, Table) else ()
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
    columns = getattr(compiled, "_result_columns", None) or ()
    names = [str(entry[1]) for entry in columns]
    if not names:  # not a compiled SELECT: keep its columns (this reads the tables)
        return f"SELECT * FROM ({statement}) WHERE 0"
    nulls = ", ".join(f"NULL AS {_quote(name)}" for name in names)
    return f"WITH {_quote('locksafe_skipped')} AS ({statement}) SELECT {nulls} WHERE 0"


def take_write_lock(
    cursor: DBAPICursor,
    context: ExecutionContext,
    plan: RowLockPlan,
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
    if owed is not None and not owed.begun:
        refuse_a_transaction_in_progress(connection)
        locks = [_Lock(owed.sql, begins=True)]  # takes every database's lock
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
    saved = _busy_timeout(cursor) if fail_fast else None
    try:
        if saved is not None:
            cursor.execute("PRAGMA busy_timeout = 0")
        for _attempt in range(_SKIP_LOCKED_ATTEMPTS):
            attempt = _Attempt()
            try:
                _take(cursor, locks, attempt)
            except Exception as exc:
                if not (requested.skip_locked and _primary_code(exc) == SQLITE_BUSY):
                    raise
                extended = _extended_code(exc)
                if extended == SQLITE_BUSY_SNAPSHOT:
                    raise
                if extended is not None or _held_by_another(cursor, attempt.failed):
                    if owed is not None:  # the write lock stays owed to the next statement
                        if not owed.begun:
                            _execute_wrapped(connection, cursor, "BEGIN")
                            owed.begun = True
                        owed.answered = context
                    return _no_rows(context, statement)
                # Python 3.10, and the lock looks free: either the holder just left (take it
                # now) or this transaction's snapshot is stale (it keeps failing: raise).
                if _attempt == _SKIP_LOCKED_ATTEMPTS - 1:
                    raise
                continue
            if attempt.read_only and not attempt.taken:
                raise _read_only(plan, attempt.read_only)
            if owed is not None:
                _owed.pop(connection, None)
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


SUPPORT = DialectSupport(
    names=("sqlite",),
    title="SQLite",
    capabilities=capabilities,
    errors=ERRORS,
    before_locking_select=take_write_lock,
    lock_timeout_sql=lock_timeout_sql,
    lock_table_sql=lock_table_sql,
    documented_versions=(("SQLite 3", "sqlite", None),),
    notes=(
        "SQLAlchemy renders nothing for FOR UPDATE on SQLite; locksafe takes the database "
        "write lock instead (see the row-locks page)."
    ),
)
