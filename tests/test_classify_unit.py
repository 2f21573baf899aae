"""The lock-error classifier without a server: walking exception graphs, reading codes the way
each driver carries them, recorded MySQL 8 errors, and property tests (it never raises).

Every error the servers of the harness can raise is provoked for real in
``test_classify_real.py``; the exceptions built here are the driver's own classes, built with the
driver's own code where it is Python (tests/harness/mysql8_errors.py), or the way the driver's
C code builds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import sqlite3
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import DBAPIError, OperationalError, StatementError

import locksafe
from harness import mysql8_errors
from locksafe import LockErrorKind as Kind
from locksafe import LockUnavailable, classify
from locksafe.classify import classify_raised
from locksafe.dialects import mysql as mysql_dialect
from locksafe.dialects import postgresql as pg_dialect

LOCK_NOT_AVAILABLE_KINDS = {
    Kind.LOCK_NOT_AVAILABLE,
    Kind.LOCK_TIMEOUT,
    Kind.DATABASE_BUSY,
    Kind.TABLE_LOCKED,
}


def sa_wrap(orig: BaseException, statement: str = "SELECT 1", params: Any = ()) -> DBAPIError:
    """``orig`` as SQLAlchemy hands it to the application: wrapped, raised ``from`` it."""
    exc = DBAPIError.instance(statement, params, orig, Exception)
    assert isinstance(exc, DBAPIError)
    exc.__cause__ = orig
    return exc


def chain(*excs: BaseException) -> BaseException:
    """excs[0] raised from excs[1] raised from ... (``__cause__`` links)."""
    for outer, inner in itertools.pairwise(excs):
        outer.__cause__ = inner
    return excs[0]


# Each exception the classifier visits has its ``orig`` read a small, fixed number of times
# (the walk, then the lookup of the failed statement): a bound on those reads, for the 64-node
# walk, that does not grow with the size of the graph. Counted, not timed.
WALK_BOUND = 4 * 64


class Linked(RuntimeError):
    """An exception whose ``orig`` link counts its reads (into ``reads``, by index)."""

    def __init__(self, index: int, reads: list[int]) -> None:
        super().__init__(f"level {index}")
        self.index = index
        self.reads = reads
        self.linked: BaseException | None = None

    @property
    def orig(self) -> BaseException | None:
        self.reads.append(self.index)
        return self.linked


def klass(name: str, module: str, base: type[BaseException] = Exception) -> type[BaseException]:
    """An exception class that claims to come from ``module``."""
    return type(name, (base,), {"__module__": module})


# -- the drivers' own exception objects -------------------------------------------------------


def psycopg2_error(pgcode: str, message: str) -> BaseException:
    import psycopg2.errors

    # psycopg2 sets pgcode from C (read-only in Python); its pickling state is the way in.
    exc = psycopg2.errors.lookup(pgcode)(message)
    exc.__setstate__({"pgcode": pgcode, "pgerror": message + "\n"})
    assert exc.pgcode == pgcode
    return exc  # type: ignore[no-any-return]


def psycopg_error(sqlstate: str, message: str) -> BaseException:
    import psycopg.errors

    return psycopg.errors.lookup(sqlstate)(message)


def asyncpg_error(sqlstate: str, message: str) -> BaseException:
    import asyncpg.exceptions

    cls = asyncpg.exceptions.PostgresError.get_message_class_for_sqlstate(sqlstate)
    return cls(message)  # type: ignore[no-any-return]


def asyncpg_adapted(sqlstate: str, message: str) -> BaseException:
    """The asyncpg error as SQLAlchemy's asyncpg adapter re-raises it (its own translation)."""
    import asyncpg
    from sqlalchemy.dialects.postgresql.asyncpg import (
        AsyncAdapt_asyncpg_connection,
        AsyncAdapt_asyncpg_dbapi,
    )

    dbapi = AsyncAdapt_asyncpg_dbapi(asyncpg)  # type: ignore[no-untyped-call]
    original = asyncpg_error(sqlstate, message)
    assert isinstance(original, Exception)
    translate: Callable[[Exception], object]
    if hasattr(AsyncAdapt_asyncpg_connection, "_handle_exception_no_connection"):  # 2.1
        translate = functools.partial(
            AsyncAdapt_asyncpg_connection._handle_exception_no_connection, dbapi
        )
    else:  # SQLAlchemy 2.0: the translation lives on a connection
        adapter: Any = AsyncAdapt_asyncpg_connection.__new__(AsyncAdapt_asyncpg_connection)
        adapter.dbapi = dbapi
        adapter._connection = types.SimpleNamespace(is_closed=lambda: False)
        translate = adapter._handle_exception
    with pytest.raises(Exception) as info:  # the adapter's class of it
        translate(original)
    assert info.value.__cause__ is original, info.value
    return info.value


def pg8000_error(sqlstate: str, message: str, **fields: str) -> BaseException:
    import pg8000.dbapi

    exc: BaseException = pg8000.dbapi.ProgrammingError(
        {"S": "ERROR", "V": "ERROR", "C": sqlstate, "M": message, **fields}
    )
    return exc


PG_BUILDERS: dict[str, Callable[[str, str], BaseException]] = {
    "psycopg2": psycopg2_error,
    "psycopg": psycopg_error,
    "asyncpg": asyncpg_error,
    "asyncpg adapter": asyncpg_adapted,
    "pg8000": pg8000_error,
}


