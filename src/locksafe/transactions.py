"""One atomic transaction, retried on lock errors: :func:`transactional`.

The retry schedule is tenacity's (``wait_random_exponential``: exponential backoff with full
jitter; bounded by attempts and, as ``stop_before_delay``, by total time); what locksafe adds
is *what* is retried and *how*: only errors that :func:`~locksafe.is_retryable_lock_error`
calls retryable (the error itself reports a lock error, and nothing may have been committed),
always the whole transaction from its ``BEGIN``, never a transaction the decorator did not
begin, never after a ``COMMIT`` whose outcome is unknown (the rules: :class:`_CommitOutcome`),
and never an interruption (``KeyboardInterrupt``, a cancelled task) or a
:class:`~locksafe.LockUnavailable` (an inner :func:`transactional` already gave up).

One loop serves sync and ``async def`` functions (:class:`_Call`).

:data:`retry_if_lock_error` is the same rule for a tenacity policy of your own: lock errors
are retried, anything else goes up at once.

>>> import sqlite3, tenacity
>>> attempts = []
>>> @tenacity.retry(retry=retry_if_lock_error, stop=tenacity.stop_after_attempt(3))
... def write() -> int:
...     attempts.append(1)
...     if len(attempts) < 3:
...         raise sqlite3.OperationalError("database is locked")
...     return len(attempts)
>>> write()
3
>>> @tenacity.retry(retry=retry_if_lock_error, stop=tenacity.stop_after_attempt(3))
... def broken() -> None:
...     attempts.append(1)
...     raise ValueError("a bug, not a lock error")
>>> attempts.clear()
>>> broken()
Traceback (most recent call last):
ValueError: a bug, not a lock error
>>> len(attempts)
1
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import functools
import inspect
import logging
import math
import random
import re
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar, cast, overload

import tenacity
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import PendingRollbackError
from sqlalchemy.orm import (
    Session,
    SessionTransaction,
    SessionTransactionOrigin,
    scoped_session,
)
from sqlalchemy.orm import (
    sessionmaker as sync_sessionmaker,
)
from sqlalchemy.orm.session import SessionTransactionState
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.util import ScopedRegistry

from locksafe._sa import for_update_arg, rollback_exception, session_transaction_state
from locksafe.classify import (
    MAY_HAVE_COMMITTED,
    classify_raised,
    is_retryable_lock_error,
)
from locksafe.kinds import CallerTransactionError, LockErrorKind, LockUnavailable
from locksafe.options import check_number, check_seconds
from locksafe.timeouts import lock_waits_until

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

_MAX_CHAIN: Final = 64


def _mark_may_have_committed(exc: BaseException) -> None:
    """Mark ``exc`` as an error after which work may be committed (a COMMIT whose outcome is
    unknown, an error raised after the function committed itself): no rule calls it
    retryable (:func:`~locksafe.is_retryable_lock_error`), so no :func:`transactional`
    retries it, the one that saw it happen or one around it, and no 503 invites a client to
    send it again."""
    # an exception that refuses attributes: the call's own record (``final``) remains
    with contextlib.suppress(Exception):
        setattr(exc, MAY_HAVE_COMMITTED, True)


def _settled(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from, a :class:`LockUnavailable` (a
    :func:`transactional` inside already retried and gave up; retrying again would multiply
    its attempts and its time budget) or an error after which work may be committed (a
    :func:`transactional` inside lost the connection during its COMMIT...).

    Never raises: an exception whose attribute access fails (a proxy whose target is gone)
    ends the walk there, and the error the function raised goes on as it is."""
    node: object = exc
    for _ in range(_MAX_CHAIN):
        try:
            if isinstance(node, LockUnavailable):
                return True
            if getattr(node, MAY_HAVE_COMMITTED, False) is True:
                return True
            node = getattr(node, "__cause__", None)
            if not isinstance(node, BaseException):
                return False
        except Exception:
            return False
    return False


def _never_retried(exc: BaseException) -> bool:
    """What no ``retry_on`` can make retryable: interruptions (``KeyboardInterrupt``,
    ``SystemExit``, a cancelled task, ``GeneratorExit``: anything not an ``Exception``), lock
    failures an inner :func:`transactional` already gave up on, and errors after which work
    may be committed."""
    return not isinstance(exc, Exception) or _settled(exc)


def _is_retryable(exc: BaseException) -> bool:
    """What a retry mechanism retries: what :func:`~locksafe.is_retryable_lock_error` calls
    retryable, never what :func:`_never_retried` excludes."""
    return not _never_retried(exc) and is_retryable_lock_error(exc)


#: A tenacity ``retry`` predicate: retry when :func:`~locksafe.is_retryable_lock_error` says
#: so (the exception itself reports a retryable lock error, and nothing may have been
#: committed), as :func:`transactional` does; never an interruption, never a
#: :class:`~locksafe.LockUnavailable`, never an application error raised while handling a lock

