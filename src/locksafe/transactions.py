"""One atomic transaction, retried on lock errors: :func:`transactional`.

The retry schedule is tenacity's (exponential backoff with full jitter, bounded by attempts
and by total time); what locksafe adds is *what* is retried and *how*: only errors
:func:`~locksafe.classify` calls retryable lock errors, always the whole transaction from its
``BEGIN``, never a transaction the decorator did not begin, and never after a ``COMMIT`` whose
outcome is unknown.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar, cast, overload

import tenacity

from locksafe.classify import classify, is_retryable_lock_error
from locksafe.kinds import LockErrorKind, LockUnavailable

__all__ = [
    "NEW_SESSION",
    "RetryDetails",
    "retry_if_lock_error",
    "set_testing",
    "transactional",
]

log = logging.getLogger("locksafe.transactions")

P = ParamSpec("P")
T = TypeVar("T")

#: A tenacity ``retry`` predicate: retry when the exception is a retryable lock error.
#:
#: >>> import tenacity
#: >>> policy = tenacity.Retrying(retry=retry_if_lock_error, stop=tenacity.stop_after_attempt(3))
retry_if_lock_error: Final = tenacity.retry_if_exception(is_retryable_lock_error)

#: The default for the ``session`` parameter of a function decorated with
#: ``@transactional(sessionmaker=...)``, so that type checkers accept calls without a session
#: (the decorator keeps the function's signature, and cannot mark ``session`` optional). It is
#: ``None``: the decorator injects a fresh session per attempt. Airflow's ``NEW_SESSION``, typed
#: to fit a ``Session`` and an ``AsyncSession`` alike (see :func:`transactional`'s example).
NEW_SESSION: Final[Any] = None

_testing = False


def set_testing(testing: bool) -> None:
    """Make every :func:`transactional` backoff wait zero seconds (for test suites).

    Attempts and the ``timeout`` still apply; only the sleeping goes.
    """
    global _testing
    _testing = testing


@dataclass(frozen=True)
class RetryDetails:
    """What :func:`transactional` tells ``on_retry`` (and the log) before it sleeps."""

    #: The attempt that just failed (1 for the first).
    attempt: int
    kind: LockErrorKind
    #: Seconds it will sleep before the next attempt.
    wait: float
    #: Seconds since the first attempt began.
    elapsed: float
    exception: BaseException
    #: The decorated function's qualified name.
    operation: str


class _Policy:
    """The retry policy of one decorated function, resolved once at decoration time."""

    def __init__(
        self,
        *,
        attempts: int,
        timeout: float,
        retry_on: Callable[[BaseException], bool] | Collection[LockErrorKind],
        on_retry: Callable[[RetryDetails], object] | None,
        wait_initial: float,
        wait_max: float,
        retry_after: float | None,
        operation: str,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts={attempts!r} must be an int ≥ 1")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout!r} must be > 0 seconds")
        if wait_initial < 0 or wait_max < wait_initial:
            raise ValueError(
                f"wait_initial={wait_initial!r} and wait_max={wait_max!r} must satisfy "
                "0 ≤ wait_initial ≤ wait_max"
            )
        if callable(retry_on):
            self.should_retry: Callable[[BaseException], bool] = retry_on
        else:
            kinds = frozenset(LockErrorKind(kind) for kind in retry_on)
            self.should_retry = lambda exc: classify(exc) in kinds
        self.attempts = attempts
        self.timeout = timeout
        self.on_retry = on_retry
        self.operation = operation
        self.retry_after = (
            retry_after if retry_after is not None else float(max(1, math.ceil(wait_max)))
        )
        self._jitter = tenacity.wait_random_exponential(multiplier=wait_initial, max=wait_max)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        return 0.0 if _testing else float(self._jitter(state))

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        assert exc is not None
        details = RetryDetails(
            attempt=state.attempt_number,
            kind=classify(exc) or LockErrorKind.LOCK_NOT_AVAILABLE,
            wait=state.upcoming_sleep,
            elapsed=state.seconds_since_start or 0.0,
            exception=exc,
            operation=self.operation,
        )
        log.warning(
            "%s: attempt %d failed with %s; retrying in %.3fs",
            details.operation,
            details.attempt,
            details.kind.value,
            details.wait,
            extra={
                "locksafe_attempt": details.attempt,
                "locksafe_kind": details.kind.value,
                "locksafe_wait": details.wait,
                "locksafe_operation": details.operation,
            },
        )
        if self.on_retry is not None:
            self.on_retry(details)

    def retrying_kwargs(self, unknown_commits: set[int]) -> dict[str, Any]:
        def retry(state: tenacity.RetryCallState) -> bool:
            outcome = state.outcome
            if outcome is None or not outcome.failed:
                return False
            exc = outcome.exception()
            if exc is None or id(exc) in unknown_commits:
                return False
            return bool(self.should_retry(exc))

        return {
            "stop": tenacity.stop_after_attempt(self.attempts)
            | tenacity.stop_before_delay(self.timeout),
            "wait": self._wait,
            "retry": retry,
            "before_sleep": self._before_sleep,
            "reraise": True,
        }

    def final_error(
        self, exc: BaseException, unknown_commits: set[int], attempts: int, started: float
    ) -> BaseException:
        """What to raise when the last attempt failed with ``exc``: ``exc`` itself unless it
        was a retryable error that ran out of attempts or time."""
        if id(exc) in unknown_commits or not self.should_retry(exc):
            return exc
        kind = classify(exc) or LockErrorKind.LOCK_NOT_AVAILABLE
        error = LockUnavailable(
            kind,
            attempts=attempts,
            elapsed=time.monotonic() - started,
            retry_after=self.retry_after,
            operation=self.operation,
        )
        error.__cause__ = exc
        return error


def _commit_unknown(exc: BaseException) -> bool:
    """Whether a COMMIT that raised ``exc`` may have succeeded.

    Only a lock error that the server reported for the COMMIT (a serialization failure, a busy
    SQLite database) proves it did not; anything else (a lost connection...) may hide a
    successful commit, so it is never retried.
    """
    return not is_retryable_lock_error(exc)


def _rollback(session: Any) -> None:
    """Roll back after a failure, never hiding that failure behind a second one."""
    try:
        session.rollback()
    except Exception:
        log.exception("rollback after a failed transaction failed too")


async def _rollback_async(session: Any) -> None:
    try:
        await session.rollback()
    except Exception:
        log.exception("rollback after a failed transaction failed too")


def _session_parameter(fn: Callable[..., Any]) -> int | None:
    """The position of ``fn``'s ``session`` parameter (-1: keyword-only), or ``None``."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    for index, parameter in enumerate(parameters):
        if parameter.name == "session":
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                return -1
            if parameter.kind in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            ):
                return index
    return None


