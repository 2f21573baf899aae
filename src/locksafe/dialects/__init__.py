"""What locksafe knows about each database, one module per dialect.

Each module in this package describes one SQLAlchemy dialect (or a family: ``mysql`` serves MySQL
and MariaDB) as a :class:`DialectSupport` named ``SUPPORT``: the lock-error codes of every driver
it knows, its row-lock capabilities per server version, and any extra step its row locks need
(SQLite's database write lock). The generic layer (``classify``, ``capabilities``, ``rowlocks``)
finds a dialect here by name and asks it; it never branches on a dialect's name itself.

Adding a dialect is one module plus one line in :data:`MODULES`; adding a driver is one
:class:`DriverErrors` row in its dialect's module.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from locksafe.kinds import LockErrorKind

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext
    from sqlalchemy.sql.expression import TableClause

    from locksafe.capabilities import LockCapabilities
    from locksafe.rowlocks import RowLockPlan

__all__ = [
    "MODULES",
    "DialectSupport",
    "DriverErrors",
    "ErrorContext",
    "ErrorTable",
    "LockWaitSetting",
    "all_supports",
    "driver_code",
    "driver_for_module",
    "support_for",
]

Code = str | int

#: SQLAlchemy dialect name -> the module in this package that describes it.
MODULES: Mapping[str, str] = {
    "postgresql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "sqlite": "sqlite",
    "oracle": "oracle",
    "mssql": "mssql",
}


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
            [DBAPICursor, ExecutionContext, RowLockPlan, str, Sequence[TableClause]], str | None
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
    #: Extra facts for the docs.
    notes: str = ""


_loaded: dict[str, DialectSupport] = {}
_by_module: dict[str, tuple[DialectSupport, DriverErrors] | None] = {}


def support_for(dialect_name: str) -> DialectSupport | None:
    """The :class:`DialectSupport` for a SQLAlchemy dialect name, or ``None`` if unknown."""
    support = _loaded.get(dialect_name)
    if support is None:
        module_name = MODULES.get(dialect_name)
        if module_name is None:
            return None
        module = importlib.import_module(f"{__name__}.{module_name}")
        support = module.SUPPORT
        assert isinstance(support, DialectSupport)
        for name in support.names:
            _loaded[name] = support
    return support


def all_supports() -> list[DialectSupport]:
    """Every known dialect, each once, in :data:`MODULES` order."""
    seen: list[DialectSupport] = []
    for name in MODULES:
        support = support_for(name)
        if support is not None and support not in seen:
            seen.append(support)
    return seen


def _driver_index() -> dict[str, tuple[DialectSupport, DriverErrors]]:
    index: dict[str, tuple[DialectSupport, DriverErrors]] = {}
    for support in all_supports():
        for driver in support.errors.drivers:
            for module in driver.modules:
                index[module] = (support, driver)
    return index


_index: dict[str, tuple[DialectSupport, DriverErrors]] | None = None


def driver_for_module(module: str) -> tuple[DialectSupport, DriverErrors] | None:
    """The dialect and driver whose exceptions live in ``module`` (longest prefix wins)."""
    global _index
    try:
        return _by_module[module]
    except KeyError:
        pass
    if _index is None:
        _index = _driver_index()
    found = None
    candidate = module
    while candidate:
        found = _index.get(candidate)
        if found is not None:
            break
        candidate = candidate.rpartition(".")[0]
    if len(_by_module) < 4096:
        _by_module[module] = found
    return found


# -- code readers shared by several dialect modules ------------------------------------------


def driver_code(exc: BaseException) -> tuple[DialectSupport, Code] | None:
    """The dialect and error code of one driver exception (not SQLAlchemy's wrapper: pass its
    ``.orig``), found by the module of its class or of a base class; ``None`` when it is not
    a known driver's exception or carries no code. Never raises."""
    try:
        for cls in type(exc).__mro__:
            module = getattr(cls, "__module__", None)
            if not isinstance(module, str):
                continue
            found = driver_for_module(module)
            if found is not None:
                code = found[1].read_code(exc)
                return (found[0], code) if code is not None else None
    except Exception:
        return None
    return None


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
    not_sql: re.Pattern[str], nowait_clause: re.Pattern[str]
) -> Callable[[str], bool]:
    """A cached test for "does this statement ask for NOWAIT", from a dialect's two patterns:
    ``not_sql`` finds what is not SQL keywords (string literals, quoted names, comments; a
    group named ``ident`` marks quoted names), ``nowait_clause`` the dialect's NOWAIT clauses.
    The word in a literal, a comment or a column called ``nowait`` does not count."""

    def scrub(match: re.Match[str]) -> str:
        return "_" if match.lastgroup == "ident" else " "

    @functools.lru_cache(maxsize=512)
    def asks_nowait(statement: str) -> bool:
        if "nowait" not in statement.lower():  # the common case, without the scan
            return False
        return nowait_clause.search(not_sql.sub(scrub, statement)) is not None

    return asks_nowait


def read_first_int_arg(exc: BaseException) -> Code | None:
    """MySQL drivers that raise ``Error(errno, message)``: PyMySQL, mysqlclient, asyncmy."""
    args = getattr(exc, "args", None)
    if isinstance(args, tuple) and args:
        first = args[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return first
    return None
