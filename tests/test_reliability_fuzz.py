"""Bad input, fuzzed (issue 13, reliability suite): hypothesis drives every public function's
options — types, combinations, NaN / ±inf, huge numbers, huge and hostile strings — and
``classify`` / ``classify_raised`` / ``is_*`` with arbitrary objects.

The oracle, per option value: *valid* (must work), *invalid* (must be refused), or *either*
(a value at the edge — an int too big for a float, a Fraction where an int or float is
documented — that may work or be refused). A call must then:

- work when every option is valid (and do what it says, on the real database: the statement
  runs, the lock is taken and given back, the setting is set and set back, the handler answers
  503 with the right ``Retry-After``);
- raise ``TypeError`` / ``ValueError`` whose message names one of the refused options (for a
  positional argument: the function or the type it got), at call time, when one is invalid;
- never raise anything else (an ``OverflowError``, an ``AttributeError``, a driver error);
- leave the database as it was (row count and checksum of a guard table, before and after).

``UnsupportedLockOption`` naming the option is also a clear refusal, for what the server cannot
do (``key_share`` on MariaDB, a shared named lock on MySQL).

CI runs 60 examples per function, derandomized (the same ones every run; deadline off: a loaded
2-core machine), the database tests on one sync driver per backend (sqlite+pysqlite,
postgresql+psycopg, mysql+pymysql); ``LOCKSAFE_RELIABILITY=full`` runs 400, drawn at random, on
every driver cell, async ones included (``async with`` / ``await`` there)::

    LOCKSAFE_RELIABILITY=full pytest tests/test_reliability_fuzz.py
"""

from __future__ import annotations

import contextlib
import decimal
import fractions
import inspect
import math
import numbers
import sqlite3
import warnings
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects import mssql, mysql, oracle, postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, sessionmaker

import locksafe
import locksafe.sqlite
from harness.cells import Cell
from harness.reliability import FULL, SIZE
from locksafe import (
    LockErrorKind,
    LockUnavailable,
    RowLockPlan,
    UnsupportedLockOption,
    classify,
    classify_raised,
    is_deadlock_error,
    is_lock_not_available_error,
    is_retryable_lock_error,
    lock_timeout,
    named_lock,
    plan_row_locks,
    transactional,
    try_named_lock,
    with_row_locks,
)
from locksafe.classify import LOCK_NOT_AVAILABLE_KINDS, RETRYABLE_KINDS

#: CI: derandomized (the same examples every run, so a red CI reproduces); full size: random,
#: and a failure prints the ``@reproduce_failure`` blob that replays it.
FUZZ = settings(
    max_examples=SIZE.examples,
    deadline=None,
    database=None,
    derandomize=not FULL,
    print_blob=FULL,
    suppress_health_check=list(HealthCheck),
)
#: The driver cells of the tests that run on a database (every one at full size).
FUZZ_CELLS = SIZE.fuzz_cells

T = TypeVar("T")

# -- what to throw --------------------------------------------------------------------------------

HUGE = 10**400  # an int no float holds


