"""MySQL and MariaDB: error numbers of every driver, and version-dependent row-lock rules.

Error numbers come from the MySQL server error reference and MariaDB's error-code list; a
MariaDB server reports a failed ``NOWAIT`` as 1205 (``ER_LOCK_WAIT_TIMEOUT``), MySQL 8 as
3572 (``ER_LOCK_NOWAIT``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Final
from typing import Any as _Any

from sqlalchemy.engine import Connection

from locksafe._sa import prime_mysql_dialect
from locksafe.capabilities import LockCapabilities, version_of
from locksafe.dialects.base import (
    DialectSupport,
    DriverErrors,
    ErrorContext,
    ErrorTable,
    LockWaitSetting,
    NamedLockSupport,
    end_own_transaction,
    nowait_detector,
    read_attribute,
    read_first_int_arg,
    run_sql,
)
from locksafe.kinds import LockErrorKind, NamedLockError, UnsupportedLockOption

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

ER_RECORD_CHANGED = 1020  # MariaDB: "Record has changed since last read" (snapshot isolation)
ER_LOCK_WAIT_TIMEOUT = 1205
ER_LOCK_DEADLOCK = 1213
ER_STATEMENT_TIMEOUT = 1969  # MariaDB max_statement_time
ER_QUERY_TIMEOUT = 3024  # MySQL max_execution_time
ER_USER_LOCK_DEADLOCK = 3058  # MySQL GET_LOCK deadlock
ER_LOCK_NOWAIT = 3572  # MySQL 8 NOWAIT

# What cannot hold a keyword: literals ('...', "..." unless ANSI_QUOTES), `quoted names`,
# comments (#, -- , /* */).
_NOT_SQL = re.compile(
    r"""(?P<str>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")"""
    r"""|(?P<ident>`(?:[^`]|``)*`)"""
    r"""|(?P<comment>\#[^\n]*|--(?=\s|$)[^\n]*|/\*.*?\*/)""",
    re.DOTALL | re.MULTILINE,
)
_NOWAIT_CLAUSE = re.compile(
    # SELECT ... FOR UPDATE / FOR SHARE [OF t, ...] NOWAIT, ... LOCK IN SHARE MODE NOWAIT
    r"\b(?:FOR\s+(?:UPDATE|SHARE)(?:\s+OF\s+[\w$.]+(?:\s*,\s*[\w$.]+)*)?"
    r"|LOCK\s+IN\s+SHARE\s+MODE)\s+NOWAIT\b"
    # MariaDB's DDL and LOCK TABLES: ALTER TABLE t NOWAIT ..., LOCK TABLES t WRITE NOWAIT
    r"|^\s*(?:ALTER|CREATE|DROP|RENAME|TRUNCATE|OPTIMIZE|LOCK)\b.*\bNOWAIT\b",
    re.IGNORECASE | re.DOTALL,
)


#: Whether a statement asks for NOWAIT (a real lock clause, not the word anywhere).
asks_nowait = nowait_detector("mysql", _NOT_SQL, _NOWAIT_CLAUSE)


def _refine(error: ErrorContext) -> LockErrorKind | None:
    if (
        error.code == ER_LOCK_WAIT_TIMEOUT
        and error.statement is not None
        and asks_nowait(error.statement)
    ):
        # MariaDB answers a failed NOWAIT with 1205, like a lock wait that timed out; the
        # message is the same, only the statement tells them apart.
        return LockErrorKind.LOCK_NOT_AVAILABLE
    return error.kind


