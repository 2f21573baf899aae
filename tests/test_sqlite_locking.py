"""SQLite row locks beyond one main database: attached databases, views, a FROM locksafe cannot
name — always the write lock of the database(s) actually read, on both SQLite cells."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    bindparam,
    column,
    event,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import locksafe.sqlite
from harness.cells import Cell
from harness.probes import sqlite_write_locked as write_lock_held
from locksafe import LockErrorKind, classify, with_row_locks
from locksafe.dialects import sqlite as sqlite_support

pytestmark = pytest.mark.cells("sqlite")

views = MetaData()
#: Declared as tables; in the database they are views.
main_view = Table(
    "lk_items_v", views, Column("id", Integer, primary_key=True), Column("v", Integer)
)
main_view_in_main = Table(
    "lk_items_v",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("v", Integer),
    schema="main",
)
aux_view = Table(
    "lk_jobs_v", views, Column("id", Integer, primary_key=True), Column("v", Integer), schema="aux"
)
aux_view_unqualified = Table(
    "lk_jobs_v", MetaData(), Column("id", Integer, primary_key=True), Column("v", Integer)
)
temp_view = Table("lk_temp_v", views, Column("id", Integer, primary_key=True), Column("v", Integer))
only_view = Table("lk_only_v", views, Column("id", Integer, primary_key=True), schema="aux2")
aux_jobs = Table(
    "lk_jobs",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("v", Integer),
    schema="aux",
)


class Databases:
    """main (``lk_items`` and a view on it, or nothing at all), ``aux`` (``lk_jobs`` and a
    view on it) and ``aux2`` (a view only), attached on every connection of the engine."""

    def __init__(
        self,
        cell: Cell,
        tmp_path: Path,
        *,
        main_tables: bool = True,
        read_only: bool = False,
        wal: bool = False,
    ) -> None:
        assert cell.url.database
        self.cell = cell
        self.main = Path(cell.url.database)
        self.aux = tmp_path / "aux.sqlite"
        self.aux2 = tmp_path / "aux2.sqlite"
        #: ``ref`` (``lk_ref``), attached read-only when ``read_only``.
        self.ref = tmp_path / "ref.sqlite" if read_only else None
        for path, script in (
            (
                self.main,
                "CREATE TABLE lk_items (id INTEGER PRIMARY KEY, v INTEGER);"
                "INSERT INTO lk_items VALUES (1, 0);"
                "CREATE VIEW lk_items_v AS SELECT id, v FROM lk_items;"
                if main_tables
                else "",
            ),
            (
                self.aux,
                "CREATE TABLE lk_jobs (id INTEGER PRIMARY KEY, v INTEGER);"
                "INSERT INTO lk_jobs VALUES (1, 10);"
                "CREATE VIEW lk_jobs_v AS SELECT id, v FROM lk_jobs;",
            ),
            (self.aux2, "CREATE VIEW lk_only_v AS SELECT 1 AS id; PRAGMA user_version = 7;"),
            *(
                [
                    (
                        self.ref,
                        "CREATE TABLE lk_ref (id INTEGER PRIMARY KEY, v INTEGER);"
                        "INSERT INTO lk_ref VALUES (1, 20);",
                    )
                ]
                if self.ref is not None
                else []
            ),
        ):
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.executescript(script)
                if wal:
                    conn.execute("PRAGMA journal_mode = wal")

    def engine(self, **configure: Any) -> Any:
        # uri=True: ATTACH then takes a file: URI (mode=ro) whatever SQLite's build default.
        engine = self.cell.engine(connect_args={"timeout": 5, "uri": True})
        sync = getattr(engine, "sync_engine", engine)

        @event.listens_for(sync, "connect")
        def attach(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"ATTACH DATABASE '{self.aux}' AS aux")
            cursor.execute(f"ATTACH DATABASE '{self.aux2}' AS aux2")
            if self.ref is not None:
                cursor.execute(f"ATTACH DATABASE 'file:{self.ref}?mode=ro' AS ref")
            cursor.close()

        configure.setdefault("busy_timeout", 5)
        # These tests lock inside a transaction that has begun without the write lock: SQLite's
        # own deferred BEGIN ("first_write" would take every database's lock at the locking
        # SELECT's BEGIN IMMEDIATE, before any per-database choice is made).
        configure.setdefault("begin", "deferred")
        return locksafe.sqlite.configure(engine, **configure)

    def held(self) -> dict[str, bool]:
        return {
            "main": write_lock_held(self.main),
            "aux": write_lock_held(self.aux),
            "aux2": write_lock_held(self.aux2),
        }


def locked_in_a_transaction(
    dbs: Databases, engine: Any, stmt: Any, before: str | None = None
) -> tuple[list[Any], dict[str, bool], dict[str, bool]]:
    """Run ``stmt`` in a transaction (configure()'s explicit BEGIN: no lock yet); returns its
    rows, the write locks held right after it, and after the transaction ended."""

    def work(conn: Connection) -> tuple[list[Any], dict[str, bool]]:
        if before is not None:
            conn.exec_driver_sql(before)
            conn.commit()
        with conn.begin():
            conn.exec_driver_sql("SELECT 1")  # the transaction has begun, without the lock
            rows = [tuple(row) for row in conn.execute(stmt)]
            return rows, dbs.held()

    rows, during = dbs.cell.run(work, engine=engine)
    return rows, during, dbs.held()


NO_LOCKS = {"main": False, "aux": False, "aux2": False}


# -- attached databases -----------------------------------------------------------------------


def test_a_table_of_an_attached_database_locks_that_database(cell: Cell, tmp_path: Path) -> None:
    dbs = Databases(cell, tmp_path)
    engine = dbs.engine()
    rows, during, after = locked_in_a_transaction(dbs, engine, with_row_locks(select(aux_jobs)))
    assert rows == [(1, 10)]
    assert during == {"main": False, "aux": True, "aux2": False}  # that one, and only that one
    assert after == NO_LOCKS


@pytest.mark.parametrize(
    "stmt",
    [
        select(table("lk_jobs", column("id"), column("v"), schema="aux")),
        select(column("id"), column("v")).select_from(text("aux.lk_jobs")),
        select(table("lk_jobs", column("id"), column("v"))),  # SQLite finds it in aux
    ],
    ids=["table(schema='aux')", "text FROM", "table() without schema"],
)
def test_a_lightweight_or_textual_from_of_an_attached_database_locks_it(
    cell: Cell, tmp_path: Path, stmt: Any
) -> None:
    dbs = Databases(cell, tmp_path)
    rows, during, after = locked_in_a_transaction(dbs, dbs.engine(), with_row_locks(stmt))
    assert rows == [(1, 10)]
    assert during["aux"], during
    assert after == NO_LOCKS


def test_a_textual_from_locks_every_database_even_when_main_has_no_tables(
    cell: Cell, tmp_path: Path
) -> None:
    """locksafe cannot tell what a textual FROM reads: every database's write lock is taken —
    never none because main happens to have no tables."""
    dbs = Databases(cell, tmp_path, main_tables=False)
    stmt = with_row_locks(select(column("v")).select_from(text("aux.lk_jobs")))
    rows, during, after = locked_in_a_transaction(dbs, dbs.engine(), stmt)
    assert rows == [(10,)]
    assert during == ALL
    assert after == NO_LOCKS


def test_schema_translate_map_locks_the_translated_database(cell: Cell, tmp_path: Path) -> None:
    """The statement runs on aux.lk_jobs; main has an lk_jobs too, which the untranslated name
    would lock instead."""
    dbs = Databases(cell, tmp_path)
    with contextlib.closing(sqlite3.connect(dbs.main)) as conn:
        conn.execute("CREATE TABLE lk_jobs (id INTEGER PRIMARY KEY, v INTEGER)")
    jobs = Table(
        "lk_jobs", MetaData(), Column("id", Integer, primary_key=True), Column("v", Integer)
    )
    engine = dbs.engine()

    def work(conn: Connection) -> tuple[list[Any], dict[str, bool]]:
        conn.execution_options(schema_translate_map={None: "aux"})
        with conn.begin():
            conn.exec_driver_sql("SELECT 1")
            rows = [tuple(row) for row in conn.execute(with_row_locks(select(jobs)))]
            return rows, dbs.held()

    assert cell.run(work, engine=engine) == ([(1, 10)], {"main": False, "aux": True, "aux2": False})


def test_write_lock_sql_names_each_database_once_in_a_fixed_order() -> None:
    """Table and table() alike; a schema-less name stays SQLite's to resolve (it may live in
    any database), a TEMP table is in temp."""

    class Context:
        execution_options: dict[str, Any] = {}  # noqa: RUF012

    scratch = Table("scratch", MetaData(), Column("id", Integer), prefixes=["TEMPORARY"])
    statements = sqlite_support.write_lock_sql(
        Context(),  # type: ignore[arg-type]
        [
            table("jobs", schema="aux"),
            aux_jobs,
            table("b"),
            scratch,
            Table("a", MetaData(), Column("id", Integer)),
            table("B"),
        ],
    )
    assert statements == [
        'DELETE FROM "a" WHERE 0',
        'DELETE FROM "b" WHERE 0',
        'DELETE FROM "aux"."jobs" WHERE 0',
        'DELETE FROM "temp"."scratch" WHERE 0',
    ]


# -- views ------------------------------------------------------------------------------------


ALL = {"main": True, "aux": True, "aux2": True}


@pytest.mark.parametrize(
    ("view", "rows", "locked"),
    [
        (main_view_in_main, [(1, 0)], {"main": True, "aux": False, "aux2": False}),
        (aux_view, [(1, 10)], {"main": False, "aux": True, "aux2": False}),
        # Without a schema SQLite resolves the name (temp, main, then attached databases), and
        # a temporary view may read any database: every database is locked.
        (main_view, [(1, 0)], ALL),
        (aux_view_unqualified, [(1, 10)], ALL),
        (temp_view, [(1, 10)], ALL),
    ],
    ids=["schema='main'", "schema='aux'", "main, no schema", "attached, no schema", "temporary"],
)
def test_a_view_locks_the_database_it_reads(
    cell: Cell, tmp_path: Path, view: Table, rows: list[Any], locked: dict[str, bool]
) -> None:
    dbs = Databases(cell, tmp_path)
    engine = dbs.engine()
    before = "CREATE TEMP VIEW lk_temp_v AS SELECT id, v FROM aux.lk_jobs"
    got, during, after = locked_in_a_transaction(dbs, engine, with_row_locks(select(view)), before)
    assert got == rows
    assert during == locked
    assert after == NO_LOCKS


def test_a_view_in_a_database_without_tables_still_takes_its_lock(
    cell: Cell, tmp_path: Path
) -> None:
    """Nothing to write a no-op on: the database's user_version is rewritten with its own
    value instead, which takes the lock and changes nothing."""
    dbs = Databases(cell, tmp_path)
    rows, during, after = locked_in_a_transaction(
        dbs, dbs.engine(), with_row_locks(select(only_view))
    )
    assert rows == [(1,)]
    assert during == {"main": False, "aux": False, "aux2": True}
    assert after == NO_LOCKS
    with contextlib.closing(sqlite3.connect(dbs.aux2)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (7,)


def test_locked_read_modify_write_through_a_view_loses_no_update(
    cell: Cell, tmp_path: Path
) -> None:
    """Threads read through the view with a row lock, then write the table behind it; every
    increment survives."""
    dbs = Databases(cell, tmp_path)
    engine = cell.warm_up(dbs.engine(busy_timeout=30))
    items = Table(
        "lk_items", MetaData(), Column("id", Integer, primary_key=True), Column("v", Integer)
    )
    workers, rounds = 4, 5
    start = threading.Barrier(workers)
    errors: list[BaseException] = []

    def increment(session: Session) -> None:
        with session.begin():
            value = session.execute(with_row_locks(select(main_view.c.v))).scalar_one()
            session.execute(update(items).values(v=value + 1))

    def worker() -> None:
        try:
            start.wait(10)
            for _ in range(rounds):
                cell.run_session(increment, engine=engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive()
    assert errors == []
    with contextlib.closing(sqlite3.connect(dbs.main)) as conn:
        assert conn.execute("SELECT v FROM lk_items").fetchone() == (workers * rounds,)


@pytest.mark.parametrize("option", ["nowait", "skip_locked"])
def test_nowait_and_skip_locked_on_a_busy_attached_database(
    cell: Cell, tmp_path: Path, option: str
) -> None:
    """Another connection holds aux's write lock (main is free): nowait fails at once with
    database_busy, skip_locked returns no rows."""
    dbs = Databases(cell, tmp_path)
    engine = dbs.engine(busy_timeout=2)
    stmt = with_row_locks(select(aux_jobs), **{option: True})

    def work(conn: Connection) -> Any:
        with conn.begin():
            conn.exec_driver_sql("SELECT 1")
            try:
                return conn.execute(stmt).all()
            except OperationalError as exc:
                return exc

    holder = sqlite3.connect(dbs.aux, timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        outcome = cell.run(work, engine=engine)
    finally:
        holder.close()
    if option == "nowait":
        assert isinstance(outcome, OperationalError), outcome
        assert classify(outcome) is LockErrorKind.DATABASE_BUSY
    else:
        assert outcome == []


def test_configure_sets_the_journal_mode_of_the_main_database_only(
    cell: Cell, tmp_path: Path
) -> None:
    """A PRAGMA journal_mode without a schema would also switch (and wait for the lock of)
    every database a connect listener attached; configure() is about the engine's own."""
    dbs = Databases(cell, tmp_path)

    def modes(conn: Connection) -> tuple[str, str]:
        return (
            conn.exec_driver_sql("PRAGMA main.journal_mode").scalar_one(),
            conn.exec_driver_sql("PRAGMA aux.journal_mode").scalar_one(),
        )

    assert cell.run(modes, engine=dbs.engine(journal_mode="wal")) == ("wal", "delete")


