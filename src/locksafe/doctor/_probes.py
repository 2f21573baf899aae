"""The live probes of ``locksafe doctor``: each one uses two or more real connections, proves
what it claims by what a further connection reads back or by measured time, and ends PASS,
FAIL or UNSUPPORTED with its timing and a one-line explanation.

Every probe works on its own rows of the doctor's scratch table (one table per run, created and
dropped by :mod:`locksafe.doctor`); every wait is bounded (a lock timeout, a busy timeout, a
step timeout), and the connections a probe opened are rolled back and closed when it ends,
whatever happened.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Column, Integer, MetaData, Table, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from locksafe import (
    NEW_SESSION,
    LockCapabilities,
    LockErrorKind,
    LockUnavailable,
    RetryDetails,
    SelfDeadlock,
    UnsupportedLockOption,
    classify,
    is_retryable_lock_error,
    lock_timeout,
    named_lock,
    transactional,
    try_named_lock,
    with_row_locks,
)
from locksafe.doctor._target import Target, describe_error
from locksafe.doctor._workers import Handle, Worker, result

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.sql import Select

__all__ = ["PROBES", "Probe", "ProbeContext", "Verdict", "scratch_table"]

Status = Literal["PASS", "FAIL", "UNSUPPORTED"]

#: Seconds a step that should be quick may take on a loaded machine before the probe fails.
STEP = 15.0
#: Seconds the "fails fast" probes allow (a wait would take the 5 s bound instead).
FAST = 1.0
#: The bound on a wait that must not happen (it ends an accidental wait, and shows it).
WAIT_BOUND = 5.0
#: Seconds given to a request that should now be waiting, before the next step.
SETTLE = 0.3
#: The lock timeout the lock-timeout probe asks for, and the accepted window around it.
LOCK_TIMEOUT = 1.0
LOCK_TIMEOUT_EARLY = 0.75
LOCK_TIMEOUT_LATE = 2.0

# The rows of the scratch table, one set per probe.
ROW_COUNTER = 1
ROW_NOWAIT = 2
ROWS_SKIP = (3, 4)
ROW_TIMEOUT = 5
ROWS_DEADLOCK = (6, 7)
ROWS_RETRY = (8, 9)
ROWS_SESSIONS = (10, 11)
ROW_NAMED = 12
ROWS = tuple(range(1, 13))


def scratch_table(name: str, *, mysql_engine: str | None = None) -> Table:
    """The doctor's scratch table: ``id`` and ``value`` (a counter), nothing else."""
    kwargs: dict[str, Any] = {}
    if mysql_engine is not None:
        kwargs["mysql_engine"] = mysql_engine
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("value", Integer, nullable=False),
        **kwargs,
    )


@dataclass(frozen=True)
class Verdict:
    status: Status
    detail: str


def passed(detail: str) -> Verdict:
    return Verdict("PASS", detail)


def failed(detail: str) -> Verdict:
    return Verdict("FAIL", detail)


def unsupported(detail: str) -> Verdict:
    return Verdict("UNSUPPORTED", detail)


@dataclass
class ProbeContext:
    """What a probe works with."""

    target: Target
    table: Table
    capabilities: LockCapabilities
    #: Seconds a probe's connections may hold a transaction (then they give it up).
    hold_timeout: float
    #: The name of this run's named lock.
    lock_name: str
    #: Seconds a deadlock may take to be detected (PostgreSQL: its deadlock_timeout), plus
    #: margin: the bound on the waits of the deadlock probes.
    deadlock_wait: float = 10.0
    #: MySQL / MariaDB: the scratch table's storage engine, as the server made it.
    scratch_engine: str | None = None
    _workers: list[Worker] = field(default_factory=list)

    @property
    def database_lock(self) -> bool:
        """SQLite: every row lock is the database write lock."""
        return self.capabilities.mechanism == "database"

    def worker(self, label: str) -> Worker:
        worker = Worker(self.target, label, hold_timeout=self.hold_timeout)
        self._workers.append(worker)
        worker.start()
        return worker

    def stop_workers(self, *, wait: bool = True) -> None:
        """Roll back and close the probe's connections (``wait=False``: only ask them to;
        :func:`locksafe.doctor._workers.stop_all` waits, and cancels what still waits on the
        server)."""
        workers, self._workers = self._workers, []
        for worker in workers:
            if wait:
                worker.stop()
            else:
                worker.ask_to_stop()

    # statements

    def locked(self, bind: Any, row: int, **options: Any) -> Select[Any]:
        t = self.table
        return with_row_locks(select(t.c.value).where(t.c.id == row), bind, **options)

    def bump(self, *rows: int) -> Any:
        t = self.table
        return update(t).where(t.c.id.in_(rows)).values(value=t.c.value + 1)

    def values(self, checker: Worker) -> dict[int, int]:
        """Every row's value, read by ``checker`` (a connection of its own) in a transaction
        of its own."""
        t = self.table

        def read(conn: Connection) -> dict[int, int]:
            try:
                return {row.id: row.value for row in conn.execute(select(t.c.id, t.c.value))}
            finally:
                conn.rollback()

        return checker.run(read, timeout=STEP)


