"""Row locks that mean the same on every database: :func:`with_row_locks`.

A call flows like this: the options are checked at once (``nowait`` with ``skip_locked`` is a
``ValueError``), then planned against the capabilities of the bind (:func:`plan_row_locks`):
what is supported is rendered by SQLAlchemy's own ``with_for_update()``; what is not is either
an :class:`~locksafe.UnsupportedLockOption` or, when the caller allows it, a *stronger* lock —
never no lock. The statement carries its request as the execution option ``locksafe_row_locks``,
so that a statement built without a bind is planned by the connection that finally executes it,
and so that SQLite, which has no row locks, takes its database write lock right before the
SELECT runs.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from sqlalchemy import event, table
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Query
from sqlalchemy.sql.selectable import CompoundSelect, GenerativeSelect, Select

from locksafe.capabilities import (
    LockCapabilities,
    dialect_of,
    lock_capabilities,
    unsupported,
    version_of,
)
from locksafe.dialects import support_for
from locksafe.kinds import LockDegradedWarning

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext
    from sqlalchemy.sql.base import Executable

__all__ = [
    "OPTION",
    "LockOptions",
    "OnUnsupported",
    "RowLockPlan",
    "plan_row_locks",
    "with_row_locks",
]

log = logging.getLogger("locksafe.rowlocks")

#: The execution option under which a statement carries its row-lock request / plan.
OPTION: Final = "locksafe_row_locks"

OnUnsupported = Literal["raise", "warn", "degrade"]
_ON_UNSUPPORTED: Final = ("raise", "warn", "degrade")

Q = TypeVar("Q", bound="Query[Any] | GenerativeSelect")


@dataclass(frozen=True)
class LockOptions:
    """The lock a statement asks for, in ``with_for_update()`` terms."""

    read: bool = False
    key_share: bool = False
    nowait: bool = False
    skip_locked: bool = False
    of: tuple[Any, ...] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The options that are set, by name."""
        return tuple(
            name
            for name in ("read", "key_share", "nowait", "skip_locked", "of")
            if getattr(self, name)
        )

    def for_update_kwargs(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "key_share": self.key_share,
            "nowait": self.nowait,
            "skip_locked": self.skip_locked,
            "of": list(self.of) if self.of else None,
        }


@dataclass(frozen=True)
class _Degradation:
    option: str
    requested: Callable[[LockOptions], bool]
    supported: Callable[[LockCapabilities], bool]
    weaken: Callable[[LockOptions], LockOptions]
    meaning: str


#: What each unsupported option becomes when degrading is allowed: always something that locks
#: at least as strongly. Applied in this order.
DEGRADATIONS: Final = (
    _Degradation(
        "key_share",
        lambda o: o.key_share,
        lambda c: c.key_share,
        lambda o: dataclasses.replace(o, key_share=False),
        "FOR NO KEY UPDATE / FOR KEY SHARE become FOR UPDATE / a shared lock (locks more)",
    ),
    _Degradation(
        "read",
        lambda o: o.read,
        lambda c: c.for_share,
        lambda o: dataclasses.replace(o, read=False),
        "a shared lock becomes an exclusive FOR UPDATE (locks more)",
    ),
    _Degradation(
        "of",
        lambda o: bool(o.of),
        lambda c: c.of,
        lambda o: dataclasses.replace(o, of=None),
        "OF is dropped: the rows of every table in FROM are locked (locks more)",
    ),
    _Degradation(
        "skip_locked",
        lambda o: o.skip_locked,
        lambda c: c.skip_locked,
        lambda o: dataclasses.replace(o, skip_locked=False),
        "SKIP LOCKED is dropped: locked rows are waited for instead of skipped",
    ),
    _Degradation(
        "nowait",
        lambda o: o.nowait,
        lambda c: c.nowait,
        lambda o: dataclasses.replace(o, nowait=False),
        "NOWAIT is dropped: the lock is waited for (up to the server's lock wait timeout)",
    ),
)


def _server_key(dialect: Dialect) -> tuple[Any, ...]:
    """What a plan depends on: dialect, server version and flavour (MySQL vs MariaDB)."""
    return (dialect.name, version_of(dialect), getattr(dialect, "is_mariadb", False))


