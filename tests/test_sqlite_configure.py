"""locksafe.sqlite.configure(): real transactions, real SAVEPOINTs, and BEGIN IMMEDIATE,
shown with real concurrent writers on both SQLite cells."""

from __future__ import annotations

import contextlib
import inspect
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    create_engine,
    create_mock_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InvalidRequestError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

import locksafe
import locksafe.sqlite
from harness.cells import Cell
from harness.probes import sqlite_write_locked as write_lock_held

pytestmark = pytest.mark.cells("sqlite")

T = TypeVar("T")

metadata = MetaData()
items = Table("cfg_items", metadata, Column("id", Integer, primary_key=True, autoincrement=False))
counter = Table(
    "cfg_counter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("value", Integer, nullable=False),
)


def setup(cell: Cell) -> None:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode = wal")
        conn.execute(insert(counter).values(id=1, value=0))


def count_items(cell: Cell) -> int:
    with cell.sync_engine().connect() as conn:
        return conn.execute(select(func.count()).select_from(items)).scalar_one()


def savepoints_then_rollback(session: Session, peek: Any) -> int:
    """Two SAVEPOINT blocks inside one transaction, then a rollback of the whole transaction.
    Returns what another connection saw between the two blocks."""
    session.begin()
    with session.begin_nested():
        session.execute(insert(items).values(id=1))
    seen = peek()
    with session.begin_nested():
        session.execute(insert(items).values(id=2))
    session.rollback()
    return int(seen)


@pytest.mark.parametrize("configured", [False, True], ids=["pysqlite-default", "configured"])
def test_begin_nested_is_a_real_savepoint_only_when_configured(
    cell: Cell, configured: bool
) -> None:
    setup(cell)
    engine = cell.engine()
    if configured:
        locksafe.sqlite.configure(engine, busy_timeout=5)
    engine = cell.warm_up(engine)
    outside = cell.sync_engine()

    def peek() -> int:
        with outside.connect() as conn:  # a concurrent reader
            return conn.execute(select(func.count()).select_from(items)).scalar_one()

    seen = cell.run_session(savepoints_then_rollback, peek, engine=engine)
    if configured:
        assert seen == 0, "another connection saw uncommitted work"
        assert count_items(cell) == 0, "rolled-back work survived"
    else:
        # The legacy driver: the first SAVEPOINT opened the transaction itself, so RELEASE
        # committed it — visible to others at once and kept after the "rollback".
        assert seen == 1
        assert count_items(cell) == 2


def read_then_write(
    cell: Cell, engine: Any, workers: int, rounds: int, *, nested: bool = False
) -> dict[str, Any]:
    """``workers`` threads each run ``rounds`` read-then-write transactions on one counter
    (``nested``: inside a ``begin_nested()`` that opens the transaction); failures are counted
    (not retried) with how long the failing statement waited."""
    failures: list[float] = []
    kinds: list[Any] = []
    successes: list[int] = []
    start = threading.Barrier(workers)

    def one(session: Session) -> None:
        with session.begin(), session.begin_nested() if nested else contextlib.nullcontext():
            value = session.execute(select(counter.c.value)).scalar_one()
            time.sleep(0.002)  # others commit in between
            began = time.monotonic()
            try:
                session.execute(update(counter).values(value=value + 1))
            except OperationalError as exc:
                failures.append(time.monotonic() - began)
                kinds.append(locksafe.classify(exc))
                raise
        successes.append(1)

    def worker() -> None:
        start.wait(10)
        for _ in range(rounds):
            with contextlib.suppress(OperationalError):
                cell.run_session(one, engine=engine)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive()
    with cell.sync_engine().connect() as conn:
        final = conn.execute(select(counter.c.value)).scalar_one()
    assert set(kinds) <= {locksafe.LockErrorKind.DATABASE_BUSY}, kinds
    return {"failures": failures, "successes": len(successes), "final": final}


