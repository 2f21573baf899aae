"""What one ``locksafe.classify`` call costs per driver, where the time goes, and the floor.

The errors are real: provoked on the throw-away servers and on a busy SQLite file
(``bench_classify.py``'s provocation). For each one:

- ``classify``: the library as it is;
- ``floor``: a prototype (here, not in the library) of a fast path for the case that is nearly
  always the one met: a SQLAlchemy ``DBAPIError`` whose ``.orig`` is the driver's exception with
  a code. It reads that code first, with the same tables, and remembers the ``refine`` step's
  answer by (code, message, statement) — a pure function of them, and a server repeats the
  same message for the same table — and falls back to the full walk for anything else, so it
  answers exactly what ``classify`` answers (checked on every sample);
- the naive check of ``bench_classify.py`` (Airflow's ``is_lock_not_available_error``).

And a breakdown of one call on the common drivers, timed step by step: the graph walk, the
driver lookup per node, reading the code, the ``refine`` step (message parsing on
PostgreSQL 55P03 and MySQL), the ``try``/dispatch around them.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

import bench_classify as bc
import locksafe
from locksafe import classify as classify_fn
from locksafe.classify import (  # the pieces the prototype reuses, unchanged
    _LINKS,
    _classify,
    _driver_of,
    _walk,
)
from locksafe.dialects import ErrorContext
from locksafe.kinds import LockErrorKind, LockUnavailable

#: The drivers the target line is about (SQLAlchemy's defaults and the most used).
COMMON = {
    "sqlite+pysqlite",
    "postgresql+psycopg2",
    "postgresql+psycopg",
    "postgresql+asyncpg",
    "mysql+pymysql",
    "mysql+mysqldb",
}


_refined: dict[tuple[Any, str, str | None], LockErrorKind | None] = {}


def floor(exc: object) -> LockErrorKind | None:
    """The prototype fast path (see the module's docstring); same answers as classify."""
    try:
        orig = getattr(exc, "orig", None)
        if (
            orig is not None
            and type(exc) is not LockUnavailable
            and _driver_of(type(exc)) is None
            and isinstance(exc, Exception)
        ):
            match = _driver_of(type(orig))
            if match is not None:
                support, driver = match
                code = driver.read_code(orig)
                if code is not None:
                    table = support.errors
                    kind = table.codes.get(code)
                    if table.refine is None:
                        return kind
                    statement = getattr(exc, "statement", None)
                    if not isinstance(statement, str):
                        statement = None
                    key = (code, str(orig), statement)
                    try:
                        return _refined[key]
                    except KeyError:
                        pass
                    if len(_refined) >= 1024:
                        _refined.clear()
                    found = table.refine(ErrorContext(code, kind, key[1], statement))
                    _refined[key] = found
                    return found
        return _classify(exc, _LINKS)
    except Exception:
        return classify_fn(exc)


STEP_NAMES = {
    "walk": "walk the graph (orig, __cause__, __context__)",
    "lookup": "driver lookup per node",
    "read": "read the code",
    "refine": "refine (ErrorContext, str(exc), message)",
}


def _steps(exc: BaseException) -> dict[str, Callable[[], object]]:
    """The steps of one classify call on ``exc``, each callable alone."""
    nodes = _walk(exc, _LINKS)
    steps: dict[str, Callable[[], object]] = {
        "walk": lambda: _walk(exc, _LINKS),
        "lookup": lambda: [_driver_of(type(n)) for n in nodes],
    }
    found = next(
        (
            (node, match, code)
            for node in nodes
            if (match := _driver_of(type(node))) is not None
            and (code := match[1].read_code(node)) is not None
        ),
        None,
    )
    if found is None:
        return steps
    node, (support, driver), code = found
    steps["read"] = lambda: driver.read_code(node)
    table = support.errors
    refine = table.refine
    if refine is not None:
        kind = table.codes.get(code)
        statement = getattr(exc, "statement", None)
        steps["refine"] = lambda: refine(ErrorContext(code, kind, str(node), statement))
    return steps


def _us(fn: Callable[[], object], repeats: int, target: float) -> float:
    """µs per call: calls per run calibrated to ``target`` seconds, the fastest of ``repeats``
    runs (on a shared machine the slower ones measure the neighbours too)."""
    timer = timeit.Timer(fn)
    number = 1
    while True:
        took = timer.timeit(number)
        if took >= target / 4 or number >= 1 << 22:
            break
        number *= 2
    number = max(1, int(number * target / max(took, 1e-9)))
    return min(timer.repeat(repeat=repeats, number=number)) / number * 1e6


def measure(urls: dict[str, URL], tmp: Path, *, repeats: int, target: float) -> dict[str, Any]:
    samples: list[bc.Sample] = []
    samples += bc.sqlite_samples(tmp)
    if "postgresql" in urls:
        samples += bc.postgresql_samples(urls["postgresql"])
    if "mariadb" in urls:
        samples += bc.mariadb_samples(urls["mariadb"])
    samples += bc.mysql8_samples()
    samples += bc.other_samples()
    rows = []
    for sample in samples:
        ours = classify_fn(sample.exc)
        fast = floor(sample.exc)
        rows.append(
            {
                "driver": sample.driver,
                "error": sample.error,
                "kind": str(ours),
                "right": ours is sample.expected and fast is ours,
                "common": sample.driver in COMMON,
                "classify_us": _us(lambda s=sample: classify_fn(s.exc), repeats, target),
                "floor_us": _us(lambda s=sample: floor(s.exc), repeats, target),
                "baseline_us": _us(
                    lambda s=sample: bc.baseline_is_lock_not_available_error(s.exc),
                    repeats,
                    target,
                ),
            }
        )
    # the breakdown, on the common drivers
    lines = [
        "Breakdown of one `classify` call (µs, median), each step timed alone; what `total` "
        "has beyond their sum is the loop over the nodes, the `try` blocks and the calls "
        "between the steps:",
        "",
        "| driver | nodes | " + " | ".join(STEP_NAMES.values()) + " | sum | total |",
        "|" + " --- |" * (len(STEP_NAMES) + 4),
    ]
    for sample in samples:
        if sample.driver not in COMMON:
            continue
        timed = {key: _us(fn, repeats, target) for key, fn in _steps(sample.exc).items()}
        total = _us(lambda s=sample: classify_fn(s.exc), repeats, target)
        nodes = len(_walk(sample.exc, _LINKS))
        cells = [f"{timed[k]:.2f}" if k in timed else "-" for k in STEP_NAMES]
        lines.append(
            f"| {sample.driver} | {nodes} | "
            + " | ".join(cells)
            + f" | {sum(timed.values()):.2f} | {total:.2f} |"
        )
    lines.append("")
    lines.append(
        "`floor` answers exactly what `classify` answers on every sample above (checked in "
        "this run); it reads `exc.orig` first and walks the graph only when that decides "
        "nothing."
    )
    return {
        "rows": rows,
        "profile_text": "\n".join(lines),
        "version": locksafe.__version__,
    }
