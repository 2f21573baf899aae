"""locksafe.starlette: lock failures that escape a route become 503 + Retry-After."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Column, Integer, MetaData, Table, insert, select
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import locksafe
from harness.cells import Cell
from locksafe import LockErrorKind, LockUnavailable
from locksafe.classify import RETRYABLE_KINDS
from locksafe.starlette import BODY, install_lock_error_handlers, lock_error_response
from locksafe.testing import hold_row_lock

with warnings.catch_warnings():
    # The test extra gives Python 3.10 httpx (httpx2 needs 3.11), which Starlette's TestClient
    # deprecates: a warning in every compatibility run, about the environment, not locksafe.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

metadata = MetaData()
rows = Table("http_rows", metadata, Column("id", Integer, primary_key=True, autoincrement=False))


def build(
    cell: Cell,
    framework: str,
    *,
    previous: Any = None,
    previous_for: type = DBAPIError,
    order: str = "before",
    release: Callable[[], object] = lambda: None,
) -> TestClient:
    """The app; ``previous`` is its own handler for ``previous_for``, registered ``order``
    ("before" or "after") install_lock_error_handlers; ``release`` ends the lock holder's
    transaction."""
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(rows).values(id=1))
    engine = cell.sync_engine()

    def gave_up(request: Request) -> PlainTextResponse:
        error = LockUnavailable(
            LockErrorKind.DEADLOCK, attempts=3, elapsed=0.5, retry_after=2.2, operation="x"
        )
        raise error from RuntimeError("SELECT secret FROM t")

    def nowait(request: Request) -> PlainTextResponse:
        with Session(engine) as session:
            stmt = locksafe.with_row_locks(select(rows), session, nowait=True)
            session.execute(stmt).all()
        return PlainTextResponse("locked")

    def duplicate(request: Request) -> PlainTextResponse:
        with Session(engine) as session:
            session.execute(insert(rows).values(id=1))
        return PlainTextResponse("inserted")

    def duplicate_while_handling(request: Request) -> PlainTextResponse:
        """A real lock error, handled by a fallback write that is a duplicate: the
        IntegrityError is the route's failure (the lock error is only its __context__)."""
        try:
            nowait(request)
        except DBAPIError:
            release()  # the other writer is done: the duplicate fails at once
            duplicate(request)
        return PlainTextResponse("done")

    routes = {
        "/gave-up": gave_up,
        "/nowait": nowait,
        "/duplicate": duplicate,
        "/duplicate-while-handling": duplicate_while_handling,
    }
    app: Starlette
    if framework == "fastapi":
        app = FastAPI()
        for path, endpoint in routes.items():
            app.add_route(path, endpoint)
    else:
        app = Starlette(routes=[Route(path, endpoint) for path, endpoint in routes.items()])
    if previous is not None and order == "before":
        app.add_exception_handler(previous_for, previous)
    install_lock_error_handlers(app, retry_after=4)
    if previous is not None and order == "after":
        app.add_exception_handler(previous_for, previous)
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_lock_failures_become_503(
    cell: Cell, framework: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = build(cell, framework)
    with caplog.at_level(logging.WARNING, logger="locksafe.starlette"):
        answer = client.get("/gave-up")
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "3"  # 2.2 s, rounded up to whole seconds
        assert answer.json() == BODY

        with hold_row_lock(cell.url, select(rows)):
            answer = client.get("/nowait")
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "4"
        assert answer.json() == BODY
        assert "SELECT" not in answer.text
        assert "http_rows" not in answer.text
    assert any("http_rows" in (r.exc_text or "") for r in caplog.records), "details not logged"

    assert client.get("/nowait").text == "locked"
    answer = client.get("/duplicate")
    assert answer.status_code == 500  # not a lock error: the usual 500


@pytest.mark.cells("sqlite+pysqlite")
def test_an_existing_database_error_handler_still_gets_other_errors(cell: Cell) -> None:
    def previous(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"handled": type(exc).__name__}, status_code=422)

    client = build(cell, "starlette", previous=previous)
    assert client.get("/duplicate").json() == {"handled": "IntegrityError"}
    with hold_row_lock(cell.url, select(rows)):
        assert client.get("/nowait").status_code == 503


