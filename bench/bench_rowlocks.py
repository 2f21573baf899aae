"""What with_row_locks costs, against plain SQLAlchemy measured in the same run.

    python bench/bench_rowlocks.py

Rows (median of several repeats, µs per call; ratio = row / its baseline):

- build: ``with_row_locks(stmt, engine)`` vs ``stmt.with_for_update()`` (PostgreSQL dialect);
- hooks on unrelated statements: executing a plain SELECT on SQLite with locksafe's two engine
  event hooks installed vs removed — the price every other statement of an app pays;
- SQLite locked read: executing ``with_row_locks(select)`` (write lock first) and committing vs
  the same ``select().with_for_update()``, which SQLAlchemy runs unlocked on SQLite;
- planning at execution: a statement built without a bind, executed (planned per connection,
  cached on the statement) vs one planned at call time.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, insert, select
from sqlalchemy.engine import Engine

import locksafe
from locksafe import rowlocks

REPEATS = 7


def per_call_us(fn: Callable[[], object], number: int) -> float:
    timer = timeit.Timer(fn)
    timer.timeit(max(1, number // 10))  # warm up (compiled cache, plans)
    runs = timer.repeat(repeat=REPEATS, number=number)
    return statistics.median(runs) / number * 1e6


def main() -> int:
    metadata = MetaData()
    jobs = Table("jobs", metadata, Column("id", Integer, primary_key=True), Column("v", Integer))
    stmt = select(jobs).where(jobs.c.id == 1)

    results: list[tuple[str, float, float]] = []

    # build cost, no database
    pg = create_engine("postgresql+psycopg2://bench@127.0.0.1/bench")
    pg.dialect.server_version_info = (15, 0)
    base = per_call_us(lambda: stmt.with_for_update(nowait=True), 20000)
    mine = per_call_us(lambda: locksafe.with_row_locks(stmt, pg, nowait=True), 20000)
    results.append(("build: with_row_locks vs with_for_update", base, mine))

    path = Path(tempfile.mkdtemp()) / "bench.db"
    engine = create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(jobs), [{"id": i, "v": 0} for i in range(1, 11)])

    connection = engine.connect()  # a persistent connection: only the statement is timed

    def plain_select() -> None:
        connection.execute(stmt).all()

    rowlocks._install_hooks()
    with_hooks = per_call_us(plain_select, 5000)
    event.remove(Engine, "before_execute", rowlocks._before_execute)
    event.remove(Engine, "before_cursor_execute", rowlocks._before_cursor_execute)
    rowlocks._installed = False
    without_hooks = per_call_us(plain_select, 5000)
    rowlocks._install_hooks()
    results.append(("hooks: plain SELECT, hooks on vs off", without_hooks, with_hooks))
    connection.close()

    unlocked = stmt.with_for_update()

    def run(statement: object) -> Callable[[], None]:
        def go() -> None:
            with engine.begin() as conn:
                conn.execute(statement).all()  # type: ignore[call-overload]

        return go

    locked = locksafe.with_row_locks(stmt, engine)
    base = per_call_us(run(unlocked), 2000)
    mine = per_call_us(run(locked), 2000)
    results.append(("SQLite: locked read+commit vs unlocked", base, mine))

    deferred = locksafe.with_row_locks(stmt)
    base = per_call_us(run(locked), 2000)
    mine = per_call_us(run(deferred), 2000)
    results.append(("SQLite: planned at execution vs at call", base, mine))

    width = max(len(name) for name, _, _ in results)
    print(f"{'benchmark':<{width}}  baseline µs  locksafe µs  ratio")
    for name, baseline, value in results:
        print(f"{name:<{width}}  {baseline:11.2f}  {value:11.2f}  {value / baseline:5.2f}x")
    print(f"python {sys.version.split()[0]}, SQLAlchemy {__import__('sqlalchemy').__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
