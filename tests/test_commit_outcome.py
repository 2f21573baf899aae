"""The rules of ``@transactional`` about whether work may be committed after a failure, as one
unit, table by table; and the one attempt loop's sync driver.

The rules (``locksafe.transactions._outcome_of_body_error`` / ``_outcome_of_commit_error``)
take what is known when a transaction failed: where the error came from, the state SQLAlchemy
left the transaction in, whether the function committed it itself, what the error reports.
Their errors here are real driver exceptions (``sqlite3``, as a database raises them) and the
states are SQLAlchemy's own; the same rules run against real servers in test_transactions.py
(a COMMIT whose connection is killed, a function that commits and then fails...).
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
import tenacity
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import SessionTransactionState as State

import locksafe
from locksafe import LockErrorKind, LockUnavailable
from locksafe.classify import MAY_HAVE_COMMITTED, may_have_committed
from locksafe.transactions import (
    _CommitOutcome,
    _outcome_of_body_error,
    _outcome_of_commit_error,
    _Policy,
    _run_sync,
)

Outcome = _CommitOutcome


def busy() -> BaseException:
    """A lock error the server reported, wrapped as SQLAlchemy raises it."""
    orig = sqlite3.OperationalError("database is locked")
    return OperationalError("COMMIT", {}, orig)


def lost() -> BaseException:
    """A failure that is no lock error: the connection went away during the COMMIT."""
    orig = sqlite3.OperationalError("disk I/O error")
    return OperationalError("COMMIT", {}, orig)


def settled_lock_error() -> BaseException:
    """A lock error an inner @transactional already marked: work may be committed."""
    error = busy()
    setattr(error, MAY_HAVE_COMMITTED, True)
    return error


def gave_up() -> BaseException:
    """What an inner @transactional raises when it ran out of attempts on a lock error."""
    error = LockUnavailable(
        LockErrorKind.DATABASE_BUSY, attempts=3, elapsed=0.1, retry_after=1.0, operation="f"
    )
    error.__cause__ = busy()
    return error


ERRORS = {
    "lock error": busy,
    "lost connection": lost,
    "application error": lambda: KeyError("not found"),
    "marked lock error": settled_lock_error,
    "LockUnavailable": gave_up,
    "KeyboardInterrupt": KeyboardInterrupt,
}

# (error, transaction state, the function committed) -> outcome
BODY_TABLE = [
    # the function's own commit() failed at the COMMIT (SQLAlchemy leaves it PREPARED)
    ("lock error", State.PREPARED, False, Outcome.NOT_COMMITTED),
    ("lost connection", State.PREPARED, False, Outcome.UNKNOWN),
    ("application error", State.PREPARED, False, Outcome.UNKNOWN),
    ("marked lock error", State.PREPARED, False, Outcome.UNKNOWN),
    ("LockUnavailable", State.PREPARED, False, Outcome.UNKNOWN),
    ("KeyboardInterrupt", State.PREPARED, False, Outcome.UNKNOWN),
    # it committed, then raised (the transaction is CLOSED after a commit as after a rollback)
    ("lock error", State.CLOSED, True, Outcome.COMMITTED),
    ("application error", State.CLOSED, True, Outcome.COMMITTED),
    ("KeyboardInterrupt", State.CLOSED, True, Outcome.COMMITTED),
    ("lock error", State.COMMITTED, False, Outcome.COMMITTED),
    # nothing committed: active, rolled back by a failed flush, or ended by the function
    ("lock error", State.ACTIVE, False, Outcome.NOT_COMMITTED),
    ("lost connection", State.ACTIVE, False, Outcome.NOT_COMMITTED),
    ("application error", State.ACTIVE, False, Outcome.NOT_COMMITTED),
    ("LockUnavailable", State.ACTIVE, False, Outcome.NOT_COMMITTED),
    ("KeyboardInterrupt", State.ACTIVE, False, Outcome.NOT_COMMITTED),
    ("lock error", State.DEACTIVE, False, Outcome.NOT_COMMITTED),
    ("lock error", State.PROVISIONING_CONNECTION, False, Outcome.NOT_COMMITTED),
    ("lost connection", State.DEACTIVE, False, Outcome.NOT_COMMITTED),
    ("lock error", State.CLOSED, False, Outcome.NOT_COMMITTED),  # it rolled back itself
    ("application error", State.CLOSED, False, Outcome.NOT_COMMITTED),
    ("lock error", None, False, Outcome.NOT_COMMITTED),  # no state known
    ("lock error", None, True, Outcome.COMMITTED),
]


@pytest.mark.parametrize(("error", "state", "committed", "expected"), BODY_TABLE)
def test_the_function_raised_inside_the_transaction(
    error: str, state: State | None, committed: bool, expected: Outcome
) -> None:
    outcome = _outcome_of_body_error(ERRORS[error](), state, function_committed=committed)
    assert outcome is expected


# error of the decorator's COMMIT (or the flush before it) -> outcome
COMMIT_TABLE = [
    ("lock error", Outcome.NOT_COMMITTED),  # the server refused it: nothing committed
    ("lost connection", Outcome.UNKNOWN),
    ("application error", Outcome.UNKNOWN),  # an after_flush hook's error, say
    ("marked lock error", Outcome.UNKNOWN),
    ("LockUnavailable", Outcome.UNKNOWN),
    ("KeyboardInterrupt", Outcome.UNKNOWN),
]


@pytest.mark.parametrize(("error", "expected"), COMMIT_TABLE)
def test_the_decorators_commit_failed(error: str, expected: Outcome) -> None:
    assert _outcome_of_commit_error(ERRORS[error]()) is expected


def test_every_state_is_in_the_table() -> None:
    """No transaction state SQLAlchemy has is left without a row."""
    assert {row[1] for row in BODY_TABLE} >= set(State)


# -- the rules at work, on a real database ---------------------------------------------------


def test_a_failed_commit_that_is_no_lock_error_goes_up_marked_never_retried(
    tmp_path: Any,
) -> None:
    """The function's own COMMIT fails with an error the server reports that is no lock error
    (SQLite checks a deferred foreign key at the COMMIT): one attempt, even with a
    ``retry_on`` that retries everything, and the error is marked, so that no caller (an outer
    ``@transactional``, ``retry_if_lock_error``, the Starlette handlers) retries it either."""
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    event.listen(
        engine, "connect", lambda dbapi_connection, _: dbapi_connection.execute(FOREIGN_KEYS)
    )
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql(
            "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER "
            "REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
        )
    calls = []

    @locksafe.transactional(attempts=5, retry_on=lambda exc: True)
    def orphan(*, session: Session) -> None:
        calls.append(1)
        session.execute(text("INSERT INTO child (id, parent_id) VALUES (1, 42)"))
        session.commit()  # the deferred check fails here

    with Session(engine) as session, pytest.raises(IntegrityError) as raised:
        orphan(session=session)
    assert calls == [1], "retried after a COMMIT whose outcome the rules call unknown"
    assert may_have_committed(raised.value)
    assert not locksafe.is_retryable_lock_error(raised.value)
    engine.dispose()
    with sqlite3.connect(tmp_path / "db.sqlite") as check:
        assert check.execute("SELECT count(*) FROM child").fetchone() == (0,)


FOREIGN_KEYS = "PRAGMA foreign_keys = ON"


# -- the sync driver of the one loop ---------------------------------------------------------


def test_a_stop_iteration_leaves_a_sync_function_as_it_is(tmp_path: Any) -> None:
    """Inside a coroutine a ``StopIteration`` would become ``RuntimeError`` (PEP 479): the
    sync wrapper raises the function's own, after one attempt, the transaction rolled back."""
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    stop = StopIteration("the function's own")
    calls = []

    @locksafe.transactional(attempts=3)
    def leaks(*, session: Session) -> None:
        calls.append(1)
        session.execute(text("SELECT 1"))
        raise stop

    with Session(engine) as session:
        with pytest.raises(StopIteration) as raised:
            leaks(session=session)
        assert raised.value is stop
        assert not session.in_transaction()
    assert calls == [1]
    engine.dispose()


