"""Which lock failure an exception is, for any driver: :func:`classify`; whether running the
transaction again may succeed: :func:`is_retryable_lock_error`, the one rule that
:func:`~locksafe.transactional`, :data:`~locksafe.retry_if_lock_error` and the Starlette
handlers use.

The functions are importable from :mod:`locksafe` (``locksafe.classify_raised``...), which is
where the documentation cites them: ``locksafe.classify`` is the *function* :func:`classify`,
which hides this module's name (``import locksafe.classify as m`` gives the function too;
``from locksafe.classify import RETRYABLE_KINDS`` works).

The generic part only walks the exception graph (SQLAlchemy's ``.orig``, ``__cause__``,
``__context__``) and finds, for each exception, the driver that raised it by the module of its
class. The driver's dialect module then says, as data, where the code is and what it means.

The case nearly always met — a SQLAlchemy ``DBAPIError`` whose ``.orig`` is a driver's exception
with a code, or a driver's exception itself — is answered without the walk (:func:`_direct`),
exactly as the walk would answer it (the walk's first exceptions are these, and the first driver
exception with a code decides); the answer of a table's ``refine`` step (message parsing) is
remembered by its inputs. Anything else takes the walk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast

from locksafe._cache import Memo
from locksafe.dialects import (
    DialectSupport,
    DriverErrors,
    ErrorContext,
    ErrorTable,
    driver_for_module,
)
from locksafe.dialects.base import Code
from locksafe.kinds import LockErrorKind, LockUnavailable

__all__ = [
    "LOCK_NOT_AVAILABLE_KINDS",
    "RETRYABLE_KINDS",
    "classify",
    "classify_raised",
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
_MAX_CACHED_TYPES: Final = 4096
_LINKS: Final = ("orig", "__cause__", "__context__")
#: The links by which an exception *reports* a failure: what it wraps, what it was raised from.
_RAISED_LINKS: Final = ("orig", "__cause__")

#: Set (to ``True``) by :func:`~locksafe.transactional` on an error after which work may be
#: committed: a COMMIT whose outcome is unknown, an error raised after the function committed
#: its transaction itself. Running the transaction again could redo committed work, so no
#: rule calls it retryable (:func:`is_retryable_lock_error`).
MAY_HAVE_COMMITTED: Final = "_locksafe_may_have_committed"

_Match = tuple[DialectSupport, DriverErrors]
#: The driver of each exception class seen (bounded: classes made on the fly come and go).
_by_type: Memo[type, _Match | None] = Memo("classify.driver_of_type", maxsize=_MAX_CACHED_TYPES)
_Refiner = Callable[[ErrorContext], LockErrorKind | None]
_Refined = tuple[_Refiner, Code, LockErrorKind | None, str, str | None]
#: A table's ``refine`` answer by (refine, code, kind, message, statement): ``refine`` reads
#: nothing else (:class:`~locksafe.dialects.ErrorContext` is all it is given), and a server
#: repeats the same message for the same statement. Bounded; long texts are not remembered.
_refined: Memo[_Refined, LockErrorKind | None] = Memo("classify.refined", maxsize=512)
_MAX_REFINED_TEXT: Final = 2048
#: What :func:`_direct` answers when the walk must decide.
_WALK: Final = object()


def _attribute(obj: object, name: str) -> object:
    try:
        return getattr(obj, name, None)
    except Exception:  # a property that raises (EmulatedDBAPIException.driver_exception...)
        return None


def _walk(exc: BaseException, links: tuple[str, ...]) -> list[BaseException]:
    """Breadth first over the exception graph, each exception once, at most ``_MAX_NODES``."""
    nodes = [exc]
    seen = {id(exc)}
    index = 0
    while index < len(nodes):
        node = nodes[index]
        index += 1
        for link in links:
            try:  # a property that raises (EmulatedDBAPIException.driver_exception...)
                nxt = getattr(node, link, None)
                if nxt is None or not isinstance(nxt, BaseException) or id(nxt) in seen:
                    continue
            except Exception:
                continue
            seen.add(id(nxt))
            nodes.append(nxt)
            if len(nodes) >= _MAX_NODES:
                return nodes
    return nodes


def _driver_of(exc_type: type) -> _Match | None:
    return _by_type.get_or_make(exc_type, _find_driver_of)


def _find_driver_of(exc_type: type) -> _Match | None:
    for cls in exc_type.__mro__:
        module = getattr(cls, "__module__", None)
        if isinstance(module, str):
            found = driver_for_module(module)
            if found is not None:
                return found
    return None


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return ""


def _statement(nodes: list[BaseException], failed: BaseException) -> str | None:
    """The SQL that raised ``failed``: the ``statement`` of the SQLAlchemy exception wrapping
    it. Another exception's statement (an earlier error in the chain) says nothing about it."""
    for node in nodes:
        if node is not failed and _attribute(node, "orig") is failed:
            statement = _attribute(node, "statement")
            if isinstance(statement, str):
                return statement
    return None


