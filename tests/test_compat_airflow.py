"""locksafe.compat.airflow keeps Airflow's signatures and defaults, on real servers."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.dependencies.utils import get_typed_signature
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Query, Session, mapped_column, relationship
from starlette.requests import Request

import locksafe
from harness.cells import Cell
from harness.fake_airflow.install_probe import call_dependency
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


# -- the SQL Airflow's own helper renders at Airflow's call sites, on PostgreSQL ----------------


def airflow_with_row_locks(
    query: Any,
    session: Any,
    *,
    nowait: bool = False,
    skip_locked: bool = False,
    key_share: bool = True,
    **kwargs: Any,
) -> Any:
    # Airflow 3.3.2's helper on PostgreSQL:
    return query.with_for_update(
        nowait=nowait, skip_locked=skip_locked, key_share=key_share, **kwargs
    )


class AirflowBase(DeclarativeBase):
    metadata = MetaData()


class AfDagRun(AirflowBase):
    __tablename__ = "compat_af_dag_run"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dag_id: Mapped[str] = mapped_column(String(50))
    state: Mapped[str] = mapped_column(String(20))


class AfTaskInstance(AirflowBase):
    __tablename__ = "compat_af_task_instance"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dag_run_id: Mapped[int] = mapped_column(ForeignKey(AfDagRun.id))
    state: Mapped[str] = mapped_column(String(20))
    priority_weight: Mapped[int] = mapped_column(Integer)
    dag_run: Mapped[AfDagRun] = relationship()


TI, DR = AfTaskInstance, AfDagRun
ti_table = AfTaskInstance.__table__

#: The statements of Airflow's call sites: (shape, model of ``of=``, build(session)).
SHAPES: list[tuple[str, type, Callable[[Session], Any]]] = [
    (
        "ORM entity, join, where, order_by, limit (the scheduler's task instances)",
        TI,
        lambda s: (
            select(TI)
            .join(TI.dag_run)
            .where(DR.state == "running", TI.state == "scheduled")
            .order_by(TI.priority_weight.desc())
            .limit(32)
        ),
    ),
    (
        "ORM entity, where, limit (dag runs to examine)",
        DR,
        lambda s: select(DR).where(DR.state == "queued").order_by(DR.id).limit(10),
    ),
    (
        "ORM columns, where, limit (triggers to assign)",
        TI,
        lambda s: select(TI.id).where(TI.state == "deferred").order_by(TI.id).limit(5),
    ),
    (
        "Core table select, where, limit",
        TI,
        lambda s: (
            select(ti_table.c.id, ti_table.c.state).where(ti_table.c.state == "queued").limit(3)
        ),
    ),
    (
        "legacy session.query(), join, filter, limit",
        TI,
        lambda s: s.query(TI).join(TI.dag_run).filter(DR.state == "running").limit(32),
    ),
    (
        "legacy session.query(), filter",
        DR,
        lambda s: s.query(DR).filter(DR.dag_id == "d1", DR.state == "running"),
    ),
]

#: The option sets of Airflow 3.3.2's call sites (``"of"``: the shape's model).
OPTION_SETS: list[dict[str, Any]] = [
    {"skip_locked": True},
    {"of": "model", "skip_locked": True},
    {"of": "model", "skip_locked": True, "key_share": False},
    {"nowait": True},
    {"of": "model", "nowait": True},
    {"of": "model", "skip_locked": True, "key_share": True},
    {},
]


def sql_at_call_sites(
    session: Session, model: type, build: Callable[[Session], Any]
) -> list[tuple[dict[str, Any], str, str, list[str], list[str]]]:
    """For each option set, on one statement of an Airflow call site: the SQL Airflow's helper
    and locksafe's compile to, and the statements each sent to the server when executed."""
    bind = session.get_bind()
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    def compiled(query: Any) -> str:
        statement = query.statement if isinstance(query, Query) else query
        return str(statement.compile(bind))

    def executed(query: Any) -> list[str]:
        sent.clear()
        if isinstance(query, Query):
            query.all()
        else:
            session.execute(query).all()
        return list(sent)

    seen = []
    event.listen(bind, "after_cursor_execute", record)
    try:
        for option_set in OPTION_SETS:
            options = {k: model if v == "model" else v for k, v in option_set.items()}
            theirs = airflow_with_row_locks(build(session), session=session, **options)
            ours = airflow.with_row_locks(build(session), session=session, **options)
            seen.append(
                (option_set, compiled(theirs), compiled(ours), executed(theirs), executed(ours))
            )
        session.rollback()
    finally:
        event.remove(bind, "after_cursor_execute", record)
    return seen