def sqlite_error(
    message: str, code: int | None, name: str | None, cls: type[BaseException] | None = None
) -> BaseException:
    exc = (cls or sqlite3.OperationalError)(message)
    if code is not None:
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    if name is not None:
        exc.sqlite_errorname = name  # type: ignore[attr-defined]
    return exc


# -- PostgreSQL ---------------------------------------------------------------------------------

PG_CASES = [
    ("55P03", 'could not obtain lock on row in relation "jobs"', Kind.LOCK_NOT_AVAILABLE),
    ("55P03", 'could not obtain lock on relation "jobs"', Kind.LOCK_NOT_AVAILABLE),
    ("55P03", "canceling statement due to lock timeout", Kind.LOCK_TIMEOUT),
    ("40P01", "deadlock detected", Kind.DEADLOCK),
    ("40001", "could not serialize access due to concurrent update", Kind.SERIALIZATION_FAILURE),
    (
        "40001",
        "could not serialize access due to read/write dependencies among transactions",
        Kind.SERIALIZATION_FAILURE,
    ),
    ("57014", "canceling statement due to statement timeout", Kind.STATEMENT_TIMEOUT),
    ("57014", "canceling statement due to user request", None),
    ("23505", 'duplicate key value violates unique constraint "jobs_pkey"', None),
    ("42P01", 'relation "lock timeout" does not exist', None),
]


@pytest.mark.parametrize("driver", list(PG_BUILDERS))
@pytest.mark.parametrize(("code", "message", "kind"), PG_CASES)
def test_postgresql_codes_of_every_driver(
    driver: str, code: str, message: str, kind: Kind | None
) -> None:
    orig = PG_BUILDERS[driver](code, message)
    assert classify(orig) is kind
    assert classify(sa_wrap(orig, "SELECT * FROM jobs FOR UPDATE")) is kind


@pytest.mark.parametrize("driver", list(PG_BUILDERS))
def test_postgresql_55p03_message_decides_over_the_statement(driver: str) -> None:
    """A NOWAIT statement can still time out on a lock NOWAIT does not cover (the table's);
    a statement without NOWAIT can fail a NOWAIT inside a function it calls."""
    timeout = PG_BUILDERS[driver]("55P03", "canceling statement due to lock timeout")
    assert classify(sa_wrap(timeout, "SELECT * FROM t FOR UPDATE NOWAIT")) is Kind.LOCK_TIMEOUT
    nowait = PG_BUILDERS[driver]("55P03", 'could not obtain lock on row in relation "t"')
    assert classify(sa_wrap(nowait, "SELECT claim_job()")) is Kind.LOCK_NOT_AVAILABLE


@pytest.mark.parametrize("driver", list(PG_BUILDERS))
def test_postgresql_55p03_in_another_language_goes_by_the_statement(driver: str) -> None:
    """lc_messages = 'de_DE': the message says nothing the classifier knows."""
    german_nowait = "konnte Sperre für Zeile in Relation »jobs« nicht setzen"
    german_timeout = "storniere Anfrage wegen Zeitüberschreitung einer Sperre"
    for message in (german_nowait, german_timeout):
        orig = PG_BUILDERS[driver]("55P03", message)
        nowait = sa_wrap(orig, "SELECT jobs.id FROM jobs FOR UPDATE NOWAIT")
        assert classify(nowait) is Kind.LOCK_NOT_AVAILABLE
        plain = sa_wrap(orig, "SELECT jobs.id, jobs.nowait FROM jobs FOR UPDATE")
        assert classify(plain) is Kind.LOCK_TIMEOUT
        # Without a statement the code alone says: the lock was not available.
        assert classify(orig) is Kind.LOCK_NOT_AVAILABLE


def test_postgresql_context_and_relation_names_are_not_the_message() -> None:
    """The relation's name and the CONTEXT line are user data."""
    psycopg2_like = psycopg2_error(
        "55P03",
        "canceling statement due to lock timeout\n"
        'CONTEXT:  while locking tuple (0,1) in relation "could not obtain lock"',
    )
    assert classify(psycopg2_like) is Kind.LOCK_TIMEOUT
    named = pg8000_error("55P03", 'could not obtain lock on row in relation "lock timeout"')
    assert classify(named) is Kind.LOCK_NOT_AVAILABLE
    where = pg8000_error(
        "55P03",
        "canceling statement due to lock timeout",
        W='while locking tuple (0,1) in relation "could not obtain lock"',
    )
    assert classify(where) is Kind.LOCK_TIMEOUT
    cancel = pg8000_error(
        "57014",
        "canceling statement due to user request",
        W='SQL function "statement timeout" statement 1',
    )
    assert classify(cancel) is None


