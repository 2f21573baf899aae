"""SQLite set-up for several writers: :func:`configure`.

Python's ``sqlite3`` module, left alone, manages transactions in a way SQLAlchemy cannot see:
it opens them only before INSERT/UPDATE/DELETE (so a transaction's reads run outside it), and a
``SAVEPOINT`` issued before any write silently *becomes* the transaction, so releasing it
commits everything — the outer transaction has nothing left to roll back. :func:`configure`
applies SQLAlchemy's documented recipe: the driver's own transaction handling off, SQLAlchemy
emits ``BEGIN`` itself; plus a busy timeout and WAL journaling.

``begin="immediate"`` makes every transaction take the write lock when it begins. A
``"deferred"`` transaction that reads first and writes later has to *upgrade* its lock, and that
upgrade fails at once with SQLITE_BUSY (SQLITE_BUSY_SNAPSHOT in WAL mode) when another writer
got in between, however long the busy timeout: with ``"immediate"`` the second writer waits at
``BEGIN`` instead.

Under ``"deferred"`` the ``BEGIN`` is sent when SQLAlchemy's transaction begins. Under
``"immediate"`` / ``"exclusive"`` it is sent right before the transaction's first statement, so
that a ``nowait`` / ``skip_locked`` locking SELECT opening the transaction takes the write lock
without waiting; a ``SAVEPOINT`` opening it gets a plain ``BEGIN`` and leaves the write lock to
the next statement (see :class:`locksafe.dialects.sqlite.OwedBegin`).
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from locksafe.dialects.sqlite import (
    forget_owed_begin,
    on_sqlite3,
    owe_begin,
    pay_owed_begin,
    refuse_a_transaction_in_progress,
    sqlalchemy_autocommit,
)

if TYPE_CHECKING:  # at run time, async engines are told by their sync_engine: no greenlet needed
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["configure"]

JournalMode = Literal["wal", "delete", "truncate", "persist", "memory", "off"]
Begin = Literal["deferred", "immediate", "exclusive"]

_BEGIN_SQL = {
    "deferred": "BEGIN",
    "immediate": "BEGIN IMMEDIATE",
    "exclusive": "BEGIN EXCLUSIVE",
}
_JOURNAL_MODES = ("wal", "delete", "truncate", "persist", "memory", "off")
_CONFIGURED = "_locksafe_sqlite_configured"
#: ``connection_record.info`` key: this DB-API connection is set up.
_SET_UP = "locksafe.sqlite.set_up"


E = TypeVar("E", bound="Engine | AsyncEngine")


def configure(
    engine: E,
    *,
    busy_timeout: float = 30.0,
    journal_mode: JournalMode | None = "wal",
    begin: Begin = "deferred",
    foreign_keys: bool | None = None,
) -> E:
    """Make a SQLite engine (sync or async) behave predictably under several writers.

    - ``busy_timeout`` (seconds): how long a statement waits for another connection's lock
      before failing with SQLITE_BUSY (``database_busy``);
    - ``journal_mode``: ``"wal"`` (default; readers and the writer do not block each other),
      another SQLite journal mode, or ``None`` to leave it alone;
    - ``begin``: ``"deferred"`` (SQLite's default) or ``"immediate"``, which takes the write
      lock at ``BEGIN`` so read-then-write transactions wait instead of failing at once;
    - ``foreign_keys``: also set ``PRAGMA foreign_keys`` when not ``None``.

    SQLAlchemy then emits ``BEGIN`` itself, so the transaction covers its reads and
    ``Session.begin_nested()`` is a real ``SAVEPOINT`` inside it. Under ``"immediate"`` /
    ``"exclusive"`` the ``BEGIN`` goes out right before the transaction's first statement
    (a plain one when that is a ``nowait`` / ``skip_locked`` locking SELECT, whose write
    lock is then tried without waiting, or a ``SAVEPOINT``, after which the write lock is
    taken before the next statement): work done on the raw DB-API connection before that
    first statement is not inside the transaction. Connections in ``AUTOCOMMIT`` isolation
    get no ``BEGIN``. Python ≥ 3.12 connections made
    with ``autocommit=True`` or ``False`` are put back into ``sqlite3``'s legacy transaction
    control (an open transaction rolled back), pysqlite and aiosqlite alike. Connections the
    engine pooled before ``configure()`` are set up at their next checkout (nothing is
    disposed: an in-memory database survives). Returns the engine. Configuring an engine
    twice raises ``ValueError``.

    >>> from sqlalchemy import create_engine
    >>> engine = configure(create_engine("sqlite://"), busy_timeout=2, begin="immediate")
    >>> with engine.connect() as conn:
    ...     conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
    2000
    """
    sync_engine = getattr(engine, "sync_engine", engine)
    if not isinstance(sync_engine, Engine) or sync_engine.dialect.name != "sqlite":
        raise ValueError(
            "locksafe.sqlite.configure() takes a SQLite Engine or AsyncEngine, got "
            f"{getattr(getattr(sync_engine, 'dialect', None), 'name', type(engine).__name__)!r}"
        )
    if begin not in _BEGIN_SQL:
        raise ValueError(f"begin={begin!r} is not one of {', '.join(map(repr, _BEGIN_SQL))}")
    if journal_mode is not None and journal_mode not in _JOURNAL_MODES:
        raise ValueError(
            f"journal_mode={journal_mode!r} is not one of {', '.join(map(repr, _JOURNAL_MODES))}"
        )
    if busy_timeout < 0:
        raise ValueError(f"busy_timeout={busy_timeout!r} must be ≥ 0 seconds")
    if getattr(sync_engine, _CONFIGURED, False):
        raise ValueError("this engine was already configured by locksafe.sqlite.configure()")

    pragmas = [f"PRAGMA busy_timeout = {round(busy_timeout * 1000):d}"]
    if foreign_keys is not None:
        pragmas.append(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
    begin_sql = _BEGIN_SQL[begin]

    def set_up(dbapi_connection: Any, info: dict[Any, Any]) -> None:
        _driver_transactions_off(dbapi_connection)
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
            if journal_mode is not None:
                # Changing the journal mode needs the database to itself; it is persistent, so
                # only the first connection ever changes it and the others just read it. The
                # main database only: without a schema the PRAGMA would also change (and wait
                # for) every database a connect listener attached.
                cursor.execute("PRAGMA main.journal_mode")
                row = cursor.fetchone()
                if row is None or str(row[0]).lower() != journal_mode:
                    cursor.execute(f"PRAGMA main.journal_mode = {journal_mode}")
        finally:
            cursor.close()
        info[_SET_UP] = True

    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        set_up(dbapi_connection, connection_record.info)

    def on_checkout(dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        if _SET_UP not in connection_record.info:  # pooled before configure() was called
            set_up(dbapi_connection, connection_record.info)

    def begin_now(conn: Connection) -> None:
        if not sqlalchemy_autocommit(conn):  # AUTOCOMMIT: no transaction, so no BEGIN
            refuse_a_transaction_in_progress(conn)
            conn.exec_driver_sql(begin_sql)

    def begin_later(conn: Connection) -> None:
        if not sqlalchemy_autocommit(conn):
            refuse_a_transaction_in_progress(conn)
            # Owed by this Connection alone (several may share one DB-API connection).
            owe_begin(conn, begin_sql)

    def before_cursor_execute(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        pay_owed_begin(conn, cursor, context, statement)

    event.listen(sync_engine, "connect", on_connect)
    event.listen(sync_engine, "checkout", on_checkout)
    if begin == "deferred":
        # Nothing to gain by waiting: the BEGIN takes no lock, and sending it now keeps work
        # done on the raw DB-API connection inside the transaction.
        event.listen(sync_engine, "begin", begin_now)
    else:
        event.listen(sync_engine, "begin", begin_later)
        event.listen(sync_engine, "commit", forget_owed_begin)
        event.listen(sync_engine, "rollback", forget_owed_begin)
        event.listen(sync_engine, "before_cursor_execute", before_cursor_execute)
    setattr(sync_engine, _CONFIGURED, True)
    return engine


def _legacy_transaction_control(connection: Any) -> None:
    """On the ``sqlite3`` connection itself: ``sqlite3`` neither opens nor commits
    transactions on its own (``isolation_level = None``). Python ≥ 3.12's ``autocommit=True``
    would make ``commit()`` / ``rollback()`` do nothing and ``autocommit=False`` keeps a
    transaction open at all times: both go back to ``LEGACY_TRANSACTION_CONTROL`` first, and a
    transaction ``autocommit=False`` opened is rolled back."""
    legacy = getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", None)
    if legacy is not None and getattr(connection, "autocommit", legacy) != legacy:
        connection.autocommit = legacy  # leaves an open transaction open
        if connection.in_transaction:
            connection.rollback()
    connection.isolation_level = None


def _driver_transactions_off(dbapi_connection: Any) -> None:
    """Stop ``sqlite3`` from opening and committing transactions on its own (pysqlite, and the
    ``sqlite3`` connection inside SQLAlchemy's aiosqlite adapter)."""
    on_sqlite3(dbapi_connection, _legacy_transaction_control)