@pytest.mark.cells("postgresql")
@pytest.mark.parametrize(
    ("shape", "model", "build"), SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))]
)
def test_postgresql_renders_what_airflows_helper_renders_at_its_call_sites(
    cell: Cell, shape: str, model: type, build: Callable[[Session], Any]
) -> None:
    cell.create_all(AirflowBase.metadata)
    seen = cell.run_session(sql_at_call_sites, model, build)
    assert len(seen) == len(OPTION_SETS)
    for options, theirs, ours, sent_theirs, sent_ours in seen:
        assert ours == theirs, options
        assert " FOR " in theirs, options  # both really lock: not two empty clauses
        assert len(sent_theirs) == 1, options
        assert sent_ours == sent_theirs, options
    clauses = {str(options): theirs.rpartition(" FOR ")[2] for options, theirs, *_ in seen}
    table = model.__tablename__  # type: ignore[attr-defined]
    assert clauses == {
        "{'skip_locked': True}": "NO KEY UPDATE SKIP LOCKED",
        "{'of': 'model', 'skip_locked': True}": f"NO KEY UPDATE OF {table} SKIP LOCKED",
        "{'of': 'model', 'skip_locked': True, 'key_share': False}": (
            f"UPDATE OF {table} SKIP LOCKED"
        ),
        "{'nowait': True}": "NO KEY UPDATE NOWAIT",
        "{'of': 'model', 'nowait': True}": f"NO KEY UPDATE OF {table} NOWAIT",
        "{'of': 'model', 'skip_locked': True, 'key_share': True}": (
            f"NO KEY UPDATE OF {table} SKIP LOCKED"
        ),
        "{}": "NO KEY UPDATE",
    }


# -- install(), end to end, against a fake Airflow in a subprocess -----------------------------

FAKE_AIRFLOW = Path(__file__).parent / "harness" / "fake_airflow"
EXAMPLES = Path(__file__).parents[1] / "examples"
EARLY = "airflow.models.early"  # binds the helpers by name, so imports airflow.utils.sqlalchemy
DECORATORS = "airflow.api_fastapi.logging.decorators"
BACKFILL = "airflow.models.backfill"
DB = "airflow.utils.db"


