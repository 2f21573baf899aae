"""HTTP 503 + ``Retry-After`` for lock failures in Starlette and FastAPI apps.

A lock failure is not a bug in the request: the client may simply try again. Installed
handlers turn :class:`~locksafe.LockUnavailable`, and any database error that
:func:`~locksafe.classify` calls a retryable lock error — a SQLAlchemy ``DBAPIError``, or a
driver's own exception that escaped unwrapped (``engine.raw_connection()``, a driver used
directly) — into ``503 Service Unavailable`` with a ``Retry-After`` header and a fixed JSON body:
no SQL, parameters or driver text reach the client; they go to the server log instead.

>>> from starlette.applications import Starlette  # or fastapi.FastAPI
>>> import sqlite3
>>> app = Starlette()
>>> install_lock_error_handlers(app)
>>> all(cls in app.exception_handlers for cls in (LockUnavailable, DBAPIError, sqlite3.Error))
True

Requires the ``starlette`` (or ``fastapi``) extra.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from locksafe.classify import classify, is_retryable_lock_error
from locksafe.dialects import all_supports
from locksafe.kinds import LockUnavailable
from locksafe.transactions import _seconds

__all__ = ["BODY", "install_lock_error_handlers", "lock_error_response"]

log = logging.getLogger("locksafe.starlette")

#: The body of every 503 answer: the same for every lock failure, whatever the database said.
BODY: Final = {
    "detail": "The database is busy with conflicting work. Retry the request later.",
    "error": "lock_unavailable",
}

_Handler = Callable[[Request, Exception], Awaitable[Response] | Response]


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

    >>> lock_error_response(2.2).headers["Retry-After"]
    '3'
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


def _handler_before(handlers: Mapping[Any, _Handler], exc: Exception) -> _Handler | None:
    """The handler Starlette would have chosen for ``exc`` among ``handlers``: the closest
    class in its MRO. ``Exception`` is the 500 handler's, left to Starlette."""
    for cls in type(exc).__mro__:
        if cls is Exception or cls is BaseException:
            return None
        handler = handlers.get(cls)
        if handler is not None:
            return handler
    return None


def _is_async_callable(obj: object) -> bool:
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(type(obj).__call__)


def install_lock_error_handlers(app: Starlette, *, retry_after: float = 1.0) -> None:
    """Answer lock failures that escape a route with 503 + ``Retry-After``.

    Handles :class:`~locksafe.LockUnavailable` (it carries its own ``retry_after``), and,
    with ``retry_after`` seconds (a finite number ≥ 0; the header says at least 1): lock
    errors wrapped by SQLAlchemy (``DBAPIError``) and the raw exceptions of every database
    driver already imported when this runs, plus ``sqlite3`` (call it after creating your
    engines; a driver that is not imported is not used, and is not imported here). Errors of
    those classes that are not lock errors go to the handler the app had for them before (or
    become the usual 500).
    """
    default = _seconds("retry_after", retry_after)
    before: dict[Any, _Handler] = dict(app.exception_handlers)

    async def on_lock_unavailable(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LockUnavailable)
        log.warning("%s %s: answered 503, %s", request.method, request.url.path, exc, exc_info=exc)
        return lock_error_response(exc.retry_after, fallback=default)

    async def on_database_error(request: Request, exc: Exception) -> Response:
        if is_retryable_lock_error(exc):
            log.warning(
                "%s %s: answered 503 for a %s database error",
                request.method,
                request.url.path,
                classify(exc),
                exc_info=exc,
            )
            return lock_error_response(default)
        previous = _handler_before(before, exc)
        if previous is None:
            raise exc
        # as Starlette calls handlers: coroutine functions awaited, others in the threadpool
        if _is_async_callable(previous):
            response: Any = await previous(request, exc)  # type: ignore[misc]
        else:
            response = await run_in_threadpool(previous, request, exc)
            if inspect.isawaitable(response):
                response = await response
        assert isinstance(response, Response)
        return response

    app.add_exception_handler(LockUnavailable, on_lock_unavailable)
    app.add_exception_handler(DBAPIError, on_database_error)
    for cls in _driver_exception_classes():
        app.add_exception_handler(cls, on_database_error)