@dataclass(frozen=True)
class Probe:
    name: str
    title: str
    run: Callable[[ProbeContext], Verdict]


# -- helpers ------------------------------------------------------------------------------------


def _kinds(ctx: ProbeContext, row_kind: LockErrorKind) -> tuple[LockErrorKind, ...]:
    """The kinds a lock failure may be: ``row_kind`` on a server with row locks; SQLite's busy
    (or, on a shared-cache database, locked) database."""
    if ctx.database_lock:
        return (LockErrorKind.DATABASE_BUSY, LockErrorKind.TABLE_LOCKED)
    return (row_kind,)


def _kind_names(kinds: tuple[LockErrorKind, ...]) -> str:
    return " or ".join(kind.value for kind in kinds)


@dataclass
class Attempt:
    """How one bounded lock request ended."""

    seconds: float
    rows: list[Any] | None = None
    error: BaseException | None = None

    @property
    def kind(self) -> LockErrorKind | None:
        return classify(self.error) if self.error is not None else None

    def error_text(self) -> str:
        return describe_error(self.error) if self.error is not None else ""


def _attempt(statement: Callable[[], Any]) -> Attempt:
    began = time.monotonic()
    try:
        rows = list(statement())
    except DBAPIError as exc:
        return Attempt(time.monotonic() - began, error=exc)
    return Attempt(time.monotonic() - began, rows=rows)


def _bounded_lock(
    ctx: ProbeContext, row: int, seconds: float, **options: Any
) -> Callable[[Connection], Attempt]:
    """A step: lock ``row`` waiting ``seconds`` at most; the transaction goes on (it holds the
    lock when it got it)."""

    def step(conn: Connection) -> Attempt:
        with lock_timeout(conn, seconds):
            return _attempt(lambda: conn.execute(ctx.locked(conn, row, **options)).all())

    return step


def _lock(ctx: ProbeContext, row: int) -> Callable[[Connection], Any]:
    def step(conn: Connection) -> Any:
        return conn.execute(ctx.locked(conn, row)).all()

    return step


def _refused(ctx: ProbeContext, worker: Worker, **options: Any) -> str | None:
    """The reason locksafe refuses these row-lock options on this server, or ``None`` when it
    accepts them (asked of locksafe itself, with a connection: not assumed from a table)."""

    def plan(conn: Connection) -> str | None:
        try:
            ctx.locked(conn, ROW_COUNTER, **options)
        except UnsupportedLockOption as exc:
            return str(exc)
        return None

    return worker.run(plan, timeout=STEP)


# -- 1. row lock excludes -----------------------------------------------------------------------

COUNTER_WORKERS = 2
COUNTER_INCREMENTS = 10
#: Seconds each increment sleeps between its read and its write, holding the lock: without
#: exclusion, the other connection reads the same value in that window (a lost update).
RACE_WINDOW = 0.005
INCREMENT_ATTEMPTS = 10


def probe_row_lock(ctx: ProbeContext) -> Verdict:
    start = threading.Barrier(COUNTER_WORKERS)
    retried: list[LockErrorKind | None] = []

    def increments(conn: Connection) -> None:
        start.wait(STEP)
        for _ in range(COUNTER_INCREMENTS):
            for attempt in range(INCREMENT_ATTEMPTS):
                try:
                    value = conn.execute(ctx.locked(conn, ROW_COUNTER)).scalar_one()
                    time.sleep(RACE_WINDOW)
                    conn.execute(
                        update(ctx.table)
                        .where(ctx.table.c.id == ROW_COUNTER)
                        .values(value=value + 1)
                    )
                    conn.commit()
                    break
                except DBAPIError as exc:
                    conn.rollback()
                    if not is_retryable_lock_error(exc) or attempt == INCREMENT_ATTEMPTS - 1:
                        raise
                    retried.append(classify(exc))

    workers = [ctx.worker(f"counter-{n}") for n in range(COUNTER_WORKERS)]
    checker = ctx.worker("checker")
    futures = [worker.submit(increments) for worker in workers]
    for future in futures:
        result(future, ctx.hold_timeout)
    count = ctx.values(checker)[ROW_COUNTER]
    expected = COUNTER_WORKERS * COUNTER_INCREMENTS
    what = (
        f"{COUNTER_WORKERS} connections x {COUNTER_INCREMENTS} locked read-modify-write increments"
    )
    retries = (
        f" ({len(retried)} retried after {_kind_names(tuple(k for k in set(retried) if k))})"
        if retried
        else ""
    )
    if count != expected:
        engine = (
            f" (the table's storage engine is {ctx.scratch_engine})"
            if ctx.scratch_engine is not None and ctx.scratch_engine.lower() != "innodb"
            else ""
        )
        return failed(
            f"lost updates: {what} left the counter at {count}, not {expected} (read from a "
            f"third connection): two connections read the same value under the lock, so it "
            f"did not exclude{engine}"
        )
    return passed(
        f"{what}: the counter reads {count} from a third connection, no update lost{retries}"
    )