def _by_message(table: ErrorTable, node: BaseException) -> LockErrorKind | None:
    """The last resort for an exception without a code: the server's fixed message, matched
    from its start (a message that merely contains it, such as "no such table: database is
    locked", is another error)."""
    message = _message(node).lower().lstrip()
    names = {cls.__name__ for cls in type(node).__mro__}
    for class_name, start, kind in table.messages:
        if class_name in names and message.startswith(start):
            return kind
    return None


def _refine(
    table: ErrorTable, code: Code, kind: LockErrorKind | None, message: str, statement: str | None
) -> LockErrorKind | None:
    refine = table.refine
    if refine is None:
        return kind
    if len(message) + len(statement or "") > _MAX_REFINED_TEXT:
        return refine(ErrorContext(code, kind, message, statement))
    return _refined.get_or_make((refine, code, kind, message, statement), _run_refine)


def _run_refine(key: _Refined) -> LockErrorKind | None:
    refine, code, kind, message, statement = key
    return refine(ErrorContext(code, kind, message, statement))


def _direct(exc: object) -> object:
    """What :func:`_classify` answers, without the walk, in the two shapes nearly every lock
    error has; :data:`_WALK` for any other (then the walk decides). May raise (a hostile
    exception): the caller then walks.

    - a driver's exception carrying a code, when its table needs no statement (no ``refine``):
      the walk's first node, which decides;
    - an exception of no driver (SQLAlchemy's ``DBAPIError``) whose ``orig`` is a driver's
      exception carrying a code: the walk's second node (``orig`` is its first link), which
      decides, since the first said nothing; the statement is the wrapper's own.
    """
    cls = type(exc)
    if not issubclass(cls, Exception) or issubclass(cls, LockUnavailable):
        return _WALK
    match = _driver_of(cls)
    if match is not None:
        support, driver = match
        table = support.errors
        if table.refine is not None:
            return _WALK  # the statement is read from a wrapper found by the walk
        code = driver.read_code(cast(Exception, exc))
        return _WALK if code is None else table.codes.get(code)
    orig: object = getattr(exc, "orig", None)
    if orig is None or orig is exc or not isinstance(orig, BaseException):
        return _WALK
    orig_cls = type(orig)
    if issubclass(orig_cls, LockUnavailable):
        return _WALK
    match = _driver_of(orig_cls)
    if match is None:
        return _WALK
    support, driver = match
    code = driver.read_code(orig)
    if code is None:
        return _WALK
    table = support.errors
    kind = table.codes.get(code)
    if table.refine is None:
        return kind
    statement = getattr(exc, "statement", None)
    again: object = getattr(exc, "orig", None)
    if not isinstance(statement, str) or again is not orig:
        return _WALK  # the walk looks for the statement elsewhere in the graph
    return _refine(table, code, kind, _message(orig), statement)


def _classify(exc: object, links: tuple[str, ...]) -> LockErrorKind | None:
    try:
        found = _direct(exc)
    except Exception:
        found = _WALK  # a hostile exception: the walk reads it with care
    if found is not _WALK:
        return cast("LockErrorKind | None", found)
    return _walk_and_classify(exc, links)


def _walk_and_classify(exc: object, links: tuple[str, ...]) -> LockErrorKind | None:
    # type(), not isinstance(): an object's own ``__class__`` may be a property that raises.
    if not issubclass(type(exc), Exception):
        return None  # not an exception, or a KeyboardInterrupt, a cancelled task...
    nodes = _walk(cast(Exception, exc), links)
    fallback: tuple[DialectSupport | None, LockErrorKind] | None = None
    for node in nodes:
        try:
            found = _classify_node(node, nodes)
        except Exception:
            continue  # this one exception is hostile; the others may still tell
        if found is None:
            continue
        support, kind, by_code = found
        if not by_code:
            # No code: remember what the message says, but a code further on decides.
            if fallback is None and kind is not None:
                fallback = (support, kind)
            continue
        if fallback is not None and fallback[0] is not support:
            # ...only a code of the same database: another driver's error further on (the
            # error this one was raised while handling) says nothing about this one.
            return fallback[1]
        return kind
    return fallback[1] if fallback is not None else None


def _classify_node(
    node: BaseException, nodes: list[BaseException]
) -> tuple[DialectSupport | None, LockErrorKind | None, bool] | None:
    """(dialect, kind, whether a code decided it) for one exception, or ``None`` when it is
    not a database driver's exception at all."""
    if issubclass(type(node), LockUnavailable):
        # locksafe gave up retrying: it says which kind (anywhere in the graph, e.g. behind an
        # application's own exception).
        kind = _attribute(node, "kind")
        if isinstance(kind, LockErrorKind):
            return None, kind, True
    match = _driver_of(type(node))
    if match is None:
        return None
    support, driver = match
    table = support.errors
    try:
        code = driver.read_code(node)
    except Exception:
        code = None
    if code is None:
        return support, _by_message(table, node) if table.messages else None, False
    # The first driver exception with a code decides, whatever it says.
    kind = _refine(table, code, table.codes.get(code), _message(node), _statement(nodes, node))
    return support, kind, True


