"""PostgreSQL: SQLSTATE codes of every driver, and row-lock capabilities.

All supported PostgreSQL versions (≥ 9.5) have every row-lock option, so the capability table
has no version rules. SQLSTATEs are documented in the PostgreSQL manual, appendix A.
"""

from __future__ import annotations

import hashlib
import math
import math as _math
import re
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Final
from typing import Any as _Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from locksafe.capabilities import LockCapabilities, version_of
from locksafe.dialects.base import (
    Code,
    DialectSupport,
    DriverErrors,
    ErrorContext,
    ErrorTable,
    LockWaitSetting,
    NamedLockSupport,
    autocommit,
    end_own_transaction,
    nowait_detector,
    read_attribute,
    run_sql,
)
from locksafe.kinds import LockErrorKind

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

LOCK_NOT_AVAILABLE = "55P03"
DEADLOCK_DETECTED = "40P01"
SERIALIZATION_FAILURE = "40001"
QUERY_CANCELED = "57014"


def _read_pg8000(exc: BaseException) -> Code | None:
    """pg8000 raises ``DatabaseError({'S': 'ERROR', 'C': '55P03', 'M': ...})``."""
    args = getattr(exc, "args", None)
    if isinstance(args, tuple) and args and isinstance(args[0], dict):
        code = args[0].get("C")
        if isinstance(code, str) and code:
            return code
    return None


# PostgreSQL's own words (the server's ``lc_messages`` is English unless set otherwise). Only
# the primary message is compared, from its start: the relation's name and the CONTEXT line
# ("while locking tuple (0,1) in relation ...") are user data and may contain anything.
_NOWAIT_FAILED = "could not obtain lock"  # "... on row in relation", "... on relation"
_LOCK_TIMEOUT = "canceling statement due to lock timeout"
_STATEMENT_TIMEOUT = "canceling statement due to statement timeout"

# pg8000 carries the server's fields as a dict: str(exc) is its repr; "M" is the message.
_PG8000_MESSAGE = re.compile(r"""['"]M['"]: (?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")""")
_ERROR_PREFIX = re.compile(r"^\s*(?:ERROR|FATAL):\s+")
#: SQLAlchemy 2.0's asyncpg adapter prefixes the message with the asyncpg class:
#: "<class 'asyncpg.exceptions.LockNotAvailableError'>: canceling statement due to ...".
_CLASS_PREFIX = re.compile(r"^\s*<class '[\w.]+'>:\s*")