def test_deferred_upgrade_fails_at_once_whatever_the_busy_timeout(cell: Cell) -> None:
    setup(cell)
    engine = cell.warm_up(
        locksafe.sqlite.configure(cell.engine(), busy_timeout=10, begin="deferred")
    )
    result = read_then_write(cell, engine, workers=6, rounds=10)
    assert result["failures"], "no read→write upgrade failed: the test provoked nothing"
    # Each failure came long before the 10 s busy timeout: SQLite refuses the upgrade at once.
    assert max(result["failures"]) < 5.0
    assert result["final"] == result["successes"]


def test_begin_immediate_makes_writers_wait_instead(cell: Cell) -> None:
    setup(cell)
    engine = cell.warm_up(
        locksafe.sqlite.configure(cell.engine(), busy_timeout=10, begin="immediate")
    )
    result = read_then_write(cell, engine, workers=6, rounds=10)
    assert result["failures"] == []
    assert result["final"] == result["successes"] == 60


def test_configure_rejects_bad_input(cell: Cell, tmp_path: Any) -> None:
    engine = cell.engine()
    locksafe.sqlite.configure(engine)
    with pytest.raises(ValueError, match="already configured"):
        locksafe.sqlite.configure(engine)
    fresh = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match="begin="):
        locksafe.sqlite.configure(fresh, begin="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="journal_mode="):
        locksafe.sqlite.configure(fresh, journal_mode="wall")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="busy_timeout="):
        locksafe.sqlite.configure(fresh, busy_timeout=-1)
    with pytest.raises(ValueError, match="SQLite"):
        # Another dialect (an engine that never connects; PyMySQL is installed in the
        # SQLite-only test leg too).
        locksafe.sqlite.configure(create_engine("mysql+pymysql://u@127.0.0.1:1/x"))
    with pytest.raises(TypeError, match="Engine"):
        # Not an engine at all.
        locksafe.sqlite.configure(create_mock_engine("postgresql://u@127.0.0.1/x", print))
    fresh.dispose()


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"busy_timeout": "5"}, TypeError, "busy_timeout"),
        ({"busy_timeout": True}, TypeError, "busy_timeout"),
        ({"busy_timeout": float("nan")}, ValueError, "busy_timeout"),
        ({"busy_timeout": float("inf")}, ValueError, "busy_timeout"),
        ({"busy_timeout": 10**9}, ValueError, "busy_timeout"),
        ({"begin": ["immediate"]}, TypeError, "begin"),
        ({"begin": None}, TypeError, "begin"),
        ({"journal_mode": 1}, TypeError, "journal_mode"),
        ({"foreign_keys": "on"}, TypeError, "foreign_keys"),
    ],
    ids=str,
)
def test_configure_checks_each_option(
    tmp_path: Any, options: dict[str, Any], error: type[Exception], names: str
) -> None:
    """Each option is checked at call time, with a message naming it (issue 9)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(error, match=names):
        locksafe.sqlite.configure(engine, **options)
    assert not event.contains(engine, "begin", lambda conn: None)
    engine.dispose()


def test_configure_takes_what_sqlite_takes(tmp_path: Any) -> None:
    """journal_mode in any case, as SQLite takes it; a positive busy timeout below a
    millisecond still waits (1 ms), it does not become "never wait"."""
    engine = locksafe.sqlite.configure(
        create_engine(f"sqlite:///{tmp_path / 'x.db'}"), journal_mode="WAL", busy_timeout=0.0004
    )
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 1
    engine.dispose()
    with pytest.raises(TypeError, match="Engine"):
        locksafe.sqlite.configure("sqlite:///app.db")  # type: ignore[type-var]


def test_configure_sets_pragmas(cell: Cell) -> None:
    setup(cell)
    engine = locksafe.sqlite.configure(
        cell.engine(), busy_timeout=1.5, journal_mode="wal", foreign_keys=True
    )

    def pragmas(conn: Any) -> tuple[int, str, int]:
        return (
            conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one(),
            conn.exec_driver_sql("PRAGMA journal_mode").scalar_one(),
            conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one(),
        )

    assert cell.run(pragmas, engine=engine) == (1500, "wal", 1)


# -- helpers for the tests below ------------------------------------------------------------------


@contextlib.contextmanager
def write_lock_holder(path: str) -> Iterator[None]:
    """Another connection holds the database write lock for the block."""
    holder = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
        holder.execute("ROLLBACK")
    finally:
        holder.close()


def pooled(cell: Cell) -> Any:
    """A real pool for the cell's driver (the tests above use none)."""
    return AsyncAdaptedQueuePool if cell.is_async else QueuePool