@pytest.mark.parametrize(
    ("statement", "asks"),
    [
        ("SELECT t.id FROM t FOR UPDATE NOWAIT", True),
        ("SELECT t.id FROM t FOR NO KEY UPDATE NOWAIT", True),
        ("SELECT t.id FROM t FOR SHARE OF t NOWAIT", True),
        ('SELECT a.id FROM a, "b c" FOR KEY SHARE OF a, "b c" NOWAIT', True),
        ("SELECT t.id FROM t FOR UPDATE OF t NOWAIT FOR SHARE OF u", True),
        ("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE NOWAIT", True),
        ("select t.id from t for update\n  nowait", True),
        ("SELECT t.id FROM t FOR UPDATE", False),
        ("SELECT t.id FROM t FOR UPDATE SKIP LOCKED", False),
        ("SELECT t.nowait FROM t FOR UPDATE", False),
        ('UPDATE t SET "nowait" = true WHERE id = $1', False),
        ("SELECT 'FOR UPDATE NOWAIT' FROM t FOR UPDATE", False),
        ("SELECT E'it\\'s FOR UPDATE NOWAIT' FROM t FOR UPDATE", False),
        ("SELECT $$ FOR UPDATE NOWAIT $$ FROM t FOR UPDATE", False),
        ("SELECT $q$ FOR UPDATE NOWAIT $q$ FROM t FOR UPDATE", False),
        ("SELECT 1 FROM t FOR UPDATE -- NOWAIT", False),
        ("SELECT 1 FROM t FOR UPDATE /* NOWAIT */", False),
        ('SELECT 1 FROM "FOR UPDATE NOWAIT"', False),
        ("", False),
    ],
)
def test_postgresql_nowait_clause(statement: str, asks: bool) -> None:
    assert pg_dialect.asks_nowait(statement) is asks


# -- MySQL / MariaDB ------------------------------------------------------------------------------

MYSQL_CASES = [
    # (errno, sqlstate, message, statement, kind)
    (
        1205,
        "HY000",
        "Lock wait timeout exceeded; try restarting transaction",
        "SELECT jobs.id FROM jobs WHERE jobs.id = %s FOR UPDATE",
        Kind.LOCK_TIMEOUT,
    ),
    # MariaDB answers a failed NOWAIT with 1205 too: the statement tells.
    (
        1205,
        "HY000",
        "Lock wait timeout exceeded; try restarting transaction",
        "SELECT jobs.id FROM jobs WHERE jobs.id = %s FOR UPDATE NOWAIT",
        Kind.LOCK_NOT_AVAILABLE,
    ),
    (
        1205,
        "HY000",
        "Lock wait timeout exceeded; try restarting transaction",
        "SELECT jobs.id FROM jobs LOCK IN SHARE MODE NOWAIT",
        Kind.LOCK_NOT_AVAILABLE,
    ),
    (
        1205,
        "HY000",
        "Lock wait timeout exceeded; try restarting transaction",
        "UPDATE jobs SET nowait=%s WHERE jobs.id = %s",
        Kind.LOCK_TIMEOUT,
    ),
    (
        1213,
        "40001",
        "Deadlock found when trying to get lock; try restarting transaction",
        "UPDATE jobs SET state=%s WHERE jobs.id = %s",
        Kind.DEADLOCK,
    ),
    (
        1020,
        "HY000",
        "Record has changed since last read in table 'jobs'",
        "UPDATE jobs SET state=%s WHERE jobs.id = %s",
        Kind.SERIALIZATION_FAILURE,
    ),
    (
        1969,
        "70100",
        "Query execution was interrupted (max_statement_time exceeded)",
        "SELECT SLEEP(%s)",
        Kind.STATEMENT_TIMEOUT,
    ),
    (1317, "70100", "Query execution was interrupted", "SELECT SLEEP(%s)", None),
    (
        1062,
        "23000",
        "Duplicate entry '1' for key 'PRIMARY'",
        "INSERT INTO jobs (id) VALUES (%s) /* FOR UPDATE NOWAIT */",
        None,
    ),
    (2013, "HY000", "Lost connection to server during query", "SELECT 1", None),
]


@pytest.mark.parametrize("driver", mysql8_errors.DRIVERS)
@pytest.mark.parametrize(("errno", "sqlstate", "message", "statement", "kind"), MYSQL_CASES)
def test_mysql_codes_of_every_driver(
    driver: str, errno: int, sqlstate: str, message: str, statement: str, kind: Kind | None
) -> None:
    orig = mysql8_errors.driver_error(driver, errno, sqlstate, message)
    assert classify(mysql8_errors.wrapped(driver, orig, statement)) is kind
    bare = Kind.LOCK_TIMEOUT if kind is Kind.LOCK_NOT_AVAILABLE and errno == 1205 else kind
    assert classify(orig) is bare  # no statement: 1205 is a lock wait timeout


@pytest.mark.parametrize("driver", mysql8_errors.DRIVERS)
@pytest.mark.parametrize(
    ("record", "kind"),
    [
        (mysql8_errors.ER_LOCK_NOWAIT, Kind.LOCK_NOT_AVAILABLE),
        (mysql8_errors.ER_QUERY_TIMEOUT, Kind.STATEMENT_TIMEOUT),
        (mysql8_errors.ER_USER_LOCK_DEADLOCK, Kind.DEADLOCK),
    ],
    ids=lambda value: getattr(value, "symbol", str(value)),
)
def test_recorded_mysql8_errors(driver: str, record: mysql8_errors.Recorded, kind: Kind) -> None:
    """MySQL 8's own lock errors, which the harness's MariaDB cannot raise (recorded)."""
    exc = mysql8_errors.recorded_error(driver, record)
    assert classify(exc) is kind
    assert classify(exc.orig) is kind  # the number alone says it
    assert locksafe.is_lock_not_available_error(exc) is (kind in LOCK_NOT_AVAILABLE_KINDS)
    assert locksafe.is_deadlock_error(exc) is (kind is Kind.DEADLOCK)
    assert locksafe.is_retryable_lock_error(exc) is (kind is not Kind.STATEMENT_TIMEOUT)