# -- 2. NOWAIT fails fast -----------------------------------------------------------------------


def probe_nowait(ctx: ProbeContext) -> Verdict:
    holder = ctx.worker("holder")
    waiter = ctx.worker("nowait")
    reason = _refused(ctx, waiter, nowait=True)
    if reason is not None:
        return unsupported(f"locksafe refuses NOWAIT here (UnsupportedLockOption): {reason}")
    holder.run(_lock(ctx, ROW_NOWAIT), timeout=STEP)
    attempt = waiter.run(
        _bounded_lock(ctx, ROW_NOWAIT, WAIT_BOUND, nowait=True), timeout=WAIT_BOUND + STEP
    )
    expected = _kinds(ctx, LockErrorKind.LOCK_NOT_AVAILABLE)
    if attempt.error is None:
        return failed(
            f"NOWAIT returned the row in {attempt.seconds:.2f} s while another connection held "
            "its lock: the lock did not exclude"
        )
    if attempt.kind not in expected:
        return failed(
            f"NOWAIT failed in {attempt.seconds:.2f} s, but classify() calls its error "
            f"{attempt.kind.value if attempt.kind else 'no lock error'}, not "
            f"{_kind_names(expected)} ({attempt.error_text()})"
        )
    if attempt.seconds > FAST:
        return failed(
            f"NOWAIT waited {attempt.seconds:.2f} s before failing ({attempt.kind.value}): "
            f"not at once"
        )
    return passed(
        f"with the row locked by another connection, NOWAIT failed in {attempt.seconds:.3f} s, "
        f"classified {attempt.kind.value} ({attempt.error_text()})"
    )


# -- 3. SKIP LOCKED skips -----------------------------------------------------------------------


def probe_skip_locked(ctx: ProbeContext) -> Verdict:
    holder = ctx.worker("holder")
    skipper = ctx.worker("skipper")
    reason = _refused(ctx, skipper, skip_locked=True)
    if reason is not None:
        return unsupported(f"locksafe refuses SKIP LOCKED here (UnsupportedLockOption): {reason}")
    t = ctx.table
    first, second = ROWS_SKIP

    def skip(conn: Connection) -> Attempt:
        statement = with_row_locks(
            select(t.c.id).where(t.c.id.in_(ROWS_SKIP)).order_by(t.c.id), conn, skip_locked=True
        )
        with lock_timeout(conn, WAIT_BOUND):
            attempt = _attempt(lambda: conn.execute(statement).scalars().all())
        return attempt

    holder.run(_lock(ctx, first), timeout=STEP)
    attempt = skipper.run(skip, timeout=WAIT_BOUND + STEP)
    if attempt.error is not None:
        return failed(
            f"SKIP LOCKED failed after {attempt.seconds:.2f} s instead of skipping "
            f"({attempt.kind.value if attempt.kind else 'not a lock error'}: "
            f"{attempt.error_text()})"
        )
    if attempt.seconds > FAST:
        return failed(f"SKIP LOCKED waited {attempt.seconds:.2f} s instead of skipping")
    if ctx.database_lock:
        if attempt.rows:
            return failed(
                f"SKIP LOCKED returned rows {attempt.rows} while another connection held "
                "the database write lock"
            )
        skipper.rollback()
        holder.rollback()
        after = skipper.run(skip, timeout=WAIT_BOUND + STEP)
        if after.error is not None or after.rows != list(ROWS_SKIP):
            return failed(
                "SKIP LOCKED returned no rows while the write lock was held, but "
                f"{after.rows if after.error is None else after.error_text()} once it was "
                f"free, not rows {list(ROWS_SKIP)}"
            )
        return passed(
            f"while another connection held the write lock, SKIP LOCKED returned no rows "
            f"in {attempt.seconds:.3f} s (SQLite skips the whole database), and both rows "
            "once it was released"
        )
    if attempt.rows != [second]:
        return failed(
            f"with row {first} locked by another connection, SKIP LOCKED over rows "
            f"{first} and {second} returned {attempt.rows}, not [{second}]"
        )
    # The row it returned is locked by it: the holder cannot have it now.
    check = holder.run(
        _bounded_lock(ctx, second, LOCK_TIMEOUT, nowait=ctx.capabilities.nowait),
        timeout=WAIT_BOUND + STEP,
    )
    if check.error is None:
        return failed(
            f"SKIP LOCKED returned row {second} without locking it: another connection "
            "then locked it too"
        )
    return passed(
        f"with row {first} locked by another connection, SKIP LOCKED returned only row "
        f"{second} in {attempt.seconds:.3f} s, and locked it (another connection's request "
        f"for it then failed: {check.kind.value if check.kind else check.error_text()})"
    )


# -- 4. the lock timeout is honoured ------------------------------------------------------------