def counter_value(cell: Cell) -> int:
    with cell.sync_engine().connect() as conn:
        return conn.execute(select(counter.c.value)).scalar_one()


def db_path(cell: Cell) -> str:
    path = cell.url.database
    assert path
    return path


def check_transactions_are_sqlalchemys(cell: Cell, engine: Any) -> None:
    """Commits reach the database, rollbacks undo, SAVEPOINTs nest in the outer transaction,
    and the pooled connection starts its next transaction cleanly."""

    def commit(conn: Connection) -> None:
        conn.execute(insert(items).values(id=1))
        conn.commit()

    def roll_back(conn: Connection) -> None:
        conn.execute(insert(items).values(id=2))
        conn.rollback()

    cell.run(commit, engine=engine)
    assert count_items(cell) == 1, "a commit did not reach SQLite"
    cell.run(roll_back, engine=engine)
    assert count_items(cell) == 1, "a rollback did not undo"
    outside = cell.sync_engine()

    def peek() -> int:
        with outside.connect() as conn:
            return conn.execute(select(func.count()).select_from(items)).scalar_one()

    def nested(session: Session) -> int:
        session.begin()
        with session.begin_nested():
            session.execute(insert(items).values(id=3))
        seen = peek()
        session.rollback()
        return seen

    assert cell.run_session(nested, engine=engine) == 1  # the SAVEPOINT did not commit
    assert count_items(cell) == 1
    journal = cell.run(
        lambda conn: conn.exec_driver_sql("PRAGMA journal_mode").scalar_one(), engine=engine
    )
    assert journal == "wal"


# -- Python >= 3.12: sqlite3's autocommit attribute -----------------------------------------------


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sqlite3 autocommit= is Python >= 3.12")
@pytest.mark.parametrize("autocommit", [False, True], ids=["autocommit=False", "autocommit=True"])
def test_configure_takes_transaction_control_from_sqlite3_autocommit(
    cell: Cell, autocommit: bool
) -> None:
    """connect_args autocommit=True makes sqlite3's commit()/rollback() do nothing, and
    autocommit=False keeps a transaction open at all times: configure() puts the connection
    back into legacy transaction control, so SQLAlchemy's transactions are real (pysqlite, and
    the sqlite3 connection inside the aiosqlite adapter)."""
    setup(cell)
    engine = cell.engine(
        poolclass=pooled(cell), connect_args={"autocommit": autocommit, "timeout": 5}
    )
    locksafe.sqlite.configure(engine, busy_timeout=5)
    check_transactions_are_sqlalchemys(cell, engine)


# -- AUTOCOMMIT connections -----------------------------------------------------------------------


def test_autocommit_connections_stay_autocommit_when_configured(cell: Cell) -> None:
    """SQLAlchemy's AUTOCOMMIT isolation has no transaction: configure() sends no BEGIN there,
    so each write commits at once and no write lock outlives it."""
    setup(cell)
    engine = locksafe.sqlite.configure(cell.engine(poolclass=pooled(cell)), busy_timeout=5)

    def work(conn: Connection) -> bool:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(update(counter).values(value=42))
        return write_lock_held(db_path(cell))

    assert cell.run(work, engine=engine) is False  # returned without commit: AUTOCOMMIT
    assert counter_value(cell) == 42
    # The pooled connection, back in a normal transaction, still commits and rolls back.
    check_transactions_are_sqlalchemys(cell, engine)


