"""The driver cells and the servers they talk to.

A test that takes the ``cell`` fixture (``tests/conftest.py``) runs once per driver cell of
:data:`CELLS` (restrict with ``@pytest.mark.cells(...)``, naming cells or backends). Sync and
async cells are written the same way: ``cell.run(fn)`` runs ``fn(connection)`` and
``cell.run_session(fn)`` runs ``fn(session)`` on the cell's own driver — through ``run_sync`` on
the async cells, in an event loop owned by the calling thread, so worker threads in concurrency
tests can call them too.

Servers: PostgreSQL and MariaDB start once per run on free loopback ports
(:mod:`harness.servers`) unless ``LOCKSAFE_TEST_POSTGRESQL_URL`` / ``LOCKSAFE_TEST_MYSQL_URL``
point at existing ones. Under ``CI=true`` a server or driver that cannot be had fails the test;
elsewhere it skips (:func:`unavailable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import URL, MetaData, create_engine, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from locksafe.testing import OtherConnection

T = TypeVar("T")

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class CellSpec:
    name: str
    backend: str  # "sqlite" | "postgresql" | "mariadb" (the server the cell talks to)
    module: str  # the driver module that must import
    is_async: bool


CELLS: tuple[CellSpec, ...] = (
    CellSpec("sqlite+pysqlite", "sqlite", "sqlite3", False),
    CellSpec("sqlite+aiosqlite", "sqlite", "aiosqlite", True),
    CellSpec("postgresql+psycopg2", "postgresql", "psycopg2", False),
    CellSpec("postgresql+psycopg", "postgresql", "psycopg", False),
    CellSpec("postgresql+psycopg_async", "postgresql", "psycopg", True),
    CellSpec("postgresql+asyncpg", "postgresql", "asyncpg", True),
    CellSpec("postgresql+pg8000", "postgresql", "pg8000", False),
    CellSpec("mysql+pymysql", "mariadb", "pymysql", False),
    CellSpec("mysql+mysqldb", "mariadb", "MySQLdb", False),
    CellSpec("mysql+mysqlconnector", "mariadb", "mysql.connector", False),
    CellSpec("mysql+aiomysql", "mariadb", "aiomysql", True),
    CellSpec("mysql+asyncmy", "mariadb", "asyncmy", True),
    CellSpec("mariadb+mariadbconnector", "mariadb", "mariadb", False),
)
BY_NAME = {spec.name: spec for spec in CELLS}

#: The sync driver used for set-up and tear-down on each backend.
ADMIN_DRIVER = {"postgresql": "postgresql+psycopg2", "mariadb": "mysql+pymysql"}


def unavailable(reason: str) -> None:
    """Skip outside CI, fail under CI: a missing server or driver must not pass silently."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def select_cells(marker: pytest.Mark | None) -> list[CellSpec]:
    """The cells a test runs on: all of them, or those ``@pytest.mark.cells(...)`` names
    (cell names, backends, ``"async"``, ``"sync"``)."""
    if marker is None:
        return list(CELLS)
    wanted = set(marker.args)
    unknown = wanted - set(BY_NAME) - {spec.backend for spec in CELLS} - {"async", "sync"}
    if unknown:
        raise ValueError(f"unknown cells in @pytest.mark.cells: {sorted(unknown)}")
    return [
        spec
        for spec in CELLS
        if spec.name in wanted
        or spec.backend in wanted
        or ("async" in wanted and spec.is_async)
        or ("sync" in wanted and not spec.is_async)
    ]


# -- servers ---------------------------------------------------------------------------------