@pytest.mark.parametrize(
    ("statement", "asks"),
    [
        ("SELECT t.id FROM t FOR UPDATE NOWAIT", True),
        ("SELECT t.id FROM t FOR SHARE NOWAIT", True),
        ("SELECT t.id FROM t, u FOR UPDATE OF t, `u` NOWAIT", True),
        ("SELECT t.id FROM t LOCK IN SHARE MODE NOWAIT", True),
        ("ALTER TABLE t NOWAIT ADD COLUMN c INT", True),
        ("LOCK TABLES t WRITE NOWAIT", True),
        ("SELECT 'it''s', \"a\\\"b\" FROM t FOR UPDATE NOWAIT", True),
        ("SELECT t.id FROM t FOR UPDATE", False),
        ("SELECT t.id FROM t FOR UPDATE WAIT 1", False),
        ("SELECT t.id FROM t FOR UPDATE SKIP LOCKED", False),
        ("SELECT t.id, t.nowait FROM t FOR UPDATE", False),
        ("UPDATE t SET `nowait`=%s WHERE t.id = %s", False),
        ("SELECT 'FOR UPDATE NOWAIT' FROM t FOR UPDATE", False),
        ('SELECT "FOR UPDATE NOWAIT" FROM t FOR UPDATE', False),
        ("SELECT 1 FROM t FOR UPDATE # NOWAIT", False),
        ("SELECT 1 FROM t FOR UPDATE -- NOWAIT", False),
        ("SELECT 1 FROM t FOR UPDATE /* NOWAIT */", False),
    ],
)
def test_mysql_nowait_clause(statement: str, asks: bool) -> None:
    assert mysql_dialect.asks_nowait(statement) is asks


# -- one number, different servers -------------------------------------------------------------


def test_sql_server_1205_is_not_a_lock_error_here() -> None:
    """1205 is a deadlock victim on SQL Server and a lock wait timeout on MySQL: the driver's
    module decides, not the bare number."""
    pyodbc_error = klass("Error", "pyodbc")
    odbc = pyodbc_error(
        "40001",
        "[40001] [Microsoft][ODBC Driver 18 for SQL Server][SQL Server]Transaction (Process ID "
        "57) was deadlocked on lock resources with another process and has been chosen as the "
        "deadlock victim. Rerun the transaction. (1205) (SQLExecDirectW)",
    )
    assert classify(odbc) is None
    assert classify(sa_wrap(odbc, "UPDATE t SET x = 1 FOR UPDATE NOWAIT")) is None
    pyodbc_numbered = pyodbc_error(1205, "deadlock victim")
    pyodbc_numbered.errno = 1205  # type: ignore[attr-defined]
    assert classify(pyodbc_numbered) is None
    pymssql = klass("OperationalError", "pymssql._pymssql")(
        1205, b"Transaction (Process ID 52) was deadlocked on lock resources"
    )
    assert classify(sa_wrap(pymssql)) is None


@pytest.mark.parametrize(
    "module", ["psycopg2x", "mysql", "sqlite", "asyncpgx", "pymysqlx", "my_mariadb", "oracledb"]
)
def test_modules_that_merely_look_like_a_driver(module: str) -> None:
    cls = klass("OperationalError", module)
    exc = cls(1213, "deadlock")
    for name, value in (
        ("pgcode", "40P01"),
        ("sqlstate", "40P01"),
        ("errno", 1213),
        ("sqlite_errorcode", 5),
    ):
        setattr(exc, name, value)
    assert classify(exc) is None
    assert classify(sa_wrap(exc)) is None


def test_a_code_read_by_another_driver_is_ignored() -> None:
    """Each driver's code is read where that driver keeps it, nowhere else."""
    import pymysql.err

    mysql_with_pgcode = pymysql.err.OperationalError("40P01", "deadlock detected")
    mysql_with_pgcode.pgcode = "40P01"
    assert classify(mysql_with_pgcode) is None
    psycopg2_with_errno = psycopg2_error("23505", "duplicate key")
    psycopg2_with_errno.errno = 1213  # type: ignore[attr-defined]
    assert classify(psycopg2_with_errno) is None


def test_a_subclass_of_a_driver_error_in_an_application_module() -> None:
    import pymysql.err

    app_error = type("JobLockError", (pymysql.err.OperationalError,), {"__module__": "myapp"})
    assert classify(app_error(1213, "Deadlock found")) is Kind.DEADLOCK


# -- SQLite ---------------------------------------------------------------------------------------

