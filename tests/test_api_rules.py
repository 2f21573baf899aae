"""One retry rule, public, used everywhere; documented names resolve; @transactional's session
options are checked (issue 9, the API points).

- ``locksafe.is_retryable_lock_error`` is the rule: ``@transactional`` (default and
  ``retry_on=is_retryable_lock_error`` alike), ``retry_if_lock_error`` and the Starlette
  handlers all answer what it answers (on top of it, no retry mechanism retries an
  interruption or a ``LockUnavailable``).
- ``locksafe.classify_raised`` is public; every dotted ``locksafe.…`` name the docs and
  docstrings cite resolves by attribute access from ``import locksafe``.
- ``session=`` an Engine, a string, a session of the other kind, and ``sessionmaker=`` of the
  other kind: a TypeError naming the option and what it accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import re
import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tenacity
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import locksafe
from locksafe import LockErrorKind, LockUnavailable, is_retryable_lock_error, transactional
from locksafe.starlette import install_lock_error_handlers

with warnings.catch_warnings():
    # The test extra gives Python 3.10 httpx (httpx2 needs 3.11), which Starlette's TestClient
    # deprecates: a warning in every compatibility run, about the environment, not locksafe.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_backoff() -> Any:
    locksafe.set_testing(True)
    yield
    locksafe.set_testing(False)


# -- the errors ---------------------------------------------------------------------------------


def busy() -> sqlite3.OperationalError:
    return sqlite3.OperationalError("database is locked")


def wrapped_busy() -> OperationalError:
    return OperationalError("UPDATE t SET v = 1", {}, busy())


def raised_from_busy() -> Exception:
    try:
        raise wrapped_busy()
    except OperationalError as exc:
        try:
            raise RuntimeError("conflict") from exc
        except RuntimeError as answer:
            return answer


def raised_while_handling_busy() -> Exception:
    """``except OperationalError: raise IntegrityError(...)``: the code's own answer."""
    try:
        raise wrapped_busy()
    except OperationalError:
        try:
            raise IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE"))
        except IntegrityError as answer:
            return answer


def integrity() -> IntegrityError:
    return IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))


def gave_up() -> LockUnavailable:
    error = LockUnavailable(LockErrorKind.DEADLOCK, attempts=3, elapsed=0.1, retry_after=2)
    error.__cause__ = wrapped_busy()
    return error


ERRORS: dict[str, Callable[[], Exception]] = {
    "sqlite3 busy": busy,
    "wrapped busy": wrapped_busy,
    "raised from busy": raised_from_busy,
    "raised while handling busy": raised_while_handling_busy,
    "integrity error": integrity,
    "LockUnavailable": gave_up,
}


def never_retried(exc: BaseException) -> bool:
    return isinstance(exc, LockUnavailable)


def test_an_error_raised_while_handling_a_lock_error_is_not_retryable() -> None:
    """Before issue 9, is_retryable_lock_error said True (it read __context__), while
    @transactional, retry_if_lock_error and the Starlette handlers did not retry it."""
    assert not is_retryable_lock_error(raised_while_handling_busy())
    assert locksafe.classify(raised_while_handling_busy()) is LockErrorKind.DATABASE_BUSY
    assert locksafe.classify_raised(raised_while_handling_busy()) is None
    assert is_retryable_lock_error(raised_from_busy())
    assert is_retryable_lock_error(wrapped_busy())


@pytest.mark.parametrize("name", list(ERRORS))
def test_retry_if_lock_error_is_the_public_rule(name: str) -> None:
    exc = ERRORS[name]()
    predicate = locksafe.retry_if_lock_error.predicate  # type: ignore[attr-defined]
    assert predicate(exc) is (is_retryable_lock_error(exc) and not never_retried(exc))
    attempts: list[int] = []

    def fail() -> None:
        attempts.append(1)
        raise ERRORS[name]()

    retrying = tenacity.Retrying(
        retry=locksafe.retry_if_lock_error, stop=tenacity.stop_after_attempt(2), reraise=True
    )
    with pytest.raises(Exception):  # noqa: B017
        retrying(fail)
    assert len(attempts) == (2 if predicate(exc) else 1)