class Servers:
    """Starts each server at most once per run, when a test first needs it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._urls: dict[str, URL] = {}
        self._errors: dict[str, str] = {}
        self._started: list[Any] = []
        self._admin_args: dict[str, dict[str, Any]] = {}

    def url(self, backend: str) -> URL:
        with self._lock:
            if backend in self._urls:
                return self._urls[backend]
            if backend in self._errors:
                unavailable(self._errors[backend])
            try:
                url = self._start(backend)
            except Exception as exc:  # the reason goes into the skip/fail message
                self._errors[backend] = f"{backend} server unavailable: {exc}"
                unavailable(self._errors[backend])
                raise
            self._admin_args[backend] = self._admin_args_for(backend, url)
            self._urls[backend] = url
            return url

    def admin_connect_args(self, backend: str) -> dict[str, Any]:
        """``connect_args`` for the admin driver's connections to ``backend``'s server (the
        harness's set-up, tear-down and checks): see :meth:`_admin_args_for`."""
        self.url(backend)
        return dict(self._admin_args[backend])

    @staticmethod
    def _admin_args_for(backend: str, url: URL) -> dict[str, Any]:
        """PyMySQL (MariaDB's admin driver) tries TLS on every connect unless told not to (its
        default "preferred" mode) and builds a new ``SSLContext`` from the system's CA bundle
        each time: about 23 ms of CPU per connection with OpenSSL 3, paid several times in the
        set-up and tear-down of every MariaDB test. On a server without TLS (the harness's
        own) the attempt can only end in the plain connection it then makes, so the admin
        connections skip it (``ssl_disabled``); a server with TLS keeps the default. The
        cells' own connections are left as their drivers make them."""
        if backend != "mariadb":
            return {}
        engine = create_engine(url.set(drivername=ADMIN_DRIVER[backend]), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                have_ssl = conn.exec_driver_sql("SELECT @@have_ssl").scalar_one()
        finally:
            engine.dispose()
        return {} if have_ssl == "YES" else {"ssl_disabled": True}

    def _start(self, backend: str) -> URL:
        env = {
            "postgresql": "LOCKSAFE_TEST_POSTGRESQL_URL",
            "mariadb": "LOCKSAFE_TEST_MYSQL_URL",
        }[backend]
        if os.environ.get(env):
            return make_url(os.environ[env])
        from harness import servers

        server = servers.start_postgresql() if backend == "postgresql" else servers.start_mariadb()
        self._started.append(server)
        url = make_url(server.url)
        self._tune(backend, url)
        return url

    @staticmethod
    def _tune(backend: str, url: URL) -> None:
        """Server-wide bounds so that no test can wait forever on a forgotten lock."""
        engine = create_engine(url.set(drivername=ADMIN_DRIVER[backend]), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                if backend == "postgresql":
                    conn.exec_driver_sql(
                        f"ALTER DATABASE {url.database} SET lock_timeout = '30s'"
                    )
                else:
                    conn.exec_driver_sql("SET GLOBAL innodb_lock_wait_timeout = 30")
                    conn.exec_driver_sql("SET GLOBAL lock_wait_timeout = 30")
                conn.commit()
        finally:
            engine.dispose()

    def stop(self) -> None:
        while self._started:
            self._started.pop().stop()


# -- cells -----------------------------------------------------------------------------------


class Cell:
    """One driver cell for one test: URL, engines, and one way to run sync or async code."""

    def __init__(
        self,
        spec: CellSpec,
        url: URL,
        admin_url: URL,
        admin_connect_args: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.backend = spec.backend
        self.is_async = spec.is_async
        self.url = url
        self.admin_url = admin_url
        #: ``connect_args`` of the harness's own admin-driver connections (not the tests').
        self.admin_connect_args = dict(admin_connect_args or {})
        self._engines: list[Engine | AsyncEngine] = []
        self._loops: list[asyncio.AbstractEventLoop] = []
        self._local = threading.local()
        self._tables: list[MetaData] = []
        self._loops_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Cell {self.name}>"

    @property
    def driver(self) -> str:
        return self.url.get_driver_name()

    @property
    def dialect_name(self) -> str:
        return self.url.get_backend_name()

    # engines

    def engine(self, **kw: Any) -> Any:
        """An engine of this cell's driver (AsyncEngine on async cells); no pool by default,
        so that connections never cross event loops or threads."""
        kw.setdefault("poolclass", NullPool)
        if self.backend == "sqlite":
            kw.setdefault("connect_args", {}).setdefault("timeout", 5)
        engine: Engine | AsyncEngine
        engine = create_async_engine(self.url, **kw) if self.is_async else create_engine(
            self.url, **kw
        )
        self._engines.append(engine)
        return engine

    def warm_up(self, engine: Any) -> Any:
        """Connect once, in this thread, before threads share ``engine``.

        SQLAlchemy runs an engine's first ``connect`` under a mutex that, for an AsyncEngine,
        is an asyncio lock bound to the first event loop: two threads (two loops) connecting
        for the first time at once can wait on it forever. Call this after adding ``connect``
        listeners and before handing an async engine to several threads.
        """
        if isinstance(engine, AsyncEngine):

            async def touch() -> None:
                async with engine.connect():
                    pass

            self.run_async(touch)
        else:
            with engine.connect():
                pass
        return engine

    def sync_engine(self, **kw: Any) -> Engine:
        """A sync engine on the same database (for set-up, checks and holders)."""
        kw.setdefault("poolclass", NullPool)
        if self.backend == "sqlite":
            kw.setdefault("connect_args", {}).setdefault("timeout", 5)
        if self.admin_connect_args:
            kw["connect_args"] = {**self.admin_connect_args, **kw.get("connect_args", {})}
        engine = create_engine(self.admin_url, **kw)
        self._engines.append(engine)
        return engine

    # running code on the cell's driver

    def loop(self) -> asyncio.AbstractEventLoop:
        """This thread's event loop for this cell (created on first use, closed at the end)."""
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None:
            loop = asyncio.new_event_loop()
            self._local.loop = loop
            with self._loops_lock:
                self._loops.append(loop)
        return loop

    def run_async(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` in this thread's event loop."""
        return self.loop().run_until_complete(fn(*args))

    def run(self, fn: Callable[..., T], *args: Any, engine: Any = None) -> T:
        """``fn(connection, *args)`` on a new connection of this cell's driver."""
        engine = engine if engine is not None else self.default_engine

        if not self.is_async:
            with engine.connect() as conn:
                return fn(conn, *args)

        async def main() -> T:
            async with engine.connect() as aconn:
                return await aconn.run_sync(fn, *args)  # type: ignore[no-any-return]

        return self.run_async(main)

    def run_session(self, fn: Callable[..., T], *args: Any, engine: Any = None, **kw: Any) -> T:
        """``fn(session, *args)`` in a new (Async)Session of this cell's driver."""
        engine = engine if engine is not None else self.default_engine
        if not self.is_async:
            with Session(engine, **kw) as session:
                return fn(session, *args)

        async def main() -> T:
            async with AsyncSession(engine, **kw) as session:
                return await session.run_sync(fn, *args)

        return self.run_async(main)

    @property
    def default_engine(self) -> Any:
        engine = getattr(self, "_default_engine", None)
        if engine is None:
            engine = self._default_engine = self.warm_up(self.engine())
        return engine

    def other(self, **kw: Any) -> OtherConnection:
        """A second connection of this cell's driver (see :mod:`locksafe.testing`)."""
        kw.setdefault("lock_timeout", 10.0)
        kw.setdefault("hold_timeout", 60.0)
        return OtherConnection(self.url, **kw)

    # schema

    def create_all(self, metadata: MetaData) -> None:
        """Create ``metadata``'s tables (dropping leftovers first); dropped after the test."""
        engine = self.sync_engine()
        with engine.begin() as conn:
            bound_waits(conn, self.backend)
            metadata.drop_all(conn)
            metadata.create_all(conn)
        self._tables.append(metadata)

    def close(self) -> None:
        errors: list[BaseException] = []
        if self._tables:
            engine = create_engine(
                self.admin_url, poolclass=NullPool, connect_args=dict(self.admin_connect_args)
            )
            try:
                with engine.begin() as conn:
                    bound_waits(conn, self.backend)
                    for metadata in reversed(self._tables):
                        metadata.drop_all(conn)
            except Exception as exc:
                errors.append(exc)
            finally:
                engine.dispose()
        loop = asyncio.new_event_loop()
        try:
            for engine in self._engines:
                if isinstance(engine, AsyncEngine):
                    loop.run_until_complete(engine.dispose())
                else:
                    engine.dispose()
        finally:
            loop.close()
        for old in self._loops:
            with contextlib.suppress(Exception):
                if not old.is_closed():
                    old.close()
        if errors:
            raise errors[0]


def bound_waits(conn: Connection, backend: str) -> None:
    """Bound this connection's lock waits (set-up and tear-down never wait forever)."""
    if backend == "postgresql":
        conn.execute(text("SET lock_timeout = '20s'"))
    elif backend == "mariadb":
        conn.execute(text("SET SESSION lock_wait_timeout = 20"))


def make_cell(spec: CellSpec, servers: Servers, tmp_path: Path) -> Cell:
    """The cell ``spec`` for one test: its driver imported, its server started (SQLite: a file
    in ``tmp_path``); a missing driver or server is :func:`unavailable`."""
    try:
        importlib.import_module(spec.module)
    except ImportError as exc:
        unavailable(f"driver {spec.module} for {spec.name} cannot be imported: {exc}")
    if spec.backend == "sqlite":
        path = tmp_path / "locksafe.sqlite"
        url = make_url(f"{spec.name}:///{path}")
        admin = make_url(f"sqlite+pysqlite:///{path}")
    else:
        base = servers.url(spec.backend)
        url = base.set(drivername=spec.name)
        admin = base.set(drivername=ADMIN_DRIVER[spec.backend])
        return Cell(spec, url, admin, servers.admin_connect_args(spec.backend))
    return Cell(spec, url, admin)