ERRORS = ErrorTable(
    drivers=(
        # PyMySQL and aiomysql (which raises PyMySQL's classes) carry (errno, message) in args.
        DriverErrors("pymysql", ("pymysql",), read_first_int_arg, ("pymysql:Error",)),
        DriverErrors("aiomysql", ("aiomysql",), read_first_int_arg, ("pymysql:Error",)),
        DriverErrors("mysqlclient", ("MySQLdb",), read_first_int_arg, ("MySQLdb:Error",)),
        DriverErrors("asyncmy", ("asyncmy",), read_first_int_arg, ("asyncmy.errors:Error",)),
        DriverErrors(
            "mysql-connector",
            ("mysql.connector",),
            read_attribute("errno"),
            ("mysql.connector:Error",),
        ),
        DriverErrors("mariadb", ("mariadb",), read_attribute("errno"), ("mariadb:Error",)),
        # SQLAlchemy's async adapters may re-raise driver errors as their own classes with the
        # driver's args; the original is the ``__cause__``.
        DriverErrors(
            "SQLAlchemy MySQL async adapter",
            ("sqlalchemy.dialects.mysql.aiomysql", "sqlalchemy.dialects.mysql.asyncmy"),
            read_first_int_arg,
        ),
    ),
    codes={
        ER_RECORD_CHANGED: LockErrorKind.SERIALIZATION_FAILURE,
        ER_LOCK_WAIT_TIMEOUT: LockErrorKind.LOCK_TIMEOUT,
        ER_LOCK_DEADLOCK: LockErrorKind.DEADLOCK,
        ER_USER_LOCK_DEADLOCK: LockErrorKind.DEADLOCK,
        ER_LOCK_NOWAIT: LockErrorKind.LOCK_NOT_AVAILABLE,
        ER_QUERY_TIMEOUT: LockErrorKind.STATEMENT_TIMEOUT,
        ER_STATEMENT_TIMEOUT: LockErrorKind.STATEMENT_TIMEOUT,
    },
    refine=_refine,
)

#: (flavour, first version, feature): a feature is available from that version on.
VERSION_RULES: tuple[tuple[str, tuple[int, ...], str], ...] = (
    ("mysql", (8, 0, 1), "nowait"),
    ("mysql", (8, 0, 1), "skip_locked"),
    ("mysql", (8, 0, 1), "of"),
    ("mariadb", (10, 3, 0), "nowait"),
    ("mariadb", (10, 6, 0), "skip_locked"),
)

#: The version assumed before the first connection tells the real one: the oldest supported.
OLDEST = {"mysql": (5, 7), "mariadb": (10, 2)}


def capabilities(dialect: Dialect) -> LockCapabilities:
    flavour = "mariadb" if getattr(dialect, "is_mariadb", False) else "mysql"
    version = version_of(dialect)
    effective = version or OLDEST[flavour]
    features = {
        feature
        for rule_flavour, since, feature in VERSION_RULES
        if rule_flavour == flavour and effective >= since
    }
    return LockCapabilities(
        product="MariaDB" if flavour == "mariadb" else "MySQL",
        dialect=dialect.name,
        flavour=flavour,
        server_version=version,
        mechanism="row",
        for_update=True,
        for_share=True,
        nowait="nowait" in features,
        skip_locked="skip_locked" in features,
        of="of" in features,
        summary=(
            "InnoDB row locks: FOR UPDATE, "
            + ("FOR SHARE" if flavour == "mysql" and "of" in features else "LOCK IN SHARE MODE")
            + "".join(f", {f.replace('_', ' ').upper()}" for f in sorted(features))
        ),
    )


def lock_timeout_sql(seconds: float) -> list[str]:
    # innodb_lock_wait_timeout is whole seconds, at least 1 (MariaDB also accepts 0 = NOWAIT).
    return [f"SET SESSION innodb_lock_wait_timeout = {max(1, round(seconds)):d}"]


#: ``innodb_lock_wait_timeout``'s upper limits (MariaDB's means no limit).
_MAX_LOCK_WAIT_TIMEOUT = {"mysql": 1073741824, "mariadb": 100000000}


def _lock_wait_timeout_value(seconds: float, dialect: Dialect) -> int:
    """Whole seconds, the nearest (halves up), at least 1: MySQL's minimum. MariaDB takes 0
    (no wait) too, which only 0 asks for: 0.3 s waits 1 s, not none."""
    mariadb = bool(getattr(dialect, "is_mariadb", False))
    if seconds == 0 and mariadb:
        return 0
    whole = max(1, int(seconds + 0.5))  # seconds ≥ 0: int() is floor()
    return min(whole, _MAX_LOCK_WAIT_TIMEOUT["mariadb" if mariadb else "mysql"])


def _set_lock_wait_timeout(value: Any) -> tuple[str, dict[str, Any]]:
    # a number locksafe made or read from the server, written as a literal: no parameters,
    # so that the same SQL also runs on the bare DB-API connection
    number = float(value)
    literal = f"{int(number):d}" if number.is_integer() else repr(number)
    return f"SET SESSION innodb_lock_wait_timeout = {literal}", {}


