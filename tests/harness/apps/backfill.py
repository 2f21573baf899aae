"""A small FastAPI app modelled on Airflow's backfill creation, for the issue-5 scenario.

``create_app(engine, naive=...)`` builds ``POST /backfills`` with ``{"dag_id": ..., "runs": N}``:
one ``Backfill`` row and its ``N`` child ``DagRun`` rows, or 409 when the DAG already has an
active backfill.

- ``naive=True`` is what Airflow does today (``airflow.models.backfill._create_backfill``): it
  counts the active backfills, inserts the backfill and COMMITs, then creates the runs one by
  one and commits at the end; no row lock around the check-then-insert, no retry, no error
  handlers — any database error is a 500, and a failure after the first COMMIT leaves a
  backfill without its runs (which then answers every later request with 409).
- ``naive=False`` is the fix: the whole creation is one transaction run by
  ``@locksafe.transactional`` (retried on lock errors with backoff), the check-then-insert is
  guarded by ``locksafe.with_row_locks`` on the DAG's row, and
  ``locksafe.starlette.install_lock_error_handlers`` answers a lock failure that outlived the
  retries with 503 + ``Retry-After``.

The module also holds what the background writers do in one step (:func:`scheduler_step`,
:func:`dag_processor_step`) and the invariant queries (:func:`check_invariants`), so that the
test drives them in threads against the same tables.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    func,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import locksafe
from locksafe.starlette import install_lock_error_handlers

UNFINISHED = ("queued", "running")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Dag(Base):
    __tablename__ = "bf_dag"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    is_paused: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_parsed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_scheduled_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    parse_count: Mapped[int] = mapped_column(Integer, default=0)
    schedule_count: Mapped[int] = mapped_column(Integer, default=0)


class Backfill(Base):
    __tablename__ = "bf_backfill"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dag_id: Mapped[str] = mapped_column(String(64), ForeignKey("bf_dag.id"), index=True)
    # Airflow derives the number of runs from from_date/to_date; stored here so that the
    # invariant "every backfill has all its runs" can be checked.
    requested_runs: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class DagRun(Base):
    __tablename__ = "bf_dag_run"
    __table_args__ = (UniqueConstraint("dag_id", "run_id", name="bf_dag_run_dag_id_run_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dag_id: Mapped[str] = mapped_column(String(64), ForeignKey("bf_dag.id"))
    backfill_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("bf_backfill.id"), nullable=True, index=True
    )
    run_id: Mapped[str] = mapped_column(String(120))
    state: Mapped[str] = mapped_column(String(20), default="queued")


metadata = Base.metadata


def seed_dags(engine: Engine, dag_ids: list[str]) -> None:
    with Session(engine) as session, session.begin():
        session.add_all(Dag(id=dag_id, updated_at=utcnow()) for dag_id in dag_ids)


class BackfillIn(BaseModel):
    dag_id: str = Field(max_length=64)
    runs: int = Field(ge=1, le=500)


def _already_running(dag_id: str) -> HTTPException:
    return HTTPException(409, f"There is already a running backfill for dag {dag_id}")


def _new_runs(dag_id: str, backfill_id: int, count: int) -> list[DagRun]:
    return [
        DagRun(
            dag_id=dag_id,
            backfill_id=backfill_id,
            run_id=f"backfill__{backfill_id}__{index:04d}",
            state="queued",
        )
        for index in range(count)
    ]


@dataclass
class AppStats:
    """What the app saw, for the test's summary (retries are counted by ``on_retry``)."""

    retries: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_retry(self, details: locksafe.RetryDetails) -> None:
        with self.lock:
            self.retries[details.kind.value] += 1


def create_app(
    engine: Engine,
    *,
    naive: bool,
    attempts: int = 5,
    timeout: float = 15.0,
    wait_initial: float = 0.02,
    wait_max: float = 0.5,
) -> FastAPI:
    """The backfill API on ``engine``; ``app.state.stats`` is an :class:`AppStats`."""
    app = FastAPI()
    stats = AppStats()
    app.state.stats = stats
    make_session = sessionmaker(engine, expire_on_commit=False)

    if naive:

        @app.post("/backfills", status_code=201)
        def create_backfill_naive(body: BackfillIn) -> dict[str, Any]:
            # Airflow 3's _create_backfill, reduced to its transaction structure.
            with make_session() as session:
                if session.get(Dag, body.dag_id) is None:
                    raise HTTPException(404, f"no dag {body.dag_id}")
                num_active = session.scalar(
                    select(func.count())
                    .select_from(Backfill)
                    .where(Backfill.dag_id == body.dag_id, Backfill.completed_at.is_(None))
                )
                if num_active:
                    raise _already_running(body.dag_id)
                backfill = Backfill(
                    dag_id=body.dag_id, requested_runs=body.runs, created_at=utcnow()
                )
                session.add(backfill)
                session.commit()  # the backfill is visible before any of its runs
                for run in _new_runs(body.dag_id, backfill.id, body.runs):
                    session.add(run)
                    session.flush()  # one run at a time, as Airflow creates them
                session.commit()
                return {"id": backfill.id, "dag_id": body.dag_id, "runs": body.runs}

        return app

    @locksafe.transactional(
        attempts=attempts,
        timeout=timeout,
        sessionmaker=make_session,
        on_retry=stats.on_retry,
        wait_initial=wait_initial,
        wait_max=wait_max,
    )
    def create_backfill(
        dag_id: str, runs: int, *, session: Session = locksafe.NEW_SESSION
    ) -> dict[str, Any]:
        dag = session.scalar(locksafe.with_row_locks(select(Dag).where(Dag.id == dag_id), session))
        if dag is None:
            raise HTTPException(404, f"no dag {dag_id}")
        num_active = session.scalar(
            select(func.count())
            .select_from(Backfill)
            .where(Backfill.dag_id == dag_id, Backfill.completed_at.is_(None))
        )
        if num_active:
            raise _already_running(dag_id)
        backfill = Backfill(dag_id=dag_id, requested_runs=runs, created_at=utcnow())
        session.add(backfill)
        session.flush()
        session.add_all(_new_runs(dag_id, backfill.id, runs))
        session.flush()
        return {"id": backfill.id, "dag_id": dag_id, "runs": runs}

    @app.post("/backfills", status_code=201)
    def create_backfill_route(body: BackfillIn) -> dict[str, Any]:
        return create_backfill(body.dag_id, body.runs)  # `session` is injected

    install_lock_error_handlers(app)
    return app


