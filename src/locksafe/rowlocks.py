"""Row locks that mean the same on every database: :func:`with_row_locks`.

A call flows like this: the options are checked at once (``nowait`` with ``skip_locked`` is a
``ValueError``), then planned against the capabilities of the bind (:func:`plan_row_locks`):
what is supported is rendered by SQLAlchemy's own ``with_for_update()``; what is not is either
an :class:`~locksafe.UnsupportedLockOption` or, when the caller allows it, a *stronger* lock —
never no lock. The statement carries its request as the execution option ``locksafe_row_locks``,
so that a statement built without a bind is planned by the connection that finally executes it,
and so that SQLite, which has no row locks, takes its database write lock right before the
SELECT runs. The locking SELECT also carries it in its ``FOR UPDATE`` arguments
(:class:`_LockArg`), which travel with it when it is nested in another statement (subquery,
CTE, ``IN``, ``EXISTS``, ``INSERT ... SELECT``...): the execution hook finds those once per
compiled statement and plans them the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import event, select, table
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, UnboundExecutionError
from sqlalchemy.orm import Query
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import (
    AliasedReturnsRows,
    CompoundSelect,
    ForUpdateArg,
    FromGrouping,
    GenerativeSelect,
    Join,
    Select,
    TableClause,
    TextualSelect,
)
from sqlalchemy.sql.visitors import iterate

from locksafe._cache import IdentityMemo, Memo
from locksafe._sa import (
    ForUpdateArgWithToken,
    deannotate,
    explicit_froms,
    for_update_arg,
    is_autocommit_isolation,
    is_server_side,
    set_for_update_arg,
)
from locksafe.binds import dialect_of, lock_capabilities, server_key
from locksafe.capabilities import LockCapabilities, unsupported, version_of
from locksafe.classify import classify
from locksafe.dialects import driver_code, support_for
from locksafe.kinds import LockDegradedWarning, LockErrorKind, TransactionAborted
from locksafe.options import (
    BOOL_OPTIONS,
    ON_UNSUPPORTED,
    LockOptions,
    OnUnsupported,
    check_bool,
    check_of_element,
)

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import (
        DBAPICursor,
        ExceptionContext,
        ExecutionContext,
    )
    from sqlalchemy.sql.base import Executable
    from sqlalchemy.sql.compiler import Compiled
    from sqlalchemy.sql.elements import ClauseElement

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


Q = TypeVar("Q", bound="Query[Any] | GenerativeSelect")


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
        key = server_key(dialect)
        plan = self.plans.get(key)
        if plan is None:
            plan = _plan(dialect, self.options, self.on_unsupported, self)
            self.plans[key] = plan
            if report_new:
                _report(plan, self.on_unsupported, stacklevel=2)
        return plan

    def __reduce__(self) -> tuple[Any, ...]:
        # A pickled statement carries the request, not its plans: those hold a Dialect (and
        # the driver module). Unpickled, it is the shared request for the same options again.
        return (_request, (self.options, self.on_unsupported))

    @property
    def token(self) -> tuple[Any, ...]:
        """What this request adds to the compiled-statement cache key of a locked SELECT (the
        rendered clause is already in it): two statements that render the same clause but
        ask for different locks never share a compiled form."""
        o = self.options
        return (o.read, o.key_share, o.nowait, o.skip_locked, o.of is not None, self.on_unsupported)


class _LockArg(ForUpdateArgWithToken):
    """SQLAlchemy's ``FOR UPDATE`` arguments of a SELECT locked by :func:`with_row_locks`,
    carrying locksafe's request. The request travels with the SELECT wherever it is nested
    (subquery, CTE, ``IN``, ``EXISTS``, ``INSERT ... SELECT``), and its token is part of the
    statement's cache key, so that a compiled statement tells which of its SELECTs locksafe
    locks."""

    inherit_cache = True  # the cache key is ForUpdateArgWithToken's: the token is in it
    locksafe_value: _Request | RowLockPlan | None = None


def _lock(query: Q, options: LockOptions, value: _Request | RowLockPlan, request: _Request) -> Q:
    """``query`` with ``options`` rendered by ``with_for_update()``, carrying ``value``."""
    locked: Any = query.with_for_update(**options.for_update_kwargs())
    rendered = for_update_arg(locked)
    arg = _LockArg.__new__(_LockArg)
    arg.__dict__.update(rendered.__dict__)
    arg.locksafe_token = request.token
    arg.locksafe_value = value
    set_for_update_arg(locked, arg)
    # populate_existing: an ORM statement run through a Session refreshes the objects it loads
    # from the rows it has just locked, instead of handing back what the identity map already
    # holds (values read before the lock: a lost update). Core ignores the option.
    return locked.execution_options(  # type: ignore[no-any-return]
        **{OPTION: value, "populate_existing": True}
    )


_requests: Memo[tuple[LockOptions, OnUnsupported], _Request] = Memo(
    "rowlocks.requests", maxsize=1024
)


def _request(options: LockOptions, on_unsupported: OnUnsupported) -> _Request:
    """One shared request (and so one plan per server) for equal options: planning happens
    once, not on every call (an unhashable ``of`` element: this call plans on its own)."""
    return _requests.get_or_make((options, on_unsupported), _new_request)


def _new_request(key: tuple[LockOptions, OnUnsupported]) -> _Request:
    return _Request(*key)


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
    #: (dialect class, compound, nested) -> whether SQLAlchemy renders a lock there.
    _renders: dict[tuple[Any, ...], bool] = field(
        default_factory=dict, compare=False, repr=False, init=False
    )

    def __reduce__(self) -> tuple[Any, ...]:
        # A plan holds its Dialect, which does not pickle. A statement planned at call time
        # (which carries its plan) pickles with the request instead: the connection that
        # executes the unpickled statement plans it again.
        if self.request is None:
            raise TypeError(
                "a RowLockPlan from plan_row_locks() holds its SQLAlchemy Dialect and cannot be "
                "pickled; pickle the statement from with_row_locks(), or the options"
            )
        return self.request.__reduce__()

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
        return _clause(self.dialect, self.effective.for_update_kwargs())

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


def _clause(dialect: Dialect, for_update: dict[str, Any]) -> str:
    """The locking clause SQLAlchemy renders for these ``with_for_update()`` arguments."""
    from sqlalchemy import literal_column

    stmt: Select[Any] = table("t").select().with_only_columns(literal_column("1"))
    locked = stmt.with_for_update(**for_update)
    plain = str(stmt.compile(dialect=dialect))
    rendered = str(locked.compile(dialect=dialect))
    return rendered[len(plain) :].strip()


def _check_options(
    *,
    nowait: object,
    skip_locked: object,
    read: object,
    key_share: object,
    on_unsupported: object,
    of: Any,
) -> tuple[Any, ...] | None:
    for name, value in zip(BOOL_OPTIONS, (read, key_share, nowait, skip_locked), strict=True):
        check_bool(name, value)
    if nowait and skip_locked:
        raise ValueError(
            "nowait=True and skip_locked=True cannot be combined: NOWAIT fails when a row is "
            "locked, SKIP LOCKED skips it; choose one"
        )
    if not isinstance(on_unsupported, str) or on_unsupported not in ON_UNSUPPORTED:
        raise ValueError(
            f"on_unsupported={on_unsupported!r} is not one of "
            + ", ".join(repr(v) for v in ON_UNSUPPORTED)
        )
    if of is None:
        return None
    if isinstance(of, (list, tuple, set, frozenset)):
        elements = tuple(of)
        if not elements:
            raise ValueError("of= must name at least one table, entity or column")
    else:
        elements = (of,)
    for element in elements:
        check_of_element(element)
    return elements


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
        nowait=nowait,
        skip_locked=skip_locked,
        read=read,
        key_share=key_share,
        on_unsupported=on_unsupported,
        of=of,
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

    The result may be nested in another statement (a subquery, a CTE, ``IN``, ``EXISTS``, an
    ``INSERT ... SELECT``, an ORM loader option such as ``with_loader_criteria()``,
    ``with_expression()``, a ``column_property()``...): it still locks, or the outer statement
    is refused. Wrapped by ``lambda_stmt()`` or ORM ``from_statement()`` it is still the
    statement itself. ``of`` must name what the statement selects FROM (else ``ValueError``).

    >>> from sqlalchemy import column, create_engine, select, table
    >>> jobs = table("jobs", column("id"), column("state"))
    >>> pg = create_engine("postgresql+psycopg2://")
    >>> stmt = with_row_locks(select(jobs).where(jobs.c.state == "queued"), pg, skip_locked=True)
    >>> print(stmt.compile(pg))  # doctest: +NORMALIZE_WHITESPACE
    SELECT jobs.id, jobs.state FROM jobs WHERE jobs.state = %(state_1)s FOR UPDATE SKIP LOCKED
    """
    of_elements = _check_options(
        nowait=nowait,
        skip_locked=skip_locked,
        read=read,
        key_share=key_share,
        on_unsupported=on_unsupported,
        of=of,
    )
    if not isinstance(query, (Query, Select, CompoundSelect)):
        raise TypeError(
            f"with_row_locks() takes an ORM Query or a select(), not {type(query).__name__!r}"
        )
    if of_elements:
        _check_of_in_from(query, of_elements)
    options = LockOptions(
        read=read, key_share=key_share, nowait=nowait, skip_locked=skip_locked, of=of_elements
    )
    request = _request(options, on_unsupported)
    _install_hooks()
    value: _Request | RowLockPlan = request
    effective = options
    if session is not None:
        try:
            dialect: Dialect | None = dialect_of(session, query)
        except UnboundExecutionError:
            # A Session bound per mapper / table that has no bind for this statement: the
            # connection that finally executes it plans it.
            dialect = None
        if dialect is not None:
            support = support_for(dialect.name)
            if support is None or not support.version_dependent or version_of(dialect):
                plan = request.plan_for(dialect)
                compound = isinstance(query, CompoundSelect)
                _refuse_unrendered(plan, dialect, compound=compound, nested=False)
                _report(plan, on_unsupported, stacklevel=1)
                value, effective = plan, plan.effective
    return _lock(query, effective, value, request)