#: error (``except OperationalError: raise Conflict()``).
#:
#: In a tenacity policy of your own (an example that runs is in this module's docstring):
#:
#: .. code-block:: python
#:
#:     @tenacity.retry(retry=locksafe.retry_if_lock_error, stop=tenacity.stop_after_attempt(3))
#:     def write(): ...
retry_if_lock_error: Final = tenacity.retry_if_exception(_is_retryable)

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

    >>> import sqlite3
    >>> from sqlalchemy import create_engine
    >>> from sqlalchemy.orm import Session, sessionmaker
    >>> waits: list[float] = []
    >>> @transactional(
    ...     attempts=3, wait_initial=1.0, wait_max=5.0,
    ...     on_retry=lambda details: waits.append(details.wait),
    ...     sessionmaker=sessionmaker(create_engine("sqlite://")),
    ... )
    ... def busy_twice(*, session: Session = NEW_SESSION) -> int:
    ...     if len(waits) < 2:
    ...         raise sqlite3.OperationalError("database is locked")
    ...     return len(waits)
    >>> set_testing(True)
    >>> busy_twice(), waits   # two retries, and no backoff sleep
    (2, [0.0, 0.0])
    >>> set_testing(False)
    """
    global _testing
    _testing = testing


@dataclass(frozen=True)
class RetryDetails:
    """What :func:`transactional` tells ``on_retry`` (and the log) before it sleeps.

    >>> import sqlite3
    >>> from sqlalchemy import create_engine
    >>> from sqlalchemy.orm import Session, sessionmaker
    >>> seen: list[RetryDetails] = []
    >>> @transactional(
    ...     attempts=2, wait_initial=0.0, on_retry=seen.append,
    ...     sessionmaker=sessionmaker(create_engine("sqlite://")),
    ... )
    ... def once_busy(*, session: Session = NEW_SESSION) -> str:
    ...     if not seen:
    ...         raise sqlite3.OperationalError("database is locked")
    ...     return "done"
    >>> once_busy()
    'done'
    >>> seen[0].attempt, seen[0].kind.value, seen[0].operation.endswith("once_busy")
    (1, 'database_busy', True)
    """

    #: The attempt that just failed (1 for the first).
    attempt: int
    #: The lock failure, or ``None`` when a custom ``retry_on`` retried another error.
    kind: LockErrorKind | None
    #: Seconds it will sleep before the next attempt.
    wait: float
    #: Seconds since the first attempt began.
    elapsed: float
    exception: BaseException
    #: The decorated function's qualified name.
    operation: str


# -- whether work may be committed: the rules -------------------------------------------------
#
# After a failure inside the decorator's transaction, one question decides whether running the
# function again is safe: may anything have been committed? The answers, from what is known at
# that point (where the error came from, the state SQLAlchemy left the transaction in, whether
# the function committed itself, what the error reports), and nothing else:


class _CommitOutcome(enum.Enum):
    """What is known about a failed transaction's work (:func:`_outcome_of_body_error`,
    :func:`_outcome_of_commit_error`)."""

    #: Nothing was committed: the error is judged like any other (the retry rule decides).
    NOT_COMMITTED = "not committed"
    #: A COMMIT was sent and failed with something else than a lock error the server reported
    #: (a lost connection, a timeout...): it may have happened. Never retried.
    UNKNOWN = "unknown"
    #: The function committed the transaction itself: running it again would redo that work.
    #: Never retried.
    COMMITTED = "committed"


def _outcome_of_body_error(
    error: BaseException, state: object, *, function_committed: bool
) -> _CommitOutcome:
    """The function raised ``error`` inside the decorator's transaction, which SQLAlchemy left
    in ``state`` (a ``SessionTransactionState``; ``None`` when unknown); ``function_committed``:
    the function committed it itself (a session ``after_commit`` was seen).

    - ``PREPARED``: the function's own ``commit()`` flushed and sent the COMMIT, which failed.
      As for the decorator's COMMIT, only a lock error the server reported proves nothing
      was committed.
    - it committed (the transaction is ``CLOSED`` after a commit as after a rollback, hence
      ``function_committed``): whatever it raised after that comes after committed work.
    - otherwise (active, deactivated by a failed flush, rolled back or closed by the function:
      ``except OperationalError: session.rollback(); raise``): nothing was committed.
    """
    if state is SessionTransactionState.PREPARED:
        return _CommitOutcome.NOT_COMMITTED if _is_retryable(error) else _CommitOutcome.UNKNOWN
    if function_committed or state is SessionTransactionState.COMMITTED:
        return _CommitOutcome.COMMITTED
    return _CommitOutcome.NOT_COMMITTED


def _outcome_of_commit_error(error: BaseException) -> _CommitOutcome:
    """The function returned and the decorator's COMMIT (with the flush before it) raised
    ``error``: only a lock error the server reported proves the COMMIT did not happen; anything
    else (a lost connection...) may hide a successful commit."""
    return _CommitOutcome.NOT_COMMITTED if _is_retryable(error) else _CommitOutcome.UNKNOWN


# -- validation of the options ----------------------------------------------------------------


_number = check_number
_seconds = check_seconds


def _attempts(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"attempts={value!r} must be an int ≥ 1")
    if value < 1:
        raise ValueError(f"attempts={value!r} must be an int ≥ 1")
    return value


def _timeout(value: object) -> float:
    seconds = _number("timeout", value)
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"timeout={value!r} must be > 0 seconds (float('inf'): no time limit)")
    return seconds


#: How much longer each early attempt's lock waits may last than the one before (×2 and ×4
#: measured: bench/storm_options.py).
_EARLY_GROWTH = 2.0


def _early_lock_timeout(value: object) -> float | None:
    if value is None:
        return None
    seconds = _number("early_lock_timeout", value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"early_lock_timeout={value!r} must be a finite number of seconds > 0, or None "
            "(no early bound)"
        )
    return seconds


def _retry_rule(
    retry_on: Callable[[BaseException], bool] | Collection[LockErrorKind] | None,
) -> Callable[[BaseException], bool]:
    if retry_on is None:
        return is_retryable_lock_error  # the one rule (and the same function)
    if callable(retry_on):
        return retry_on
    if isinstance(retry_on, str | bytes) or not isinstance(retry_on, Collection):
        raise TypeError(
            f"retry_on={retry_on!r} must be a predicate or a collection of LockErrorKind"
        )
    try:
        kinds = frozenset(LockErrorKind(kind) for kind in retry_on)
    except ValueError:
        raise ValueError(
            f"retry_on={retry_on!r}: every item must be a LockErrorKind "
            f"({', '.join(kind.value for kind in LockErrorKind)})"
        ) from None
    return lambda exc: classify_raised(exc) in kinds


class _Policy:
    """The retry policy of one decorated function, resolved once at decoration time."""

    def __init__(
        self,
        *,
        attempts: int,
        timeout: float,
        retry_on: Callable[[BaseException], bool] | Collection[LockErrorKind] | None,
        on_retry: Callable[[RetryDetails], object] | None,
        wait_initial: float,
        wait_max: float,
        retry_after: float | None,
        operation: str,
        early_lock_timeout: float | None = None,
    ) -> None:
        self.attempts = _attempts(attempts)
        self.timeout = _timeout(timeout)
        self.early_lock_timeout = _early_lock_timeout(early_lock_timeout)
        wait_initial = _seconds("wait_initial", wait_initial)
        wait_max = _seconds("wait_max", wait_max)
        if wait_initial > wait_max:
            raise ValueError(
                f"wait_initial={wait_initial!r} and wait_max={wait_max!r} must satisfy "
                "0 ≤ wait_initial ≤ wait_max"
            )
        if on_retry is not None and not callable(on_retry):
            raise TypeError(f"on_retry={on_retry!r} must be callable or None")
        self.should_retry = _retry_rule(retry_on)
        self.on_retry = on_retry
        self.operation = operation
        self.retry_after = (
            _seconds("retry_after", retry_after)
            if retry_after is not None
            else float(max(1, math.ceil(wait_max)))
        )
        self.wait_initial = wait_initial
        self.wait_max = wait_max

    def early_bound(self, attempt: int) -> float | None:
        """The early bound of attempt number ``attempt`` (seconds; ``None``: none):
        ``early_lock_timeout``, doubled each attempt; none on the last attempt, which waits
        as long as the ``timeout`` allows, nor once it would reach the ``timeout``."""
        if self.early_lock_timeout is None or attempt >= self.attempts:
            return None
        try:
            bound = self.early_lock_timeout * _EARLY_GROWTH ** (attempt - 1)
        except OverflowError:
            return None
        return bound if bound < self.timeout else None

    def wait(self, attempt: int) -> float:
        """Seconds to sleep after attempt number ``attempt`` failed: full jitter, uniform
        between 0 and ``wait_initial * 2 ** (attempt - 1)``, at most ``wait_max`` (tenacity's
        ``wait_random_exponential``); 0 under :func:`set_testing`."""
        if _testing:
            return 0.0
        try:
            high = min(self.wait_max, self.wait_initial * 2.0 ** (attempt - 1))
        except OverflowError:
            high = self.wait_max
        return random.uniform(0.0, high)


# -- one call: the attempt loop, written once for sync and async functions -------------------
#
# The loop and each attempt are coroutines. The async wrapper awaits them; the sync wrapper runs
# them to their end in one go (``_run_sync``), which it can because every step it awaits is
# done when it is created: the only difference between the two wrappers is in their steps
# (``_SyncSteps``, ``_AsyncSteps``): calling the function, entering the session's blocks,
# settling what a session method returned (an AsyncSession's coroutines are awaited), sleeping.


async def _done(value: T) -> T:
    return value


class _Leaked(Exception):
    """A ``StopIteration`` that the sync function raised, carried through the steps: raised
    as it is out of a coroutine, it would become a ``RuntimeError`` (PEP 479). :func:`_run_sync`
    raises the ``StopIteration`` itself, as the decorated function did."""

    def __init__(self, stop: StopIteration) -> None:
        super().__init__(stop)
        self.stop = stop


class _Entered:
    """A sync context manager, entered and exited with ``async with`` by the one loop."""

    __slots__ = ("manager",)

    def __init__(self, manager: contextlib.AbstractContextManager[Any]) -> None:
        self.manager = manager

    async def __aenter__(self) -> Any:
        return self.manager.__enter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return self.manager.__exit__(*exc_info)


class _SyncSteps:
    """The steps of a sync function's call: each does its work when called and returns it
    done, so that nothing the loop awaits suspends."""

    is_async = False

    def call(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return _done(func(*args, **kwargs))
        except StopIteration as stop:
            raise _Leaked(stop) from stop

    def settle(self, value: Any) -> Awaitable[Any]:
        return _done(value)

    def block(self, manager: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return _Entered(manager)

    def sleep(self, seconds: float) -> Awaitable[None]:
        time.sleep(seconds)
        return _done(None)


class _AsyncSteps(_SyncSteps):
    """The steps of an ``async def`` function's call: awaited."""

    is_async = True

    async def call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return await func(*args, **kwargs)

    async def settle(self, value: Any) -> Any:
        return await value if inspect.isawaitable(value) else value

    def block(self, manager: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return cast(contextlib.AbstractAsyncContextManager[Any], manager)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


_SYNC: Final = _SyncSteps()
_ASYNC: Final = _AsyncSteps()


def _run_sync(call: Coroutine[Any, Any, T]) -> T:
    """Run the coroutine of a sync function's call to its end: it never suspends (its steps
    are done when created)."""
    try:
        call.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    except _Leaked as leaked:
        stop = leaked.stop
    else:
        call.close()
        raise RuntimeError("@transactional: a sync call suspended (a step awaited something)")
    raise stop


class _Decorated:
    """What the decorator resolved for one function, shared by all its calls."""

    __slots__ = ("func", "policy", "position", "sessionmaker", "steps")

    def __init__(
        self,
        func: Callable[..., Any],
        policy: _Policy,
        position: int,
        sessionmaker: Callable[[], Any] | None,
    ) -> None:
        self.func = func
        self.policy = policy
        self.position = position
        self.sessionmaker = sessionmaker
        self.steps = _ASYNC if inspect.iscoroutinefunction(func) else _SYNC


class _Call:
    """One call of a decorated function: its attempts, and what each failure means."""

    def __init__(self, decorated: _Decorated, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.decorated = decorated
        self.policy = decorated.policy
        self.steps = decorated.steps
        self.args = args
        self.kwargs = kwargs
        self.started = time.monotonic()
        self.attempts = 0
        #: The error of the current attempt that goes up as it is, whatever the retry rule
        #: says: a COMMIT with an unknown outcome, work after a commit, misuse, an error of a
        #: call that joined its caller's transaction.
        self.settled: BaseException | None = None
        #: The current attempt's early lock-wait bound (seconds), where it ended a lock wait.
        self.early: float | None = None
        #: The lock timeout the early bound caused in the current attempt (the first).
        self.early_error: BaseException | None = None
        #: The next attempt is the last (the early bound cut a wait short near the deadline).
        self.final = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def settle(self, error: BaseException) -> BaseException:
        self.settled = error
        return error

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> Any:
        decorated, policy = self.decorated, self.policy
        given = _find_session(decorated.position, self.args, self.kwargs)
        if given is None and decorated.sessionmaker is None:
            raise _no_session(policy)
        session = _current(given)
        if given is not None:
            _check_session(
                session, given, policy.operation, is_async=self.steps.is_async, made=False
            )
            join = _join_callers(session, policy.operation)
            if join:
                return await self.joined(self.args, self.kwargs)
            if join is None:
                await self.steps.settle(session.commit())  # the caller's autobegun one only read
        while True:
            self.attempts += 1
            self.settled = None
            self.early = None
            self.early_error = None
            try:
                return await self.attempt(session)
            except Exception as exc:
                error = exc
            # decided outside the except block, as tenacity did: what a retry_on or on_retry
            # callback raises is not chained to the error
            if not self.retries(error):
                raise error
            wait = policy.wait(self.attempts)
            if (
                self.attempts < policy.attempts
                and self.elapsed() + wait >= policy.timeout
                and self.cut_short(error)
            ):
                # the early bound ended a wait that the deadline allowed: the time left is
                # the last attempt's, at once, without the early bound (as if it had waited)
                wait, self.final = 0.0, True
            if self.attempts >= policy.attempts or self.elapsed() + wait >= policy.timeout:
                unavailable = self.gave_up(error)
                if unavailable is error:
                    raise error
                raise unavailable from error
            self.before_sleep(error, wait)
            await self.steps.sleep(wait)

    def cut_short(self, error: Exception) -> bool:
        """Whether ``error`` is a lock wait the attempt's early bound ended while the call's
        ``timeout`` had time left."""
        return (
            self.early is not None
            and not self.final
            and error is self.early_error
            and self.elapsed() < self.policy.timeout
        )

    def retries(self, error: Exception) -> bool:
        """Whether the call runs again after ``error``: never an error this attempt settled,
        nor what no rule may retry (:func:`_never_retried`); a lock wait the early bound ended
        always (the wait goes on in the next attempt, whatever ``retry_on`` says: it is
        locksafe's, not the server's); else the policy's rule decides."""
        if error is self.settled or _never_retried(error):
            return False
        return error is self.early_error or bool(self.policy.should_retry(error))

    # -- one attempt ------------------------------------------------------------------------

    async def attempt(self, session: Any) -> Any:
        if session is not None:
            return await self.owned(session, self.args, self.kwargs)
        decorated = self.decorated
        sessionmaker = decorated.sessionmaker
        assert sessionmaker is not None
        registry = _registry(sessionmaker)
        created = registry is not None and not registry.has()
        made = sessionmaker()
        try:
            _check_session(
                made, made, self.policy.operation, is_async=self.steps.is_async, made=True
            )
        except TypeError as error:
            self.settle(error)
            raise
        args, kwargs = _with_session(decorated.position, self.args, self.kwargs, made)
        join = _join_callers(made, self.policy.operation)  # a scoped session in use?
        if join:
            return await self.joined(args, kwargs)
        if join is None:
            await self.steps.settle(made.commit())  # its caller's autobegun one only read
        if registry is None:
            async with self.steps.block(made):
                return await self.owned(made, args, kwargs)
        try:
            return await self.owned(made, args, kwargs)
        finally:
            if created:  # only the session this call created is closed, and forgotten
                await self.steps.settle(sessionmaker.remove())  # type: ignore[attr-defined]

    async def joined(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The session is in a transaction its caller began (explicitly, or an outer
        @transactional): run once; the owner commits, rolls back and retries."""
        try:
            result = await self.steps.call(self.decorated.func, args, kwargs)
            self.refuse_awaitable(result)
        except BaseException as exc:
            self.settle(exc)
            raise
        return result

    async def owned(self, session: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The function in a transaction of the decorator's on ``session``: begun, committed
        when the function returns, rolled back when it raises; its lock waits bounded by the
        call's deadline (its flush at the commit included)."""
        steps, operation = self.steps, self.policy.operation
        body_error: BaseException | None = None
        try:
            async with steps.block(self.lock_waits(session)), steps.block(session.begin()) as begun:
                tx = getattr(begun, "sync_transaction", begun)
                sync = getattr(session, "sync_session", session)
                commits = _Commits(sync)
                swallowed: PendingRollbackError | None = None
                try:
                    with commits:
                        result = await steps.call(self.decorated.func, args, kwargs)
                    self.refuse_awaitable(result)
                    swallowed = _swallowed(sync, tx, operation)
                    if swallowed is not None:
                        raise swallowed
                    if self.early_error is not None:
                        # the function caught a lock wait the early bound ended (in a
                        # savepoint) and returned: what it did instead is not committed
                        raise self.early_error
                except BaseException as exc:
                    body_error = exc
                    outcome = _outcome_of_body_error(
                        exc, _state(tx), function_committed=commits.count > 0
                    )
                    if outcome is not _CommitOutcome.NOT_COMMITTED:
                        self.may_have_committed(exc)
                    elif (
                        self.early_error is not None
                        and exc is not self.early_error
                        and exc is not swallowed  # locksafe's own word for it, as clear
                        and isinstance(exc, Exception)
                    ):
                        # an error the function raised after catching the early bound's
                        # lock timeout (its "busy"): the wait goes on in the next attempt
                        body_error = self.early_error
                        # as it was raised (its __cause__ is the driver's error); exc is its
                        # __context__
                        raise self.early_error  # noqa: B904
                    raise
        except BaseException as exc:
            error = self.exit_error(exc, body_error)
            if error is exc:
                raise
        else:
            return result
        raise error  # the function's error, not the rollback's (logged)

    def lock_waits(self, session: Any) -> Any:
        """The deadline, for one attempt on ``session``: its lock waits end when the call's
        ``timeout`` does (:func:`~locksafe.lock_timeout`, where that is tighter than the
        connection's own bound), and on a server whose deadlock detection is delayed, before
        the last attempt, after the attempt's early bound (:meth:`_Policy.early_bound`)."""
        early = None if self.final else self.policy.early_bound(self.attempts)
        if not math.isfinite(self.policy.timeout) and early is None:
            return contextlib.nullcontext()
        block = lock_waits_until(session, self.started + self.policy.timeout, early)
        if early is not None:
            block.on_early_error = functools.partial(self.early_bound_error, early)
        return block

    def early_bound_error(self, bound: float, error: BaseException) -> None:
        """A statement failed on a connection the attempt's early bound governs: if the bound
        ended a lock wait (a lock timeout), the attempt is void, whatever the function does
        with the error — its first such error goes up from the attempt, and is retried."""
        if self.early_error is None and classify_raised(error) is LockErrorKind.LOCK_TIMEOUT:
            self.early, self.early_error = bound, error

    def exit_error(self, exc: BaseException, body_error: BaseException | None) -> BaseException:
        """What to raise when the transaction block raised ``exc``; ``body_error`` is what the
        function itself raised, ``None`` if it returned (then the COMMIT at exit failed)."""
        if body_error is None:
            if _outcome_of_commit_error(exc) is not _CommitOutcome.NOT_COMMITTED:
                self.may_have_committed(exc)
            return exc
        if exc is body_error or not isinstance(exc, Exception):
            return exc  # an interruption during the rollback wins
        log.error(
            "%s: rollback after a failed transaction failed too",
            self.policy.operation,
            exc_info=exc,
        )
        return body_error

    def may_have_committed(self, exc: BaseException) -> None:
        """``exc`` goes up as it is, from this call and from any call around it."""
        self.settle(exc)
        _mark_may_have_committed(exc)

    def refuse_awaitable(self, result: object) -> None:
        """A sync-decorated function returned an awaitable: its work would run after the
        decorator committed, outside the transaction."""
        if self.steps.is_async or not inspect.isawaitable(result):
            return
        close = getattr(result, "close", None)
        if callable(close):
            close()  # no "coroutine ... was never awaited" warning
        raise self.settle(
            TypeError(
                f"@transactional: {self.policy.operation}() returned an awaitable; the "
                "decorator saw a sync function, so the awaited work would run outside its "
                "transaction (decorate an `async def` function)"
            )
        )

    # -- telling ----------------------------------------------------------------------------

    def before_sleep(self, error: Exception, wait: float) -> None:
        details = RetryDetails(
            attempt=self.attempts,
            kind=classify_raised(error),
            wait=wait,
            elapsed=self.elapsed(),
            exception=error,
            operation=self.policy.operation,
        )
        what = details.kind.value if details.kind is not None else type(error).__name__
        early = self.early is not None and details.kind is LockErrorKind.LOCK_TIMEOUT
        if early:  # expected, cheap, and many under contention: not a warning
            what += f" (its early bound, {self.early:.3f}s: a possible deadlock)"
        log.log(
            logging.INFO if early else logging.WARNING,
            "%s: attempt %d failed with %s after %.3fs; retrying in %.3fs",
            details.operation,
            details.attempt,
            what,
            details.elapsed,
            details.wait,
            extra={
                "locksafe_attempt": details.attempt,
                "locksafe_kind": details.kind.value if details.kind is not None else None,
                "locksafe_wait": details.wait,
                "locksafe_elapsed": details.elapsed,
                "locksafe_operation": details.operation,
            },
        )
        if self.policy.on_retry is not None:
            self.policy.on_retry(details)

    def gave_up(self, error: Exception) -> BaseException:
        """What to raise when attempts or time ran out on ``error``, which the policy retries:
        :class:`~locksafe.LockUnavailable` from it, or for an error a custom ``retry_on``
        retried that is no lock error, ``error`` itself."""
        elapsed = self.elapsed()
        kind = classify_raised(error)
        log.warning(
            "%s: giving up after %d attempt%s in %.3fs, failing with %s",
            self.policy.operation,
            self.attempts,
            "" if self.attempts == 1 else "s",
            elapsed,
            kind.value if kind is not None else type(error).__name__,
            extra={
                "locksafe_attempts": self.attempts,
                "locksafe_kind": kind.value if kind is not None else None,
                "locksafe_elapsed": elapsed,
                "locksafe_operation": self.policy.operation,
            },
        )
        if kind is None:
            return error
        unavailable = LockUnavailable(
            kind,
            attempts=self.attempts,
            elapsed=elapsed,
            retry_after=self.policy.retry_after,
            operation=self.policy.operation,
        )
        unavailable.__context__ = error  # as if raised while handling it
        return unavailable


# -- the session parameter --------------------------------------------------------------------


def _session_parameter(fn: Callable[..., Any]) -> inspect.Parameter | None:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    parameter = parameters.get("session")
    if parameter is None or parameter.kind in (
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ):
        return None
    return parameter


def _session_position(fn: Callable[..., Any], parameter: inspect.Parameter) -> int:
    """The position of ``session`` (-1: keyword-only)."""
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
        return -1
    return list(inspect.signature(fn).parameters).index("session")


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


def _registry(obj: object) -> ScopedRegistry[Any] | None:
    """The registry of a ``scoped_session`` / ``async_scoped_session`` (Airflow's
    ``settings.Session`` is one), ``None`` for anything else."""
    registry = getattr(obj, "registry", None) if callable(obj) else None
    return registry if isinstance(registry, ScopedRegistry) else None


def _current(session: Any) -> Any:
    """The session itself, or for a scoped session the registry's session for this scope
    (the one every call through the proxy reaches)."""
    return session() if _registry(session) is not None else session


# -- what the session may be -----------------------------------------------------------------


def _async_session_types() -> tuple[type, type, type] | None:
    """SQLAlchemy's AsyncSession, async_sessionmaker and async_scoped_session; ``None`` when
    its asyncio extension was never imported (then nothing is one of them)."""
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    if module is None:
        return None
    return module.AsyncSession, module.async_sessionmaker, module.async_scoped_session


def _check_sessionmaker(
    sessionmaker: object, operation: str, *, is_async: bool, kind: bool = True
) -> None:
    """At decoration time: ``sessionmaker`` must be callable (or ``None``) and, with ``kind``,
    not of the other kind (``async_sessionmaker`` for a sync function, ``sessionmaker`` for an
    ``async def`` one)."""
    if sessionmaker is None:
        return
    if not callable(sessionmaker):
        raise TypeError(
            f"sessionmaker={sessionmaker!r} must be a sessionmaker / scoped_session "
            "(async_sessionmaker / async_scoped_session for an `async def` function), any "
            "callable returning a new session, or None"
            + (" (an Engine is not one: sessionmaker(engine))" if _is_engine(sessionmaker) else "")
        )
    if not kind:
        return
    if is_async and isinstance(sessionmaker, sync_sessionmaker | scoped_session):
        raise TypeError(
            f"sessionmaker={sessionmaker!r}: @transactional {operation}() is an `async def` "
            "function, so sessionmaker= must make AsyncSessions (async_sessionmaker or "
            "async_scoped_session), not Sessions"
        )
    types = _async_session_types()
    if not is_async and types is not None and isinstance(sessionmaker, types[1:]):
        raise TypeError(
            f"sessionmaker={sessionmaker!r}: @transactional {operation}() is a sync "
            "function, so sessionmaker= must make Sessions (sessionmaker or "
            "scoped_session), not AsyncSessions (decorate an `async def` function to use "
            "an async_sessionmaker)"
        )


def _is_engine(obj: object) -> bool:
    return isinstance(obj, Engine) or isinstance(getattr(obj, "sync_engine", None), Engine)


def _check_session(
    session: object, given: object, operation: str, *, is_async: bool, made: bool
) -> None:
    """At call time: ``session`` (for a scoped ``given``, the registry's session) must be a
    ``Session`` for a sync function, an ``AsyncSession`` for an ``async def`` one."""
    is_sync_session = isinstance(session, Session)
    types = _async_session_types()
    is_async_session = types is not None and isinstance(session, types[0])
    if (is_async and is_async_session) or (not is_async and is_sync_session):
        return
    what = "sessionmaker= returned " if made else "got session="
    kind = "an `async def`" if is_async else "a sync"
    wanted = (
        "an AsyncSession (or an async_scoped_session)"
        if is_async
        else "a Session (or a scoped_session)"
    )
    if is_sync_session or is_async_session:
        hint = (
            " (decorate an `async def` function for an AsyncSession; inside "
            "`await session.run_sync(fn)`, fn gets the Session to pass)"
            if not is_async
            else " (a sync Session: decorate a sync function, or pass an AsyncSession)"
        )
    elif _is_engine(given):
        hint = " (an Engine is not a session: pass Session(engine), or use sessionmaker=)"
    else:
        hint = ""
    raise TypeError(
        f"@transactional: {operation}() {what}{given!r}: session= must be {wanted} for "
        f"{kind} function{hint}"
    )


# -- the caller's transaction -----------------------------------------------------------------
#
# A session already in a transaction when the decorated function is called:
#
# - begun explicitly (``session.begin()``, ``with session.begin():``, an outer @transactional):
#   its owner commits it. The call joins it: runs once, no commit, no rollback, no retry.
# - autobegun (a read before the call, as in ``Depends(get_db)``), with nothing in it that a
#   COMMIT would make permanent or a ROLLBACK would lose: the decorator takes the session over.
#   It ends that transaction with a COMMIT (nothing to commit; the session's
#   ``expire_on_commit`` applies, as after any commit) and runs the function in transactions of
#   its own, from their BEGIN, retried, committed: the locks the function takes are taken, and
#   committed, in the decorator's transaction.
# - autobegun with work in it (changes pending or flushed, a write, a locked SELECT, an open
#   savepoint, a failed flush): nobody asked to commit it, and the decorator cannot retry the
#   function without losing it. CallerTransactionError, before the function runs.

#: Autobegun session transactions in which a statement other than a plain SELECT ran (a
#: flush's INSERT/UPDATE/DELETE, a Core or text write, a locked SELECT, a SAVEPOINT...).
_worked: weakref.WeakSet[SessionTransaction] = weakref.WeakSet()
#: id(Connection) -> the autobegun session transaction it serves (weakly, with the Connection,
#: which the lookup checks). Keyed by id(), not a WeakKeyDictionary: it is read for every
#: statement of every engine, and a weak-keyed lookup costs about 0.3 µs more there.
_serving: dict[int, tuple[weakref.ref[Connection], weakref.ref[SessionTransaction]]] = {}
_tracking = False

_SELECT: Final = re.compile(r"\s*(\(\s*)*select\b", re.IGNORECASE)
_NOT_ONLY_READING: Final = re.compile(
    r"\bfor\s+(update|share|no\s+key\s+update|key\s+share)\b|\block\s+in\s+share\s+mode\b"
    r"|\binto\b",
    re.IGNORECASE,
)


def _reads_only(statement: object) -> bool:
    """Whether ``statement`` is a plain SELECT: no write, no row lock. Anything else counts
    as work (a SAVEPOINT, DDL, a function called on its own, text that is not a SELECT)."""
    if isinstance(statement, str):
        text = statement
    elif isinstance(statement, TextClause):
        text = statement.text
    elif getattr(statement, "is_select", False) is True:
        if for_update_arg(statement) is not None:
            return False  # a locked SELECT (with_row_locks, with_for_update)
        element = getattr(statement, "element", None)  # text().columns(): its text
        if not isinstance(element, TextClause):
            return True
        text = element.text
    else:
        return False
    return _SELECT.match(text) is not None and _NOT_ONLY_READING.search(text) is None


def _serve(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    """Session ``after_begin``: remember which autobegun transaction ``connection`` serves."""
    root = session.get_transaction()
    if root is None or root.origin is not SessionTransactionOrigin.AUTOBEGIN:
        return
    key = id(connection)

    def gone(_: object, key: int = key) -> None:
        entry = _serving.get(key)
        if entry is not None and entry[0]() is None:
            del _serving[key]

    _serving[key] = (weakref.ref(connection, gone), weakref.ref(root))


def _note_statement(
    conn: Connection, clauseelement: Any, multiparams: Any, params: Any, options: Any
) -> None:
    """Engine ``before_execute``: a statement that is not a plain SELECT, on a connection that
    serves an autobegun session transaction, marks that transaction as holding work."""
    entry = _serving.get(id(conn))
    if entry is None or entry[0]() is not conn:
        return  # the common case: an explicit or decorator-owned transaction, or no session
    root = entry[1]()
    if root is None or root in _worked or _reads_only(clauseelement):
        return
    _worked.add(root)


def _track_caller_work() -> None:
    """Installed when the first function is decorated: work done in autobegun transactions
    before that is not seen (it is committed, never lost, by a call that takes them over)."""
    global _tracking
    if _tracking:
        return
    event.listen(Session, "after_begin", _serve)
    event.listen(Session, "after_commit", _count_commit)
    event.listen(Engine, "before_execute", _note_statement)
    _tracking = True


def _callers_work(session: Session, root: SessionTransaction) -> str | None:
    """What an autobegun transaction holds that its COMMIT would make permanent or its
    ROLLBACK would lose; ``None``: nothing (reads only, as far as locksafe can see)."""
    if not root.is_active:
        return "a failed flush that rolled it back (call session.rollback())"
    if session.get_nested_transaction() is not None:
        return "an open savepoint (begin_nested())"
    if session.new or session.dirty or session.deleted:
        return "changes not flushed yet (added, modified or deleted objects)"
    if root in _worked:
        return "work sent to the database (a flush, a write, a locked SELECT or a savepoint)"
    return None


def _join_callers(session: Any, operation: str) -> bool | None:
    """How to treat the caller's ``session`` (a Session or an AsyncSession): ``True``, join
    its transaction (begun explicitly, or by an outer :func:`transactional`); ``False``, it
    is in none, the decorator owns it; ``None``, an autobegun transaction that only read:
    end it (COMMIT) and own the session. Raises :class:`~locksafe.CallerTransactionError`
    for an autobegun transaction holding work."""
    sync = getattr(session, "sync_session", session)
    if not isinstance(sync, Session) or not sync.in_transaction():
        return False
    root = sync.get_transaction()
    if root is None:
        return False
    if root.origin is not SessionTransactionOrigin.AUTOBEGIN:
        return True
    work = _callers_work(sync, root)
    if work is None:
        log.debug(
            "%s: the session's autobegun transaction only read: committed, the call owns the "
            "session",
            operation,
        )
        return None
    raise CallerTransactionError(
        f"@transactional: {operation}() was called with a session in a transaction it did not "
        f"begin, which holds {work}. The decorator would have to commit that work without "
        "being asked, or lose it on a retry. Commit (or roll back) your own work before the "
        "call, or begin the transaction yourself (`with session.begin():` before any work) "
        "to run this call as part of it (no retry then: your transaction's owner decides)",
        operation=operation,
        reason=work,
    )


# -- the state of the decorator's transaction -------------------------------------------------


class _Commits:
    """Counts the COMMITs of one session while the decorated function runs: a transaction the
    function ended is ``CLOSED`` whether it committed or rolled back, and only a commit makes
    running the function again unsafe. (One ``after_commit`` listener on ``Session`` serves
    every count: no listener is added and removed per call.)"""

    def __init__(self, session: object) -> None:
        self.session = session if isinstance(session, Session) else None
        self.count = 0
        self._outer: _Commits | None = None

    def __enter__(self) -> _Commits:
        if self.session is not None:
            self._outer = _counting.get(self.session)
            _counting[self.session] = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.session is None:
            return
        if self._outer is not None:
            _counting[self.session] = self._outer
        else:
            _counting.pop(self.session, None)


#: Session -> the count of the call whose function runs in it now.
_counting: weakref.WeakKeyDictionary[Session, _Commits] = weakref.WeakKeyDictionary()


def _count_commit(session: Session) -> None:
    """Session ``after_commit``."""
    commits = _counting.get(session)
    if commits is not None:
        commits.count += 1


def _state(tx: object) -> object:
    # SQLAlchemy's own ``with session.begin()`` decides on this state too
    # (``_transaction_is_active`` / ``_transaction_is_closed``); no public attribute tells a
    # transaction deactivated by a failed flush from one closed or being committed.
    return session_transaction_state(tx) if isinstance(tx, SessionTransaction) else None


def _swallowed(session: object, tx: object, operation: str) -> PendingRollbackError | None:
    """The error to raise when the function *returned* although a failed flush it caught
    rolled back the decorator's transaction (or a savepoint the function left open in it):
    SQLAlchemy's ``with session.begin()`` would end it quietly, committing nothing. ``None``
    when the transaction is fine (or the function ended it itself)."""
    if not isinstance(session, Session) or not isinstance(tx, SessionTransaction):
        return None
    chain: list[SessionTransaction] = []
    node = session.get_nested_transaction()
    while node is not None and node is not tx and len(chain) < _MAX_CHAIN:
        chain.append(node)
        node = node.parent
    chain.append(tx)
    for transaction in chain:
        if _state(transaction) is not SessionTransactionState.DEACTIVE:
            continue
        original = rollback_exception(transaction)
        what = type(original).__name__ if original is not None else "a database error"
        error = PendingRollbackError(
            f"@transactional: {operation}() returned, but its transaction had been rolled back "
            f"by a failed flush ({what}) that it caught: nothing was committed. Let the error "
            "go up (the decorator rolls back, and retries lock errors), or run the work that "
            "may fail in `with session.begin_nested():`",
            code="7s2a",
        )
        error.__cause__ = original if isinstance(original, BaseException) else None
        return error
    return None


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
    retry_on: Callable[[BaseException], bool] | Collection[LockErrorKind] | None = None,
    on_retry: Callable[[RetryDetails], object] | None = None,
    wait_initial: float = 0.05,
    wait_max: float = 2.0,
    retry_after: float | None = None,
    early_lock_timeout: float | None = 0.02,
) -> Callable[[Callable[P, T]], Callable[P, T]]: ...


def transactional(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    attempts: int = 5,
    timeout: float = 30.0,
    sessionmaker: Callable[[], Any] | None = None,
    retry_on: Callable[[BaseException], bool] | Collection[LockErrorKind] | None = None,
    on_retry: Callable[[RetryDetails], object] | None = None,
    wait_initial: float = 0.05,
    wait_max: float = 2.0,
    retry_after: float | None = None,
    early_lock_timeout: float | None = 0.02,
) -> Any:
    """Run a function in one atomic transaction, retried on lock errors.

    For sync functions and ``async def`` functions that take a ``session`` argument:

    - the caller's session is not in a transaction: the decorator owns it — it begins,
      commits when the function returns, rolls back when it raises, and runs the *whole*
      function again on a retryable lock error (deadlock, lock timeout, serialization
      failure, busy SQLite database...);
    - the session is in a transaction that *autobegan* (a read before the call, as in
      FastAPI's ``Depends(get_db)``) and has only read so far: the decorator ends it (a
      COMMIT of nothing; the session's ``expire_on_commit`` applies as after any commit) and
      owns the session as above, so the locks the function takes are taken, and committed, in
      the decorator's transaction;
    - the session is in an autobegun transaction holding the caller's work (a write, changes
      pending or flushed, a locked SELECT, an open savepoint):
      :class:`~locksafe.CallerTransactionError` before the function runs, the caller's
      transaction untouched — committing that work unasked, or losing it on a retry, would
      both be silent;
    - the session is in a transaction begun explicitly (``with session.begin():``, or an
      outer :func:`transactional`): the call joins it (nested use) — the function runs once,
      nothing is committed or rolled back, errors go up to the owner, who commits;
    - with ``sessionmaker=`` and no session passed: a fresh session per attempt is injected as
      ``session`` and closed afterwards. A scoped registry (``scoped_session``) as
      ``sessionmaker`` returns the caller's session when there is one, judged as above;
      otherwise the decorator owns the transaction, and closes (and removes from the
      registry) only a session this call created.

    ``session`` must be a ``Session`` for a sync function and an ``AsyncSession`` for an
    ``async def`` one (``sessionmaker=`` must make them): anything else (an Engine, a string,
    a session of the other kind) is a ``TypeError`` naming the option, at decoration time for
    a ``sessionmaker`` of the other kind, at call time otherwise.

    A ``scoped_session`` / ``async_scoped_session`` passed as ``session`` stands for the
    registry's current session.

    The transaction the decorator owns is the decorator's: the function runs inside
    ``session.begin()`` used as a context manager, so work after the function's own
    ``commit()`` or ``rollback()`` fails at once with SQLAlchemy's ``InvalidRequestError``
    ("Can't operate on closed transaction inside context manager"), which is not retried.
    Whatever the function raises after it ended the transaction itself is never retried; its
    own final ``commit()`` that fails is judged like the decorator's (below). A function that
    *returns* after catching the error of a failed flush (which rolled the transaction back)
    gets ``PendingRollbackError`` raised from that error: retried if it was a lock error.

    Retried: what :func:`~locksafe.is_retryable_lock_error` calls retryable (``retry_on``'s
    default): an error that itself reports a retryable lock error (an application error raised
    while handling one is the application's answer and is not).
    Never retried, whatever ``retry_on`` says: anything that is not an ``Exception``
    (``KeyboardInterrupt``, a cancelled task), a :class:`~locksafe.LockUnavailable` from an
    inner :func:`transactional` (it goes up unchanged), and a ``COMMIT`` that failed for any
    reason but a lock error the server reported (a lost connection may hide a successful
    commit). When ``attempts`` or ``timeout`` (seconds in all; ``float('inf')``: no limit) run
    out on a lock error, it raises :class:`~locksafe.LockUnavailable` from the last database
    error; a non-lock error that a custom ``retry_on`` retried goes up as it is. ``timeout``
    is a deadline: each attempt's lock waits are bounded by the time left
    (:func:`~locksafe.lock_timeout`, where that is tighter than the connection's own bound), so
    a call blocked on a held lock ends within about ``timeout`` (MySQL/MariaDB: whole seconds).

    ``early_lock_timeout`` (seconds; ``None``: off) is for servers that look for a deadlock
    only after a lock wait has lasted a while (PostgreSQL: ``deadlock_timeout``, 1 s by
    default; elsewhere it changes nothing): every attempt but the last bounds its lock waits to
    ``early_lock_timeout`` on the first attempt, doubled on each next one, so that a deadlock
    ends as a lock timeout, retried, instead of lasting a second. The last attempt waits as
    before (only ``timeout`` bounds it; and an early bound never makes the call give up before
    its deadline), so a legitimate long wait costs a few quick retries, and succeeds as
    before; with ``attempts=1`` there is no early bound. Inside a
    :func:`~locksafe.lock_timeout` block of the function, that block's bound applies. A wait
    the early bound ended is retried whatever ``retry_on`` says, and voids its attempt even if
    the function caught the error (nothing of that attempt is committed). Such retries are
    logged at INFO, not WARNING (``on_retry`` sees them as any other):

    .. code-block:: python

        @transactional(early_lock_timeout=0.05)  # 50 ms, 100 ms, 200 ms, 400 ms, then no bound
        def transfer(src: int, dst: int, *, session: Session) -> None: ...

    Backoff is exponential with full jitter between ``wait_initial`` and ``wait_max`` seconds
    (tenacity's ``wait_random_exponential``); :func:`set_testing` makes it zero. ``retry_on``
    is a predicate or a collection of :class:`~locksafe.LockErrorKind`; ``on_retry`` receives
    a :class:`RetryDetails` before each sleep, which is also logged on ``locksafe.transactions``
    (as is giving up, once). Every option is checked here, at decoration time.

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
        early_lock_timeout=early_lock_timeout,
    )
    _check_sessionmaker(sessionmaker, "", is_async=False, kind=False)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(func, "__qualname__", repr(func))
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"@transactional: {name}() is a generator function; its body would run "
                "after the decorator returned, outside the transaction (collect the rows in "
                "a list and return it)"
            )
        parameter = _session_parameter(func)
        if parameter is None:
            raise TypeError(
                f"@transactional: {name}() needs a `session` parameter (the decorator "
                "begins, commits and retries that session's transaction)"
            )
        if sessionmaker is not None and parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(
                f"@transactional(sessionmaker=...): {name}()'s `session` is positional-only, "
                "so the decorator cannot pass it the session it makes: make it keyword-only "
                "(`*, session`) or an ordinary parameter"
            )
        position = _session_position(func, parameter)
        policy = copy.copy(base)
        policy.operation = name
        _check_sessionmaker(sessionmaker, name, is_async=inspect.iscoroutinefunction(func))
        _track_caller_work()
        return _wrap(_Decorated(func, policy, position, sessionmaker))

    if fn is not None:
        return decorate(fn)
    return decorate


def _no_session(policy: _Policy) -> TypeError:
    return TypeError(f"{policy.operation}() got no session, and @transactional has no sessionmaker")


def _wrap(decorated: _Decorated) -> Callable[..., Any]:
    """The wrapper: a sync function for a sync function, an ``async def`` one for an ``async
    def`` one; both run the same :class:`_Call`."""
    if decorated.steps.is_async:

        @functools.wraps(decorated.func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            return await _Call(decorated, args, kwargs).run()

        return async_wrapper

    @functools.wraps(decorated.func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _run_sync(_Call(decorated, args, kwargs).run())

    return wrapper