def test_every_driver_names_its_root_exception_classes() -> None:
    """Each DriverErrors row names classes that exist (the driver imported here, as the test
    does and the library never does), and a lock error the driver raises is one of them."""
    import importlib

    from locksafe.dialects import all_supports

    without: list[str] = []
    for support in all_supports():
        for driver in support.errors.drivers:
            if not driver.exception_classes:
                without.append(driver.name)
            for spec in driver.exception_classes:
                module_name, _, qualname = spec.partition(":")
                module = importlib.import_module(module_name)
                obj: Any = module
                for part in qualname.split("."):
                    obj = getattr(obj, part)
                assert isinstance(obj, type), spec
                assert issubclass(obj, Exception), spec
                assert obj in driver.imported_exception_classes(), spec
                # the class belongs to this driver (aiomysql raises PyMySQL's classes)
                prefixes = (*driver.modules, "pymysql")
                assert any(cls.__module__.startswith(prefixes) for cls in obj.__mro__), spec
    # SQLAlchemy's MySQL async adapters re-raise the driver's own classes: nothing of their own
    assert without == ["SQLAlchemy MySQL async adapter"]


# -- raw driver exceptions ------------------------------------------------------------------

SYNC_CELLS = (
    "sqlite+pysqlite",
    "postgresql+psycopg2",
    "postgresql+psycopg",
    "postgresql+pg8000",
    "mysql+pymysql",
    "mysql+mysqldb",
    "mysql+mysqlconnector",
    "mariadb+mariadbconnector",
)


def raw_client(cell: Cell, *, previous: Any = None) -> tuple[TestClient, type[Exception]]:
    """Routes that use the cell's driver directly (``engine.raw_connection()``): its own
    exceptions escape, not SQLAlchemy's. Returns the client and the driver's root class."""
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(rows).values(id=1))
    connect_args = {"timeout": 0} if cell.backend == "sqlite" else {}
    engine = cell.engine(connect_args=connect_args)  # imports the driver, as an app's would
    lock_sql = (
        "BEGIN IMMEDIATE"
        if cell.backend == "sqlite"
        else "SELECT id FROM http_rows FOR UPDATE NOWAIT"
    )

    def raw(sql: str) -> PlainTextResponse:
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute(sql)
        finally:
            connection.close()
        return PlainTextResponse("done")

    routes = [
        Route("/raw-lock", lambda request: raw(lock_sql)),
        Route("/raw-duplicate", lambda request: raw("INSERT INTO http_rows (id) VALUES (1)")),
    ]
    app = Starlette(routes=routes)
    root: type[Exception] = engine.dialect.loaded_dbapi.Error  # PEP 249: the driver's root
    if previous is not None:
        app.add_exception_handler(root, previous)
    install_lock_error_handlers(app, retry_after=4)
    return TestClient(app, raise_server_exceptions=False), root


@pytest.mark.cells(*SYNC_CELLS)
def test_raw_driver_lock_errors_become_503(cell: Cell, caplog: pytest.LogCaptureFixture) -> None:
    client, root = raw_client(cell)
    with (
        caplog.at_level(logging.WARNING, logger="locksafe.starlette"),
        hold_row_lock(cell.url, select(rows)),
    ):
        answer = client.get("/raw-lock")
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "4"
    assert answer.json() == BODY
    [record] = [r for r in caplog.records if r.name == "locksafe.starlette"]
    assert record.exc_info is not None
    raw_error = record.exc_info[1]
    assert isinstance(raw_error, root), "not the driver's own exception"
    assert not isinstance(raw_error, DBAPIError)

    assert client.get("/raw-lock").text == "done"  # not locked: the route works
    assert client.get("/raw-duplicate").status_code == 500  # not a lock error: the usual 500


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
def test_raw_driver_errors_that_are_not_lock_errors_keep_their_handler(cell: Cell) -> None:
    def previous(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"handled": type(exc).__name__}, status_code=422)

    client, _root = raw_client(cell, previous=previous)
    answer = client.get("/raw-duplicate")
    assert answer.status_code == 422
    assert "Integrity" in answer.json()["handled"] or "Unique" in answer.json()["handled"]
    with hold_row_lock(cell.url, select(rows)):
        assert client.get("/raw-lock").status_code == 503


