"""What with_row_locks costs, against plain SQLAlchemy measured in the same run.

    python bench/bench_rowlocks.py

Rows (median of several repeats, µs per call; ratio = measured / baseline):

- build: ``with_row_locks(stmt, engine)`` vs ``stmt.with_for_update()`` (PostgreSQL dialect);
- unlocked SELECT: what every *other* statement of an application pays once locksafe is in
  the process. The same plain SELECT on SQLite, over one persistent connection, each mode in a
  fresh Python process (SQLAlchemy never resets ``Engine._has_events`` once any connection
  event listener was added, even after ``event.remove``, so an earlier mode would leak into a
  later one), the modes interleaved over several rounds:

  - ``plain``: SQLAlchemy alone, locksafe never imported;
  - ``imported``: ``import locksafe`` (its ``handle_error`` listener, nothing else);
  - ``noop``: SQLAlchemy alone with no-op listeners on the two events locksafe's row locks use
    (``before_execute``, ``before_cursor_execute``): the price of SQLAlchemy's event machinery
    itself, which any listener switches on for every engine;
  - ``hooks``: locksafe's row-lock hooks, installed by a first ``with_row_locks()`` call.

  ``hooks`` vs ``noop`` is locksafe's own share; ``noop`` vs ``plain`` is SQLAlchemy's. And
  locksafe's two hook functions called directly vs no-op functions: its own work, without
  SQLAlchemy's dispatch or a process's noise;
- SQLite locked read: executing ``with_row_locks(select)`` (write lock first) and committing vs
  the same ``select().with_for_update()``, which SQLAlchemy runs unlocked on SQLite;
- planning at execution: a statement built without a bind, executed (planned per server, once)
  vs one planned at call time.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, insert, select
from sqlalchemy.engine import Engine

REPEATS = 7
#: Fresh processes per hot-path mode (interleaved, so that drift on a busy machine is shared).
ROUNDS = 5
HOT_PATH_MODES = ("plain", "imported", "noop", "hooks")

metadata = MetaData()
jobs = Table("jobs", metadata, Column("id", Integer, primary_key=True), Column("v", Integer))
STMT = select(jobs).where(jobs.c.id == 1)


def per_call_us(fn: Callable[[], object], number: int) -> float:
    timer = timeit.Timer(fn)
    timer.timeit(max(1, number // 10))  # warm up (compiled cache, plans)
    runs = timer.repeat(repeat=REPEATS, number=number)
    return statistics.median(runs) / number * 1e6


def hot_path_child(mode: str, path: str) -> float:
    """One hot-path mode, in this (fresh) process: µs per execution of STMT."""
    if mode == "noop":
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        def before_execute(
            conn: object, elem: object, multi: object, params: object, options: object
        ) -> tuple[object, object, object]:
            return elem, multi, params

        def before_cursor_execute(
            conn: object,
            cursor: object,
            statement: str,
            parameters: object,
            context: object,
            executemany: bool,
        ) -> tuple[str, object]:
            return statement, parameters

        event.listen(Engine, "before_execute", before_execute, retval=True)
        event.listen(Engine, "before_cursor_execute", before_cursor_execute, retval=True)
    elif mode in ("imported", "hooks"):
        import locksafe

        if mode == "hooks":
            locksafe.with_row_locks(select(jobs))  # any call installs the hooks
    elif mode != "plain":
        raise SystemExit(f"unknown mode {mode!r}")
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as connection:  # persistent: only the statement is timed

        def plain_select() -> None:
            connection.execute(STMT).all()

        return per_call_us(plain_select, 3000)


def hot_path(path: Path) -> dict[str, float]:
    """Each mode's median over ROUNDS fresh processes."""
    seen: dict[str, list[float]] = {mode: [] for mode in HOT_PATH_MODES}
    for round_ in range(ROUNDS):
        order = HOT_PATH_MODES[round_ % 4 :] + HOT_PATH_MODES[: round_ % 4]
        for mode in order:
            out = subprocess.run(
                [sys.executable, __file__, "--hot-path", mode, str(path)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            seen[mode].append(float(out))
    return {mode: statistics.median(values) for mode, values in seen.items()}


def hook_functions(engine: Engine) -> tuple[float, float]:
    """locksafe's two hook functions called directly with what SQLAlchemy hands them for an
    unlocked SELECT, vs no-op functions of the same signatures: locksafe's own work."""
    from locksafe import rowlocks

    seen: dict[str, Any] = {}

    def grab(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any) -> None:
        seen.update(cursor=cursor, statement=statement, params=params, context=context)

    event.listen(engine, "after_cursor_execute", grab)
    with engine.connect() as conn:
        conn.execute(STMT).all()
        event.remove(engine, "after_cursor_execute", grab)
        cursor, sql, params, context = (
            seen[k] for k in ("cursor", "statement", "params", "context")
        )

        def noop_execute(*args: Any) -> Any:
            return args[1], args[2], args[3]

        def noop_cursor_execute(*args: Any) -> Any:
            return args[2], args[3]

        def noop() -> None:
            noop_execute(conn, STMT, (), {}, {})
            noop_cursor_execute(conn, cursor, sql, params, context, False)

        def locksafe_hooks() -> None:
            rowlocks._before_execute(conn, STMT, (), {}, {})
            rowlocks._before_cursor_execute(conn, cursor, sql, params, context, False)

        return per_call_us(noop, 200000), per_call_us(locksafe_hooks, 200000)


def main() -> int:
    import locksafe

    results: list[tuple[str, float, float]] = []

    # build cost, no database
    pg = create_engine("postgresql+psycopg2://bench@127.0.0.1/bench")
    pg.dialect.server_version_info = (15, 0)
    base = per_call_us(lambda: STMT.with_for_update(nowait=True), 20000)
    mine = per_call_us(lambda: locksafe.with_row_locks(STMT, pg, nowait=True), 20000)
    results.append(("build: with_row_locks vs with_for_update", base, mine))

    path = Path(tempfile.mkdtemp()) / "bench.db"
    engine = create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(jobs), [{"id": i, "v": 0} for i in range(1, 11)])

    hot = hot_path(path)
    for mode, label in (
        ("imported", "unlocked SELECT: locksafe imported vs plain"),
        ("noop", "unlocked SELECT: no-op listeners vs plain"),
        ("hooks", "unlocked SELECT: row-lock hooks vs plain"),
    ):
        results.append((label, hot["plain"], hot[mode]))
    results.append(("unlocked SELECT: row-lock hooks vs no-op", hot["noop"], hot["hooks"]))

    results.append(("unlocked SELECT: hook functions, called", *hook_functions(engine)))

    unlocked = STMT.with_for_update()

    def run(statement: object) -> Callable[[], None]:
        def go() -> None:
            with engine.begin() as conn:
                conn.execute(statement).all()  # type: ignore[call-overload]

        return go

    locked = locksafe.with_row_locks(STMT, engine)
    base = per_call_us(run(unlocked), 2000)
    mine = per_call_us(run(locked), 2000)
    results.append(("SQLite: locked read+commit vs unlocked", base, mine))

    deferred = locksafe.with_row_locks(STMT)
    base = per_call_us(run(locked), 2000)
    mine = per_call_us(run(deferred), 2000)
    results.append(("SQLite: planned at execution vs at call", base, mine))

    width = max(len(name) for name, _, _ in results)
    print(f"{'benchmark':<{width}}  baseline µs  measured µs  ratio")
    for name, baseline, value in results:
        print(f"{name:<{width}}  {baseline:11.2f}  {value:11.2f}  {value / baseline:5.2f}x")
    print(f"python {sys.version.split()[0]}, SQLAlchemy {__import__('sqlalchemy').__version__}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--hot-path":
        print(hot_path_child(sys.argv[2], sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