def fake_airflow_env() -> dict[str, str]:
    """The environment of a subprocess that imports the fake Airflow and the example settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(FAKE_AIRFLOW), str(EXAMPLES), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return env


def run_install(tmp_path: Path, *before: str, enabled: str | None = None) -> dict[str, Any]:
    """``install_probe.py`` in a subprocess (sys.modules and sys.meta_path are its own): the
    local settings of ``examples/`` imported the way Airflow does, install() called again, the
    modules ``before`` imported before the first call."""
    env = fake_airflow_env()
    if enabled is not None:
        env["AIRFLOW__LOCKSAFE__ENABLED"] = enabled
    # Patience: how long the audit log's commit waits for the event loop to answer. Patched,
    # the loop answers at once; unpatched (disabled), the loop is blocked whatever the wait.
    patience = "10" if enabled is None else "0.1"
    done = subprocess.run(
        [sys.executable, str(FAKE_AIRFLOW / "install_probe.py"), str(tmp_path), patience, *before],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    result: dict[str, Any] = json.loads(done.stdout)
    return result


LOCKSAFE = {"with_row_locks": "locksafe", "is_lock_not_available_error": "locksafe"}
AIRFLOW = {
    "with_row_locks": "airflow.utils.sqlalchemy.with_row_locks",
    "is_lock_not_available_error": "airflow.utils.sqlalchemy.is_lock_not_available_error",
}
ALREADY = "this engine was already configured by locksafe.sqlite.configure()"


@pytest.mark.parametrize(
    ("before", "rebound"),
    [
        pytest.param((), 0, id="nothing-imported-yet"),
        pytest.param((EARLY,), 2, id="helpers-imported"),
        pytest.param((EARLY, DECORATORS, BACKFILL, DB), 2, id="all-imported"),
    ],
)
def test_install_end_to_end(tmp_path: Path, before: tuple[str, ...], rebound: int) -> None:
    seen = run_install(tmp_path, *before)
    assert seen["helpers_module_at_install"] is bool(before)
    assert seen["audit_module_at_install"] is (DECORATORS in before)
    # Airflow's factories replaced by locksafe's, wrapping Airflow's (the second call too, not
    # the first call's wrappers), documented as Airflow's.
    assert seen["first_is_airflows"] == seen["second_is_airflows"] == [False, False]
    assert seen["wraps_airflows"] == seen["docs_as_airflow"] == [True] * 4
    # The meta-path hook: only while a module to patch is not imported yet, once, then gone.
    waiting = 0 if set(before) >= {EARLY, DECORATORS, BACKFILL, DB} else 1
    assert seen["finders_after_first_install"] == seen["finders_after_second_install"] == waiting
    assert seen["finders_at_the_end"] == 0
    # Helpers: in airflow.utils.sqlalchemy, bound by name before install, imported after.
    assert seen["helpers"] == {
        "airflow.utils.sqlalchemy": LOCKSAFE,
        "airflow.models.early": LOCKSAFE,
        "airflow.models.late": LOCKSAFE,
    }
    # Engines: each factory's SQLite engine configured once; PostgreSQL untouched.
    for engines in (seen["engines_first"], seen["engines_second"]):
        for name in ("sqlite", "sqlite_async"):
            assert engines[name] == {
                "type": "AsyncEngine" if name.endswith("async") else "Engine",
                "configured_attribute": True,
                "busy_timeout": 30000,
                "configure_again": ALREADY,
                "configure_calls": 1,
            }, name
        for name in ("postgresql", "postgresql_async"):
            assert engines[name] == {
                "type": "AsyncEngine" if name.endswith("async") else "Engine",
                "configured_attribute": False,
                "listeners_as_airflow": True,
                "configure_calls": 0,
            }, name
    # The audit log: wrapped once, still an async dependency, run off the event loop, which
    # stays free while it commits, with the JSON body read on the loop and readable again.
    assert seen["audit_log"] == {
        "wrapped_once": True,
        "is_coroutine_function": True,
        "call": {
            "result": None,
            "event": "post_backfill",
            "ran_on_loop_thread": False,
            "ran_on_loop": False,
            "loop_answered_during_commit": True,
            "body": {"dag_id": "d1", "from_date": "2026-01-01"},
            "receive_calls": 2,
            "received_on_loop_thread": True,
        },
    }
    assert seen["backfill"] == {"wrapped_once": True, "ran_in_immediate_block": True}
    # Airflow's create_global_lock: locksafe's, once, used by Airflow's own callers (seconds),
    # Airflow's kept as __locksafe_original__ (and used again when set back).
    assert seen["global_lock"] == {
        "wrapped_once": True,
        "patch_again": False,
        "airflow_calls_ours": True,
        "held_name": "airflow_MIGRATIONS",
        "seconds": 1800.0,
        "undone_calls_airflows": True,
    }
    # Logged once for the two calls.
    assert len(seen["log"]) == 1
    level, message = seen["log"][0]
    assert level == "INFO"
    assert message.startswith("locksafe: Airflow's SQLite engines use locksafe.sqlite.configure(")
    assert f"({rebound} names rebound now, the rest at import)" in message


def test_install_disabled_leaves_airflow_as_it_is(tmp_path: Path) -> None:
    seen = run_install(tmp_path, EARLY, enabled="False")
    assert seen["first_is_airflows"] == seen["second_is_airflows"] == [True, True]
    assert seen["finders_after_first_install"] == seen["finders_at_the_end"] == 0
    assert seen["helpers"] == {
        "airflow.utils.sqlalchemy": AIRFLOW,
        "airflow.models.early": AIRFLOW,
        "airflow.models.late": AIRFLOW,
    }
    for engines in (seen["engines_first"], seen["engines_second"]):
        for name in ("sqlite", "sqlite_async"):
            assert engines[name]["configured_attribute"] is False, name
            assert engines[name]["busy_timeout"] == 5000, name  # pysqlite's own 5 s
            assert engines[name]["configure_again"] == "accepted", name
            assert engines[name]["configure_calls"] == 0, name
    # Airflow's own audit log, unpatched: it runs on the loop and blocks it while it commits
    # (which is what the tests above rule out once install() ran).
    assert seen["audit_log"]["wrapped_once"] is False
    call = seen["audit_log"]["call"]
    assert call["ran_on_loop_thread"] is call["ran_on_loop"] is True
    assert call["loop_answered_during_commit"] is False
    assert seen["backfill"] == {"wrapped_once": False, "ran_in_immediate_block": False}
    assert seen["global_lock"] == {
        "wrapped_once": False,
        "patch_again": None,
        "airflow_calls_ours": False,
        "held_name": None,
        "seconds": None,
        "undone_calls_airflows": True,  # Airflow's own ran (there was nothing to undo)
    }
    assert seen["log"] == [
        ["INFO", "locksafe: disabled by [locksafe] enabled = False; Airflow left as it is"]
    ]


FIND_SPEC_THEN_IMPORT = """
import importlib.util, json, sys
import locksafe.compat.airflow as locksafe_airflow
locksafe_airflow.install()
for name in ("airflow.utils.sqlalchemy", "airflow.api_fastapi.logging.decorators",
             "airflow.models.backfill", "airflow.utils.db"):
    assert importlib.util.find_spec(name) is not None  # asks whether it exists; no import
    assert name not in sys.modules