SQLITE_CASES = [
    ("database is locked", 5, "SQLITE_BUSY", Kind.DATABASE_BUSY),
    ("database is locked", 261, "SQLITE_BUSY_RECOVERY", Kind.DATABASE_BUSY),
    ("database is locked", 517, "SQLITE_BUSY_SNAPSHOT", Kind.DATABASE_BUSY),
    ("database is locked", 773, "SQLITE_BUSY_TIMEOUT", Kind.DATABASE_BUSY),
    ("database table is locked", 6, "SQLITE_LOCKED", Kind.TABLE_LOCKED),
    ("database table is locked: jobs", 262, "SQLITE_LOCKED_SHAREDCACHE", Kind.TABLE_LOCKED),
    ("database schema is locked: main", 6, "SQLITE_LOCKED", Kind.TABLE_LOCKED),
    ("no such table: database is locked", 1, "SQLITE_ERROR", None),
    ("unable to open database file", 14, "SQLITE_CANTOPEN", None),
]


@pytest.mark.parametrize(("message", "code", "name", "kind"), SQLITE_CASES)
def test_sqlite_codes(message: str, code: int, name: str, kind: Kind | None) -> None:
    both = sqlite_error(message, code, name)
    assert classify(both) is kind
    assert classify(sa_wrap(both)) is kind
    # Only one of the two attributes: each is enough (primary code = code & 0xFF).
    assert classify(sqlite_error(message, code, None)) is kind
    assert classify(sqlite_error(message, None, name)) is kind


def test_sqlite_code_decides_over_the_message() -> None:
    """A trigger's RAISE(ABORT, 'database is locked'): SQLITE_CONSTRAINT_TRIGGER (1811)."""
    trigger = sqlite_error(
        "database is locked", 1811, "SQLITE_CONSTRAINT_TRIGGER", sqlite3.IntegrityError
    )
    assert classify(trigger) is None
    assert classify(sa_wrap(trigger, "INSERT INTO guarded (id) VALUES (?)")) is None
    # Even as an OperationalError: the code says it is not SQLITE_BUSY.
    assert classify(sqlite_error("database is locked", 1, "SQLITE_ERROR")) is None
    # A code-less message first, a code further down the chain: the code wins.
    outer = sqlite_error("database is locked", None, None)
    outer.__cause__ = sqlite_error("constraint failed", 1811, "SQLITE_CONSTRAINT_TRIGGER")
    assert classify(outer) is None


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (sqlite3.OperationalError("database is locked"), Kind.DATABASE_BUSY),
        (sqlite3.OperationalError("Database is locked"), Kind.DATABASE_BUSY),
        (sqlite3.OperationalError("database table is locked"), Kind.TABLE_LOCKED),
        (sqlite3.OperationalError("database table is locked: jobs"), Kind.TABLE_LOCKED),
        (sqlite3.OperationalError("database schema is locked: main"), Kind.TABLE_LOCKED),
        (sqlite3.OperationalError("no such table: database is locked"), None),
        (sqlite3.OperationalError('near "database is locked": syntax error'), None),
        (sqlite3.IntegrityError("database is locked"), None),
        (sqlite3.ProgrammingError("database is locked"), None),
        (sqlite3.OperationalError(), None),
    ],
    ids=repr,
)
def test_sqlite_without_codes_as_python_310_raises(exc: BaseException, kind: Kind | None) -> None:
    """Python 3.10's sqlite3 exceptions carry no code: SQLite's fixed messages, matched from
    the start, on OperationalError only."""
    assert getattr(exc, "sqlite_errorcode", None) is None
    assert classify(exc) is kind
    assert classify(sa_wrap(exc)) is kind


# -- walking the exception graph ------------------------------------------------------------------


def deadlock() -> BaseException:
    return psycopg_error("40P01", "deadlock detected")


def test_reached_through_orig_cause_and_context() -> None:
    assert classify(sa_wrap(deadlock())) is Kind.DEADLOCK
    assert classify(chain(RuntimeError("job failed"), deadlock())) is Kind.DEADLOCK
    handling = KeyError("cleanup failed")
    handling.__context__ = sa_wrap(deadlock())
    assert classify(handling) is Kind.DEADLOCK
    holder = ValueError("not SQLAlchemy, but has orig")
    holder.orig = deadlock()  # type: ignore[attr-defined]
    assert classify(holder) is Kind.DEADLOCK


def test_statement_error_wrapping() -> None:
    inner = sa_wrap(deadlock(), "UPDATE jobs SET state = 'x'")
    outer = StatementError("(in flush)", "UPDATE jobs SET state = 'x'", {}, inner)
    assert classify(outer) is Kind.DEADLOCK
    direct = StatementError("wrapped", "SELECT 1", {}, deadlock())
    assert classify(direct) is Kind.DEADLOCK
    nothing = StatementError("a type processor failed", "SELECT 1", {}, TypeError("no"))
    assert classify(nothing) is None


def test_every_sqlalchemy_dbapi_error_subclass() -> None:
    import sqlalchemy.exc as sa_exc

    for cls in (
        sa_exc.DBAPIError,
        sa_exc.InterfaceError,
        sa_exc.DatabaseError,
        sa_exc.DataError,
        sa_exc.OperationalError,
        sa_exc.IntegrityError,
        sa_exc.InternalError,
        sa_exc.ProgrammingError,
        sa_exc.NotSupportedError,
    ):
        assert classify(cls("SELECT 1", (), deadlock())) is Kind.DEADLOCK, cls
        assert classify(cls("SELECT 1", (), ValueError("x"))) is None, cls
        assert classify(cls("SELECT 1", (), None)) is None, cls  # type: ignore[arg-type]