@pytest.mark.parametrize("configured", [False, True], ids=["pysqlite-default", "configured"])
def test_a_locking_select_refuses_an_autocommit_connection(cell: Cell, configured: bool) -> None:
    """A row lock outside any transaction could hold nothing past the statement: a clear error,
    and no transaction SQLAlchemy does not know about (later AUTOCOMMIT writes stay
    committed)."""
    setup(cell)
    engine = cell.engine()
    if configured:
        locksafe.sqlite.configure(engine, busy_timeout=5)

    def work(conn: Connection) -> tuple[BaseException | None, bool]:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        error = None
        try:
            conn.execute(locksafe.with_row_locks(select(counter)))
        except locksafe.UnsupportedLockOption as exc:
            error = exc
        conn.execute(update(counter).values(value=7))
        return error, write_lock_held(db_path(cell))

    error, held = cell.run(work, engine=engine)
    assert error is not None
    assert "outside a transaction" in str(error)
    assert "AUTOCOMMIT" in str(error)
    assert held is False
    assert counter_value(cell) == 7


def test_a_locking_select_in_the_callers_own_transaction_on_autocommit_locks(cell: Cell) -> None:
    """AUTOCOMMIT in SQLAlchemy's eyes, but the caller opened a transaction with its own
    BEGIN: the lock is taken in that transaction, never silently skipped."""
    setup(cell)
    engine = locksafe.sqlite.configure(cell.engine(), busy_timeout=5)

    def work(conn: Connection) -> tuple[list[Any], bool, bool]:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("BEGIN")
        rows = [tuple(row) for row in conn.execute(locksafe.with_row_locks(select(counter)))]
        held = write_lock_held(db_path(cell))
        conn.exec_driver_sql("ROLLBACK")
        return rows, held, write_lock_held(db_path(cell))

    assert cell.run(work, engine=engine) == ([(1, 0)], True, False)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sqlite3 autocommit= is Python >= 3.12")
def test_a_locking_select_refuses_sqlite3_autocommit_true(cell: Cell) -> None:
    """Unconfigured, connect_args autocommit=True: sqlite3 would never end a BEGIN locksafe
    sent, so the locking SELECT raises instead."""
    setup(cell)
    engine = cell.engine(connect_args={"autocommit": True, "timeout": 5})

    def work(conn: Connection) -> bool:
        with pytest.raises(locksafe.UnsupportedLockOption, match="autocommit=True"):
            conn.execute(locksafe.with_row_locks(select(counter)))
        return write_lock_held(db_path(cell))

    assert cell.run(work, engine=engine) is False


# -- begin="immediate" with nowait / skip_locked --------------------------------------------------

_LOCKING = re.compile(
    r"^\s*(BEGIN\s+(IMMEDIATE|EXCLUSIVE)|DELETE|UPDATE|INSERT|PRAGMA\s+\S+\.incremental_vacuum)",
    re.I,
)
_TIMEOUT = re.compile(r"^\s*PRAGMA\s+busy_timeout\s*=\s*(\d+)", re.I)


def lock_requests_that_could_wait(statements: list[str], busy_timeout_ms: int) -> list[str]:
    """The statements (as SQLite ran them) that asked for the write lock while the busy
    timeout was not zero, i.e. that would have waited for a busy database."""
    timeout = busy_timeout_ms
    waiting = []
    for sql in statements:
        found = _TIMEOUT.match(sql)
        if found:
            timeout = int(found[1])
        elif _LOCKING.match(sql) and timeout:
            waiting.append(sql)
    return waiting


def trace_statements(engine: Any, statements: list[str]) -> None:
    """Record every statement SQLite runs on the engine's connections (sqlite3's trace)."""
    from sqlalchemy.util import await_only

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        result = driver.set_trace_callback(statements.append)
        if inspect.isawaitable(result):
            await_only(result)

    event.listen(getattr(engine, "sync_engine", engine), "connect", on_connect)