@dataclass(frozen=True)
class _Request:
    options: LockOptions
    on_unsupported: OnUnsupported
    plans: dict[tuple[Any, ...], RowLockPlan] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def plan_for(self, dialect: Dialect, *, report_new: bool = False) -> RowLockPlan:
        """The plan for this server, made once; ``report_new``: report its degradations when
        it is made (the execution path, which has no caller line of its own to warn at)."""
        key = _server_key(dialect)
        plan = self.plans.get(key)
        if plan is None:
            plan = _plan(dialect, self.options, self.on_unsupported, self)
            self.plans[key] = plan
            if report_new:
                _report(plan, self.on_unsupported, stacklevel=2)
        return plan


_requests: dict[tuple[LockOptions, str], _Request] = {}
_MAX_REQUESTS: Final = 1024


def _request(options: LockOptions, on_unsupported: OnUnsupported) -> _Request:
    """One shared request (and so one plan per server) for equal options: planning happens
    once, not on every call."""
    key = (options, on_unsupported)
    try:
        return _requests[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable `of` element: plan this call on its own
        return _Request(options, on_unsupported)
    if len(_requests) >= _MAX_REQUESTS:
        _requests.clear()
    request = _requests[key] = _Request(options, on_unsupported)
    return request


@dataclass(frozen=True)
class RowLockPlan:
    """What a row-lock request does on one database.

    ``effective`` is what is rendered (``requested`` after any degradation); ``degradations``
    says in words what was changed and why; ``mechanism`` is ``"row"`` (a ``FOR UPDATE``-style
    clause) or ``"database"`` (SQLite's write lock, taken before the SELECT).

    >>> from sqlalchemy import create_engine
    >>> plan_row_locks(create_engine("sqlite://"), nowait=True).describe()
    'SQLite 3...: database write lock before the SELECT, failing at once if busy'
    """

    capabilities: LockCapabilities
    requested: LockOptions
    effective: LockOptions
    degradations: tuple[str, ...]
    dialect: Dialect = field(compare=False, repr=False)
    request: _Request | None = field(default=None, compare=False, repr=False)

    @property
    def mechanism(self) -> str:
        return self.capabilities.mechanism

    @property
    def clause(self) -> str:
        """The locking clause SQLAlchemy renders for this server, e.g. ``"FOR UPDATE NOWAIT"``.

        Empty for SQLite, whose lock is not a clause.
        """
        if self.mechanism != "row":
            return ""
        stmt = table("t").select().with_only_columns(_literal_one())
        locked = stmt.with_for_update(**self.effective.for_update_kwargs())
        plain = str(stmt.compile(dialect=self.dialect))
        rendered = str(locked.compile(dialect=self.dialect))
        return rendered[len(plain) :].strip()

    def describe(self) -> str:
        """One line for logs, docs and ``locksafe doctor``."""
        caps = self.capabilities
        head = f"{caps.title} {caps.version_string}: "
        if self.mechanism == "database":
            how = "database write lock before the SELECT"
            if self.effective.nowait:
                how += ", failing at once if busy"
            elif self.effective.skip_locked:
                how += ", no rows if busy"
            else:
                how += ", waiting up to the busy timeout"
        else:
            how = self.clause
        if self.degradations:
            how += " (" + "; ".join(self.degradations) + ")"
        return head + how


def _literal_one() -> Any:
    from sqlalchemy import literal_column

    return literal_column("1")


def _check_options(
    *, nowait: bool, skip_locked: bool, on_unsupported: str, of: Any
) -> tuple[Any, ...] | None:
    if nowait and skip_locked:
        raise ValueError(
            "nowait=True and skip_locked=True cannot be combined: NOWAIT fails when a row is "
            "locked, SKIP LOCKED skips it; choose one"
        )
    if on_unsupported not in _ON_UNSUPPORTED:
        raise ValueError(
            f"on_unsupported={on_unsupported!r} is not one of "
            + ", ".join(repr(v) for v in _ON_UNSUPPORTED)
        )
    if of is None:
        return None
    if isinstance(of, (list, tuple, set, frozenset)):
        elements = tuple(of)
        if not elements:
            raise ValueError("of= must name at least one table, entity or column")
        return elements
    return (of,)


def _plan(
    dialect: Dialect,
    options: LockOptions,
    on_unsupported: OnUnsupported,
    request: _Request | None,
) -> RowLockPlan:
    """Plan ``options`` for ``dialect``'s server: raises under ``on_unsupported="raise"``,
    else records the degradations (reported by :func:`_report`)."""
    caps = lock_capabilities(dialect)
    if caps.mechanism == "none":
        raise unsupported(
            caps,
            "FOR UPDATE",
            reason=caps.summary
            or "locksafe knows no row lock there and never runs a locking query unlocked",
        )
    effective = options
    missing: list[_Degradation] = []
    for rule in DEGRADATIONS:
        if rule.requested(effective) and not rule.supported(caps):
            missing.append(rule)
            effective = rule.weaken(effective)
    degradations = tuple(f"{rule.option}: {rule.meaning}" for rule in missing)
    support = support_for(dialect.name)
    if effective.of and support is not None and support.lock_targets is not None:
        effective = dataclasses.replace(effective, of=support.lock_targets(effective.of))
    if missing and on_unsupported == "raise":
        raise unsupported(
            caps,
            *(rule.option for rule in missing),
            reason="; ".join(rule.meaning for rule in missing)
            + ' would apply with on_unsupported="degrade"',
        )
    return RowLockPlan(
        capabilities=caps,
        requested=options,
        effective=effective,
        degradations=degradations,
        dialect=dialect,
        request=request,
    )


def _report(plan: RowLockPlan, on_unsupported: OnUnsupported, *, stacklevel: int) -> None:
    """Say that ``plan`` degraded the lock: a LockDegradedWarning under ``"warn"`` pointing
    ``stacklevel`` frames above the caller, a DEBUG log line under ``"degrade"``."""
    if not plan.degradations:
        return
    caps = plan.capabilities
    message = f"row lock degraded on {caps.title} {caps.version_string}: " + "; ".join(
        plan.degradations
    )
    if on_unsupported == "warn":
        warnings.warn(message, LockDegradedWarning, stacklevel=stacklevel + 2)
    else:
        log.debug(message)


def plan_row_locks(
    bind: Any,
    *,
    nowait: bool = False,
    skip_locked: bool = False,
    read: bool = False,
    key_share: bool = False,
    of: Any = None,
    on_unsupported: OnUnsupported = "raise",
) -> RowLockPlan:
    """What :func:`with_row_locks` with these options does on ``bind``, without a query.

    ``bind`` is anything :func:`~locksafe.lock_capabilities` accepts. Raises exactly what
    :func:`with_row_locks` would raise.

    >>> from sqlalchemy.dialects import postgresql
    >>> plan_row_locks(postgresql.dialect(), key_share=True, nowait=True).clause
    'FOR NO KEY UPDATE NOWAIT'
    """
    of_elements = _check_options(
        nowait=nowait, skip_locked=skip_locked, on_unsupported=on_unsupported, of=of
    )
    options = LockOptions(
        read=read, key_share=key_share, nowait=nowait, skip_locked=skip_locked, of=of_elements
    )
    plan = _plan(dialect_of(bind), options, on_unsupported, None)
    _report(plan, on_unsupported, stacklevel=1)
    return plan


def with_row_locks(
    query: Q,
    session: Any = None,
    *,
    nowait: bool = False,
    skip_locked: bool = False,
    read: bool = False,
    key_share: bool = False,
    of: Any = None,
    on_unsupported: OnUnsupported = "raise",
) -> Q:
    """Lock the rows ``query`` returns, the same way on every database, or fail clearly.

    Returns the same kind of object it was given (an ORM ``Query`` or a ``select()``), ready to
    execute. The lock lasts until the transaction ends.

    - ``nowait``: fail at once (an error :func:`~locksafe.classify` calls
      ``lock_not_available``, or ``database_busy`` on SQLite) instead of waiting;
    - ``skip_locked``: return only rows nobody else has locked (on SQLite: no rows while another
      connection holds the write lock);
    - ``read``: a shared lock (``FOR SHARE``); ``key_share``: PostgreSQL's weaker ``FOR NO KEY
      UPDATE`` (or ``FOR KEY SHARE`` with ``read``); ``of``: lock only these tables of a join;
    - ``on_unsupported``: what to do when the server cannot honour an option: ``"raise"``
      :class:`~locksafe.UnsupportedLockOption` (default), or ``"warn"`` / ``"degrade"`` to a
      lock that is at least as strong (never to no lock).

    ``session`` (Session, AsyncSession, Connection, AsyncConnection, Engine or AsyncEngine)
    lets unsupported options fail here, at call time; without it the connection that executes
    the statement decides.

    On SQLite, which has no row locks, executing the statement takes the database write lock
    first, so concurrent read-modify-write transactions cannot lose updates.

    >>> from sqlalchemy import column, create_engine, select, table
    >>> jobs = table("jobs", column("id"), column("state"))
    >>> pg = create_engine("postgresql+psycopg2://")
    >>> stmt = with_row_locks(select(jobs).where(jobs.c.state == "queued"), pg, skip_locked=True)
    >>> print(stmt.compile(pg))  # doctest: +NORMALIZE_WHITESPACE
    SELECT jobs.id, jobs.state FROM jobs WHERE jobs.state = %(state_1)s FOR UPDATE SKIP LOCKED
    """
    of_elements = _check_options(
        nowait=nowait, skip_locked=skip_locked, on_unsupported=on_unsupported, of=of
    )
    if not isinstance(query, (Query, Select, CompoundSelect)):
        raise TypeError(
            f"with_row_locks() takes an ORM Query or a select(), not {type(query).__name__!r}"
        )
    options = LockOptions(
        read=read, key_share=key_share, nowait=nowait, skip_locked=skip_locked, of=of_elements
    )
    request = _request(options, on_unsupported)
    _install_hooks()
    value: _Request | RowLockPlan = request
    effective = options
    if session is not None:
        dialect = dialect_of(session)
        support = support_for(dialect.name)
        if support is None or not support.version_dependent or version_of(dialect):
            plan = request.plan_for(dialect)
            _report(plan, on_unsupported, stacklevel=1)
            value, effective = plan, plan.effective
    locked: Any = query.with_for_update(**effective.for_update_kwargs())
    return locked.execution_options(**{OPTION: value})  # type: ignore[no-any-return]


# -- execution hooks --------------------------------------------------------------------------

_installed = False


def _install_hooks() -> None:
    global _installed
    if _installed:
        return
    event.listen(Engine, "before_execute", _before_execute, retval=True)
    event.listen(Engine, "before_cursor_execute", _before_cursor_execute, retval=True)
    _installed = True


def _plan_of(value: Any, dialect: Dialect) -> RowLockPlan | None:
    if isinstance(value, RowLockPlan):
        if value.dialect is dialect or _server_key(value.dialect) == _server_key(dialect):
            return value
        if value.request is None:
            return None
        return value.request.plan_for(dialect, report_new=True)
    if isinstance(value, _Request):
        return value.plan_for(dialect, report_new=True)
    return None


def _before_execute(
    conn: Connection,
    clauseelement: Executable,
    multiparams: Any,
    params: Any,
    execution_options: Any,
) -> tuple[Executable, Any, Any]:
    options = getattr(clauseelement, "_execution_options", None)
    value = options.get(OPTION) if options else None
    if value is None or not isinstance(clauseelement, GenerativeSelect):
        return clauseelement, multiparams, params
    plan = _plan_of(value, conn.dialect)
    if plan is None or plan is value:
        return clauseelement, multiparams, params
    replanned = clauseelement.with_for_update(**plan.effective.for_update_kwargs())
    return replanned.execution_options(**{OPTION: plan}), multiparams, params


def _before_cursor_execute(
    conn: Connection,
    cursor: DBAPICursor,
    statement: str,
    parameters: Any,
    context: ExecutionContext | None,
    executemany: bool,
) -> tuple[str, Any]:
    if context is None:
        return statement, parameters
    value = context.execution_options.get(OPTION)
    if value is None:
        return statement, parameters
    plan = _plan_of(value, conn.dialect)
    if plan is None or plan.mechanism != "database":
        return statement, parameters
    support = support_for(conn.dialect.name)
    if support is None or support.before_locking_select is None:
        return statement, parameters
    try:
        replacement = support.before_locking_select(
            cursor, context, plan, statement, _tables(context)
        )
    except Exception as error:
        # SQLAlchemy 2.1 wraps what this hook raises like any statement error; 2.0 calls the
        # hook outside that, so wrap a driver error here: callers always see a DBAPIError.
        dbapi = conn.dialect.loaded_dbapi
        if isinstance(error, dbapi.Error):
            raise DBAPIError.instance(
                statement, parameters, error, dbapi.Error, dialect=conn.dialect
            ) from error
        raise
    return (statement if replacement is None else replacement), parameters


def _tables(context: ExecutionContext) -> Sequence[Any]:
    from sqlalchemy import Table
    from sqlalchemy.sql.util import find_tables

    compiled = getattr(context, "compiled", None)
    statement = getattr(compiled, "statement", None)
    if statement is None:
        return ()
    return [t for t in find_tables(statement, include_joins=False) if isinstance(t, Table)]
