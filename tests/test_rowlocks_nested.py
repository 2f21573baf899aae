"""A SELECT locked by with_row_locks and nested in another statement still locks.

A locked SELECT used as a subquery, a CTE, a scalar subquery, in ``IN (...)`` or ``EXISTS``, as
an ORM ``Query.subquery()``, or as the source or the filter of an INSERT / UPDATE / DELETE is
compiled into the outer statement, which carries no locksafe option of its own. It must lock
all the same: PostgreSQL and MariaDB render its clause inside the outer statement (and a second
connection's ``NOWAIT`` probe fails while the transaction is open); SQLite takes its database
write lock before the statement runs (a second connection cannot begin a write); where no lock
can be rendered (SQL Server) the statement is refused before it runs.

Every wait is bounded: probes never wait, lock waits are a few seconds at most.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    column,
    delete,
    event,
    exists,
    insert,
    lambda_stmt,
    literal_column,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    foreign,
    joinedload,
    query_expression,
    relationship,
    with_expression,
    with_loader_criteria,
)
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.selectable import Select

from harness.cells import Cell
from harness.probes import sqlite_write_locked
from locksafe import LockErrorKind, UnsupportedLockOption, classify, rowlocks, with_row_locks
from locksafe.binds import offline_dialect
from locksafe.dialects import support_for
from locksafe.testing import OtherConnection

metadata = MetaData()
items = Table(
    "rn_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("owner_id", Integer, nullable=False),
    Column("v", Integer, nullable=False),
)
owners = Table(
    "rn_owners",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(20), nullable=False),
)
audit = Table(
    "rn_audit",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("item_id", Integer, nullable=False),
    Column("v", Integer, nullable=False),
)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __table__ = items


class Owner(Base):
    __table__ = owners
    owned = relationship(Item, primaryjoin=owners.c.id == foreign(items.c.owner_id), viewonly=True)
    item_v: Mapped[int] = query_expression()


def item_value(item_id: int = 1) -> Select[Any]:
    return select(items.c.v).where(items.c.id == item_id)


class LockedView(Base):
    """Owners with a mapped SQL expression that reads (and locks) item 1."""

    __table__ = owners
    __mapper_args__: ClassVar[dict[str, Any]] = {"exclude_properties": ["name"]}
    item_v = column_property(with_row_locks(item_value()).scalar_subquery())


class PlainView(Base):
    """The control: the same expression, unlocked."""

    __table__ = owners
    __mapper_args__: ClassVar[dict[str, Any]] = {"exclude_properties": ["name"]}
    item_v = column_property(item_value().scalar_subquery())


LOCK_WAIT = 5.0


def item_row(item_id: int = 1) -> Select[Any]:
    return select(items.c.id, items.c.owner_id, items.c.v).where(items.c.id == item_id)


def nestings(locked: Select[Any]) -> dict[str, Executable]:
    """The locked SELECT nested every way SQLAlchemy allows: as a read, and inside writes."""
    sub = locked.subquery()
    return {
        "subquery": select(sub),
        "cte": select(locked.cte()),
        "scalar_subquery": select(select(sub.c.v).scalar_subquery()),
        "in": select(owners.c.id).where(owners.c.id.in_(select(sub.c.owner_id))),
        "exists": select(exists(locked)),
        "insert_from_select": insert(audit).from_select(
            ["item_id", "v"], select(sub.c.id, sub.c.v)
        ),
        "update_where_in": update(owners)
        .where(owners.c.id.in_(select(sub.c.owner_id)))
        .values(name="x"),
        "delete_where_exists": delete(audit).where(exists(locked)),
    }


NESTINGS = tuple(nestings(item_row()))
#: The nestings that write: on SQLite they take the write lock themselves, lock or not.
WRITES = ("insert_from_select", "update_where_in", "delete_where_exists")


@pytest.fixture
def db(cell: Cell) -> Cell:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(owners), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        conn.execute(
            insert(items), [{"id": 1, "owner_id": 1, "v": 0}, {"id": 2, "owner_id": 2, "v": 0}]
        )
    return cell


def bound_session_lock_waits(session: Session, seconds: float = LOCK_WAIT) -> None:
    support = support_for(session.get_bind().dialect.name)
    assert support is not None
    assert support.lock_timeout_sql is not None
    for sql in support.lock_timeout_sql(seconds):
        session.execute(text(sql))
    session.commit()


def bound_lock_waits(conn: Connection, seconds: float = LOCK_WAIT) -> None:
    support = support_for(conn.dialect.name)
    assert support is not None
    assert support.lock_timeout_sql is not None
    for sql in support.lock_timeout_sql(seconds):
        conn.exec_driver_sql(sql)
    conn.commit()


class Probe:
    """Asks from another connection, without waiting, whether row 1 of rn_items is locked
    exclusively (PostgreSQL / MariaDB: a shared-lock NOWAIT probe, which a plain read's or an
    INSERT ... SELECT's shared locks do not block) — or, on SQLite, whether the write lock of
    a database file is taken."""

    SHARE: ClassVar[dict[str, str]] = {
        "postgresql": "FOR SHARE NOWAIT",
        "mariadb": "LOCK IN SHARE MODE NOWAIT",
    }

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self.other: OtherConnection | None = None
        if cell.backend != "sqlite":
            self.other = OtherConnection(cell.admin_url, lock_timeout=LOCK_WAIT)
            self.other.start()

    def close(self) -> None:
        if self.other is not None:
            self.other.close()

    def locked(self, path: str | None = None) -> bool:
        if self.cell.backend == "sqlite":
            return sqlite_write_locked(path or str(self.cell.url.database))
        assert self.other is not None
        error: BaseException | None = None
        try:
            self.other.execute(
                f"SELECT id FROM rn_items WHERE id = 1 {self.SHARE[self.cell.backend]}"
            )
        except Exception as exc:
            error = exc
        finally:
            self.other.rollback()
        if error is None:
            return False
        assert classify(error) is LockErrorKind.LOCK_NOT_AVAILABLE, error
        return True


@pytest.fixture
def probe(db: Cell) -> Iterator[Probe]:
    found = Probe(db)
    try:
        yield found
    finally:
        found.close()


class SqlLog:
    """The SQL an engine sends, whitespace-normalised."""

    def __init__(self, engine: Engine | AsyncEngine) -> None:
        self.sent: list[str] = []
        sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        event.listen(sync, "after_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.sent.append(" ".join(statement.split()))


def run_nested(conn: Connection, stmt: Executable) -> Any:
    result = conn.execute(stmt)
    return [tuple(row) for row in result] if result.returns_rows else result.rowcount


# -- every nesting locks, on every cell ------------------------------------------------------


@pytest.mark.parametrize("nesting", NESTINGS)
def test_nested_locked_select_locks(db: Cell, probe: Probe, nesting: str) -> None:
    """Planned at execution (no bind given) and at call time (the connection given): while
    the outer statement's transaction is open, the row (SQLite: the database) is locked; the
    lock ends with the transaction; PostgreSQL and MariaDB receive the clause inside the
    outer statement. The control: the same statement without with_row_locks locks nothing
    (on SQLite, except a statement that writes, which takes the write lock itself)."""
    log = SqlLog(db.default_engine)
    control_locks = db.backend == "sqlite" and nesting in WRITES

    def work(conn: Connection) -> dict[str, bool]:
        bound_lock_waits(conn)
        seen = {}
        for name, locked in (
            ("at execution", with_row_locks(item_row())),
            ("at call", with_row_locks(item_row(), conn)),
            ("control", item_row()),
        ):
            with conn.begin():
                run_nested(conn, nestings(locked)[nesting])
                seen[name] = probe.locked()
            assert not probe.locked()
            if db.backend != "sqlite":
                assert ("FOR UPDATE" in log.sent[-1]) is (name != "control"), log.sent[-1]
        return seen

    assert db.run(work) == {"at execution": True, "at call": True, "control": control_locks}


def test_orm_query_subquery_locks(db: Cell, probe: Probe) -> None:
    """An ORM Query locked by with_row_locks, used through ``Query.subquery()`` in a 2.0
    select, and a locked ORM select nested in an ORM statement."""

    def work(session: Session) -> list[Any]:
        support = support_for(session.get_bind().dialect.name)
        assert support is not None
        assert support.lock_timeout_sql is not None
        for sql in support.lock_timeout_sql(LOCK_WAIT):
            session.execute(text(sql))
        session.commit()
        found = []
        query = with_row_locks(session.query(Item.id, Item.v).filter(Item.id == 1), session)
        found.append(session.execute(select(query.subquery())).all())
        found.append(probe.locked())
        session.rollback()
        locked = with_row_locks(select(Item.id).where(Item.id == 1))
        found.append(session.scalars(select(Item).where(Item.id.in_(locked))).all()[0].id)
        found.append(probe.locked())
        session.rollback()
        found.append(probe.locked())
        return found

    assert db.run_session(work) == [[(1, 0)], True, 1, True, False]


# -- locked SELECTs the ORM adds from options and mapped expressions ---------------------------


def orm_option_cases(locked: bool) -> dict[str, Executable]:
    """A SELECT of item 1 (locked by with_row_locks, or not) placed in an ORM statement by a
    loader option or a mapped SQL expression: the ORM adds it when it compiles the statement,
    so it is not in the statement the application executes, only in what is compiled."""

    def lock(stmt: Select[Any]) -> Select[Any]:
        return with_row_locks(stmt) if locked else stmt

    owner_of_item = lock(select(items.c.owner_id).where(items.c.id == 1))
    item_ids = lock(select(items.c.id).where(items.c.id == 1))
    return {
        "with_loader_criteria": select(Owner).options(
            with_loader_criteria(Owner, Owner.id.in_(owner_of_item))
        ),
        "relationship_and_criteria": select(Owner).options(
            joinedload(Owner.owned.and_(Item.id.in_(item_ids)))
        ),
        "with_expression": select(Owner).options(
            with_expression(Owner.item_v, lock(item_value()).scalar_subquery())
        ),
        "column_property": select(LockedView if locked else PlainView),
    }


ORM_OPTION_CASES = tuple(orm_option_cases(locked=False))


@pytest.mark.parametrize("case", ORM_OPTION_CASES)
def test_locked_select_added_by_an_orm_option_locks(db: Cell, probe: Probe, case: str) -> None:
    """with_loader_criteria, a relationship's .and_() criteria in joinedload, with_expression
    and column_property: while the transaction is open item 1 is locked (SQLite: the write
    lock is held), seen from another connection; PostgreSQL and MariaDB receive the clause.
    The same statements without with_row_locks lock nothing."""
    log = SqlLog(db.default_engine)

    def work(session: Session) -> dict[str, bool]:
        bound_session_lock_waits(session)
        seen = {}
        for locked in (True, False):
            session.execute(orm_option_cases(locked)[case]).unique().all()
            seen["locked" if locked else "control"] = probe.locked()
            if db.backend != "sqlite":
                assert ("FOR UPDATE" in log.sent[-1]) is locked, log.sent[-1]
            session.rollback()
            assert not probe.locked()
        return seen

    assert db.run_session(work) == {"locked": True, "control": False}


@pytest.mark.parametrize("server", [("mssql", (16, 0)), ("oracle", (19, 0))], ids=str)
@pytest.mark.parametrize("case", ORM_OPTION_CASES)
def test_locked_select_added_by_an_orm_option_is_refused_where_unrendered(
    case: str, server: tuple[str, tuple[int, ...]]
) -> None:
    """Where SQLAlchemy renders no lock there (SQL Server: none at all; Oracle: none for a
    nested SELECT), a locked SELECT added through an ORM option is refused before it runs;
    the same statement unlocked runs."""
    dialect = offline_dialect(*server)
    conn, context = hook_context(dialect, orm_option_cases(locked=True)[case])
    assert "FOR UPDATE" not in str(context.compiled)
    with pytest.raises(UnsupportedLockOption) as info:
        rowlocks._before_cursor_execute(conn, None, "x", {}, context, False)
    assert info.value.dialect == server[0]
    conn, context = hook_context(dialect, orm_option_cases(locked=False)[case])
    assert rowlocks._before_cursor_execute(conn, None, "x", {}, context, False) == ("x", {})


def test_a_locked_select_in_an_orm_statement_is_found_once() -> None:
    """Both the ORM statement and what the ORM compiles from it are scanned; the locked
    SELECT (or its annotated copies) is found once, as the statement itself when it is."""
    cases = {
        **orm_option_cases(locked=True),
        "top-level": with_row_locks(select(Owner)),
        "nested": select(Owner).where(Owner.id.in_(with_row_locks(select(items.c.owner_id)))),
    }
    for case, stmt in cases.items():
        compiled = stmt.compile(dialect=offline_dialect("sqlite"))
        found = rowlocks._scan_statement(compiled).found
        assert [f.top for f in found] == [case == "top-level"], case


# -- a locked SELECT that is the statement, wrapped: lambda_stmt(), ORM from_statement() ---------


def wrapped_top_level(**options: Any) -> dict[str, Callable[[Session], list[Any]]]:
    """Ways to execute a locked SELECT of item 1 that is the statement itself, wrapped: by
    lambda_stmt() (each lambda with its own literal options: a lambda is run once per code
    location) or by an ORM select(...).from_statement()."""
    if options == {}:
        wrapped = lambda_stmt(lambda: with_row_locks(item_row()))
    elif options == {"skip_locked": True}:
        wrapped = lambda_stmt(lambda: with_row_locks(item_row(), skip_locked=True))
    elif options == {"nowait": True}:
        wrapped = lambda_stmt(lambda: with_row_locks(item_row(), nowait=True))
    else:
        raise AssertionError(options)
    from_statement = select(Item).from_statement(
        with_row_locks(select(items).where(items.c.id == 1), **options)
    )
    return {
        "lambda_stmt": lambda session: [tuple(r) for r in session.execute(wrapped)],
        "from_statement": lambda session: [i.id for i in session.scalars(from_statement)],
    }


WRAPPINGS = tuple(wrapped_top_level())


@pytest.mark.parametrize("wrapping", WRAPPINGS)
def test_wrapped_top_level_locked_select_locks(db: Cell, probe: Probe, wrapping: str) -> None:
    """lambda_stmt(lambda: with_row_locks(...)) and select(Entity).from_statement(locked)
    lock like the locked SELECT itself: the row (SQLite: the database) is locked while the
    transaction is open, and the clause ends the statement on PostgreSQL and MariaDB."""
    log = SqlLog(db.default_engine)
    run = wrapped_top_level()[wrapping]

    def work(session: Session) -> list[Any]:
        bound_session_lock_waits(session)
        found = [run(session), probe.locked()]
        session.rollback()
        found.append(probe.locked())
        return found

    assert db.run_session(work) in ([[(1, 1, 0)], True, False], [[1], True, False])
    if db.backend != "sqlite":
        assert log.sent[-1].endswith("FOR UPDATE"), log.sent[-1]


@pytest.mark.cells("sqlite")
@pytest.mark.parametrize("wrapping", WRAPPINGS)
def test_sqlite_wrapped_top_level_skip_locked_returns_no_rows(db: Cell, wrapping: str) -> None:
    """A wrapped top-level skip_locked SELECT is top-level: while another connection holds
    the write lock it returns no rows (as the plain statement does) instead of failing; nowait
    fails at once with database_busy; once the holder is gone both return the row."""
    skip = wrapped_top_level(skip_locked=True)[wrapping]
    nowait = wrapped_top_level(nowait=True)[wrapping]

    def attempt(session: Session, run: Callable[[Session], list[Any]]) -> Any:
        try:
            return run(session)
        except Exception as exc:
            return exc
        finally:
            session.rollback()

    with db.other() as holder:
        holder.execute(with_row_locks(select(owners.c.id)))  # the write lock
        assert db.run_session(attempt, skip) == []
        error = db.run_session(attempt, nowait)
        assert isinstance(error, Exception), error
        assert classify(error) is LockErrorKind.DATABASE_BUSY, error
        holder.rollback()
    assert len(db.run_session(attempt, skip)) == 1
    assert len(db.run_session(attempt, nowait)) == 1


@pytest.mark.parametrize("wrapping", ["lambda_stmt", "from_statement"])
def test_wrapped_top_level_locked_select_is_not_refused_on_oracle(wrapping: str) -> None:
    """Oracle renders FOR UPDATE for a top-level SELECT, wrapped or not, and none for a
    nested one: the wrapped statement runs (its clause is there), nested it is refused."""
    oracle = offline_dialect("oracle", (19, 0))
    locked = item_row()
    stmt: Executable = (
        lambda_stmt(lambda: with_row_locks(item_row()))
        if wrapping == "lambda_stmt"
        else select(Item).from_statement(with_row_locks(select(items).where(items.c.id == 1)))
    )
    conn, context = hook_context(oracle, stmt)
    assert str(context.compiled).endswith("FOR UPDATE")
    assert rowlocks._before_cursor_execute(conn, None, "x", {}, context, False) == ("x", {})
    conn, context = hook_context(oracle, select(with_row_locks(locked).subquery()))
    with pytest.raises(UnsupportedLockOption, match="nested"):
        rowlocks._before_cursor_execute(conn, None, "x", {}, context, False)


# -- SQLite: the write lock, and the fail-fast options ----------------------------------------


@pytest.mark.cells("sqlite")
@pytest.mark.parametrize("nesting", ["subquery", "insert_from_select"])
@pytest.mark.parametrize("options", [{"nowait": True}, {"skip_locked": True}], ids=str)
def test_sqlite_nested_fail_fast_options(db: Cell, options: dict[str, Any], nesting: str) -> None:
    """While another connection holds the write lock, a nested nowait fails at once with
    database_busy; so does a nested skip_locked (SQLite can only "skip" every row by
    returning no rows from the whole statement, which a SELECT nested in another statement
    cannot do). Observed, not timed: the holder lets go after a few seconds, well within the
    busy timeout, so a statement that waited instead would succeed."""
    engine = db.engine(connect_args={"timeout": 60})
    stmt = nestings(with_row_locks(item_row(), **options))[nesting]

    def attempt(conn: Connection) -> BaseException | None:
        try:
            run_nested(conn, stmt)
        except Exception as exc:
            return exc
        finally:
            conn.rollback()
        return None

    with db.other() as holder:
        holder.execute(with_row_locks(select(owners.c.id)))  # the write lock
        release = threading.Timer(3.0, holder.rollback)
        release.start()
        try:
            error = db.run(attempt, engine=engine)
        finally:
            release.join(10)
    assert error is not None, "the nested lock waited for the holder instead of failing"
    assert classify(error) is LockErrorKind.DATABASE_BUSY, error
    assert db.run(attempt, engine=engine) is None  # free again: it runs


@pytest.mark.cells("sqlite")
def test_sqlite_nested_lock_prevents_lost_updates(db: Cell) -> None:
    """Threads (each with its own connection of the cell's driver) read the counter through
    a locked subquery, wait, and write read + 1. With the nested lock no update is lost; the
    same loop with an unlocked subquery loses updates (so the check can fail)."""

    def run(locked: bool) -> int:
        with db.sync_engine().begin() as conn:
            conn.execute(update(items).where(items.c.id == 1).values(v=0))
        engine = db.warm_up(db.engine(connect_args={"timeout": 20}))
        read = item_row()
        if locked:
            read = with_row_locks(read)
        stmt = select(read.subquery().c.v)
        threads, per_thread = 4, 5
        barrier = threading.Barrier(threads, timeout=30)
        errors: list[BaseException] = []

        def worker() -> None:
            def loop(conn: Connection) -> None:
                barrier.wait()
                for _ in range(per_thread):
                    with conn.begin():
                        value = conn.execute(stmt).scalar_one()
                        time.sleep(0.01 if locked else 0.03)
                        conn.execute(update(items).where(items.c.id == 1).values(v=value + 1))

            try:
                db.run(loop, engine=engine)
            except BaseException as exc:
                errors.append(exc)
                barrier.abort()

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(60)
        assert not any(thread.is_alive() for thread in pool)
        if errors:
            raise errors[0]
        with db.sync_engine().connect() as conn:
            return int(conn.execute(select(items.c.v).where(items.c.id == 1)).scalar_one())

    assert run(locked=True) == 4 * 5
    assert run(locked=False) < 4 * 5


@pytest.mark.cells("sqlite+pysqlite")
def test_sqlite_plain_for_update_never_shares_a_compiled_form_with_a_locked_one(
    db: Cell,
) -> None:
    """SQLAlchemy caches a compiled form per statement shape. The same shape nested with
    SQLAlchemy's own with_for_update() (which SQLite ignores) and with with_row_locks() must
    not share one: whichever runs first, the locksafe one locks."""
    engine = db.default_engine
    path = str(db.url.database)
    plain = select(item_row().with_for_update().subquery())
    locked = select(with_row_locks(item_row()).subquery())
    with engine.connect() as conn:
        for stmt, expected in ((plain, False), (locked, True), (plain, False), (locked, True)):
            with conn.begin():
                conn.execute(stmt).all()
                assert sqlite_write_locked(path) is expected


@pytest.mark.cells("sqlite+pysqlite")
def test_statements_are_scanned_once_per_compiled_form(
    db: Cell, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking for nested locks costs one scan per compiled statement (SQLAlchemy caches
    those), not one per execution: counted, for unlocked and locked statements."""
    scans: list[Any] = []
    original = rowlocks._scan_statement

    def counting(compiled: Any) -> Any:
        scans.append(compiled)
        return original(compiled)

    monkeypatch.setattr(rowlocks, "_scan_statement", counting)
    engine = db.sync_engine()
    with engine.connect() as conn:
        for item_id in range(5):  # statements rebuilt each time: the compiled cache serves
            with conn.begin():
                conn.execute(select(owners.c.name).where(owners.c.id == item_id)).all()
                conn.execute(select(with_row_locks(item_row(item_id)).subquery())).all()
    compiled = {id(c) for c in scans}
    assert len(scans) == len(compiled) == 2, scans


# -- attached databases, and FROMs locksafe cannot name ------------------------------------------


@pytest.mark.cells("sqlite")
def test_sqlite_locks_the_attached_database_the_select_reads(db: Cell, tmp_path: Path) -> None:
    """A locked SELECT on a table of an ATTACHed database (a Table with ``schema=`` or a
    lightweight ``table()``) takes the write lock of that database; with a textual FROM,
    which locksafe cannot read, every database is locked."""
    aux_path = str(tmp_path / "aux.sqlite")
    with contextlib.closing(sqlite3.connect(aux_path)) as setup:
        setup.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, v INT)")
        setup.execute("INSERT INTO jobs VALUES (1, 0)")
        setup.commit()
    engine = db.engine()
    sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    @event.listens_for(sync, "connect")
    def attach(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"ATTACH DATABASE '{aux_path}' AS aux")
        cursor.close()

    main_path = str(db.url.database)
    light = table("jobs", column("id"), column("v"), schema="aux")
    full = Table(
        "jobs",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("v", Integer),
        schema="aux",
    )
    cases: dict[str, tuple[Select[Any], bool, bool]] = {
        "table()": (select(light).where(light.c.id == 1), False, True),
        "Table": (select(full).where(full.c.id == 1), False, True),
        "nested table()": (select(select(light).subquery()), False, True),
        "join main + aux": (
            select(items.c.id, light.c.v).join_from(items, light, items.c.id == light.c.id),
            True,
            True,
        ),
        "text FROM": (select(literal_column("v")).select_from(text("aux.jobs")), True, True),
    }

    def work(conn: Connection) -> dict[str, tuple[bool, bool]]:
        seen = {}
        for name, (stmt, _, _) in cases.items():
            if name == "nested table()":
                stmt = select(with_row_locks(select(light)).subquery())
            else:
                stmt = with_row_locks(stmt)
            # Inside a transaction that has already written to the other database, so that
            # BEGIN IMMEDIATE (which takes every database at once) is not what locks.
            conn.execute(update(owners).where(owners.c.id == 2).values(name="b"))
            conn.execute(stmt).all()
            seen[name] = (sqlite_write_locked(main_path), sqlite_write_locked(aux_path))
            conn.rollback()
        return seen

    seen = db.run(work, engine=engine)
    # The update above holds main's write lock: what matters is the attached database.
    assert {name: aux for name, (_, aux) in seen.items()} == {
        name: aux for name, (_, _, aux) in cases.items()
    }


# -- where no lock can be rendered: refused before it runs ----------------------------------------


def hook_context(dialect: Any, stmt: Executable) -> tuple[Any, Any]:
    """What SQLAlchemy hands the before_cursor_execute hook for ``stmt`` on ``dialect`` (no
    server: SQL Server, MySQL 5.7 and old MariaDB versions are not started by the suite)."""
    compiled = stmt.compile(dialect=dialect)
    options = getattr(stmt, "_execution_options", {})
    context = SimpleNamespace(compiled=compiled, execution_options=options)
    return SimpleNamespace(dialect=dialect), context


@pytest.mark.parametrize("server", [("mssql", (16, 0)), ("oracle", (19, 0))], ids=str)
@pytest.mark.parametrize("nesting", NESTINGS)
def test_nested_lock_that_cannot_be_rendered_is_refused(
    nesting: str, server: tuple[str, tuple[int, ...]]
) -> None:
    """SQLAlchemy renders no lock on SQL Server, and none for a SELECT nested in another
    statement on Oracle: nested, the locked SELECT must not run unlocked either. The
    execution hook raises UnsupportedLockOption (planned at execution, or at call time for
    the SELECT on its own); the same statement without a lock runs."""
    dialect = offline_dialect(*server)
    candidates = [with_row_locks(item_row())]
    if server[0] == "oracle":  # SQL Server refuses at call time already
        candidates.append(with_row_locks(item_row(), dialect, skip_locked=True))
    for locked in candidates:
        conn, context = hook_context(dialect, nestings(locked)[nesting])
        with pytest.raises(UnsupportedLockOption) as info:
            rowlocks._before_cursor_execute(conn, None, "x", {}, context, False)
        assert info.value.dialect == server[0]
    conn, context = hook_context(dialect, nestings(item_row())[nesting])
    assert rowlocks._before_cursor_execute(conn, None, "x", {}, context, False) == ("x", {})


@pytest.mark.cells("postgresql+psycopg2", "mysql+pymysql")
def test_a_locked_union_is_refused_at_execution(db: Cell, probe: Probe) -> None:
    """SQLAlchemy renders no FOR UPDATE for a UNION: planned at execution on a server whose
    lock is a clause, refused before it runs (alone, or nested in a SELECT)."""
    union = with_row_locks(select(items.c.id).union_all(select(owners.c.id)))

    def work(conn: Connection) -> None:
        for stmt in (union, select(union.subquery())):
            with pytest.raises(UnsupportedLockOption, match="no lock for a UNION"):
                conn.execute(stmt)
            conn.rollback()

    db.run(work)


def test_nested_lock_planned_at_execution_that_would_render_differently_is_refused() -> None:
    """A nested SELECT's clause is compiled into the outer statement. Built without a bind
    and degraded at execution (skip_locked on MariaDB 10.3 becomes a waiting FOR UPDATE),
    what was rendered (SKIP LOCKED) is not what is planned: refused, with the remedy. With
    the bind, it is rendered as planned and runs."""
    old = offline_dialect("mariadb", (10, 3, 39))
    unbound = select(
        with_row_locks(item_row(), skip_locked=True, on_unsupported="degrade").subquery()
    )
    conn, context = hook_context(old, unbound)
    with pytest.raises(UnsupportedLockOption, match="pass the session or connection"):
        rowlocks._before_cursor_execute(conn, None, "x", {}, context, False)
    bound = select(
        with_row_locks(item_row(), old, skip_locked=True, on_unsupported="degrade").subquery()
    )
    conn, context = hook_context(old, bound)
    assert rowlocks._before_cursor_execute(conn, None, "x", {}, context, False) == ("x", {})
    assert "FOR UPDATE)" in str(context.compiled)
    assert "SKIP LOCKED" not in str(context.compiled)
    # Under "raise" the unsupported option raises, nested or not.
    raising = select(with_row_locks(item_row(), skip_locked=True).subquery())
    conn, context = hook_context(old, raising)
    with pytest.raises(UnsupportedLockOption) as info:
        rowlocks._before_cursor_execute(conn, None, "x", {}, context, False)
    assert info.value.options == ("skip_locked",)


def test_wrapped_lock_planned_at_execution_that_would_render_differently_is_refused() -> None:
    """A locked SELECT wrapped by lambda_stmt() is rendered when it is built, like a nested
    one: built without a bind and degraded at execution, it is refused with the remedy; with
    the bind, it is rendered as planned and runs."""
    old = offline_dialect("mariadb", (10, 3, 39))
    unbound = lambda_stmt(
        lambda: with_row_locks(item_row(), skip_locked=True, on_unsupported="degrade")
    )
    conn, context = hook_context(old, unbound)
    with pytest.raises(UnsupportedLockOption, match="lambda_stmt"):
        rowlocks._before_cursor_execute(conn, None, "x", {}, context, False)
    bound = lambda_stmt(  # the Dialect as a default argument: SQLAlchemy tracks closures only
        lambda bind=old: with_row_locks(
            item_row(), bind, skip_locked=True, on_unsupported="degrade"
        )
    )
    conn, context = hook_context(old, bound)
    assert rowlocks._before_cursor_execute(conn, None, "x", {}, context, False) == ("x", {})
    assert str(context.compiled).endswith("FOR UPDATE")


@pytest.mark.cells("mariadb")
def test_mariadb_nested_lock_planned_for_the_executing_server(db: Cell, probe: Probe) -> None:
    """A real MariaDB 10.11 whose dialect is made to report 10.3 (no SKIP LOCKED) after
    connecting: a nested skip_locked request built without a bind is refused at execution
    under "raise"; built with the connection and "degrade", it runs as a waiting FOR UPDATE
    and locks."""
    engine = db.engine()
    log = SqlLog(engine)
    db.run(lambda conn: None, engine=engine)
    dialect = engine.sync_engine.dialect if isinstance(engine, AsyncEngine) else engine.dialect
    dialect.server_version_info = (10, 3, 39)

    def work(conn: Connection) -> None:
        with pytest.raises(UnsupportedLockOption) as info:
            conn.execute(select(with_row_locks(item_row(), skip_locked=True).subquery()))
        assert info.value.options == ("skip_locked",)
        conn.rollback()
        locked = with_row_locks(item_row(), conn, skip_locked=True, on_unsupported="degrade")
        with conn.begin():
            assert conn.execute(select(locked.subquery())).all() == [(1, 1, 0)]
            assert probe.locked()
        assert log.sent[-1].endswith("FOR UPDATE) AS anon_1"), log.sent[-1]

    db.run(work, engine=engine)