@pytest.mark.parametrize("option", ["nowait", "skip_locked"])
@pytest.mark.parametrize("how", ["autobegin", "conn.begin()", "Session"])
def test_begin_immediate_does_not_make_nowait_or_skip_locked_wait(
    cell: Cell, how: str, option: str
) -> None:
    """configure(begin="immediate") sends its BEGIN right before the transaction's first
    statement; when that is a nowait / skip_locked locking SELECT, the transaction starts
    with a plain BEGIN and the write lock is tried with a zero busy timeout: nowait fails at
    once with database_busy, skip_locked returns no rows — however the transaction began."""
    setup(cell)
    statements: list[str] = []
    engine = cell.engine()
    trace_statements(engine, statements)
    locksafe.sqlite.configure(engine, busy_timeout=2, begin="immediate")
    stmt = locksafe.with_row_locks(select(counter), **{option: True})

    def on_connection(conn: Connection) -> Any:
        if how == "conn.begin()":
            with conn.begin():
                return conn.execute(stmt).all()
        return conn.execute(stmt).all()

    def on_session(session: Session) -> Any:
        return session.execute(stmt).all()

    with write_lock_holder(db_path(cell)):
        statements.clear()
        try:
            if how == "Session":
                outcome: Any = cell.run_session(on_session, engine=engine)
            else:
                outcome = cell.run(on_connection, engine=engine)
        except OperationalError as exc:
            outcome = exc
    assert any(_LOCKING.match(sql) for sql in statements), statements  # the lock was asked for
    assert lock_requests_that_could_wait(statements, 2000) == [], statements
    if option == "nowait":
        assert isinstance(outcome, OperationalError), outcome
        assert locksafe.classify(outcome) is locksafe.LockErrorKind.DATABASE_BUSY
    else:
        assert outcome == []