from airflow.models import backfill, late
from airflow.api_fastapi.logging import decorators
from airflow.utils import db
print(json.dumps({
    "helpers": late.with_row_locks is locksafe_airflow.with_row_locks,
    "audit_log": hasattr(decorators.action_logging, "__locksafe_original__"),
    "backfill": hasattr(backfill._create_backfill, "__locksafe_original__"),
    "global_lock": hasattr(db.create_global_lock, "__locksafe_original__"),
    "finders": sum(type(f).__name__ == "_PatchOnImport" for f in sys.meta_path),
}))
"""


def test_a_find_spec_that_does_not_import_leaves_the_patch_pending() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FIND_SPEC_THEN_IMPORT],
        env=fake_airflow_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "helpers": True,
        "audit_log": True,
        "backfill": True,
        "global_lock": True,
        "finders": 0,
    }


# -- the audit-log patch, in this process on the fake decorators module (not named airflow.*) --


def fake_decorators() -> ModuleType:
    """A fresh copy of the fake ``airflow.api_fastapi.logging.decorators``, not in sys.modules."""
    path = FAKE_AIRFLOW / "airflow" / "api_fastapi" / "logging" / "decorators.py"
    spec = importlib.util.spec_from_file_location("locksafe_test_fake_decorators", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_audit_log_dependency_keeps_what_fastapi_reads() -> None:
    module = fake_decorators()
    original = module.action_logging
    assert airflow.audit_log_off_the_event_loop(module) is True
    assert airflow.audit_log_off_the_event_loop(module) is False  # once
    assert getattr(module.action_logging, "__locksafe_original__", None) is original
    dependency = module.action_logging(event="post_backfill")
    reference = original(event="post_backfill")
    assert inspect.iscoroutinefunction(dependency)
    assert dependency is not reference
    assert inspect.signature(dependency) == inspect.signature(reference)
    assert dependency.__name__ == reference.__name__ == "log_action"
    # What FastAPI reads: the signature with its string annotations resolved in the module
    # that defined log_action (Airflow's modules use `from __future__ import annotations`).
    typed = get_typed_signature(dependency).parameters
    assert typed == get_typed_signature(reference).parameters
    assert typed["request"].annotation is Request
    assert typed["session"].annotation is Session


@pytest.mark.parametrize("json_body", [True, False], ids=["json-body", "no-body"])
def test_audit_log_runs_off_the_event_loop(json_body: bool) -> None:
    module = fake_decorators()
    airflow.audit_log_off_the_event_loop(module)
    dependency = module.action_logging(event="post_backfill")
    call = asyncio.run(call_dependency(dependency, module.CALLS, json_body=json_body, patience=10))
    assert call == {
        "result": None,
        "event": "post_backfill",
        "ran_on_loop_thread": False,
        "ran_on_loop": False,
        "loop_answered_during_commit": True,
        "body": {"dag_id": "d1", "from_date": "2026-01-01"} if json_body else None,
        "receive_calls": 2 if json_body else 0,
        "received_on_loop_thread": True,
    }


def test_unpatched_audit_log_blocks_the_event_loop() -> None:
    """The control: the same probe sees Airflow's own dependency block the loop."""
    module = fake_decorators()
    dependency = module.action_logging(event="post_backfill")
    call = asyncio.run(call_dependency(dependency, module.CALLS, json_body=True, patience=0.05))
    assert call["ran_on_loop_thread"] is call["ran_on_loop"] is True
    assert call["loop_answered_during_commit"] is False