def probe_lock_timeout(ctx: ProbeContext) -> Verdict:
    holder = ctx.worker("holder")
    waiter = ctx.worker("waiter")
    holder.run(_lock(ctx, ROW_TIMEOUT), timeout=STEP)
    attempt = waiter.run(
        _bounded_lock(ctx, ROW_TIMEOUT, LOCK_TIMEOUT), timeout=LOCK_TIMEOUT + WAIT_BOUND + STEP
    )
    expected = _kinds(ctx, LockErrorKind.LOCK_TIMEOUT)
    asked = f"locksafe.lock_timeout({LOCK_TIMEOUT:g})"
    if attempt.error is None:
        return failed(
            f"got the row in {attempt.seconds:.2f} s under {asked} while another connection "
            "held its lock: the lock did not exclude"
        )
    if attempt.kind not in expected:
        return failed(
            f"the wait ended after {attempt.seconds:.2f} s with an error classify() calls "
            f"{attempt.kind.value if attempt.kind else 'no lock error'}, not "
            f"{_kind_names(expected)} ({attempt.error_text()})"
        )
    if attempt.seconds < LOCK_TIMEOUT_EARLY:
        return failed(
            f"{asked} gave up after {attempt.seconds:.2f} s, before the {LOCK_TIMEOUT:g} s "
            "asked for"
        )
    if attempt.seconds > LOCK_TIMEOUT + LOCK_TIMEOUT_LATE:
        return failed(
            f"{asked} waited {attempt.seconds:.2f} s, not about {LOCK_TIMEOUT:g} s: the bound "
            "was not honoured"
        )
    return passed(
        f"a wait for a row another connection held, under {asked}, ended after "
        f"{attempt.seconds:.2f} s, classified {attempt.kind.value} ({attempt.error_text()})"
    )


# -- 5. a deadlock is detected and classified ---------------------------------------------------


def probe_deadlock(ctx: ProbeContext) -> Verdict:
    if ctx.database_lock:
        return _no_deadlock_on_sqlite(ctx)
    first, second = ROWS_DEADLOCK
    a = ctx.worker("a")
    b = ctx.worker("b")
    bound = ctx.deadlock_wait
    a.run(_lock(ctx, first), timeout=STEP)
    got = b.run(_bounded_lock(ctx, second, WAIT_BOUND), timeout=WAIT_BOUND + STEP)
    if got.error is not None:
        return failed(f"could not lock row {second} at all: {got.error_text()}")
    a_waits = a.submit(_bounded_lock(ctx, second, bound))
    concurrent.futures.wait([a_waits], timeout=SETTLE)
    if a_waits.done():
        early = a_waits.result()
        if early.error is None:
            return failed(
                f"connection A got row {second} while B held its lock: the row locks did not "
                "exclude, so no deadlock could form"
            )
        return failed(f"connection A's wait for row {second} failed at once: {early.error_text()}")
    began = time.monotonic()
    b_waits = b.submit(_bounded_lock(ctx, first, bound))
    outcomes = {"A": result(a_waits, bound + STEP), "B": result(b_waits, bound + STEP)}
    took = time.monotonic() - began
    a.rollback()
    b.rollback()
    victims = {name: o for name, o in outcomes.items() if o.error is not None}
    if not victims:
        return failed("A and B each got the other's row: the row locks did not exclude")
    if len(victims) == 2:
        kinds = ", ".join(
            f"{n}: {o.kind.value if o.kind else o.error_text()}" for n, o in victims.items()
        )
        return failed(
            f"both waits failed ({kinds}) after {took:.2f} s: no deadlock was detected, the "
            "waits ran out instead (PostgreSQL: deadlock_timeout; MySQL/MariaDB: "
            "innodb_deadlock_detect)"
        )
    ((name, victim),) = victims.items()
    if victim.kind is not LockErrorKind.DEADLOCK:
        return failed(
            f"{name}'s wait ended after {took:.2f} s with an error classify() calls "
            f"{victim.kind.value if victim.kind else 'no lock error'}, not deadlock "
            f"({victim.error_text()}): the deadlock was not detected as one"
        )
    return passed(
        f"A and B locked rows {first} and {second}, then each asked for the other's: the server "
        f"broke the deadlock after {took:.2f} s, {name}'s error classified deadlock "
        f"({victim.error_text()}), the other got its row"
    )


