"""SQLite: SQLITE_BUSY / SQLITE_LOCKED families, and row locks as the database write lock.

SQLite has no row locks, and SQLAlchemy renders nothing for ``with_for_update()`` there. A
transaction that must not race takes SQLite's single write lock (RESERVED, or the WAL write
lock) *before* its SELECT runs and keeps it until it ends; locksafe does that with a write
statement that changes nothing (``DELETE FROM t WHERE 0``), which waits for the busy timeout
like any write, and fails at once with SQLITE_BUSY_SNAPSHOT when a WAL snapshot the transaction
already read is stale (the write lock can then never be had: the transaction must start again).

Result codes: https://www.sqlite.org/rescode.html (primary code = extended code & 0xFF).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from locksafe.capabilities import LockCapabilities, version_of
from locksafe.dialects import (
    Code,
    DialectSupport,
    DriverErrors,
    ErrorTable,
)
from locksafe.kinds import LockErrorKind

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Dialect
    from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext

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


_SKIP_LOCKED_ATTEMPTS = 3


def _probe_busy(cursor: DBAPICursor) -> int | None:
    """Without an extended result code (Python 3.10), tell SQLITE_BUSY (another connection
    holds the write lock) from SQLITE_BUSY_SNAPSHOT (the lock is free, but this transaction's
    WAL snapshot is stale): try the write lock from a fresh connection, without waiting.
    SQLITE_BUSY means someone holds it; SQLITE_BUSY_SNAPSHOT only that it was free a moment
    later, so the caller tries its own lock again before believing it."""
    cursor.execute("PRAGMA database_list")
    path = next((row[2] for row in cursor.fetchall() if row[1] == "main"), None)
    if not path:
        return None
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
    except sqlite3.OperationalError:
        return SQLITE_BUSY
    finally:
        probe.close()
    return SQLITE_BUSY_SNAPSHOT


def _in_transaction(dbapi_connection: Any) -> bool:
    for candidate in (dbapi_connection, getattr(dbapi_connection, "_connection", None)):
        value = getattr(candidate, "in_transaction", None)
        if isinstance(value, bool):
            return value
    return True


def _is_temporary(table: Table) -> bool:
    return any(str(prefix).upper() in ("TEMP", "TEMPORARY") for prefix in table._prefixes)


def write_lock_sql(context: ExecutionContext, tables: Sequence[Table]) -> list[str]:
    """The statements that take the write lock of every database the SELECT reads (one per
    database: main, each attached schema, and temp)."""
    preparer = context.dialect.identifier_preparer
    seen: set[tuple[str | None, bool]] = set()
    statements = []
    for table in tables:
        database = (table.schema, _is_temporary(table))
        if database in seen:
            continue
        seen.add(database)
        statements.append(f"DELETE FROM {preparer.format_table(table)} WHERE 0")
    return statements


def _any_main_table(cursor: DBAPICursor) -> list[str]:
    """A no-op write on some table of the main database, for a SELECT whose tables SQLAlchemy
    cannot see (a textual FROM) inside a transaction, where ``BEGIN IMMEDIATE`` is refused."""
    cursor.execute(
        "SELECT name FROM main.sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY rowid LIMIT 1"
    )
    row = cursor.fetchone()
    if not row:
        return []  # no table in the database: nothing a SELECT could read there
    quoted = '"' + str(row[0]).replace('"', '""') + '"'
    return [f"DELETE FROM main.{quoted} WHERE 0"]


def take_write_lock(
    cursor: DBAPICursor,
    context: ExecutionContext,
    plan: RowLockPlan,
    statement: str,
    tables: Sequence[Table],
) -> str | None:
    """Take SQLite's write lock before a locking SELECT; see the module docstring.

    ``nowait`` and ``skip_locked`` use a zero busy timeout for the attempt. Under
    ``skip_locked`` a busy database makes the SELECT return no rows (every row is locked by
    the writer) instead of waiting; a stale WAL snapshot (SQLITE_BUSY_SNAPSHOT) always raises.
    """
    requested = plan.effective
    fail_fast = requested.nowait or requested.skip_locked
    dbapi_connection = context.root_connection.connection.dbapi_connection
    if not _in_transaction(dbapi_connection):
        statements = ["BEGIN IMMEDIATE"]
    else:
        statements = write_lock_sql(context, tables)
    saved = _busy_timeout(cursor) if fail_fast else None
    try:
        if saved is not None:
            cursor.execute("PRAGMA busy_timeout = 0")
        if not statements:
            statements = _any_main_table(cursor)
        for _attempt in range(_SKIP_LOCKED_ATTEMPTS):
            try:
                for sql in statements:
                    cursor.execute(sql)
                return None
            except Exception as exc:
                if not (requested.skip_locked and _primary_code(exc) == SQLITE_BUSY):
                    raise
                extended = _extended_code(exc)
                if extended == SQLITE_BUSY_SNAPSHOT:
                    raise
                if extended is not None or _probe_busy(cursor) == SQLITE_BUSY:
                    return f"SELECT * FROM ({statement}) WHERE 0"
                # Python 3.10, and the lock looks free: either the holder just left (take it
                # now) or this transaction's snapshot is stale (it keeps failing: raise).
                if _attempt == _SKIP_LOCKED_ATTEMPTS - 1:
                    raise
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
