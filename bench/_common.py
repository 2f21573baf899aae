"""Shared pieces of the contention benchmarks: results, percentiles, progress, workers.

A :class:`Result` is one measured scenario: how many transactions (or jobs) were committed in
how many seconds, each one's latency, the errors that reached the caller, and the checks of
the invariants made afterwards from another connection. Ratios are taken between results of
the same run only.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "src", ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

_started = time.monotonic()


def progress(message: str) -> None:
    """One line of progress on stderr, with the time since the run began."""
    print(f"[{time.monotonic() - _started:6.1f} s] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Result:
    """One measured scenario."""

    key: str
    label: str
    done: int
    seconds: float
    latencies: list[float] = field(default_factory=list, repr=False)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    warmup: int = 0
    checks: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else math.nan

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 99) * 1000

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in self.errors.most_common()) or "0"
        return (
            f"{self.label}: {self.done} in {self.seconds:.2f} s = {self.throughput:.1f}/s, "
            f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, errors {errors}, "
            f"retries {self.retries}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "done": self.done,
            "seconds": self.seconds,
            "throughput": self.throughput,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "errors": dict(self.errors),
            "retries": self.retries,
            "checks": self.checks,
            "notes": self.notes,
        }


class RetryCounter:
    """An ``on_retry`` for ``@transactional``: counts retries, by lock kind (thread-safe)."""

    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, details: Any) -> None:
        with self._lock:
            self.count += 1
            name = details.kind.value if details.kind is not None else "other"
            self.kinds[name] = self.kinds.get(name, 0) + 1


def error_name(exc: BaseException) -> str:
    """A short name for an error that reached the caller: its type, and the lock kind."""
    import locksafe

    kind = locksafe.classify(exc)
    name = type(exc).__name__
    return f"{name}({kind.value})" if kind is not None else name


@dataclass
class WorkerOutcome:
    """What one worker (thread or process) did: picklable, merged into a Result."""

    done: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    items: list[int] = field(default_factory=list)
    empty: int = 0
    warmup: int = 0  # transactions done before the clock started (in the database too)
    started: float = math.inf
    ended: float = 0.0


def merge(key: str, label: str, outcomes: Sequence[WorkerOutcome]) -> Result:
    """One Result from the workers' outcomes; the time is first start to last end."""
    began = min(o.started for o in outcomes)
    ended = max(o.ended for o in outcomes)
    result = Result(key, label, sum(o.done for o in outcomes), max(ended - began, 1e-9))
    for outcome in outcomes:
        result.latencies += outcome.latencies
        result.errors.update(outcome.errors)
        result.retries += outcome.retries
        result.warmup += outcome.warmup
    return result


def run_threads(
    count: int, work: Callable[[int, threading.Barrier], WorkerOutcome]
) -> list[WorkerOutcome]:
    """Run ``work(index, barrier)`` in ``count`` threads; each waits on the barrier, then
    measures. Returns their outcomes (an exception in a worker is re-raised here)."""
    barrier = threading.Barrier(count)
    outcomes: list[WorkerOutcome | None] = [None] * count
    failures: list[BaseException] = []

    def target(index: int) -> None:
        try:
            outcomes[index] = work(index, barrier)
        except BaseException as exc:  # reported below, never lost
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return [o for o in outcomes if o is not None]


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that ended."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def run_processes(
    count: int, work: Callable[[int, Any], WorkerOutcome], *, timeout: float = 600.0
) -> list[WorkerOutcome]:
    """Run ``work(index, barrier)`` in ``count`` forked processes (a multiprocessing barrier);
    returns their outcomes. A worker that fails or dies is an error here, never a lost row."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(count)
    queue = ctx.SimpleQueue()

    def target(index: int) -> None:
        try:
            queue.put((index, work(index, barrier), None))
        except BaseException as exc:
            barrier.abort()
            queue.put((index, None, f"{type(exc).__name__}: {exc}"))

    procs = [ctx.Process(target=target, args=(i,), daemon=True) for i in range(count)]
    for proc in procs:
        proc.start()
    outcomes: list[WorkerOutcome] = []
    problems: list[str] = []
    deadline = time.monotonic() + timeout
    for _ in range(count):
        while queue.empty():
            if time.monotonic() > deadline or not any(p.is_alive() for p in procs):
                break
            time.sleep(0.01)
        if queue.empty():
            problems.append("a worker process died or timed out without reporting")
            break
        _, outcome, problem = queue.get()
        if problem is not None:
            problems.append(problem)
        else:
            outcomes.append(outcome)
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    if problems:
        raise RuntimeError("worker processes failed: " + "; ".join(problems))
    return outcomes