def test_sqlite_file_engines_get_an_unbounded_pool_overflow() -> None:
    """install()'s sync factory lifts the pool's overflow limit for a SQLite file only: a
    bounded pool ran dry at 32 clients on a real Airflow while requests waited for the write
    lock, and Airflow's async dependencies then waited for a connection on the event loop."""
    from sqlalchemy.pool import NullPool

    lift = airflow.unbounded_sqlite_pool
    args = {"engine_args": {"pool_size": 5, "max_overflow": 10}, "connect_args": {}}
    lifted = lift("sqlite:////tmp/airflow.db", args)
    assert lifted["engine_args"] == {"pool_size": 5, "max_overflow": -1}
    assert args["engine_args"] == {"pool_size": 5, "max_overflow": 10}  # not changed in place
    for untouched in (
        "sqlite://",
        "sqlite:///:memory:",
        "postgresql+psycopg2://u@127.0.0.1/airflow",
        "mysql+pymysql://u@127.0.0.1/airflow",
    ):
        assert lift(untouched, args) is args, untouched
    chosen = {"engine_args": {"poolclass": NullPool}, "connect_args": {}}
    assert lift("sqlite:////tmp/airflow.db", chosen) is chosen


# -- create_global_lock: Airflow's signature; seconds, checked, namespaced, SQLite too -----------

GLOBAL_THREADS = 3
GLOBAL_INCREMENTS = 2
GLOBAL_WINDOW = 0.02
GLOBAL_SLACK = 3.0  # upper bounds of timing checks: a loaded 2-core machine
GLOBAL_JOIN = 120.0


def test_create_global_lock_has_airflows_signature() -> None:
    params = inspect.signature(airflow.create_global_lock).parameters
    assert list(params) == ["session", "lock", "lock_timeout"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values())
    assert params["lock_timeout"].default == 1800


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"lock_timeout": -1}, ValueError, r"lock_timeout=-1 must be a finite number"),
        ({"lock_timeout": float("inf")}, ValueError, r"lock_timeout=inf"),
        ({"lock_timeout": True}, TypeError, r"lock_timeout=True must be a number"),
        ({"lock_timeout": "1800"}, TypeError, r"lock_timeout='1800' must be a number"),
        ({"lock": 1}, TypeError, r"lock=1 must be one of Airflow's DBLocks"),
        ({"lock": ""}, ValueError, r"lock='' must be a non-empty name"),
        ({"session": None}, TypeError, r"session=None must be a SQLAlchemy Session"),
    ],
)
def test_create_global_lock_options_are_checked(
    arguments: dict[str, Any], error: type[Exception], match: str
) -> None:
    from sqlalchemy import create_engine

    from harness.alembic_workers import DBLocks

    with Session(create_engine("sqlite://")) as session:
        call = {"session": session, "lock": DBLocks.MIGRATIONS, **arguments}
        with pytest.raises(error, match=match):
            airflow.create_global_lock(**call)


def make_global_counter(cell: Cell) -> None:
    from harness.alembic_workers import COUNTER

    with cell.sync_engine().begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {COUNTER}")
        conn.exec_driver_sql(f"CREATE TABLE {COUNTER} (id INTEGER PRIMARY KEY, n INTEGER)")
        conn.exec_driver_sql(f"INSERT INTO {COUNTER} (id, n) VALUES (1, 0)")


def read_global_counter(cell: Cell) -> int:
    from harness.alembic_workers import COUNTER

    with cell.sync_engine().begin() as conn:
        value = int(conn.exec_driver_sql(f"SELECT n FROM {COUNTER} WHERE id = 1").scalar_one())
        conn.exec_driver_sql(f"DROP TABLE {COUNTER}")
    return value


@contextlib.contextmanager
def holding_global_lock(cell: Cell, **options: Any) -> Iterator[Any]:
    """Hold Airflow's MIGRATIONS lock (locksafe's) in a thread of its own until the block ends."""
    from harness.alembic_workers import DBLocks

    ready, done = threading.Event(), threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        try:
            with (
                Session(cell.default_engine) as session,
                airflow.create_global_lock(session, DBLocks.MIGRATIONS, **options) as lock,
            ):
                box["lock"] = lock
                ready.set()
                done.wait(GLOBAL_JOIN)
        except BaseException as exc:
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=main)
    thread.start()
    try:
        assert ready.wait(GLOBAL_JOIN)
        if "error" in box:
            raise box["error"]
        yield box["lock"]
    finally:
        done.set()
        thread.join(GLOBAL_JOIN)
    assert not thread.is_alive()


