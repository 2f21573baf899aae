"""A small multi-process application on one SQLite file, written the way real applications are
(issue 8's second application, reproduced in shape): worker processes, a per-session
``PRAGMA busy_timeout`` as each session's first statement, a multi-step call whose steps commit
in their own sessions (an audit row committed by a nested session while the outer session has
read and will write), and no retry of "database is locked" anywhere — every writer relies on
the busy timeout to wait. Run by tests/test_sqlite_app_shapes.py in a process pool
(spawned workers import it as ``harness.apps.shapes``)."""

from __future__ import annotations

import random
import time
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, select

metadata = MetaData()
stock = Table(
    "app_stock",
    metadata,
    Column("item", Integer, primary_key=True, autoincrement=False),
    Column("left", Integer, nullable=False),
)
orders = Table(
    "app_orders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("item", Integer, nullable=False),
    Column("worker", Integer, nullable=False),
)
audit = Table(
    "app_audit",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("what", String(40), nullable=False),
    Column("order_key", String(40), nullable=False),
)


def create(url: str, items: int, per_item: int) -> None:
    engine = create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode = wal")
        conn.execute(stock.insert(), [{"item": i, "left": per_item} for i in range(items)])
    engine.dispose()


def worker(
    url: str, configured: str | None, worker_id: int, calls: int, items: int
) -> dict[str, Any]:
    """``calls`` multi-step calls: read the stock, audit "requested" in a session of its own
    (committed), then take one unit and record the order. Returns counts of what happened."""
    from sqlalchemy.orm import Session

    engine = create_engine(url)
    if configured is not None:
        import locksafe.sqlite

        locksafe.sqlite.configure(engine, begin=configured)  # type: ignore[arg-type]

    def session() -> Session:
        s = Session(engine)
        s.connection().exec_driver_sql("PRAGMA busy_timeout = 10000")  # the app's own set-up
        return s

    rng = random.Random(worker_id)
    done = errors = sold_out = 0
    messages: list[str] = []
    for call in range(calls):
        item = rng.randrange(items)
        key = f"{worker_id}-{call}"
        outer = session()
        try:
            left = outer.execute(select(stock.c.left).where(stock.c.item == item)).scalar_one()
            with session() as nested:  # step 1, committed on its own
                nested.execute(audit.insert().values(what="requested", order_key=key))
                nested.commit()
            if left <= 0:
                sold_out += 1
                outer.rollback()
                continue
            # step 2: the decrement is guarded by the row itself (no lost update without locks)
            taken = outer.execute(
                stock.update()
                .where(stock.c.item == item, stock.c.left > 0)
                .values(left=stock.c.left - 1)
            ).rowcount
            if taken:
                outer.execute(orders.insert().values(item=item, worker=worker_id))
                outer.execute(audit.insert().values(what="ordered", order_key=key))
            outer.commit()
            if taken:
                done += 1
            else:
                sold_out += 1
        except Exception as error:  # an app that does not retry: the call failed
            outer.rollback()
            errors += 1
            messages.append(f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
        finally:
            outer.close()
        time.sleep(rng.random() * 0.002)
    engine.dispose()
    return {"done": done, "errors": errors, "sold_out": sold_out, "messages": messages[:5]}


def invariants(url: str, per_item: int) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        sold = conn.execute(select(func.count()).select_from(orders)).scalar_one()
        left = conn.execute(select(func.sum(stock.c.left))).scalar_one()
        items = conn.execute(select(func.count()).select_from(stock)).scalar_one()
        ordered = conn.execute(
            select(func.count()).select_from(audit).where(audit.c.what == "ordered")
        ).scalar_one()
        negative = conn.execute(
            select(func.count()).select_from(stock).where(stock.c.left < 0)
        ).scalar_one()
    engine.dispose()
    return {
        "sold": int(sold),
        "conserved": int(sold + left == items * per_item),
        "orders_without_audit": int(sold - ordered),
        "negative_stock": int(negative),
    }
