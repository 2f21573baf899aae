"""locksafe.starlette: lock failures that escape a route become 503 + Retry-After."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Column, Integer, MetaData, Table, insert, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import locksafe
from conftest import Cell
from locksafe import LockErrorKind, LockUnavailable
from locksafe.starlette import BODY, install_lock_error_handlers
from locksafe.testing import hold_row_lock

metadata = MetaData()
rows = Table("http_rows", metadata, Column("id", Integer, primary_key=True, autoincrement=False))


def build(cell: Cell, framework: str, *, previous: Any = None) -> TestClient:
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

    routes = {"/gave-up": gave_up, "/nowait": nowait, "/duplicate": duplicate}
    app: Starlette
    if framework == "fastapi":
        app = FastAPI()
        for path, endpoint in routes.items():
            app.add_route(path, endpoint)
    else:
        app = Starlette(routes=[Route(path, endpoint) for path, endpoint in routes.items()])
    if previous is not None:
        app.add_exception_handler(DBAPIError, previous)
    install_lock_error_handlers(app, retry_after=4)
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