def _no_deadlock_on_sqlite(ctx: ProbeContext) -> Verdict:
    """SQLite: opposite-order row locks cannot deadlock (the first lock is the database write
    lock); shown by running the opposite-order transactions, both of which must commit."""
    first, second = ROWS_DEADLOCK
    a = ctx.worker("a")
    b = ctx.worker("b")
    a.run(_lock(ctx, first), timeout=STEP)
    began = time.monotonic()
    b_waits = b.submit(_bounded_lock(ctx, second, WAIT_BOUND))
    concurrent.futures.wait([b_waits], timeout=SETTLE)
    if b_waits.done():
        early = b_waits.result()
        return failed(
            f"B's lock on row {second} ended at once while A held the write lock "
            f"({'it got the row' if early.error is None else early.error_text()}): it should "
            "have waited for A's transaction"
        )
    a.run(_lock(ctx, second), timeout=STEP)
    a.run(lambda conn: conn.commit(), timeout=STEP)
    got = result(b_waits, WAIT_BOUND + STEP)
    waited = time.monotonic() - began
    if got.error is not None:
        return failed(f"B's wait for the write lock failed: {got.error_text()}")
    then = b.run(_bounded_lock(ctx, first, WAIT_BOUND), timeout=WAIT_BOUND + STEP)
    if then.error is not None:
        return failed(f"B could not lock row {first} after A committed: {then.error_text()}")
    b.run(lambda conn: conn.commit(), timeout=STEP)
    return passed(
        f"no deadlock can form: SQLite's row lock is the database write lock, so B's first lock "
        f"(row {second}) waited {waited:.2f} s for A's transaction, which locked rows {first} "
        f"and {second} and committed; B then got both"
    )


# -- 6. a named lock excludes -------------------------------------------------------------------

NAMED_WORKERS = 2
NAMED_INCREMENTS = 5
NAMED_TIMEOUT = 0.5


def _enter(worker: Worker, make: Callable[[Any], Any]) -> tuple[Any, Any, float]:
    """Enter ``make(bind)`` (a named_lock / try_named_lock) on the worker's connection:
    ``async with`` on an asyncio driver. Returns (the lock, what entering gave, seconds); an
    error entering is raised."""

    def work(handle: Handle) -> tuple[Any, Any, float]:
        began = time.monotonic()
        if handle.is_async:
            lock = make(handle.async_connection)
            value = handle.wait(lock.__aenter__())
        else:
            lock, value = handle.call(lambda conn: _enter_sync(make, conn))
        return lock, value, time.monotonic() - began

    return result(worker.submit_work(work), WAIT_BOUND + STEP)


def _enter_sync(make: Callable[[Any], Any], conn: Connection) -> tuple[Any, Any]:
    lock = make(conn)
    return lock, lock.__enter__()


def _exit(worker: Worker, lock: Any) -> None:
    def work(handle: Handle) -> None:
        if handle.is_async:
            handle.wait(lock.__aexit__(None, None, None))
        else:
            handle.call(lambda conn: lock.__exit__(None, None, None))

    result(worker.submit_work(work), STEP)


def probe_named_lock(ctx: ProbeContext) -> Verdict:
    name = ctx.lock_name
    holder = ctx.worker("holder")
    other = ctx.worker("other")
    try:
        held, _, _ = _enter(holder, lambda bind: named_lock(bind, name, timeout=WAIT_BOUND))
    except UnsupportedLockOption as exc:
        return unsupported(f"locksafe has no named lock here (UnsupportedLockOption): {exc}")
    try:
        attempt, acquired, tried = _enter(other, lambda bind: try_named_lock(bind, name))
        _exit(other, attempt)
        other.rollback()
        if acquired:
            return failed("try_named_lock() got the lock while another connection held it")
        if tried > FAST:
            return failed(
                f"try_named_lock() took {tried:.2f} s to answer False while another connection "
                "held the lock: it waited instead of trying once"
            )
        began = time.monotonic()
        try:
            waited_lock, _, _ = _enter(
                other, lambda bind: named_lock(bind, name, timeout=NAMED_TIMEOUT)
            )
        except LockUnavailable as exc:
            waited = time.monotonic() - began
            named = getattr(exc, "lock_name", None)
            if named != name:
                return failed(f"LockUnavailable names {named!r}, not {name!r}")
        else:
            _exit(other, waited_lock)
            return failed(
                f"named_lock(timeout={NAMED_TIMEOUT:g}) got the lock while another connection "
                "held it"
            )
        finally:
            other.rollback()
        if not NAMED_TIMEOUT * 0.75 <= waited <= NAMED_TIMEOUT + LOCK_TIMEOUT_LATE:
            return failed(
                f"named_lock(timeout={NAMED_TIMEOUT:g}) gave up after {waited:.2f} s, not about "
                f"{NAMED_TIMEOUT:g} s"
            )
    finally:
        _exit(holder, held)
        holder.run(lambda conn: conn.commit(), timeout=STEP)
    freed, acquired, _ = _enter(other, lambda bind: try_named_lock(bind, name))
    _exit(other, freed)
    other.rollback()
    if not acquired:
        return failed("try_named_lock() did not get the lock after its holder let it go")
    count = _named_increments(ctx)
    expected = NAMED_WORKERS * NAMED_INCREMENTS
    if count != expected:
        return failed(
            f"lost updates: {NAMED_WORKERS} connections x {NAMED_INCREMENTS} read-modify-write "
            f"increments inside named_lock() left the counter at {count}, not {expected}"
        )
    return passed(
        f"while one connection held it, try_named_lock() on another got False in "
        f"{tried:.3f} s and named_lock(timeout={NAMED_TIMEOUT:g}) gave up after {waited:.2f} s "
        f"(LockUnavailable); {NAMED_WORKERS} connections x {NAMED_INCREMENTS} unlocked "
        f"read-modify-write increments inside it left the counter at {count}"
    )


