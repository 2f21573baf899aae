"""locksafe in one minute: a counter that 8 threads increment on SQLite, without losing updates.

Run it:  python examples/quickstart.py
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from pathlib import Path

from sqlalchemy import ForeignKey, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import locksafe
import locksafe.sqlite


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counter"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int]


class Event(Base):
    __tablename__ = "event"
    id: Mapped[int] = mapped_column(primary_key=True)
    counter_id: Mapped[int] = mapped_column(ForeignKey("counter.id"))


def main() -> None:
    path = Path(tempfile.mkdtemp()) / "quickstart.db"
    engine = create_engine(f"sqlite:///{path}")
    locksafe.sqlite.configure(engine, busy_timeout=10)  # WAL, busy timeout, real BEGIN
    Base.metadata.create_all(engine)
    Session_ = sessionmaker(engine)
    with Session_.begin() as session:
        session.add(Counter(id=1, value=0))

    # One atomic transaction per call, retried on lock errors (deadlock, busy database...).
    @locksafe.transactional(attempts=10, sessionmaker=Session_)
    def increment(*, session: Session) -> int:
        # SQLAlchemy renders nothing for FOR UPDATE on SQLite; locksafe takes the database
        # write lock before this SELECT instead, so no other writer can slip in between.
        stmt = locksafe.with_row_locks(select(Counter).where(Counter.id == 1), session)
        counter = session.execute(stmt).scalar_one()
        counter.value += 1
        session.add(Event(counter_id=counter.id))
        return counter.value

    def worker() -> None:
        for _ in range(25):
            increment()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with Session_() as session:
        value = session.get(Counter, 1).value  # type: ignore[union-attr]
        events = session.query(Event).count()
    print(f"counter = {value}, events = {events} (expected 200 and 200)")

    print("plan:", locksafe.plan_row_locks(engine, nowait=True).describe())
    print("capabilities:", locksafe.lock_capabilities(engine).summary)

    # The classifier reads the driver's own error code, for every driver.
    busy = sqlite3.OperationalError("database is locked")
    retryable = locksafe.is_retryable_lock_error(busy)
    print("classify:", locksafe.classify(busy), "| retryable:", retryable)


if __name__ == "__main__":
    main()