class EvilStr(str):
    """A str equal to everything."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


class Sneaky:
    """Pretends to be a number (``__float__``, ``__index__``) and a truth value that raises."""

    def __float__(self) -> float:
        return 1.0

    def __index__(self) -> int:
        return 1

    def __bool__(self) -> bool:
        raise RuntimeError("no truth value")

    def __repr__(self) -> str:
        return "<Sneaky>"


class IntSub(int):
    pass


class FloatSub(float):
    pass


HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",  # a lone surrogate: not encodable as UTF-8
    "a" * 100_000,
    "raise\x00",
    "RAISE",
    " raise",
    "Wal",
    "İ",
    "ﬁ",
    "\u202e\u200b",
    "'; DROP TABLE rel_guard; --",
    '"); SELECT pg_sleep(10); --',
    "%s%s%n%(x)s{0}",
    "../../etc/passwd",
    "名前" * 40,
    "x" * 65,
    EvilStr("nonsense"),
]
SPECIAL_NUMBERS = [
    HUGE,
    -HUGE,
    2**63,
    2**31,
    -1,
    0,
    1,
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    5e-324,
    1e-9,
    1e300,
    1.7976931348623157e308,
    IntSub(3),
    FloatSub(0.5),
    decimal.Decimal("1.5"),
    decimal.Decimal("NaN"),
    fractions.Fraction(1, 3),
    complex(1, 1),
]

strings = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=30))
numbers_ = st.one_of(
    st.sampled_from(SPECIAL_NUMBERS),
    st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True),
)
junk = st.one_of(
    st.none(),
    st.booleans(),
    numbers_,
    strings,
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.just(()),
    st.just({"a": 1}),
    st.just(object()),
    st.just(Sneaky()),
    st.just(LockErrorKind.DEADLOCK),
    st.just(print),
)


def with_choices(*choices: Any) -> st.SearchStrategy[Any]:
    """The documented values, often, and junk."""
    return st.one_of(st.sampled_from(choices), junk)


# -- the oracle -----------------------------------------------------------------------------------

VALID, INVALID, EITHER = "valid", "invalid", "either"


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_float(value: object) -> float | None:
    """``float(value)``, ``None`` when it does not fit."""
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        return None


def seconds_verdict(value: object, *, zero: bool = True, infinite: bool = False) -> str:
    """A number of seconds: real, not NaN, ≥ 0 (> 0 unless ``zero``), finite unless
    ``infinite``. An int too big for a float: either."""
    if not is_real(value):
        return INVALID
    seconds = as_float(value)
    if seconds is None:
        return EITHER if value > 0 else INVALID  # type: ignore[operator]
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not zero):
        return INVALID
    if math.isinf(seconds) and not infinite:
        return INVALID
    return VALID


def bool_verdict(value: object) -> str:
    return VALID if isinstance(value, bool) else INVALID


def choice_verdict(value: object, choices: tuple[str, ...], *, none: bool = False) -> str:
    if value is None:
        return VALID if none else INVALID
    if isinstance(value, EvilStr):
        return EITHER
    return VALID if isinstance(value, str) and value in choices else INVALID


class Refused(Exception):
    """The call was refused as the oracle allowed (what the caller checks no further)."""


def judge(
    call: Callable[[], Any],
    verdicts: dict[str, str],
    *,
    aliases: dict[str, tuple[str, ...]] | None = None,
    unsupported: bool = False,
) -> Any:
    """Run ``call`` and hold it to ``verdicts``; returns its result, or raises ``Refused``
    when it refused as allowed. ``aliases``: other words that name an option in a message
    (for positional arguments). ``unsupported``: an UnsupportedLockOption naming a requested
    option is a clear refusal too."""
    invalid = {name for name, verdict in verdicts.items() if verdict == INVALID}
    either = {name for name, verdict in verdicts.items() if verdict == EITHER}
    refused: BaseException | None = None
    try:
        result = call()
    except (TypeError, ValueError, UnsupportedLockOption) as exc:
        refused = exc
    if isinstance(refused, UnsupportedLockOption):
        assert unsupported, f"UnsupportedLockOption where none may be: {refused}"
        raise Refused from refused
    if refused is not None:
        message = str(refused)
        what = type(refused).__name__
        assert invalid or either, f"valid options refused: {what}: {message[:500]}"
        candidates = invalid | either
        words = {w for name in candidates for w in (name, *(aliases or {}).get(name, ()))}
        assert any(word in message for word in words), (
            f"{what} does not name {sorted(candidates)}: {message[:500]}"
        )
        raise Refused from refused
    assert not invalid, f"accepted invalid {sorted(invalid)}"
    return result


# -- the guard table: nothing the fuzzed calls do may change it -----------------------------------

guard_metadata = MetaData()
guard = Table(
    "rel_guard",
    guard_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("v", String(40), nullable=False),
)
other_table = Table("rel_other", MetaData(), Column("id", Integer, primary_key=True))


def checksum(engine: Any) -> tuple[int, int, tuple[tuple[int, str], ...]]:
    with engine.connect() as conn:
        rows = tuple(
            (int(r.id), str(r.v)) for r in conn.execute(select(guard).order_by(guard.c.id))
        )
        total = int(conn.execute(select(func.coalesce(func.sum(guard.c.id), 0))).scalar_one())
    return len(rows), total, rows


@pytest.fixture
def guarded(cell: Cell) -> Iterator[Any]:
    """The cell's admin engine, with a guard table whose checksum must not change."""
    cell.create_all(guard_metadata)
    admin = cell.sync_engine()
    with admin.begin() as conn:
        conn.execute(insert(guard), [{"id": i, "v": f"row {i} '\" ;"} for i in range(1, 41)])
    before = checksum(admin)
    yield admin
    assert checksum(admin) == before, "a fuzzed call changed the database"


