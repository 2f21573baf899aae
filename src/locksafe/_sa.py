"""Every access locksafe makes to a private name of SQLAlchemy (or of a driver adapter), in one
place.

Nothing else in locksafe names a SQLAlchemy ``_private`` attribute: ``tests/test_layers.py``
greps for it. Each accessor says what it reads, the public alternative where one exists (and
why it is not enough), and which SQLAlchemy releases were checked. ``tests/test_sa_private.py``
exercises every one of them against the installed SQLAlchemy, so a release that renames one
fails loudly there, not silently in an application.

Checked: SQLAlchemy 2.0.50 to 2.0.59 and 2.1.0 to 2.1.9.

This module is at the bottom of locksafe's layers: it imports nothing of locksafe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.sql.selectable import ForUpdateArg
from sqlalchemy.sql.visitors import InternalTraversal

__all__ = [
    "ForUpdateArgWithToken",
    "adapted_driver_connection",
    "deannotate",
    "explicit_froms",
    "for_update_arg",
    "is_autocommit_isolation",
    "is_server_side",
    "orm_entity_mapper",
    "prime_mysql_dialect",
    "result_column_names",
    "rollback_exception",
    "run_in_aiosqlite_thread",
    "session_binds",
    "session_transaction_state",
    "set_for_update_arg",
    "table_prefixes",
    "transaction_connections",
]


# -- statements --------------------------------------------------------------------------------


class ForUpdateArgWithToken(ForUpdateArg):
    """SQLAlchemy's ``FOR UPDATE`` arguments of a SELECT, plus a ``locksafe_token`` that is part
    of the statement's cache key. ``_traverse_internals`` is the (private) declaration of what
    a ClauseElement's cache key is made of; there is no public way to add to a cache key."""

    _traverse_internals = [  # noqa: RUF012 (SQLAlchemy's class-level declaration)
        *ForUpdateArg._traverse_internals,
        ("locksafe_token", InternalTraversal.dp_plain_obj),
    ]
    locksafe_token: tuple[Any, ...] = ()


def for_update_arg(select: Any) -> ForUpdateArg | None:
    """The ``FOR UPDATE`` arguments of a SELECT (``None``: it locks nothing). Public: none
    (``with_for_update()`` only writes them)."""
    return getattr(select, "_for_update_arg", None)


def set_for_update_arg(select: Any, arg: ForUpdateArg) -> None:
    """Replace the ``FOR UPDATE`` arguments of a SELECT that ``with_for_update()`` has just
    made (a new, generative copy: nothing shared is changed)."""
    select._for_update_arg = arg


def explicit_froms(select: Any) -> tuple[Any, ...]:
    """The FROM elements given explicitly (``select_from()``, joins). Public:
    ``get_final_froms()`` also lists the FROMs implied by the columns, which is not the
    question asked (is a function used *as a FROM*)."""
    return tuple(getattr(select, "_from_obj", ()))


def deannotate(element: Any) -> Any:
    """``element`` without ORM annotations (the Table or alias itself). Public: none."""
    method = getattr(element, "_deannotate", None)
    return method() if method is not None else element


def orm_entity_mapper(statement: Any) -> Any:
    """The mapper of an ORM statement's leading entity, as ``Session.execute()`` finds it to
    pick a bind (``_propagate_attrs``); ``None`` for Core statements. Public:
    ``column_descriptions`` builds a list of dicts per call and is only on SELECT/DML."""
    attrs = getattr(statement, "_propagate_attrs", None) or {}
    if attrs.get("compile_state_plugin") != "orm":
        return None
    return getattr(attrs.get("plugin_subject"), "mapper", None)


def table_prefixes(table: Any) -> tuple[Any, ...]:
    """A Table's ``prefixes=`` (``TEMPORARY``). Public: none after construction."""
    return tuple(getattr(table, "_prefixes", ()) or ())


def result_column_names(compiled: Any) -> list[str]:
    """The result column names of a compiled SELECT, in order. Public:
    ``CursorResult.keys()`` exists only after execution."""
    columns = getattr(compiled, "_result_columns", None) or ()
    return [str(entry[1]) for entry in columns]


# -- connections and sessions ------------------------------------------------------------------


