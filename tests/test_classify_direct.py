"""The classifier's direct answer (no walk of the exception graph, for a driver's exception and
for SQLAlchemy's wrapper around one) is the walk's answer: compared on random exception graphs
and on every driver's lock errors, wrapped and not, with messages and statements that decide
(PostgreSQL's 55P03, MariaDB's 1205 under NOWAIT)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from harness import mysql8_errors
from locksafe import LockErrorKind as Kind
from locksafe import LockUnavailable, classify
from locksafe._cache import clear_all
from locksafe.classify import (
    _LINKS,
    _RAISED_LINKS,
    _direct,
    _walk_and_classify,
    classify_raised,
)
from test_classify_unit import (
    DRIVER_MODULES,
    FOREIGN_MODULES,
    asyncpg_adapted,
    asyncpg_error,
    exception_graphs,
    hostile,
    pg8000_error,
    psycopg2_error,
    psycopg_error,
    sa_wrap,
    sqlite_error,
)


def walked(exc: object, links: tuple[str, ...]) -> Kind | None:
    try:
        return _walk_and_classify(exc, links)
    except Exception:  # classify() answers None then
        return None


def same_as_the_walk(exc: object) -> None:
    for links, fn in ((_LINKS, classify), (_RAISED_LINKS, classify_raised)):
        expected = walked(exc, links)
        got = fn(exc)
        assert got is expected, (exc, links)
        assert fn(exc) is got  # remembered answers are the same answers


PG_MESSAGES = [
    'could not obtain lock on row in relation "jobs"',
    "canceling statement due to lock timeout",
    "canceling statement due to statement timeout",
    "canceling statement due to user request",
    "konnte Sperre nicht erhalten",  # another language: the statement decides
    "deadlock detected",
]
PG_CODES = ["55P03", "57014", "40P01", "40001", "23505"]
STATEMENTS = [
    "SELECT * FROM jobs FOR UPDATE NOWAIT",
    "SELECT * FROM jobs FOR UPDATE",
    "SELECT 'nowait' FROM jobs FOR UPDATE",
    "UPDATE jobs SET state = 'x'",
    "SELECT * FROM t LOCK IN SHARE MODE NOWAIT",
    "x" * 5000,  # too long to be remembered
]
PG_DRIVERS = [psycopg2_error, psycopg_error, asyncpg_error, asyncpg_adapted, pg8000_error]


def pg_errors() -> list[BaseException]:
    return [
        make(code, message)
        for make, code, message in itertools.product(PG_DRIVERS, PG_CODES, PG_MESSAGES)
    ]


def mysql_errors() -> list[BaseException]:
    found = []
    for driver in mysql8_errors.DRIVERS:
        for code in (1205, 1213, 3572, 1020, 1969, 3024, 1062):
            found.append(
                mysql8_errors.driver_error(driver, code, "HY000", "Lock wait timeout exceeded")
            )
    return found


def sqlite_errors() -> list[BaseException]:
    return [
        sqlite_error("database is locked", 5, "SQLITE_BUSY"),
        sqlite_error("database is locked", 517, "SQLITE_BUSY_SNAPSHOT"),
        sqlite_error("database table is locked", 262, "SQLITE_LOCKED_SHAREDCACHE"),
        sqlite_error("no such table: t", 1, "SQLITE_ERROR"),
    ]


@pytest.mark.parametrize("statement", STATEMENTS)
def test_every_driver_error_wrapped_or_not(statement: str) -> None:
    clear_all()
    for orig in pg_errors() + mysql_errors() + sqlite_errors():
        same_as_the_walk(orig)
        wrapped = sa_wrap(orig, statement)
        same_as_the_walk(wrapped)
        wrapped.statement = None  # type: ignore[assignment]
        same_as_the_walk(wrapped)


def test_the_direct_answer_is_taken_for_the_common_shapes() -> None:
    """The comparison above means something only if the direct answer is given."""
    from locksafe.classify import _WALK

    nowait = psycopg2_error("55P03", 'could not obtain lock on row in relation "jobs"')
    assert _direct(sa_wrap(nowait, "SELECT 1 FOR UPDATE NOWAIT")) is Kind.LOCK_NOT_AVAILABLE
    busy = sqlite_error("database is locked", 5, "SQLITE_BUSY")
    assert _direct(busy) is Kind.DATABASE_BUSY
    assert _direct(sa_wrap(busy)) is Kind.DATABASE_BUSY
    # shapes the walk must decide
    assert _direct(nowait) is _WALK  # its statement would be on a wrapper found by the walk
    assert _direct(sa_wrap(ValueError("x"))) is _WALK
    assert (
        _direct(LockUnavailable(Kind.DEADLOCK, attempts=1, elapsed=0.1, retry_after=0.1)) is _WALK
    )


def test_a_remembered_refinement_depends_on_the_statement() -> None:
    clear_all()
    timeout = psycopg2_error("55P03", "ERROR:  Zeitüberschreitung")  # not English
    assert classify(sa_wrap(timeout, "SELECT 1 FOR UPDATE NOWAIT")) is Kind.LOCK_NOT_AVAILABLE
    assert classify(sa_wrap(timeout, "SELECT 1 FOR UPDATE")) is Kind.LOCK_TIMEOUT
    assert classify(sa_wrap(timeout, "SELECT 1 FOR UPDATE NOWAIT")) is Kind.LOCK_NOT_AVAILABLE


def test_hostile_wrappers_and_drivers() -> None:
    for raising in ("orig", "statement", "args", "pgcode", "sqlstate", "errno", "__str__"):
        for module in ("psycopg2", "pymysql", "sqlite3", "sqlalchemy.exc", "myapp"):
            exc: Any = hostile(raising, module=module)(1205, "boom")
            same_as_the_walk(exc)
            same_as_the_walk(sa_wrap(exc, "SELECT 1 FOR UPDATE NOWAIT"))
            wrapper: Any = hostile(raising, module="sqlalchemy.exc")("wrapper")
            try:
                wrapper.orig = psycopg2_error("55P03", "canceling statement due to lock timeout")
                wrapper.statement = "SELECT 1 FOR UPDATE NOWAIT"
            except Exception:
                pass
            same_as_the_walk(wrapper)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exception_graphs(FOREIGN_MODULES + DRIVER_MODULES))
def test_random_exception_graphs(exc: BaseException) -> None:
    same_as_the_walk(exc)