def _find_session(position: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if "session" in kwargs:
        return kwargs["session"]
    if 0 <= position < len(args):
        return args[position]
    return None


def _with_session(
    position: int, args: tuple[Any, ...], kwargs: dict[str, Any], session: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if 0 <= position < len(args):
        return (*args[:position], session, *args[position + 1 :]), kwargs
    return args, {**kwargs, "session": session}


@overload
def transactional(fn: Callable[P, T], /) -> Callable[P, T]: ...


@overload
def transactional(
    fn: None = None,
    /,
    *,
    attempts: int = 5,
    timeout: float = 30.0,
    sessionmaker: Callable[[], Any] | None = None,
    retry_on: Callable[[BaseException], bool] | Collection[LockErrorKind] = ...,
    on_retry: Callable[[RetryDetails], object] | None = None,
    wait_initial: float = 0.05,
    wait_max: float = 2.0,
    retry_after: float | None = None,
) -> Callable[[Callable[P, T]], Callable[P, T]]: ...


def transactional(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    attempts: int = 5,
    timeout: float = 30.0,
    sessionmaker: Callable[[], Any] | None = None,
    retry_on: Callable[[BaseException], bool] | Collection[LockErrorKind] = (
        is_retryable_lock_error
    ),
    on_retry: Callable[[RetryDetails], object] | None = None,
    wait_initial: float = 0.05,
    wait_max: float = 2.0,
    retry_after: float | None = None,
) -> Any:
    """Run a function in one atomic transaction, retried on lock errors.

    For sync functions and ``async def`` functions that take a ``session`` argument:

    - the caller's session is not in a transaction: the decorator owns it — it begins,
      commits when the function returns, rolls back when it raises, and runs the *whole*
      function again on a retryable lock error (deadlock, lock timeout, serialization
      failure, busy SQLite database...);
    - the session is already in a transaction the decorator did not begin (nested use): the
      function runs once, nothing is committed or rolled back, errors go up to the owner;
    - with ``sessionmaker=`` and no session passed: a fresh session per attempt is injected as
      ``session`` and closed afterwards.

    Any other error is raised at once, after the rollback; a ``COMMIT`` that failed for any
    reason but a lock error the server reported (a lost connection may hide a successful
    commit) is never retried. When ``attempts`` or ``timeout`` (seconds, in all) run out, it
    raises :class:`~locksafe.LockUnavailable` from the last database error.

    Backoff is exponential with full jitter between ``wait_initial`` and ``wait_max`` seconds
    (tenacity's ``wait_random_exponential``); :func:`set_testing` makes it zero. ``retry_on``
    is a predicate or a collection of :class:`~locksafe.LockErrorKind`; ``on_retry`` receives
    a :class:`RetryDetails` before each sleep, which is also logged on ``locksafe.transactions``.

    >>> from sqlalchemy import create_engine, text
    >>> from sqlalchemy.orm import Session, sessionmaker
    >>> @transactional(attempts=3, sessionmaker=sessionmaker(create_engine("sqlite://")))
    ... def answer(*, session: Session = NEW_SESSION) -> int:
    ...     return session.execute(text("SELECT 42")).scalar_one()
    >>> answer()
    42
    """

    base = _Policy(  # validates the options now, at call time
        attempts=attempts,
        timeout=timeout,
        retry_on=retry_on,
        on_retry=on_retry,
        wait_initial=wait_initial,
        wait_max=wait_max,
        retry_after=retry_after,
        operation="",
    )

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        position = _session_parameter(func)
        if position is None:
            raise TypeError(
                f"@transactional: {func.__qualname__}() needs a `session` parameter (the "
                "decorator begins, commits and retries that session's transaction)"
            )
        policy = copy.copy(base)
        policy.operation = func.__qualname__
        if inspect.iscoroutinefunction(func):
            return _async_wrapper(func, policy, position, sessionmaker)
        return _sync_wrapper(func, policy, position, sessionmaker)

    if fn is not None:
        return decorate(fn)
    return decorate


def _sync_wrapper(
    func: Callable[..., T],
    policy: _Policy,
    position: int,
    sessionmaker: Callable[[], Any] | None,
) -> Callable[..., T]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        session = _find_session(position, args, kwargs)
        if session is None and sessionmaker is None:
            raise TypeError(
                f"{func.__qualname__}() got no session, and @transactional has no sessionmaker"
            )
        if session is not None and session.in_transaction():
            return func(*args, **kwargs)  # nested: the owner commits and retries

        unknown_commits: set[int] = set()

        def attempt_once() -> T:
            if session is None:
                assert sessionmaker is not None
                with sessionmaker() as fresh:
                    call_args, call_kwargs = _with_session(position, args, kwargs, fresh)
                    return run_in(fresh, call_args, call_kwargs)
            return run_in(session, args, kwargs)

        def run_in(owned: Any, call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> T:
            owned.begin()
            try:
                result = func(*call_args, **call_kwargs)
            except BaseException:
                _rollback(owned)
                raise
            try:
                owned.commit()
            except BaseException as exc:
                if _commit_unknown(exc):
                    unknown_commits.add(id(exc))
                _rollback(owned)
                raise
            return result

        started = time.monotonic()
        retrying = tenacity.Retrying(**policy.retrying_kwargs(unknown_commits))
        attempt_number = 0
        try:
            for attempt in retrying:
                attempt_number = attempt.retry_state.attempt_number
                with attempt:
                    result = attempt_once()
                if not attempt.retry_state.outcome or not attempt.retry_state.outcome.failed:
                    return result
        except Exception as exc:
            error = policy.final_error(exc, unknown_commits, attempt_number, started)
            if error is exc:
                raise
            raise error from exc
        raise AssertionError("unreachable: tenacity returned without an outcome")

    return wrapper


def _async_wrapper(
    func: Callable[..., Awaitable[T]],
    policy: _Policy,
    position: int,
    sessionmaker: Callable[[], Any] | None,
) -> Callable[..., Awaitable[T]]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        session = _find_session(position, args, kwargs)
        if session is None and sessionmaker is None:
            raise TypeError(
                f"{func.__qualname__}() got no session, and @transactional has no sessionmaker"
            )
        if session is not None and session.in_transaction():
            return await func(*args, **kwargs)

        unknown_commits: set[int] = set()

        async def attempt_once() -> T:
            if session is None:
                assert sessionmaker is not None
                async with sessionmaker() as fresh:
                    call_args, call_kwargs = _with_session(position, args, kwargs, fresh)
                    return await run_in(fresh, call_args, call_kwargs)
            return await run_in(session, args, kwargs)

        async def run_in(owned: Any, call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> T:
            await owned.begin()
            try:
                result = await func(*call_args, **call_kwargs)
            except BaseException:
                await _rollback_async(owned)
                raise
            try:
                await owned.commit()
            except BaseException as exc:
                if _commit_unknown(exc):
                    unknown_commits.add(id(exc))
                await _rollback_async(owned)
                raise
            return result

        started = time.monotonic()
        retrying = tenacity.AsyncRetrying(**policy.retrying_kwargs(unknown_commits))
        attempt_number = 0
        try:
            async for attempt in retrying:
                attempt_number = attempt.retry_state.attempt_number
                with attempt:
                    result = await attempt_once()
                if not attempt.retry_state.outcome or not attempt.retry_state.outcome.failed:
                    return result
        except Exception as exc:
            error = policy.final_error(exc, unknown_commits, attempt_number, started)
            if error is exc:
                raise
            raise error from exc
        raise AssertionError("unreachable: tenacity returned without an outcome")

    return cast(Callable[..., Awaitable[T]], wrapper)
