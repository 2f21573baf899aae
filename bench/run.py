"""The benchmark report in one command: ``python bench/run.py`` (``--quick``: under 2 minutes).

Runs every scenario of issue 13's *Benchmarks* section beside its baseline, in the same run on
the same machine, and writes ``bench/REPORT.md`` (every target line marked met / not met from
this run), ``bench/report.png`` and ``bench/results.json``. Progress goes to stderr.

Servers: a throw-away PostgreSQL and MariaDB are started (``tests/servers.py``, as the test
suite does) unless ``LOCKSAFE_BENCH_POSTGRESQL_URL`` / ``LOCKSAFE_BENCH_MYSQL_URL`` name
existing ones (their drivers are replaced by psycopg2 and mysqlclient, SQLAlchemy's defaults).
A server that cannot be had leaves its scenarios out, and the report says so.

Each scenario runs ``rounds`` times (3; 1 with ``--quick``), interleaved with its baseline;
each round's ratio is taken against the baseline of the same round, and the median ratio
decides the target line. Exit status: 0 when the run completed (whatever the targets say),
1 when a scenario failed to run or an invariant (lost update, double claim, balance) broke.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import make_url
from sqlalchemy.engine import URL

import _common  # noqa: F401  (puts src/ and tests/ on sys.path)
import locksafe
from _common import ROOT, Result, load_average, progress

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    rounds: int
    sqlite_total: int  # transactions per 16-writer scenario
    sqlite_single: int  # transactions of baseline A
    reader_seconds: float
    queue_single: int  # jobs for one worker
    queue_jobs: int  # jobs for 8 workers
    queue_plain: int  # jobs for 8 workers with plain FOR UPDATE
    storm_seconds: float
    overhead_rounds: int
    overhead_seconds: float
    classify_repeats: int
    classify_target: float


QUICK = Sizes(1, 800, 400, 2.0, 60, 480, 120, 2.0, 2, 0.05, 3, 0.005)
FULL = Sizes(3, 3200, 1600, 5.0, 150, 1200, 300, 5.0, 5, 0.2, 7, 0.02)


@dataclass
class Line:
    """One target line of the report."""

    section: str
    target: str
    figure: str
    met: bool | None  # None: not measured in this run

    @property
    def mark(self) -> str:
        return {True: "**met**", False: "**not met**", None: "not measured"}[self.met]


@dataclass
class Report:
    sizes: Sizes
    quick: bool
    machine: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, list[str]] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)
    plots: dict[str, list[tuple[str, float, float | None]]] = field(default_factory=dict)

    def add(self, section: str, text: str) -> None:
        self.sections.setdefault(section, []).append(text)


# -- helpers ------------------------------------------------------------------------------------


def rounds_of(
    sizes: Sizes, plan: list[tuple[str, Callable[[], Result]]], what: str
) -> dict[str, list[Result]]:
    """Run each (key, run) of ``plan`` once per round, in order; results by key."""
    out: dict[str, list[Result]] = {key: [] for key, _ in plan}
    for round_ in range(sizes.rounds):
        for key, run in plan:
            result = run()
            out[key].append(result)
            progress(f"{what} round {round_ + 1}/{sizes.rounds}: {result.summary()}")
    return out


def med(results: list[Result], attr: str = "throughput") -> float:
    return statistics.median(getattr(r, attr) for r in results)


def ratios(results: list[Result], baselines: list[Result], factor: float = 1.0) -> list[float]:
    return [r.throughput / (factor * b.throughput) for r, b in zip(results, baselines, strict=True)]


def fmt_ratio(values: list[float]) -> str:
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:.2f}×"
    return f"{mid:.2f}× ({min(values):.2f}–{max(values):.2f})"


def errors_of(results: list[Result]) -> str:
    total: dict[str, int] = {}
    for r in results:
        for name, n in r.errors.items():
            total[name] = total.get(name, 0) + n
    return ", ".join(f"{n} {name}" for name, n in sorted(total.items())) or "0"


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def scenario_rows(groups: list[tuple[str, list[Result], str]]) -> list[list[str]]:
    """Rows of (scenario, tx/s, p50, p99, errors, retries, ratio)."""
    rows = []
    for label, results, ratio in groups:
        rows.append(
            [
                label,
                f"{med(results):.1f}",
                f"{med(results, 'p50_ms'):.1f}",
                f"{med(results, 'p99_ms'):.1f}",
                errors_of(results),
                str(sum(r.retries for r in results)),
                ratio,
            ]
        )
    return rows


HEADERS = ["scenario", "per s (median)", "p50 ms", "p99 ms", "errors", "retries", "ratio"]


# -- machine ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return out + (" (src/ modified)" if dirty else "")
    except OSError:
        return "?"


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for label, dists in (
        ("psycopg2", ("psycopg2-binary", "psycopg2")),
        ("mysqlclient", ("mysqlclient",)),
        ("tenacity", ("tenacity",)),
        ("matplotlib", ("matplotlib",)),
    ):
        found[label] = "not installed"
        for dist in dists:
            try:
                found[label] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


# -- servers ------------------------------------------------------------------------------------


class Servers:
    def __init__(self) -> None:
        self.started: list[Any] = []
        self.urls: dict[str, URL] = {}
        self.problems: dict[str, str] = {}

    def start(self) -> None:
        for backend, env, driver in (
            ("postgresql", "LOCKSAFE_BENCH_POSTGRESQL_URL", "postgresql+psycopg2"),
            ("mariadb", "LOCKSAFE_BENCH_MYSQL_URL", "mysql+mysqldb"),
        ):
            try:
                if os.environ.get(env):
                    url = make_url(os.environ[env])
                else:
                    from harness import servers

                    began = time.monotonic()
                    start = (
                        servers.start_postgresql
                        if backend == "postgresql"
                        else (servers.start_mariadb)
                    )
                    server = start()
                    self.started.append(server)
                    url = make_url(server.url)
                    progress(f"{backend} started in {time.monotonic() - began:.1f} s")
                self.urls[backend] = url.set(drivername=driver)
            except Exception as exc:
                self.problems[backend] = f"{type(exc).__name__}: {exc}"
                progress(f"{backend} unavailable: {exc}")

    def stop(self) -> None:
        while self.started:
            self.started.pop().stop()


# -- sections -----------------------------------------------------------------------------------


def sqlite_section(report: Report, tmp: Path) -> None:
    import sqlite_contention as sc

    s = report.sizes
    progress("SQLite: 16 writers beside one writer alone (A) and the naive app (B)")
    plan: list[tuple[str, Callable[[], Result]]] = [
        (
            "A",
            lambda: sc.run_writers(tmp, mode="threads", writers=1, total=s.sqlite_single, key="A"),
        ),
        (
            "threads",
            lambda: sc.run_writers(
                tmp, mode="threads", writers=16, total=s.sqlite_total, key="threads"
            ),
        ),
        (
            "processes",
            lambda: sc.run_writers(
                tmp, mode="processes", writers=16, total=s.sqlite_total, key="processes"
            ),
        ),
        ("B", lambda: sc.run_writers(tmp, mode="naive", writers=16, total=s.sqlite_total, key="B")),
    ]
    if not report.quick:
        plan += [
            (
                "threads_si",
                lambda: sc.run_writers(
                    tmp,
                    mode="threads",
                    writers=16,
                    total=s.sqlite_total // 2,
                    key="threads_si",
                    switch_interval=0.0005,
                    label="diagnostic: 16 threads, sys.setswitchinterval(0.0005)",
                ),
            ),
            (
                "processes_q",
                lambda: sc.run_writers(
                    tmp,
                    mode="processes",
                    writers=16,
                    total=s.sqlite_total // 2,
                    key="processes_q",
                    process_queue=True,
                    label="diagnostic: 16 processes queued on a blocking flock",
                ),
            ),
        ]
    got = rounds_of(s, plan, "sqlite")
    base = got["A"]
    r_threads = ratios(got["threads"], base)
    r_procs = ratios(got["processes"], base)
    r_naive = ratios(got["B"], base)
    rows = scenario_rows(
        [
            ("A: locksafe, 1 writer alone (the limit)", base, "1.00"),
            ("locksafe, 16 threads", got["threads"], fmt_ratio(r_threads)),
            ("locksafe, 16 processes", got["processes"], fmt_ratio(r_procs)),
            ("B: stock pysqlite, 16 threads", got["B"], fmt_ratio(r_naive)),
        ]
        + [
            (got[key][0].label, got[key], fmt_ratio(ratios(got[key], base)))
            for key in ("threads_si", "processes_q")
            if key in got
        ]
    )
    checks = []
    for key, label in (
        ("A", "A"),
        ("threads", "16 threads"),
        ("processes", "16 processes"),
        ("B", "B"),
    ):
        for i, r in enumerate(got[key], 1):
            c = r.checks
            checks.append(
                [
                    label,
                    str(i),
                    f"{r.done} + {r.warmup}",
                    str(c["counter"]),
                    str(c["events"]),
                    str(c["lost_updates"]),
                    str(c["duplicate_numbers"]),
                    "-" if c["partial"] is None else str(c["partial"]),
                    str(c["integrity"]),
                    f"{c['cpu_ms_per_tx']:.2f}",
                ]
            )
    report.add(
        "sqlite",
        table(HEADERS, rows)
        + "\n\nInvariants, read from a fresh connection after each run:\n\n"
        + table(
            [
                "run",
                "round",
                "calls returned (+ 1 warm-up per writer, before the clock)",
                "counter",
                "event rows",
                "lost updates",
                "duplicate numbers",
                "partial writes",
                "integrity_check",
                "CPU ms per tx (all writers)",
            ],
            checks,
        ),
    )
    for key in ("threads", "processes", "threads_si", "processes_q"):
        for r in got.get(key, []):
            c = r.checks
            if r.failed or c["lost_updates"] or c["duplicate_numbers"] or c["partial"]:
                report.broken.append(f"SQLite {key}: {r.summary()} {c}")
    for mode, values, results in (
        ("threads", r_threads, got["threads"]),
        ("processes", r_procs, got["processes"]),
    ):
        bad = sum(r.failed for r in results)
        partial = sum((r.checks["partial"] or 0) + r.checks["lost_updates"] for r in results)
        ratio = statistics.median(values)
        report.lines.append(
            Line(
                "SQLite contention",
                f"16 writers ({mode}) ≥ 0.9 × A, 0 failed, 0 partial rows",
                f"{fmt_ratio(values)}; {bad} failed; {partial} partial/lost",
                ratio >= 0.9 and bad == 0 and partial == 0,
            )
        )
    lost_b = statistics.median(r.checks["lost_updates"] / r.checks["events"] for r in got["B"])
    report.add(
        "sqlite_b",
        f"B (stock pysqlite, no locksafe) committed every call ({errors_of(got['B'])} errors) "
        f"at {fmt_ratio(r_naive)} of A, and lost updates silently: the counter read "
        + ", ".join(str(r.checks["counter"]) for r in got["B"])
        + " after "
        + ", ".join(str(r.checks["events"]) for r in got["B"])
        + f" events ({lost_b:.0%} of the updates lost, "
        "median).",
    )
    report.plots["SQLite: 16 writers / one writer alone (A)"] = [
        ("16 threads", statistics.median(r_threads), 0.9),
        ("16 processes", statistics.median(r_procs), 0.9),
        ("B: stock pysqlite", statistics.median(r_naive), None),
    ] + [
        (name, statistics.median(ratios(got[key], base)), None)
        for key, name in (
            ("threads_si", "threads, switch 0.5 ms (diag.)"),
            ("processes_q", "processes, flock queue (diag.)"),
        )
        if key in got
    ]
    report.results["sqlite"] = {k: [r.to_json() for r in v] for k, v in got.items()}

    progress("SQLite: 16 readers alone, beside 4 writers, and beside 4 writers on another file")
    alone: list[Result] = []
    beside: list[Result] = []
    control: list[Result] = []
    writers: list[Result] = []
    for round_ in range(s.rounds):
        a, _ = sc.run_readers(tmp, readers=16, writers=0, seconds=s.reader_seconds, key="ra")
        b, w = sc.run_readers(tmp, readers=16, writers=4, seconds=s.reader_seconds, key="rb")
        c, _ = sc.run_readers(
            tmp, readers=16, writers=4, seconds=s.reader_seconds, key="rc", other_file=True
        )
        assert w is not None
        alone.append(a)
        beside.append(b)
        control.append(c)
        writers.append(w)
        progress(f"readers round {round_ + 1}: {a.summary()} | {b.summary()} | {c.summary()}")
    slow = [a.throughput / b.throughput for a, b in zip(alone, beside, strict=True)]
    slow_c = [c.throughput / b.throughput for c, b in zip(control, beside, strict=True)]
    rows = scenario_rows(
        [
            ("16 readers alone", alone, "1.00"),
            ("16 readers beside 4 writers (same file)", beside, f"slowdown {fmt_ratio(slow)}"),
            (
                "control: 16 readers beside 4 writers on another file",
                control,
                f"same file vs this: slowdown {fmt_ratio(slow_c)}",
            ),
            ("the 4 writers (processes, same file)", writers, "-"),
        ]
    )
    report.add(
        "readers",
        table(HEADERS, rows)
        + "\n\nThe control runs the same 4 writer processes against another database file: "
        "the same CPU and disk load, no shared database. Readers beside writers on the same "
        "file / on another file isolates what the database itself costs the readers.",
    )
    bad = sum(r.failed for r in alone + beside + writers + control)
    for w in writers:
        if w.checks["lost_updates"] or w.checks["partial"]:
            report.broken.append(f"SQLite writers beside readers: {w.checks}")
    report.lines.append(
        Line(
            "SQLite contention",
            "16 readers beside 4 writers slowed ≤ 1.2× (WAL)",
            f"vs alone {fmt_ratio(slow)}; vs the control "
            f"(writers on another file) {fmt_ratio(slow_c)}; {bad} errors",
            max(statistics.median(slow), statistics.median(slow_c)) <= 1.2 and bad == 0,
        )
    )
    report.plots["SQLite: readers' throughput beside 4 writers / alone, / control"] = [
        ("vs alone", 1 / statistics.median(slow), 1 / 1.2),
        ("vs control", 1 / statistics.median(slow_c), 1 / 1.2),
    ]
    report.results["readers"] = {
        "alone": [r.to_json() for r in alone],
        "beside": [r.to_json() for r in beside],
        "control": [r.to_json() for r in control],
        "writers": [r.to_json() for r in writers],
    }


def queue_section(report: Report, backend: str, url: URL) -> None:
    import server_scenarios as ss

    s = report.sizes
    title = {"postgresql": "PostgreSQL", "mariadb": "MariaDB"}[backend]
    progress(f"{title}: work queue, 8 workers beside one")
    plan: list[tuple[str, Callable[[], Result]]] = [
        (
            "one",
            lambda: ss.run_queue(
                url,
                workers=1,
                count=s.queue_single,
                skip_locked=True,
                key="one",
                label="1 worker, SKIP LOCKED",
            ),
        ),
        (
            "eight",
            lambda: ss.run_queue(
                url,
                workers=8,
                count=s.queue_jobs,
                skip_locked=True,
                key="eight",
                label="8 workers, SKIP LOCKED",
            ),
        ),
        (
            "plain",
            lambda: ss.run_queue(
                url,
                workers=8,
                count=s.queue_plain,
                skip_locked=False,
                key="plain",
                label="8 workers, plain FOR UPDATE",
            ),
        ),
    ]
    if not report.quick:
        inf = float("inf")
        plan += [
            (
                "one_inf",
                lambda: ss.run_queue(
                    url,
                    workers=1,
                    count=s.queue_single,
                    skip_locked=True,
                    key="one_inf",
                    timeout=inf,
                    label="diagnostic: 1 worker, @transactional(timeout=inf)",
                ),
            ),
            (
                "eight_inf",
                lambda: ss.run_queue(
                    url,
                    workers=8,
                    count=s.queue_jobs,
                    skip_locked=True,
                    key="eight_inf",
                    timeout=inf,
                    label="diagnostic: 8 workers, @transactional(timeout=inf)",
                ),
            ),
        ]
        if backend == "mariadb":
            plan.append(
                (
                    "eight_rc",
                    lambda: ss.run_queue(
                        url,
                        workers=8,
                        count=s.queue_jobs,
                        skip_locked=True,
                        key="eight_rc",
                        isolation="READ COMMITTED",
                        label="diagnostic: 8 workers, isolation_level READ COMMITTED",
                    ),
                )
            )
    got = rounds_of(s, plan, f"{title} queue")
    r8 = ratios(got["eight"], got["one"], 8)
    rp = ratios(got["plain"], got["one"], 8)
    rows = scenario_rows(
        [
            ("1 worker, SKIP LOCKED (baseline)", got["one"], "1/8 of the target"),
            ("8 workers, SKIP LOCKED", got["eight"], fmt_ratio(r8)),
            ("8 workers, plain FOR UPDATE", got["plain"], fmt_ratio(rp)),
        ]
        + (
            [
                (got["one_inf"][0].label, got["one_inf"], "1/8 of its own target"),
                (
                    got["eight_inf"][0].label,
                    got["eight_inf"],
                    fmt_ratio(ratios(got["eight_inf"], got["one_inf"], 8))
                    + " of 8 × its own one worker",
                ),
            ]
            if "eight_inf" in got
            else []
        )
        + (
            [
                (
                    got["eight_rc"][0].label,
                    got["eight_rc"],
                    fmt_ratio(ratios(got["eight_rc"], got["one"], 8)),
                )
            ]
            if "eight_rc" in got
            else []
        )
    )
    checks = []
    for key in ("one", "eight", "plain", "one_inf", "eight_inf", "eight_rc"):
        for i, r in enumerate(got.get(key, []), 1):
            c = r.checks
            checks.append(
                [
                    r.label,
                    str(i),
                    f"{c['done']}/{c['jobs']}",
                    str(c["double_claims"]),
                    str(c["returned_twice"]),
                    str(c["empty_claims"]),
                    json.dumps(c.get("retried", {})),
                    f"{c['cpu_ms_per_job']:.2f}",
                ]
            )
            if c["double_claims"] or c["returned_twice"] or c["done"] != c["jobs"] or r.failed:
                report.broken.append(f"{title} queue {key}: {c}")
    report.add(
        f"queue_{backend}",
        table(HEADERS, rows)
        + "\n\nRatio = throughput / (8 × one worker's throughput of the same round).\n\n"
        + table(
            [
                "run",
                "round",
                "jobs done",
                "claimed twice (claims > 1)",
                "returned to two workers",
                "empty claims",
                "retried",
                "CPU ms per job (all workers)",
            ],
            checks,
        ),
    )
    double = sum(r.checks["double_claims"] + r.checks["returned_twice"] for r in got["eight"])
    report.lines.append(
        Line(
            f"{title} work queue",
            "8 workers ≥ 0.9 × 8 × one worker, 0 double claims",
            f"{fmt_ratio(r8)}; {double} double claims; {errors_of(got['eight'])} errors",
            statistics.median(r8) >= 0.9
            and double == 0
            and not any(r.failed for r in got["eight"]),
        )
    )
    report.plots[f"{title} queue: 8 workers / (8 × one worker)"] = [
        ("SKIP LOCKED", statistics.median(r8), 0.9),
        ("plain FOR UPDATE", statistics.median(rp), None),
    ] + (
        [
            (
                "timeout=inf (diagnostic)",
                statistics.median(ratios(got["eight_inf"], got["one_inf"], 8)),
                None,
            )
        ]
        if "eight_inf" in got
        else []
    )
    report.results[f"queue_{backend}"] = {k: [r.to_json() for r in v] for k, v in got.items()}


def storm_variants(backend: str, quick: bool) -> list[Any]:
    import server_scenarios as ss

    V = ss.StormVariant
    #: @transactional without the early bound (its behaviour before issue 13)
    off = {"early_lock_timeout": None}
    variants = [
        V("ordered", "fixed order (baseline)", True, options=off),
        V("random", "random order, @transactional defaults", False),
    ]
    if backend == "postgresql":
        variants.append(
            V("stock", "random order, early_lock_timeout=None (no early bound)", False, options=off)
        )
        if not quick:
            variants.append(
                V(
                    "ordered_defaults",
                    "fixed order, @transactional defaults (its early bound's cost without "
                    "deadlocks)",
                    True,
                )
            )
            variants.append(
                V(
                    "early50",
                    "random order, early_lock_timeout=0.05",
                    False,
                    options={"early_lock_timeout": 0.05},
                )
            )
            variants.append(
                V(
                    "both50",
                    "random order, no early bound, lock_timeout(session, 0.05) around the transfer",
                    False,
                    lock_timeout=0.05,
                    options=off,
                )
            )
        for ms in (20,) if quick else (20, 50):
            variants.append(
                V(
                    f"second{ms}",
                    f"random order, no early bound, lock_timeout(session, {ms / 1000:g}) around "
                    "the second lock only",
                    False,
                    lock_timeout=ms / 1000,
                    scope="second",
                    options=off,
                )
            )
        if not quick:
            variants.append(
                V(
                    "dt20",
                    "contrast (a server setting, not locksafe): deadlock_timeout = 20 ms, no "
                    "early bound",
                    False,
                    connect_args={"options": "-c deadlock_timeout=20ms"},
                    options=off,
                )
            )
    elif not quick:
        variants.append(
            V(
                "fast",
                "random order, wait_initial 5 ms, wait_max 100 ms",
                False,
                wait_initial=0.005,
                wait_max=0.1,
            )
        )
    return variants


def storm_section(report: Report, backend: str, url: URL) -> None:
    import server_scenarios as ss

    s = report.sizes
    title = {"postgresql": "PostgreSQL", "mariadb": "MariaDB"}[backend]
    progress(f"{title}: deadlock storm")
    variants = storm_variants(backend, report.quick)
    plan: list[tuple[str, Callable[[], Result]]] = [
        (v.key, (lambda v=v: ss.run_storm(url, v, threads=8, seconds=s.storm_seconds)))
        for v in variants
    ]
    got = rounds_of(s, plan, f"{title} storm")
    base = got["ordered"]
    groups = []
    per_variant: dict[str, list[float]] = {}
    for v in variants:
        values = ratios(got[v.key], base)
        per_variant[v.key] = values
        groups.append((v.label, got[v.key], "1.00" if v.key == "ordered" else fmt_ratio(values)))
    conserved = all(
        int(r.checks["total"]) == r.checks["expected_total"] for rs in got.values() for r in rs
    )
    for rs in got.values():
        for r in rs:
            if int(r.checks["total"]) != r.checks["expected_total"]:
                report.broken.append(f"{title} storm {r.key}: balance {r.checks}")
    retried = []
    for v in variants:
        kinds: dict[str, int] = {}
        for r in got[v.key]:
            for k, n in r.checks.get("retried", {}).items():
                kinds[k] = kinds.get(k, 0) + n
        retried.append([v.label, json.dumps(kinds) if kinds else "-"])
    report.add(
        f"storm_{backend}",
        table(HEADERS, scenario_rows(groups))
        + "\n\nRatio = committed transfers per second / the fixed-order baseline of the same "
        "round. Retried, by kind:\n\n"
        + table(["variant", "retries by kind"], retried)
        + f"\n\nTotal balance conserved in every run: {'yes' if conserved else '**NO**'}.",
    )
    api = [v for v in variants if not v.ordered and v.connect_args is None]
    best = max(api, key=lambda v: statistics.median(per_variant[v.key]))
    default = statistics.median(per_variant["random"])
    best_ratio = statistics.median(per_variant[best.key])
    report.lines.append(
        Line(
            f"{title} deadlock storm",
            "random order retried by @transactional ≥ 0.8 × fixed order, balance conserved",
            f"defaults {fmt_ratio(per_variant['random'])}; best with the public API "
            f"({best.label}): {fmt_ratio(per_variant[best.key])}; balance conserved: "
            f"{'yes' if conserved else 'NO'}",
            best_ratio >= 0.8 and conserved,
        )
    )
    report.results[f"storm_{backend}_best"] = {
        "key": best.key,
        "label": best.label,
        "ratio": best_ratio,
        "default": default,
    }
    report.plots[f"{title} deadlock storm / fixed order"] = [
        (v.key, statistics.median(per_variant[v.key]), 0.8) for v in variants if v.key != "ordered"
    ]
    report.results[f"storm_{backend}"] = {k: [r.to_json() for r in v] for k, v in got.items()}


def overhead_section(report: Report, urls: dict[str, URL]) -> None:
    import overhead

    s = report.sizes
    targets = [("SQLite in memory", "sqlite://")]
    if "postgresql" in urls:
        targets.append(
            ("PostgreSQL (psycopg2)", urls["postgresql"].render_as_string(hide_password=False))
        )
    rows = []
    cache_rows = []
    for name, url in targets:
        progress(f"overhead: {name}, {s.overhead_rounds} fresh processes per mode")
        got = overhead.measure_execute(url, rounds=s.overhead_rounds, seconds=s.overhead_seconds)
        raw, ours, noop = got["raw"], got["locksafe"], got["noop"]
        ratio = ours["execute_us"] / raw["execute_us"]
        cpu_ratio = ours["execute_cpu_us"] / raw["execute_cpu_us"]

        def row(
            what: str,
            key: str,
            other: dict[str, Any] = ours,
            name: str = name,
            raw: dict[str, Any] = raw,
        ) -> None:
            rows.append(
                [
                    name,
                    what,
                    f"{raw[key]:.1f}",
                    f"{other[key]:.1f}",
                    f"{other[key] / raw[key]:.2f}×",
                ]
            )

        row("execute (built once), wall clock", "execute_us")
        row("execute (built once), client CPU", "execute_cpu_us")
        row(
            "execute, raw + no-op listeners on the same two events (SQLAlchemy's own "
            "event dispatch), client CPU",
            "execute_cpu_us",
            noop,
        )
        row("build + execute, wall clock", "build_execute_us")
        row("build alone", "build_us")
        hit_raw = overhead.cache_hit_rate(raw["cache"])
        hit_ours = overhead.cache_hit_rate(ours["cache"])
        cache_rows.append(
            [
                name,
                f"{hit_raw:.1%} ({json.dumps(raw['cache'])})",
                f"{hit_ours:.1%} ({json.dumps(ours['cache'])})",
                f"{raw['compiled_cache_entries']} / {ours['compiled_cache_entries']}",
            ]
        )
        if "hooks" in ours:
            report.add(
                "overhead_runs",
                f"{name}: locksafe's hooks called directly, µs per execute: "
                + ", ".join(f"{k} {v:.2f}" for k, v in ours["hooks"].items()),
            )
        runs = ", ".join(f"{x:.1f}" for x in ours["runs"])
        raw_runs = ", ".join(f"{x:.1f}" for x in raw["runs"])
        report.add(
            "overhead_runs",
            f"{name}: execute µs (wall) per fresh process, raw {raw_runs}; locksafe {runs}",
        )
        report.lines.append(
            Line(
                "Overhead",
                f"{name}: with_row_locks + execute ≤ 1.05 × with_for_update() + execute; "
                "cache hit rate unchanged",
                f"{ratio:.2f}× ({ours['execute_us']:.1f} vs {raw['execute_us']:.1f} µs wall; "
                f"client CPU {cpu_ratio:.2f}×); hit rate {hit_ours:.1%} vs {hit_raw:.1%}",
                ratio <= 1.05 and hit_ours >= hit_raw,
            )
        )
        report.plots.setdefault("Overhead: locksafe / raw (µs per call)", []).append(
            (f"{name.split(' ')[0]} execute", ratio, 1.05)
        )
        report.results[f"overhead_{name}"] = got
    report.add(
        "overhead",
        table(["database", "what", "raw µs", "locksafe µs", "ratio"], rows)
        + "\n\nSQLAlchemy's statement cache, over "
        f"{overhead.CACHE_CALLS} executions of statements built anew each time:\n\n"
        + table(
            [
                "database",
                "raw: hit rate",
                "locksafe: hit rate",
                "compiled-cache entries raw / locksafe",
            ],
            cache_rows,
        ),
    )
    progress("overhead: where with_row_locks' build time goes (cProfile)")
    profile = overhead.build_profile(targets[-1][1], calls=2000 if report.quick else 20000)
    report.add(
        "build_profile",
        table(["function (own time)", "share"], [[n, f"{v:.0%}"] for n, v in profile]),
    )


def classify_section(report: Report, urls: dict[str, URL], tmp: Path) -> None:
    import classify_cost

    progress("classify: provoking real lock errors on each driver")
    got = classify_cost.measure(
        urls, tmp, repeats=report.sizes.classify_repeats, target=report.sizes.classify_target
    )
    rows = []
    common = []
    for row in got["rows"]:
        rows.append(
            [
                row["driver"],
                row["error"],
                row["kind"],
                f"{row['classify_us']:.2f}",
                f"{row['walk_us']:.2f}",
                f"{row['baseline_us']:.2f}",
            ]
        )
        if row["common"]:
            common.append(row["classify_us"])
        if not row["right"]:
            report.broken.append(f"classify wrong: {row}")
    report.add(
        "classify",
        table(
            [
                "driver",
                "error",
                "classify →",
                "classify µs",
                "full walk µs (see below)",
                "naive check µs",
            ],
            rows,
        ),
    )
    report.add("classify_profile", got["profile_text"])
    worst = max(common) if common else math.nan
    report.lines.append(
        Line(
            "Overhead",
            "classify ≤ 2 µs per call on the common drivers",
            f"median {statistics.median(common):.2f} µs, worst {worst:.2f} µs "
            f"({len(common)} driver errors)",
            worst <= 2.0,
        )
    )
    report.plots.setdefault("Overhead: locksafe / raw (µs per call)", []).append(
        ("classify µs / 2 µs", statistics.median(common) / 2.0, 1.0)
    )
    report.results["classify"] = got["rows"]


# -- the report ---------------------------------------------------------------------------------


def plot(report: Report, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    panels = list(report.plots.items())
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (title, bars) in zip(axes.flat, panels, strict=False):
        names = [b[0] for b in bars]
        values = [b[1] for b in bars]
        colors = []
        for _, value, target in bars:
            if target is None:
                colors.append("#999999")
            elif (value >= target) != ("Overhead" in title):
                colors.append("#2e7d32")
            else:
                colors.append("#c62828")
        ax.barh(names, values, color=colors)
        for _, _, target in bars:
            if target is not None:
                ax.axvline(target, color="black", linestyle="--", linewidth=1)
        for i, value in enumerate(values):
            ax.text(value, i, f" {value:.2f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    mode = "--quick" if report.quick else "full"
    fig.suptitle(
        f"locksafe benchmarks ({mode} run, {report.machine.get('date', '')}): ratio to the "
        "baseline of the same run; dashed = target; green met, red not met",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(report: Report, path: Path, png: Path | None) -> None:
    m = report.machine
    s = report.sizes
    lines = [
        "# locksafe benchmarks",
        "",
        f"Produced by `python bench/run.py{' --quick' if report.quick else ''}` on {m['date']}"
        f" in {m['wall_s']:.0f} s; every figure below is from this one run. "
        f"{'A quick run (1 round, small sizes): indicative only. ' if report.quick else ''}"
        "Ratios are taken against the baseline measured in the same round; with several "
        "rounds the median is given, the range in brackets.",
        "",
        "## Machine",
        "",
        table(
            ["", ""],
            [
                ["CPU", f"{m['cpus']} cores ({m['cpu_model']})"],
                ["load average at start / end", f"{m['load_start']} / {m['load_end']}"],
                ["Python", m["python"]],
                ["SQLAlchemy", m["sqlalchemy"]],
                ["locksafe", f"{m['locksafe']} ({m['commit']})"],
                ["SQLite", m["sqlite"]],
                ["PostgreSQL", m.get("postgresql", "not run")],
                ["MariaDB", m.get("mariadb", "not run")],
                ["drivers", ", ".join(f"{k} {v}" for k, v in m["drivers"].items())],
                [
                    "sizes",
                    f"{s.rounds} round(s); SQLite {s.sqlite_total} transactions per "
                    f"16-writer run, A {s.sqlite_single}; readers {s.reader_seconds:g} s; queue "
                    f"{s.queue_single} / {s.queue_jobs} / {s.queue_plain} jobs; storm "
                    f"{s.storm_seconds:g} s per variant",
                ],
            ],
        ),
        "",
    ]
    if m.get("servers_note"):
        lines += [m["servers_note"], ""]
    if m.get("load_note"):
        lines += [m["load_note"], ""]
    lines += ["## Target lines", ""]
    lines.append(
        table(
            ["", "target", "this run", ""],
            [[ln.section, ln.target, ln.figure, ln.mark] for ln in report.lines],
        )
    )
    lines.append("")
    if report.broken:
        lines += ["**Invariants broken or scenarios failed:**", ""]
        lines += [f"- {b}" for b in report.broken] + [""]
    if png is not None:
        lines += [f"![ratios to the baselines]({png.name})", ""]
    text_of = report.sections
    blocks = [
        ("## SQLite: 16 writers on one file", ["sqlite", "sqlite_b"]),
        ("## SQLite: 16 readers beside 4 writers", ["readers"]),
        ("## PostgreSQL: SKIP LOCKED work queue", ["queue_postgresql"]),
        ("## MariaDB: SKIP LOCKED work queue", ["queue_mariadb"]),
        ("## PostgreSQL: deadlock storm", ["storm_postgresql"]),
        ("## MariaDB: deadlock storm", ["storm_mariadb"]),
        ("## Overhead: with_row_locks against with_for_update()", ["overhead", "overhead_runs"]),
        ("### Where the build time of with_row_locks goes", ["build_profile"]),
        ("## Overhead: classify", ["classify", "classify_profile"]),
    ]
    descriptions = descriptions_of()
    for heading, keys in blocks:
        if not any(k in text_of for k in keys):
            continue
        lines += [heading, ""]
        if heading in descriptions:
            lines += [descriptions[heading], ""]
        for key in keys:
            for chunk in text_of.get(key, []):
                lines += [chunk, ""]
    notes = HERE / "NOTES.md"
    if notes.exists() and not report.quick:
        lines += [notes.read_text().strip(), ""]
    path.write_text("\n".join(lines))


def descriptions_of() -> dict[str, str]:
    return {
        "## SQLite: 16 writers on one file": (
            "Each transaction reads the counter row with `with_row_locks`, inserts an event "
            "numbered after it and bumps the counter, in `@transactional(attempts=10)` on an "
            "engine set up by `locksafe.sqlite.configure()` (WAL, 30 s busy timeout, "
            '`begin="first_write"`), on a database file. A = the same, one writer alone. '
            "B = the same transaction as written without locksafe: stock pysqlite engine, "
            "`with_for_update()` (renders nothing on SQLite), `sessionmaker.begin()`, on a WAL "
            "file too. Latency is per call (retries included). Processes: one engine each, "
            "forked, released together by a barrier."
        ),
        "## SQLite: 16 readers beside 4 writers": (
            "16 reader threads (one process, pinned to CPU 0) run primary-key SELECTs, every "
            "other one on the counter row the writers update; then the same beside 4 writer "
            "processes (pinned to CPU 1) running the transaction above. Slowdown = readers' "
            "throughput alone / beside the writers (below 1: faster beside them). The target "
            "line is judged on the larger of the two slowdowns (vs alone, vs the control)."
        ),
        "## PostgreSQL: SKIP LOCKED work queue": (
            "A worker claims the first queued job with "
            "`with_row_locks(select(...).order_by(id).limit(1), session, skip_locked=True)` in "
            "`@transactional`, works 10 ms (sleep) holding it, marks it done (`claims + 1`) "
            "and commits. Workers are threads of one process. After each run: every job done, "
            "none with `claims > 1`, none returned to two workers. Plain FOR UPDATE is the "
            "same without SKIP LOCKED (an empty claim: the row it waited for was done; it looks "
            "again)."
        ),
        "## PostgreSQL: deadlock storm": (
            "8 threads, 8 accounts: a transfer locks one account (`with_row_locks`), sleeps "
            "2 ms, locks the other, moves money; `@transactional(attempts=1000, timeout=30)` "
            "retries. Fixed order: lower id first (no deadlocks; the baseline runs without "
            "the early bound). `@transactional`'s defaults include `early_lock_timeout=0.02`: "
            "on PostgreSQL every attempt but the last bounds its lock waits to 20 ms, doubled "
            "per attempt, so a deadlock ends as a lock timeout, retried, long before "
            "PostgreSQL's deadlock detector (deadlock_timeout = 1 s) runs. For contrast, "
            "without it (`early_lock_timeout=None`), and the user's own "
            "`locksafe.lock_timeout(session, …)` around the whole transfer or around the "
            "second lock only. The deadlock_timeout row is a server setting (superuser), shown "
            "for contrast only."
        ),
        "## MariaDB: deadlock storm": (
            "As on PostgreSQL; InnoDB detects deadlocks at once, so no lock_timeout variant "
            "(it is whole seconds there); a shorter backoff instead."
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, small sizes (< 2 min)")
    parser.add_argument("--out", type=Path, default=HERE, help="directory for the report")
    parser.add_argument(
        "--only",
        action="append",
        choices=("sqlite", "queue", "storm", "overhead", "classify"),
        help="run only these sections (repeatable)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    only = set(args.only or ("sqlite", "queue", "storm", "overhead", "classify"))
    # @transactional logs each retry as a warning: counted through on_retry, not printed.
    quiet = logging.getLogger("locksafe.transactions")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False

    began = time.monotonic()
    report = Report(sizes=sizes, quick=args.quick)
    load_start = load_average()
    report.machine.update(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        cpu_model=cpu_model(),
        load_start=" ".join(f"{x:.2f}" for x in load_start),
        python=platform.python_version(),
        sqlalchemy=sqlalchemy.__version__,
        locksafe=locksafe.__version__,
        commit=git_commit(),
        sqlite=sqlite3.sqlite_version,
        drivers=versions(),
    )
    progress(
        f"load average {report.machine['load_start']}; mode {'quick' if args.quick else 'full'}"
    )
    servers = Servers()
    failed = False
    try:
        if only & {"queue", "storm", "overhead", "classify"}:
            servers.start()
        import server_scenarios as ss

        for backend, url in servers.urls.items():
            report.machine[backend] = ss.server_version(url)
        if servers.problems:
            report.machine["servers_note"] = "Left out: " + "; ".join(
                f"{k} ({v})" for k, v in servers.problems.items()
            )
        with tempfile.TemporaryDirectory(prefix="locksafe-bench-") as tmp_name:
            tmp = Path(tmp_name)
            steps: list[tuple[str, Callable[[], None]]] = []
            if "sqlite" in only:
                steps.append(("sqlite", lambda: sqlite_section(report, tmp)))
            for backend, url in servers.urls.items():
                if "queue" in only:
                    steps.append(
                        (f"queue {backend}", lambda b=backend, u=url: queue_section(report, b, u))
                    )
            for backend, url in servers.urls.items():
                if "storm" in only:
                    steps.append(
                        (f"storm {backend}", lambda b=backend, u=url: storm_section(report, b, u))
                    )
            if "overhead" in only:
                steps.append(("overhead", lambda: overhead_section(report, servers.urls)))
            if "classify" in only:
                steps.append(("classify", lambda: classify_section(report, servers.urls, tmp)))
            for name, step in steps:
                try:
                    step()
                except Exception as exc:
                    failed = True
                    report.broken.append(f"{name}: the scenario failed to run: {exc!r}")
                    progress(f"{name} FAILED: {exc!r}")
                    import traceback

                    traceback.print_exc()
    finally:
        servers.stop()
    load_end = load_average()
    report.machine["load_end"] = " ".join(f"{x:.2f}" for x in load_end)
    report.machine["wall_s"] = time.monotonic() - began
    if max(load_start[0], load_end[0]) >= 1.5:
        report.machine["load_note"] = (
            f"The machine was shared and busy (1-minute load average {load_start[0]:.2f} at "
            f"start, {load_end[0]:.2f} at the end, on {report.machine['cpus']} cores): "
            "absolute figures are lower than on an idle machine, and ratios noisier."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "report.png"
    drew = plot(report, png)
    write_report(report, args.out / "REPORT.md", png if drew else None)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "machine": report.machine,
                "results": report.results,
                "lines": [ln.__dict__ for ln in report.lines],
                "broken": report.broken,
            },
            indent=1,
            default=str,
        )
    )
    progress(f"done in {time.monotonic() - began:.0f} s: {args.out / 'REPORT.md'}")
    for ln in report.lines:
        print(f"{ln.mark.strip('*'):>12}  {ln.section}: {ln.target}: {ln.figure}")
    if report.broken:
        print("BROKEN:", *report.broken, sep="\n  ")
    return 1 if failed or report.broken else 0


if __name__ == "__main__":
    sys.exit(main())
