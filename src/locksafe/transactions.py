"""One atomic transaction, retried on lock errors: :func:`transactional`.

The retry schedule is tenacity's (exponential backoff with full jitter, bounded by attempts
and by total time); what locksafe adds is *what* is retried and *how*: only errors that
themselves report a retryable lock error (:func:`~locksafe.classify.classify_raised`), always
the whole transaction from its ``BEGIN``, never a transaction the decorator did not begin,
never after a ``COMMIT`` whose outcome is unknown, and never an interruption
(``KeyboardInterrupt``, a cancelled task) or a :class:`~locksafe.LockUnavailable` (an inner
:func:`transactional` already gave up).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import math
import numbers
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar, cast, overload

import tenacity
from sqlalchemy import event
from sqlalchemy.exc import PendingRollbackError
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.session import SessionTransactionState
from sqlalchemy.util import ScopedRegistry

from locksafe.classify import RETRYABLE_KINDS, classify_raised, is_retryable_lock_error
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

_MAX_CHAIN: Final = 64


#: Set (to ``True``) on an error after which work may be committed: a COMMIT whose outcome is
#: unknown, an error raised after the function ended its transaction itself. No
#: :func:`transactional` retries it, the one that saw it happen or one around it.
_MAY_HAVE_COMMITTED: Final = "_locksafe_may_have_committed"


def _mark_may_have_committed(exc: BaseException) -> None:
    # an exception that refuses attributes: the call's own record (``final``) remains
    with contextlib.suppress(Exception):
        setattr(exc, _MAY_HAVE_COMMITTED, True)


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
            if getattr(node, _MAY_HAVE_COMMITTED, False) is True:
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
    """The default retry rule: ``exc`` itself reports a retryable lock error (through what
    it wraps or was raised from, not through an error it was raised while handling)."""
    return not _never_retried(exc) and classify_raised(exc) in RETRYABLE_KINDS


#: A tenacity ``retry`` predicate: retry when the exception itself reports a retryable lock
#: error (:func:`~locksafe.classify.classify_raised`); never an interruption, never a
#: :class:`~locksafe.LockUnavailable`, never an application error raised while handling a lock
#: error (``except OperationalError: raise Conflict()``).
#:
#: >>> import tenacity
#: >>> policy = tenacity.Retrying(retry=retry_if_lock_error, stop=tenacity.stop_after_attempt(3))
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
    """
    global _testing
    _testing = testing


@dataclass(frozen=True)
class RetryDetails:
    """What :func:`transactional` tells ``on_retry`` (and the log) before it sleeps."""

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


# -- validation of the options ----------------------------------------------------------------


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a number of seconds (int or float)")
    return float(value)


def _seconds(name: str, value: object) -> float:
    """A finite number of seconds ≥ 0 (waits, ``retry_after``)."""
    seconds = _number(name, value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name}={value!r} must be a finite number of seconds ≥ 0")
    return seconds


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


def _retry_rule(
    retry_on: Callable[[BaseException], bool] | Collection[LockErrorKind] | None,
) -> Callable[[BaseException], bool]:
    if retry_on is None or retry_on is is_retryable_lock_error:
        # is_retryable_lock_error was the documented default: same rule, same meaning.
        return _is_retryable
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
    ) -> None:
        self.attempts = _attempts(attempts)
        self.timeout = _timeout(timeout)
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
        self._jitter = tenacity.wait_random_exponential(multiplier=wait_initial, max=wait_max)

    def wait(self, state: tenacity.RetryCallState) -> float:
        return 0.0 if _testing else float(self._jitter(state))


