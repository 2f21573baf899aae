"""PostgreSQL: SQLSTATE codes of every driver, and row-lock capabilities.

All supported PostgreSQL versions (≥ 9.5) have every row-lock option, so the capability table
has no version rules. SQLSTATEs are documented in the PostgreSQL manual, appendix A.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from locksafe.capabilities import LockCapabilities, version_of
from locksafe.dialects import (
    Code,
    DialectSupport,
    DriverErrors,
    ErrorContext,
    ErrorTable,
    read_attribute,
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


_NOWAIT = re.compile(r"\bNOWAIT\b", re.IGNORECASE)


def _refine(error: ErrorContext) -> LockErrorKind | None:
    message = error.message.lower()
    if error.code == LOCK_NOT_AVAILABLE:
        # 55P03 is raised both by NOWAIT ("could not obtain lock on row in relation ...") and by
        # lock_timeout ("canceling statement due to lock timeout").
        if "lock timeout" in message:
            return LockErrorKind.LOCK_TIMEOUT
        if "could not obtain lock" in message:
            return LockErrorKind.LOCK_NOT_AVAILABLE
        if error.statement is not None and not _NOWAIT.search(error.statement):
            return LockErrorKind.LOCK_TIMEOUT
        return LockErrorKind.LOCK_NOT_AVAILABLE
    if error.code == QUERY_CANCELED:
        # 57014 is also a cancel "due to user request" (pg_cancel_backend, Ctrl-C): not a
        # time limit.
        return LockErrorKind.STATEMENT_TIMEOUT if "statement timeout" in message else None
    return error.kind


ERRORS = ErrorTable(
    drivers=(
        DriverErrors("psycopg2", ("psycopg2",), read_attribute("pgcode")),
        DriverErrors("psycopg", ("psycopg",), read_attribute("sqlstate", "diag.sqlstate")),
        DriverErrors("asyncpg", ("asyncpg",), read_attribute("sqlstate")),
        # SQLAlchemy's asyncpg adapter re-raises asyncpg errors as its own classes, carrying
        # ``sqlstate`` (and ``pgcode``); the original is its ``__cause__``.
        DriverErrors(
            "asyncpg (SQLAlchemy adapter)",
            ("sqlalchemy.dialects.postgresql.asyncpg",),
            read_attribute("sqlstate", "pgcode"),
        ),
        DriverErrors("pg8000", ("pg8000",), _read_pg8000),
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


def lock_table_sql(quoted_table: str) -> list[str]:
    return [f"LOCK TABLE {quoted_table} IN ACCESS EXCLUSIVE MODE"]


SUPPORT = DialectSupport(
    names=("postgresql",),
    title="PostgreSQL",
    capabilities=capabilities,
    errors=ERRORS,
    lock_timeout_sql=lock_timeout_sql,
    lock_table_sql=lock_table_sql,
    documented_versions=(("PostgreSQL ≥ 9.5", "postgresql", (15, 0)),),
)
