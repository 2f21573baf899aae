"""SQLite set-up for several writers: :func:`configure`.

Python's ``sqlite3`` module, left alone, manages transactions in a way SQLAlchemy cannot see:
it opens them only before INSERT/UPDATE/DELETE (so a transaction's reads run outside it), and a
``SAVEPOINT`` issued before any write silently *becomes* the transaction, so releasing it
commits everything — the outer transaction has nothing left to roll back. :func:`configure`
applies SQLAlchemy's documented recipe: the driver's own transaction handling off, SQLAlchemy
emits ``BEGIN`` itself; plus a busy timeout and WAL journaling.

When a transaction takes the database's write lock is the ``begin=`` strategy; the default,
``"first_write"``, runs the reads before a transaction's first write on their own (each sees
the latest commit) and sends ``BEGIN IMMEDIATE`` right before the first write, ``SAVEPOINT``
or locking SELECT: writers queue for the lock (fairly, see
:func:`locksafe.dialects.sqlite.wait_for_write_lock`) instead of failing on a stale snapshot,
readers never wait, and two sessions of one call do not deadlock when the first only read.
``docs/sqlite.md`` compares it with ``"deferred"``, ``"immediate"`` and ``"exclusive"``.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from locksafe.dialects.sqlite import (
    PATH,
    adopt_a_transaction_in_progress,
    after_error,
    holds_write_lock,
    immediate_block,
    lost,
    main_file,
    on_sqlite3,
    only_reads,
    outside,
    owe_begin,
    pay_owed_begin,
    refuse_to_wait_on_ourselves,
    release_gate,
    released,
    rolled_back_under,
    sqlalchemy_autocommit,
)
from locksafe.kinds import TransactionLost

if TYPE_CHECKING:  # at run time, async engines are told by their sync_engine: no greenlet needed
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["configure", "immediate"]

JournalMode = Literal["wal", "delete", "truncate", "persist", "memory", "off"]
Begin = Literal["first_write", "deferred", "immediate", "exclusive"]

_BEGIN_SQL = {
    "first_write": "BEGIN IMMEDIATE",
    "deferred": "BEGIN",
    "immediate": "BEGIN IMMEDIATE",
    "exclusive": "BEGIN EXCLUSIVE",
}
_JOURNAL_MODES = ("wal", "delete", "truncate", "persist", "memory", "off")
_CONFIGURED = "_locksafe_sqlite_configured"
#: ``connection_record.info`` key: this DB-API connection is set up.
_SET_UP = "locksafe.sqlite.set_up"


E = TypeVar("E", bound="Engine | AsyncEngine")


def _check_options(
    busy_timeout: object, journal_mode: object, begin: object, foreign_keys: object
) -> tuple[float, str | None]:
    """The options, checked: (busy timeout in seconds, journal mode in lower case or None)."""
    choices = ", ".join(map(repr, _BEGIN_SQL))
    if not isinstance(begin, str):
        raise TypeError(f"begin must be a str, one of {choices}; got {type(begin).__name__}")
    if begin not in _BEGIN_SQL:
        raise ValueError(f"begin={begin!r} is not one of {choices}")
    modes = ", ".join(map(repr, _JOURNAL_MODES))
    if journal_mode is not None and not isinstance(journal_mode, str):
        raise TypeError(
            f"journal_mode must be a str, one of {modes}, or None; got "
            f"{type(journal_mode).__name__}"
        )
    if journal_mode is not None and journal_mode.lower() not in _JOURNAL_MODES:
        raise ValueError(f"journal_mode={journal_mode!r} is not one of {modes} or None")
    if foreign_keys is not None and not isinstance(foreign_keys, bool):
        raise TypeError(
            f"foreign_keys must be True, False or None, got {type(foreign_keys).__name__}"
        )
    if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, (int, float)):
        raise TypeError(
            f"busy_timeout must be a number of seconds (int or float), got "
            f"{type(busy_timeout).__name__} {busy_timeout!r}"
        )
    try:
        seconds = float(busy_timeout)
    except OverflowError:  # an int past float's range
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"busy_timeout={busy_timeout!r} must be a finite number of seconds ≥ 0")
    if seconds * 1000 > 2**31 - 1:
        raise ValueError(f"busy_timeout={busy_timeout!r} is more than SQLite takes (24.8 days)")
    return seconds, journal_mode.lower() if journal_mode is not None else None


def configure(
    engine: E,
    *,
    busy_timeout: float = 30.0,
    journal_mode: JournalMode | None = "wal",
    begin: Begin = "first_write",
    foreign_keys: bool | None = None,
) -> E:
    """Make a SQLite engine (sync or async) behave predictably under several writers, several
    sessions and several processes.

    - ``busy_timeout`` (seconds): how long a statement waits for another connection's lock
      before failing with SQLITE_BUSY (``database_busy``);
    - ``journal_mode``: ``"wal"`` (default; readers and the writer do not block each other),
      another SQLite journal mode, or ``None`` to leave it alone;
    - ``begin``: when a transaction takes the database's write lock (see ``docs/sqlite.md``):

      - ``"first_write"`` (default): statements that only read run before the transaction's
        ``BEGIN``, each seeing the latest commit (PostgreSQL's READ COMMITTED); the
        ``BEGIN IMMEDIATE`` goes out right before the first statement that writes, a
        ``SAVEPOINT`` or a locking SELECT (:func:`locksafe.with_row_locks`), so writers queue
        for the lock instead of failing on a stale snapshot, and readers never wait;
      - ``"immediate"`` / ``"exclusive"``: the write lock before the transaction's first
        statement, reads included (every transaction is a writer);
      - ``"deferred"``: SQLite's own ``BEGIN``: snapshot reads, and a read-then-write
        transaction fails at once (``database_busy``) when another writer got in between;
    - ``foreign_keys``: also set ``PRAGMA foreign_keys`` when not ``None``.

    SQLAlchemy then emits ``BEGIN`` itself, so ``Session.begin_nested()`` is a real
    ``SAVEPOINT`` inside the transaction, and a COMMIT never silently commits half a
    transaction (:class:`~locksafe.TransactionLost` when it was rolled back behind the
    connection's back). A connection's set-up statements (``PRAGMA foreign_keys``,
    ``journal_mode``, ``busy_timeout``, ``VACUUM``, ``ATTACH``) run before the ``BEGIN`` so they
    keep their effect. Two connections of one thread where the second would wait for the
    first's write lock raise :class:`~locksafe.SelfDeadlock` at once instead of waiting the
    busy timeout. Connections in ``AUTOCOMMIT`` isolation get no ``BEGIN``. Python ≥ 3.12
    connections made with ``autocommit=True`` or ``False`` are put back into ``sqlite3``'s
    legacy transaction control. Connections the engine pooled before ``configure()`` are set up
    at their next checkout. Returns the engine. Configuring an engine twice raises
    ``ValueError``.

    >>> from sqlalchemy import create_engine
    >>> engine = configure(create_engine("sqlite://"), busy_timeout=2)
    >>> with engine.connect() as conn:
    ...     conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
    2000
    """
    sync_engine = getattr(engine, "sync_engine", engine)
    if not isinstance(sync_engine, Engine):
        raise TypeError(
            "locksafe.sqlite.configure() takes a SQLite Engine or AsyncEngine (create_engine("
            f"'sqlite:///app.db')), got {type(engine).__name__}"
        )
    if sync_engine.dialect.name != "sqlite":
        raise ValueError(
            "locksafe.sqlite.configure() takes a SQLite Engine or AsyncEngine, got "
            f"{getattr(getattr(sync_engine, 'dialect', None), 'name', type(engine).__name__)!r}"
        )
    seconds, journal_mode = _check_options(busy_timeout, journal_mode, begin, foreign_keys)  # type: ignore[assignment]
    if getattr(sync_engine, _CONFIGURED, False):
        raise ValueError("this engine was already configured by locksafe.sqlite.configure()")

    # A positive timeout below one millisecond is one millisecond, not "never wait".
    milliseconds = round(seconds * 1000) if seconds * 1000 >= 1 or seconds == 0 else 1
    pragmas = [f"PRAGMA busy_timeout = {milliseconds:d}"]
    if foreign_keys is not None:
        pragmas.append(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
    begin_sql = _BEGIN_SQL[begin]
    lazy = begin == "first_write"

    implicit = _IMPLICIT_BEGIN[begin]

    def set_up(dbapi_connection: Any, info: dict[Any, Any]) -> None:
        on_sqlite3(dbapi_connection, lambda conn: _legacy_transaction_control(conn, implicit))
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
        info[PATH] = main_file(dbapi_connection)
        info[_SET_UP] = True

    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        set_up(dbapi_connection, connection_record.info)

    def on_checkout(dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        if _SET_UP not in connection_record.info:  # pooled before configure() was called
            set_up(dbapi_connection, connection_record.info)

    def on_begin(conn: Connection) -> None:
        if sqlalchemy_autocommit(conn):  # AUTOCOMMIT: no transaction, so no BEGIN
            return
        if adopt_a_transaction_in_progress(conn):
            return  # begun by the application itself (a raw BEGIN, sqlite3's own before DML)
        # Owed by this Connection alone (several may share one DB-API connection), and sent
        # right before the first statement that needs it.
        owe_begin(conn, begin_sql, lazy=lazy)

    def before_cursor_execute(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        pay_owed_begin(conn, cursor, context, statement)
        if begin == "deferred" and not only_reads(context, statement):
            # A deferred transaction takes the write lock at its first write: not while
            # another connection of this thread holds it.
            refuse_to_wait_on_ourselves(conn)

    def after_cursor_execute(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if not only_reads(context, statement) and not outside(statement):
            holds_write_lock(conn)

    def on_commit(conn: Connection) -> None:
        how = lost(conn)
        released(conn)
        if how is not None:
            raise TransactionLost(
                f"COMMIT refused: this connection's SQLite transaction was rolled back behind "
                f"its back ({how}); what it did before that is gone, and committing what came "
                "after would report success for part of the transaction. Nothing was committed: "
                "roll back and run the whole transaction again"
            )

    def on_reset(dbapi_connection: Any, record: Any, reset_state: Any) -> None:
        release_gate(dbapi_connection)
        rolled_back_under(
            dbapi_connection,
            "the pool rolled back the sqlite3 connection it shares with another SQLAlchemy "
            "Connection when that one was returned — StaticPool, or SingletonThreadPool for "
            "sqlite://",
        )

    def on_error(context: Any) -> None:
        if context.connection is not None:
            after_error(context.connection)

    event.listen(sync_engine, "connect", on_connect)
    event.listen(sync_engine, "checkout", on_checkout)
    event.listen(sync_engine, "begin", on_begin)
    event.listen(sync_engine, "commit", on_commit)
    event.listen(sync_engine, "rollback", released)
    event.listen(sync_engine, "before_cursor_execute", before_cursor_execute)
    # Whatever ended a connection's transaction behind SQLAlchemy's Connection (a garbage-
    # collected Connection, an invalidation), its place in the writers' queue goes with it.
    event.listen(
        sync_engine, "checkin", lambda dbapi_connection, record: release_gate(dbapi_connection)
    )
    event.listen(sync_engine, "reset", on_reset)
    event.listen(sync_engine, "handle_error", on_error)
    event.listen(
        sync_engine,
        "invalidate",
        lambda dbapi_connection, record, exception: release_gate(dbapi_connection),
    )
    if begin == "deferred":
        event.listen(sync_engine, "after_cursor_execute", after_cursor_execute)
    setattr(sync_engine, _CONFIGURED, True)
    return engine


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Inside this block, a SQLite transaction of a configured engine takes the database's write
    lock before its next statement, reads included — ``begin="immediate"`` for one block of
    one call (its ``contextvars`` context: the current thread's job or asyncio task).

    For a check-then-insert with no row to lock (a count of active things, a uniqueness check
    by query): under the default ``begin="first_write"`` the check reads the latest commit
    without a lock, and two transactions can both pass it. Inside ``immediate()`` the check
    waits for the write lock and the transactions run one after the other.

    >>> import locksafe.sqlite
    >>> from sqlalchemy import create_engine, text
    >>> engine = locksafe.sqlite.configure(create_engine("sqlite://"))
    >>> with locksafe.sqlite.immediate(), engine.begin() as conn:
    ...     conn.execute(text("SELECT 1")).scalar_one()  # after BEGIN IMMEDIATE
    1

    A transaction that already holds the write lock is not affected, nor is one whose reads
    already ran: the lock comes before its next statement.
    """
    token = immediate_block.set(True)
    try:
        yield
    finally:
        immediate_block.reset(token)


#: ``sqlite3``'s own (legacy) ``isolation_level`` per strategy: the ``BEGIN`` it sends by itself
#: before INSERT / UPDATE / DELETE / REPLACE run on the raw DB-API connection outside a
#: transaction (SQLAlchemy's statements get locksafe's ``BEGIN`` first, so it never sends one
#: for them): raw DB-API writes stay inside the transaction, as with stock ``sqlite3``.
_IMPLICIT_BEGIN = {
    "first_write": "IMMEDIATE",
    "deferred": "DEFERRED",
    "immediate": "IMMEDIATE",
    "exclusive": "EXCLUSIVE",
}


def _legacy_transaction_control(connection: Any, implicit: str) -> None:
    """On the ``sqlite3`` connection itself: ``sqlite3``'s legacy transaction control with
    ``isolation_level = implicit`` (it begins a transaction only before raw DML, and commits
    only when told). Python ≥ 3.12's ``autocommit=True`` would make ``commit()`` /
    ``rollback()`` do nothing and ``autocommit=False`` keeps a transaction open at all times:
    both go back to ``LEGACY_TRANSACTION_CONTROL`` first, and a transaction ``autocommit=False``
    opened is rolled back."""
    legacy = getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", None)
    if legacy is not None and getattr(connection, "autocommit", legacy) != legacy:
        connection.autocommit = legacy  # leaves an open transaction open
        if connection.in_transaction:
            connection.rollback()
    connection.isolation_level = implicit