# What cannot hold a keyword: literals, quoted identifiers, comments.
_NOT_SQL = re.compile(
    r"""(?P<str>[EeBbXxUu]&?'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*')"""
    r"""|(?P<ident>"(?:[^"]|"")*")"""
    r"""|(?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*|)\$.*?\$(?P=tag)\$)"""
    r"""|(?P<comment>--[^\n]*|/\*.*?\*/)""",
    re.DOTALL,
)
_NOWAIT_CLAUSE = re.compile(
    r"\bFOR\s+(?:NO\s+KEY\s+UPDATE|UPDATE|KEY\s+SHARE|SHARE)"
    r"(?:\s+OF\s+[\w$.]+(?:\s*,\s*[\w$.]+)*)?\s+NOWAIT\b"
    r"|^\s*LOCK\b.*\bNOWAIT\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)


#: Whether a statement asks for NOWAIT (a real lock clause, not the word anywhere).
asks_nowait = nowait_detector("postgresql", _NOT_SQL, _NOWAIT_CLAUSE)


def primary_message(message: str) -> str:
    """The server's primary message out of a driver's ``str(exc)``, lower case: its first line
    (psycopg2, psycopg, asyncpg), or the "M" field of pg8000's dict."""
    if message.startswith("{"):
        found = _PG8000_MESSAGE.search(message)
        if found is not None:
            message = found.group(1) if found.group(1) is not None else found.group(2)
    first = _CLASS_PREFIX.sub("", message.partition("\n")[0]).strip()
    if first[:6] in ("ERROR:", "FATAL:"):
        first = _ERROR_PREFIX.sub("", first)
    return first.lower()


def _refine(error: ErrorContext) -> LockErrorKind | None:
    if error.code == LOCK_NOT_AVAILABLE:
        # 55P03 is raised both by NOWAIT ("could not obtain lock on row in relation ...") and by
        # lock_timeout ("canceling statement due to lock timeout"). A NOWAIT statement can time
        # out on a lock NOWAIT does not cover (the table's), so the message decides first; the
        # statement only when the message is not English.
        message = primary_message(error.message)
        if message.startswith(_LOCK_TIMEOUT):
            return LockErrorKind.LOCK_TIMEOUT
        if message.startswith(_NOWAIT_FAILED):
            return LockErrorKind.LOCK_NOT_AVAILABLE
        if error.statement is not None and not asks_nowait(error.statement):
            return LockErrorKind.LOCK_TIMEOUT
        return LockErrorKind.LOCK_NOT_AVAILABLE
    if error.code == QUERY_CANCELED:
        # 57014 is also a cancel "due to user request" (pg_cancel_backend, Ctrl-C): not a
        # time limit.
        if primary_message(error.message).startswith(_STATEMENT_TIMEOUT):
            return LockErrorKind.STATEMENT_TIMEOUT
        return None
    return error.kind


ERRORS = ErrorTable(
    drivers=(
        DriverErrors("psycopg2", ("psycopg2",), read_attribute("pgcode"), ("psycopg2:Error",)),
        DriverErrors(
            "psycopg",
            ("psycopg",),
            read_attribute("sqlstate", "diag.sqlstate"),
            ("psycopg:Error",),
        ),
        # Server errors are PostgresError; asyncpg's client-side errors (InterfaceError) are
        # never lock errors.
        DriverErrors(
            "asyncpg", ("asyncpg",), read_attribute("sqlstate"), ("asyncpg:PostgresError",)
        ),
        # SQLAlchemy's asyncpg adapter re-raises asyncpg errors as its own classes, carrying
        # ``sqlstate`` (and ``pgcode``); the original is its ``__cause__``.
        DriverErrors(
            "asyncpg (SQLAlchemy adapter)",
            ("sqlalchemy.dialects.postgresql.asyncpg",),
            read_attribute("sqlstate", "pgcode"),
            ("sqlalchemy.dialects.postgresql.asyncpg:AsyncAdapt_asyncpg_dbapi.Error",),
        ),
        DriverErrors("pg8000", ("pg8000",), _read_pg8000, ("pg8000:Error",)),
    ),
    codes={
        LOCK_NOT_AVAILABLE: LockErrorKind.LOCK_NOT_AVAILABLE,
        DEADLOCK_DETECTED: LockErrorKind.DEADLOCK,
        SERIALIZATION_FAILURE: LockErrorKind.SERIALIZATION_FAILURE,
        QUERY_CANCELED: LockErrorKind.STATEMENT_TIMEOUT,
    },
    refine=_refine,
)


def capabilities(dialect: Dialect) -> LockCapabilities:
    return LockCapabilities(
        product="PostgreSQL",
        dialect=dialect.name,
        flavour="postgresql",
        server_version=version_of(dialect),
        mechanism="row",
        for_update=True,
        for_share=True,
        key_share=True,
        nowait=True,
        skip_locked=True,
        of=True,
        summary="row locks: FOR [NO KEY] UPDATE / FOR [KEY] SHARE, NOWAIT, SKIP LOCKED, OF",
    )


def lock_timeout_sql(seconds: float) -> list[str]:
    return [f"SET lock_timeout = {max(1, round(seconds * 1000)):d}"]


#: ``lock_timeout`` is whole milliseconds, at most INT_MAX; 0 turns the bound off.
_MAX_LOCK_TIMEOUT_MS = 2**31 - 1
_UNIT_MS = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "min": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}
_SETTING = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def lock_timeout_seconds(value: Any) -> float:
    """``current_setting('lock_timeout')`` (``'0'``, ``'1500ms'``, ``'30s'``, ``'1min'``...) in
    seconds; ``math.inf`` when it is 0 (no bound) or unreadable."""
    found = _SETTING.fullmatch(str(value))
    if found is None:
        return math.inf
    unit = _UNIT_MS.get((found.group(2) or "ms").lower())
    if unit is None:
        return math.inf
    ms = float(found.group(1)) * unit
    return ms / 1000 if ms > 0 else math.inf