def test_cycles() -> None:
    a, b, c = RuntimeError("a"), RuntimeError("b"), RuntimeError("c")
    a.__cause__, b.__context__, c.__cause__ = b, c, a
    assert classify(a) is None
    b.__cause__ = sa_wrap(deadlock())
    assert classify(a) is Kind.DEADLOCK
    assert classify(c) is Kind.DEADLOCK
    selfish = RuntimeError("me")
    selfish.__cause__ = selfish
    selfish.__context__ = selfish
    assert classify(selfish) is None
    wrapper = sa_wrap(deadlock())
    wrapper.orig.__context__ = wrapper  # type: ignore[union-attr]
    assert classify(wrapper) is Kind.DEADLOCK


def test_deep_chains() -> None:
    links = [RuntimeError(f"level {i}") for i in range(40)]
    assert classify(chain(*links, sa_wrap(deadlock()))) is Kind.DEADLOCK
    # The walk is bounded (64 exceptions): a pathological chain costs no more than that.
    reads: list[int] = []
    endless = [Linked(i, reads) for i in range(100_000)]
    assert classify(chain(*endless, deadlock())) is None
    assert 0 < len(reads) <= WALK_BOUND, len(reads)
    assert max(reads) < WALK_BOUND, "the walk went deeper than its bound"


def test_the_first_driver_exception_with_a_code_decides() -> None:
    """Its code says what happened, even when an older exception behind it was a lock error:
    "current transaction is aborted" raised while a deadlock was being handled is not itself
    retryable by the classifier's account."""
    aborted = psycopg_error("25P02", "current transaction is aborted")
    aborted.__context__ = sa_wrap(deadlock())
    assert classify(sa_wrap(aborted)) is None
    # Codeless driver exceptions and foreign exceptions in front do not decide.
    assert classify(chain(ValueError("x"), sqlite3.OperationalError(), deadlock())) is (
        Kind.DEADLOCK
    )


def test_the_statement_is_the_one_that_failed() -> None:
    """The statement of another (older) error in the chain says nothing about this one."""
    older = mysql8_errors.wrapped(
        "pymysql",
        mysql8_errors.driver_error("pymysql", 1146, "42S02", "Table 'x' doesn't exist"),
        "SELECT x.id FROM x FOR UPDATE NOWAIT",
    )
    timeout = mysql8_errors.driver_error(
        "pymysql", 1205, "HY000", "Lock wait timeout exceeded; try restarting transaction"
    )
    timeout.__context__ = older
    newer = mysql8_errors.wrapped("pymysql", timeout, "UPDATE jobs SET state=%s")
    assert classify(newer) is Kind.LOCK_TIMEOUT
    app = ValueError("app")
    app.statement = "SELECT 1 FOR UPDATE NOWAIT"  # type: ignore[attr-defined]
    app.__cause__ = timeout
    assert classify(app) is Kind.LOCK_TIMEOUT


def test_asyncpg_through_sqlalchemys_adapter() -> None:
    adapted = asyncpg_adapted("40P01", "deadlock detected")
    assert type(adapted).__module__ == "sqlalchemy.dialects.postgresql.asyncpg"
    assert classify(adapted) is Kind.DEADLOCK
    assert classify(sa_wrap(adapted)) is Kind.DEADLOCK
    assert classify(adapted.__cause__) is Kind.DEADLOCK
    # The adapter's exception without its asyncpg original (driver_exception raises then).
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

    bare = AsyncAdapt_asyncpg_dbapi.Error("deadlock detected")  # type: ignore[no-untyped-call]
    assert classify(bare) is None
    assert classify(sa_wrap(bare)) is None


def test_lock_unavailable_carries_its_kind() -> None:
    for kind in Kind:
        exc = LockUnavailable(kind, attempts=3, elapsed=1.0, retry_after=2.0)
        assert classify(exc) is kind
        assert classify(chain(RuntimeError("x"), exc)) is kind


@pytest.mark.parametrize(
    "thing",
    [
        None,
        0,
        1205,
        "database is locked",
        b"40P01",
        3.5,
        [deadlock()],
        {"orig": deadlock()},
        object(),
        sqlite3.OperationalError,
        Kind.DEADLOCK,
        Exception,
        type,
    ],
    ids=repr,
)
def test_things_that_are_not_exceptions(thing: object) -> None:
    assert classify(thing) is None
    assert locksafe.is_lock_not_available_error(thing) is False
    assert locksafe.is_deadlock_error(thing) is False
    assert locksafe.is_retryable_lock_error(thing) is False


def test_predicates_for_every_kind() -> None:
    made = {
        Kind.LOCK_NOT_AVAILABLE: psycopg_error("55P03", "could not obtain lock on row"),
        Kind.LOCK_TIMEOUT: psycopg_error("55P03", "canceling statement due to lock timeout"),
        Kind.DEADLOCK: deadlock(),
        Kind.SERIALIZATION_FAILURE: psycopg_error("40001", "could not serialize access"),
        Kind.DATABASE_BUSY: sqlite_error("database is locked", 5, "SQLITE_BUSY"),
        Kind.TABLE_LOCKED: sqlite_error("database table is locked", 6, "SQLITE_LOCKED"),
        Kind.STATEMENT_TIMEOUT: psycopg_error(
            "57014", "canceling statement due to statement timeout"
        ),
    }
    assert set(made) == set(Kind)
    for kind, exc in made.items():
        wrapped = sa_wrap(exc)
        assert classify(wrapped) is kind
        assert locksafe.is_lock_not_available_error(wrapped) is (kind in LOCK_NOT_AVAILABLE_KINDS)
        assert locksafe.is_deadlock_error(wrapped) is (kind is Kind.DEADLOCK)
        assert locksafe.is_retryable_lock_error(wrapped) is (kind is not Kind.STATEMENT_TIMEOUT)