#: A session variable: saved, set, and set back (also before the pool takes the connection).
#: MySQL / MariaDB: ``innodb_lock_wait_timeout`` saved in a user variable of the connection and
#: set (with ``only_lower``, to the lower of the two), in one statement; set back from that
#: variable, at the block's end or by the pool. A connection-scoped form keeps the value in one
#: place on the server, so only the outermost block on a connection uses it (a block inside
#: another, which is rare, reads and sets the generic way).
_MYSQL_SAVED: Final = "@locksafe_innodb_lock_wait_timeout"
_MYSQL_SAVE_AND_SET: Final = (
    f"SET {_MYSQL_SAVED} = @@SESSION.innodb_lock_wait_timeout, "
    "SESSION innodb_lock_wait_timeout = {value}"
)




def _read_and_set(
    conn: Connection,
    setting: LockWaitSetting,
    wanted: _Any,
    only_lower: bool,
    on_dbapi: Callable[[Connection, str], _Any],
) -> tuple[str, dict[str, _Any]] | None:
    number = float(wanted)
    value = f"{int(number):d}" if number.is_integer() else repr(number)
    if only_lower:
        value = f"LEAST(@@SESSION.innodb_lock_wait_timeout, {value})"
    on_dbapi(conn, _MYSQL_SAVE_AND_SET.format(value=value))
    return f"SET SESSION innodb_lock_wait_timeout = {_MYSQL_SAVED}", {}


LOCK_WAIT = LockWaitSetting(
    read_sql="SELECT @@SESSION.innodb_lock_wait_timeout",
    seconds=float,
    value=_lock_wait_timeout_value,
    write=_set_lock_wait_timeout,
    read_and_set=_read_and_set,
)


def lock_table_sql(quoted_table: str) -> list[str]:
    # LOCK TABLES would commit the transaction; locking every row (and gap) of the table with
    # a locking read blocks every writer and every locking reader of it, transactionally.
    return [f"SELECT 1 FROM {quoted_table} FOR UPDATE"]


def offline_dialect(name: str, version: tuple[int, ...] | None) -> Dialect:
    """A MySQL/MariaDB dialect as after its first connection: SQLAlchemy parses the version
    string (setting ``server_version_info`` and ``is_mariadb``), then the vendor's
    initialisation sets its version flags (``supports_for_update_of``,
    ``use_mysql_for_share``...) as ``initialize()`` does on a real connection."""
    from sqlalchemy.engine import make_url

    dialect: Any = make_url(f"{name}://").get_dialect()()
    if version is not None:
        suffix = "-MariaDB-log" if name == "mariadb" else "-log"
        prime_mysql_dialect(dialect, ".".join(map(str, version)) + suffix)
    return dialect  # type: ignore[no-any-return]


SUPPORT = DialectSupport(
    names=("mysql", "mariadb"),
    title="MySQL / MariaDB",
    capabilities=capabilities,
    errors=ERRORS,
    lock_timeout_sql=lock_timeout_sql,
    lock_wait=LOCK_WAIT,
    lock_table_sql=lock_table_sql,
    version_dependent=True,
    offline_dialect=offline_dialect,
    # MariaDB Connector/Python: with stream_results, a failed NOWAIT or a lock-wait timeout
    # while rows are fetched ends the result early and raises nothing (seen with 1.1.14 against
    # MariaDB 10.11: 1499 of 2000 rows, no error).
    streaming_loses_errors=("mariadbconnector",),
    # InnoDB answers a deadlock by rolling back the whole transaction (savepoints included);
    # the connection goes on in a new one. A lock wait timeout (1205) undoes only the statement
    # (unless the server runs with innodb_rollback_on_timeout=ON, which locksafe cannot see).
    transaction_rollback_codes=frozenset({ER_LOCK_DEADLOCK}),
    notes=(
        "InnoDB rolls back the whole transaction on a deadlock (1213) and carries on in a new "
        "one: a COMMIT after a deadlock locksafe saw on that connection raises "
        "`TransactionAborted` instead of committing only the work done after it."
    ),
    documented_versions=(
        ("MySQL 5.7", "mysql", (5, 7, 44)),
        ("MySQL ≥ 8.0.1", "mysql", (8, 0, 36)),
        ("MariaDB 10.2", "mariadb", (10, 2, 44)),
        ("MariaDB 10.3 to 10.5", "mariadb", (10, 5, 0)),
        ("MariaDB ≥ 10.6", "mariadb", (10, 11, 0)),
    ),
)


