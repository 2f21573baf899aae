"""The interface between the generic layer and the dialect packages: what a dialect module
provides (:class:`DialectSupport` as ``SUPPORT``, :class:`NamedLockSupport` as ``NAMED_LOCKS``),
as data, and the small helpers several dialect modules share.

It sits just above the vocabulary (``kinds``, ``capabilities``, ``_sa``) and imports nothing
else of locksafe: the dialect modules import it, the engines (``classify``, ``rowlocks``,
``transactions``...) import the dialect modules through :mod:`locksafe.dialects`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import text
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError

from locksafe._cache import Memo
from locksafe._sa import is_autocommit_isolation
from locksafe.capabilities import LockCapabilities
from locksafe.kinds import LockErrorKind

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext
    from sqlalchemy.sql.expression import TableClause

    from locksafe.options import LockOptions

__all__ = [
    "Code",
    "DialectSupport",
    "DriverErrors",
    "ErrorContext",
    "ErrorTable",
    "LockRequest",
    "LockWaitSetting",
    "NamedLockSupport",
    "autocommit",
    "end_own_transaction",
    "nowait_detector",
    "read_attribute",
    "read_first_int_arg",
    "run_sql",
]


class LockRequest(Protocol):
    """What a dialect's row-lock hook is told about the request it serves (a
    :class:`~locksafe.RowLockPlan` is one)."""

    @property
    def capabilities(self) -> LockCapabilities: ...

    @property
    def effective(self) -> LockOptions: ...


Code = str | int


@dataclass(frozen=True)
class ErrorContext:
    """What classification knows about one driver exception, handed to a table's ``refine``."""

    code: Code
    kind: LockErrorKind | None
    message: str
    statement: str | None


