"""locksafe.sqlite.configure(): real transactions, real SAVEPOINTs, and BEGIN IMMEDIATE,
shown with real concurrent writers on both SQLite cells."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, func, insert, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import locksafe
import locksafe.sqlite
from conftest import Cell

pytestmark = pytest.mark.cells("sqlite")

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


def read_then_write(cell: Cell, engine: Any, workers: int, rounds: int) -> dict[str, Any]:
    """``workers`` threads each run ``rounds`` read-then-write transactions on one counter;
    failures are counted (not retried) with how long the failing statement waited."""
    failures: list[float] = []
    kinds: list[Any] = []
    successes: list[int] = []
    start = threading.Barrier(workers)

    def one(session: Session) -> None:
        with session.begin():
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
        locksafe.sqlite.configure(create_engine("postgresql+psycopg2://u@127.0.0.1/x"))
    fresh.dispose()


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