def _named_increments(ctx: ProbeContext) -> int:
    name = ctx.lock_name
    t = ctx.table
    start = threading.Barrier(NAMED_WORKERS)
    read = select(t.c.value).where(t.c.id == ROW_NAMED)

    def one_sync(conn: Connection) -> None:
        with named_lock(conn, name, timeout=WAIT_BOUND):
            value = conn.execute(read).scalar_one()
            time.sleep(RACE_WINDOW)
            conn.execute(update(t).where(t.c.id == ROW_NAMED).values(value=value + 1))
            conn.commit()

    async def one_async(aconn: AsyncConnection) -> None:
        async with named_lock(aconn, name, timeout=WAIT_BOUND):
            value = (await aconn.execute(read)).scalar_one()
            await asyncio.sleep(RACE_WINDOW)
            await aconn.execute(update(t).where(t.c.id == ROW_NAMED).values(value=value + 1))
            await aconn.commit()

    def increments(handle: Handle) -> None:
        start.wait(STEP)
        for _ in range(NAMED_INCREMENTS):
            if handle.is_async:
                handle.wait(one_async(handle.async_connection))
            else:
                handle.call(one_sync)

    workers = [ctx.worker(f"named-{n}") for n in range(NAMED_WORKERS)]
    futures = [worker.submit_work(increments) for worker in workers]
    for future in futures:
        result(future, ctx.hold_timeout)
    return ctx.values(ctx.worker("checker"))[ROW_NAMED]


# -- 7. @transactional retries a provoked deadlock to success -----------------------------------


def probe_transactional(ctx: ProbeContext) -> Verdict:
    if ctx.database_lock:
        return _transactional_on_sqlite(ctx)
    first, second = ROWS_RETRY
    meet = threading.Barrier(2)
    retries: list[RetryDetails] = []
    bound = ctx.deadlock_wait

    def swap(handle: Handle, one: int, other: int) -> int:
        attempts = [0]
        options: dict[str, Any] = {
            "attempts": 5,
            "timeout": ctx.hold_timeout,
            "wait_initial": 0.05,
            "wait_max": 0.5,
            "on_retry": retries.append,
        }
        if handle.is_async:
            from sqlalchemy.ext.asyncio import async_sessionmaker

            @transactional(sessionmaker=async_sessionmaker(handle.engine), **options)  # type: ignore[arg-type]
            async def swap_async(*, session: AsyncSession = NEW_SESSION) -> int:
                attempts[0] += 1
                await session.execute(ctx.locked(session, one))
                if attempts[0] == 1:  # both hold their first row: now each asks for the other
                    await asyncio.to_thread(meet.wait, STEP)
                async with lock_timeout(session, bound):
                    await session.execute(ctx.locked(session, other))
                await session.execute(ctx.bump(one, other))
                return attempts[0]

            return handle.wait(swap_async())

        @transactional(sessionmaker=sessionmaker(handle.engine), **options)  # type: ignore[arg-type]
        def swap_sync(*, session: Session = NEW_SESSION) -> int:
            attempts[0] += 1
            session.execute(ctx.locked(session, one))
            if attempts[0] == 1:
                meet.wait(STEP)
            with lock_timeout(session, bound):
                session.execute(ctx.locked(session, other))
            session.execute(ctx.bump(one, other))
            return attempts[0]

        return swap_sync()

    x = ctx.worker("x")
    y = ctx.worker("y")
    began = time.monotonic()
    futures = [
        x.submit_work(lambda handle: swap(handle, first, second)),
        y.submit_work(lambda handle: swap(handle, second, first)),
    ]
    attempts = [result(future, ctx.hold_timeout) for future in futures]
    took = time.monotonic() - began
    values = ctx.values(ctx.worker("checker"))
    kinds = [detail.kind for detail in retries]
    both = (values[first], values[second])
    if both != (2, 2):
        return failed(
            f"both calls returned, but rows {first} and {second} read {both[0]} and {both[1]} "
            "from a third connection, not 2 and 2: a retried attempt's work was lost or doubled"
        )
    if LockErrorKind.DEADLOCK not in kinds:
        if not retries:
            return failed(
                "no deadlock: both @transactional calls committed at their first attempt, so "
                "their row locks did not conflict"
            )
        return failed(
            "the calls were retried after "
            + ", ".join(k.value if k else "a non-lock error" for k in kinds)
            + ", never after a deadlock: the deadlock was not detected as one"
        )
    return passed(
        f"two @transactional calls locked rows {first} and {second} in opposite order and "
        f"deadlocked; the victim's deadlock was retried ({len(retries)} "
        f"retr{'y' if len(retries) == 1 else 'ies'}, attempts {attempts[0]} and {attempts[1]}) "
        f"and both committed in {took:.2f} s (rows read back: 2 and 2)"
    )


