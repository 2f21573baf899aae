"""with_row_locks on real servers, through every driver cell.

Every clause locksafe renders is executed on PostgreSQL 15 and MariaDB 10.11 and must be
accepted; the locks it takes are checked from a second connection (``NOWAIT`` probes, or
SQLite's ``BEGIN IMMEDIATE`` with no busy timeout) while the locking transaction is open. SQLite,
which has no row locks, must take its database write lock before the SELECT runs.

Every wait is bounded: the probes never wait (NOWAIT / busy timeout 0), the sessions under test
wait at most a few seconds for a lock, and timings are asserted with wide margins.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    column,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import CacheStats
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Query, Session
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.selectable import Select

import locksafe
from harness.cells import Cell
from harness.options import option_combinations
from harness.probes import sqlite_write_locked
from locksafe import (
    LockErrorKind,
    UnsupportedLockOption,
    classify,
    lock_capabilities,
    plan_row_locks,
    with_row_locks,
)
from locksafe.dialects import support_for
from locksafe.testing import OtherConnection, hold_write_lock

metadata = MetaData()
owners = Table(
    "rl_owners",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(20), nullable=False),
)
items = Table(
    "rl_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("owner_id", Integer, nullable=False),
    Column("v", Integer, nullable=False),
)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __table__ = items


#: What a failed NOWAIT is, per backend.
NOWAIT_KIND = {
    "postgresql": LockErrorKind.LOCK_NOT_AVAILABLE,
    "mariadb": LockErrorKind.LOCK_NOT_AVAILABLE,
    "sqlite": LockErrorKind.DATABASE_BUSY,
}
#: Options MariaDB 10.11 cannot honour (the issue's capability table).
MARIADB_UNSUPPORTED = {"key_share", "of"}

#: How long the connections under test may wait for a lock: long enough that a lock that
#: waited instead of failing fast shows in the timings, short enough to bound every test.
LOCK_WAIT = 5.0


def joined() -> Select[Any]:
    return (
        select(items.c.id, items.c.v, owners.c.name)
        .join_from(items, owners, items.c.owner_id == owners.c.id)
        .where(items.c.id == 1)
    )


def one_item(item_id: int = 1) -> Select[Any]:
    return select(items.c.id, items.c.v).where(items.c.id == item_id)


@pytest.fixture
def db(cell: Cell) -> Cell:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(owners), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        conn.execute(
            insert(items),
            [
                {"id": 1, "owner_id": 1, "v": 0},
                {"id": 2, "owner_id": 2, "v": 0},
                {"id": 3, "owner_id": 1, "v": 0},
            ],
        )
    return cell


def bound_lock_waits(conn: Connection, seconds: float = LOCK_WAIT) -> None:
    """Make this connection's lock waits give up after ``seconds``."""
    support = support_for(conn.dialect.name)
    assert support is not None
    assert support.lock_timeout_sql is not None
    for sql in support.lock_timeout_sql(seconds):
        conn.exec_driver_sql(sql)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


# -- probes: is this row locked, seen from another connection? -------------------------------


