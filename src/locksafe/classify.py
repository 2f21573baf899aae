"""Which lock failure an exception is, for any driver: :func:`classify`.

The generic part only walks the exception graph (SQLAlchemy's ``.orig``, ``__cause__``,
``__context__``) and finds, for each exception, the driver that raised it by the module of its
class. The driver's dialect module then says, as data, where the code is and what it means.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from locksafe.dialects import DialectSupport, DriverErrors, ErrorContext, driver_for_module
from locksafe.kinds import LockErrorKind, LockUnavailable

__all__ = [
    "classify",
    "is_deadlock_error",
    "is_lock_not_available_error",
    "is_retryable_lock_error",
]

#: Kinds that Airflow's ``is_lock_not_available_error`` means: the lock could not be had.
LOCK_NOT_AVAILABLE_KINDS: Final = frozenset(
    {
        LockErrorKind.LOCK_NOT_AVAILABLE,
        LockErrorKind.LOCK_TIMEOUT,
        LockErrorKind.DATABASE_BUSY,
        LockErrorKind.TABLE_LOCKED,
    }
)
#: Kinds for which running the whole transaction again can succeed.
RETRYABLE_KINDS: Final = frozenset(LockErrorKind) - {LockErrorKind.STATEMENT_TIMEOUT}

_MAX_NODES: Final = 64
_LINKS: Final = ("orig", "__cause__", "__context__")

_Match = tuple[DialectSupport, DriverErrors]
_by_type: dict[type, _Match | None] = {}


def _attribute(obj: object, name: str) -> object:
    try:
        return getattr(obj, name, None)
    except Exception:  # a property that raises (EmulatedDBAPIException.driver_exception...)
        return None


def _walk(exc: BaseException) -> Iterator[BaseException]:
    """Breadth first over the exception graph, each exception once, bounded."""
    seen: set[int] = set()
    queue = [exc]
    while queue and len(seen) < _MAX_NODES:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        for link in _LINKS:
            nxt = _attribute(node, link)
            if isinstance(nxt, BaseException) and id(nxt) not in seen:
                queue.append(nxt)


def _driver_of(exc_type: type) -> _Match | None:
    try:
        return _by_type[exc_type]
    except KeyError:
        pass
    found = None
    for cls in exc_type.__mro__:
        module = getattr(cls, "__module__", None)
        if isinstance(module, str):
            found = driver_for_module(module)
            if found is not None:
                break
    if len(_by_type) < 4096:
        _by_type[exc_type] = found
    return found


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return ""


def _statement(nodes: list[BaseException]) -> str | None:
    for node in nodes:
        statement = _attribute(node, "statement")
        if isinstance(statement, str):
            return statement
    return None


def _classify(exc: object) -> LockErrorKind | None:
    if not isinstance(exc, BaseException):
        return None
    if isinstance(exc, LockUnavailable) and isinstance(exc.kind, LockErrorKind):
        return exc.kind
    nodes = list(_walk(exc))
    fallback: LockErrorKind | None = None
    statement: str | None = None
    statement_read = False
    for node in nodes:
        match = _driver_of(type(node))
        if match is None:
            continue
        support, driver = match
        table = support.errors
        try:
            code = driver.read_code(node)
        except Exception:
            code = None
        if code is None:
            if fallback is None and table.messages:
                message = _message(node).lower()
                names = {cls.__name__ for cls in type(node).__mro__}
                for class_name, fragment, message_kind in table.messages:
                    if class_name in names and fragment in message:
                        fallback = message_kind
                        break
            continue
        kind = table.codes.get(code)
        if table.refine is None:
            return kind
        if not statement_read:
            statement, statement_read = _statement(nodes), True
        return table.refine(ErrorContext(code, kind, _message(node), statement))
    return fallback


def classify(exc: object) -> LockErrorKind | None:
    """The kind of lock failure ``exc`` is, or ``None`` if it is not one.

    Accepts anything: a SQLAlchemy ``DBAPIError`` (or any ``StatementError``), a driver's own
    exception, an exception that reached a lock error through ``__cause__`` / ``__context__``,
    or no exception at all. Decides by the driver's error code, per dialect; message text only
    when a driver carries no code. Never raises.

    >>> import sqlite3
    >>> classify(sqlite3.OperationalError("database is locked"))
    <LockErrorKind.DATABASE_BUSY: 'database_busy'>
    >>> classify(ValueError("lock")) is None
    True
    """
    try:
        return _classify(exc)
    except Exception:
        return None


def is_lock_not_available_error(exc: object) -> bool:
    """Whether ``exc`` says a lock could not be had (Airflow's helper of the same name).

    True for ``lock_not_available``, ``lock_timeout``, ``database_busy`` and ``table_locked``;
    False for deadlocks, serialization failures, statement timeouts and everything else.
    """
    return classify(exc) in LOCK_NOT_AVAILABLE_KINDS


def is_deadlock_error(exc: object) -> bool:
    """Whether the server aborted this transaction to break a deadlock."""
    return classify(exc) is LockErrorKind.DEADLOCK


def is_retryable_lock_error(exc: object) -> bool:
    """Whether running the whole transaction again may succeed: every lock-error kind except
    ``statement_timeout``."""
    return classify(exc) in RETRYABLE_KINDS
