"""The Alembic migration lock (issue 11): ``locksafe.alembic.migration_lock``.

- Four processes run ``alembic upgrade head`` at once (Alembic's command line, ``env.py`` taken
  from ``docs/migrations.md``, forked after the imports and released together) against one
  database —
  PostgreSQL, MariaDB, SQLite; sync and async templates. Every process succeeds, every revision
  is applied exactly once and by one process, the schema is whole; checked from another
  connection. On PostgreSQL one revision runs ``CREATE INDEX CONCURRENTLY`` in an
  ``autocommit_block()`` while the other three wait.
- The control, deterministic: with the lock held elsewhere, a run waits and then fails with a
  clear error after its timeout, having run nothing; it runs once the lock is free.
- The lock is held on a dedicated connection, idle and in no transaction; it survives the
  migration's COMMITs and DDL; no lock and no connection outlives the block (``pg_locks``,
  ``IS_USED_LOCK``, ``pg_stat_activity``, the process list) — also when the block raises,
  when ``KeyboardInterrupt`` arrives in the block or during the wait.
- Timeouts within tolerance, options checked, a connection already in a transaction refused,
  re-entrance in one thread (not across threads), the sync form inside ``run_sync``, in-memory
  SQLite.
- The DDL recipes of the docs: a bounded ``ALTER TABLE`` gives up and lets the application's
  query through (PostgreSQL ``lock_timeout``, MariaDB ``lock_wait_timeout``), an unbounded one
  keeps it waiting; the savepoint retry loop of the docs succeeds once the table is free.

Every wait is bounded (thread joins, subprocess timeouts, lock timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Text, create_engine, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool, StaticPool

import locksafe
from harness.cells import Cell
from locksafe import CallerTransactionError, LockErrorKind, LockUnavailable
from locksafe.alembic import MigrationLock, MigrationLockTimeout, migration_lock

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "migrations.md"
PROJECT = Path(__file__).parent / "harness" / "alembic_project"
PROCESSES = 4
#: Upper bounds of timing checks: generous, the machine is a loaded 2-core box.
SLACK = 3.0
JOIN = 120.0
SERVER = ("postgresql", "mariadb")
REVISIONS = ["0001", "0002", "0003", "0004"]
TABLES = ("mig_applied", "mig_item", "alembic_version")


def unique(prefix: str = "mig") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# -- the docs' code blocks -------------------------------------------------------------------


def docs_block(marker: str, language: str = "python") -> str:
    """The fenced block (```python, or ``language``) that follows ``<!-- marker`` in
    docs/migrations.md."""
    page = DOCS.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {re.escape(marker)}[^\n]*-->\n```{language}\n(.*?)```", page, re.S)
    assert found, f"no block marked {marker!r} in {DOCS}"
    return found.group(1)


# -- an Alembic project on the cell's database --------------------------------------------------

INI = """\
[alembic]
script_location = %(here)s/migrations
sqlalchemy.url = {url}

[loggers]
keys = root,alembic

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console

[logger_alembic]
level = INFO
handlers =
qualname = alembic

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)s %(name)s %(message)s
"""


def make_project(tmp_path: Path, cell: Cell) -> Path:
    """``alembic.ini`` for the cell's URL and driver, the fixture's revisions, and the docs'
    ``env.py`` (the async template on async cells). Drops the tables a run would create."""
    project = tmp_path / "project"
    shutil.copytree(PROJECT / "versions", project / "migrations" / "versions")
    template = "env.py: async" if cell.is_async else "env.py: sync"
    (project / "migrations" / "env.py").write_text(docs_block(template), encoding="utf-8")
    url = cell.url.render_as_string(hide_password=False).replace("%", "%%")
    (project / "alembic.ini").write_text(INI.format(url=url), encoding="utf-8")
    drop_tables(cell)
    return project


def drop_tables(cell: Cell) -> None:
    with cell.sync_engine().begin() as conn:
        for table in TABLES:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


@pytest.fixture
def cleanup(cell: Cell) -> Iterator[None]:
    yield
    drop_tables(cell)


def launch(
    cell: Cell, project: Path, count: int, *alembic_args: str, pause: float = 0.0
) -> tuple[subprocess.Popen[str], Path]:
    """``count`` processes of ``alembic -c alembic.ini ALEMBIC_ARGS``, forked from one that
    imported everything first and released together (``launch.py``); returns that parent and
    the folder of their outcomes."""
    out = project / f"run-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, LOCKSAFE_TEST_MIGRATION_PAUSE=str(pause))
    command = [
        sys.executable,
        str(PROJECT / "launch.py"),
        str(out),
        str(count),
        cell.spec.module,
        "-c",
        str(project / "alembic.ini"),
        *alembic_args,
    ]
    parent = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return parent, out


def finish(launched: tuple[subprocess.Popen[str], Path]) -> list[tuple[int, str]]:
    """Each process's exit code and standard error, in order."""
    parent, out = launched
    try:
        _, err = parent.communicate(timeout=JOIN)
    except subprocess.TimeoutExpired:
        parent.kill()
        _, err = parent.communicate()
        pytest.fail(f"alembic did not finish in {JOIN} s:\n{err}")
    assert parent.returncode == 0, err
    codes = sorted(out.glob("code-*"), key=lambda p: int(p.name.split("-")[1]))
    return [
        (int(code.read_text()), (out / code.name.replace("code", "err")).read_text())
        for code in codes
    ]


def wait_ready(out: Path) -> None:
    deadline = time.monotonic() + JOIN
    while not (out / "ready").exists():
        assert time.monotonic() < deadline, "the alembic processes never started"
        time.sleep(0.01)


def database_state(cell: Cell) -> dict[str, Any]:
    """What the runs left, read from another connection (the admin driver)."""
    with cell.sync_engine().connect() as conn:
        found = inspect(conn)
        if not found.has_table("alembic_version"):
            return {"alembic_version": None}
        state: dict[str, Any] = {
            "alembic_version": [
                r[0] for r in conn.exec_driver_sql("SELECT * FROM alembic_version")
            ],
            "applied": [
                tuple(r)
                for r in conn.exec_driver_sql(
                    "SELECT revision, COUNT(*), COUNT(DISTINCT pid) FROM mig_applied "
                    "GROUP BY revision ORDER BY revision"
                )
            ],
            "appliers": conn.exec_driver_sql(
                "SELECT COUNT(DISTINCT pid) FROM mig_applied"
            ).scalar_one(),
            "items": [
                tuple(r) for r in conn.exec_driver_sql("SELECT id, name, note FROM mig_item")
            ],
            "columns": sorted(c["name"] for c in found.get_columns("mig_item")),
            "indexes": sorted(str(i["name"]) for i in found.get_indexes("mig_item")),
        }
        if cell.backend == "postgresql":
            state["index_valid"] = conn.exec_driver_sql(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_mig_item_name'::regclass"
            ).scalar_one()
    return state


# -- four processes, one database -----------------------------------------------------------------


@pytest.mark.cells(
    "sqlite+pysqlite",
    "sqlite+aiosqlite",
    "postgresql+psycopg",
    "postgresql+asyncpg",
    "mysql+pymysql",
    "mysql+aiomysql",
)
def test_four_processes_upgrade_at_once(cell: Cell, tmp_path: Path, cleanup: None) -> None:
    project = make_project(tmp_path, cell)
    started = time.monotonic()
    done = finish(
        launch(cell, project, PROCESSES, "-x", "lock_timeout=90", "upgrade", "head", pause=0.2)
    )
    assert len(done) == PROCESSES
    elapsed = time.monotonic() - started
    for code, err in done:
        assert code == 0, err
    state = database_state(cell)
    print(f"\n[alembic x{PROCESSES}] {cell.name:28} {elapsed:.2f} s {state['applied']}")
    assert state["alembic_version"] == ["0004"]
    assert state["applied"] == [(revision, 1, 1) for revision in REVISIONS]  # exactly once
    assert state["appliers"] == 1  # all four by the process that held the lock
    assert state["items"] == [(1, "seed", "added by 0003")]
    assert state["columns"] == ["id", "name", "note"]
    assert state["indexes"] == ["ix_mig_item_name"]
    if cell.backend == "postgresql":
        assert state["index_valid"] is True
    # One process ran the migrations; the three others found the database at head.
    ran = [err.count("Running upgrade") for _, err in done]
    assert sorted(ran) == [0, 0, 0, len(REVISIONS)]


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
def test_a_run_waits_for_the_lock_times_out_clearly_then_runs(
    cell: Cell, tmp_path: Path, cleanup: None
) -> None:
    """The control: a run does honour the lock. Held elsewhere, a run with a 1 s timeout fails
    with the clear error and runs nothing; a run with a longer one waits (nothing applied while
    the lock is held) and completes once it is given back."""
    project = make_project(tmp_path, cell)
    with holding(cell) as holder:
        assert holder.acquired
        short = launch(cell, project, 1, "-x", "lock_timeout=1", "upgrade", "head")
        long = launch(cell, project, 1, "-x", "lock_timeout=90", "upgrade", "head")
        [(code, err)] = finish(short)
        assert code != 0
        assert "MigrationLockTimeout: a migration is running elsewhere" in err
        found = re.search(r"waited (\d+\.\d+) s \(timeout=1 s\)", err)
        assert found, err
        waited = float(found.group(1))
        print(f"\n[alembic waited] {cell.name:28} {waited:.2f} s for timeout=1")
        assert 1.0 <= waited < 1.0 + SLACK
        assert "Running upgrade" not in err
        wait_ready(long[1])
        time.sleep(0.3)
        assert long[0].poll() is None  # still waiting ...
        assert database_state(cell) == {"alembic_version": None}  # ... and nothing ran
    [(code, err)] = finish(long)
    assert code == 0, err
    assert database_state(cell)["applied"] == [(revision, 1, 1) for revision in REVISIONS]


SHARED_CONNECTION_ENV = """\
from alembic import context

from locksafe.alembic import migration_lock

connection = context.config.attributes["connection"]
with migration_lock(connection):
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
"""


@pytest.mark.cells("sqlite+pysqlite")
def test_the_shared_connection_recipe(cell: Cell, tmp_path: Path, cleanup: None) -> None:
    """Alembic's cookbook recipe (the caller's connection, in a transaction, handed to env.py
    through ``config.attributes``): refused as it is (the lock would end before the COMMIT);
    with the lock taken around the transaction, as docs/migrations.md says, ``env.py``'s own
    ``migration_lock`` is inside it already and the run completes."""
    from alembic import command
    from alembic.config import Config

    project = make_project(tmp_path, cell)
    (project / "migrations" / "env.py").write_text(SHARED_CONNECTION_ENV, encoding="utf-8")
    config = Config(str(project / "alembic.ini"))
    engine = cell.sync_engine()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        with pytest.raises(CallerTransactionError, match="already in a transaction"):
            command.upgrade(config, "head")
    assert database_state(cell) == {"alembic_version": None}

    with engine.connect() as connection, migration_lock(connection) as lock:
        assert not free(cell)
        with connection.begin():
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        assert lock.acquired
    assert free(cell)
    assert database_state(cell)["applied"] == [(revision, 1, 1) for revision in REVISIONS]


@pytest.mark.cells("sqlite+pysqlite", "sqlite+aiosqlite")
def test_the_recipes_lock_timeout_option(cell: Cell, tmp_path: Path, cleanup: None) -> None:
    """``-x lock_timeout=``: a value that is not seconds stops the run with Alembic's one-line
    ``FAILED:``, not a traceback, and runs nothing; ``none`` waits without a limit (the log
    says so) and runs once the lock is free. With the docs' ``[logger_locksafe]`` in
    ``alembic.ini``, the wait is in the run's output: one line when it starts, one when it
    ends."""
    project = make_project(tmp_path, cell)
    for bad in ("5m", "-1", "inf"):
        [(code, err)] = finish(
            launch(cell, project, 1, "-x", f"lock_timeout={bad}", "upgrade", "head")
        )
        assert code != 0, err
        assert "Traceback" not in err, err
        assert f"-x lock_timeout={bad!r}: give seconds" in err, err
        assert database_state(cell) == {"alembic_version": None}

    logger = docs_block("alembic.ini: locksafe logger", "ini")
    ini = (project / "alembic.ini").read_text(encoding="utf-8")
    ini = ini.replace("keys = root,alembic\n", "keys = root,alembic,locksafe\n") + "\n" + logger
    (project / "alembic.ini").write_text(ini, encoding="utf-8")
    with holding(cell):
        forever = launch(cell, project, 1, "-x", "lock_timeout=none", "upgrade", "head")
        wait_ready(forever[1])
        time.sleep(1.0)
        assert forever[0].poll() is None  # still waiting ...
        assert database_state(cell) == {"alembic_version": None}  # ... and nothing ran
    [(code, err)] = finish(forever)
    assert code == 0, err
    assert database_state(cell)["applied"] == [(revision, 1, 1) for revision in REVISIONS]
    waits = [line for line in err.splitlines() if line.startswith("INFO locksafe.alembic ")]
    assert len(waits) == 2, err
    assert waits[0].startswith("INFO locksafe.alembic waiting for the migration lock 'alembic'")
    assert waits[0].endswith("a migration is running elsewhere; no time limit"), waits[0]
    got = re.fullmatch(
        r"INFO locksafe.alembic got the migration lock 'alembic' after waiting (\d+\.\d\d) s",
        waits[1],
    )
    assert got, waits[1]
    assert 0 < float(got.group(1)) < JOIN


# -- holding the lock in this process -------------------------------------------------------


@contextlib.contextmanager
def holding(cell: Cell, name: str = "alembic", **options: Any) -> Iterator[MigrationLock]:
    """Hold the migration lock in a thread of its own (a connection of the cell's driver,
    ``async with`` on async cells) until the block ends."""
    ready, done = threading.Event(), threading.Event()
    box: dict[str, Any] = {}
    engine = cell.default_engine

    def sync_main() -> None:
        with engine.connect() as conn, migration_lock(conn, name=name, **options) as lock:
            box["lock"] = lock
            ready.set()
            done.wait(JOIN)

    async def async_main() -> None:
        async with engine.connect() as conn, migration_lock(conn, name=name, **options) as lock:
            box["lock"] = lock
            ready.set()
            while not done.is_set():  # noqa: ASYNC110 (a threading.Event)
                await asyncio.sleep(0.005)

    def main() -> None:
        try:
            if cell.is_async:
                cell.run_async(async_main)
            else:
                sync_main()
        except BaseException as exc:
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=main, name="migration-lock-holder")
    thread.start()
    try:
        assert ready.wait(JOIN), "the holder never got the lock"
        if "error" in box:
            raise box["error"]
        yield box["lock"]
    finally:
        done.set()
        thread.join(JOIN)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]


def attempt(
    cell: Cell, name: str = "alembic", **options: Any
) -> tuple[BaseException | None, float]:
    """From a new connection of the cell's driver: take and give back the lock; the
    LockUnavailable it raised (or None) and the seconds it took."""
    engine = cell.default_engine
    options.setdefault("timeout", 0)

    async def async_main() -> tuple[BaseException | None, float]:
        async with engine.connect() as conn:
            started = time.monotonic()
            try:
                async with migration_lock(conn, name=name, **options):
                    pass
            except LockUnavailable as exc:
                return exc, time.monotonic() - started
            return None, time.monotonic() - started

    if cell.is_async:
        return cell.run_async(async_main)
    with engine.connect() as conn:
        started = time.monotonic()
        try:
            with migration_lock(conn, name=name, **options):
                pass
        except LockUnavailable as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started


def free(cell: Cell, name: str = "alembic") -> bool:
    """Whether another connection gets the lock at once (in a thread of its own)."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(attempt(cell, name)[0]))
    thread.start()
    thread.join(JOIN)
    assert box, "the attempt did not finish"
    return box[0] is None


def holder_session(cell: Cell, key: Any) -> dict[str, Any] | None:
    """The server session that holds the lock (another connection asks): PostgreSQL
    ``pg_locks`` + ``pg_stat_activity``, MySQL / MariaDB ``IS_USED_LOCK`` + the process list."""
    with cell.sync_engine().connect() as conn:
        if cell.backend == "postgresql":
            unsigned = key & 0xFFFFFFFFFFFFFFFF
            row = conn.execute(
                text(
                    "SELECT a.pid, a.state, a.xact_start IS NULL, a.backend_xmin IS NULL"
                    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                    " AND l.classid::bigint = :hi AND l.objid::bigint = :lo"
                ),
                {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
            ).first()
            if row is None:
                return None
            return {"id": row[0], "state": row[1], "no_transaction": row[2] and row[3]}
        owner = conn.execute(text("SELECT IS_USED_LOCK(:key)"), {"key": key}).scalar()
        if owner is None:
            return None
        command = conn.execute(
            text("SELECT COMMAND FROM information_schema.PROCESSLIST WHERE ID = :id"),
            {"id": owner},
        ).scalar()
        trx = conn.execute(
            text(
                "SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = :id"
            ),
            {"id": owner},
        ).scalar_one()
        return {"id": int(owner), "state": str(command).lower(), "no_transaction": trx == 0}


def session_alive(cell: Cell, session_id: int) -> bool:
    with cell.sync_engine().connect() as conn:
        if cell.backend == "postgresql":
            sql = "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = :id"
        else:
            sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = :id"
        return bool(conn.execute(text(sql), {"id": session_id}).scalar_one())


def gone(cell: Cell, session_id: int, within: float = 10.0) -> bool:
    """The server ended the session (closing is asynchronous on the server's side)."""
    deadline = time.monotonic() + within
    while session_alive(cell, session_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def own_session_id(conn: Connection) -> int:
    sql = (
        "SELECT pg_backend_pid()" if conn.dialect.name == "postgresql" else "SELECT CONNECTION_ID()"
    )
    return int(conn.exec_driver_sql(sql).scalar_one())


@pytest.mark.cells("postgresql", "mariadb")
def test_held_on_a_dedicated_idle_connection_through_commits_and_ddl(cell: Cell) -> None:
    name = unique()
    table = f"mig_t_{uuid.uuid4().hex[:8]}"
    seen: dict[str, Any] = {}

    def body(conn: Connection) -> None:
        seen["caller"] = own_session_id(conn)
        conn.rollback()  # own_session_id began a transaction: end it before the lock
        with migration_lock(conn, name=name) as lock:
            seen["key"] = lock.key
            seen["holder"] = holder_session(cell, lock.key)
            conn.exec_driver_sql(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)")
            conn.commit()  # the migration's COMMITs
            conn.exec_driver_sql(f"INSERT INTO {table} (id) VALUES (1)")
            conn.rollback()
            conn.exec_driver_sql(f"DROP TABLE {table}")
            conn.commit()
            seen["after commits"] = holder_session(cell, lock.key)
            seen["free inside"] = free(cell, name)
        seen["after"] = holder_session(cell, seen["key"])

    cell.run(body)
    holder = seen["holder"]
    assert holder is not None
    assert holder["id"] != seen["caller"]  # not the migration's connection
    assert holder["state"] in ("idle", "sleep")  # idle ...
    assert holder["no_transaction"]  # ... in no transaction, with no snapshot
    assert seen["after commits"] == holder
    assert seen["free inside"] is False
    assert seen["after"] is None  # given back,
    assert gone(cell, holder["id"])  # and its connection closed, not pooled
    assert free(cell, name)


@pytest.mark.cells("postgresql+psycopg2", "postgresql+asyncpg", "mysql+pymysql", "mysql+asyncmy")
def test_a_lock_lost_during_the_run_is_reported(cell: Cell) -> None:
    """Someone ends the lock's session while the migration runs (``pg_terminate_backend``,
    ``KILL``): the block's end raises NamedLockError, never a silent success."""
    name = unique()
    seen: dict[str, Any] = {}

    def run_while_the_lock_is_ended(conn: Connection) -> None:
        with migration_lock(conn, name=name) as lock:
            holder = holder_session(cell, lock.key)
            assert holder is not None
            kill = (
                "SELECT pg_terminate_backend(:id)" if cell.backend == "postgresql" else "KILL :id"
            )
            with cell.sync_engine().connect() as admin:
                admin.execute(text(kill), {"id": holder["id"]})
            assert gone(cell, holder["id"])
            seen["free during"] = free(cell, name)  # the lock ended with its session

    def body(conn: Connection) -> None:
        with pytest.raises(locksafe.NamedLockError, match="could not be given back") as caught:
            run_while_the_lock_is_ended(conn)
        seen["cause"] = caught.value.__cause__

    cell.run(body)
    assert seen["free during"] is True
    assert isinstance(seen["cause"], DBAPIError)
    assert free(cell, name)


@pytest.mark.cells("postgresql", "mariadb")
def test_the_lock_connection_never_goes_back_into_the_pool(cell: Cell) -> None:
    """With a real pool: the caller's connection goes back into it, the lock's is closed."""
    name = unique()
    poolclass = AsyncAdaptedQueuePool if cell.is_async else QueuePool
    engine = cell.warm_up(cell.engine(poolclass=poolclass, pool_size=5))
    seen: dict[str, Any] = {}

    def body(conn: Connection) -> None:
        seen["caller"] = own_session_id(conn)
        conn.rollback()
        with migration_lock(conn, name=name) as lock:
            seen["holder"] = holder_session(cell, lock.key)

    for _ in range(2):
        cell.run(body, engine=engine)
        assert gone(cell, seen["holder"]["id"])  # closed
        assert session_alive(cell, seen["caller"])  # pooled
    pool = engine.sync_engine.pool if cell.is_async else engine.pool
    assert pool.checkedout() == 0


def test_timeouts_the_message_and_the_wait(cell: Cell) -> None:
    name = unique()
    box: list[Any] = []

    def wait_for_it() -> None:
        box.append((*attempt(cell, name, timeout=30), time.monotonic()))

    with holding(cell, name):
        error, elapsed = attempt(cell, name, timeout=0)
        assert isinstance(error, MigrationLockTimeout)
        assert isinstance(error, LockUnavailable)
        assert error.kind is LockErrorKind.LOCK_NOT_AVAILABLE
        assert "did not wait (timeout=0)" in str(error)
        assert elapsed < SLACK

        error, elapsed = attempt(cell, name, timeout=0.5)
        print(f"\n[migration-lock timeout 0.5 s] {cell.name:28} {elapsed:.3f} s")
        assert isinstance(error, MigrationLockTimeout)
        assert error.kind is LockErrorKind.LOCK_TIMEOUT
        assert error.lock_name == name
        assert error.timeout == 0.5
        assert 0.45 <= error.elapsed <= elapsed
        assert 0.45 <= elapsed < 0.5 + SLACK
        message = str(error)
        assert message.startswith("a migration is running elsewhere: the lock ")
        assert repr(name) in message
        assert re.search(r"waited 0\.\d\d s \(timeout=0\.5 s\)", message), message
        assert "Nothing was run" in message

        waiter = threading.Thread(target=wait_for_it)  # a wait that ends with the holder's
        waiter.start()
        time.sleep(0.3)
        assert not box  # waiting
        released = time.monotonic()
    waiter.join(JOIN)
    error, _, finished = box[0]
    assert error is None
    assert finished - released < 0.5 + SLACK  # PostgreSQL: at most one poll (0.5 s) late
    assert attempt(cell, name)[0] is None


def _wait_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "locksafe.alembic" and r.levelno >= logging.INFO]


@pytest.mark.cells(
    "sqlite+pysqlite",
    "sqlite+aiosqlite",
    "postgresql+psycopg2",
    "postgresql+asyncpg",
    "mysql+pymysql",
    "mysql+aiomysql",
)
def test_a_wait_is_logged_with_who_holds_the_lock_and_how_long_it_took(
    cell: Cell, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that finds the lock taken says so once, at INFO on ``locksafe.alembic`` (the lock,
    its holder as the server tells it), however many tries the wait takes, and once more when it
    gets the lock (how long it waited); a run that does not wait says nothing."""
    caplog.set_level(logging.INFO, logger="locksafe.alembic")
    name = unique()
    box: list[Any] = []
    with holding(cell, name) as holder:
        session = holder_session(cell, holder.key) if cell.backend in SERVER else None
        error, _ = attempt(cell, name, timeout=0)
        assert isinstance(error, MigrationLockTimeout)
        assert _wait_lines(caplog) == []  # did not wait: nothing to say
        waiter = threading.Thread(target=lambda: box.append(attempt(cell, name, timeout=30)))
        waiter.start()
        deadline = time.monotonic() + JOIN
        while not _wait_lines(caplog) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.5)  # several polls (MySQL: server waits of 1 s): still one line
        assert not box  # waiting
    waiter.join(JOIN)
    assert box[0][0] is None
    lines = _wait_lines(caplog)
    assert [r.levelno for r in lines] == [logging.INFO, logging.INFO], lines
    waiting, got = (r.getMessage() for r in lines)
    print(f"\n[migration-lock log] {cell.name:28} {waiting}\n{' ' * 50}{got}")
    assert waiting.startswith(f"waiting for the migration lock {name!r} (")
    assert waiting.endswith("a migration is running elsewhere; timeout=30 s")
    if cell.backend == "postgresql":
        assert session is not None
        assert f"(advisory lock key {holder.key}), held by PostgreSQL backend pid " in waiting
        assert f" pid {session['id']} (user " in waiting
    elif cell.backend in SERVER:
        assert session is not None
        assert f"held by connection id {session['id']} (user " in waiting
    else:
        path, _ = holder.key
        assert path.endswith(".lock")
        assert f"(lock file {path!r}), held by another process or connection" in waiting
    found = re.fullmatch(
        rf"got the migration lock {re.escape(repr(name))} after waiting (.+) s", got
    )
    assert found, got
    assert 1.5 <= float(found.group(1)) < 1.5 + SLACK


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql", "mysql+aiomysql")
@pytest.mark.parametrize("timeout", [0, 0.3])
def test_the_timeout_error_comes_without_a_misleading_cause(cell: Cell, timeout: float) -> None:
    """MigrationLockTimeout says what to do (run again later, or wait longer); it is not chained
    to the inner error of one try, whose "retry after 1s" would contradict it."""
    name = unique()
    with holding(cell, name):
        error, _ = attempt(cell, name, timeout=timeout)
    assert isinstance(error, MigrationLockTimeout)
    assert error.__cause__ is None
    shown = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert shown.count("Traceback (most recent call last)") == 1, shown
    assert "retry after" not in shown, shown
    assert "run again once it has finished" in shown


def test_given_back_when_the_block_raises(cell: Cell) -> None:
    """An error in the block (a migration that failed) and ``KeyboardInterrupt`` in it."""

    def fail_inside(conn: Connection, raised: type[BaseException], seen: dict[str, Any]) -> None:
        with migration_lock(conn, name=seen["name"]) as lock:
            seen["key"] = lock.key
            if cell.backend in SERVER:
                seen["holder"] = holder_session(cell, lock.key)
            seen["free inside"] = free(cell, seen["name"])
            raise raised("the migration failed")

    def body(conn: Connection, raised: type[BaseException], seen: dict[str, Any]) -> None:
        with pytest.raises(raised, match="the migration failed"):
            fail_inside(conn, raised, seen)
        seen["free after"] = free(cell, seen["name"])

    for raised in (ValueError, KeyboardInterrupt):
        seen: dict[str, Any] = {"name": unique()}
        cell.run(body, raised, seen)
        assert seen["free inside"] is False, raised
        assert seen["free after"] is True, raised
        if cell.backend in SERVER:
            assert holder_session(cell, seen["key"]) is None
            assert gone(cell, seen["holder"]["id"])


@pytest.mark.cells("sync")
def test_keyboard_interrupt_during_the_wait(cell: Cell) -> None:
    """A real SIGINT while the lock is awaited: the wait ends, its connection is discarded
    (the server ends that session: a GET_LOCK it was still running cannot be granted later)
    and the lock, given back by its holder afterwards, is free."""
    name = unique()
    engine = cell.default_engine
    interrupted: list[BaseException] = []
    with holding(cell, name) as holder:
        before = _server_sessions(cell)
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        started = time.monotonic()
        timer.start()
        try:
            with engine.connect() as conn, migration_lock(conn, name=name, timeout=30):
                pytest.fail("got the lock while it was held")
        except KeyboardInterrupt as exc:
            interrupted.append(exc)
        except Exception as exc:  # a driver that turns the interrupt into its own error
            interrupted.append(exc)
        finally:
            timer.cancel()
        elapsed = time.monotonic() - started
        assert interrupted
        # mysqlclient: the interrupted query's cursor cannot be closed ("Commands out of sync"),
        # and that error replaces the KeyboardInterrupt, which is its context.
        seen = interrupted[0]
        assert isinstance(seen, KeyboardInterrupt) or isinstance(
            seen.__context__, KeyboardInterrupt
        ), repr(seen)
        assert elapsed < 0.5 + SLACK
        key = holder.key
    print(f"\n[interrupted wait] {cell.name:28} {type(interrupted[0]).__name__} {elapsed:.2f} s")
    if cell.backend in SERVER:
        deadline = time.monotonic() + 10
        while _server_sessions(cell) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _server_sessions(cell) - before  # the waiter's connection was closed
        assert holder_session(cell, key) is None
    assert free(cell, name)


@pytest.mark.cells("async")
def test_async_with_held_idle_and_a_cancelled_wait_leaves_nothing(cell: Cell) -> None:
    """``async with``: the lock on a dedicated idle connection; a waiter cancelled
    (``asyncio.wait_for``) leaves no connection and no lock behind."""
    name = unique()
    engine = cell.default_engine
    seen: dict[str, Any] = {}

    async def wait_for_it() -> None:
        async with engine.connect() as conn, migration_lock(conn, name=name, timeout=30):
            pytest.fail("got the lock while it was held")

    async def main() -> None:
        async with engine.connect() as conn, migration_lock(conn, name=name) as lock:
            seen["key"] = lock.key
            if cell.backend in SERVER:
                seen["holder"] = holder_session(cell, lock.key)
            before = _server_sessions(cell)
            started = time.monotonic()
            # A task of its own context: one started inside the block (copying this context)
            # counts as inside the lock, and would not wait.
            waiter = contextvars.Context().run(asyncio.ensure_future, wait_for_it())
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, 0.5)
            seen["cancelled after"] = time.monotonic() - started
            deadline = time.monotonic() + 10
            while _server_sessions(cell) - before and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            seen["left behind"] = _server_sessions(cell) - before
            seen["free inside"] = free(cell, name)

    cell.run_async(main)
    assert seen["cancelled after"] < 0.5 + SLACK
    assert seen["left behind"] == set()
    assert seen["free inside"] is False
    if cell.backend in SERVER:
        holder = seen["holder"]
        assert holder["state"] in ("idle", "sleep")
        assert holder["no_transaction"]
        assert holder_session(cell, seen["key"]) is None
        assert gone(cell, holder["id"])
    assert free(cell, name)


def _server_sessions(cell: Cell) -> set[int]:
    """The ids of the client sessions on the server (but the asking one)."""
    if cell.backend == "sqlite":
        return set()
    with cell.sync_engine().connect() as conn:
        if cell.backend == "postgresql":
            sql = (
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND pid <> pg_backend_pid()"
            )
        else:
            sql = (
                "SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND <> 'Daemon'"
                " AND USER <> 'system user' AND ID <> CONNECTION_ID()"
            )
        return {int(r[0]) for r in conn.exec_driver_sql(sql)}


# -- options, misuse, re-entrance -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"timeout": -1}, ValueError, r"timeout=-1 must be a finite number"),
        ({"timeout": float("nan")}, ValueError, r"timeout=nan"),
        ({"timeout": float("inf")}, ValueError, r"timeout=inf"),
        ({"timeout": True}, TypeError, r"timeout=True must be a number"),
        ({"timeout": "10"}, TypeError, r"timeout='10' must be a number"),
        ({"name": ""}, ValueError, r"name='' must be a non-empty str"),
        ({"name": 7}, TypeError, r"name=7 must be a str"),
    ],
)
def test_options_are_checked_when_called(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as conn, pytest.raises(error, match=match):
        migration_lock(conn, **options)


def test_the_connection_is_checked_and_options_are_keyword_only() -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(TypeError, match=r"an Engine is not one"):
        migration_lock(engine)
    with pytest.raises(TypeError, match=r"must be a Connection"):
        migration_lock(None)
    with engine.connect() as conn:
        with pytest.raises(TypeError):
            migration_lock(conn, 10)  # type: ignore[misc]
        lock = migration_lock(conn, timeout=None)
        assert lock.timeout is None
        assert migration_lock(conn, timeout=5).timeout == 5.0
        with lock:
            pass
        with pytest.raises(RuntimeError, match="already entered"), lock:
            pass


@pytest.mark.cells("sqlite+aiosqlite", "postgresql+asyncpg", "mysql+aiomysql")
def test_with_and_async_with_are_not_mixed(cell: Cell) -> None:
    engine = cell.default_engine

    async def main() -> None:
        async with engine.connect() as conn:
            with pytest.raises(TypeError, match="use `async with`"), migration_lock(conn):
                pytest.fail("entered")

    cell.run_async(main)

    async def enter(conn: Connection) -> None:
        async with migration_lock(conn):
            pytest.fail("entered")

    with cell.sync_engine().connect() as conn, pytest.raises(TypeError, match="is not async"):
        asyncio.run(enter(conn))


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql", "postgresql+asyncpg")
def test_a_connection_in_a_transaction_is_refused(cell: Cell) -> None:
    name = unique()

    def body(conn: Connection) -> None:
        conn.execute(text("SELECT 1"))  # autobegins
        with pytest.raises(CallerTransactionError, match="already in a transaction"):  # noqa: SIM117
            with migration_lock(conn, name=name):
                pytest.fail("entered")

    cell.run(body)
    assert free(cell, name)


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql", "postgresql+asyncpg")
def test_reentrant_in_one_thread_not_across_threads(cell: Cell) -> None:
    name = unique()
    seen: dict[str, Any] = {}

    def body(conn: Connection) -> None:
        with migration_lock(conn, name=name) as outer:
            started = time.monotonic()
            with (
                cell.sync_engine().connect() as other,
                migration_lock(other, name=name, timeout=0) as inner,
            ):
                seen["inner"] = (inner.acquired, inner.reentered, time.monotonic() - started)
            seen["outer"] = (outer.acquired, outer.reentered)
            seen["other thread"] = free(cell, name)
            with migration_lock(conn, name=unique(), timeout=0) as different:
                seen["different"] = different.reentered
        seen["after"] = free(cell, name)

    cell.run(body)
    acquired, reentered, took = seen["inner"]
    assert (acquired, reentered) == (True, True)
    assert took < SLACK
    assert seen["outer"] == (True, False)  # the inner block's end did not give it back
    assert seen["other thread"] is False
    assert seen["different"] is False
    assert seen["after"] is True


@pytest.mark.cells("async")
def test_the_sync_form_inside_run_sync(cell: Cell) -> None:
    """``with migration_lock(connection)`` on the sync Connection that ``run_sync`` gives."""
    name = unique()
    seen: dict[str, Any] = {}

    def do_run_migrations(conn: Connection) -> None:
        with migration_lock(conn, name=name, timeout=5) as lock:
            seen["acquired"] = lock.acquired
            seen["free inside"] = free(cell, name)
            conn.execute(text("SELECT 1"))
            conn.commit()

    cell.run(do_run_migrations)
    assert seen == {"acquired": True, "free inside": False}
    assert free(cell, name)


@pytest.mark.parametrize("poolclass", [None, StaticPool])
def test_in_memory_sqlite(poolclass: Any) -> None:
    """No file: the lock is local to the process (threads migrating in-memory databases take
    turns); the one shared connection is neither closed nor rolled back by the lock."""
    engine = create_engine("sqlite://", **({"poolclass": poolclass} if poolclass else {}))
    name = unique()
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.commit()
        with migration_lock(conn, name=name) as lock:
            assert lock.acquired
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            other = create_engine("sqlite://")
            box: list[Any] = []

            def elsewhere() -> None:
                with (
                    other.connect() as c,
                    contextlib.suppress(MigrationLockTimeout),
                    migration_lock(c, name=name, timeout=0.2),
                ):
                    box.append("entered")
                box.append("done")

            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join(JOIN)
            assert box == ["done"]  # another thread waited and gave up
        assert conn.in_transaction()  # the caller's work is still there, uncommitted
        conn.commit()
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM t").scalar_one() == 1


# -- the DDL recipes of docs/migrations.md --------------------------------------------------


@pytest.mark.cells("postgresql+psycopg2", "mysql+pymysql")
@pytest.mark.parametrize("bounded", [True, False])
def test_a_bounded_alter_lets_the_application_through(cell: Cell, bounded: bool) -> None:
    """A transaction has read the table; the migration's ALTER waits for it; the application's
    next query on the table queues behind the ALTER. Bounded (1 s), the ALTER gives up and the
    application's query completes soon after; unbounded, it is still waiting 2 s later."""
    table = f"mig_ddl_{uuid.uuid4().hex[:8]}"
    engine = cell.sync_engine()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql(f"INSERT INTO {table} (id) VALUES (1)")
    reader = engine.connect()
    migration = engine.connect()
    app = engine.connect()
    try:
        reader.exec_driver_sql(f"SELECT * FROM {table}").all()  # a long transaction on it
        outcome: dict[str, Any] = {}

        def migrate() -> None:
            started = time.monotonic()
            try:
                if cell.backend == "postgresql":
                    with migration.begin():
                        if bounded:
                            with locksafe.lock_timeout(migration, 1):
                                migration.exec_driver_sql(
                                    f"ALTER TABLE {table} ADD COLUMN note TEXT"
                                )
                        else:
                            migration.exec_driver_sql(
                                "SET LOCAL lock_timeout = '8s'"
                            )  # the test's bound
                            migration.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN note TEXT")
                else:
                    wait = 1 if bounded else 8  # 8: the test's bound
                    migration.exec_driver_sql(f"SET SESSION lock_wait_timeout = {wait}")
                    migration.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN note TEXT")
            except DBAPIError as error:
                outcome["error"] = error
            outcome["alter"] = time.monotonic() - started

        def application() -> None:
            started = time.monotonic()
            app.exec_driver_sql(f"SELECT id FROM {table}").all()
            app.rollback()
            outcome["app"] = time.monotonic() - started

        alter = threading.Thread(target=migrate)
        alter.start()
        time.sleep(0.3)  # the ALTER is waiting
        query = threading.Thread(target=application)
        query.start()
        query.join(2.0)
        app_waiting_2s = query.is_alive()
        reader.rollback()  # the long transaction ends: everything goes on
        alter.join(JOIN)
        query.join(JOIN)
    finally:
        for conn in (reader, migration, app):
            conn.close()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
    print(
        f"\n[ddl bounded={bounded}] {cell.name:24} alter {outcome['alter']:.2f} s"
        f" app {outcome['app']:.2f} s"
    )
    if bounded:
        assert locksafe.is_retryable_lock_error(outcome["error"])
        assert 0.9 <= outcome["alter"] < 1.0 + SLACK
        assert not app_waiting_2s
        assert outcome["app"] < 1.0 + SLACK - 0.3
    else:
        assert app_waiting_2s  # frozen behind the ALTER
        assert "error" not in outcome  # the ALTER ran once the reader let go


@pytest.mark.cells("postgresql+psycopg2")
def test_the_docs_retry_loop_adds_the_column_once_the_table_is_free(cell: Cell) -> None:
    from alembic import op
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    table = f"mig_ddl_{uuid.uuid4().hex[:8]}"
    engine = cell.sync_engine()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)")
    namespace: dict[str, Any] = {}
    exec(docs_block("ddl-retry:"), namespace)  # defines it (and upgrade())
    with_lock_retries: Callable[..., None] = namespace["with_lock_retries"]
    reader = engine.connect()
    attempts: list[float] = []
    try:
        reader.exec_driver_sql(f"SELECT * FROM {table}").all()
        threading.Timer(1.5, reader.rollback).start()  # the long transaction ends after 1.5 s

        def ddl() -> None:
            attempts.append(time.monotonic())
            op.add_column(table, Column("note", Text()))

        started = time.monotonic()
        with engine.connect() as conn:
            with conn.begin(), Operations.context(MigrationContext.configure(conn)):
                with_lock_retries(ddl, wait=0.3, attempts=8, pause=0.2)
            took = time.monotonic() - started
            columns = [c["name"] for c in inspect(conn).get_columns(table)]
    finally:
        reader.close()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
    print(f"\n[ddl retries] {len(attempts)} attempts, {took:.2f} s")
    assert columns == ["id", "note"]
    assert len(attempts) >= 2  # the first attempts timed out and were retried
    assert 1.5 <= took < 1.5 + SLACK