def _check_of_in_from(query: Query[Any] | GenerativeSelect, of: tuple[Any, ...]) -> None:
    """``of=`` must name tables the statement selects FROM: PostgreSQL would refuse the
    statement, and servers without OF would silently lock something else."""
    from sqlalchemy.sql import coercions, roles
    from sqlalchemy.sql.util import surface_selectables_only

    statement: Any = query.statement if isinstance(query, Query) else query
    froms = _froms(statement)
    if froms is None:
        return  # a textual FROM: what it names cannot be checked
    for element in of:
        target = coercions.expect(roles.ColumnsClauseRole, element)
        for selectable in surface_selectables_only(target):
            if not any(_plain(selectable) is from_ for from_ in froms):
                listed = ", ".join(_name(from_) for from_ in froms) or "nothing"
                raise ValueError(
                    f"of= names {_name(selectable)!r}, which is not in the statement's FROM "
                    f"({listed}): of= may only name tables, aliases, entities or columns of "
                    "what the query selects from"
                )


def _froms(statement: Any) -> list[Any] | None:
    """The tables and aliases a SELECT (or each SELECT of a UNION) selects FROM, joins
    unpacked; ``None`` when part of the FROM is text."""
    from sqlalchemy.sql.util import surface_selectables_only

    pending = [statement]
    froms: list[Any] = []
    while pending:
        candidate = pending.pop()
        if isinstance(candidate, CompoundSelect):
            pending.extend(candidate.selects)
            continue
        if not isinstance(candidate, Select):
            return None
        for from_ in candidate.get_final_froms():
            for selectable in surface_selectables_only(from_):
                if isinstance(selectable, (TextClause, TextualSelect)):
                    return None
                plain = _plain(selectable)
                if not any(plain is known for known in froms):
                    froms.append(plain)
    return froms