def _lock_timeout_value(seconds: float, dialect: Dialect) -> str:
    # 1 ms at least: 0 would mean no bound at all
    ms = min(seconds * 1000, _MAX_LOCK_TIMEOUT_MS)  # before round(): a huge float is fine here
    return f"{min(max(1, round(ms)), _MAX_LOCK_TIMEOUT_MS):d}ms"


def _set_lock_timeout(value: Any) -> tuple[str, dict[str, Any]]:
    # SET LOCAL, with the value as a bound parameter (is_local = true: until the transaction
    # ends, or until set back)
    return "SELECT set_config('lock_timeout', :value, true)", {"value": str(value)}


#: PostgreSQL: the value before (returned), and ``lock_timeout`` set for the transaction; with
#: ``only_lower``, to the value asked for only where that is tighter (0 is no bound at all).
#: ``OFFSET 0`` keeps the read in its own step, before ``set_config``.
_PG_READ_AND_SET: Final = (
    "SELECT lt.previous, set_config('lock_timeout', {value}, true) "
    "FROM (SELECT current_setting('lock_timeout') AS previous OFFSET 0) AS lt"
)
_PG_LOWER: Final = (
    "CASE WHEN lt.previous::interval > interval '0' "
    "AND lt.previous::interval <= make_interval(secs => :bound) "
    "THEN lt.previous ELSE :value END"
)


def _read_and_set(
    conn: Connection,
    setting: LockWaitSetting,
    wanted: _Any,
    only_lower: bool,
    on_dbapi: Callable[[Connection, str], _Any],
) -> tuple[str, dict[str, _Any]] | None:
    sql = _PG_READ_AND_SET.format(value=_PG_LOWER if only_lower else ":value")
    params: dict[str, _Any] = {"value": str(wanted)}
    if only_lower:
        params["bound"] = setting.seconds(wanted)
    previous = conn.execute(text(sql), params).one()[0]
    if only_lower and setting.seconds(previous) <= setting.seconds(wanted):
        return None  # already bounded at least as tightly: left as it was
    return setting.write(previous)


LOCK_WAIT = LockWaitSetting(
    read_sql="SELECT current_setting('lock_timeout')",
    seconds=lock_timeout_seconds,
    value=_lock_timeout_value,
    write=_set_lock_timeout,
    transaction_scoped=True,
    read_and_set=_read_and_set,
)


def lock_table_sql(quoted_table: str) -> list[str]:
    return [f"LOCK TABLE {quoted_table} IN ACCESS EXCLUSIVE MODE"]


SUPPORT = DialectSupport(
    names=("postgresql",),
    title="PostgreSQL",
    capabilities=capabilities,
    errors=ERRORS,
    lock_timeout_sql=lock_timeout_sql,
    lock_wait=LOCK_WAIT,
    lock_table_sql=lock_table_sql,
    # Any error aborts the whole transaction ("current transaction is aborted, commands
    # ignored until end of transaction block", 25P02) until ROLLBACK or ROLLBACK TO SAVEPOINT;
    # COMMIT then answers ROLLBACK, and no driver raises.
    errors_abort_transaction=True,
    # A waiting transaction looks for a deadlock only after deadlock_timeout (1 s by default;
    # a superuser setting).
    deadlock_detection_delayed=True,
    documented_versions=(("PostgreSQL ≥ 9.5", "postgresql", (15, 0)),),
    notes=(
        "Any error aborts a PostgreSQL transaction, and a later COMMIT silently rolls it back: "
        "`nowait` locking SELECTs inside a transaction run in a savepoint (a caught NOWAIT "
        "failure leaves the transaction usable), and a COMMIT after another lock error that "
        "was not rolled back to a savepoint raises `TransactionAborted`."
    ),
)


# -- named locks (locksafe.named_lock): advisory locks ------------------------------------------


#: ``connection_record.info`` key: ``current_database()``, read once per DB-API connection.
_DATABASE = "locksafe.named_locks.postgresql.database"
_SAVEPOINT = "locksafe_named_lock"
#: ``lock_timeout`` is whole milliseconds up to INT_MAX.
_MAX_WAIT_MS = 2**31 - 1