@dataclass(frozen=True)
class DriverErrors:
    """How one driver carries its error code.

    ``modules`` are the module prefixes of the driver's exception classes (``"psycopg2"``,
    ``"mysql.connector"``); ``read_code`` returns the code carried by one of its exceptions, or
    ``None`` when it carries none. ``exception_classes`` name the driver's root DB-API
    exception class(es) as importable ``"module:Qualname"`` strings (``"psycopg2:Error"``), for
    code that must catch the driver's own exceptions, not SQLAlchemy's wrappers (the 503
    handlers of :mod:`locksafe.starlette`).

    >>> import sqlite3
    >>> row = DriverErrors("sqlite3", ("sqlite3",), lambda exc: None, ("sqlite3:Error",))
    >>> row.imported_exception_classes() == (sqlite3.Error,)
    True
    """

    name: str
    modules: tuple[str, ...]
    read_code: Callable[[BaseException], Code | None]
    exception_classes: tuple[str, ...] = ()

    def imported_exception_classes(self) -> tuple[type[BaseException], ...]:
        """The classes of :attr:`exception_classes` whose module is already imported.

        Never imports anything: a driver the application does not use stays unimported (its
        exceptions cannot occur anyway).
        """
        found: list[type[BaseException]] = []
        for spec in self.exception_classes:
            module_name, _, qualname = spec.partition(":")
            obj: Any = sys.modules.get(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj not in found:
                found.append(obj)
        return tuple(found)


@dataclass(frozen=True)
class ErrorTable:
    """A dialect's lock-error knowledge, as data.

    ``codes`` maps a code to its kind (``None`` marks a code known *not* to be a lock error);
    ``refine`` may change the kind using the message and the failed statement (PostgreSQL's
    55P03 is both "NOWAIT failed" and "lock_timeout expired"); ``messages`` are a last resort
    for exceptions that carry no code at all: (exception class name, lower-case start of the
    message, kind).
    """

    drivers: tuple[DriverErrors, ...]
    codes: Mapping[Code, LockErrorKind | None]
    refine: Callable[[ErrorContext], LockErrorKind | None] | None = None
    messages: tuple[tuple[str, str, LockErrorKind], ...] = ()


@dataclass(frozen=True)
class LockWaitSetting:
    """How a dialect bounds a connection's lock waits, for :func:`locksafe.lock_timeout`: read
    the setting, set it to a number of seconds, set back what was read.

    ``read_sql`` returns the current value (one row, one column); ``seconds`` turns a value
    (read, or made by ``value``) into seconds, ``math.inf`` for no bound; ``value`` turns the
    seconds asked for into the value to set, rounded and clamped as the server (told by the
    connected ``dialect``) needs; ``write`` gives the SQL that sets a value, and its bound
    parameters.

    ``transaction_scoped``: the setting ends with the transaction (PostgreSQL's ``SET
    LOCAL``); its statements run through SQLAlchemy, in the transaction, and it is set back at
    the block's end only while that transaction goes on. Otherwise it stays with the
    connection until set back (at the block's end, and, should that not happen, before the
    pool takes the connection back), and its statements run on the DB-API connection, in no
    transaction: ``write`` then gives no parameters.
    """

    read_sql: str
    seconds: Callable[[Any], float]
    value: Callable[[float, Dialect], Any]
    write: Callable[[Any], tuple[str, dict[str, Any]]]
    transaction_scoped: bool = False
    #: ``read_and_set(connection, setting, value, only_lower, on_dbapi)``: read the setting and
    #: set it to ``value`` (with ``only_lower``: only where that is tighter) in one statement
    #: where the server can (``on_dbapi(connection, sql)`` runs SQL on the DB-API connection,
    #: for a connection-scoped setting); returns what sets it back (``write``'s form), or
    #: ``None`` when nothing changed. ``None`` (the default): read, then set.
    read_and_set: (
        Callable[
            [Connection, LockWaitSetting, Any, bool, Callable[[Connection, str], Any]],
            tuple[str, dict[str, Any]] | None,
        ]
        | None
    ) = None


@dataclass(frozen=True)
class DialectSupport:
    """Everything locksafe knows about one dialect."""

    #: The SQLAlchemy dialect names this module serves.
    names: tuple[str, ...]
    #: Human name for docs and messages.
    title: str
    #: Returns this server's row-lock capabilities; ``dialect`` has been initialised (it has
    #: connected once) when ``server_version_info`` is set.
    capabilities: Callable[[Dialect], LockCapabilities]
    errors: ErrorTable = field(default_factory=lambda: ErrorTable(drivers=(), codes={}))
    #: Run on the DBAPI cursor right before a statement locked with a "database" mechanism is
    #: executed; returns a replacement SQL string or ``None`` to run the statement unchanged.
    #: Called with (cursor, context, plan, SQL string, tables the statement reads).
    before_locking_select: (
        Callable[
            [DBAPICursor, ExecutionContext, LockRequest, str, Sequence[TableClause]], str | None
        ]
        | None
    ) = None
    #: Turns the ``of=`` elements of a row-lock request (tables, ORM entities, columns) into
    #: what this dialect's ``FOR UPDATE OF`` needs (Oracle: a column of each table); ``None``
    #: keeps them as given.
    lock_targets: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None
    #: SQL that makes this session's lock waits give up after ``seconds`` (a lock-wait
    #: timeout, not a statement timeout).
    lock_timeout_sql: Callable[[float], list[str]] | None = None
    #: How :func:`locksafe.lock_timeout` bounds lock waits here; ``None``: it cannot.
    lock_wait: LockWaitSetting | None = None
    #: SQL that locks a whole table (given its quoted name) until the transaction ends.
    lock_table_sql: Callable[[str], list[str]] | None = None
    #: Builds a dialect as if it had connected to a server of that (SQLAlchemy dialect name,
    #: version), for docs and diagnostics without a server; ``None``: the generic way (the
    #: dialect class with ``server_version_info`` set).
    offline_dialect: Callable[[str, tuple[int, ...] | None], Dialect] | None = None
    #: Whether capabilities depend on the server version (then a statement is planned when
    #: the version is known, at the latest by the connection that executes it).
    version_dependent: bool = False
    #: Servers worth documenting in the generated capability matrix:
    #: (label, SQLAlchemy dialect name, server version).
    documented_versions: tuple[tuple[str, str, tuple[int, ...] | None], ...] = ()
    #: SQLAlchemy driver names (``dialect.driver``) whose streamed results (``stream_results``
    #: / ``yield_per``) end early *without raising* when a lock fails mid-stream: row-lock
    #: statements that could fail that way are refused before they run with such a driver.
    streaming_loses_errors: tuple[str, ...] = ()
    #: Whether the server aborts the whole transaction when any statement in it fails, until
    #: a ROLLBACK (or a ROLLBACK TO SAVEPOINT set before the error): PostgreSQL's "current
    #: transaction is aborted", where a later COMMIT answers ROLLBACK without an error. Then
    #: locksafe runs its own ``nowait`` locking SELECTs inside a transaction in a savepoint
    #: (a caught NOWAIT failure leaves the transaction usable, as on servers that only undo
    #: the failed statement), and refuses the COMMIT after any other lock error it saw there
    #: (:class:`~locksafe.TransactionAborted`). ``False`` (the default): a failed statement
    #: leaves the transaction as it was, nothing is added.
    errors_abort_transaction: bool = False
    #: Error codes after which the server has already rolled back the whole transaction
    #: itself, savepoints included, and goes on in a new one (InnoDB's deadlock, 1213): a
    #: COMMIT after one would commit only the work done after the error, so locksafe refuses
    #: it (:class:`~locksafe.TransactionAborted`).
    transaction_rollback_codes: frozenset[Code] = frozenset()
    #: Whether the server looks for a deadlock only after a lock wait has lasted a while
    #: (PostgreSQL: ``deadlock_timeout``, 1 s by default), so that every deadlock costs that
    #: long. Then ``@transactional`` bounds the lock waits of every attempt but the last to a
    #: short ``early_lock_timeout``, doubled per attempt: a deadlock ends as a lock timeout,
    #: retried, well before the server's detector runs. ``False`` (the default):
    #: lock waits are left to the server (InnoDB detects deadlocks at once).
    deadlock_detection_delayed: bool = False
    #: Extra facts for the docs.
    notes: str = ""


# -- named locks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedLockSupport:
    """How one dialect takes named locks (a dialect module's ``NAMED_LOCKS``).

    Either a *server* lock (``acquire`` / ``release`` on the connection) or a *local* lock
    (``attempt`` / ``give_back``, polled by this module with short sleeps, without a
    connection). ``key`` turns a name into what is locked (run once per lock, on the bind's
    SQLAlchemy ``Connection``).
    """

    #: ``key(connection, name)``: what is locked on this connection's database.
    key: Callable[[Connection, str], Hashable]
    #: ``check(connection, shared, scope)``: raise for options this server cannot honour.
    check: Callable[[Connection, bool, str], None] | None = None
    #: ``holds_in_transaction(scope)``: whether the lock belongs to the transaction (then the
    #: connection must be in one: it is begun if needed, and AUTOCOMMIT is refused).
    holds_in_transaction: Callable[[str], bool] = lambda scope: False
    #: ``acquire(connection, key, shared, scope, timeout)``: waits on the server at most
    #: ``timeout`` seconds (``None``: no bound, ``0``: try once); ``True`` when obtained,
    #: ``False`` when not in time; raises ``DBAPIError`` for anything else.
    acquire: Callable[[Connection, Hashable, bool, str, float | None], bool] | None = None
    #: ``release(dialect, dbapi_connection, key, shared, scope)``: give the lock back (only for
    #: locks the connection holds until released); ``True`` when it was held.
    release: Callable[[Dialect, Any, Hashable, bool, str], bool] | None = None
    #: Whether ``release`` is needed for this scope (PostgreSQL's transaction-scoped locks end
    #: with the transaction; nothing releases them).
    needs_release: Callable[[str], bool] = lambda scope: True
    #: ``attempt(key, shared)``: one try of a local lock, never waiting; a handle or ``None``.
    attempt: Callable[[Hashable, bool], object | None] | None = None
    #: ``give_back(handle)``: release a local lock.
    give_back: Callable[[object], None] | None = None
    #: Human description of what is locked, for messages.
    describe: Callable[[Hashable], str] = repr

    @property
    def polls(self) -> bool:
        return self.attempt is not None


# -- code readers shared by several dialect modules ------------------------------------------


def read_attribute(*names: str) -> Callable[[BaseException], Code | None]:
    """A reader returning the first of ``names`` that is a non-empty str or an int."""

    def read(exc: BaseException) -> Code | None:
        for name in names:
            obj: Any = exc
            for part in name.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, int) and not isinstance(obj, bool):
                return obj
            if isinstance(obj, str) and obj:
                return obj
        return None

    read.__name__ = f"read_{'_or_'.join(n.replace('.', '_') for n in names)}"
    return read