def _plain(element: Any) -> Any:
    """``element`` without ORM annotations (the Table or alias itself)."""
    return deannotate(element)


def _name(element: Any) -> str:
    name = getattr(element, "name", None)
    return str(name) if name is not None else type(element).__name__


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
        if value.dialect is dialect or server_key(value.dialect) == server_key(dialect):
            return value
        if value.request is None:
            return None
        return value.request.plan_for(dialect, report_new=True)
    if isinstance(value, _Request):
        return value.plan_for(dialect, report_new=True)
    return None


def _is_locked_select(element: Any) -> bool:
    """A SELECT that itself renders a locking clause (not one that only carries the option,
    such as the ``count(*)`` around a locked Query)."""
    return isinstance(element, GenerativeSelect) and for_update_arg(element) is not None


def _before_execute(
    conn: Connection,
    clauseelement: Executable,
    multiparams: Any,
    params: Any,
    execution_options: Any,
) -> tuple[Executable, Any, Any]:
    value = clauseelement.get_execution_options().get(OPTION)
    if value is None or not _is_locked_select(clauseelement):
        return clauseelement, multiparams, params
    plan = _plan_of(value, conn.dialect)
    if plan is None or plan is value or plan.request is None:
        return clauseelement, multiparams, params
    if _renders_as(for_update_arg(clauseelement), plan.effective):
        # Already rendered as planned for this server (no degradation): run it as it is,
        # rather than building (and computing the cache key of) a new statement each time.
        return clauseelement, multiparams, params
    replanned = _lock(clauseelement, plan.effective, plan, plan.request)  # type: ignore[type-var]
    return replanned, multiparams, params


def _renders_as(arg: ForUpdateArg | None, options: LockOptions) -> bool:
    """Whether ``arg`` renders ``options`` (``of`` never counts as equal: rebuilt instead)."""
    return (
        arg is not None
        and not options.of
        and not arg.of
        and arg.read == options.read
        and arg.key_share == options.key_share
        and arg.nowait == options.nowait
        and arg.skip_locked == options.skip_locked
    )


