"""The vocabulary of locksafe: kinds of lock failure and the typed exceptions.

This module imports nothing from the rest of locksafe, so every other module (the per-dialect
modules included) can depend on it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

__all__ = [
    "CallerTransactionError",
    "LockDegradedWarning",
    "LockErrorKind",
    "LockUnavailable",
    "LocksafeError",
    "NamedLockError",
    "SelfDeadlock",
    "TransactionAborted",
    "TransactionLost",
    "UnsupportedLockOption",
]


class LockErrorKind(str, enum.Enum):
    """What kind of lock failure a database error is.

    Each kind calls for a different reaction: skip the row, retry the whole transaction, or
    answer "try again later".

    ``str`` valued, so it logs and serialises as its value::

        >>> LockErrorKind.DEADLOCK == "deadlock"
        True
    """

    #: A NOWAIT / try-lock request could not get the lock at once.
    LOCK_NOT_AVAILABLE = "lock_not_available"
    #: The statement waited for a lock and gave up (lock_timeout, innodb_lock_wait_timeout).
    LOCK_TIMEOUT = "lock_timeout"
    #: The server broke a deadlock by aborting this transaction.
    DEADLOCK = "deadlock"
    #: SERIALIZABLE / REPEATABLE READ conflict: the transaction must be run again.
    SERIALIZATION_FAILURE = "serialization_failure"
    #: SQLite's SQLITE_BUSY family: another connection holds the database lock.
    DATABASE_BUSY = "database_busy"
    #: SQLite's SQLITE_LOCKED family: a conflict inside one process (shared cache, same db).
    TABLE_LOCKED = "table_locked"
    #: A statement time limit cancelled the statement. Not a lock error, but often confused with
    #: one; it is never retried by locksafe.
    STATEMENT_TIMEOUT = "statement_timeout"

    def __str__(self) -> str:
        return self.value


def _unpickle(cls: type[BaseException], args: tuple[object, ...]) -> BaseException:
    """Rebuild a pickled :class:`LocksafeError` without calling its ``__init__`` (whose
    keyword-only parameters are not in ``args``); its attributes come back from its state."""
    return cls.__new__(cls, *args)


class LocksafeError(Exception):
    """Base class of the exceptions locksafe raises itself.

    Every one pickles with its message and its attributes (``pickle``, a
    ``ProcessPoolExecutor`` worker, Celery, RQ): it is rebuilt from its ``args`` and
    ``__dict__``, not by calling ``__init__`` again. As for any exception, ``__cause__``,
    ``__context__`` and the traceback do not cross.

    >>> import pickle
    >>> error = UnsupportedLockOption(["skip_locked"], dialect="mysql", server_version=(5, 7, 44))
    >>> copy = pickle.loads(pickle.dumps(error))
    >>> isinstance(copy, LocksafeError), copy.options, str(copy) == str(error)
    (True, ('skip_locked',), True)
    """

    def __reduce__(self) -> tuple[object, ...]:
        return _unpickle, (type(self), self.args), dict(self.__dict__) or None


class UnsupportedLockOption(LocksafeError):
    """The database cannot honour a requested lock option, and degrading was not allowed.

    Raised by :func:`locksafe.with_row_locks` under ``on_unsupported="raise"`` (the default), and
    always when no lock at least as strong exists on that database.

    >>> from sqlalchemy.dialects import mysql
    >>> from locksafe import plan_row_locks
    >>> dialect = mysql.dialect()
    >>> dialect.server_version_info = (5, 7, 44)  # MySQL 5.7 has no SKIP LOCKED
    >>> try:
    ...     plan_row_locks(dialect, skip_locked=True)
    ... except UnsupportedLockOption as error:
    ...     print(error.option)
    skip_locked
    """

    def __init__(
        self,
        options: Sequence[str],
        *,
        dialect: str,
        server_version: tuple[int, ...] | None,
        reason: str = "",
    ) -> None:
        self.options = tuple(options)
        self.dialect = dialect
        self.server_version = server_version
        self.reason = reason
        version = ".".join(map(str, server_version)) if server_version else "unknown version"
        names = ", ".join(self.options)
        message = f"{names} not supported by {dialect} {version}"
        if reason:
            message += f": {reason}"
        super().__init__(message)

    @property
    def option(self) -> str:
        """The first (usually the only) unsupported option."""
        return self.options[0]


def _number(value: object, spec: str) -> str:
    """``value`` formatted as a number, or its repr when it is none (a hand-made exception's
    arguments are not checked: building one must not fail)."""
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return repr(value)


class LockUnavailable(LocksafeError):
    """A transaction kept failing on lock errors and locksafe gave up retrying it.

    It is retryable by the caller: an HTTP API answers it with ``503`` and a ``Retry-After``
    header of ``retry_after`` seconds. The last database error is its ``__cause__``.

    >>> from locksafe import is_retryable_lock_error
    >>> error = LockUnavailable(
    ...     LockErrorKind.DEADLOCK, attempts=5, elapsed=2.5, retry_after=1, operation="claim"
    ... )
    >>> print(error)
    claim failed with deadlock after 5 attempts in 2.50s; retry after 1s
    >>> is_retryable_lock_error(error), error.retry_after
    (True, 1)
    """

    def __init__(
        self,
        kind: LockErrorKind,
        *,
        attempts: int,
        elapsed: float,
        retry_after: float,
        operation: str | None = None,
    ) -> None:
        self.kind = kind
        self.attempts = attempts
        self.elapsed = elapsed
        self.retry_after = retry_after
        self.operation = operation
        what = f"{operation} " if operation else ""
        super().__init__(
            f"{what}failed with {getattr(kind, 'value', kind)} after {attempts} attempt"
            f"{'s' if attempts != 1 else ''} in {_number(elapsed, '.2f')}s; "
            f"retry after {_number(retry_after, 'g')}s"
        )


class CallerTransactionError(LocksafeError):
    """:func:`locksafe.transactional` was given a session whose transaction it did not begin
    and cannot take over: the caller's work in it (pending or flushed changes, a write, a
    locked SELECT, an open savepoint) would be committed by the decorator without the caller
    asking, or lost. Raised before the function runs; the caller's transaction is untouched.

    Commit (or roll back) that work first, or begin the transaction explicitly
    (``with session.begin():``) to make the call part of it.

    >>> from sqlalchemy import create_engine, text
    >>> from sqlalchemy.orm import Session
    >>> from locksafe import transactional
    >>> @transactional
    ... def count(*, session: Session) -> int:
    ...     return session.execute(text("SELECT count(*) FROM t")).scalar_one()
    >>> with Session(create_engine("sqlite://")) as session:
    ...     _ = session.execute(text("CREATE TABLE t (x INTEGER)"))  # the caller's own work
    ...     try:
    ...         count(session=session)
    ...     except CallerTransactionError as error:
    ...         print(f"refused before {error.operation}() ran")
    refused before count() ran
    """

    def __init__(self, message: str, *, operation: str = "", reason: str = "") -> None:
        #: The decorated function's qualified name.
        self.operation = operation
        #: What the caller's transaction holds (``"pending changes"``, ``"a savepoint"``...).
        self.reason = reason
        super().__init__(message)


class TransactionAborted(LocksafeError):
    """A COMMIT refused because the database had already aborted the transaction.

    Raised by the COMMIT (``Session.commit()``, ``Connection.commit()``, leaving
    ``session.begin()`` / ``engine.begin()``) of a transaction in which locksafe saw a lock
    error that made the server abort it: on PostgreSQL any lock error that was not rolled back
    to a savepoint (the server aborts the transaction on every error, and its COMMIT then
    answers ROLLBACK without an error); on MySQL / MariaDB a deadlock (InnoDB rolls back the
    whole transaction and goes on in a new one, so the COMMIT would commit only the work done
    after it). Without it, the COMMIT would "succeed" having committed nothing, or half.

    Nothing was committed, and the transaction must be rolled back (SQLAlchemy's context
    managers do it) and run again from its start: a failed attempt, retryable like the lock
    error, which is its ``__cause__`` (``@transactional`` retries it). ``kind`` is that
    error's kind.

    >>> import pymysql
    >>> from locksafe import is_retryable_lock_error
    >>> error = TransactionAborted(LockErrorKind.DEADLOCK, "mysql")
    >>> error.__cause__ = pymysql.err.OperationalError(1213, "Deadlock found")
    >>> error.kind.value, is_retryable_lock_error(error)
    ('deadlock', True)
    """

    def __init__(
        self, kind: LockErrorKind | None = None, dialect: str = "", detail: str = ""
    ) -> None:
        self.kind = kind
        self.dialect = dialect
        self.detail = detail
        what = f"a {getattr(kind, 'value', kind)} error" if kind is not None else "a lock error"
        where = f" by {dialect}" if dialect else ""
        message = (
            f"COMMIT refused: the transaction was aborted{where} after {what} that was caught "
            "and not rolled back, so this COMMIT would silently commit nothing (or only what "
            "ran after the error); roll back and run the whole transaction again"
        )
        if detail:
            message += f" ({detail})"
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickles with its own arguments (the message is derived from them), and whatever
        # attributes were set on it since.
        return (type(self), (self.kind, self.dialect, self.detail), dict(self.__dict__))


class LockDegradedWarning(UserWarning):
    """A row lock was replaced by a stronger one the database supports
    (``on_unsupported="warn"``).

    >>> import warnings
    >>> from sqlalchemy.dialects import mysql
    >>> from locksafe import plan_row_locks
    >>> dialect = mysql.dialect()
    >>> dialect.server_version_info = (5, 7, 44)  # MySQL 5.7 has no SKIP LOCKED
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     plan_row_locks(dialect, skip_locked=True, on_unsupported="warn").clause
    'FOR UPDATE'
    >>> caught[0].category is LockDegradedWarning
    True
    """


class SelfDeadlock(LocksafeError):
    """A connection would wait for a lock that another connection holds for the same call: two
    sessions used one inside the other (a request's session that wrote, then a service
    function's own session that writes too). The holder cannot end its transaction before the
    call returns, so the wait could only end with the busy timeout: raised at once instead
    (SQLite, under :func:`locksafe.sqlite.configure`). Not retried: the same code would wait on
    itself again.

    >>> isinstance(SelfDeadlock("..."), LocksafeError)
    True
    """


class TransactionLost(LocksafeError):
    """A COMMIT refused because the transaction it would commit is no longer there: it was
    rolled back behind the connection's back (SQLite under :func:`locksafe.sqlite.configure`:
    another SQLAlchemy connection over the same ``sqlite3`` connection — ``StaticPool`` — or
    SQLite's own rollback after an error), and the statements after that ran one by one,
    each committed at once. Committing would report success for half a transaction. Roll back
    and run it again; what ran after the loss is already committed.

    >>> isinstance(TransactionLost("..."), LocksafeError)
    True
    """


class NamedLockError(LocksafeError):
    """A named lock could not be taken or given back for a reason other than time: the server
    answered ``NULL`` to ``GET_LOCK`` / ``RELEASE_LOCK``, the lock was gone when the block ended
    (the connection was closed or reset while it held the lock, so the block may have run
    without it), or the lock file could not be opened.

    >>> import os, tempfile
    >>> from sqlalchemy import create_engine
    >>> from locksafe import named_lock
    >>> from locksafe.dialects.sqlite import lock_file
    >>> tmp = tempfile.TemporaryDirectory()
    >>> database = os.path.join(tmp.name, "app.db")
    >>> os.mkdir(lock_file(database, "report"))  # a directory where the lock file goes
    >>> engine = create_engine(f"sqlite:///{database}")
    >>> with engine.connect() as conn, named_lock(conn, "report"):  # doctest: +ELLIPSIS
    ...     pass
    Traceback (most recent call last):
    ...
    locksafe.kinds.NamedLockError: cannot open the lock file ...
    >>> engine.dispose(); tmp.cleanup()
    """
