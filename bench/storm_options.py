"""Measure @transactional's options against PostgreSQL's delayed deadlock detection (issue 13).

The deadlock storm of ``server_scenarios.run_storm`` (8 threads, 8 accounts, random lock
order) under several ways to end a lock wait that may be a deadlock, each round against the
fixed-order baseline of the same round; medians over the rounds::

    PYTHONPATH=src python bench/storm_options.py --rounds 3 [--backend mariadb]

Variants: stock retries (``early_lock_timeout=None``), the user's own
``lock_timeout(session, 0.02)`` around the second lock, and ``early_lock_timeout`` with other
first bounds, growths (``locksafe.transactions._EARLY_GROWTH``) and backoffs::

    --early 20:2:0.05 --early 20:4:0.05    # ms : growth per attempt : wait_initial

``--queue N`` adds the work queue with plain FOR UPDATE (every transaction takes one lock, all
queue for the same row: no deadlock possible), to see what the early bound costs there.

Also measured, with the prototype of commit 1f187b5 (``_EARLY_MODE = "holding"``): the early
bound set only once the attempt holds a lock (one more statement, while holding it, before
the next statement that may wait): slower in the storm than the bound from the attempt's
start (median ratios 0.64–0.71× against 0.73–0.77×), and a statement more in every
transaction of two writes or more.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import make_url

import _common  # noqa: F401  (puts src/ and tests/ on sys.path)
import locksafe.transactions
import server_scenarios as ss
from _common import Result, progress


@dataclass(frozen=True)
class Option:
    variant: ss.StormVariant
    #: locksafe.transactions._EARLY_GROWTH
    growth: float = locksafe.transactions._EARLY_GROWTH


def options(backend: str, specs: list[str]) -> list[Option]:
    V = ss.StormVariant
    off = {"early_lock_timeout": None}
    out = [
        Option(V("ordered", "fixed order (baseline)", True, options=off)),
        Option(V("stock", "random order, early_lock_timeout=None (stock)", False, options=off)),
    ]
    if backend == "postgresql":
        out.append(
            Option(
                V(
                    "user20",
                    "random order, stock + lock_timeout(session, 0.02) around the 2nd lock",
                    False,
                    lock_timeout=0.02,
                    scope="second",
                    options=off,
                )
            )
        )
    for spec in specs:
        ms, growth, wait_initial = spec.split(":")
        out.append(
            Option(
                V(
                    f"early{ms}x{growth}w{wait_initial}",
                    f"random order, early_lock_timeout={float(ms) / 1000:g} (×{growth} per "
                    f"attempt, wait_initial {wait_initial})",
                    False,
                    wait_initial=float(wait_initial),
                    options={"early_lock_timeout": float(ms) / 1000},
                ),
                growth=float(growth),
            )
        )
    return out


@contextmanager
def knobs(option: Option) -> Iterator[None]:
    growth = locksafe.transactions._EARLY_GROWTH
    locksafe.transactions._EARLY_GROWTH = option.growth
    try:
        yield
    finally:
        locksafe.transactions._EARLY_GROWTH = growth


@contextmanager
def transactional_options(extra: dict[str, Any]) -> Iterator[None]:
    """``@transactional`` with more options, in scenarios that take none."""
    original = locksafe.transactional

    def with_options(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, **extra})

    locksafe.transactional = with_options  # type: ignore[assignment]
    try:
        yield
    finally:
        locksafe.transactional = original


def queue(url: Any, plan: list[Option], args: argparse.Namespace) -> None:
    """The work queue with plain FOR UPDATE: 8 workers queue for the same first row; each
    transaction takes one lock (a wait that cannot be a deadlock)."""
    rows = []
    for option in plan:
        if option.variant.key in ("ordered", "user20"):
            continue
        extra = option.variant.options or {}
        got = []
        for round_ in range(args.rounds):
            with knobs(option), transactional_options(extra):
                result = ss.run_queue(
                    url,
                    workers=8,
                    count=args.queue,
                    skip_locked=False,
                    key=option.variant.key,
                    label=option.variant.label,
                )
            got.append(result)
            progress(f"queue round {round_ + 1}/{args.rounds}: {result.summary()}")
        ok = all(
            r.checks["done"] == r.checks["jobs"] and not r.checks["double_claims"] for r in got
        )
        rows.append(
            f"| plain FOR UPDATE queue, {option.variant.label} "
            f"| {statistics.median(r.throughput for r in got):.1f} jobs/s "
            f"| p99 {statistics.median(r.p99_ms for r in got):.0f} ms "
            f"| retries {statistics.median(r.retries for r in got)} "
            f"| errors {sum(r.failed for r in got)} | all done once: {'yes' if ok else 'NO'} |"
        )
    print("\n".join(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--backend", choices=("postgresql", "mariadb"), default="postgresql")
    parser.add_argument(
        "--early",
        action="append",
        default=[],
        help="an early_lock_timeout variant, ms:growth:wait_initial (20:2:0.05)",
    )
    parser.add_argument("--no-user", action="store_true", help="leave out the lock_timeout row")
    parser.add_argument(
        "--queue",
        type=int,
        default=0,
        help="also the work queue with plain FOR UPDATE (one lock per transaction, all "
        "waiting for the same row): this many jobs, stock and each --early variant",
    )
    args = parser.parse_args(argv)
    quiet = logging.getLogger("locksafe.transactions")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False

    from harness import servers

    start: Callable[[], Any] = (
        servers.start_postgresql if args.backend == "postgresql" else servers.start_mariadb
    )
    server = start()
    driver = "postgresql+psycopg2" if args.backend == "postgresql" else "mysql+mysqldb"
    url = make_url(server.url).set(drivername=driver)
    plan = [
        o
        for o in options(args.backend, args.early)
        if not (args.no_user and o.variant.key == "user20")
    ]
    got: dict[str, list[Result]] = {o.variant.key: [] for o in plan}
    try:
        for round_ in range(args.rounds):
            for option in plan:
                with knobs(option):
                    result = ss.run_storm(url, option.variant, threads=8, seconds=args.seconds)
                got[option.variant.key].append(result)
                progress(f"round {round_ + 1}/{args.rounds}: {result.summary()}")
        if args.queue:
            queue(url, plan, args)
    finally:
        server.stop()
    base = got["ordered"]
    print(
        "| variant | tx/s (median) | ratio (median, min–max) | deadlocks | lock timeouts "
        "| retries | errors | p99 ms | balance ok |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def retried(r: Result, kind: str) -> int:
        return int(r.checks.get("retried", {}).get(kind, 0))

    for option in plan:
        rs = got[option.variant.key]
        ratios = [r.throughput / b.throughput for r, b in zip(rs, base, strict=True)]
        kinds: dict[str, int] = {}
        for r in rs:
            for k, n in r.checks.get("retried", {}).items():
                kinds[k] = kinds.get(k, 0) + n
        ok = all(int(r.checks["total"]) == r.checks["expected_total"] for r in rs)
        print(
            f"| {option.variant.label} | {statistics.median(r.throughput for r in rs):.1f} "
            f"| {statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) "
            f"| {statistics.median(retried(r, 'deadlock') for r in rs)} "
            f"| {statistics.median(retried(r, 'lock_timeout') for r in rs)} "
            f"| {statistics.median(r.retries for r in rs)} "
            f"| {sum(r.failed for r in rs)} "
            f"| {statistics.median(r.p99_ms for r in rs):.0f} | {'yes' if ok else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