# -- exceptions that fight back -------------------------------------------------------------------


class Boom(Exception):
    pass


def _raise(*_: object) -> Any:
    raise Boom("no")


def hostile(*raising: str, module: str = "psycopg", base: type[Exception] = Exception) -> Any:
    """An exception class of ``module`` whose listed attributes raise when read."""
    namespace: dict[str, Any] = {"__module__": module}
    for name in raising:
        if name == "__str__":
            namespace["__str__"] = _raise
        else:
            namespace[name] = property(_raise)
    return type("Hostile", (base,), namespace)


@pytest.mark.parametrize(
    "raising",
    [
        ("orig",),
        ("statement",),
        ("args",),
        ("sqlstate", "diag", "pgcode", "errno"),
        ("__str__",),
        ("__cause__",),
        ("__context__",),
        ("orig", "statement", "args", "sqlstate", "diag", "__str__", "__cause__", "__context__"),
    ],
)
@pytest.mark.parametrize("module", ["psycopg", "pymysql", "sqlite3", "pg8000", "myapp"])
def test_attributes_that_raise(raising: tuple[str, ...], module: str) -> None:
    exc = hostile(*raising, module=module)("boom")
    assert classify(exc) is None
    assert classify(sa_wrap(exc)) is None
    # A lock error behind it is still found when the way to it does not raise.
    behind = hostile(*raising, module=module)("boom")
    wrapper = sa_wrap(behind)
    wrapper.__context__ = deadlock()
    if "__str__" not in raising:
        assert classify(wrapper) is Kind.DEADLOCK


def test_a_raising_getattr_and_class() -> None:
    class Weird(Exception):
        def __getattr__(self, name: str) -> Any:
            raise Boom(name)

        def __getattribute__(self, name: str) -> Any:
            if name in ("orig", "statement", "args", "__class__"):
                raise Boom(name)
            return super().__getattribute__(name)

    assert classify(Weird("x")) is None
    assert classify(chain(RuntimeError("x"), Weird("y"))) is None
    # One hostile exception in the graph does not hide a lock error elsewhere in it.
    assert classify(chain(RuntimeError("x"), Weird("y"), sa_wrap(deadlock()))) is Kind.DEADLOCK


@pytest.mark.parametrize(
    "interruption", [KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError]
)
def test_interruptions_are_never_lock_errors(interruption: type[BaseException]) -> None:
    """A Ctrl-C or a cancelled task that lands while a lock error is being handled (its
    ``__context__``) or raised from one is still an interruption, never a lock error."""
    stopped = interruption()
    stopped.__context__ = sa_wrap(deadlock())
    assert classify(stopped) is None
    assert not locksafe.is_retryable_lock_error(stopped)
    stopped.__cause__ = sa_wrap(deadlock())
    assert classify(stopped) is None
    assert classify_raised(stopped) is None


def test_classify_raised_ignores_what_was_being_handled() -> None:
    """``classify`` follows ``__context__``; ``classify_raised`` (for retry decisions) does not:
    an exception raised while handling a lock error is the code's own answer to it."""
    answer = LookupError("busy, answered 409")
    answer.__context__ = sa_wrap(deadlock())
    assert classify(answer) is Kind.DEADLOCK
    assert classify_raised(answer) is None
    assert classify_raised(sa_wrap(deadlock())) is Kind.DEADLOCK
    raised_from = LookupError("wrapped on purpose")
    raised_from.__cause__ = sa_wrap(deadlock())
    assert classify_raised(raised_from) is Kind.DEADLOCK


def test_a_message_is_not_overruled_by_another_databases_code() -> None:
    """Python 3.10's sqlite3 errors carry no code, only SQLite's message. Raised while
    handling a PostgreSQL unique violation, the busy database is still what failed; a code of
    the *same* database further on still decides (the trigger test above)."""
    busy = sqlite3.OperationalError("database is locked")
    for attribute in ("sqlite_errorcode", "sqlite_errorname"):
        with contextlib.suppress(AttributeError):
            delattr(busy, attribute)
    busy.__context__ = sa_wrap(psycopg2_error("23505", "duplicate key value"))
    assert classify(busy) is Kind.DATABASE_BUSY


# -- property tests -----------------------------------------------------------------------------