# -- named locks (locksafe.named_lock): GET_LOCK / RELEASE_LOCK ---------------------------------

#: ``connection_record.info`` key: ``DATABASE()``, read once per DB-API connection.
_DATABASE = "locksafe.named_locks.mysql.database"
#: The longest user-level lock name MySQL accepts (MySQL 5.7+; longer: ER_USER_LOCK_WRONG_NAME).
MAX_LOCK_NAME = 64
#: GET_LOCK's wait when none is asked for, and its longest: a year. A longer finite timeout
#: waits this long (PostgreSQL's bound is shorter still: ``lock_timeout`` is at most INT_MAX
#: milliseconds, about 24.8 days). The servers do not take any number: MariaDB (10.11, measured)
#: answers 0 *at once* (a timeout, without waiting) from about 1.8e10 seconds on (2**64
#: nanoseconds), and NULL (warning 1411 'Incorrect timeout value') from 2**63 seconds on;
#: MySQL's manual gives no maximum (a negative timeout waits without a bound).
_FOREVER = 365 * 24 * 3600


def lock_name(name: str, database: str) -> str:
    """The server's lock name for ``name`` in ``database``: ``locksafe:<database>:<name>``
    when that is at most 64 printable ASCII characters, else ``locksafe:`` and the 40 hex
    digits of BLAKE2b-160(``<database>:<name>``, UTF-8) (a hashed name has no second colon,
    so it never equals a readable one).

    >>> lock_name("nightly-report", "app")
    'locksafe:app:nightly-report'
    >>> len(lock_name("x" * 10_000, "app"))
    49
    """
    readable = f"locksafe:{database}:{name}"
    if len(readable) <= MAX_LOCK_NAME and readable.isascii() and readable.isprintable():
        return readable
    data = f"{database}:{name}".encode("utf-8", "surrogatepass")
    return "locksafe:" + hashlib.blake2b(data, digest_size=20).hexdigest()


def _lock_key(connection: Connection, name: str) -> Hashable:
    info = connection.connection.info
    database = info.get(_DATABASE)
    if database is None:
        row = run_sql(
            connection.dialect, connection.connection.dbapi_connection, "SELECT DATABASE()"
        )
        end_own_transaction(connection)
        database = info[_DATABASE] = "" if row is None or row[0] is None else str(row[0])
    return lock_name(name, database)


def _check_named_lock(connection: Connection, shared: bool, scope: str) -> None:
    if shared:
        dialect = connection.dialect
        raise UnsupportedLockOption(
            ("shared=True",),
            dialect="MariaDB" if getattr(dialect, "is_mariadb", False) else "MySQL",
            server_version=getattr(dialect, "server_version_info", None),
            reason="GET_LOCK locks are exclusive: MySQL and MariaDB have no shared named lock",
        )


def _get_lock(
    connection: Connection, key: Hashable, shared: bool, scope: str, timeout: float | None
) -> bool:
    dialect = connection.dialect
    wait: float
    if timeout is None or timeout >= _FOREVER:
        wait = _FOREVER
    elif getattr(dialect, "is_mariadb", False):
        wait = timeout  # MariaDB waits fractions of a second
    else:
        wait = math.ceil(timeout)  # MySQL whole seconds: never shorter than asked
    row = run_sql(
        dialect,
        connection.connection.dbapi_connection,
        "SELECT GET_LOCK(:name, :wait)",
        {"name": key, "wait": wait},
    )
    end_own_transaction(connection)
    if row is None or row[0] is None:
        raise NamedLockError(f"GET_LOCK({key!r}) answered NULL (an error on the server)")
    return int(row[0]) == 1


def _release_lock(
    dialect: Dialect, dbapi_connection: _Any, key: Hashable, shared: bool, scope: str
) -> bool:
    # 1: released; 0: held by another connection; NULL: nobody held it.
    row = run_sql(dialect, dbapi_connection, "SELECT RELEASE_LOCK(:name)", {"name": key})
    return row is not None and row[0] is not None and int(row[0]) == 1


#: User-level locks: ``GET_LOCK`` / ``RELEASE_LOCK``, held by the connection whatever the
#: scope, released at the block's end (or when the connection goes back to the pool).
NAMED_LOCKS = NamedLockSupport(
    key=_lock_key,
    check=_check_named_lock,
    acquire=_get_lock,
    release=_release_lock,
    describe=lambda key: f"GET_LOCK name {key!r}",
)