@dataclass
class _Found:
    """A SELECT locked by with_row_locks, found in a compiled statement."""

    value: _Request | RowLockPlan
    arg: _LockArg
    #: The tables it reads; empty when it reads something locksafe cannot name.
    tables: tuple[TableClause, ...]
    #: Whether it is the compiled statement itself (rather than nested in it).
    top: bool
    #: Whether it is a UNION / INTERSECT / EXCEPT rather than a SELECT.
    compound: bool
    #: Per server: whether the clause compiled into the statement is the one planned there.
    verified: dict[tuple[Any, ...], bool] = field(default_factory=dict)


@dataclass
class _Scan:
    """What one compiled statement holds for locksafe, found once per compiled form."""

    found: tuple[_Found, ...]
    #: The tables the whole statement reads (for a lock requested by the execution option).
    tables: tuple[TableClause, ...]


#: id(compiled statement) -> (weak reference to it, what it locks). SQLAlchemy caches compiled
#: forms, so a statement is scanned once, not on every execution; an entry goes when its
#: compiled statement does. (Keyed by id, checked through the weak reference: a lookup here is
#: on the path of every statement an application runs.)
_scans: IdentityMemo[Compiled, _Scan] = IdentityMemo("rowlocks.scans")
_NOTHING: Final = _Scan((), ())


def _scan(compiled: Compiled) -> _Scan:
    scan = _scans.get(compiled)
    return scan if scan is not None else _scans.put(compiled, _scan_statement(compiled))


def _scan_statement(compiled: Compiled) -> _Scan:
    statement: Any = getattr(compiled, "statement", None)
    if statement is None:
        return _NOTHING
    # The statement as the compiler finally rendered it: for an ORM statement, the Core SELECT
    # the ORM built from it, with what its loader options and mapped SQL expressions added
    # (with_loader_criteria, relationship criteria, column_property, with_expression...); for a
    # lambda_stmt() or ORM from_statement(), the SELECT it wraps. Both are scanned.
    final: Any = getattr(getattr(compiled, "compile_state", None), "statement", None)
    roots = (statement,) if final is None or final is statement else (statement, final)
    # The SELECT the SQL sent is, when it is one: the statement itself, else what it wraps.
    top = statement if isinstance(statement, GenerativeSelect) else final
    found: dict[int, _Found] = {}
    for root in roots:
        for element in iterate(root):
            if not isinstance(element, GenerativeSelect):
                continue
            arg = for_update_arg(element)
            if not isinstance(arg, _LockArg) or arg.locksafe_value is None:
                continue
            # One request per _LockArg: the ORM's annotated copies of a SELECT are distinct
            # elements sharing it.
            known = found.get(id(arg))
            is_top = element is top or element is statement
            if known is not None:
                known.top = known.top or is_top
                continue
            found[id(arg)] = _Found(
                arg.locksafe_value,
                arg,
                _tables_read(element),
                top=is_top,
                compound=isinstance(element, CompoundSelect),
            )
    if not found and not _is_locked_select(statement):
        return _NOTHING
    return _Scan(tuple(found.values()), _tables_read(final if final is not None else statement))


def _tables_read(element: ClauseElement) -> tuple[TableClause, ...]:
    """The tables (Table or lightweight ``table()``) a statement reads, each once; empty when
    it reads anything locksafe cannot name: text (``text()``, a textual FROM, a literal
    column), or a table-valued function."""
    tables: dict[int, TableClause] = {}
    in_from: set[int] = set()
    for item in iterate(element):
        if isinstance(item, TableClause):
            plain = _plain(item)
            tables.setdefault(id(plain), plain)
        elif _unnameable(item, in_from):
            return ()
        elif isinstance(item, Select):
            in_from.update(id(from_) for from_ in _unwrapped(explicit_froms(item)))
        elif isinstance(item, Join):
            in_from.update(id(side) for side in _unwrapped((item.left, item.right)))
    return tuple(tables.values())


def _unnameable(item: Any, in_from: set[int]) -> bool:
    """Whether ``item`` may read tables locksafe cannot name: text, a literal column, a
    table-valued function (or any function used as a FROM)."""
    if isinstance(item, (TextClause, TextualSelect)):
        return True
    if isinstance(item, ColumnClause):
        return bool(item.is_literal)
    if isinstance(item, AliasedReturnsRows):
        return isinstance(item.element, FunctionElement)
    return isinstance(item, FunctionElement) and id(item) in in_from