def test_only_drivers_already_imported_get_a_handler_and_none_is_imported() -> None:
    """In a fresh interpreter: an app on SQLite gets handlers for sqlite3 only, and no other
    driver is imported; after creating a PostgreSQL engine (which imports psycopg2), a second
    install also handles psycopg2's exceptions."""
    code = textwrap.dedent(
        """
        import sys
        from sqlalchemy import create_engine
        from starlette.applications import Starlette
        from locksafe.starlette import install_lock_error_handlers

        DRIVERS = ["psycopg2", "psycopg", "asyncpg", "pg8000", "pymysql", "MySQLdb",
                   "mysql.connector", "mariadb", "asyncmy", "aiomysql"]
        create_engine("sqlite://")
        app = Starlette()
        install_lock_error_handlers(app)
        print(sorted(f"{c.__module__}.{c.__qualname__}" for c in app.exception_handlers
                     if isinstance(c, type) and c is not Exception))
        print([name for name in DRIVERS if name in sys.modules])
        create_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none")
        app = Starlette()
        install_lock_error_handlers(app)
        print("psycopg2.Error" in {f"{c.__module__}.{c.__qualname__}"
                                    for c in app.exception_handlers if isinstance(c, type)})
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    handled, imported, psycopg2_handled = result.stdout.splitlines()
    assert handled == str(
        [
            "locksafe.kinds.LockUnavailable",
            "sqlalchemy.exc.DBAPIError",
            "sqlite3.Error",
        ]
    )
    assert imported == "[]", "install_lock_error_handlers imported a driver"
    assert psycopg2_handled == "True"


@pytest.mark.parametrize("retry_after", [float("nan"), float("inf"), -5, "soon", None])
def test_a_hand_made_lock_unavailable_with_a_bad_retry_after_still_gets_503(
    retry_after: Any,
) -> None:
    def route(request: Request) -> PlainTextResponse:
        raise LockUnavailable(
            LockErrorKind.DEADLOCK, attempts=3, elapsed=0.1, retry_after=retry_after
        )

    app = Starlette(routes=[Route("/x", route)])
    install_lock_error_handlers(app, retry_after=4)
    answer = TestClient(app, raise_server_exceptions=False).get("/x")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "4"  # the installed default
    assert answer.json() == BODY


def test_lock_error_response_never_raises() -> None:
    for value in (float("nan"), float("inf"), -1, "1", None, True, 10**400):
        assert lock_error_response(value).headers["Retry-After"] == "1"  # type: ignore[arg-type]
    assert lock_error_response(0).headers["Retry-After"] == "1"
    assert lock_error_response(0.2).headers["Retry-After"] == "1"
    assert lock_error_response(7).headers["Retry-After"] == "7"
    assert lock_error_response(float("nan"), fallback=2.5).headers["Retry-After"] == "3"
    assert lock_error_response(-1, fallback=float("nan")).headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("retry_after", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-1, ValueError),
        ("5", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_install_checks_retry_after(retry_after: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^retry_after="):
        install_lock_error_handlers(Starlette(), retry_after=retry_after)


@pytest.mark.cells("sqlite+pysqlite")
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_a_handler_for_a_base_class_still_gets_the_errors_that_are_not_lock_errors(
    cell: Cell, order: str, framework: str
) -> None:
    """The app handles SQLAlchemyError (DBAPIError's base), registered before or after the
    install: a non-lock DBAPIError reaches it, as it would without locksafe; lock errors get
    503."""

    def previous(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"handled": type(exc).__name__}, status_code=422)

    client = build(cell, framework, previous=previous, previous_for=SQLAlchemyError, order=order)
    assert client.get("/duplicate").json() == {"handled": "IntegrityError"}
    with hold_row_lock(cell.url, select(rows)):
        assert client.get("/nowait").status_code == 503


def _answer(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"handled": type(exc).__name__}, status_code=422)


#: (the app's handler is for, registered, path) → (status, handled by the app's handler)
INTERACTIONS: list[tuple[type[Exception], str, str, int, bool]] = [
    # the same class as locksafe's: kept for what locksafe does not answer...
    (DBAPIError, "before", "/duplicate", 422, True),
    (DBAPIError, "before", "/nowait", 503, False),
    # ...or, registered after, it replaces locksafe's (one handler per class)
    (DBAPIError, "after", "/duplicate", 422, True),
    (DBAPIError, "after", "/nowait", 422, True),
    # a more specific class: Starlette gives it its errors first, lock errors included
    (OperationalError, "before", "/nowait", 422, True),
    (OperationalError, "after", "/nowait", 422, True),
    (OperationalError, "before", "/duplicate", 500, False),
    (OperationalError, "after", "/duplicate", 500, False),
    # LockUnavailable: locksafe answers it (for HTTP), unless the app's comes after
    (LockUnavailable, "before", "/gave-up", 503, False),
    (LockUnavailable, "after", "/gave-up", 422, True),
]


@pytest.mark.cells("sqlite+pysqlite")
@pytest.mark.parametrize(("handled_class", "order", "path", "status", "by_app"), INTERACTIONS)
def test_how_the_apps_own_handlers_interact(
    cell: Cell, handled_class: type, order: str, path: str, status: int, by_app: bool
) -> None:
    """What docs/transactions.md ("In a web app") says about an app's own handlers."""
    client = build(cell, "fastapi", previous=_answer, previous_for=handled_class, order=order)
    if path == "/nowait":
        with hold_row_lock(cell.url, select(rows)):
            answer = client.get(path)
    else:
        answer = client.get(path)
    assert answer.status_code == status, answer.text
    assert ("handled" in answer.text) is by_app


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
@pytest.mark.parametrize("previous", [None, _answer])
def test_an_error_raised_while_handling_a_lock_error_is_not_a_503(
    cell: Cell, previous: Any
) -> None:
    """The route handled a real lock error, and its fallback write failed with an
    IntegrityError: that is the route's failure, not a lock error (the same reading as
    @transactional's): the app's handler or a 500, never 503."""
    holder = cell.other()
    client = build(cell, "starlette", previous=previous, release=holder.rollback)
    with holder:
        holder.execute(locksafe.with_row_locks(select(rows)))
        answer = client.get("/duplicate-while-handling")
    if previous is None:
        assert answer.status_code == 500
    else:
        assert answer.status_code == 422
        assert answer.json() == {"handled": "IntegrityError"}
    assert "Retry-After" not in answer.headers


# -- WebSockets -----------------------------------------------------------------------------


@pytest.mark.cells("sqlite+pysqlite", "postgresql+psycopg2", "mysql+pymysql")
@pytest.mark.parametrize("handler", ["none", "before", "after"])
def test_websocket_errors_are_left_as_they_would_be_without_locksafe(
    cell: Cell, handler: str
) -> None:
    """A lock error, another database error or a LockUnavailable escaping a WebSocket route:
    the same outcome with and without locksafe (the app's WebSocket-aware handler closes the
    socket; without one, the exception itself goes on)."""
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(rows).values(id=1))
    engine = cell.sync_engine()

    async def lock_ws(websocket: WebSocket) -> None:
        await websocket.accept()
        with Session(engine) as session:
            session.execute(locksafe.with_row_locks(select(rows), session, nowait=True)).all()

    async def duplicate_ws(websocket: WebSocket) -> None:
        await websocket.accept()
        with Session(engine) as session:
            session.execute(insert(rows).values(id=1))

    async def gave_up_ws(websocket: WebSocket) -> None:
        await websocket.accept()
        raise LockUnavailable(LockErrorKind.DEADLOCK, attempts=3, elapsed=0.1, retry_after=2)

    async def close_ws(websocket: Any, exc: Exception) -> None:
        await websocket.close(code=4000, reason=type(exc).__name__)

    def run(install: bool, path: str) -> tuple[str, Any, Any]:
        app = Starlette(
            routes=[
                WebSocketRoute("/lock", lock_ws),
                WebSocketRoute("/duplicate", duplicate_ws),
                WebSocketRoute("/gave-up", gave_up_ws),
            ]
        )
        if handler == "before":
            app.add_exception_handler(DBAPIError, close_ws)
            app.add_exception_handler(LockUnavailable, close_ws)
        if install:
            install_lock_error_handlers(app)
        if handler == "after":
            app.add_exception_handler(DBAPIError, close_ws)
            app.add_exception_handler(LockUnavailable, close_ws)
        try:
            with TestClient(app).websocket_connect(path) as websocket:
                websocket.receive_text()
        except WebSocketDisconnect as exc:
            return "closed", exc.code, exc.reason
        except Exception as exc:
            return "raised", type(exc).__name__, locksafe.classify(exc)
        return "no error", None, None

    outcomes: dict[str, tuple[str, Any, Any]] = {}
    for path in ("/lock", "/duplicate", "/gave-up"):
        with hold_row_lock(cell.url, select(rows)) if path == "/lock" else nullcontext():
            without = run(False, path)
            assert run(True, path) == without, path
        outcomes[path] = without
    if handler == "none":
        assert outcomes == {
            "/lock": ("raised", "OperationalError", outcomes["/lock"][2]),
            "/duplicate": ("raised", "IntegrityError", None),
            "/gave-up": ("raised", "LockUnavailable", LockErrorKind.DEADLOCK),
        }
        assert outcomes["/lock"][2] in RETRYABLE_KINDS, "no real lock error"
    else:
        assert outcomes == {
            "/lock": ("closed", 4000, "OperationalError"),
            "/duplicate": ("closed", 4000, "IntegrityError"),
            "/gave-up": ("closed", 4000, "LockUnavailable"),
        }