@pytest.mark.parametrize("how", ["autobegin", "Session"])
def test_begin_immediate_still_begins_immediate(cell: Cell, how: str) -> None:
    """Any other first statement gets the configured BEGIN IMMEDIATE before it runs."""
    setup(cell)
    statements: list[str] = []
    engine = cell.engine()
    trace_statements(engine, statements)
    locksafe.sqlite.configure(engine, busy_timeout=2, begin="immediate")

    def first(conn: Any) -> bool:
        conn.execute(select(counter.c.value)).all()
        return write_lock_held(db_path(cell))

    statements.clear()
    if how == "Session":
        held = cell.run_session(first, engine=engine)
    else:
        held = cell.run(first, engine=engine)
    assert held is True
    begins = [sql for sql in statements if sql.upper().startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE"], statements


# -- configure() on an engine that already connected ----------------------------------------------


def test_configure_applies_to_connections_pooled_before_it(cell: Cell) -> None:
    """An engine that connected before configure() (create_all first, say): the pooled
    connection is set up at its next checkout — busy timeout, journal mode, transactions."""
    setup(cell)
    with contextlib.closing(sqlite3.connect(db_path(cell))) as plain:
        plain.execute("PRAGMA journal_mode = delete")
    engine = cell.engine(poolclass=pooled(cell))
    cell.run(lambda conn: conn.exec_driver_sql("SELECT 1").all(), engine=engine)  # pooled now
    locksafe.sqlite.configure(engine, busy_timeout=4.2, journal_mode="wal")

    def pragmas(conn: Connection) -> tuple[int, str]:
        return (
            conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one(),
            conn.exec_driver_sql("PRAGMA journal_mode").scalar_one(),
        )

    assert cell.run(pragmas, engine=engine) == (4200, "wal")
    check_transactions_are_sqlalchemys(cell, engine)


def test_configure_keeps_an_in_memory_database(cell: Cell) -> None:
    """configure() after the schema was made in an in-memory database: the pooled connection
    (which is the database) is kept, and configured."""
    from sqlalchemy.ext.asyncio import create_async_engine

    url = f"{cell.name}://"
    engine: Any = create_async_engine(url) if cell.is_async else create_engine(url)

    def make(conn: Connection) -> None:
        metadata.create_all(conn)
        conn.execute(insert(counter).values(id=1, value=5))
        conn.commit()

    def after(conn: Connection) -> tuple[int, int]:
        value = conn.execute(select(counter.c.value)).scalar_one()
        conn.commit()
        return value, conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()

    try:
        cell.run(make, engine=engine)
        locksafe.sqlite.configure(engine, busy_timeout=3, journal_mode=None)
        assert cell.run(after, engine=engine) == (5, 3000)
    finally:
        if cell.is_async:
            cell.run_async(engine.dispose)
        else:
            engine.dispose()


# -- begin="immediate" and SAVEPOINTs ---------------------------------------------------------


@pytest.mark.parametrize("option", ["nowait", "skip_locked"])
@pytest.mark.parametrize("how", ["conn.begin_nested()", "Session.begin_nested()"])
def test_begin_immediate_does_not_make_nowait_or_skip_locked_wait_inside_begin_nested(
    cell: Cell, how: str, option: str
) -> None:
    """A SAVEPOINT opening the transaction gets a plain BEGIN (it reads nothing), and the write
    lock stays owed: the nowait / skip_locked SELECT inside it takes it without waiting. The
    owed lock is then taken before the transaction's next statement, waiting as configured."""
    setup(cell)
    statements: list[str] = []
    engine = cell.engine()
    trace_statements(engine, statements)
    locksafe.sqlite.configure(engine, busy_timeout=2, begin="immediate")
    stmt = locksafe.with_row_locks(select(counter), **{option: True})

    holder = sqlite3.connect(db_path(cell), timeout=5, isolation_level=None)

    def in_the_transaction(begin_nested: Any, execute: Any) -> tuple[Any, list[str], bool]:
        try:
            with begin_nested():
                outcome = execute(stmt).all()
        except OperationalError as exc:
            outcome = exc
        waited = lock_requests_that_could_wait(statements, 2000)
        holder.execute("ROLLBACK")  # the holder goes: the next statement can have the lock
        execute(select(counter.c.value)).all()
        return outcome, waited, write_lock_held(db_path(cell))

    def on_connection(conn: Connection) -> tuple[Any, list[str], bool]:
        with conn.begin():
            return in_the_transaction(conn.begin_nested, conn.execute)

    def on_session(session: Session) -> tuple[Any, list[str], bool]:
        with session.begin():
            return in_the_transaction(session.begin_nested, session.execute)

    try:
        holder.execute("BEGIN IMMEDIATE")
        statements.clear()
        if how == "Session.begin_nested()":
            outcome, waited, locked_after = cell.run_session(on_session, engine=engine)
        else:
            outcome, waited, locked_after = cell.run(on_connection, engine=engine)
    finally:
        holder.close()
    assert any(_LOCKING.match(sql) for sql in statements), statements  # the lock was asked for
    if option == "nowait":
        assert isinstance(outcome, OperationalError), outcome
        assert locksafe.classify(outcome) is locksafe.LockErrorKind.DATABASE_BUSY
    else:
        assert outcome == []
    # Nothing asked for the lock with a busy timeout while the holder held it; the statement
    # after the nested block took the write lock the transaction owed.
    assert waited == [], statements
    assert locked_after is True, statements
    begins = [sql for sql in statements if sql.upper().startswith("BEGIN")]
    assert begins == ["BEGIN"], statements


def test_begin_immediate_still_holds_when_begin_nested_opens_the_transaction(cell: Cell) -> None:
    """Read-then-write inside a begin_nested() that opens each transaction: the write lock is
    taken before the first read (nothing is read before it), so no upgrade ever fails and no
    increment is lost."""
    setup(cell)
    statements: list[str] = []
    engine = cell.engine()
    trace_statements(engine, statements)
    engine = cell.warm_up(locksafe.sqlite.configure(engine, busy_timeout=10, begin="immediate"))
    # One transaction on its own: BEGIN, SAVEPOINT, the write lock, and only then the read.
    statements.clear()
    read_then_write(cell, engine, workers=1, rounds=1, nested=True)
    shown = [sql for sql in statements if not sql.upper().startswith("PRAGMA BUSY_TIMEOUT")]
    shown = shown[shown.index("BEGIN") :]  # after the new connection's set-up
    first_read = next(i for i, sql in enumerate(shown) if sql.startswith("SELECT cfg_"))
    assert shown[:2] == ["BEGIN", "SAVEPOINT sa_savepoint_1"], shown
    assert "incremental_vacuum" in shown[first_read - 1], shown
    # Many at once: every upgrade waits instead of failing.
    result = read_then_write(cell, engine, workers=6, rounds=10, nested=True)
    assert result["failures"] == []
    assert result["successes"] == 60
    assert result["final"] == 61


# -- begin="immediate": skip_locked that found the database busy ---------------------------------


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_skip_locked_on_a_busy_database_leaves_the_write_lock_owed(
    cell: Cell, journal: str
) -> None:
    """begin="immediate", and the transaction's first statement is a skip_locked SELECT that
    finds another writer holding the lock: no rows, and nothing read (the writer can commit
    without waiting for this transaction). The write lock is still owed: the next statement
    takes it before it reads, so the read-then-write after it cannot fail."""
    setup(cell)
    engine = locksafe.sqlite.configure(
        cell.engine(), busy_timeout=5, begin="immediate", journal_mode=journal
    )
    cell.warm_up(engine)  # the journal mode is changed before anyone holds a lock
    path = db_path(cell)

    def work(session: Session) -> tuple[list[Any], int, bool]:
        holder = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            holder.execute("UPDATE cfg_counter SET value = 100")
            with session.begin():
                stmt = locksafe.with_row_locks(select(counter), skip_locked=True)
                rows = [tuple(row) for row in session.execute(stmt)]
                holder.execute("COMMIT")  # fails at once if this transaction read anything
                value = session.execute(select(counter.c.value)).scalar_one()
                held = write_lock_held(path)
                session.execute(update(counter).values(value=value + 1))
            return rows, value, held
        finally:
            holder.close()

    rows, value, held = cell.run_session(work, engine=engine)
    assert rows == []
    assert value == 100
    assert held is True, "the write lock was not taken before the read"
    assert counter_value(cell) == 101


# -- the BEGIN and the raw DB-API connection ------------------------------------------------------


@pytest.mark.parametrize("begin", ["first_write", "deferred", "immediate", "exclusive"])
def test_raw_dbapi_writes_are_in_the_transaction(cell: Cell, begin: str) -> None:
    """Raw DB-API INSERTs before and after the transaction's first SQLAlchemy statement are in
    the transaction, and its rollback undoes both — as with stock sqlite3: configure() keeps
    sqlite3's own BEGIN before raw DML (its legacy isolation_level, IMMEDIATE or as the mode
    says), and locksafe takes a transaction begun that way as the Connection's own instead of
    sending a second BEGIN. (Until a reviewer's report, raw work before the first statement was
    committed at once under configure(): a step back from stock.)"""
    setup(cell)
    engine = locksafe.sqlite.configure(cell.engine(), busy_timeout=5, begin=begin)  # type: ignore[arg-type]

    def raw_insert(conn: Connection, item: int) -> None:
        cursor = conn.connection.cursor()
        cursor.execute("INSERT INTO cfg_items (id) VALUES (?)", (item,))
        cursor.close()

    def work(conn: Connection) -> None:
        conn.begin()
        raw_insert(conn, 1)  # before the first statement: sqlite3 begins the transaction
        conn.execute(select(counter.c.value)).all()
        conn.execute(insert(items).values(id=3))
        raw_insert(conn, 2)
        conn.rollback()

    cell.run(work, engine=engine)
    with cell.sync_engine().connect() as conn:
        assert conn.execute(select(items.c.id)).scalars().all() == []


# -- several SQLAlchemy connections over one sqlite3 connection ------------------------------------


def shared_connection_pools(cell: Cell) -> list[str]:
    """The pools whose connections all share one sqlite3 connection, for this cell
    (SQLAlchemy refuses SingletonThreadPool for asyncio engines)."""
    return ["StaticPool"] if cell.is_async else ["SingletonThreadPool", "StaticPool"]


def on_one_sqlite3_connection(cell: Cell, pool: str, fn: Callable[[Engine], T]) -> T:
    """``fn(engine)`` with a sync engine whose connections all share one sqlite3 connection
    (``pool``); on the async cell, the AsyncEngine's sync engine, run where it can await."""
    from sqlalchemy.pool import SingletonThreadPool, StaticPool
    from sqlalchemy.util import greenlet_spawn

    poolclass = SingletonThreadPool if pool == "SingletonThreadPool" else StaticPool
    engine = cell.engine(poolclass=poolclass)
    return fn(engine) if not cell.is_async else cell.run_async(greenlet_spawn, fn, engine)


def test_each_connection_pays_its_own_owed_begin(cell: Cell) -> None:
    """begin="immediate": two SQLAlchemy connections over one sqlite3 connection. The second
    one's checkout, BEGIN, first statement and COMMIT leave the first one's owed BEGIN alone:
    its writes are in its transaction, and its rollback undoes them."""
    setup(cell)

    def scenario(engine: Any) -> tuple[bool, int]:
        sync = locksafe.sqlite.configure(engine, busy_timeout=5, begin="immediate")
        sync = getattr(sync, "sync_engine", sync)
        first = sync.connect()
        first.begin()  # owes BEGIN IMMEDIATE
        second = sync.connect()
        assert second.connection.dbapi_connection is first.connection.dbapi_connection
        second.begin()
        second.execute(select(counter.c.value)).all()  # pays its own BEGIN IMMEDIATE
        second.commit()
        second.close()
        first.execute(insert(items).values(id=1))
        in_transaction = bool(first.connection.driver_connection.in_transaction)
        first.rollback()
        first.close()
        return in_transaction, count_items(cell)

    for pool in shared_connection_pools(cell):
        in_transaction, count = on_one_sqlite3_connection(cell, pool, scenario)
        assert in_transaction is True, pool
        assert count == 0, pool


@pytest.mark.parametrize("begin", ["deferred", "immediate"])
def test_a_second_transaction_on_a_shared_sqlite3_connection_is_refused(
    cell: Cell, begin: str
) -> None:
    """SQLite has one transaction per connection: while the first SQLAlchemy connection's
    transaction is open, the second one's BEGIN raises a clear error, before anything is sent
    (a BEGIN that fails makes SQLAlchemy roll the shared connection back, ending the first
    transaction silently); the first transaction goes on, and its rollback undoes its work."""
    setup(cell)

    def scenario(engine: Any) -> tuple[str, int]:
        sync = locksafe.sqlite.configure(engine, busy_timeout=5, begin=begin)  # type: ignore[arg-type]
        sync = getattr(sync, "sync_engine", sync)
        first = sync.connect()
        first.begin()
        first.execute(insert(items).values(id=1))
        second = sync.connect()
        try:
            with pytest.raises(InvalidRequestError, match="already in a transaction") as caught:
                second.begin()
            first.execute(insert(items).values(id=2))
            first.rollback()
        finally:
            first.close()
            second.close()
        return str(caught.value), count_items(cell)

    for pool in shared_connection_pools(cell):
        message, count = on_one_sqlite3_connection(cell, pool, scenario)
        assert "StaticPool" in message, pool
        assert count == 0, pool