def test_the_sync_driver_refuses_a_step_that_suspends() -> None:
    async def suspends() -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="suspended"):
        _run_sync(suspends())


def test_the_sync_and_async_wrappers_run_the_same_loop(tmp_path: Any) -> None:
    """A lock error on every attempt: the same retries told, the same LockUnavailable, from
    the sync and the async wrapper."""
    path = tmp_path / "db.sqlite"
    seen: dict[str, list[tuple[int, LockErrorKind | None]]] = {"sync": [], "async": []}

    def told(kind: str) -> Callable[[locksafe.RetryDetails], None]:
        return lambda details: seen[kind].append((details.attempt, details.kind))

    @locksafe.transactional(attempts=3, on_retry=told("sync"))
    def sync_fn(*, session: Session) -> None:
        session.execute(text("SELECT 1"))
        raise busy()

    @locksafe.transactional(attempts=3, on_retry=told("async"))
    async def async_fn(*, session: AsyncSession) -> None:
        await session.execute(text("SELECT 1"))
        raise busy()

    locksafe.set_testing(True)
    try:
        engine = create_engine(f"sqlite:///{path}")
        with Session(engine) as session, pytest.raises(LockUnavailable) as sync_raised:
            sync_fn(session=session)
        engine.dispose()

        async def main() -> BaseException:
            async_engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
            try:
                async with AsyncSession(async_engine) as session:
                    with pytest.raises(LockUnavailable) as raised:
                        await async_fn(session=session)
                    return raised.value
            finally:
                await async_engine.dispose()

        async_error = asyncio.run(main())
    finally:
        locksafe.set_testing(False)
    busy_kind = LockErrorKind.DATABASE_BUSY
    assert seen["sync"] == seen["async"] == [(1, busy_kind), (2, busy_kind)]
    for error in (sync_raised.value, async_error):
        assert isinstance(error, LockUnavailable)
        assert (error.attempts, error.kind) == (3, busy_kind)
        assert isinstance(error.__cause__, OperationalError)


# -- the backoff -----------------------------------------------------------------------------


@pytest.mark.parametrize(("initial", "maximum"), [(0.05, 2.0), (0.0, 0.0), (1.0, 1.0), (0.01, 60)])
def test_waits_are_tenacitys_full_jitter(initial: float, maximum: float) -> None:
    """Each wait lies in tenacity's ``wait_random_exponential`` window for its attempt, and
    reaches its top; no overflow for huge attempt numbers."""
    policy = _Policy(
        attempts=10**9,
        timeout=math.inf,
        retry_on=None,
        on_retry=None,
        wait_initial=initial,
        wait_max=maximum,
        retry_after=None,
        operation="f",
    )
    window = tenacity.wait_exponential(multiplier=initial, max=maximum)
    attempts = [1, 2, 3, 5, 8, 2000] + ([10**9] if initial > 0 else [])
    for attempt in attempts:
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = attempt
        top = window(state)
        waits = [policy.wait(attempt) for _ in range(400)]
        assert all(0 <= wait <= top for wait in waits), (attempt, top, max(waits))
        assert max(waits) >= top * 0.8, (attempt, top, max(waits))