def _unwrapped(froms: Any) -> Iterator[Any]:
    for from_ in froms:
        while isinstance(from_, FromGrouping):
            from_ = from_.element
        yield from_


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
    compiled = context.compiled
    scan = _NOTHING if compiled is None else _scan(compiled)
    if value is None and not scan.found:
        return statement, parameters  # the common case: nothing locked
    dialect = conn.dialect
    if value is not None and not _is_locked_select(getattr(compiled, "statement", None)):
        value = None  # the lock, if any, is nested: found by the scan
    locks: list[tuple[RowLockPlan, tuple[TableClause, ...], bool]] = []
    if value is not None:
        plan = _plan_of(value, dialect)
        if plan is not None:
            compound = isinstance(getattr(compiled, "statement", None), CompoundSelect)
            _refuse_unrendered(plan, dialect, compound=compound, nested=False)
            locks.append((plan, scan.tables, True))
    for found in scan.found:
        if found.top and value is not None:
            continue  # planned above, from the statement's own option
        plan = _plan_of(found.value, dialect)
        if plan is None:
            continue
        _refuse_unrendered(plan, dialect, compound=found.compound, nested=not found.top)
        if plan.mechanism == "row":
            _verify_rendered(found, plan, dialect)
        locks.append((plan, scan.tables if found.top else found.tables, found.top))
    if not locks:
        return statement, parameters
    _refuse_autocommit(conn, locks)
    streams = _streams(context)
    if streams:
        _refuse_streaming_that_loses_errors(dialect, locks)
    if not streams and not executemany:
        _savepoint_around_nowait(conn, context, locks)
    return _take_database_locks(conn, cursor, context, statement, parameters, locks)


def _autocommit(conn: object) -> str | None:
    """Why ``conn`` runs without a transaction, or ``None`` when it has one: SQLAlchemy's
    ``AUTOCOMMIT`` isolation (execution option, engine-wide ``isolation_level``), or a DB-API
    connection switched to autocommit behind SQLAlchemy's back (``dbapi_conn.autocommit =
    True``: psycopg2, psycopg, pg8000, asyncpg's and psycopg's async adapters, MariaDB
    Connector, mysql-connector)."""
    if not isinstance(conn, Connection):
        return None  # a stand-in (unit tests drive the hooks with a fake connection)
    if is_autocommit_isolation(conn):
        return "the connection is in AUTOCOMMIT isolation"
    dbapi_connection = conn.connection.dbapi_connection
    if getattr(dbapi_connection, "autocommit", None) is True:
        return "the DB-API connection is in autocommit mode"
    return None


def _refuse_autocommit(
    conn: Connection, locks: list[tuple[RowLockPlan, tuple[TableClause, ...], bool]]
) -> None:
    """A row lock lasts until the transaction ends; without a transaction it ends with the
    statement, so the SELECT would lock nothing that outlives it. Refuse, before it is sent
    (SQLite's hook refuses its "database" lock there in its own words)."""
    for plan, _, _ in locks:
        if plan.mechanism != "row":
            continue
        why = _autocommit(conn)
        if why is None:
            return
        raise unsupported(
            plan.capabilities,
            "a row lock outside a transaction",
            reason=(
                f"{why}, so the lock would end with the statement and protect nothing "
                "(another connection could lock or change the rows at once); run the locking "
                "SELECT inside a transaction (a Session, engine.begin(), conn.begin(), an "
                "isolation_level other than AUTOCOMMIT)"
            ),
        )


def _streams(context: ExecutionContext) -> bool:
    """Whether this execution streams its rows from a server-side cursor: asked for with
    ``stream_results`` / ``yield_per``, or chosen by the dialect for every SELECT
    (``create_engine(server_side_cursors=True)``). SQLAlchemy records its choice on the
    execution context when it creates the cursor, before ``before_cursor_execute``."""
    return bool(
        is_server_side(context)
        or context.execution_options.get("stream_results")
    )


def _refuse_streaming_that_loses_errors(
    dialect: Dialect, locks: list[tuple[RowLockPlan, tuple[TableClause, ...], bool]]
) -> None:
    """Some drivers end a streamed result quietly when the server reports an error while rows
    are fetched (the dialect module lists them): a row lock that fails half-way would return
    a truncated result, silently. Refuse, before anything runs. SKIP LOCKED never waits for
    a lock, so it cannot fail that way."""
    support = support_for(dialect.name)
    if support is None or dialect.driver not in support.streaming_loses_errors:
        return
    for plan, _, _ in locks:
        if plan.mechanism == "row" and not plan.effective.skip_locked:
            raise unsupported(
                plan.capabilities,
                "stream_results",
                reason=(
                    f"the {dialect.driver} driver ends a streamed result without an error when "
                    "a lock fails while rows are fetched (a truncated result, silently); "
                    "execute this locking query without stream_results / yield_per (and on "
                    "an engine made without server_side_cursors=True), or use "
                    "skip_locked=True, or another driver"
                ),
            )


