"""PostgreSQL and MariaDB under contention: a SKIP LOCKED work queue and a deadlock storm.

**Work queue.** ``jobs`` holds queued jobs. A worker claims the first queued job with
``with_row_locks(..., skip_locked=True)`` inside ``@transactional``, works 10 ms holding the
claim (``time.sleep``: waiting on I/O, as real jobs do), marks it done (``claims + 1``) and
commits; when a claim finds nothing it looks (unlocked) whether queued jobs remain, and stops
only when none do. Baseline: one worker; target: 8 workers at least 0.9 x 8 x its rate.
Checked afterwards from another connection: every job done, each claimed exactly once
(``claims == 1``), and each job id returned to exactly one worker. For contrast: plain
``FOR UPDATE`` (no SKIP LOCKED), where the workers queue behind the same first row.

**Deadlock storm.** ``accounts`` holds 8 accounts. A transfer between a random pair locks the
first account's row, waits 2 ms, locks the second's, and moves money, inside
``@transactional``. In *random order* two transfers can lock the same pair the other way
round: a deadlock, which the server breaks by failing one transaction, retried. Baseline: the
same transfers in a fixed order (lower id first): no deadlocks. Target: committed transfers
per second at least 0.8 x the baseline, and the total balance unchanged. On PostgreSQL a
deadlock is detected only after ``deadlock_timeout`` (1 s by default) of waiting; the
variants bound each lock wait with :func:`locksafe.lock_timeout` inside the transaction, so
a wait that may be a deadlock ends sooner as a lock timeout, which ``@transactional``
retries.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    select,
    update,
)
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

import locksafe
from _common import (
    Result,
    RetryCounter,
    WorkerOutcome,
    cpu_seconds,
    error_name,
    merge,
    run_processes,
    run_threads,
)

metadata = MetaData()
jobs = Table(
    "bench_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("state", String(10), nullable=False, index=True),
    Column("claims", Integer, nullable=False),
    Column("worker", Integer),
)
accounts = Table(
    "bench_accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("balance", Integer, nullable=False),
)

WORK_SECONDS = 0.010
ACCOUNTS = 8
START_BALANCE = 1000
GAP_SECONDS = 0.002  # between the two row locks of a transfer


def engine_for(url: URL, pool_size: int, **kw: Any) -> Engine:
    return create_engine(url, pool_size=pool_size, max_overflow=4, **kw)


# -- work queue ----------------------------------------------------------------------------------


def reset_jobs(url: URL, count: int) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        metadata.create_all(engine, tables=[jobs])
        with engine.begin() as conn:
            conn.execute(jobs.delete())
            conn.execute(
                jobs.insert(),
                [{"id": i, "state": "queued", "claims": 0} for i in range(1, count + 1)],
            )
    finally:
        engine.dispose()


def _queue_worker(
    url: URL,
    skip_locked: bool,
    pool_size: int,
    timeout: float = 30.0,
    isolation: str | None = None,
) -> tuple[Engine, Callable[[int], int | None], RetryCounter]:
    """An engine and the claim transaction (``@transactional`` + ``with_row_locks``);
    ``timeout`` is ``@transactional``'s (its default, 30 s, bounds every lock wait of an
    attempt by the time left, which costs statements per transaction)."""
    engine = engine_for(url, pool_size)
    factory = sessionmaker(engine)
    retries = RetryCounter()

    @locksafe.transactional(sessionmaker=factory, attempts=20, timeout=timeout, on_retry=retries)
    def claim_one(worker: int, *, session: Session = locksafe.NEW_SESSION) -> int | None:
        first = select(jobs.c.id).where(jobs.c.state == "queued").order_by(jobs.c.id).limit(1)
        stmt = locksafe.with_row_locks(first, session, skip_locked=skip_locked)
        job: int | None = session.execute(stmt).scalar()
        if job is None:
            return None
        time.sleep(WORK_SECONDS)
        session.execute(
            update(jobs)
            .where(jobs.c.id == job)
            .values(state="done", claims=jobs.c.claims + 1, worker=worker)
        )
        return job

    return engine, claim_one, retries


_REMAINING = select(func.count()).select_from(jobs).where(jobs.c.state == "queued")


def _claim_loop(
    engine: Engine, claim_one: Callable[[int], int | None], index: int, barrier: Any
) -> WorkerOutcome:
    outcome = WorkerOutcome()
    barrier.wait()
    outcome.started = time.monotonic()
    while True:
        began = time.monotonic()
        try:
            job = claim_one(index)
        except Exception as exc:
            outcome.errors[error_name(exc)] += 1
            continue
        if job is None:
            with engine.connect() as conn:
                if not conn.execute(_REMAINING).scalar():
                    break
            outcome.empty += 1
            continue
        outcome.items.append(job)
        outcome.done += 1
        outcome.latencies.append(time.monotonic() - began)
    outcome.ended = time.monotonic()
    return outcome


def run_queue(
    url: URL,
    *,
    workers: int,
    count: int,
    skip_locked: bool,
    key: str,
    label: str,
    processes: bool = False,
    timeout: float = 30.0,
    isolation: str | None = None,
) -> Result:
    """``workers`` workers (threads of this process, or forked processes) until the queue of
    ``count`` jobs is empty."""
    reset_jobs(url, count)
    cpu_before = cpu_seconds()
    if processes:

        def in_process(index: int, barrier: Any) -> WorkerOutcome:
            engine, claim_one, own = _queue_worker(url, skip_locked, 2, timeout, isolation)
            try:
                outcome = _claim_loop(engine, claim_one, index, barrier)
            finally:
                engine.dispose()
            outcome.retries = own.count
            outcome.kinds = dict(own.kinds)
            return outcome

        outcomes = run_processes(workers, in_process)
        result = merge(key, label, outcomes)
        kinds: dict[str, int] = {}
        for outcome in outcomes:
            for k, n in outcome.kinds.items():
                kinds[k] = kinds.get(k, 0) + n
    else:
        engine, claim_one, retries = _queue_worker(
            url, skip_locked, workers + 2, timeout, isolation
        )
        try:
            outcomes = run_threads(workers, lambda i, b: _claim_loop(engine, claim_one, i, b))
        finally:
            engine.dispose()
        result = merge(key, label, outcomes)
        result.retries = retries.count
        kinds = dict(retries.kinds)
    cpu_ms = (cpu_seconds() - cpu_before) / max(result.done, 1) * 1000
    every = [job for outcome in outcomes for job in outcome.items]
    check = create_engine(url, poolclass=NullPool)
    try:
        with check.connect() as conn:
            done = conn.execute(
                select(func.count()).select_from(jobs).where(jobs.c.state == "done")
            ).scalar()
            twice = conn.execute(
                select(func.count()).select_from(jobs).where(jobs.c.claims > 1)
            ).scalar()
    finally:
        check.dispose()
    result.checks.update(
        jobs=count,
        done=done,
        double_claims=twice,
        returned_twice=len(every) - len(set(every)),
        empty_claims=sum(outcome.empty for outcome in outcomes),
        cpu_ms_per_job=cpu_ms,
    )
    if kinds:
        result.checks["retried"] = kinds
    return result


# -- deadlock storm ------------------------------------------------------------------------------


def reset_accounts(url: URL) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        metadata.create_all(engine, tables=[accounts])
        with engine.begin() as conn:
            conn.execute(accounts.delete())
            conn.execute(
                accounts.insert(),
                [{"id": i, "balance": START_BALANCE} for i in range(1, ACCOUNTS + 1)],
            )
    finally:
        engine.dispose()


@dataclass(frozen=True)
class StormVariant:
    """How the transfers run: lock order, and how a lock wait is bounded."""

    key: str
    label: str
    ordered: bool
    #: seconds, for ``locksafe.lock_timeout(session, ...)``; None: none.
    lock_timeout: float | None = None
    #: where the lock_timeout applies: ``"both"`` locks, or only the ``"second"`` (a
    #: transaction that holds no lock yet cannot be part of a deadlock: its first wait is an
    #: ordinary queue, and only a wait while holding a lock may be one).
    scope: str = "both"
    wait_initial: float = 0.05
    wait_max: float = 2.0
    #: connect_args for the engine (a server setting per connection, for contrast rows).
    connect_args: dict[str, Any] | None = None
    #: more ``@transactional`` options (``{"early_lock_timeout": None}``: stock retries).
    options: dict[str, Any] | None = None


def run_storm(url: URL, variant: StormVariant, *, threads: int, seconds: float) -> Result:
    reset_accounts(url)
    kw: dict[str, Any] = {}
    if variant.connect_args:
        kw["connect_args"] = variant.connect_args
    engine = engine_for(url, threads + 2, **kw)
    factory = sessionmaker(engine)
    retries = RetryCounter()

    def lock(session: Session, account: int) -> int:
        stmt = locksafe.with_row_locks(
            select(accounts.c.balance).where(accounts.c.id == account), session
        )
        balance: int = session.execute(stmt).scalar_one()
        return balance

    bound = variant.lock_timeout

    def body(session: Session, first: int, second: int, source: int, amount: int) -> None:
        lock(session, first)
        time.sleep(GAP_SECONDS)
        if bound is not None and variant.scope == "second":
            with locksafe.lock_timeout(session, bound):
                lock(session, second)
        else:
            lock(session, second)
        target = second if source == first else first
        session.execute(
            update(accounts)
            .where(accounts.c.id == source)
            .values(balance=accounts.c.balance - amount)
        )
        session.execute(
            update(accounts)
            .where(accounts.c.id == target)
            .values(balance=accounts.c.balance + amount)
        )

    @locksafe.transactional(
        sessionmaker=factory,
        attempts=1000,
        timeout=30.0,
        wait_initial=variant.wait_initial,
        wait_max=variant.wait_max,
        on_retry=retries,
        **(variant.options or {}),
    )
    def transfer(
        first: int,
        second: int,
        source: int,
        amount: int,
        *,
        session: Session = locksafe.NEW_SESSION,
    ) -> None:
        if bound is None or variant.scope == "second":
            body(session, first, second, source, amount)
        else:
            with locksafe.lock_timeout(session, bound):
                body(session, first, second, source, amount)

    def work(index: int, barrier: Any) -> WorkerOutcome:
        rng = random.Random(index)
        outcome = WorkerOutcome()
        barrier.wait()
        outcome.started = time.monotonic()
        stop = outcome.started + seconds
        while time.monotonic() < stop:
            a, b = rng.sample(range(1, ACCOUNTS + 1), 2)
            first, second = (min(a, b), max(a, b)) if variant.ordered else (a, b)
            began = time.monotonic()
            try:
                transfer(first, second, a, rng.randint(1, 10))
            except Exception as exc:
                outcome.errors[error_name(exc)] += 1
            else:
                outcome.done += 1
                outcome.latencies.append(time.monotonic() - began)
        outcome.ended = time.monotonic()
        return outcome

    try:
        result = merge(variant.key, variant.label, run_threads(threads, work))
    finally:
        engine.dispose()
    result.retries = retries.count
    check = create_engine(url, poolclass=NullPool)
    try:
        with check.connect() as conn:
            total = conn.execute(select(func.sum(accounts.c.balance))).scalar()
    finally:
        check.dispose()
    result.checks.update(
        total=int(total) if total is not None else None, expected_total=ACCOUNTS * START_BALANCE
    )
    if retries.kinds:
        result.checks["retried"] = dict(retries.kinds)
    return result


def server_version(url: URL) -> str:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            sql = (
                "SHOW server_version"
                if url.get_backend_name() == "postgresql"
                else ("SELECT VERSION()")
            )
            return str(conn.exec_driver_sql(sql).scalar())
    finally:
        engine.dispose()