def global_lock_attempt(cell: Cell, lock_timeout: float) -> tuple[BaseException | None, float]:
    from harness.alembic_workers import DBLocks

    with Session(cell.default_engine) as session:
        started = time.monotonic()
        try:
            with airflow.create_global_lock(session, DBLocks.MIGRATIONS, lock_timeout):
                pass
        except locksafe.LockUnavailable as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started


def global_lock_held_on_server(cell: Cell, key: Any) -> bool:
    with cell.sync_engine().connect() as conn:
        if cell.backend == "postgresql":
            unsigned = key & 0xFFFFFFFFFFFFFFFF
            return bool(
                conn.execute(
                    text(
                        "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND classid::bigint = :hi AND objid::bigint = :lo AND objsubid = 1"
                    ),
                    {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
                ).scalar_one()
            )
        return conn.execute(text("SELECT IS_USED_LOCK(:k)"), {"k": key}).scalar() is not None


@pytest.mark.cells("sync")
def test_create_global_lock_excludes_threads(cell: Cell) -> None:
    from harness.alembic_workers import increment

    make_global_counter(cell)
    barrier = threading.Barrier(GLOBAL_THREADS, timeout=GLOBAL_JOIN)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with Session(cell.default_engine) as session:
                barrier.wait()
                for _ in range(GLOBAL_INCREMENTS):
                    increment(session, GLOBAL_WINDOW)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker) for _ in range(GLOBAL_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GLOBAL_JOIN)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    assert read_global_counter(cell) == GLOBAL_THREADS * GLOBAL_INCREMENTS


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
def test_create_global_lock_excludes_processes(cell: Cell) -> None:
    import concurrent.futures
    import multiprocessing

    from harness.alembic_workers import process_worker

    make_global_counter(cell)
    url = cell.admin_url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=context) as pool:
        futures = [
            pool.submit(process_worker, url, GLOBAL_INCREMENTS, GLOBAL_WINDOW) for _ in range(3)
        ]
        for future in futures:
            future.result(timeout=GLOBAL_JOIN)
    assert read_global_counter(cell) == 3 * GLOBAL_INCREMENTS


@pytest.mark.cells("sync")
def test_create_global_lock_waits_seconds_on_every_database(cell: Cell) -> None:
    """``lock_timeout=1`` is one second everywhere (Airflow's: 1 ms on PostgreSQL, 1 s on
    MySQL, no lock on SQLite); the wait runs out with the clear error; the lock is gone after
    its block (``pg_locks`` / ``IS_USED_LOCK``; SQLite: another holder gets it)."""
    from locksafe.alembic import MigrationLockTimeout

    with holding_global_lock(cell) as held:
        key = held.key
        if cell.backend != "sqlite":
            assert global_lock_held_on_server(cell, key)
        error, elapsed = global_lock_attempt(cell, 1)
        print(f"\n[create_global_lock lock_timeout=1] {cell.name:28} {elapsed:.3f} s")
        assert isinstance(error, MigrationLockTimeout)
        assert str(error).startswith(
            "an Airflow migration is running elsewhere: the lock 'airflow_MIGRATIONS'"
        )
        assert 0.95 <= elapsed < 1.0 + GLOBAL_SLACK
        error, elapsed = global_lock_attempt(cell, 0)
        assert isinstance(error, MigrationLockTimeout)
        assert elapsed < GLOBAL_SLACK
    if cell.backend != "sqlite":
        assert not global_lock_held_on_server(cell, key)
    assert global_lock_attempt(cell, 0)[0] is None


@pytest.mark.cells("postgresql+psycopg2", "mysql+pymysql")
def test_create_global_lock_names_are_namespaced(cell: Cell) -> None:
    """Airflow's bare key (PostgreSQL ``1``, MySQL ``airflow_MIGRATIONS``), held by another
    application or by a stock Airflow, is another lock than locksafe's."""
    bare = (
        "SELECT pg_advisory_lock(1)"
        if cell.backend == "postgresql"
        else ("SELECT GET_LOCK('airflow_MIGRATIONS', 0)")
    )
    with cell.sync_engine().connect() as other:
        assert other.exec_driver_sql(bare).scalar() in (None, 1, "")  # held now
        with holding_global_lock(cell, lock_timeout=0) as held:
            if cell.backend == "postgresql":
                assert held.key != 1
            else:
                database = other.exec_driver_sql("SELECT DATABASE()").scalar()
                assert held.key == f"locksafe:{database}:airflow_MIGRATIONS"
            assert global_lock_held_on_server(cell, held.key)
