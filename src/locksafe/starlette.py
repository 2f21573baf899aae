"""HTTP 503 + ``Retry-After`` for lock failures in Starlette and FastAPI apps.

A lock failure is not a bug in the request: the client may simply try again. Installed
handlers turn :class:`~locksafe.LockUnavailable`, and any database error that
:func:`~locksafe.classify` calls a retryable lock error, into ``503 Service Unavailable`` with
a ``Retry-After`` header and a fixed JSON body — no SQL, parameters or driver text reach the
client; they go to the server log instead.

>>> from starlette.applications import Starlette  # or fastapi.FastAPI
>>> app = Starlette()
>>> install_lock_error_handlers(app)
>>> sorted(cls.__name__ for cls in app.exception_handlers if cls is not Exception)
['DBAPIError', 'LockUnavailable']

Requires the ``starlette`` (or ``fastapi``) extra.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from locksafe.classify import classify, is_retryable_lock_error
from locksafe.kinds import LockUnavailable

__all__ = ["BODY", "install_lock_error_handlers", "lock_error_response"]

log = logging.getLogger("locksafe.starlette")

#: The body of every 503 answer: the same for every lock failure, whatever the database said.
BODY: Final = {
    "detail": "The database is busy with conflicting work. Retry the request later.",
    "error": "lock_unavailable",
}

_Handler = Callable[[Request, Exception], Awaitable[Response] | Response]


def lock_error_response(retry_after: float) -> JSONResponse:
    """The 503 answer, with ``Retry-After`` in whole seconds (at least 1)."""
    seconds = max(1, math.ceil(retry_after))
    return JSONResponse(BODY, status_code=503, headers={"Retry-After": str(seconds)})


def install_lock_error_handlers(app: Starlette, *, retry_after: float = 1.0) -> None:
    """Answer lock failures that escape a route with 503 + ``Retry-After``.

    ``retry_after`` (seconds) is used for raw database lock errors;
    :class:`~locksafe.LockUnavailable` carries its own. Database errors that are not lock
    errors go to whatever handled them before (or become the usual 500).
    """
    previous: Any = app.exception_handlers.get(DBAPIError)

    async def on_lock_unavailable(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LockUnavailable)
        log.warning("%s %s: answered 503, %s", request.method, request.url.path, exc, exc_info=exc)
        return lock_error_response(exc.retry_after)

    async def on_database_error(request: Request, exc: Exception) -> Response:
        if is_retryable_lock_error(exc):
            log.warning(
                "%s %s: answered 503 for a %s database error",
                request.method,
                request.url.path,
                classify(exc),
                exc_info=exc,
            )
            return lock_error_response(retry_after)
        if previous is not None:
            response = previous(request, exc)
            if not isinstance(response, Response):
                response = await response
            assert isinstance(response, Response)
            return response
        raise exc

    app.add_exception_handler(LockUnavailable, on_lock_unavailable)
    app.add_exception_handler(DBAPIError, on_database_error)