class _Call:
    """One call of a decorated function: its attempts, and what each failure means.

    Shared by the sync and the async wrapper; only running the function and its transaction
    differs between them.
    """

    def __init__(self, policy: _Policy) -> None:
        self.policy = policy
        self.started = time.monotonic()
        self.attempts = 0
        #: Errors that must go up as they are: a COMMIT with an unknown outcome, misuse.
        self.final: set[int] = set()
        #: The last failure the policy chose to retry (when it is also the last error,
        #: attempts or time ran out: "giving up").
        self.retried: BaseException | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def retrying_kwargs(self) -> dict[str, Any]:
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(self.policy.attempts)
        if math.isfinite(self.policy.timeout):
            stop = stop | tenacity.stop_before_delay(self.policy.timeout)
        return {
            "stop": stop,
            "wait": self.policy.wait,
            "retry": self._retry,
            "before_sleep": self._before_sleep,
            "reraise": True,
        }

    def _retry(self, state: tenacity.RetryCallState) -> bool:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        retry = (
            exc is not None
            and id(exc) not in self.final
            and not _never_retried(exc)
            and bool(self.policy.should_retry(exc))
        )
        self.retried = exc if retry else None
        return retry

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        assert exc is not None
        details = RetryDetails(
            attempt=state.attempt_number,
            kind=classify_raised(exc),
            wait=state.upcoming_sleep,
            elapsed=self.elapsed(),
            exception=exc,
            operation=self.policy.operation,
        )
        what = details.kind.value if details.kind is not None else type(exc).__name__
        log.warning(
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

    def body_failed(self, exc: BaseException, tx: object, *, committed: bool) -> None:
        """The function raised ``exc`` inside the decorator's transaction ``tx``;
        ``committed``: the function committed it itself. Then ``exc`` is final: after its own
        COMMIT was sent, as for the decorator's COMMIT, only a lock error the server reported
        proves nothing was committed; after it committed, running it again would redo
        committed work. A transaction the function only rolled back or closed (``except
        OperationalError: session.rollback(); raise``) committed nothing: ``exc`` is judged
        like any other."""
        state = _state(tx)
        if state is SessionTransactionState.PREPARED:
            if not _is_retryable(exc):
                self.may_have_committed(exc)
        elif committed or state is SessionTransactionState.COMMITTED:
            self.may_have_committed(exc)

    def may_have_committed(self, exc: BaseException) -> None:
        """``exc`` goes up as it is, from this call and from any call around it."""
        self.final.add(id(exc))
        _mark_may_have_committed(exc)

    def exit_error(self, exc: BaseException, body_error: BaseException | None) -> BaseException:
        """What to raise when the transaction block raised ``exc``; ``body_error`` is what the
        function itself raised, ``None`` if it returned (then the COMMIT at exit failed)."""
        if body_error is None:
            if not _is_retryable(exc):
                # Only a lock error the server reported for the COMMIT proves it did not
                # happen; anything else (a lost connection...) may hide a successful commit.
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

    def refuse_awaitable(self, result: object) -> None:
        """A sync-decorated function returned an awaitable: its work would run after the
        decorator committed, outside the transaction."""
        if not inspect.isawaitable(result):
            return
        close = getattr(result, "close", None)
        if callable(close):
            close()  # no "coroutine ... was never awaited" warning
        error = TypeError(
            f"@transactional: {self.policy.operation}() returned an awaitable; the decorator saw a "
            "sync function, so the awaited work would run outside its transaction (decorate "
            "an `async def` function)"
        )
        self.final.add(id(error))
        raise error

    def final_error(self, exc: Exception) -> BaseException:
        """What to raise when the last attempt failed with ``exc``: ``exc`` itself unless it
        was a retryable lock error that ran out of attempts or time."""
        if exc is not self.retried:
            return exc
        elapsed = self.elapsed()
        kind = classify_raised(exc)
        log.warning(
            "%s: giving up after %d attempt%s in %.3fs, failing with %s",
            self.policy.operation,
            self.attempts,
            "" if self.attempts == 1 else "s",
            elapsed,
            kind.value if kind is not None else type(exc).__name__,
            extra={
                "locksafe_attempts": self.attempts,
                "locksafe_kind": kind.value if kind is not None else None,
                "locksafe_elapsed": elapsed,
                "locksafe_operation": self.policy.operation,
            },
        )
        if kind is None:
            return exc  # a custom retry_on retried another error: it goes up as it is
        error = LockUnavailable(
            kind,
            attempts=self.attempts,
            elapsed=elapsed,
            retry_after=self.policy.retry_after,
            operation=self.policy.operation,
        )
        error.__cause__ = exc
        return error


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


# -- the state of the decorator's transaction -------------------------------------------------

class _Commits:
    """Counts the COMMITs of one session while the decorated function runs: a transaction the
    function ended is ``CLOSED`` whether it committed or rolled back, and only a commit makes
    running the function again unsafe."""

    def __init__(self, session: object) -> None:
        self.session = session if isinstance(session, Session) else None
        self.count = 0

    def _seen(self, session: Session) -> None:
        self.count += 1

    def __enter__(self) -> _Commits:
        if self.session is not None:
            event.listen(self.session, "after_commit", self._seen)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.session is not None:
            event.remove(self.session, "after_commit", self._seen)


def _state(tx: object) -> object:
    # SQLAlchemy's own ``with session.begin()`` decides on this state too
    # (``_transaction_is_active`` / ``_transaction_is_closed``); no public attribute tells a
    # transaction deactivated by a failed flush from one closed or being committed.
    return getattr(tx, "_state", None) if isinstance(tx, SessionTransaction) else None


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
        original = getattr(transaction, "_rollback_exception", None)
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
      ``session`` and closed afterwards. A scoped registry (``scoped_session``) as
      ``sessionmaker`` returns the caller's session when there is one: in a transaction, that
      is nested use; otherwise the decorator owns the transaction, and closes (and removes
      from the registry) only a session this call created.

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

    Retried: only an error that itself reports a retryable lock error (``retry_on``'s default;
    an application error raised while handling one is the application's answer and is not).
    Never retried, whatever ``retry_on`` says: anything that is not an ``Exception``
    (``KeyboardInterrupt``, a cancelled task), a :class:`~locksafe.LockUnavailable` from an
    inner :func:`transactional` (it goes up unchanged), and a ``COMMIT`` that failed for any
    reason but a lock error the server reported (a lost connection may hide a successful
    commit). When ``attempts`` or ``timeout`` (seconds in all; ``float('inf')``: no limit) run
    out on a lock error, it raises :class:`~locksafe.LockUnavailable` from the last database
    error; a non-lock error that a custom ``retry_on`` retried goes up as it is.

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
    )
    if sessionmaker is not None and not callable(sessionmaker):
        raise TypeError(f"sessionmaker={sessionmaker!r} must be callable or None")

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
        if inspect.iscoroutinefunction(func):
            return _async_wrapper(func, policy, position, sessionmaker)
        return _sync_wrapper(func, policy, position, sessionmaker)

    if fn is not None:
        return decorate(fn)
    return decorate


def _no_session(policy: _Policy) -> TypeError:
    return TypeError(f"{policy.operation}() got no session, and @transactional has no sessionmaker")


def _sync_wrapper(
    func: Callable[..., T],
    policy: _Policy,
    position: int,
    sessionmaker: Callable[[], Any] | None,
) -> Callable[..., T]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        given = _find_session(position, args, kwargs)
        if given is None and sessionmaker is None:
            raise _no_session(policy)
        call = _Call(policy)
        session = _current(given)

        def nested(call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> T:
            """The session is in a transaction the decorator did not begin: run once; the
            owner commits, rolls back and retries."""
            try:
                result = func(*call_args, **call_kwargs)
                call.refuse_awaitable(result)
            except BaseException as exc:
                call.final.add(id(exc))
                raise
            return result

        def attempt_once() -> T:
            call.attempts += 1
            if session is not None:
                return run_in(session, args, kwargs)
            assert sessionmaker is not None
            registry = _registry(sessionmaker)
            created = registry is not None and not registry.has()
            made = sessionmaker()
            call_args, call_kwargs = _with_session(position, args, kwargs, made)
            if made.in_transaction():  # a scoped session its caller is using: not ours
                return nested(call_args, call_kwargs)
            if registry is None:
                with made:
                    return run_in(made, call_args, call_kwargs)
            try:
                return run_in(made, call_args, call_kwargs)
            finally:
                if created:  # only the session this call created is closed, and forgotten
                    sessionmaker.remove()  # type: ignore[attr-defined]

        def run_in(owned: Any, call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> T:
            body_error: BaseException | None = None
            try:
                with owned.begin() as tx:
                    commits = _Commits(owned)
                    try:
                        with commits:
                            result = func(*call_args, **call_kwargs)
                        call.refuse_awaitable(result)
                        swallowed = _swallowed(owned, tx, policy.operation)
                        if swallowed is not None:
                            raise swallowed
                    except BaseException as exc:
                        body_error = exc
                        call.body_failed(exc, tx, committed=commits.count > 0)
                        raise
            except BaseException as exc:
                error = call.exit_error(exc, body_error)
                if error is exc:
                    raise
            else:
                return result
            raise error  # the function's error, not the rollback's (logged)

        if session is not None and session.in_transaction():
            return nested(args, kwargs)
        try:
            return tenacity.Retrying(**call.retrying_kwargs())(attempt_once)
        except Exception as exc:
            error = call.final_error(exc)
            if error is exc:
                raise
            raise error from exc

    return wrapper


def _async_wrapper(
    func: Callable[..., Awaitable[T]],
    policy: _Policy,
    position: int,
    sessionmaker: Callable[[], Any] | None,
) -> Callable[..., Awaitable[T]]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        given = _find_session(position, args, kwargs)
        if given is None and sessionmaker is None:
            raise _no_session(policy)
        call = _Call(policy)
        session = _current(given)

        async def nested(call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> T:
            """The session is in a transaction the decorator did not begin: run once; the
            owner commits, rolls back and retries."""
            try:
                return await func(*call_args, **call_kwargs)
            except BaseException as exc:
                call.final.add(id(exc))
                raise

        async def attempt_once() -> T:
            call.attempts += 1
            if session is not None:
                return await run_in(session, args, kwargs)
            assert sessionmaker is not None
            registry = _registry(sessionmaker)
            created = registry is not None and not registry.has()
            made = sessionmaker()
            call_args, call_kwargs = _with_session(position, args, kwargs, made)
            if made.in_transaction():  # a scoped session its caller is using: not ours
                return await nested(call_args, call_kwargs)
            if registry is None:
                async with made:
                    return await run_in(made, call_args, call_kwargs)
            try:
                return await run_in(made, call_args, call_kwargs)
            finally:
                if created:  # only the session this call created is closed, and forgotten
                    removed = sessionmaker.remove()  # type: ignore[attr-defined]
                    if inspect.isawaitable(removed):
                        await removed

        async def run_in(owned: Any, call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> T:
            body_error: BaseException | None = None
            try:
                async with owned.begin() as async_tx:
                    tx = getattr(async_tx, "sync_transaction", None)
                    commits = _Commits(getattr(owned, "sync_session", None))
                    try:
                        with commits:
                            result = await func(*call_args, **call_kwargs)
                        swallowed = _swallowed(
                            getattr(owned, "sync_session", None), tx, policy.operation
                        )
                        if swallowed is not None:
                            raise swallowed
                    except BaseException as exc:
                        body_error = exc
                        call.body_failed(exc, tx, committed=commits.count > 0)
                        raise
            except BaseException as exc:
                error = call.exit_error(exc, body_error)
                if error is exc:
                    raise
            else:
                return result
            raise error  # the function's error, not the rollback's (logged)

        if session is not None and session.in_transaction():
            return await nested(args, kwargs)
        try:
            return await tenacity.AsyncRetrying(**call.retrying_kwargs())(attempt_once)
        except Exception as exc:
            error = call.final_error(exc)
            if error is exc:
                raise
            raise error from exc

    return cast(Callable[..., Awaitable[T]], wrapper)
