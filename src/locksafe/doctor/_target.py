"""The database ``locksafe doctor`` examines: its URL, how its engines are made, what the server
is, and the clear errors for a URL it cannot use.

Everything that depends on the dialect by name lives here (connect timeouts, the statements that
bound a doctor connection's waits, the settings worth reporting): the doctor is a diagnostic
tool, and a server's settings have different names on each server.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["DoctorError", "Target", "resolve_target"]


class DoctorError(Exception):
    """``locksafe doctor`` cannot examine this database: a bad URL, a driver that is not
    installed, a server it cannot reach, missing privileges. The message is one paragraph for
    people, naming what to do (the extra to install, the privilege to grant).

    >>> diagnose("sqlite:////no/such/directory/app.db")
    Traceback (most recent call last):
    ...
    locksafe.doctor.DoctorError: there is no SQLite database at /no/such/directory/app.db (from sqlite:////no/such/directory/app.db); locksafe doctor does not create one. Check the path (sqlite:///relative/app.db, sqlite:////absolute/app.db), or run without a URL to examine a temporary database.
    >>> diagnose("mysql+nosuchdriver://db.example.com/app")
    Traceback (most recent call last):
    ...
    locksafe.doctor.DoctorError: SQLAlchemy has no driver 'nosuchdriver' for mysql (...). Drivers locksafe supports: mysql+aiomysql, mysql+asyncmy, mysql+mariadbconnector, mysql+mysqlconnector, mysql+mysqldb, mysql+pymysql.
    """  # noqa: E501


DoctorError.__module__ = "locksafe.doctor"  # where it is documented and imported from

#: Set on the TypeError / ValueError of an option that was checked (the command line reports
#: those as errors of its own options, and lets any other go up as the bug it is).
OPTION_ERROR = "_locksafe_doctor_option"


def option_error(cls: type[Exception], message: str) -> Exception:
    """A ``TypeError`` / ``ValueError`` for a bad option of :func:`locksafe.doctor.diagnose`."""
    error = cls(message)
    setattr(error, OPTION_ERROR, True)
    return error


#: SQLAlchemy driver name -> the ``sqlalchemy-locksafe`` extra that installs it.
EXTRAS: dict[str, str] = {
    "psycopg2": "postgresql",
    "psycopg": "postgresql",
    "psycopg_async": "postgresql",
    "asyncpg": "postgresql",
    "pg8000": "postgresql",
    "pymysql": "mysql",
    "mysqldb": "mysql",
    "mysqlconnector": "mysql",
    "aiomysql": "mysql",
    "asyncmy": "mysql",
    "mariadbconnector": "mariadb",
    "aiosqlite": "aiosqlite",
    "pysqlite": "",
}

#: SQLAlchemy driver name -> the distribution whose version the report shows.
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "psycopg2": ("psycopg2-binary", "psycopg2"),
    "psycopg": ("psycopg",),
    "psycopg_async": ("psycopg",),
    "asyncpg": ("asyncpg",),
    "pg8000": ("pg8000",),
    "pymysql": ("PyMySQL",),
    "mysqldb": ("mysqlclient",),
    "mysqlconnector": ("mysql-connector-python",),
    "aiomysql": ("aiomysql",),
    "asyncmy": ("asyncmy",),
    "mariadbconnector": ("mariadb",),
    "aiosqlite": ("aiosqlite",),
}

#: Driver -> (its connect-timeout argument, seconds). pg8000's ``timeout`` and
#: mysql-connector's ``connection_timeout`` also bound every later socket read, so they get
#: more than any probe waits.
CONNECT_TIMEOUTS: dict[str, tuple[str, float]] = {
    "psycopg2": ("connect_timeout", 10),
    "psycopg": ("connect_timeout", 10),
    "psycopg_async": ("connect_timeout", 10),
    "asyncpg": ("timeout", 10),
    "pg8000": ("timeout", 60),
    "pymysql": ("connect_timeout", 10),
    "mysqldb": ("connect_timeout", 10),
    "mysqlconnector": ("connection_timeout", 60),
    "aiomysql": ("connect_timeout", 10),
    "asyncmy": ("connect_timeout", 10),
    "mariadbconnector": ("connect_timeout", 10),
}

#: The backends the doctor examines (SQLAlchemy dialect names).
BACKENDS = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql", "sqlite": "sqlite"}

#: Seconds a doctor connection waits for any lock it was not told to wait for otherwise: every
#: statement a probe does not bound itself ends by then (and DDL waits no longer either).
SESSION_LOCK_WAIT = 10

#: Seconds a doctor connection on PostgreSQL may stay idle in a transaction before the server
#: ends it: even a doctor killed with SIGKILL while holding a lock gives it up by then.
IDLE_IN_TRANSACTION = 60


def _install(extra: str) -> str:
    return f"pip install 'sqlalchemy-locksafe[{extra}]'" if extra else "pip install sqlalchemy"


def _first_line(exc: BaseException) -> str:
    """The driver's message, first line, without SQLAlchemy's trailer."""
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    text = str(source).strip() or type(source).__name__
    line = text.splitlines()[0].strip()
    return re.sub(r"\s*\(Background on this error at: [^)]*\)\s*$", "", line)


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for a report line: the driver's exception class and first line."""
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    return f"{type(source).__name__}: {_first_line(exc)}"


@dataclass
class Target:
    """The database under examination and how to make engines for it."""

    url: URL
    #: ``"postgresql"``, ``"mysql"`` (MySQL and MariaDB) or ``"sqlite"``.
    backend: str
    is_async: bool
    #: No URL was given: an embedded SQLite database in a temporary directory.
    embedded: bool
    #: SQLite: engines are set up by :func:`locksafe.sqlite.configure`.
    sqlite_configure: bool
    #: MySQL / MariaDB: the storage engine of the scratch table (``None``: the server's
    #: default).
    mysql_engine: str | None
    #: The SQLite database file (SQLite only; ``None`` for others).
    sqlite_path: str | None = None

    @property
    def driver(self) -> str:
        return self.url.get_driver_name()

    @property
    def display_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @property
    def extra(self) -> str:
        return EXTRAS.get(self.driver, "")

    def driver_package(self) -> tuple[str | None, str | None]:
        """The installed package behind the driver and its version: ``("psycopg", "3.2.1")``;
        pysqlite is Python's own ``sqlite3`` (the Python version); ``(None, None)`` if unknown."""
        if self.driver == "pysqlite":
            return "sqlite3", ".".join(map(str, sys.version_info[:3]))
        for dist in DISTRIBUTIONS.get(self.driver, ()):
            try:
                return dist, importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None, None

    def driver_description(self) -> str:
        """``psycopg (psycopg 3.2.1, sync)``: the driver, its package and version, and mode."""
        mode = "async" if self.is_async else "sync"
        if self.driver == "pysqlite":
            return f"pysqlite (Python's sqlite3, SQLite {sqlite3.sqlite_version}, {mode})"
        package, version = self.driver_package()
        if package is None:
            return f"{self.driver} ({mode})"
        return f"{self.driver} ({package} {version}, {mode})"

    # -- engines ------------------------------------------------------------------------------

    def _connect_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        timeout = CONNECT_TIMEOUTS.get(self.driver)
        if timeout is not None and timeout[0] not in self.url.query:
            args[timeout[0]] = timeout[1]
        return args

    def make_engine(self, *, bounded: bool = True) -> Engine | AsyncEngine:
        """A new engine (an AsyncEngine for an async driver) with no pool: each doctor
        connection is its own. ``bounded``: every connection it makes waits at most
        :data:`SESSION_LOCK_WAIT` seconds for a lock (PostgreSQL: and is ended by the server
        after :data:`IDLE_IN_TRANSACTION` seconds idle in a transaction)."""
        kwargs: dict[str, Any] = {"poolclass": NullPool, "connect_args": self._connect_args()}
        engine: Engine | AsyncEngine
        if self.is_async:
            from sqlalchemy.ext.asyncio import create_async_engine

            engine = create_async_engine(self.url, **kwargs)
            sync_engine = engine.sync_engine
        else:
            engine = sync_engine = create_engine(self.url, **kwargs)
        if bounded:
            statements = bounding_statements(self.backend)
            if statements:
                event.listen(sync_engine, "connect", _run_on_connect(statements))
            elif self.backend == "sqlite" and not self.sqlite_configure:
                event.listen(sync_engine, "connect", _cap_busy_timeout)
        if self.backend == "sqlite" and self.sqlite_configure:
            import locksafe.sqlite

            # The embedded database gets configure()'s set-up as locksafe recommends it; a
            # user's database keeps its journal mode (it is persistent: doctor changes nothing
            # that outlives it), and WAL is reported as advice instead.
            locksafe.sqlite.configure(
                engine,
                busy_timeout=SESSION_LOCK_WAIT,
                journal_mode="wal" if self.embedded else None,
            )
        return engine


def bounding_statements(backend: str) -> list[tuple[str, bool]]:
    """What a doctor connection runs first, so that nothing it does can wait or hold a lock
    without a bound (SQLite: its busy timeout, set by the driver or by configure()): (SQL,
    whether the server may not know it)."""
    if backend == "postgresql":
        return [
            (f"SET lock_timeout = '{SESSION_LOCK_WAIT}s'", False),
            # PostgreSQL >= 9.6
            (f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION}s'", True),
        ]
    if backend == "mysql":
        return [
            (f"SET SESSION innodb_lock_wait_timeout = {SESSION_LOCK_WAIT}", False),
            # metadata locks (CREATE / DROP TABLE behind another connection's transaction)
            (f"SET SESSION lock_wait_timeout = {SESSION_LOCK_WAIT}", False),
        ]
    return []


def _run_on_connect(statements: list[tuple[str, bool]]) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        for statement, optional in statements:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(statement)
            except Exception:
                if not optional:
                    raise
                dbapi_connection.rollback()
                continue
            finally:
                cursor.close()
            # PostgreSQL's SET is transactional: commit it, or the next rollback undoes it.
            dbapi_connection.commit()

    return on_connect


def _cap_busy_timeout(dbapi_connection: Any, record: Any) -> None:
    """SQLite as the URL opens it: a busy timeout above :data:`SESSION_LOCK_WAIT` seconds
    (``?timeout=3600``) is lowered to it for the doctor's connections."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout")
        row = cursor.fetchone()
        if row is not None and int(row[0]) > SESSION_LOCK_WAIT * 1000:
            cursor.execute(f"PRAGMA busy_timeout = {SESSION_LOCK_WAIT * 1000:d}")
    finally:
        cursor.close()


# -- resolving the URL --------------------------------------------------------------------------


def _driver_missing(url: URL, exc: BaseException) -> DoctorError:
    driver = url.get_driver_name()
    extra = EXTRAS.get(driver, "")
    return DoctorError(
        f"the driver for {url.drivername} is not installed ({_first_line(exc)}). Install it "
        f"with {_install(extra)}"
        + (f" (the [{extra}] extra has every driver locksafe supports for it)" if extra else "")
        + ", or give a URL with a driver you have, e.g. "
        + {
            "postgresql": "postgresql+psycopg://user:password@host/db",
            "mysql": "mysql+pymysql://user:password@host/db",
            "mariadb": "mariadb+mariadbconnector://user:password@host/db",
            "sqlite": "sqlite:///path/to/app.db",
        }.get(url.get_backend_name(), "dialect+driver://user:password@host/db")
        + "."
    )


def resolve_target(
    url: str | URL | None,
    *,
    sqlite_configure: bool | None,
    mysql_engine: str | None,
    directory: str | None = None,
) -> Target:
    """Check ``url`` and its driver without connecting: a :class:`Target`, or a
    :class:`DoctorError` saying what is wrong. ``directory`` holds the embedded database when
    ``url`` is ``None``."""
    embedded = url is None
    if url is None:
        assert directory is not None
        path = os.path.join(directory, "doctor.db")
        parsed = make_url(f"sqlite+pysqlite:///{path}")
    else:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise DoctorError(
                f"{url!r} is not a database URL ({_first_line(exc)}). A URL looks like "
                "dialect+driver://user:password@host:port/database, e.g. "
                "postgresql+psycopg://app:secret@db.example.com/app, "
                "mysql+pymysql://app:secret@127.0.0.1/app or sqlite:///path/to/app.db; "
                "run without a URL to examine an embedded SQLite database."
            ) from None
    backend_name = parsed.get_backend_name()
    backend = BACKENDS.get(backend_name)
    if backend is None:
        raise DoctorError(
            f"locksafe doctor examines PostgreSQL, MySQL, MariaDB and SQLite databases; "
            f"{backend_name!r} (from {parsed.render_as_string(hide_password=True)}) is not one "
            "of them."
        )
    try:
        dialect_cls = parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise DoctorError(
            f"SQLAlchemy has no driver {parsed.get_driver_name()!r} for {backend_name} "
            f"({_first_line(exc)}). Drivers locksafe supports: "
            + ", ".join(
                sorted(
                    f"{backend_name}+{driver}"
                    for driver, extra in EXTRAS.items()
                    if extra.startswith(backend)
                    or (backend == "sqlite" and driver in ("pysqlite", "aiosqlite"))
                    or (backend == "mysql" and extra == "mariadb")
                )
            )
            + "."
        ) from None
    try:
        dialect_cls.import_dbapi()
    except ImportError as exc:
        raise _driver_missing(parsed, exc) from None
    is_async = bool(getattr(dialect_cls, "is_async", False))
    if is_async and not _importable("greenlet"):
        extra = EXTRAS.get(parsed.get_driver_name(), "")
        raise DoctorError(
            f"{parsed.drivername} is an asyncio driver, and SQLAlchemy needs the greenlet "
            f"package to use one, which is not installed. Install it with {_install(extra)} "
            "(the extras of asyncio drivers include SQLAlchemy[asyncio]), or use a sync driver."
        )
    sqlite_path: str | None = None
    if backend == "sqlite":
        sqlite_path = _sqlite_file(parsed, embedded=embedded)
    if mysql_engine is not None and backend != "mysql":
        raise option_error(
            ValueError,
            f"mysql_engine={mysql_engine!r} applies to MySQL and MariaDB only, not to "
            f"{backend_name}",
        )
    return Target(
        url=parsed,
        backend=backend,
        is_async=is_async,
        embedded=embedded,
        sqlite_configure=embedded if sqlite_configure is None else sqlite_configure,
        mysql_engine=mysql_engine,
        sqlite_path=sqlite_path,
    )


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _sqlite_file(url: URL, *, embedded: bool) -> str:
    """The database file of a SQLite URL; refuses what several connections cannot share."""
    database = url.database or ""
    query = {key: str(value) for key, value in url.query.items()}
    uri = query.get("uri", "").lower() in ("true", "1")
    shown = url.render_as_string(hide_password=True)
    if uri and database.startswith("file:"):
        path, _, options = database[len("file:") :].partition("?")
        memory = "mode=memory" in options or query.get("mode", "").lower() == "memory"
        database = ":memory:" if memory else path
    if database in ("", ":memory:"):
        raise DoctorError(
            f"{shown} is an in-memory SQLite database: each connection gets its own, so two "
            "connections cannot contend for a lock there and the probes would prove nothing. "
            "Give the URL of your database file (sqlite:///path/to/app.db), or run without a "
            "URL to examine a temporary one."
        )
    if not embedded and not os.path.exists(database):
        raise DoctorError(
            f"there is no SQLite database at {os.path.abspath(database)} (from {shown}); "
            "locksafe doctor does not create one. Check the path (sqlite:///relative/app.db, "
            "sqlite:////absolute/app.db), or run without a URL to examine a temporary database."
        )
    return os.path.abspath(database)


def connect_error(target: Target, exc: BaseException) -> DoctorError:
    """The clear error for a connection that could not be made."""
    url = target.url
    where = url.render_as_string(hide_password=True)
    if isinstance(exc, ImportError):
        return _driver_missing(url, exc)
    if target.backend == "sqlite":
        return DoctorError(
            f"cannot open the SQLite database {target.sqlite_path} ({describe_error(exc)}). "
            "Check that the file is a SQLite database and that this user may read and write it "
            "and create files in its directory (SQLite's journal, WAL and lock files)."
        )
    server = f"{url.host or 'localhost'}" + (f":{url.port}" if url.port else "")
    return DoctorError(
        f"cannot connect to {where}: {describe_error(exc)}. Check that the server at "
        f"{server} is running and reachable from this machine, and the user name, password and "
        f"database name{' (' + url.database + ')' if url.database else ''}."
    )


def setup_error(target: Target, table: str, exc: BaseException) -> DoctorError:
    """The clear error for a scratch table that could not be created or filled."""
    where = target.url.database or target.sqlite_path or "this database"
    if target.backend == "sqlite":
        need = "write access to the database file and its directory"
    elif target.backend == "postgresql":
        need = "the CREATE privilege on the first schema of its search_path"
    else:
        need = "the CREATE, INSERT, UPDATE and DROP privileges in the database"
    return DoctorError(
        f"connected, but cannot create and fill the scratch table {table} in {where} "
        f"({describe_error(exc)}). locksafe doctor works only in one table of its own, "
        f"created with a unique name and dropped at the end, and needs {need} (a read-only "
        "server or replica cannot be examined). Run it as a user that may create tables, "
        "or against a copy of the database."
    )


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