# -- skip_locked: no rows, nothing read ----------------------------------------------------------

items = Table("lk_items", MetaData(), Column("id", Integer, primary_key=True), Column("v", Integer))


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_skip_locked_answers_with_no_rows_and_reads_nothing(
    cell: Cell, tmp_path: Path, journal: str
) -> None:
    """While another connection holds the write lock, skip_locked returns no rows — the
    statement's columns, its parameters bound — without reading: the holder can commit at once
    (rollback journal: no shared lock held against it), and the transaction can still take the
    write lock afterwards (WAL: no snapshot that the holder's commit made stale)."""
    dbs = Databases(cell, tmp_path)
    engine = cell.warm_up(dbs.engine(journal_mode=journal))
    stmt = with_row_locks(
        select(items).where(items.c.id >= bindparam("low")).order_by(items.c.id), skip_locked=True
    )

    def work(conn: Connection) -> tuple[list[str], list[Any], list[Any]]:
        holder = sqlite3.connect(dbs.main, timeout=0, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            holder.execute("UPDATE lk_items SET v = 7")
            with conn.begin():
                conn.exec_driver_sql("SELECT 1")
                result = conn.execute(stmt, {"low": 1})
                keys, rows = list(result.keys()), result.all()
                holder.execute("COMMIT")  # waits for nobody: this transaction read nothing
                locked = [tuple(row) for row in conn.execute(with_row_locks(select(items.c.v)))]
            return keys, rows, locked
        finally:
            holder.close()

    assert cell.run(work, engine=engine) == (["id", "v"], [], [(7,)])


# -- Python 3.10: telling a busy database from a stale snapshot -----------------------------------


@pytest.mark.parametrize("stale", ["main", "aux"])
def test_skip_locked_on_a_stale_snapshot_skips_while_holding_another_database(
    cell: Cell, tmp_path: Path, stale: str
) -> None:
    """The transaction read one database (a WAL snapshot another connection then made stale)
    and holds the write lock of another: skip_locked on the stale one returns no rows — another
    transaction changed them since this one's snapshot, as if it still held them; SKIP LOCKED
    never fails because of a lock (issue 8: the scheduler died on this) — and the transaction
    goes on and commits what it wrote. Python 3.10's exceptions carry no extended code: only
    the database whose lock failed is probed, never the one this transaction holds."""
    dbs = Databases(cell, tmp_path, wal=True)
    engine = dbs.engine(busy_timeout=1)
    read, written, path = (
        (items, aux_jobs, dbs.main) if stale == "main" else (aux_jobs, items, dbs.aux)
    )
    table_name = "lk_items" if stale == "main" else "lk_jobs"

    def work(conn: Connection) -> Any:
        with conn.begin():
            conn.execute(select(read)).all()  # a snapshot of the stale database
            conn.execute(update(written).values(v=5))  # this transaction holds that lock
            with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
                other.execute(f"UPDATE {table_name} SET v = v + 1")  # committed
            return conn.execute(with_row_locks(select(read), skip_locked=True)).all()

    assert cell.run(work, engine=engine) == []
    with cell.sync_engine().connect() as conn:
        conn.exec_driver_sql(f"ATTACH DATABASE '{dbs.aux}' AS aux")
        assert set(conn.execute(select(written.c.v)).scalars()) == {5}


def test_skip_locked_on_a_busy_database_sqlite_finds_by_name(cell: Cell, tmp_path: Path) -> None:
    """A table without a schema, which SQLite finds in an attached database that another
    connection holds, while this transaction holds main's write lock: no rows (on Python
    3.10 the probe finds which database the name is in, and probes that one)."""
    dbs = Databases(cell, tmp_path, wal=True)
    engine = dbs.engine(busy_timeout=1)
    stmt = with_row_locks(select(table("lk_jobs", column("id"))), skip_locked=True)

    def work(conn: Connection) -> list[Any]:
        holder = sqlite3.connect(dbs.aux, timeout=0, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with conn.begin():
                conn.execute(update(items).values(v=5))
                return conn.execute(stmt).all()
        finally:
            holder.close()

    assert cell.run(work, engine=engine) == []


# -- read-only databases ----------------------------------------------------------------------

ref_items = Table(
    "lk_ref",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("v", Integer),
    schema="ref",
)


def check_read_only(dbs: Databases, engine: Any) -> None:
    """``ref`` really is read-only on the engine's connections."""

    def write(conn: Connection) -> None:
        with pytest.raises(OperationalError, match="readonly"):
            conn.execute(update(ref_items).values(v=0))
        conn.rollback()

    dbs.cell.run(write, engine=engine)


def test_a_database_attached_read_only_is_left_out_of_the_lock(cell: Cell, tmp_path: Path) -> None:
    """This connection cannot write ``ref``, so it has no write lock to take there (SQLite's own
    BEGIN IMMEDIATE leaves it out too): a SELECT locksafe cannot name locks every other
    database, a join with ``ref`` locks the other table's database."""
    dbs = Databases(cell, tmp_path, read_only=True)
    engine = dbs.engine()
    check_read_only(dbs, engine)
    textual = with_row_locks(select(column("v")).select_from(text("lk_items")))
    rows, during, after = locked_in_a_transaction(dbs, engine, textual)
    assert rows == [(0,)]
    assert during == ALL
    assert after == NO_LOCKS
    joined = with_row_locks(
        select(items.c.v, ref_items.c.v).join_from(items, ref_items, items.c.id == ref_items.c.id)
    )
    rows, during, after = locked_in_a_transaction(dbs, engine, joined)
    assert rows == [(0, 20)]
    assert during == {"main": True, "aux": False, "aux2": False}
    assert after == NO_LOCKS


def test_a_row_lock_on_read_only_databases_only_is_refused(cell: Cell, tmp_path: Path) -> None:
    """A SELECT that reads nothing this connection can write (a database attached read-only;
    a connection in PRAGMA query_only) cannot be locked at all: a clear error naming the
    database, never a lock that locks nothing."""
    dbs = Databases(cell, tmp_path, read_only=True)
    engine = dbs.engine()
    check_read_only(dbs, engine)

    def work(conn: Connection) -> tuple[str, str]:
        with conn.begin():
            conn.exec_driver_sql("SELECT 1")
            with pytest.raises(locksafe.UnsupportedLockOption) as attached:
                conn.execute(with_row_locks(select(ref_items)))
        conn.exec_driver_sql("PRAGMA query_only = 1")
        conn.commit()
        with conn.begin():
            conn.exec_driver_sql("SELECT 1")
            with pytest.raises(locksafe.UnsupportedLockOption) as query_only:
                conn.execute(with_row_locks(select(items)))
        conn.exec_driver_sql("PRAGMA query_only = 0")
        conn.commit()
        return str(attached.value), str(query_only.value)

    attached, query_only = cell.run(work, engine=engine)
    assert "opened 'ref' read-only" in attached
    assert "read-only" in query_only
    assert dbs.held() == NO_LOCKS