#: SQLite: how long the holder keeps the write lock, and each attempt's busy timeout.
SQLITE_HOLD = 0.8
SQLITE_ATTEMPT_WAIT = 0.2


def _transactional_on_sqlite(ctx: ProbeContext) -> Verdict:
    """SQLite cannot deadlock on locksafe's row locks: its retryable lock error is the busy
    database, provoked by holding the write lock past each attempt's busy timeout."""
    row = ROWS_RETRY[0]
    retries: list[RetryDetails] = []
    options: dict[str, Any] = {
        "attempts": 30,
        "timeout": ctx.hold_timeout,
        "wait_initial": 0.05,
        "wait_max": 0.2,
        "on_retry": retries.append,
    }

    def bump(handle: Handle) -> int:
        attempts = [0]
        if handle.is_async:
            from sqlalchemy.ext.asyncio import async_sessionmaker

            @transactional(sessionmaker=async_sessionmaker(handle.engine), **options)  # type: ignore[arg-type]
            async def bump_async(*, session: AsyncSession = NEW_SESSION) -> int:
                attempts[0] += 1
                async with lock_timeout(session, SQLITE_ATTEMPT_WAIT):
                    await session.execute(ctx.locked(session, row))
                await session.execute(ctx.bump(row))
                return attempts[0]

            return handle.wait(bump_async())

        @transactional(sessionmaker=sessionmaker(handle.engine), **options)  # type: ignore[arg-type]
        def bump_sync(*, session: Session = NEW_SESSION) -> int:
            attempts[0] += 1
            with lock_timeout(session, SQLITE_ATTEMPT_WAIT):
                session.execute(ctx.locked(session, row))
            session.execute(ctx.bump(row))
            return attempts[0]

        return bump_sync()

    holder = ctx.worker("holder")
    caller = ctx.worker("caller")
    holder.run(_lock(ctx, row), timeout=STEP)
    try:
        began = time.monotonic()
        future = caller.submit_work(bump)
        time.sleep(SQLITE_HOLD)
    finally:
        holder.rollback()
    attempts = result(future, ctx.hold_timeout)
    took = time.monotonic() - began
    value = ctx.values(ctx.worker("checker"))[row]
    kinds = {detail.kind for detail in retries}
    if value != 1:
        return failed(f"the call returned, but row {row} reads {value}, not 1")
    if not retries:
        return failed(
            f"no retry: the call got the row in its first attempt while another connection "
            f"held the write lock for {SQLITE_HOLD:g} s"
        )
    if not kinds <= {LockErrorKind.DATABASE_BUSY, LockErrorKind.TABLE_LOCKED}:
        return failed(
            "the call was retried after "
            + ", ".join(sorted(k.value if k else "a non-lock error" for k in kinds))
            + ", not after database_busy"
        )
    return passed(
        f"SQLite cannot deadlock on locksafe's row locks (one write lock, taken first), so its "
        f"retryable lock error was provoked instead: with the write lock held {SQLITE_HOLD:g} s "
        f"by another connection, the call failed database_busy {len(retries)} times and its "
        f"attempt {attempts} committed after {took:.2f} s (row read back: 1)"
    )


# -- 8. two sessions in one thread do not deadlock ----------------------------------------------

SESSIONS_WAIT = 2.0


@dataclass
class _SessionsOutcome:
    #: Part 1: A read, B wrote and committed, A wrote and committed (each a bounded wait).
    first: str | None = None
    first_seconds: float = 0.0
    #: Part 2: A holds a write; B writes another row. "ok", "self" (SelfDeadlock) or "error".
    second: str = ""
    second_seconds: float = 0.0
    second_error: str = ""
    second_kind: LockErrorKind | None = None


