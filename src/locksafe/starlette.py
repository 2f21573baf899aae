"""HTTP 503 + ``Retry-After`` for lock failures in Starlette and FastAPI apps.

A lock failure is not a bug in the request: the client may simply try again. Installed
handlers turn :class:`~locksafe.LockUnavailable`, and any database error that
:func:`~locksafe.is_retryable_lock_error` calls retryable (the rule
:func:`~locksafe.transactional` retries by) — a SQLAlchemy ``DBAPIError``, or a driver's own
exception that escaped unwrapped (``engine.raw_connection()``, a driver used directly) —
escaping an HTTP route into ``503 Service Unavailable`` with a ``Retry-After`` header and a
fixed JSON body: no SQL, parameters or driver text reach the client; they go to the server log
instead. Everything else, WebSocket routes included, goes where it would go without locksafe.

>>> from starlette.applications import Starlette  # or fastapi.FastAPI
>>> import sqlite3
>>> app = Starlette()
>>> install_lock_error_handlers(app)
>>> all(cls in app.exception_handlers for cls in (LockUnavailable, DBAPIError, sqlite3.Error))
True

Requires the ``starlette`` (or ``fastapi``) extra.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, cast

from sqlalchemy.exc import DBAPIError
from starlette._exception_handler import _lookup_exception_handler
from starlette._utils import is_async_callable
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from locksafe.classify import classify_raised, is_retryable_lock_error
from locksafe.dialects import all_supports
from locksafe.kinds import LockUnavailable
from locksafe.options import check_seconds

__all__ = ["BODY", "install_lock_error_handlers", "lock_error_response"]

log = logging.getLogger("locksafe.starlette")

#: The body of every 503 answer: the same for every lock failure, whatever the database said.
BODY: Final = {
    "detail": "The database is busy with conflicting work. Retry the request later.",
    "error": "lock_unavailable",
}

_Handler = Callable[[Request, Exception], Awaitable[Response | None] | Response | None]


def _whole_seconds(value: object) -> int | None:
    """``value`` rounded up to whole seconds, at least 1; ``None`` if it is no usable number
    of seconds (NaN, infinite, negative, not a number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return max(1, math.ceil(seconds))


def lock_error_response(retry_after: float, *, fallback: float = 1.0) -> JSONResponse:
    """The 503 answer, with ``Retry-After`` in whole seconds (at least 1).

    Never raises: a ``retry_after`` that is no usable number of seconds (NaN, infinite,
    negative — a hand-made :class:`~locksafe.LockUnavailable` may carry one) gives
    ``fallback``, and a bad ``fallback`` gives 1.

    >>> import json
    >>> response = lock_error_response(2.2)
    >>> response.status_code, response.headers["Retry-After"], json.loads(response.body) == BODY
    (503, '3', True)
    >>> lock_error_response(float("nan"), fallback=5).headers["Retry-After"]
    '5'
    """
    seconds = _whole_seconds(retry_after) or _whole_seconds(fallback) or 1
    return JSONResponse(BODY, status_code=503, headers={"Retry-After": str(seconds)})


def _driver_exception_classes() -> list[type[Exception]]:
    """The root exception classes of the drivers imported so far (creating an engine imports
    its driver), and sqlite3's. Never imports a driver."""
    classes: list[type[Exception]] = [sqlite3.Error]
    for support in all_supports():
        for driver in support.errors.drivers:
            for cls in driver.imported_exception_classes():
                if issubclass(cls, Exception) and cls not in classes:
                    classes.append(cls)
    return classes


class _LockErrorHandler:
    """locksafe's exception handler, one per :func:`install_lock_error_handlers` call; the
    class marks it, so that looking up the app's own handler for an error skips it."""

    def __init__(self, default: float, replaced: dict[Any, _Handler]) -> None:
        #: ``Retry-After`` seconds for database errors (and a bad ``LockUnavailable``'s).
        self.default = default
        #: The app's handlers this one replaced at install, by exception class.
        self.replaced = replaced

    async def __call__(self, request: Request, exc: Exception) -> Response | None:
        # Only HTTP requests get a 503; a WebSocket (or any other scope) is left as it would
        # be without locksafe.
        if request.scope.get("type") == "http":
            if isinstance(exc, LockUnavailable):
                log.warning(
                    "%s %s: answered 503, %s",
                    request.method,
                    request.url.path,
                    exc,
                    exc_info=exc,
                )
                return lock_error_response(exc.retry_after, fallback=self.default)
            if is_retryable_lock_error(exc):
                kind = classify_raised(exc)
                log.warning(
                    "%s %s: answered 503 for a %s database error",
                    request.method,
                    request.url.path,
                    kind,
                    exc_info=exc,
                )
                return lock_error_response(self.default)
        return await _fallback(request, exc, self)


def _without_ours(handlers: Mapping[Any, Any]) -> dict[Any, Any]:
    """``handlers`` with each of locksafe's handlers swapped back for the one it replaced (or
    left out); ``Exception`` / 500 belong to Starlette's error middleware, not to this
    lookup."""
    found: dict[Any, Any] = {}
    for key, handler in handlers.items():
        if key in (Exception, 500):
            continue
        if isinstance(handler, _LockErrorHandler):
            handler = handler.replaced.get(key)
        if handler is not None:
            found[key] = handler
    return found


async def _fallback(request: Request, exc: Exception, ours: _LockErrorHandler) -> Response | None:
    """What the app would do with ``exc`` without locksafe: its own handler for it, found by
    Starlette's own lookup in the handlers Starlette uses for this request (registered before
    or after the install), else the error goes on (500)."""
    handlers: Any = None
    in_scope = request.scope.get("starlette.exception_handlers")
    if isinstance(in_scope, tuple) and in_scope and isinstance(in_scope[0], Mapping):
        handlers = in_scope[0]  # what Starlette's ExceptionMiddleware looks up, per request
    else:
        handlers = getattr(request.scope.get("app"), "exception_handlers", None)
    if not isinstance(handlers, Mapping):
        handlers = ours.replaced
    previous: Any = _lookup_exception_handler(_without_ours(handlers), exc)
    if previous is None:
        raise exc
    # as Starlette calls handlers: coroutine functions awaited, others in the threadpool
    if is_async_callable(previous):
        response: Any = await previous(request, exc)
    else:
        response = await run_in_threadpool(previous, request, exc)
        if inspect.isawaitable(response):
            response = await response
    return cast(Response | None, response)


def install_lock_error_handlers(app: Starlette, *, retry_after: float = 1.0) -> None:
    """Answer lock failures that escape a route with 503 + ``Retry-After``.

    Handles :class:`~locksafe.LockUnavailable` (it carries its own ``retry_after``), and,
    with ``retry_after`` seconds (a finite number ≥ 0; the header says at least 1): lock
    errors wrapped by SQLAlchemy (``DBAPIError``) and the raw exceptions of every database
    driver already imported when this runs, plus ``sqlite3`` (call it after creating your
    engines; a driver that is not imported is not used, and is not imported here).

    A lock error is what :func:`~locksafe.is_retryable_lock_error` calls retryable, the rule
    :func:`~locksafe.transactional` retries by: an error raised while handling a lock error
    (an ``IntegrityError`` in an ``except OperationalError:`` block) is not, nor one after
    which work may have been committed (sending the request again could do it twice).
    Anything else — another error of those classes, or any error on a WebSocket — goes to the
    handler the app has for it, looked up when it happens (registered before or after this
    call, for the class or a base class), or on to Starlette (the usual 500).

    >>> app = Starlette()
    >>> install_lock_error_handlers(app, retry_after=2)
    """
    if not isinstance(app, Starlette):
        raise TypeError(
            f"app={app!r} must be a Starlette (or FastAPI) application, not {type(app).__name__}"
        )
    default = check_seconds("retry_after", retry_after)
    replaced: dict[Any, _Handler] = {}
    handler = _LockErrorHandler(default, replaced)
    for cls in (LockUnavailable, DBAPIError, *_driver_exception_classes()):
        previous: Any = app.exception_handlers.get(cls)
        if isinstance(previous, _LockErrorHandler):  # installed twice: keep the app's own
            previous = previous.replaced.get(cls)
        if previous is not None:
            replaced[cls] = previous
        # one handler for HTTP requests and WebSockets: Starlette's type has no such union
        app.add_exception_handler(cls, cast(Any, handler))