_rendered: dict[tuple[Any, ...], bool] = {}


def _renders_lock(dialect: Dialect, *, compound: bool, nested: bool) -> bool:
    """Whether SQLAlchemy renders a locking clause there for a SELECT (``compound``: a UNION)
    at the top of a statement or ``nested`` in one. It renders none for a UNION, and some
    dialects none for a nested SELECT (Oracle, whose server refuses them)."""
    key = (type(dialect), server_key(dialect), compound, nested)
    found = _rendered.get(key)
    if found is None:
        from sqlalchemy import column, union_all

        t = table("t", column("id"))
        inner: Any = union_all(select(t), select(t)) if compound else select(t)
        outer: Callable[[Any], Any] = (lambda s: select(s.subquery())) if nested else (lambda s: s)
        plain = str(outer(inner).compile(dialect=dialect))
        locked = str(outer(inner.with_for_update()).compile(dialect=dialect))
        found = _rendered[key] = plain != locked
    return found


def _refuse_unrendered(
    plan: RowLockPlan, dialect: Dialect, *, compound: bool, nested: bool
) -> None:
    """Where the lock is a clause, refuse a statement in which SQLAlchemy would render none
    (it would run unlocked)."""
    if plan.mechanism != "row":
        return
    key = (type(dialect), compound, nested)
    renders = plan._renders.get(key)
    if renders is None:
        renders = plan._renders[key] = _renders_lock(dialect, compound=compound, nested=nested)
    if renders:
        return
    what = "a UNION / INTERSECT / EXCEPT" if compound else "a SELECT"
    where = " nested in another statement" if nested else ""
    # The statement's shape is refused, whatever the options (naming `nowait` would blame
    # an option the server supports).
    raise unsupported(
        plan.capabilities,
        f"FOR UPDATE on {what}{where}",
        reason=(
            f"SQLAlchemy renders no lock for {what}{where} on {plan.capabilities.title}: it "
            "would run unlocked; lock each SELECT on its own, and run it on its own"
        ),
    )


def _verify_rendered(found: _Found, plan: RowLockPlan, dialect: Dialect) -> None:
    """A nested (or wrapped) SELECT's clause was rendered when the statement was built; refuse
    to run it if that is not the clause planned for this server (it would lock differently)."""
    key = server_key(dialect)
    ok = found.verified.get(key)
    if ok is None:
        arg = found.arg
        rendered = _clause(
            dialect,
            {
                "read": arg.read,
                "key_share": arg.key_share,
                "nowait": arg.nowait,
                "skip_locked": arg.skip_locked,
                "of": arg.of,
            },
        )
        ok = found.verified[key] = rendered == plan.clause
    if not ok:
        raise unsupported(
            plan.capabilities,
            *(plan.requested.names or ("FOR UPDATE",)),
            reason=(
                "a SELECT locked by with_row_locks() and nested in another statement (or "
                "wrapped by lambda_stmt() / from_statement()) is rendered when it is built; "
                f"here it would not be {plan.clause!r}: pass the "
                "session or connection to with_row_locks() so that it is planned for this "
                "server"
            ),
        )


def _take_database_locks(
    conn: Connection,
    cursor: DBAPICursor,
    context: ExecutionContext,
    statement: str,
    parameters: Any,
    locks: list[tuple[RowLockPlan, tuple[TableClause, ...], bool]],
) -> tuple[str, Any]:
    """Run the dialect's step before each lock planned as a "database" lock (SQLite)."""
    hook: _LockingHook | None = None
    done: set[tuple[Any, ...]] = set()
    for plan, tables, top in locks:
        if plan.mechanism != "database":
            continue
        if hook is None:
            support = support_for(conn.dialect.name)
            hook = support.before_locking_select if support is not None else None
            if hook is None:  # only a dialect with this hook plans "database" locks
                return statement, parameters
        if not top and plan.effective.skip_locked:
            # Skipping means the whole statement returns no rows; a SELECT nested in another
            # statement cannot be made to return none, so it fails at once instead of waiting.
            effective = dataclasses.replace(plan.effective, skip_locked=False, nowait=True)
            plan = dataclasses.replace(plan, effective=effective)
        key = (plan.effective.nowait, plan.effective.skip_locked, tuple(map(id, tables)))
        if key in done:
            continue
        done.add(key)
        replacement = _call_hook(hook, conn, cursor, context, plan, statement, parameters, tables)
        if replacement is not None:
            return replacement, parameters  # nothing is read: no other lock is needed
    return statement, parameters


_LockingHook = Callable[
    ["DBAPICursor", "ExecutionContext", RowLockPlan, str, "Sequence[TableClause]"], "str | None"
]


