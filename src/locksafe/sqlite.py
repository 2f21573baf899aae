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
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

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
    ``Session.begin_nested()`` is a real ``SAVEPOINT`` inside it. Returns the engine.
    Configuring an engine twice raises ``ValueError``.

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

    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        _driver_transactions_off(dbapi_connection)
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
            if journal_mode is not None:
                # Changing the journal mode needs the database to itself; it is persistent, so
                # only the first connection ever changes it and the others just read it.
                cursor.execute("PRAGMA journal_mode")
                row = cursor.fetchone()
                if row is None or str(row[0]).lower() != journal_mode:
                    cursor.execute(f"PRAGMA journal_mode = {journal_mode}")
        finally:
            cursor.close()

    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin_sql)

    event.listen(sync_engine, "connect", on_connect)
    event.listen(sync_engine, "begin", on_begin)
    setattr(sync_engine, _CONFIGURED, True)
    return engine


def _driver_transactions_off(dbapi_connection: Any) -> None:
    """Stop ``sqlite3`` from opening and committing transactions on its own."""
    legacy = getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", None)
    autocommit = getattr(dbapi_connection, "autocommit", legacy)
    if legacy is not None and autocommit is not legacy and autocommit != legacy:
        # Python ≥ 3.12 with autocommit=False (PEP 249 mode) would keep a transaction open at
        # all times; autocommit=True hands transaction control to the SQL we emit.
        dbapi_connection.autocommit = True
    else:
        dbapi_connection.isolation_level = None