#: Modules that are not a driver locksafe knows (some only look like one).
FOREIGN_MODULES = [
    "myapp.errors",
    "builtins",
    "sqlalchemy.exc",
    "pyodbc",
    "pymssql._pymssql",
    "oracledb",
    "psycopg2x",
    "mysql",
    "sqlite",
    "asyncpgx.errors",
    "pymysqlx",
    "my.mariadb",
    "sqlalchemy",
]
#: Modules of drivers locksafe knows.
DRIVER_MODULES = [
    "psycopg2.errors",
    "psycopg.errors",
    "asyncpg.exceptions",
    "pg8000.dbapi",
    "pg8000",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "pymysql.err",
    "MySQLdb",
    "mysql.connector.errors",
    "asyncmy.errors",
    "mariadb",
    "aiomysql",
    "sqlite3",
]
LOCK_CODES: list[Any] = [
    "55P03",
    "40P01",
    "40001",
    "57014",
    1205,
    1213,
    1020,
    1969,
    3024,
    3572,
    3058,
    5,
    6,
    261,
    262,
    517,
    "SQLITE_BUSY",
    "SQLITE_LOCKED_SHAREDCACHE",
]
LOCK_MESSAGES = [
    "database is locked",
    "database table is locked",
    "deadlock detected",
    "canceling statement due to lock timeout",
    "could not obtain lock on row",
    "Lock wait timeout exceeded; try restarting transaction",
]

codes = st.one_of(
    st.sampled_from(LOCK_CODES),
    st.integers(),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.binary(max_size=4),
)
arg_values = st.one_of(
    codes,
    st.sampled_from(LOCK_MESSAGES),
    st.dictionaries(st.sampled_from(["C", "M", "S"]), codes, max_size=3),
)
BASES: list[type[Exception]] = [Exception, ValueError, OSError, KeyError, RuntimeError]
ATTRIBUTES = ["pgcode", "sqlstate", "errno", "sqlite_errorcode", "sqlite_errorname", "statement"]


@st.composite
def exception_graphs(draw: st.DrawFn, modules: list[str]) -> BaseException:
    """A graph of up to 12 exceptions of random classes (from ``modules``), random code
    attributes, args, some attributes that raise, and ``orig`` / ``__cause__`` /
    ``__context__`` links anywhere (cycles included)."""
    size = draw(st.integers(1, 12))
    nodes: list[BaseException] = []
    for _ in range(size):
        raising = draw(st.lists(st.sampled_from([*ATTRIBUTES, "orig", "__str__"]), max_size=2))
        cls = hostile(
            *raising, module=draw(st.sampled_from(modules)), base=draw(st.sampled_from(BASES))
        )
        try:
            node = cls(*draw(st.lists(arg_values, max_size=3)))
        except Exception:  # e.g. OSError's own argument handling
            node = cls()
        for name in draw(st.lists(st.sampled_from(ATTRIBUTES), max_size=3, unique=True)):
            if name in raising:
                continue
            value = draw(st.one_of(codes, st.sampled_from(["SELECT 1 FOR UPDATE NOWAIT"])))
            with contextlib.suppress(Exception):  # a read-only slot
                setattr(node, name, value)
        nodes.append(node)
    for node in nodes:
        for link in ("orig", "__cause__", "__context__"):
            if draw(st.booleans()):
                target = nodes[draw(st.integers(0, size - 1))]
                with contextlib.suppress(Exception):
                    setattr(node, link, target)
    return nodes[0]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exception_graphs(FOREIGN_MODULES))
def test_foreign_exception_graphs_are_never_lock_errors(exc: BaseException) -> None:
    """Whatever codes and messages they carry, exceptions of no known driver are not lock
    errors, and classifying them never raises."""
    assert classify(exc) is None
    assert locksafe.is_lock_not_available_error(exc) is False
    assert locksafe.is_retryable_lock_error(exc) is False


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exception_graphs(FOREIGN_MODULES + DRIVER_MODULES))
def test_any_exception_graph_classifies_without_raising(exc: BaseException) -> None:
    kind = classify(exc)
    assert kind is None or isinstance(kind, Kind)
    assert classify(exc) is kind  # deterministic
    assert locksafe.is_deadlock_error(exc) is (kind is Kind.DEADLOCK)
    if kind is not None:
        assert _reaches_a_driver(exc), "a lock error needs a known driver's exception"


def _reaches_a_driver(exc: BaseException) -> bool:
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        node = todo.pop()
        if id(node) in seen or not isinstance(node, BaseException):
            continue
        seen.add(id(node))
        if type(node).__module__ in DRIVER_MODULES:
            return True
        for link in ("orig", "__cause__", "__context__"):
            with contextlib.suppress(Exception):
                todo.append(getattr(node, link, None))
    return False


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(),
            st.binary(),
            st.floats(),
            st.sampled_from(LOCK_CODES + LOCK_MESSAGES),
        ),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_non_exceptions_are_never_lock_errors(thing: object) -> None:
    assert classify(thing) is None


def test_huge_graphs_stay_cheap() -> None:
    """100 000 exceptions, each linked three ways to others: the walk is bounded."""
    import random

    rng = random.Random(1205)
    reads: list[int] = []
    nodes = [Linked(i, reads) for i in range(100_000)]
    for node in nodes:
        node.__cause__ = rng.choice(nodes)
        node.__context__ = rng.choice(nodes)
        node.linked = rng.choice(nodes)
    assert classify(nodes[0]) is None
    assert 0 < len(reads) <= WALK_BOUND, len(reads)
    nodes[0].__cause__ = deadlock()  # near the start: found
    assert classify(nodes[0]) is Kind.DEADLOCK


def test_classify_is_in_the_public_api() -> None:
    assert locksafe.classify is classify
    assert "classify" in locksafe.__all__
    assert sys.modules["locksafe.classify"].classify is classify
    assert issubclass(OperationalError, DBAPIError)