def _call_hook(
    hook: _LockingHook,
    conn: Connection,
    cursor: DBAPICursor,
    context: ExecutionContext,
    plan: RowLockPlan,
    statement: str,
    parameters: Any,
    tables: tuple[TableClause, ...],
) -> str | None:
    try:
        replacement: str | None = hook(cursor, context, plan, statement, tables)
    except Exception as error:
        # SQLAlchemy 2.1 wraps what this hook raises like any statement error; 2.0 calls the
        # hook outside that, so wrap a driver error here: callers always see a DBAPIError.
        dbapi = conn.dialect.loaded_dbapi
        if isinstance(error, dbapi.Error):
            raise DBAPIError.instance(
                statement, parameters, error, dbapi.Error, dialect=conn.dialect
            ) from error
        raise
    return replacement


# -- errors raised while rows are fetched --------------------------------------------------------


def _fill_statement(context: ExceptionContext) -> None:
    """An error raised while rows are fetched (streamed results, ``yield_per``) reaches
    SQLAlchemy's error handling without its statement (``statement=None``); the classifier
    needs it (MariaDB reports a failed NOWAIT like a lock wait timeout, and only the
    statement tells them apart). Fill it, and its parameters, from the execution context."""
    error = context.sqlalchemy_exception
    execution = context.execution_context
    if error is None or execution is None or error.statement is not None:
        return
    sql = getattr(execution, "statement", None)
    if not isinstance(sql, str):
        return
    error.statement = sql
    if error.params is None:
        sent = getattr(execution, "parameters", None)
        if isinstance(sent, list) and sent:
            error.params = sent if getattr(execution, "executemany", False) else sent[0]


event.listen(Engine, "handle_error", _fill_statement)


# -- servers that abort the whole transaction on an error ------------------------------------
#
# PostgreSQL aborts a transaction on any error until ROLLBACK (or ROLLBACK TO a savepoint set
# before the error), and its COMMIT then answers ROLLBACK without an error; InnoDB rolls back
# the whole transaction on a deadlock and goes on in a new one. A lock error the application
# catches (to skip a row held elsewhere) would turn its COMMIT into a silent loss there, and
# not on the other servers. So, where the dialect module says the server aborts on errors,
# locksafe's own NOWAIT locking SELECTs run in a savepoint (a caught NOWAIT failure leaves the
# transaction as it was, as elsewhere); and a COMMIT after any other lock error locksafe saw
# abort the transaction raises TransactionAborted.

#: The savepoint around a NOWAIT locking SELECT, set and ended at the DB-API level (SQLAlchemy's
#: transaction does not see it).
SAVEPOINT: Final = "locksafe_nowait"

#: id(execution context) -> (weak reference to it, the DB-API connection): the NOWAIT SELECTs
#: running in locksafe's savepoint, released after they ran, rolled back to if they fail.
_savepoints: dict[int, tuple[weakref.ref[Any], Any]] = {}


def _savepoint_around_nowait(
    conn: Connection,
    context: ExecutionContext,
    locks: list[tuple[RowLockPlan, tuple[TableClause, ...], bool]],
) -> None:
    """Set locksafe's savepoint before a NOWAIT locking SELECT that runs in a transaction on
    a server that aborts transactions on errors; statements without NOWAIT pay nothing."""
    if not any(plan.mechanism == "row" and plan.effective.nowait for plan, _, _ in locks):
        return
    support = support_for(conn.dialect.name)
    if support is None or not support.errors_abort_transaction or not conn.in_transaction():
        return
    dbapi_connection = conn.connection.dbapi_connection
    try:
        _run_sql(dbapi_connection, f"SAVEPOINT {SAVEPOINT}")
    except Exception as error:
        dbapi = conn.dialect.loaded_dbapi
        if isinstance(error, dbapi.Error):  # as _call_hook: always a DBAPIError to callers
            raise DBAPIError.instance(
                f"SAVEPOINT {SAVEPOINT}", None, error, dbapi.Error, dialect=conn.dialect
            ) from error
        raise
    _install_savepoint_hooks(conn.engine)
    _savepoints[id(context)] = (weakref.ref(context), dbapi_connection)