def nowait_detector(
    name: str, not_sql: re.Pattern[str], nowait_clause: re.Pattern[str]
) -> Callable[[str], bool]:
    """A cached test for "does this statement ask for NOWAIT", from a dialect's two patterns:
    ``not_sql`` finds what is not SQL keywords (string literals, quoted names, comments; a
    group named ``ident`` marks quoted names), ``nowait_clause`` the dialect's NOWAIT clauses.
    The word in a literal, a comment or a column called ``nowait`` does not count."""

    def scrub(match: re.Match[str]) -> str:
        return "_" if match.lastgroup == "ident" else " "

    def scan(statement: str) -> bool:
        return nowait_clause.search(not_sql.sub(scrub, statement)) is not None

    seen: Memo[str, bool] = Memo(f"dialects.{name}.asks_nowait", maxsize=512)

    def asks_nowait(statement: str) -> bool:
        if "nowait" not in statement.lower():  # the common case, without the scan
            return False
        return seen.get_or_make(statement, scan)

    return asks_nowait


def read_first_int_arg(exc: BaseException) -> Code | None:
    """MySQL drivers that raise ``Error(errno, message)``: PyMySQL, mysqlclient, asyncmy."""
    args = getattr(exc, "args", None)
    if isinstance(args, tuple) and args:
        first = args[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return first
    return None


# -- DB-API helpers for the dialect modules ----------------------------------------------------


def run_sql(
    dialect: Dialect, dbapi_connection: Any, sql: str, params: dict[str, Any] | None = None
) -> tuple[Any, ...] | None:
    """Run ``sql`` (``:name`` bound parameters) on its own DB-API cursor of
    ``dbapi_connection`` and return its first row (``None`` without rows). The parameters are
    bound in the driver's own paramstyle, never formatted into the SQL. A driver error is
    raised as SQLAlchemy's ``DBAPIError`` (what :func:`locksafe.classify` reads)."""
    compiled = text(sql).compile(dialect=dialect)
    values = compiled.construct_params(params or {})
    args: Any = values
    if dialect.positional:
        args = tuple(values[name] for name in compiled.positiontup or ())
    dbapi = dialect.loaded_dbapi
    cursor = dbapi_connection.cursor()
    try:
        try:
            cursor.execute(compiled.string, args)
            return tuple(cursor.fetchone()) if cursor.description else None
        except dbapi.Error as error:
            raise DBAPIError.instance(
                compiled.string, args, error, dbapi.Error, dialect=dialect
            ) from error
    finally:
        cursor.close()


def autocommit(connection: Connection) -> bool:
    """Whether ``connection`` runs each statement in its own transaction (AUTOCOMMIT)."""
    return (
        is_autocommit_isolation(connection)
        or getattr(connection.connection.dbapi_connection, "autocommit", None) is True
    )


def end_own_transaction(connection: Connection) -> None:
    """After statements sent on the DB-API connection while SQLAlchemy has no transaction on
    ``connection``: end the transaction the driver began for them (if any), so that none is
    left open behind SQLAlchemy's back."""
    if connection.in_transaction() or autocommit(connection):
        return
    dbapi_connection = connection.connection.dbapi_connection
    if dbapi_connection is not None:
        dbapi_connection.commit()
