"""What one ``locksafe.classify`` call costs per driver, and where the time goes.

The errors are real: provoked on the throw-away servers and on a busy SQLite file
(``bench_classify.py``'s provocation). For each one:

- ``classify``: the library as it is — for the shapes nearly every lock error has (SQLAlchemy's
  ``DBAPIError`` around a driver exception with a code, or the driver exception itself) it
  answers directly, and remembers the ``refine`` step's answer (message parsing) by its inputs;
- ``full walk``: the same answer through the general path (the walk of the exception graph,
  ``orig`` / ``__cause__`` / ``__context__``, with the driver lookup per node), which
  ``classify`` takes for any other shape; checked to agree with ``classify`` on every sample;
- the naive check of ``bench_classify.py`` (Airflow's ``is_lock_not_available_error``).

And a breakdown of the full walk on the common drivers, timed step by step: the graph walk, the
driver lookup per node, reading the code, the ``refine`` step (message parsing on
PostgreSQL 55P03 and MySQL) when it is not remembered.
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
from locksafe.classify import _LINKS, _driver_of, _walk, _walk_and_classify
from locksafe.dialects import ErrorContext

#: The drivers the target line is about (SQLAlchemy's defaults and the most used).
COMMON = {
    "sqlite+pysqlite",
    "postgresql+psycopg2",
    "postgresql+psycopg",
    "postgresql+asyncpg",
    "mysql+pymysql",
    "mysql+mysqldb",
}


def full_walk(exc: object) -> Any:
    """``classify``'s general path, for any shape of exception graph."""
    return _walk_and_classify(exc, _LINKS)


STEP_NAMES = {
    "walk": "walk the graph (orig, __cause__, __context__)",
    "lookup": "driver lookup per node",
    "read": "read the code",
    "refine": "refine, not remembered (ErrorContext, str(exc), message)",
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
        walked = full_walk(sample.exc)
        rows.append(
            {
                "driver": sample.driver,
                "error": sample.error,
                "kind": str(ours),
                "right": ours is sample.expected and walked is ours,
                "common": sample.driver in COMMON,
                "classify_us": _us(lambda s=sample: classify_fn(s.exc), repeats, target),
                "walk_us": _us(lambda s=sample: full_walk(s.exc), repeats, target),
                "baseline_us": _us(
                    lambda s=sample: bc.baseline_is_lock_not_available_error(s.exc),
                    repeats,
                    target,
                ),
            }
        )
    # the breakdown, on the common drivers
    lines = [
        "Breakdown of the full walk (µs, the fastest run), each step timed alone; what "
        "`walk total` has beyond their sum is the loop over the nodes, the `try` blocks and "
        "the calls between the steps. `classify` takes none of these steps for the errors "
        "above but reading the code (and the driver lookup of `orig`, remembered per class):",
        "",
        "| driver | nodes | "
        + " | ".join(STEP_NAMES.values())
        + " | sum | walk total | classify |",
        "|" + " --- |" * (len(STEP_NAMES) + 5),
    ]
    for sample in samples:
        if sample.driver not in COMMON:
            continue
        timed = {key: _us(fn, repeats, target) for key, fn in _steps(sample.exc).items()}
        total = _us(lambda s=sample: full_walk(s.exc), repeats, target)
        ours = _us(lambda s=sample: classify_fn(s.exc), repeats, target)
        nodes = len(_walk(sample.exc, _LINKS))
        cells = [f"{timed[k]:.2f}" if k in timed else "-" for k in STEP_NAMES]
        lines.append(
            f"| {sample.driver} | {nodes} | "
            + " | ".join(cells)
            + f" | {sum(timed.values()):.2f} | {total:.2f} | {ours:.2f} |"
        )
    lines.append("")
    lines.append(
        "The full walk answers exactly what `classify` answers on every sample above (checked "
        "in this run)."
    )
    return {
        "rows": rows,
        "profile_text": "\n".join(lines),
        "version": locksafe.__version__,
    }