def is_autocommit_isolation(connection: Connection) -> bool:
    """Whether SQLAlchemy runs ``connection`` in ``AUTOCOMMIT`` isolation, set on the
    connection or on the engine (``create_engine(isolation_level="AUTOCOMMIT")``). It is what
    SQLAlchemy itself asks. Public fallback: ``get_execution_options()``, which does not show
    an engine-wide isolation level."""
    check = getattr(connection, "_is_autocommit_isolation", None)
    if callable(check):
        return bool(check())
    return connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT"


def is_server_side(context: Any) -> bool:
    """Whether an execution context created a server-side (streaming) cursor, as SQLAlchemy
    decided before ``before_cursor_execute``. Public: only the ``stream_results`` option,
    which misses ``create_engine(server_side_cursors=True)``."""
    return bool(getattr(context, "_is_server_side", False))


def session_binds(session: Any) -> list[Any]:
    """The engines and connections of a Session's per-mapper / per-table ``binds``, each
    once. Public in SQLAlchemy 2.1 (``Session.binds``); name-mangled private in 2.0."""
    binds = getattr(session, "binds", None)
    if not isinstance(binds, Mapping):
        binds = getattr(session, "_Session__binds", None)
    if not isinstance(binds, Mapping):
        return []
    unique: dict[int, Any] = {}
    for bind in binds.values():
        unique.setdefault(id(bind), bind)
    return list(unique.values())


def transaction_connections(transaction: Any) -> list[Connection]:
    """The connections a ``SessionTransaction`` already uses, each once. Public: the
    ``after_begin`` event, which only tells about connections begun from now on."""
    found: list[Connection] = []
    for entry in getattr(transaction, "_connections", {}).values():
        conn = entry[0]
        if isinstance(conn, Connection) and all(conn is not seen for seen in found):
            found.append(conn)
    return found


def session_transaction_state(transaction: Any) -> Any:
    """A ``SessionTransaction``'s state (``SessionTransactionState``: ACTIVE, PREPARED,
    COMMITTED, DEACTIVE, CLOSED), or ``None``. Public: ``is_active`` cannot tell COMMITTED
    from DEACTIVE."""
    return getattr(transaction, "_state", None)


def rollback_exception(transaction: Any) -> BaseException | None:
    """The exception that made a ``SessionTransaction`` roll back inside a flush (what
    ``PendingRollbackError`` reports). Public: none."""
    found = getattr(transaction, "_rollback_exception", None)
    return found if isinstance(found, BaseException) else None


# -- drivers -----------------------------------------------------------------------------------


def adapted_driver_connection(dbapi_connection: Any) -> Any:
    """The driver's own connection behind SQLAlchemy's async adapter (aiosqlite's
    ``Connection``), or ``None`` for a plain DB-API connection. Public:
    ``AdaptedConnection.driver_connection``."""
    return getattr(dbapi_connection, "driver_connection", None)


def run_in_aiosqlite_thread(driver_connection: Any, fn: Any) -> Any:
    """An awaitable that runs ``fn(sqlite3_connection)`` in aiosqlite's worker thread, or
    ``None`` when ``driver_connection`` is not an aiosqlite connection. aiosqlite's own
    private ``_execute`` / ``_conn`` (checked: aiosqlite 0.20 to 0.21): its public API has no
    way to run a callable on the ``sqlite3`` connection."""
    run = getattr(driver_connection, "_execute", None)
    conn = getattr(driver_connection, "_conn", None)
    if run is None or conn is None:
        return None
    return run(fn, conn)


def prime_mysql_dialect(dialect: Any, version_string: str) -> None:
    """Set a MySQL/MariaDB dialect up as its first connection would, from a server version
    string (``"10.11.6-MariaDB-log"``), without a server: SQLAlchemy parses the version (setting
    ``server_version_info`` and ``is_mariadb``), then the vendor's initialisation sets its
    version flags. Public: ``initialize(connection)``, which needs a connection."""
    dialect._casing = 0  # what _detect_casing() would read from the server
    dialect._parse_server_version(version_string)
    if hasattr(dialect, "_dispatch_for_vendor"):  # SQLAlchemy 2.1
        dialect._dispatch_for_vendor(dialect._initialize_mysql, dialect._initialize_mariadb, None)
    else:  # SQLAlchemy 2.0 sets these in initialize(), which needs a connection
        version = dialect.server_version_info
        is_mysql = not dialect.is_mariadb
        dialect.supports_for_update_of = is_mysql and version >= (8,)
        dialect.use_mysql_for_share = is_mysql and version >= (8, 0, 1)