def count_attempts(name: str, **options: Any) -> int:
    """How many times @transactional (with ``options``) runs a function that raises the
    error ``name`` on its first attempt and succeeds on the second."""
    engine = create_engine("sqlite://")
    attempts: list[int] = []

    @transactional(attempts=2, **options)
    def work(*, session: Session) -> str:
        attempts.append(1)
        session.execute(text("SELECT 1"))
        if len(attempts) == 1:
            raise ERRORS[name]()
        return "done"

    with Session(engine) as session, contextlib.suppress(Exception):  # the count is checked
        work(session=session)
    engine.dispose()
    return len(attempts)


@pytest.mark.parametrize("name", list(ERRORS))
def test_transactional_retries_what_the_public_rule_says(name: str) -> None:
    """The default rule and ``retry_on=is_retryable_lock_error`` are the same rule (before
    issue 9, the latter was silently replaced by another one that disagreed with it)."""
    exc = ERRORS[name]()
    expected = 2 if is_retryable_lock_error(exc) and not never_retried(exc) else 1
    assert count_attempts(name) == expected
    assert count_attempts(name, retry_on=is_retryable_lock_error) == expected


def test_an_error_after_the_functions_own_commit_is_not_retryable_anywhere() -> None:
    """A lock error raised after the function committed itself: running it again (or
    sending the request again) could redo committed work. @transactional never retried it;
    the public rule and the Starlette handlers now agree (before: True, and a 503)."""
    engine = create_engine("sqlite://")

    @transactional
    def commits_then_fails(*, session: Session) -> None:
        session.execute(text("SELECT 1"))
        session.commit()
        raise wrapped_busy()

    def route(request: Request) -> PlainTextResponse:
        with Session(engine) as session:
            commits_then_fails(session=session)
        return PlainTextResponse("done")

    with Session(engine) as session, pytest.raises(OperationalError) as info:
        commits_then_fails(session=session)
    assert not is_retryable_lock_error(info.value)
    assert locksafe.classify_raised(info.value) is LockErrorKind.DATABASE_BUSY

    app = Starlette(routes=[Route("/", route, methods=["POST"])])
    install_lock_error_handlers(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/")
    assert response.status_code == 500, "a 503 invites the client to redo committed work"
    engine.dispose()


#: The errors the handlers are installed for (LockUnavailable, DBAPIError, drivers' errors):
#: an application's own exception raised from a lock error goes to its own handler.
HANDLED = [name for name in ERRORS if not isinstance(ERRORS[name](), RuntimeError)]


@pytest.mark.parametrize("name", HANDLED)
def test_starlette_answers_503_for_what_the_public_rule_calls_retryable(name: str) -> None:
    def route(request: Request) -> PlainTextResponse:
        raise ERRORS[name]()

    app = Starlette(routes=[Route("/", route)])
    install_lock_error_handlers(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/")
    exc = ERRORS[name]()
    assert (response.status_code == 503) is is_retryable_lock_error(exc), response.status_code


# -- documented names resolve ---------------------------------------------------------------------

#: A dotted name, not in quotes (``"locksafe.sqlite.path"`` is a key, not a name).
_DOTTED = re.compile(r"(?<![\w.\"'])locksafe(?:\.[A-Za-z_]\w*)+")

#: The modules whose docstrings are checked: the API side's. (The row-lock and SQLite modules
#: are being changed by others while this is written; their docs pages are checked.)
MODULES = ("__init__", "classify", "kinds", "transactions", "starlette", "capabilities", "testing")


def documented_names() -> dict[str, list[str]]:
    """Every dotted ``locksafe.…`` name in the docs, the README and the docstrings."""
    sources = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    sources += [ROOT / "src" / "locksafe" / f"{module}.py" for module in MODULES]
    names: dict[str, list[str]] = {}
    for path in sources:
        for name in _DOTTED.findall(path.read_text(encoding="utf-8")):
            names.setdefault(name.rstrip("."), []).append(str(path.relative_to(ROOT)))
    return names


def resolve(dotted: str) -> object:
    """``dotted`` as a user reaches it: the modules on its path imported
    (``import locksafe.starlette``), then attribute access from ``locksafe``."""
    parts = dotted.split(".")
    for end in range(2, len(parts) + 1):
        try:
            importlib.import_module(".".join(parts[:end]))
        except ImportError:
            break
    obj: object = importlib.import_module("locksafe")
    for part in parts[1:]:
        obj = getattr(obj, part)
    return obj


#: Names that are not Python objects: logger names, file names, distribution names.
NOT_OBJECTS = {"locksafe.transactions", "locksafe.starlette", "locksafe.sqlite"}


def test_the_docs_cite_names_that_exist() -> None:
    names = documented_names()
    assert "locksafe.classify_raised" in names
    broken = {}
    for name, where in sorted(names.items()):
        try:
            resolve(name)
        except AttributeError as exc:
            broken[name] = (sorted(set(where)), str(exc))
    assert not broken, broken


def test_classify_raised_has_a_public_home_and_classify_stays_a_function() -> None:
    assert locksafe.classify_raised(wrapped_busy()) is LockErrorKind.DATABASE_BUSY
    assert "classify_raised" in locksafe.__all__
    assert callable(locksafe.classify)
    assert locksafe.classify(busy()) is LockErrorKind.DATABASE_BUSY
    from locksafe.classify import classify_raised

    assert classify_raised is locksafe.classify_raised


# -- session options ------------------------------------------------------------------------------


def test_an_engine_or_a_string_as_session_is_a_type_error_naming_the_option() -> None:
    engine = create_engine("sqlite://")

    @transactional
    def work(*, session: Session) -> None:
        session.execute(text("SELECT 1"))

    for bad in (engine, "sqlite://", 42):
        with pytest.raises(TypeError, match=r"session=.*must be a Session"):
            work(session=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Engine is not a session"):
        work(session=engine)  # type: ignore[arg-type]
    engine.dispose()


def test_an_async_engine_as_session_of_an_async_function_is_a_type_error() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")

    @transactional
    async def work(*, session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))

    for bad in (engine, "x"):
        with pytest.raises(TypeError, match=r"session=.*must be an AsyncSession"):
            asyncio.run(work(session=bad))  # type: ignore[arg-type]


def test_a_session_of_the_other_kind_is_a_type_error_at_call_time() -> None:
    engine = create_engine("sqlite://")
    async_engine = create_async_engine("sqlite+aiosqlite://")

    @transactional
    def sync_work(*, session: Session) -> None:
        session.execute(text("SELECT 1"))

    @transactional
    async def async_work(*, session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))

    with pytest.raises(TypeError, match=r"session=.*AsyncSession.*sync function"):
        sync_work(session=AsyncSession(async_engine))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"session=.*must be an AsyncSession.*`async def`"):
        asyncio.run(async_work(session=Session(engine)))  # type: ignore[arg-type]
    engine.dispose()