def classify(exc: object) -> LockErrorKind | None:
    """The kind of lock failure ``exc`` is, or ``None`` if it is not one.

    Accepts anything: a SQLAlchemy ``DBAPIError`` (or any ``StatementError``), a driver's own
    exception, an exception that reached a lock error through ``__cause__`` / ``__context__``,
    or no exception at all. Decides by the driver's error code, per dialect; message text only
    when a driver carries no code. Never raises. A ``BaseException`` that is not an
    ``Exception`` (``KeyboardInterrupt``, a cancelled task) is never a lock error, whatever it
    interrupted.

    >>> import sqlite3
    >>> classify(sqlite3.OperationalError("database is locked"))
    <LockErrorKind.DATABASE_BUSY: 'database_busy'>
    >>> classify(ValueError("lock")) is None
    True
    """
    try:
        return _classify(exc, _LINKS)
    except Exception:
        return None


def classify_raised(exc: object) -> LockErrorKind | None:
    """Like :func:`classify`, but only through what ``exc`` wraps (``.orig``) or was raised
    from (``__cause__``): the failure ``exc`` itself reports.

    An exception raised while *handling* a lock error, and reaching it only through
    ``__context__`` (``except OperationalError: raise Conflict()``), is the code's own answer
    to that error, not the error. :func:`is_retryable_lock_error`, the rule every retry
    decision uses, reads errors this way.

    >>> import sqlite3
    >>> try:
    ...     try:
    ...         raise sqlite3.OperationalError("database is locked")
    ...     except sqlite3.OperationalError:
    ...         raise KeyError("busy")
    ... except KeyError as handled:
    ...     print(classify(handled), classify_raised(handled))
    database_busy None
    """
    try:
        return _classify(exc, _RAISED_LINKS)
    except Exception:
        return None


def is_lock_not_available_error(exc: object) -> bool:
    """Whether ``exc`` says a lock could not be had (Airflow's helper of the same name).

    True for ``lock_not_available``, ``lock_timeout``, ``database_busy`` and ``table_locked``;
    False for deadlocks, serialization failures, statement timeouts and everything else.

    >>> import pymysql, sqlite3
    >>> is_lock_not_available_error(sqlite3.OperationalError("database is locked"))
    True
    >>> is_lock_not_available_error(pymysql.err.OperationalError(1213, "Deadlock found"))
    False
    """
    return classify(exc) in LOCK_NOT_AVAILABLE_KINDS


def is_deadlock_error(exc: object) -> bool:
    """Whether the server aborted this transaction to break a deadlock.

    >>> import pymysql
    >>> is_deadlock_error(pymysql.err.OperationalError(1213, "Deadlock found"))
    True
    >>> is_deadlock_error(pymysql.err.OperationalError(1205, "Lock wait timeout exceeded"))
    False
    """
    return classify(exc) is LockErrorKind.DEADLOCK


def may_have_committed(exc: object) -> bool:
    """Whether ``exc``, or an error it was raised from (``__cause__``), is marked as one after
    which work may be committed (:data:`MAY_HAVE_COMMITTED`). Never raises."""
    node: object = exc
    for _ in range(_MAX_NODES):
        try:
            if not isinstance(node, BaseException):
                return False
            if getattr(node, MAY_HAVE_COMMITTED, False) is True:
                return True
            node = getattr(node, "__cause__", None)
        except Exception:  # a hostile exception: the walk ends there
            return False
    return False


def is_retryable_lock_error(exc: object) -> bool:
    """Whether running the whole transaction again may succeed: ``exc`` *itself* reports a
    lock error of any kind but ``statement_timeout`` (:func:`classify_raised`: through what it
    wraps or was raised from, not through an error it was raised while handling), and no work
    may have been committed before it (a lock error after the function's own ``commit()``).

    The one rule of locksafe: :func:`~locksafe.transactional` retries what it calls retryable
    (on top of that, no retry mechanism ever retries an interruption or a
    :class:`~locksafe.LockUnavailable`, which already ran out of retries),
    :data:`~locksafe.retry_if_lock_error` is the same rule for tenacity, and
    :mod:`locksafe.starlette` answers what it calls retryable with ``503``. A
    :class:`~locksafe.LockUnavailable` is retryable by *its* caller (a client told to come
    back later): True. Never raises.

    >>> import sqlite3
    >>> busy = sqlite3.OperationalError("database is locked")
    >>> is_retryable_lock_error(busy)
    True
    >>> try:
    ...     try:
    ...         raise busy
    ...     except sqlite3.OperationalError:
    ...         raise KeyError("busy: answered with our own error")
    ... except KeyError as answer:
    ...     is_retryable_lock_error(answer)
    False
    """
    try:
        return classify_raised(exc) in RETRYABLE_KINDS and not may_have_committed(exc)
    except Exception:
        return False