def advisory_key(name: str, database: str) -> int:
    """The advisory-lock key of ``name`` in ``database``: the first 8 bytes of
    BLAKE2b(``"locksafe:" + database + ":" + name``, UTF-8), read as a big-endian signed
    64-bit integer (what ``pg_locks`` shows as ``(classid << 32) | objid`` with ``objsubid``
    1).

    >>> advisory_key("nightly-report", "app")
    -5540825221937243856
    """
    data = f"locksafe:{database}:{name}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


def _advisory_key(connection: Connection, name: str) -> Hashable:
    info = connection.connection.info
    database = info.get(_DATABASE)
    if database is None:
        row = run_sql(
            connection.dialect, connection.connection.dbapi_connection, "SELECT current_database()"
        )
        end_own_transaction(connection)
        assert row is not None
        database = info[_DATABASE] = str(row[0])
    return advisory_key(name, database)


def _advisory_function(scope: str, shared: bool, *, try_once: bool) -> str:
    return (
        ("pg_try_advisory" if try_once else "pg_advisory")
        + ("_xact" if scope == "transaction" else "")
        + "_lock"
        + ("_shared" if shared else "")
    )


def _advisory_acquire(
    connection: Connection, key: Hashable, shared: bool, scope: str, timeout: float | None
) -> bool:
    dialect = connection.dialect
    dbapi_connection = connection.connection.dbapi_connection
    if timeout == 0:
        function = _advisory_function(scope, shared, try_once=True)
        row = run_sql(
            dialect, dbapi_connection, f"SELECT {function}(CAST(:key AS BIGINT))", {"key": key}
        )
        end_own_transaction(connection)
        return bool(row and row[0])
    # One statement: set lock_timeout for this transaction (SET LOCAL), wait for the lock, set
    # the old value back (the concatenation runs the lock call first). A wait that runs out
    # raises 55P03; inside the caller's transaction it is rolled back to a savepoint, which
    # also undoes the SET LOCAL.
    wait_ms = 0 if timeout is None else min(_MAX_WAIT_MS, max(1, _math.ceil(timeout * 1000)))
    function = _advisory_function(scope, shared, try_once=False)
    sql = (
        f"SELECT CAST({function}(CAST(:key AS BIGINT)) AS TEXT)"
        " || set_config('lock_timeout', s.old, true)"
        " FROM (SELECT current_setting('lock_timeout') AS old,"
        " set_config('lock_timeout', :wait, true) AS new) AS s"
    )
    # AUTOCOMMIT: SQLAlchemy may call it a transaction, the server has none (no SAVEPOINT)
    in_transaction = connection.in_transaction() and not autocommit(connection)
    if in_transaction:
        run_sql(dialect, dbapi_connection, f"SAVEPOINT {_SAVEPOINT}")
    try:
        run_sql(dialect, dbapi_connection, sql, {"key": key, "wait": f"{wait_ms}ms"})
    except DBAPIError:
        if in_transaction:
            run_sql(dialect, dbapi_connection, f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            run_sql(dialect, dbapi_connection, f"RELEASE SAVEPOINT {_SAVEPOINT}")
        elif dbapi_connection is not None and not autocommit(connection):
            dbapi_connection.rollback()
        raise
    if in_transaction:
        run_sql(dialect, dbapi_connection, f"RELEASE SAVEPOINT {_SAVEPOINT}")
    else:
        end_own_transaction(connection)
    return True


def _advisory_release(
    dialect: Dialect, dbapi_connection: _Any, key: Hashable, shared: bool, scope: str
) -> bool:
    function = "pg_advisory_unlock_shared" if shared else "pg_advisory_unlock"
    sql = f"SELECT {function}(CAST(:key AS BIGINT))"
    row = run_sql(dialect, dbapi_connection, sql, {"key": key})
    return bool(row and row[0])


#: Advisory locks: ``pg_advisory_xact_lock`` (scope="transaction": the server ends it with the
#: transaction) or ``pg_advisory_lock`` (scope="session": released at the block's end), and
#: their ``_shared`` and ``pg_try_`` variants; the wait bounded by ``lock_timeout``.
NAMED_LOCKS = NamedLockSupport(
    key=_advisory_key,
    holds_in_transaction=lambda scope: scope == "transaction",
    acquire=_advisory_acquire,
    release=_advisory_release,
    needs_release=lambda scope: scope == "session",
    describe=lambda key: f"advisory lock key {key}",
)