def test_a_sessionmaker_of_the_other_kind_is_a_type_error_at_decoration_time() -> None:
    engine = create_engine("sqlite://")
    async_engine = create_async_engine("sqlite+aiosqlite://")
    for maker in (async_sessionmaker(async_engine),
                  async_scoped_session(async_sessionmaker(async_engine), asyncio.current_task)):
        with pytest.raises(TypeError, match=r"^sessionmaker=.*sync function.*Sessions"):

            @transactional(sessionmaker=maker)
            def sync_work(*, session: Session = locksafe.NEW_SESSION) -> None: ...

    for sync_maker in (sessionmaker(engine), scoped_session(sessionmaker(engine))):
        with pytest.raises(TypeError, match=r"^sessionmaker=.*`async def`.*AsyncSessions"):

            @transactional(sessionmaker=sync_maker)
            async def async_work(*, session: AsyncSession = locksafe.NEW_SESSION) -> None: ...

    with pytest.raises(TypeError, match=r"^sessionmaker=.*an Engine is not one"):
        transactional(sessionmaker=engine)  # type: ignore[arg-type]
    engine.dispose()


def test_a_sessionmaker_returning_the_other_kind_is_a_type_error_at_call_time() -> None:
    async_engine = create_async_engine("sqlite+aiosqlite://")
    attempts: list[int] = []

    @transactional(sessionmaker=lambda: AsyncSession(async_engine))
    def sync_work(*, session: Session = locksafe.NEW_SESSION) -> None:
        attempts.append(1)

    with pytest.raises(TypeError, match=r"sessionmaker= returned .*AsyncSession"):
        sync_work()
    assert attempts == [], "the function ran with a session it cannot use"