@pytest.fixture
def sqlite_guarded(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    url = f"sqlite:///{tmp_path / 'fuzz.sqlite'}"
    admin = create_engine(url)
    guard_metadata.create_all(admin)
    with admin.begin() as conn:
        conn.execute(insert(guard), [{"id": i, "v": f"row {i}"} for i in range(1, 41)])
    before = checksum(admin)
    yield url, admin
    assert checksum(admin) == before, "a fuzzed call changed the database"
    admin.dispose()


# -- one body for sync and async cells ----------------------------------------------------------


def drive(cell: Cell, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``body()``: in the cell's event loop on an async cell; on a sync cell, without one
    (every ``await`` there is on a value that is ready: :func:`ready`, :func:`enter`), so the
    sync cells run plain sync code."""
    if cell.is_async:
        return cell.run_async(body)
    coroutine = body()
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("a sync cell's body waited for something")


async def ready(value: Any) -> Any:
    """``await value`` when the async API gave an awaitable, else ``value`` (the sync API's)."""
    return await value if inspect.isawaitable(value) else value


async def enter(cell: Cell, stack: contextlib.AsyncExitStack, manager: Any) -> Any:
    """``async with manager`` on an async cell, ``with manager`` on a sync one, until
    ``stack`` closes."""
    if cell.is_async:
        return await stack.enter_async_context(manager)
    return stack.enter_context(manager)


def new_session(cell: Cell, engine: Any) -> Any:
    return AsyncSession(engine) if cell.is_async else Session(engine)


# -- classify and the predicates, with anything -------------------------------------------------


def _driver_errors() -> list[Callable[..., BaseException]]:
    """Constructors of real driver exception classes (whatever arguments they get)."""
    import MySQLdb
    import psycopg
    import psycopg2
    import psycopg2.errors
    import pymysql

    makers: list[Callable[..., BaseException]] = [
        sqlite3.OperationalError,
        sqlite3.DatabaseError,
        pymysql.err.OperationalError,
        pymysql.err.InternalError,
        MySQLdb.OperationalError,
        psycopg2.OperationalError,
        psycopg2.errors.DeadlockDetected,
        psycopg.OperationalError,
        psycopg.errors.DeadlockDetected,
        psycopg.errors.LockNotAvailable,
    ]
    with contextlib.suppress(ImportError):
        import asyncpg

        makers += [asyncpg.exceptions.DeadlockDetectedError, asyncpg.PostgresError]
    with contextlib.suppress(ImportError):
        import pg8000.exceptions

        makers.append(pg8000.exceptions.DatabaseError)
    with contextlib.suppress(ImportError):
        import mysql.connector.errors

        makers.append(mysql.connector.errors.DatabaseError)
    with contextlib.suppress(ImportError):
        import mariadb

        makers.append(mariadb.OperationalError)
    return makers


class RaisingAttributes(Exception):
    """Every attribute lookup but the few Python itself needs raises."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("__class__", "__dict__", "__traceback__", "args"):  # what repr() needs
            return object.__getattribute__(self, name)
        raise RuntimeError(f"no {name}")


class RaisingClass:
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise RuntimeError("no class")


class RaisingStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


class WeirdModule(Exception):
    pass


WeirdModule.__module__ = 123  # type: ignore[assignment]


HOSTILE: dict[str, Callable[[], object]] = {
    "__class__ raises": RaisingClass,
    "every attribute raises": lambda: RaisingAttributes("x"),
    "__str__ raises": RaisingStr,
    "__module__ not a str": WeirdModule,
    "a class, not an instance": lambda: sqlite3.OperationalError,
    "KeyboardInterrupt": KeyboardInterrupt,
    "SystemExit": lambda: SystemExit(1),
    "LockUnavailable of junk": lambda: LockUnavailable(
        "junk",  # type: ignore[arg-type]
        attempts=-1,
        elapsed=math.nan,
        retry_after=math.inf,
    ),
}


class Hostile:
    """A hostile object, made only when the test runs (hypothesis must be able to print the
    example)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Hostile({self.name!r})"


@st.composite
def anything(draw: st.DrawFn) -> object:
    """An arbitrary object: plain values, hostile objects, real driver exceptions with junk
    arguments and codes, SQLAlchemy wrappers around them, chains and cycles of them."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(junk)
    if kind == 1:
        return Hostile(draw(st.sampled_from(sorted(HOSTILE))))
    maker = draw(st.sampled_from(_driver_errors()))
    args = draw(
        st.lists(st.one_of(junk, st.sampled_from([1213, 1205, "40P01", "55P03"])), max_size=3)
    )
    try:
        error: BaseException = maker(*args)
    except Exception:
        error = maker()
    for attribute in draw(
        st.lists(
            st.sampled_from(["pgcode", "sqlstate", "errno", "sqlite_errorcode", "args", "orig"]),
            max_size=2,
        )
    ):
        with contextlib.suppress(Exception):
            setattr(error, attribute, draw(st.one_of(junk, st.just(error))))
    if kind >= 3:
        error = OperationalError(draw(strings), draw(junk), error)  # type: ignore[arg-type]
    if kind >= 4:
        outer = RuntimeError("wrapper")
        outer.__cause__ = error
        outer.__context__ = outer  # a cycle
        error.__context__ = outer
        error = outer
    if kind == 5:
        for _ in range(draw(st.integers(0, 2000))):
            link = ValueError("link")
            link.__cause__ = error
            error = link
    return error


@FUZZ
@given(anything())
@example(Hostile("__class__ raises"))
@example(Hostile("every attribute raises"))
@example(Hostile("__module__ not a str"))
def test_classify_and_the_predicates_never_raise(thing: object) -> None:
    if isinstance(thing, Hostile):
        thing = HOSTILE[thing.name]()
    kind = classify(thing)
    raised = classify_raised(thing)
    assert kind is None or isinstance(kind, LockErrorKind)
    assert raised is None or isinstance(raised, LockErrorKind)
    deadlock = is_deadlock_error(thing)
    not_available = is_lock_not_available_error(thing)
    retryable = is_retryable_lock_error(thing)
    assert type(deadlock) is bool
    assert deadlock is (kind is LockErrorKind.DEADLOCK)
    assert type(not_available) is bool
    assert not_available is (kind in LOCK_NOT_AVAILABLE_KINDS)
    assert type(retryable) is bool
    if retryable:
        assert raised in RETRYABLE_KINDS


# -- with_row_locks and plan_row_locks ------------------------------------------------------------

OPTION_NAMES = ("nowait", "skip_locked", "read", "key_share")


@st.composite
def lock_options(draw: st.DrawFn, of_choices: list[Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in OPTION_NAMES:
        if draw(st.booleans()):
            options[name] = draw(st.one_of(st.booleans(), st.booleans(), junk))
    if draw(st.booleans()):
        options["on_unsupported"] = draw(with_choices("raise", "warn", "degrade"))
    if draw(st.booleans()):
        options["of"] = draw(st.one_of(st.sampled_from(of_choices), junk))
    return options


def lock_verdicts(
    options: dict[str, Any], *, query_tables: tuple[Any, ...] | None
) -> dict[str, str]:
    """``query_tables``: the tables the statement selects from (``None``: no statement, as
    for plan_row_locks, where ``of`` is only checked for its type)."""
    verdicts = {name: bool_verdict(options[name]) for name in OPTION_NAMES if name in options}
    if options.get("nowait") is True and options.get("skip_locked") is True:
        verdicts["nowait"] = verdicts["skip_locked"] = INVALID
    if "on_unsupported" in options:
        verdicts["on_unsupported"] = choice_verdict(
            options["on_unsupported"], ("raise", "warn", "degrade")
        )
    if "of" in options:
        verdicts["of"] = of_verdict(options["of"], query_tables)
    return verdicts


def of_verdict(of: Any, query_tables: tuple[Any, ...] | None) -> str:
    if of is None:
        return VALID
    elements = list(of) if isinstance(of, (list, tuple, set, frozenset)) else [of]
    if not elements:
        return INVALID
    for element in elements:
        table = element if isinstance(element, Table) else getattr(element, "table", None)
        if not isinstance(table, Table):
            return INVALID
        if query_tables is not None and table not in query_tables:
            return INVALID
    return VALID


@pytest.mark.cells(*FUZZ_CELLS)
def test_with_row_locks_options_fuzzed(cell: Cell, guarded: Any) -> None:
    # connected once: the dialect knows the server version, so a bound call plans at once
    engine = cell.warm_up(cell.engine())
    of_choices = [guard, guard.c.id, [guard], (guard, guard.c.v), {guard}, [], other_table, [None]]

    def session_arg(choice: str, session: Any) -> Any:
        return {"session": session, "engine": engine, "none": None}.get(choice, choice)

    @FUZZ
    @given(
        lock_options(of_choices),
        st.sampled_from(["session", "engine", "none", "session", "junk"]),
        st.sampled_from(["select", "select", "junk"]),
    )
    @example({"nowait": "false"}, "session", "select")
    @example({"on_unsupported": "\x00" * 100_000}, "session", "select")
    @example({"of": "rel_guard"}, "session", "select")
    @example({"of": other_table}, "session", "select")
    @example({"nowait": True, "skip_locked": True}, "session", "select")
    @example({"key_share": True, "read": True}, "session", "select")
    @example({}, "junk", "select")
    @example({}, "session", "junk")
    def check(options: dict[str, Any], session_choice: str, query_choice: str) -> None:
        verdicts = lock_verdicts(options, query_tables=(guard,))
        query: Any = select(guard).where(guard.c.id < 5) if query_choice == "select" else 42
        verdicts["query"] = VALID if query_choice == "select" else INVALID
        verdicts["session"] = VALID if session_choice != "junk" else INVALID

        async def body() -> tuple[list[Any], UnsupportedLockOption | None] | None:
            async with contextlib.AsyncExitStack() as stack:
                session = await enter(cell, stack, new_session(cell, engine))
                bind = session_arg(session_choice, session)
                try:
                    statement = judge(
                        lambda: with_row_locks(query, bind, **options),
                        verdicts,
                        aliases={"query": ("with_row_locks()",), "session": ("dialect",)},
                        unsupported=True,
                    )
                except Refused:
                    return None
                # it works: the statement runs, on the real database, and reads the rows
                try:
                    return list((await ready(session.execute(statement))).all()), None
                except UnsupportedLockOption as exc:
                    return [], exc
                finally:
                    await ready(session.rollback())

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", locksafe.LockDegradedWarning)
            outcome = drive(cell, body)
        if outcome is None:
            return
        rows, late = outcome
        if late is not None:
            # without a bind at call time, the executing connection decides
            assert session_choice == "none", late
            assert set(late.options) <= {*OPTION_NAMES, "of", "FOR UPDATE"}, late
            return
        assert sorted(r.id for r in rows) == [1, 2, 3, 4]

    check()


DIALECTS: list[Any] = [
    postgresql.dialect(),
    sqlite_dialect.dialect(),
    mssql.dialect(),
    oracle.dialect(),
]
for version, is_mariadb in (((5, 7, 44), False), ((8, 0, 36), False), ((10, 11, 6), True)):
    _mysql = mysql.dialect()
    _mysql.server_version_info = version
    _mysql.is_mariadb = is_mariadb
    DIALECTS.append(_mysql)


@FUZZ
@given(
    lock_options([guard, guard.c.id, [guard], [], other_table, [None], "rel_guard"]),
    st.one_of(st.sampled_from(DIALECTS), st.sampled_from(DIALECTS), junk),
)
@example({"skip_locked": True}, DIALECTS[4])
@example({"nowait": 1}, DIALECTS[0])
def test_plan_row_locks_options_fuzzed(options: dict[str, Any], bind: Any) -> None:
    verdicts = lock_verdicts(options, query_tables=None)
    verdicts["bind"] = VALID if bind in DIALECTS else INVALID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", locksafe.LockDegradedWarning)
        try:
            plan = judge(
                lambda: plan_row_locks(bind, **options),
                verdicts,
                aliases={"bind": ("dialect",)},
                unsupported=True,
            )
        except Refused:
            return
    assert isinstance(plan, RowLockPlan)
    assert isinstance(plan.clause, str)


# -- transactional ------------------------------------------------------------------------------


def retry_on_verdict(value: Any) -> str:
    if value is None or callable(value):
        return VALID
    if isinstance(value, (str, bytes)):
        return INVALID
    if not isinstance(value, (list, tuple, set, frozenset, dict)):
        return INVALID
    values = {kind.value for kind in LockErrorKind}
    ok = all(
        isinstance(item, str) and not isinstance(item, EvilStr) and item in values for item in value
    )
    if ok:
        return VALID
    return EITHER if any(isinstance(item, EvilStr) for item in value) else INVALID


def test_transactional_options_fuzzed(sqlite_guarded: tuple[str, Any]) -> None:
    url, _ = sqlite_guarded
    engine = create_engine(url)
    makers = {
        "none": None,
        "sessionmaker": sessionmaker(engine),
        "returns junk": lambda: 1,
        "not callable": 1,
    }

    @FUZZ
    @given(
        st.fixed_dictionaries(
            {},
            optional={
                "attempts": st.one_of(st.integers(1, 5), junk),
                "timeout": st.one_of(st.just(math.inf), st.floats(0.5, 60), junk),
                "wait_initial": st.one_of(st.floats(0, 0.01), junk),
                "wait_max": st.one_of(st.floats(0, 2), junk),
                "retry_after": st.one_of(st.none(), st.floats(0, 10), junk),
                "retry_on": st.one_of(
                    st.sampled_from([None, is_retryable_lock_error, ["deadlock"], set()]),
                    st.lists(st.sampled_from([*LockErrorKind, "deadlock", "nope", 1]), max_size=3),
                    junk,
                ),
                "on_retry": st.one_of(st.sampled_from([None, print]), junk),
            },
        ),
        st.sampled_from(list(makers)),
    )
    @example({"timeout": HUGE}, "none")
    @example({"wait_max": HUGE}, "none")
    @example({"wait_initial": HUGE, "wait_max": HUGE}, "none")
    @example({"retry_after": HUGE}, "none")
    @example({"attempts": HUGE}, "none")
    @example({"timeout": math.nan}, "none")
    @example({"wait_initial": 2.0, "wait_max": 1.0}, "none")
    @example({"retry_on": "deadlock"}, "none")
    @example({}, "returns junk")
    def check(options: dict[str, Any], maker: str) -> None:
        verdicts: dict[str, str] = {}
        if "attempts" in options:
            attempts = options["attempts"]
            verdicts["attempts"] = (
                VALID
                if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 1
                else INVALID
            )
        if "timeout" in options:
            verdicts["timeout"] = seconds_verdict(options["timeout"], zero=False, infinite=True)
        for name in ("wait_initial", "wait_max"):
            if name in options:
                verdicts[name] = seconds_verdict(options[name])
        low, high = options.get("wait_initial", 0.05), options.get("wait_max", 2.0)
        if (
            verdicts.get("wait_initial", VALID) == VALID
            and verdicts.get("wait_max", VALID) == VALID
            and float(low) > float(high)
        ):
            verdicts["wait_initial"] = verdicts["wait_max"] = INVALID
        if "retry_after" in options and options["retry_after"] is not None:
            verdicts["retry_after"] = seconds_verdict(options["retry_after"])
        if "retry_on" in options:
            verdicts["retry_on"] = retry_on_verdict(options["retry_on"])
        if "on_retry" in options:
            on_retry = options["on_retry"]
            verdicts["on_retry"] = VALID if on_retry is None or callable(on_retry) else INVALID
        verdicts["sessionmaker"] = INVALID if maker == "not callable" else VALID

        def decorate() -> Callable[..., int]:
            @transactional(sessionmaker=makers[maker], **options)
            def count(*, session: Session = locksafe.NEW_SESSION) -> int:
                return int(session.execute(select(func.count()).select_from(guard)).scalar_one())

            return count

        try:
            count = judge(decorate, verdicts, aliases={})
        except Refused:
            return
        if maker == "returns junk":  # the decorator checks what sessionmaker= made, at call time
            with pytest.raises(TypeError, match="sessionmaker"):
                count()
            return
        if maker == "none":
            with Session(engine) as session:
                assert count(session=session) == 40
        else:
            assert count() == 40

    try:
        check()
    finally:
        engine.dispose()


# -- lock_timeout -------------------------------------------------------------------------------

SETTING_SQL = {
    "sqlite": "PRAGMA busy_timeout",
    "postgresql": "SELECT current_setting('lock_timeout')",
    "mariadb": "SELECT @@SESSION.innodb_lock_wait_timeout",
}


@pytest.mark.cells(*FUZZ_CELLS)
def test_lock_timeout_options_fuzzed(cell: Cell, guarded: Any) -> None:
    engine = cell.engine()

    @FUZZ
    @given(
        st.one_of(st.floats(0, 5), numbers_, junk),
        st.sampled_from(["connection", "session", "junk"]),
    )
    @example(HUGE, "connection")
    @example(1e300, "connection")
    @example(1.7976931348623157e308, "connection")  # finite; in milliseconds it is not
    @example(5e-324, "session")
    @example(math.nan, "connection")
    @example(fractions.Fraction(1, 3), "connection")
    @example(0.3, "engine")
    def check(seconds: Any, target: str) -> None:
        verdicts = {
            "seconds": seconds_verdict(seconds),
            "session_or_connection": VALID if target in ("connection", "session") else INVALID,
        }
        sql = text(SETTING_SQL[cell.backend])

        async def body() -> tuple[Any, Any, Any] | None:
            async with contextlib.AsyncExitStack() as stack:
                conn = await enter(cell, stack, engine.connect())
                session = await enter(cell, stack, new_session(cell, engine))
                bind: Any = {"connection": conn, "session": session, "engine": engine}.get(
                    target, target
                )
                try:
                    block = judge(
                        lambda: lock_timeout(bind, seconds),
                        verdicts,
                        aliases={"session_or_connection": ("lock_timeout()",)},
                    )
                except Refused:
                    return None
                runner: Any = conn if target == "connection" else session
                async with contextlib.AsyncExitStack() as transaction:
                    await enter(cell, transaction, runner.begin())
                    before = (await ready(runner.execute(sql))).scalar()
                    async with contextlib.AsyncExitStack() as bounded:
                        await enter(cell, bounded, block)
                        count = select(func.count()).select_from(guard)
                        (await ready(runner.execute(count))).scalar_one()
                        inside = (await ready(runner.execute(sql))).scalar()
                    after = (await ready(runner.execute(sql))).scalar()
                return before, inside, after

        outcome = drive(cell, body)
        if outcome is not None:
            before, inside, after = outcome
            assert after == before, "lock_timeout() did not set the setting back"
            if cell.backend == "sqlite":
                ms = float(seconds) * 1000
                assert int(inside) == (2**31 - 1 if ms > 2**31 - 1 else round(ms))

    check()


# -- named_lock / try_named_lock --------------------------------------------------------------


@pytest.mark.cells(*FUZZ_CELLS)
def test_named_lock_options_fuzzed(cell: Cell, guarded: Any) -> None:
    engine = cell.engine()

    @FUZZ
    @given(
        st.sampled_from([named_lock, try_named_lock]),
        st.one_of(strings, junk),
        st.fixed_dictionaries(
            {},
            optional={
                "timeout": st.one_of(st.none(), st.floats(0, 2), numbers_, junk),
                "shared": st.one_of(st.booleans(), junk),
                "scope": with_choices("transaction", "session"),
            },
        ),
        st.booleans(),
    )
    @example(named_lock, "\ud800", {}, False)
    @example(named_lock, "\x00", {"scope": "session"}, False)
    @example(named_lock, "a" * 100_000, {}, True)
    @example(try_named_lock, "'; DROP TABLE rel_guard; --", {"timeout": 1e300}, False)
    @example(named_lock, "x", {"timeout": HUGE}, False)
    @example(named_lock, "x", {"timeout": 1.7976931348623157e308}, False)  # inf in milliseconds
    @example(named_lock, "", {}, False)
    @example(named_lock, b"bytes", {}, False)
    @example(named_lock, "x", {"shared": True}, False)
    @example(named_lock, "x", {"scope": EvilStr("session")}, False)
    def check(fn: Any, name: Any, options: dict[str, Any], in_transaction: bool) -> None:
        verdicts = {"name": VALID if isinstance(name, str) and name else INVALID}
        if "timeout" in options and options["timeout"] is not None:
            verdicts["timeout"] = seconds_verdict(options["timeout"])
        if "shared" in options:
            verdicts["shared"] = bool_verdict(options["shared"])
        if "scope" in options:
            verdicts["scope"] = choice_verdict(options["scope"], ("transaction", "session"))

        async def body() -> None:
            async with contextlib.AsyncExitStack() as stack:
                conn = await enter(cell, stack, engine.connect())
                other = await enter(cell, stack, engine.connect())
                if in_transaction:
                    await ready(conn.begin())
                try:
                    lock = judge(lambda: fn(conn, name, **options), verdicts)
                except Refused:
                    return
                try:
                    async with contextlib.AsyncExitStack() as held:
                        entered = await enter(cell, held, lock)
                        # named_lock gives the lock, try_named_lock whether it was obtained
                        assert entered is (lock if fn is named_lock else True)
                        assert lock.acquired is True, "a free lock was not acquired"
                        # it excludes: another connection cannot have it now
                        async with contextlib.AsyncExitStack() as tried:
                            second = await enter(
                                cell, tried, try_named_lock(other, name, timeout=0)
                            )
                            assert second is False, "the lock did not exclude another connection"
                        await ready(other.rollback())
                except UnsupportedLockOption as exc:
                    unsupported: UnsupportedLockOption | None = exc
                else:
                    unsupported = None
                finally:
                    await ready(conn.rollback())
                if unsupported is not None:
                    assert options.get("shared") is True, unsupported  # no shared named locks
                    return
                # and it was given back
                async with contextlib.AsyncExitStack() as tried:
                    again = await enter(cell, tried, try_named_lock(other, name, timeout=0))
                    assert again is True, "the lock was not given back"
                await ready(other.rollback())

        drive(cell, body)

    check()


# -- locksafe.sqlite.configure -------------------------------------------------------------------


def test_sqlite_configure_options_fuzzed(sqlite_guarded: tuple[str, Any]) -> None:
    url, _ = sqlite_guarded
    postgres_engine = create_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none")

    @FUZZ
    @given(
        st.fixed_dictionaries(
            {},
            optional={
                "busy_timeout": st.one_of(st.floats(0, 30), numbers_, junk),
                "journal_mode": with_choices(None, "wal", "WAL", "delete", "truncate", "persist"),
                "begin": with_choices("first_write", "deferred", "immediate", "exclusive"),
                "foreign_keys": st.one_of(st.none(), st.booleans(), junk),
            },
        ),
        st.sampled_from(["sqlite", "sqlite", "postgresql", "junk"]),
    )
    @example({"busy_timeout": HUGE}, "sqlite")
    @example({"busy_timeout": 1e300}, "sqlite")
    @example({"busy_timeout": 2_147_483.647}, "sqlite")
    @example({"busy_timeout": 5e-324}, "sqlite")
    @example({"journal_mode": "İ"}, "sqlite")
    @example({"begin": EvilStr("x")}, "sqlite")
    @example({}, "postgresql")
    def check(options: dict[str, Any], target: str) -> None:
        verdicts: dict[str, str] = {}
        if "busy_timeout" in options:
            value = options["busy_timeout"]
            verdict = seconds_verdict(value)
            if verdict == VALID and not isinstance(value, (int, float)):
                verdict = EITHER  # a Fraction, a Decimal: documented are int and float
            if verdict == VALID and float(value) * 1000 > 2**31 - 1:
                verdict = INVALID  # more than SQLite takes
            verdicts["busy_timeout"] = verdict
        if "journal_mode" in options:
            mode = options["journal_mode"]
            modes = ("wal", "delete", "truncate", "persist", "memory", "off")
            verdicts["journal_mode"] = (
                VALID
                if mode is None or (isinstance(mode, str) and mode.lower() in modes)
                else INVALID
            )
            if isinstance(mode, EvilStr):
                verdicts["journal_mode"] = EITHER
        if "begin" in options:
            verdicts["begin"] = choice_verdict(
                options["begin"], ("first_write", "deferred", "immediate", "exclusive")
            )
        if "foreign_keys" in options:
            keys = options["foreign_keys"]
            verdicts["foreign_keys"] = VALID if keys is None or isinstance(keys, bool) else INVALID
        verdicts["engine"] = VALID if target == "sqlite" else INVALID
        engine: Any = {
            "sqlite": create_engine(url),
            "postgresql": postgres_engine,
        }.get(target, target)
        try:
            try:
                configured = judge(
                    lambda: locksafe.sqlite.configure(engine, **options),
                    verdicts,
                    aliases={"engine": ("configure()",)},
                )
            except Refused:
                return
            assert configured is engine
            with configured.connect() as conn:
                busy = conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
                seconds = float(options.get("busy_timeout", 30.0))
                want = round(seconds * 1000) if seconds * 1000 >= 1 or seconds == 0 else 1
                assert busy == want
                assert conn.execute(select(func.count()).select_from(guard)).scalar_one() == 40
                conn.rollback()
            with pytest.raises(ValueError, match="already configured"):
                locksafe.sqlite.configure(configured)
        finally:
            if target == "sqlite":
                engine.dispose()

    check()


# -- install_lock_error_handlers -----------------------------------------------------------------


def test_install_lock_error_handlers_options_fuzzed() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    from locksafe.starlette import install_lock_error_handlers

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient

    async def busy(request: Request) -> None:
        raise OperationalError(
            "UPDATE t SET v = 1", {}, sqlite3.OperationalError("database is locked")
        )

    async def gave_up(request: Request) -> None:
        raise LockUnavailable(LockErrorKind.DEADLOCK, attempts=3, elapsed=0.1, retry_after=7)

    @FUZZ
    @given(st.one_of(st.floats(0, 100), numbers_, junk), st.sampled_from(["app", "app", "junk"]))
    @example(HUGE, "app")
    @example(1e300, "app")
    @example(math.inf, "app")
    @example(2.0, "junk")
    @example(2.0, "none")
    def check(retry_after: Any, target: str) -> None:
        app: Any = (
            Starlette(routes=[Route("/busy", busy), Route("/gave-up", gave_up)])
            if target == "app"
            else None
            if target == "none"
            else retry_after
        )
        verdicts = {
            "retry_after": seconds_verdict(retry_after),
            "app": VALID if target == "app" else INVALID,
        }
        try:
            judge(
                lambda: install_lock_error_handlers(app, retry_after=retry_after),
                verdicts,
                aliases={"app": ("Starlette",)},
            )
        except Refused:
            return
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.get("/busy")
            assert response.status_code == 503
            assert response.headers["Retry-After"] == str(max(1, math.ceil(float(retry_after))))
            response = client.get("/gave-up")
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "7"

    check()
