"""locksafe.compat.airflow keeps Airflow's signatures and defaults, on real servers."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import locksafe
from conftest import Cell
from locksafe.compat import airflow
from locksafe.testing import hold_row_lock

metadata = MetaData()
dag = Table(
    "compat_dag",
    metadata,
    Column("dag_id", String(50), primary_key=True),
    Column("n", Integer),
)


class Base(DeclarativeBase):
    metadata = metadata


class DagModel(Base):
    __tablename__ = "compat_dag_model"
    dag_id: Mapped[str] = mapped_column(String(50), primary_key=True)


@pytest.fixture(autouse=True)
def _follow_configuration(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("AIRFLOW__SCHEDULER__USE_ROW_LEVEL_LOCKING", raising=False)
    airflow.set_row_level_locking(None)
    yield
    airflow.set_row_level_locking(None)


def test_signatures_match_airflow() -> None:
    params = inspect.signature(airflow.with_row_locks).parameters
    assert list(params) == ["query", "session", "nowait", "skip_locked", "key_share", "kwargs"]
    assert params["query"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params["session"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params["session"].default is inspect.Parameter.empty
    for name, default in {"nowait": False, "skip_locked": False, "key_share": True}.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default is default
    assert params["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    assert list(inspect.signature(airflow.is_lock_not_available_error).parameters) == ["error"]


def rendered(cell: Cell, **options: Any) -> str:
    def compile_it(session: Session) -> str:
        stmt = airflow.with_row_locks(select(dag), session, **options)
        return str(stmt.compile(session.get_bind()))

    return cell.run_session(compile_it)


@pytest.mark.cells("postgresql+psycopg2", "postgresql+asyncpg")
def test_postgresql_defaults_to_for_no_key_update(cell: Cell) -> None:
    assert rendered(cell).endswith("FOR NO KEY UPDATE")
    assert rendered(cell, key_share=False, skip_locked=True).endswith("FOR UPDATE SKIP LOCKED")
    assert rendered(cell, nowait=True, of=dag).endswith("FOR NO KEY UPDATE OF compat_dag NOWAIT")


@pytest.mark.cells("mysql+pymysql", "mariadb+mariadbconnector")
def test_mariadb_is_locked_where_airflow_returned_the_query_unlocked(cell: Cell) -> None:
    # Airflow: MariaDB has no `supports_for_update_of`, so its with_row_locks returned the
    # query unchanged. Here: the strongest lock MariaDB has (key_share and OF dropped).
    assert rendered(cell).endswith("FOR UPDATE")
    assert rendered(cell, skip_locked=True, of=dag).endswith("FOR UPDATE SKIP LOCKED")


def test_switch_turns_row_locks_off(cell: Cell, monkeypatch: pytest.MonkeyPatch) -> None:
    query = select(dag)
    airflow.set_row_level_locking(False)
    assert airflow.with_row_locks(query, None) is query
    airflow.set_row_level_locking(None)
    monkeypatch.setenv("AIRFLOW__SCHEDULER__USE_ROW_LEVEL_LOCKING", "False")
    assert not airflow.use_row_level_locking()
    assert airflow.with_row_locks(query, None) is query
    monkeypatch.setenv("AIRFLOW__SCHEDULER__USE_ROW_LEVEL_LOCKING", "maybe")
    with pytest.raises(ValueError, match="USE_ROW_LEVEL_LOCKING"):
        airflow.use_row_level_locking()
    monkeypatch.setenv("AIRFLOW__SCHEDULER__USE_ROW_LEVEL_LOCKING", "True")
    assert airflow.use_row_level_locking()


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="colour"):
        airflow.with_row_locks(select(dag), None, colour="red")


def test_orm_query_stays_a_query(cell: Cell) -> None:
    cell.create_all(metadata)

    def run(session: Session) -> tuple[type, list[str]]:
        session.add(DagModel(dag_id="a"))
        session.flush()
        query = airflow.with_row_locks(session.query(DagModel), session, skip_locked=True)
        return type(query), [d.dag_id for d in query.all()]

    kind, ids = cell.run_session(run)
    assert kind.__name__ == "Query"
    assert ids == ["a"]


def test_is_lock_not_available_error_on_real_errors(cell: Cell) -> None:
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(dag).values(dag_id="x", n=1))

    def nowait(session: Session) -> BaseException:
        # asyncpg raises a plain DBAPIError, pg8000 a ProgrammingError, mysql-connector a
        # DatabaseError: not every driver says OperationalError.
        with pytest.raises(DBAPIError) as info:
            session.execute(airflow.with_row_locks(select(dag), session, nowait=True)).all()
        session.rollback()
        return info.value

    def duplicate(session: Session) -> BaseException:
        with pytest.raises(IntegrityError) as info:
            session.execute(insert(dag).values(dag_id="x", n=2))
        session.rollback()
        return info.value

    with hold_row_lock(cell.url, select(dag)):
        lock_error = cell.run_session(nowait)
    assert airflow.is_lock_not_available_error(lock_error)
    assert not airflow.is_lock_not_available_error(cell.run_session(duplicate))
    # Airflow's own helper raised AttributeError / IndexError on these:
    for odd in (None, ValueError(), OperationalError("s", {}, Exception()), object()):
        assert not airflow.is_lock_not_available_error(odd)
    assert airflow.is_lock_not_available_error is not locksafe.is_lock_not_available_error