class Prober:
    """Asks, from its own connection and without ever waiting, which locks are free.

    PostgreSQL / MariaDB: ``SELECT ... FOR <mode> NOWAIT`` on one row; SQLite: ``BEGIN
    IMMEDIATE`` with a zero busy timeout (the database write lock).
    """

    PG_MODES: ClassVar[dict[str, str]] = {
        "update": "FOR UPDATE NOWAIT",
        "no_key_update": "FOR NO KEY UPDATE NOWAIT",
        "share": "FOR SHARE NOWAIT",
        "key_share": "FOR KEY SHARE NOWAIT",
    }
    MARIADB_MODES: ClassVar[dict[str, str]] = {
        "update": "FOR UPDATE NOWAIT",
        "share": "LOCK IN SHARE MODE NOWAIT",
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

    def locked(self, table: str = "rl_items", row: int = 1, mode: str = "update") -> bool:
        """Whether ``mode`` cannot be had on the row now (the whole database on SQLite)."""
        if self.cell.backend == "sqlite":
            path = self.cell.url.database
            assert path
            return sqlite_write_locked(path)
        assert self.other is not None
        modes = self.PG_MODES if self.cell.backend == "postgresql" else self.MARIADB_MODES
        sql = f"SELECT id FROM {table} WHERE id = {row:d} {modes[mode]}"
        start = time.monotonic()
        error: BaseException | None = None
        try:
            self.other.execute(sql)
        except Exception as exc:
            error = exc
        finally:
            self.other.rollback()
        assert elapsed_since(start) < 2.0  # a probe never waits
        if error is None:
            return False
        assert classify(error) is LockErrorKind.LOCK_NOT_AVAILABLE, error
        return True


@pytest.fixture
def prober(db: Cell) -> Iterator[Prober]:
    found = Prober(db)
    try:
        yield found
    finally:
        found.close()


class SqlLog:
    """Records what an engine sends: (SQL, cache hit?) per statement."""

    def __init__(self, engine: Engine | AsyncEngine) -> None:
        self.engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        self.entries: list[tuple[str, Any]] = []
        event.listen(self.engine, "after_cursor_execute", self._record)

    def _record(
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any
    ) -> None:
        self.entries.append((statement, getattr(context, "cache_hit", None)))

    def statements(self) -> list[str]:
        return [" ".join(sql.split()) for sql, _ in self.entries]

    def last(self) -> str:
        return self.statements()[-1]


def test_lock_capabilities_from_every_kind_of_bind(db: Cell) -> None:
    """The capabilities come from dialect, server version and flavour, whatever bind is
    passed; the server is known once the engine has connected."""
    engine = db.engine()
    sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    before = lock_capabilities(engine)
    if db.backend == "mariadb":
        # Before its first connection a MySQL-family dialect cannot know it talks to MariaDB.
        assert before.server_version is None
    seen: list[Any] = []

    def with_connection(conn: Connection) -> None:
        seen.append(lock_capabilities(conn))
        seen.append(lock_capabilities(conn.engine))
        seen.append(lock_capabilities(conn.dialect))
        seen.append(lock_capabilities(Session(bind=conn)))
        seen.append(plan_row_locks(conn, nowait=True).capabilities)

    db.run(with_connection, engine=engine)
    if db.is_async:

        async def main() -> None:
            async with engine.connect() as aconn:
                seen.append(lock_capabilities(aconn))
            async with AsyncSession(engine) as session:
                seen.append(lock_capabilities(session))
            seen.append(lock_capabilities(engine))

        db.run_async(main)
    else:
        seen.append(lock_capabilities(engine))
    first = seen[0]
    assert all(caps == first for caps in seen), seen
    assert first.flavour == db.backend
    assert first.dialect == sync.dialect.name
    assert first.server_version is not None
    expected_major = {"postgresql": (15,), "mariadb": (10, 11), "sqlite": (3,)}[db.backend]
    assert first.server_version[: len(expected_major)] == expected_major
    assert first.mechanism == ("database" if db.backend == "sqlite" else "row")
    assert first.skip_locked
    assert first.nowait
    assert first.key_share is (db.backend != "mariadb")
    assert first.of is (db.backend != "mariadb")


# -- every clause, accepted by the real servers -------------------------------------------------


@pytest.mark.cells("postgresql", "mariadb")
def test_every_clause_is_accepted_by_the_server(db: Cell) -> None:
    """All 24 option combinations, as planned on the connected server (raise and degrade,
    with a bind and without one), are executed; the server accepts each, and the SQL sent
    ends with the clause plan_row_locks reports."""
    engine = db.default_engine
    log = SqlLog(engine)

    def work(conn: Connection) -> int:
        bound_lock_waits(conn)
        conn.commit()
        caps = lock_capabilities(conn)
        assert caps.flavour == db.backend
        assert caps.server_version is not None
        if db.backend == "postgresql":
            assert caps.server_version[0] == 15
        else:
            assert caps.server_version[:2] == (10, 11)
        executed = 0
        for options in option_combinations(items):
            for mode in ("raise", "degrade"):
                unsupported = (
                    set(options) & MARIADB_UNSUPPORTED if db.backend == "mariadb" else set()
                )
                if mode == "raise" and unsupported:
                    with pytest.raises(UnsupportedLockOption) as info:
                        with_row_locks(joined(), conn, **options)
                    assert set(info.value.options) == unsupported
                    assert info.value.dialect == "mariadb"
                    assert info.value.server_version == caps.server_version
                    with pytest.raises(UnsupportedLockOption):
                        conn.execute(with_row_locks(joined(), **options))
                    conn.rollback()
                    continue
                plan = plan_row_locks(conn, on_unsupported=mode, **options)  # type: ignore[arg-type]
                assert plan.clause.startswith(("FOR ", "LOCK IN SHARE MODE")), plan.clause
                for bind in (conn, None):
                    stmt = with_row_locks(joined(), bind, on_unsupported=mode, **options)  # type: ignore[arg-type]
                    with conn.begin():
                        rows = conn.execute(stmt).all()
                    assert [tuple(r) for r in rows] == [(1, 0, "a")], options
                    assert log.last().endswith(" " + plan.clause), (log.last(), plan.clause)
                    executed += 1
        return executed

    # PostgreSQL: 24 combinations x (raise, degrade) x (bind, no bind). MariaDB: the 18 with
    # key_share or of raise under "raise"; the other 6 run under both modes.
    assert db.run(work) == (96 if db.backend == "postgresql" else 96 - 18 * 2)


# -- lock strength: what each lock blocks, and degraded locks never block less ------------------

#: PostgreSQL's row-lock conflict table (manual, "Row-Level Locks"): lock held -> probes blocked.
PG_BLOCKS = {
    (False, False): {"update", "no_key_update", "share", "key_share"},  # FOR UPDATE
    (False, True): {"update", "no_key_update", "share"},  # FOR NO KEY UPDATE
    (True, False): {"update", "no_key_update"},  # FOR SHARE
    (True, True): {"update"},  # FOR KEY SHARE
}
#: InnoDB: X blocks X and S; S blocks X. key_share is degraded to the stronger lock.
MARIADB_BLOCKS = {
    (False, False): {"update", "share"},
    (False, True): {"update", "share"},
    (True, False): {"update"},
    (True, True): {"update"},
}


@pytest.mark.cells("postgresql", "mariadb")
def test_lock_strength_and_degraded_locks_block_at_least_as_much(db: Cell, prober: Prober) -> None:
    blocks = PG_BLOCKS if db.backend == "postgresql" else MARIADB_BLOCKS
    modes = Prober.PG_MODES if db.backend == "postgresql" else Prober.MARIADB_MODES

    def work(conn: Connection) -> None:
        bound_lock_waits(conn)
        conn.commit()
        for (read, key_share), expected in blocks.items():
            stmt = with_row_locks(
                one_item(), conn, read=read, key_share=key_share, on_unsupported="degrade"
            )
            with conn.begin():
                assert conn.execute(stmt).all() == [(1, 0)]
                blocked = {mode for mode in modes if prober.locked(row=1, mode=mode)}
                assert blocked == expected, (read, key_share)
                assert not prober.locked(row=2)  # only the selected row
            assert not any(prober.locked(row=1, mode=mode) for mode in modes)

    db.run(work)


@pytest.mark.cells("postgresql", "mariadb", "sqlite")
def test_of_locks_only_the_named_table(db: Cell, prober: Prober) -> None:
    """PostgreSQL: ``of=items`` leaves the joined owner row lockable (NOWAIT from another
    connection succeeds), while without ``of`` both are locked. MariaDB has no OF: raise, or
    degrade to locking both. SQLite: the whole database."""

    def work(conn: Connection) -> None:
        bound_lock_waits(conn)
        conn.commit()
        for of in (items, [items], items.c.v, None):
            if db.backend == "mariadb" and of is not None:
                with pytest.raises(UnsupportedLockOption) as info:
                    with_row_locks(joined(), conn, of=of, nowait=True)
                assert info.value.options == ("of",)
                stmt = with_row_locks(joined(), conn, of=of, nowait=True, on_unsupported="degrade")
            else:
                stmt = with_row_locks(joined(), conn, of=of, nowait=True)
            with conn.begin():
                assert [tuple(r) for r in conn.execute(stmt)] == [(1, 0, "a")]
                assert prober.locked("rl_items", 1)
                owner_locked = prober.locked("rl_owners", 1)
            if db.backend == "postgresql" and of is not None:
                assert not owner_locked, of
            else:
                assert owner_locked, of

    db.run(work)


# -- NOWAIT ---------------------------------------------------------------------------------------


def test_nowait_fails_fast_with_a_classified_error(db: Cell) -> None:
    """Another connection (same driver) holds the lock; NOWAIT fails well before the 5 s this
    connection would wait for a lock, with an error classify() names, and succeeds once the
    holder is gone."""
    expected = NOWAIT_KIND[db.backend]
    with db.other() as holder:
        holder.execute(with_row_locks(one_item()))

        def attempt(conn: Connection) -> tuple[float, BaseException | None]:
            bound_lock_waits(conn)
            conn.commit()
            start = time.monotonic()
            try:
                with conn.begin():
                    conn.execute(with_row_locks(one_item(), conn, nowait=True)).all()
            except Exception as exc:
                return elapsed_since(start), exc
            return elapsed_since(start), None

        took, error = db.run(attempt)
        assert error is not None, "NOWAIT got a lock another connection holds"
        assert classify(error) is expected, error
        assert locksafe.is_lock_not_available_error(error)
        assert took < 1.5, f"NOWAIT waited {took:.2f}s"
        # Without a bind: planned by the executing connection, same outcome.
        took, error = db.run(
            lambda conn: attempt_unbound(conn, with_row_locks(one_item(), nowait=True))
        )
        assert classify(error) is expected, error
        assert took < 1.5
        holder.rollback()
    took, error = db.run(attempt)
    assert error is None


def attempt_unbound(conn: Connection, stmt: Any) -> tuple[float, BaseException | None]:
    bound_lock_waits(conn)
    conn.commit()
    start = time.monotonic()
    try:
        with conn.begin():
            conn.execute(stmt).all()
    except Exception as exc:
        return elapsed_since(start), exc
    return elapsed_since(start), None


# -- the kinds of query and of bind ----------------------------------------------------------------


def test_orm_query_core_and_orm_select(db: Cell, prober: Prober) -> None:
    """Legacy Query -> Query, 2.0 ORM select -> Select, Core select -> Select; each executed
    through the cell's driver (an AsyncSession's sync session on async cells) locks the row."""

    def with_session(session: Session) -> list[str]:
        seen: list[str] = []
        query = session.query(Item).filter(Item.id == 1)
        locked_query = with_row_locks(query, session, nowait=True)
        assert type(locked_query) is Query
        assert [item.id for item in locked_query.all()] == [1]
        assert prober.locked()
        seen.append("query")
        session.rollback()
        assert not prober.locked()

        orm = with_row_locks(select(Item).where(Item.id == 1), session, skip_locked=True)
        assert type(orm) is Select
        assert [item.id for item in session.scalars(orm)] == [1]
        assert prober.locked()
        seen.append("orm select")
        session.rollback()

        core = with_row_locks(one_item(), session)
        assert type(core) is Select
        assert [tuple(r) for r in session.execute(core)] == [(1, 0)]
        assert prober.locked()
        seen.append("core select (session)")
        session.rollback()

        # Without a bind the Query is planned when it runs.
        unbound = with_row_locks(session.query(Item).filter(Item.id == 1), nowait=True)
        assert type(unbound) is Query
        assert [item.id for item in unbound.all()] == [1]
        assert prober.locked()
        seen.append("query (no bind)")
        session.rollback()
        return seen

    assert db.run_session(with_session) == [
        "query",
        "orm select",
        "core select (session)",
        "query (no bind)",
    ]
    assert not prober.locked()

    def with_connection(conn: Connection) -> None:
        core = with_row_locks(one_item(), conn, read=True)
        assert type(core) is Select
        with conn.begin():
            assert conn.execute(core).all() == [(1, 0)]
            assert prober.locked()
        assert not prober.locked()

    db.run(with_connection)


@pytest.mark.cells("async")
def test_async_session_connection_and_engine(db: Cell, prober: Prober) -> None:
    engine: AsyncEngine = db.engine()

    async def main() -> None:
        async with AsyncSession(engine) as session:
            stmt = with_row_locks(select(Item).where(Item.id == 1), session, nowait=True)
            assert type(stmt) is Select
            assert [item.id for item in (await session.scalars(stmt)).all()] == [1]
            assert prober.locked()
            await session.rollback()
            assert not prober.locked()
            # The same statement without a bind.
            unbound = with_row_locks(select(Item).where(Item.id == 1), skip_locked=True)
            assert [item.id for item in (await session.scalars(unbound)).all()] == [1]
            assert prober.locked()
            await session.rollback()
        async with engine.connect() as aconn:
            for bind in (aconn, engine):
                stmt = with_row_locks(one_item(), bind, nowait=True)
                assert type(stmt) is Select
                async with aconn.begin():
                    assert (await aconn.execute(stmt)).all() == [(1, 0)]
                    assert prober.locked()
                assert not prober.locked()
            plan = plan_row_locks(aconn, nowait=True)
            assert plan.capabilities == lock_capabilities(engine)
            assert plan.capabilities.flavour == db.backend

    db.run_async(main)


@pytest.mark.cells("mariadb")
def test_unsupported_options_raise_at_call_time_with_a_bind(db: Cell) -> None:
    """With a bind whose server is known, MariaDB's missing OF / key_share raise at the call,
    before anything runs: Session, Connection, Engine (after it connected), and the async
    ones on async cells."""
    engine = db.engine()

    def check(bind: Any) -> None:
        for options in ({"of": items}, {"key_share": True}):
            with pytest.raises(UnsupportedLockOption) as info:
                with_row_locks(joined(), bind, **options)
            assert info.value.dialect == "mariadb"
            assert info.value.server_version is not None
            assert info.value.server_version[:2] == (10, 11)
            assert "mariadb 10.11" in str(info.value)
        # What MariaDB 10.11 supports does not raise.
        with_row_locks(joined(), bind, skip_locked=True, read=True)

    def sync_checks(conn: Connection) -> None:
        check(conn)
        check(conn.engine)
        check(Session(bind=conn))

    if db.is_async:

        async def main() -> None:
            async with engine.connect() as aconn:
                await aconn.run_sync(sync_checks)
                check(aconn)
                check(engine)  # connected once now
                async with AsyncSession(engine) as session:
                    check(session)

        db.run_async(main)
    else:
        db.run(sync_checks, engine=engine)


@pytest.mark.cells("mariadb")
def test_unsupported_options_raise_at_execution_without_a_bind(db: Cell) -> None:
    stmt = with_row_locks(joined(), of=items, nowait=True)

    def work(conn: Connection) -> None:
        with pytest.raises(UnsupportedLockOption) as info:
            conn.execute(stmt)
        assert info.value.options == ("of",)
        assert info.value.server_version is not None
        assert info.value.server_version[:2] == (10, 11)
        conn.rollback()

    db.run(work)


@pytest.mark.cells("mariadb")
def test_statement_is_planned_for_the_server_version_that_executes_it(
    db: Cell, prober: Prober
) -> None:
    """A statement built without a bind is planned for the executing server's version. The
    engine's dialect is made to report MariaDB 10.3 (no SKIP LOCKED) after connecting: the
    real 10.11 server then receives what locksafe plans for 10.3 — an error under "raise", a
    plain waiting FOR UPDATE under "degrade" (SQLAlchemy alone would send SKIP LOCKED)."""
    engine = db.engine()
    log = SqlLog(engine)
    db.run(lambda conn: None, engine=engine)  # connect once: the dialect learns the server
    dialect = engine.sync_engine.dialect if isinstance(engine, AsyncEngine) else engine.dialect
    assert dialect.is_mariadb
    dialect.server_version_info = (10, 3, 39)
    raising = with_row_locks(one_item(), skip_locked=True)
    degrading = with_row_locks(one_item(), skip_locked=True, on_unsupported="degrade")

    def work(conn: Connection) -> None:
        with pytest.raises(UnsupportedLockOption) as info:
            conn.execute(raising)
        assert info.value.options == ("skip_locked",)
        assert info.value.server_version == (10, 3, 39)
        conn.rollback()
        with conn.begin():
            assert conn.execute(degrading).all() == [(1, 0)]
            assert prober.locked()
        assert log.last().endswith(" FOR UPDATE"), log.last()

    db.run(work, engine=engine)


# -- session=None: planned by the executing connection -------------------------------------------

#: One statement object, built once without a bind, executed on every cell.
SHARED_STATEMENT = with_row_locks(select(items.c.id, items.c.v).where(items.c.id == 1), nowait=True)


def test_statement_without_bind_is_planned_by_the_executing_connection(
    db: Cell, prober: Prober
) -> None:
    log = SqlLog(db.default_engine)

    def work(conn: Connection) -> None:
        with conn.begin():
            assert conn.execute(SHARED_STATEMENT).all() == [(1, 0)]
            assert prober.locked()
        sent = log.last()
        if db.backend == "sqlite":
            assert "FOR UPDATE" not in sent  # SQLite renders no clause: the write lock did it
        else:
            assert sent.endswith(" FOR UPDATE NOWAIT"), sent

    db.run(work)


@pytest.mark.cells("postgresql+psycopg2")
def test_same_statement_object_on_postgresql_and_sqlite(db: Cell, tmp_path: Path) -> None:
    """The very same statement object renders FOR UPDATE NOWAIT on PostgreSQL and takes the
    write lock on SQLite (a second SQLite connection cannot get it)."""
    stmt = with_row_locks(select(items.c.id, items.c.v).where(items.c.id == 1), nowait=True)
    pg_log = SqlLog(db.default_engine)

    def on_postgresql(conn: Connection) -> None:
        with conn.begin():
            assert conn.execute(stmt).all() == [(1, 0)]

    db.run(on_postgresql)
    assert pg_log.last().endswith(" FOR UPDATE NOWAIT")

    path = tmp_path / "other.sqlite"
    sqlite_engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    try:
        metadata.create_all(sqlite_engine)
        with sqlite_engine.begin() as conn:
            conn.execute(insert(items), [{"id": 1, "owner_id": 1, "v": 0}])
        sqlite_log = SqlLog(sqlite_engine)
        with sqlite_engine.connect() as conn, conn.begin():
            assert conn.execute(stmt).all() == [(1, 0)]
            assert "FOR UPDATE" not in sqlite_log.last()
            probe = sqlite3.connect(path, timeout=0)
            try:
                with pytest.raises(sqlite3.OperationalError) as info:
                    probe.execute("BEGIN IMMEDIATE")
                assert classify(info.value) is LockErrorKind.DATABASE_BUSY
            finally:
                probe.close()
        # And again on PostgreSQL: the plans are kept per server.
        db.run(on_postgresql)
        assert pg_log.last().endswith(" FOR UPDATE NOWAIT")
    finally:
        sqlite_engine.dispose()


# -- the compiled-statement cache ----------------------------------------------------------------


def test_compiled_cache_is_hit(db: Cell, prober: Prober) -> None:
    """Executing with_row_locks statements twice with different parameters hits SQLAlchemy's
    compiled cache: the same statement object, a statement rebuilt on each call (with and
    without a bind), and through an ORM Session."""
    log = SqlLog(db.default_engine)

    def rebuilt(item_id: int, bind: Any) -> Any:
        return with_row_locks(select(items.c.id, items.c.v).where(items.c.id == item_id), bind)

    def work(conn: Connection) -> None:
        same = with_row_locks(
            select(items.c.id).where(items.c.id == bindparam("x")), skip_locked=True
        )
        hits = []
        for item_id in (1, 2):
            with conn.begin():
                result = conn.execute(same, {"x": item_id})
                assert result.all() == [(item_id,)]
                assert prober.locked(row=item_id)
                hits.append(result.context.cache_hit)
        assert hits[1] is CacheStats.CACHE_HIT, hits
        for bind in (conn, None):
            hits = []
            for item_id in (1, 2, 3):
                with conn.begin():
                    result = conn.execute(rebuilt(item_id, bind))
                    assert result.all() == [(item_id, 0)]
                    assert prober.locked(row=item_id)
                    hits.append(result.context.cache_hit)
            assert hits[1:] == [CacheStats.CACHE_HIT, CacheStats.CACHE_HIT], (bind, hits)

    db.run(work)

    def orm(session: Session) -> None:
        for item_id in (1, 2):
            stmt = with_row_locks(select(Item).where(Item.id == item_id), session, nowait=True)
            assert [item.id for item in session.scalars(stmt)] == [item_id]
            assert prober.locked(row=item_id)
            session.rollback()

    before = len(log.entries)
    db.run_session(orm)
    orm_hits = [hit for _, hit in log.entries[before:]]
    assert orm_hits[-1] is CacheStats.CACHE_HIT, orm_hits


# -- SQLite: the database write lock ---------------------------------------------------------------

JOURNALS = ("wal", "delete")


@pytest.fixture(params=JOURNALS)
def journal(request: pytest.FixtureRequest, db: Cell) -> str:
    mode: str = request.param
    path = db.url.database
    assert path
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        (got,) = conn.execute(f"PRAGMA journal_mode = {mode}").fetchone()
        assert got == mode
    finally:
        conn.close()
    return mode


@pytest.fixture(params=["driver", "explicit-begin"])
def transactions(request: pytest.FixtureRequest) -> str:
    """SQLite transaction handling: the driver's own (SQLAlchemy's default), or SQLAlchemy's
    explicit-BEGIN recipe (as locksafe.sqlite.configure() sets up)."""
    return str(request.param)


def sqlite_engine(cell: Cell, *, timeout: float = LOCK_WAIT, explicit_begin: bool = False) -> Any:
    """An engine of the cell's SQLite driver with this busy timeout. ``explicit_begin``:
    SQLAlchemy's documented recipe (driver transaction handling off, SQLAlchemy emits BEGIN),
    so reads run inside the transaction and keep their snapshot."""
    engine = cell.engine(connect_args={"timeout": timeout})
    if explicit_begin:
        sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

        @event.listens_for(sync, "connect")
        def driver_transactions_off(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(sync, "begin")
        def emit_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN")

    return engine


def write_from_another_connection(cell: Cell, value: int) -> None:
    path = cell.url.database
    assert path
    other = sqlite3.connect(path, timeout=LOCK_WAIT, isolation_level=None)
    try:
        other.execute("UPDATE rl_items SET v = ? WHERE id = 1", (value,))
    finally:
        other.close()


def busy_timeout_ms(conn: Connection) -> int:
    return int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one())


def run_locking(
    conn: Connection, stmt: Any
) -> tuple[float, list[tuple[Any, ...]] | None, BaseException | None]:
    """Execute ``stmt``; (seconds it took, rows or None, error or None). Leaves the
    transaction open when it succeeded."""
    start = time.monotonic()
    try:
        rows = [tuple(r) for r in conn.execute(stmt)]
    except Exception as exc:
        conn.rollback()
        return elapsed_since(start), None, exc
    return elapsed_since(start), rows, None


@pytest.mark.cells("sqlite")
def test_sqlite_waits_for_the_busy_timeout_then_database_busy(
    db: Cell, journal: str, prober: Prober, transactions: str
) -> None:
    engine = sqlite_engine(db, timeout=0.4, explicit_begin=transactions == "explicit-begin")
    with hold_write_lock(db.url):
        took, rows, error = db.run(
            lambda conn: run_locking(conn, with_row_locks(one_item())), engine=engine
        )
    assert error is not None
    assert rows is None
    assert classify(error) is LockErrorKind.DATABASE_BUSY, error
    assert 0.3 <= took < 3.0, took  # it waited for the busy timeout, then gave up
    assert not prober.locked()


@pytest.mark.cells("sqlite")
def test_sqlite_waits_and_gets_the_lock_when_it_is_released(
    db: Cell, journal: str, prober: Prober, transactions: str
) -> None:
    """The second transaction waits (busy timeout), then locks and reads the first one's
    committed write: no lost update."""
    engine = sqlite_engine(db, explicit_begin=transactions == "explicit-begin")
    with db.other() as holder:
        holder.execute(with_row_locks(one_item()))
        holder.execute(update(items).where(items.c.id == 1).values(v=41))

        def release_later(conn: Connection) -> None:
            time.sleep(0.3)
            conn.commit()

        released = holder.submit(release_later)

        def work(conn: Connection) -> tuple[float, Any, Any]:
            took, rows, error = run_locking(conn, with_row_locks(one_item()))
            if error is None:
                assert prober.locked()
                conn.execute(update(items).where(items.c.id == 1).values(v=rows[0][1] + 1))
                conn.commit()
            return took, rows, error

        took, rows, error = db.run(work, engine=engine)
        released.result(timeout=10)
    assert error is None, error
    assert rows == [(1, 41)]
    assert 0.2 <= took < 3.0, took
    with db.sync_engine().connect() as conn:
        assert conn.execute(select(items.c.v).where(items.c.id == 1)).scalar_one() == 42


@pytest.mark.cells("sqlite")
def test_sqlite_nowait_fails_at_once(db: Cell, journal: str, transactions: str) -> None:
    engine = sqlite_engine(db, timeout=LOCK_WAIT, explicit_begin=transactions == "explicit-begin")
    with hold_write_lock(db.url):

        def work(conn: Connection) -> tuple[float, Any, Any, int]:
            took, rows, error = run_locking(conn, with_row_locks(one_item(), nowait=True))
            return took, rows, error, busy_timeout_ms(conn)

        took, rows, error, timeout_after = db.run(work, engine=engine)
    assert error is not None
    assert rows is None
    assert classify(error) is LockErrorKind.DATABASE_BUSY, error
    assert took < 1.0, took  # not the 5 s busy timeout
    assert timeout_after == int(LOCK_WAIT * 1000)  # the connection's busy timeout is restored


@pytest.mark.cells("sqlite")
def test_sqlite_skip_locked_returns_no_rows_while_locked(
    db: Cell, journal: str, prober: Prober, transactions: str
) -> None:
    engine = sqlite_engine(db, timeout=LOCK_WAIT, explicit_begin=transactions == "explicit-begin")
    stmt = with_row_locks(select(items.c.id).order_by(items.c.id), skip_locked=True)

    def attempt(conn: Connection) -> tuple[float, Any, Any, int, bool]:
        took, rows, error = run_locking(conn, stmt)
        locked = prober.locked() if error is None else False
        conn.rollback()
        return took, rows, error, busy_timeout_ms(conn), locked

    with hold_write_lock(db.url):
        took, rows, error, timeout_after, _ = db.run(attempt, engine=engine)
    assert error is None, error
    assert rows == []
    assert took < 1.0, took
    assert timeout_after == int(LOCK_WAIT * 1000)

    took, rows, error, _, locked = db.run(attempt, engine=engine)
    assert error is None
    assert rows == [(1,), (2,), (3,)]
    assert locked  # the rows came with the write lock

    # ORM entities, a legacy Query and a join with clashing column names come back empty too.
    def orm(session: Session) -> list[Any]:
        found: list[Any] = [
            session.scalars(with_row_locks(select(Item), skip_locked=True)).all(),
            with_row_locks(session.query(Item), session, skip_locked=True).all(),
            session.execute(
                with_row_locks(
                    select(items, owners).join_from(items, owners, items.c.owner_id == owners.c.id),
                    skip_locked=True,
                )
            ).all(),
        ]
        session.rollback()
        return found

    with hold_write_lock(db.url):
        assert db.run_session(orm, engine=engine) == [[], [], []]
    found = db.run_session(orm, engine=engine)
    assert [len(rows) for rows in found] == [3, 3, 3]


@pytest.mark.cells("sqlite")
@pytest.mark.parametrize("options", [{}, {"nowait": True}], ids=str)
def test_sqlite_busy_snapshot_raises_at_once(
    db: Cell, prober: Prober, options: dict[str, Any]
) -> None:
    """WAL, SQLAlchemy's explicit-BEGIN recipe: a transaction read a snapshot, another
    connection has since committed a write; the write lock can never be had in that
    transaction (SQLITE_BUSY_SNAPSHOT): raise at once, never continue without the lock.
    (skip_locked skips instead: the next test.)"""
    path = db.url.database
    assert path
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as setup:
        setup.execute("PRAGMA journal_mode = wal")
    engine = sqlite_engine(db, explicit_begin=True)

    def work(conn: Connection) -> tuple[float, Any, Any]:
        assert conn.execute(select(items.c.v).where(items.c.id == 1)).scalar_one() == 0
        write_from_another_connection(db, 7)
        return run_locking(conn, with_row_locks(one_item(), **options))

    took, rows, error = db.run(work, engine=engine)
    assert error is not None, rows
    assert rows is None
    assert classify(error) is LockErrorKind.DATABASE_BUSY, error
    code = getattr(getattr(error, "orig", None), "sqlite_errorcode", None)
    if code is not None:
        assert code == 517  # SQLITE_BUSY_SNAPSHOT
    assert took < 1.0, took
    assert not prober.locked()


@pytest.mark.cells("sqlite")
def test_sqlite_busy_snapshot_under_skip_locked_gives_no_rows(db: Cell, prober: Prober) -> None:
    """The same stale snapshot under skip_locked: the rows changed since this transaction's
    snapshot belong, for it, to the transaction that changed them — skipped, like rows another
    transaction holds. SKIP LOCKED never fails because of a lock (PostgreSQL's behaviour; an
    Airflow scheduler exited on this error), it never continues with the lock either: no rows,
    at once, no lock held."""
    path = db.url.database
    assert path
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as setup:
        setup.execute("PRAGMA journal_mode = wal")
    engine = sqlite_engine(db, explicit_begin=True)

    def work(conn: Connection) -> tuple[float, Any, Any]:
        assert conn.execute(select(items.c.v).where(items.c.id == 1)).scalar_one() == 0
        write_from_another_connection(db, 7)
        return run_locking(conn, with_row_locks(one_item(), skip_locked=True))

    took, rows, error = db.run(work, engine=engine)
    assert error is None, error
    assert rows == []
    assert took < 1.0, took
    assert not prober.locked()


@pytest.mark.cells("sqlite")
def test_sqlite_read_transaction_cannot_wait_for_the_write_lock(
    db: Cell, journal: str, prober: Prober
) -> None:
    """Explicit-BEGIN recipe: a transaction that already read holds a read lock / snapshot;
    while another connection holds the write lock, waiting could only deadlock (rollback
    journal) or end in a stale snapshot (WAL), so SQLite refuses at once: database_busy."""
    engine = sqlite_engine(db, explicit_begin=True)
    with hold_write_lock(db.url):

        def work(conn: Connection) -> tuple[float, Any, Any]:
            assert conn.execute(select(items.c.v).where(items.c.id == 1)).scalar_one() == 0
            return run_locking(conn, with_row_locks(one_item()))

        took, rows, error = db.run(work, engine=engine)
    assert error is not None
    assert rows is None
    assert classify(error) is LockErrorKind.DATABASE_BUSY, error
    assert took < 1.0, took


@pytest.mark.cells("sqlite")
@pytest.mark.parametrize(
    "explicit_begin", [False, True], ids=["pysqlite-default", "explicit-begin"]
)
def test_sqlite_lock_after_reading_in_the_same_transaction(
    db: Cell, journal: str, prober: Prober, explicit_begin: bool
) -> None:
    """A transaction that has already read (and, second round, already written) still gets
    the write lock from with_row_locks, and the value it locks is the current one."""
    engine = sqlite_engine(db, explicit_begin=explicit_begin)

    def work(conn: Connection) -> list[Any]:
        seen = []
        assert conn.execute(select(items.c.v).where(items.c.id == 2)).scalar_one() == 0
        if not explicit_begin:
            # The driver ran that read outside any transaction: a write committed meanwhile
            # is what the locking read sees.
            write_from_another_connection(db, 5)
        _, rows, error = run_locking(conn, with_row_locks(one_item()))
        assert error is None, error
        seen.append(rows)
        assert prober.locked()
        conn.execute(update(items).where(items.c.id == 1).values(v=rows[0][1] + 1))
        conn.commit()
        assert not prober.locked()
        # A transaction that wrote first, then locks: already holds the lock, still works.
        conn.execute(update(items).where(items.c.id == 3).values(v=1))
        _, rows, error = run_locking(conn, with_row_locks(one_item(), nowait=True))
        assert error is None, error
        seen.append(rows)
        assert prober.locked()
        conn.commit()
        return seen

    seen = db.run(work, engine=engine)
    first = 5 if not explicit_begin else 0
    assert seen == [[(1, first)], [(1, first + 1)]]


@pytest.mark.cells("sqlite")
def test_sqlite_lock_for_a_select_without_known_tables(db: Cell, prober: Prober) -> None:
    """A SELECT whose FROM is text names no Table locksafe can see; the write lock is still
    taken, also inside a transaction that has already written."""
    stmt = with_row_locks(
        select(column("v")).select_from(text("rl_items")).where(text("id = 1")), nowait=True
    )

    def work(conn: Connection) -> list[Any]:
        results = []
        with conn.begin():
            results.append(conn.execute(stmt).all())
            assert prober.locked()
        with conn.begin():
            conn.execute(update(items).where(items.c.id == 3).values(v=1))
            results.append(conn.execute(stmt).all())
            assert prober.locked()
        return results

    assert db.run(work) == [[(0,)], [(0,)]]
    assert not prober.locked()


@pytest.mark.cells("sqlite")
def test_sqlite_lock_covers_the_main_database_when_a_temp_table_comes_first(
    db: Cell, prober: Prober
) -> None:
    """A TEMP table lives in its own database file: a no-op write on it would lock only that
    one. The write lock must cover the main database the joined table lives in."""
    scratch = Table(
        "rl_scratch",
        MetaData(),
        Column("id", Integer, primary_key=True),
        prefixes=["TEMPORARY"],
    )

    def work(conn: Connection) -> None:
        scratch.create(conn)
        conn.execute(insert(scratch), [{"id": 1}])
        conn.commit()
        # The temp table is the first table SQLAlchemy finds in this statement.
        stmt = with_row_locks(select(scratch.c.id, items.c.v).where(items.c.id == scratch.c.id))
        with conn.begin():  # BEGIN (explicit-BEGIN recipe): a transaction, no lock yet
            assert conn.execute(stmt).all() == [(1, 0)]
            assert prober.locked()
        assert not prober.locked()

    db.run(work, engine=sqlite_engine(db, explicit_begin=True))


def test_sqlite_busy_is_recognised_without_error_codes() -> None:
    """Python 3.10's sqlite3 exceptions carry no error code: a busy database under
    skip_locked is recognised by SQLite's fixed message (exceptions built by hand carry no
    code on any Python)."""
    from locksafe.dialects import sqlite as sqlite_support

    busy = sqlite3.OperationalError("database is locked")
    assert getattr(busy, "sqlite_errorcode", None) is None
    assert sqlite_support._primary_code(busy) == sqlite_support.SQLITE_BUSY
    assert sqlite_support._primary_code(sqlite3.OperationalError("no such table: x")) is None
    assert sqlite_support._primary_code(sqlite3.IntegrityError("database is locked")) is None


@pytest.mark.cells("sqlite")
def test_sqlite_write_lock_blocks_a_concurrent_locker_until_commit(db: Cell, journal: str) -> None:
    """Two connections of the cell's driver: while the first holds with_row_locks, the
    second's locking read waits and then sees the first's committed value."""
    engine = sqlite_engine(db)
    first_locked = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        def work(conn: Connection) -> None:
            v = conn.execute(with_row_locks(one_item())).all()[0][1]
            first_locked.set()
            assert release.wait(5)
            conn.execute(update(items).where(items.c.id == 1).values(v=v + 10))
            conn.commit()

        try:
            db.run(work, engine=engine)
        except BaseException as exc:
            errors.append(exc)
            first_locked.set()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert first_locked.wait(5)

        def second(conn: Connection) -> tuple[float, Any]:
            threading.Timer(0.3, release.set).start()
            start = time.monotonic()
            rows = conn.execute(with_row_locks(one_item())).all()
            took = elapsed_since(start)
            conn.rollback()
            return took, rows

        took, rows = db.run(second, engine=engine)
    finally:
        release.set()
        thread.join(10)
    assert not errors, errors
    assert rows == [(1, 10)]
    assert 0.2 <= took < 3.0, took


# -- Sessions bound per mapper or per table --------------------------------------------------


def test_session_bound_per_mapper(db: Cell, prober: Prober) -> None:
    """A Session with only per-mapper binds (``binds={Item: engine}``, no default bind):
    lock_capabilities and with_row_locks(stmt, session) find the bind through the statement
    (planned at call time: MariaDB's missing OF raises at the call), and the lock is taken;
    a statement whose tables have no bind there is planned when executed."""
    engine = db.warm_up(db.engine())  # connected: the server version is known

    def work(session: Session) -> list[Any]:
        seen: list[Any] = [lock_capabilities(session).flavour]
        if db.backend == "mariadb":
            with pytest.raises(UnsupportedLockOption) as info:
                with_row_locks(select(Item), session, of=Item)
            assert info.value.options == ("of",)
        stmt = with_row_locks(select(Item).where(Item.id == 1), session, nowait=True)
        seen.append([item.id for item in session.scalars(stmt)])
        seen.append(prober.locked())
        session.rollback()
        unbound = with_row_locks(select(owners.c.name).where(owners.c.id == 1), session)
        bind = session.get_bind(mapper=Item)
        seen.append(session.execute(unbound, bind_arguments={"bind": bind}).all())
        seen.append(prober.locked("rl_owners", 1))
        session.rollback()
        return seen

    if db.is_async:

        async def main() -> list[Any]:
            async with AsyncSession(binds={Item: engine}) as session:
                return await session.run_sync(work)

        seen = db.run_async(main)
    else:
        with Session(binds={Item: engine}) as session:
            seen = work(session)
    assert seen == [db.backend, [1], True, [("a",)], True]
    assert not prober.locked()


def test_session_per_entity_bind_wins_over_the_default_bind(db: Cell, prober: Prober) -> None:
    """``Session(bind=default, binds={Item: cell})``: SQLAlchemy runs a statement on Item on
    the cell's server, so with_row_locks plans it for that server, not for the default bind
    (a MySQL 5.7 engine that never connects, which has no SKIP LOCKED and would refuse):
    skip_locked is accepted at the call, rendered, and the row is locked."""
    engine = db.warm_up(db.engine())  # connected: the server version is known
    log = SqlLog(engine)
    url = "mysql+aiomysql://x@127.0.0.1/x" if db.is_async else "mysql+pymysql://x@127.0.0.1/x"
    default = create_async_engine(url) if db.is_async else create_engine(url)
    sync_default = default.sync_engine if isinstance(default, AsyncEngine) else default
    sync_default.dialect.server_version_info = (5, 7, 40)
    with pytest.raises(UnsupportedLockOption):
        with_row_locks(select(Item), default, skip_locked=True)  # the default bind refuses

    def work(session: Session) -> list[Any]:
        stmt = with_row_locks(select(Item).where(Item.id == 1), session, skip_locked=True)
        seen: list[Any] = [[item.id for item in session.scalars(stmt)], prober.locked()]
        session.rollback()
        return seen

    if db.is_async:

        async def main() -> list[Any]:
            async with AsyncSession(bind=default, binds={Item: engine}) as session:
                return await session.run_sync(work)

        seen = db.run_async(main)
    else:
        with Session(bind=default, binds={Item: engine}) as session:
            seen = work(session)
    assert seen == [[1], True]
    if db.backend != "sqlite":
        assert log.last().endswith("FOR UPDATE SKIP LOCKED"), log.last()
    assert not prober.locked()


def test_an_unpickled_locked_statement_locks(db: Cell, prober: Prober) -> None:
    """A statement from with_row_locks, pickled after its options were planned against this
    server (built without a bind, and built with the engine), unpickles and locks the row
    (SQLite: the database) when executed."""
    import pickle

    engine = db.warm_up(db.engine())
    unbound = with_row_locks(one_item(), nowait=True)
    bound = with_row_locks(one_item(), engine, nowait=True)

    def work(conn: Connection, stmt: Any) -> list[Any]:
        seen: list[Any] = [[tuple(row) for row in conn.execute(stmt)], prober.locked()]
        conn.rollback()
        return seen

    assert db.run(work, unbound, engine=engine) == [[(1, 0)], True]  # planned here now
    for original in (unbound, bound):
        back = pickle.loads(pickle.dumps(original))
        assert db.run(work, back, engine=engine) == [[(1, 0)], True]
    assert not prober.locked()


# -- a lock that fails while streamed rows are fetched ---------------------------------------------

streamed = Table(
    "rl_streamed",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("v", Integer, nullable=False),
)
#: Enough rows that the locked one (STREAMED_LOCKED) comes long after the first fetch.
STREAMED_ROWS = 2000
STREAMED_LOCKED = 1500


@pytest.mark.cells("mariadb")
def test_nowait_failing_while_streamed_rows_are_fetched(cell: Cell) -> None:
    """MariaDB reports a failed NOWAIT as 1205, like a lock wait timeout; only the statement
    tells them apart. With streamed results the error surfaces while rows are fetched, and
    SQLAlchemy wraps it without its statement: locksafe fills it in, so the failure is
    lock_not_available — for a with_row_locks statement and for plain SQL alike. The
    MariaDB Connector/Python driver returns a truncated result instead of raising there:
    locksafe refuses to run a locking query that way (see docs/row-locks.md)."""
    cell.create_all(streamed.metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(streamed), [{"id": i, "v": 0} for i in range(1, STREAMED_ROWS + 1)])
    locked_row = select(streamed.c.id).where(streamed.c.id == STREAMED_LOCKED)
    everything = select(streamed.c.id).order_by(streamed.c.id)
    loses_errors = cell.driver == "mariadbconnector"

    def attempt(conn: Connection, stmt: Any) -> tuple[int | None, BaseException | None]:
        try:
            rows = conn.execution_options(stream_results=True).execute(stmt).all()
        except Exception as exc:
            return None, exc
        finally:
            conn.rollback()
        return len(rows), None

    with cell.other() as holder:
        holder.execute(locked_row.with_for_update())
        for stmt in (
            with_row_locks(everything, nowait=True),
            text(f"{everything} FOR UPDATE NOWAIT"),
        ):
            count, error = cell.run(attempt, stmt)
            if loses_errors and isinstance(stmt, Select):
                assert isinstance(error, UnsupportedLockOption), (
                    f"{count} of {STREAMED_ROWS} rows and no error: locksafe must refuse; the "
                    "MySQL dialect module lists the driver in streaming_loses_errors"
                )
                assert error.options == ("stream_results",)
            elif loses_errors:
                # The driver's fault, shown for the record: no error, rows missing.
                assert error is None
                assert count is not None
                assert count < STREAMED_ROWS
            else:
                assert error is not None, count
                assert classify(error) is LockErrorKind.LOCK_NOT_AVAILABLE, error
                assert "NOWAIT" in str(getattr(error, "statement", "")), error
        # skip_locked never fails on a lock: streamed, it returns every row but the locked one.
        skipping = with_row_locks(everything, skip_locked=True)
        count, error = cell.run(attempt, skipping)
        assert error is None, error
        assert count == STREAMED_ROWS - 1


# The sync drivers that can stream (mysql-connector cannot; async engines refuse the option).
@pytest.mark.cells("mariadb+mariadbconnector", "mysql+pymysql", "mysql+mysqldb")
def test_engine_streaming_every_select_is_seen(cell: Cell) -> None:
    """create_engine(server_side_cursors=True) (deprecated, still accepted by SQLAlchemy 2.0
    and 2.1) streams every SELECT without the stream_results execution option. On the
    MariaDB Connector/Python driver a locking query must still be refused (else a NOWAIT
    failing half-way returns a truncated result, silently); skip_locked and unlocked reads
    still run. Other drivers stream too, and raise a classified error."""
    cell.create_all(streamed.metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(streamed), [{"id": i, "v": 0} for i in range(1, STREAMED_ROWS + 1)])
    everything = select(streamed.c.id).order_by(streamed.c.id)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The create_engine.server_side_cursors", Warning)
        engine = cell.engine(server_side_cursors=True)
    sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    server_side: list[bool] = []
    event.listen(
        sync,
        "after_cursor_execute",
        lambda *args: server_side.append(bool(getattr(args[4], "_is_server_side", False))),
    )

    def attempt(conn: Connection, stmt: Any) -> tuple[int | None, BaseException | None]:
        try:
            rows = conn.execute(stmt).all()
        except Exception as exc:
            return None, exc
        finally:
            conn.rollback()
        return len(rows), None

    with cell.other() as holder:
        holder.execute(
            select(streamed.c.id).where(streamed.c.id == STREAMED_LOCKED).with_for_update()
        )
        count, error = cell.run(attempt, with_row_locks(everything, nowait=True), engine=engine)
        if cell.driver == "mariadbconnector":
            assert isinstance(error, UnsupportedLockOption), (
                f"{count} of {STREAMED_ROWS} rows and no error: locksafe must refuse"
            )
            assert error.options == ("stream_results",)
            assert "server_side_cursors" in str(error)
        else:
            assert error is not None, count
            assert classify(error) is LockErrorKind.LOCK_NOT_AVAILABLE, error
        assert cell.run(attempt, everything, engine=engine) == (STREAMED_ROWS, None)
        skipping = with_row_locks(everything, skip_locked=True)
        assert cell.run(attempt, skipping, engine=engine) == (STREAMED_ROWS - 1, None)
    # The engine did stream (so the refusal is about a streamed result), without asking.
    assert server_side
    assert all(server_side), server_side