# -- the background writers, one step each ----------------------------------------------------


def scheduler_step(session: Session, dag_id: str, batch: int) -> bool:
    """One scheduler pass over one DAG, in the caller's transaction: lock the DAG's row, move
    up to ``batch`` runs of its backfills running → success and queued → running, and mark
    backfills with no unfinished run completed (as Airflow's ``_mark_backfills_complete``).
    Returns whether a backfill was completed."""
    dag = session.scalar(locksafe.with_row_locks(select(Dag).where(Dag.id == dag_id), session))
    if dag is None:
        return False
    dag.last_scheduled_at = utcnow()
    dag.schedule_count += 1
    for old, new in (("running", "success"), ("queued", "running")):
        ids = session.scalars(
            select(DagRun.id)
            .join(Backfill, Backfill.id == DagRun.backfill_id)
            .where(
                DagRun.dag_id == dag_id,
                DagRun.state == old,
                Backfill.completed_at.is_(None),
            )
            .order_by(DagRun.id)
            .limit(batch)
        ).all()
        if ids:
            session.execute(update(DagRun).where(DagRun.id.in_(ids)).values(state=new))
    unfinished = (
        select(DagRun.id)
        .where(DagRun.backfill_id == Backfill.id, DagRun.state.in_(UNFINISHED))
        .exists()
    )
    done: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Backfill)
        .where(Backfill.dag_id == dag_id, Backfill.completed_at.is_(None), ~unfinished)
        .values(completed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(done.rowcount)


def dag_processor_step(session: Session, dag_ids: list[str]) -> None:
    """One DAG-processor pass, in the caller's transaction: lock the DAGs' rows (in id order,
    as Airflow's bulk write does) and update them."""
    dags = session.scalars(
        locksafe.with_row_locks(select(Dag).where(Dag.id.in_(dag_ids)).order_by(Dag.id), session)
    ).all()
    now = utcnow()
    for dag in dags:
        dag.updated_at = now
        dag.last_parsed_at = now
        dag.parse_count += 1
        dag.is_paused = False


# -- invariants -------------------------------------------------------------------------------


@dataclass
class Invariants:
    backfills: int
    runs: int
    #: Backfills (active or completed) without all their requested runs.
    partial_backfills: int
    #: Runs whose backfill_id points to no backfill.
    orphan_runs: int
    #: DAGs with more than one active backfill.
    duplicate_active: int

    @property
    def violations(self) -> dict[str, int]:
        return {
            name: value
            for name, value in (
                ("partial_backfills", self.partial_backfills),
                ("orphan_runs", self.orphan_runs),
                ("duplicate_active", self.duplicate_active),
            )
            if value
        }


def check_invariants(session: Session) -> Invariants:
    """Each figure is one statement, so each is read from one snapshot."""
    run_counts = (
        select(DagRun.backfill_id, func.count().label("n"))
        .where(DagRun.backfill_id.is_not(None))
        .group_by(DagRun.backfill_id)
        .subquery()
    )
    partial = session.scalar(
        select(func.count())
        .select_from(Backfill)
        .outerjoin(run_counts, run_counts.c.backfill_id == Backfill.id)
        .where(func.coalesce(run_counts.c.n, 0) != Backfill.requested_runs)
    )
    orphans = session.scalar(
        select(func.count())
        .select_from(DagRun)
        .outerjoin(Backfill, Backfill.id == DagRun.backfill_id)
        .where(DagRun.backfill_id.is_not(None), Backfill.id.is_(None))
    )
    per_dag = (
        select(Backfill.dag_id)
        .where(Backfill.completed_at.is_(None))
        .group_by(Backfill.dag_id)
        .having(func.count() > 1)
        .subquery()
    )
    duplicates = session.scalar(select(func.count()).select_from(per_dag))
    backfills = session.scalar(select(func.count()).select_from(Backfill))
    runs = session.scalar(select(func.count()).select_from(DagRun))
    return Invariants(
        backfills=backfills or 0,
        runs=runs or 0,
        partial_backfills=partial or 0,
        orphan_runs=orphans or 0,
        duplicate_active=duplicates or 0,
    )


def runs_of(session: Session, backfill_ids: list[int]) -> dict[int, int]:
    """Number of runs of each of these backfills (missing: none, or no such backfill)."""
    if not backfill_ids:
        return {}
    rows = session.execute(
        select(DagRun.backfill_id, func.count())
        .where(DagRun.backfill_id.in_(backfill_ids))
        .group_by(DagRun.backfill_id)
    ).all()
    return {int(backfill_id): int(n) for backfill_id, n in rows if backfill_id is not None}