def _run_sql(dbapi_connection: Any, sql: str) -> None:
    """Run ``sql`` on its own DB-API cursor: the statement's cursor holds its rows."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


def _take_savepoint(context: ExecutionContext | None) -> Any:
    """The DB-API connection whose locksafe savepoint surrounds ``context``'s statement (and
    forget it), or ``None``."""
    if context is None or not _savepoints:
        return None
    entry = _savepoints.pop(id(context), None)
    if entry is None or entry[0]() is not context:
        return None
    return entry[1]


def _release_savepoint(
    conn: Connection,
    cursor: DBAPICursor,
    statement: str,
    parameters: Any,
    context: ExecutionContext | None,
    executemany: bool,
) -> None:
    """After the NOWAIT SELECT ran: RELEASE locksafe's savepoint (its locks stay, as the
    transaction's). An error here goes through SQLAlchemy's handling like the statement's."""
    if not _savepoints:  # every statement of the process comes here: keep it one test
        return
    dbapi_connection = _take_savepoint(context)
    if dbapi_connection is not None:
        _run_sql(dbapi_connection, f"RELEASE SAVEPOINT {SAVEPOINT}")


#: Engines with the RELEASE listener: only an engine that ran a NOWAIT savepoint pays for it
#: (an ``after_cursor_execute`` listener costs every statement of its engine about 1 µs).
_engines_releasing: weakref.WeakSet[Engine] = weakref.WeakSet()


def _install_savepoint_hooks(engine: Engine) -> None:
    if engine not in _engines_releasing:
        event.listen(engine, "after_cursor_execute", _release_savepoint)
        _engines_releasing.add(engine)


@dataclass
class _Aborted:
    """A lock error that aborted a connection's transaction."""

    error: BaseException
    kind: LockErrorKind | None
    #: Raised while a savepoint was open (PostgreSQL): a ROLLBACK TO SAVEPOINT undoes the abort.
    in_savepoint: bool


#: Connections whose transaction a lock error aborted, until they roll back.
_aborted: weakref.WeakKeyDictionary[Connection, _Aborted] = weakref.WeakKeyDictionary()


def _watch_errors(context: ExceptionContext) -> None:
    """On every statement error (``handle_error``): roll a failed NOWAIT SELECT back to
    locksafe's savepoint; otherwise remember a lock error that aborted the transaction."""
    dbapi_connection = _take_savepoint(context.execution_context)
    conn = context.connection
    if conn is None or context.is_disconnect:
        return
    if dbapi_connection is not None:
        try:
            _run_sql(dbapi_connection, f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
            _run_sql(dbapi_connection, f"RELEASE SAVEPOINT {SAVEPOINT}")
        except Exception:
            log.debug("ROLLBACK TO SAVEPOINT %s failed", SAVEPOINT, exc_info=True)
        else:
            return  # the transaction is as it was before the statement
    support = support_for(conn.dialect.name)
    if support is None or (
        not support.errors_abort_transaction and not support.transaction_rollback_codes
    ):
        return
    error: BaseException = context.sqlalchemy_exception or context.original_exception
    original = context.original_exception
    found = driver_code(original) if original is not None else None
    rolled_back = found is not None and found[1] in support.transaction_rollback_codes
    kind = classify(error)
    if not rolled_back and not (support.errors_abort_transaction and kind is not None):
        return
    if dbapi_connection is None and (not conn.in_transaction() or _autocommit(conn)):
        return  # no transaction to abort (a COMMIT in autocommit mode does nothing)
    if conn in _aborted:
        return  # the first error is the one that aborted it
    _install_abort_hooks()
    _aborted[conn] = _Aborted(
        error, kind, in_savepoint=not rolled_back and conn.in_nested_transaction()
    )


def _refuse_commit(conn: Connection) -> None:
    """``commit`` event: a transaction a lock error aborted must not be "committed"."""
    if not _aborted:
        return
    aborted = _aborted.get(conn)
    if aborted is None:
        return
    title = support.title if (support := support_for(conn.dialect.name)) else conn.dialect.name
    raise TransactionAborted(
        aborted.kind, title, detail=f"{type(aborted.error).__name__}"
    ) from aborted.error


def _forget_abort(conn: Connection) -> None:
    """``rollback`` event: the transaction is over."""
    if _aborted:
        _aborted.pop(conn, None)


def _forget_savepoint_abort(conn: Connection, name: str, context: object) -> None:
    """``rollback_savepoint`` event: an abort raised inside a savepoint is undone by rolling
    back to it (or to one around it; none can be opened while the transaction is aborted)."""
    if not _aborted:
        return
    aborted = _aborted.get(conn)
    if aborted is not None and aborted.in_savepoint:
        del _aborted[conn]


_abort_hooks_installed = False


def _install_abort_hooks() -> None:
    """Installed when the first aborting lock error is seen: until then, COMMITs pay nothing."""
    global _abort_hooks_installed
    if not _abort_hooks_installed:
        event.listen(Engine, "commit", _refuse_commit)
        event.listen(Engine, "rollback", _forget_abort)
        event.listen(Engine, "rollback_savepoint", _forget_savepoint_abort)
        _abort_hooks_installed = True


event.listen(Engine, "handle_error", _watch_errors)