def probe_two_sessions(ctx: ProbeContext) -> Verdict:
    a_row, b_row = ROWS_SESSIONS
    t = ctx.table

    def sync_work(engine: Engine) -> _SessionsOutcome:
        out = _SessionsOutcome()
        began = time.monotonic()
        with Session(engine) as a, Session(engine) as b:
            try:
                a.execute(select(t.c.value).where(t.c.id == a_row)).all()
                with lock_timeout(b, SESSIONS_WAIT):
                    b.execute(ctx.bump(b_row))
                    b.commit()
                with lock_timeout(a, SESSIONS_WAIT):
                    a.execute(ctx.bump(a_row))
                    a.commit()
            except (DBAPIError, SelfDeadlock) as exc:
                out.first = _what(exc)
        out.first_seconds = time.monotonic() - began
        with Session(engine) as a, Session(engine) as b:
            a.execute(ctx.bump(a_row))  # A holds a write lock now
            began = time.monotonic()
            try:
                with lock_timeout(b, SESSIONS_WAIT):
                    b.execute(ctx.bump(b_row))
                    b.commit()
                out.second = "ok"
            except SelfDeadlock as exc:
                out.second, out.second_error = "self", str(exc)
            except DBAPIError as exc:
                out.second, out.second_error = "error", describe_error(exc)
                out.second_kind = classify(exc)
            out.second_seconds = time.monotonic() - began
            b.rollback()
            a.commit()
        return out

    async def async_work(engine: Any) -> _SessionsOutcome:
        from sqlalchemy.ext.asyncio import AsyncSession

        out = _SessionsOutcome()
        began = time.monotonic()
        async with AsyncSession(engine) as a, AsyncSession(engine) as b:
            try:
                (await a.execute(select(t.c.value).where(t.c.id == a_row))).all()
                async with lock_timeout(b, SESSIONS_WAIT):
                    await b.execute(ctx.bump(b_row))
                    await b.commit()
                async with lock_timeout(a, SESSIONS_WAIT):
                    await a.execute(ctx.bump(a_row))
                    await a.commit()
            except (DBAPIError, SelfDeadlock) as exc:
                out.first = _what(exc)
        out.first_seconds = time.monotonic() - began
        async with AsyncSession(engine) as a, AsyncSession(engine) as b:
            await a.execute(ctx.bump(a_row))
            began = time.monotonic()
            try:
                async with lock_timeout(b, SESSIONS_WAIT):
                    await b.execute(ctx.bump(b_row))
                    await b.commit()
                out.second = "ok"
            except SelfDeadlock as exc:
                out.second, out.second_error = "self", str(exc)
            except DBAPIError as exc:
                out.second, out.second_error = "error", describe_error(exc)
                out.second_kind = classify(exc)
            out.second_seconds = time.monotonic() - began
            await b.rollback()
            await a.commit()
        return out

    def work(handle: Handle) -> _SessionsOutcome:
        if handle.is_async:
            return handle.wait(async_work(handle.engine))
        return sync_work(handle.engine)  # type: ignore[arg-type]

    worker = ctx.worker("sessions")
    out: _SessionsOutcome = result(worker.submit_work(work), ctx.hold_timeout)
    values = ctx.values(ctx.worker("checker"))
    if out.first is not None:
        return failed(
            "session A read, then session B of the same thread wrote and committed, then A "
            f"wrote: that failed after {out.first_seconds:.2f} s ({out.first})"
        )
    if out.second == "error":
        waited = (
            f"waited {out.second_seconds:.2f} s (the {SESSIONS_WAIT:g} s bound the doctor set) "
            if out.second_seconds >= SESSIONS_WAIT * 0.75
            else f"failed after {out.second_seconds:.2f} s "
        )
        hint = (
            "; without locksafe.sqlite.configure(), an application waits the whole busy "
            "timeout here on every such call, then fails — configure() raises SelfDeadlock at "
            "once instead"
            if ctx.database_lock and not ctx.target.sqlite_configure
            else ""
        )
        return failed(
            f"with session A of the same thread holding a write, session B's write {waited}"
            f"for A, which cannot end before B does ("
            f"{out.second_kind.value if out.second_kind else 'not a lock error'}: "
            f"{out.second_error}){hint}"
        )
    if out.second_seconds > SESSIONS_WAIT * 0.75:
        return failed(
            f"session B's write took {out.second_seconds:.2f} s while session A of the same "
            "thread held a write: it waited on its own thread"
        )
    expected_b = 1 + (1 if out.second == "ok" else 0)
    if (values[a_row], values[b_row]) != (2, expected_b):
        return failed(
            f"rows {a_row} and {b_row} read {values[a_row]} and {values[b_row]}, not 2 and "
            f"{expected_b}: a committed write was lost"
        )
    if out.second == "self":
        return passed(
            "reads in one session and writes in another of the same thread work; a write while "
            "the thread's other session holds SQLite's one write lock cannot succeed, and raised "
            f"SelfDeadlock in {out.second_seconds:.3f} s instead of hanging for the busy timeout"
        )
    return passed(
        f"session A read, session B of the same thread wrote and committed, then A wrote "
        f"({out.first_seconds:.2f} s); with A holding row {a_row}, B's write of row {b_row} "
        f"went through in {out.second_seconds:.3f} s"
    )


def _what(exc: BaseException) -> str:
    if isinstance(exc, SelfDeadlock):
        return f"SelfDeadlock: {exc}"
    kind = classify(exc)
    return f"{kind.value if kind else 'not a lock error'}: {describe_error(exc)}"


PROBES: tuple[Probe, ...] = (
    Probe("row_lock_excludes", "row lock excludes", probe_row_lock),
    Probe("nowait_fails_fast", "NOWAIT fails fast", probe_nowait),
    Probe("skip_locked_skips", "SKIP LOCKED skips", probe_skip_locked),
    Probe("lock_timeout_honoured", "lock timeout honoured", probe_lock_timeout),
    Probe("deadlock_detected", "deadlock detected", probe_deadlock),
    Probe("named_lock_excludes", "named lock excludes", probe_named_lock),
    Probe("transactional_retries", "@transactional retries", probe_transactional),
    Probe("two_sessions_one_thread", "two sessions, one thread", probe_two_sessions),
)
