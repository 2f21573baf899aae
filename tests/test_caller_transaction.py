"""@transactional given a session that is already in a transaction (issue 9, item 3).

Before issue 9 every such call was "nested use": run once, nothing committed, nothing retried,
no warning — so the FastAPI shape ``session: Session = Depends(get_db)``, a read (which
autobegins), then the decorated service function, reported success and committed nothing.

Now, by who began the transaction:

- autobegun, only reads so far: the decorator takes the session over (ends that transaction,
  runs the function in its own, retried, committed);
- autobegun, holding the caller's work (a write, pending or flushed changes, a locked SELECT,
  an open savepoint): ``CallerTransactionError`` before the function runs, the caller's
  transaction untouched;
- begun explicitly by the caller (``with session.begin():``) or by an outer
  ``@transactional``: joined, run once, committed by its owner.

Every invariant is checked from a second connection, on every cell; sync cells run the sync
decorator with a Session, async cells the ``async def`` one with an AsyncSession.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import Column, Integer, MetaData, String, Table, event, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Session

import locksafe
import locksafe.sqlite
import locksafe.starlette
from harness.cells import Cell
from locksafe import CallerTransactionError, LockErrorKind, RetryDetails, transactional

with warnings.catch_warnings():
    # The test extra gives Python 3.10 httpx (httpx2 needs 3.11), which Starlette's TestClient
    # deprecates: a warning in every compatibility run, about the environment, not locksafe.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

metadata = MetaData()
accounts = Table(
    "caller_tx_accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("balance", Integer, nullable=False),
    Column("note", String(40)),
)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __table__ = accounts


@pytest.fixture(autouse=True)
def _no_backoff() -> Iterator[None]:
    locksafe.set_testing(True)
    try:
        yield
    finally:
        locksafe.set_testing(False)


def engine_for(cell: Cell, **kw: Any) -> Any:
    """The cell's engine; lock waits bounded (10 s), SQLite configured as recommended."""
    if cell.backend == "sqlite":
        kw.setdefault("connect_args", {}).setdefault("timeout", 5)
        kw["connect_args"].setdefault("check_same_thread", False)
    engine = cell.engine(**kw)
    sync = engine.sync_engine if cell.is_async else engine
    if cell.backend == "sqlite":
        locksafe.sqlite.configure(engine, busy_timeout=5, begin="deferred")
    else:
        settings = (
            ["SET lock_timeout = '10s'"]
            if cell.backend == "postgresql"
            else ["SET SESSION innodb_lock_wait_timeout = 10"]
        )

        @event.listens_for(sync, "connect")
        def _session_settings(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            for sql in settings:
                cursor.execute(sql)
            cursor.close()
            dbapi_connection.commit()

    return cell.warm_up(engine)


def seed(cell: Cell, rows: dict[int, int]) -> None:
    cell.create_all(metadata)
    if cell.backend == "sqlite":
        with cell.sync_engine().connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode = wal")
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(accounts), [{"id": k, "balance": v} for k, v in rows.items()])


def balances(cell: Cell) -> dict[int, int]:
    """Read from a second connection (its own engine): what is committed."""
    with cell.sync_engine().connect() as conn:
        return {r.id: r.balance for r in conn.execute(select(accounts).order_by(accounts.c.id))}


def bump(session: Session, account: int = 1, by: int = 1) -> None:
    session.execute(
        update(accounts).where(accounts.c.id == account).values(balance=accounts.c.balance + by)
    )


class Scenario:
    """Runs ``caller(session, service)`` on the cell: sync cells with a Session and a sync
    decorated ``service``, async cells with an AsyncSession and an ``async def`` one; the
    caller's steps are written once, as sync code run through ``run_sync`` on async cells."""

    def __init__(self, cell: Cell, engine: Any, **options: Any) -> None:
        self.cell = cell
        self.engine = engine
        self.options = options
        self.calls = 0

    def run(
        self,
        body: Callable[[Session], None],
        caller: Callable[[Any, Callable[[], Any]], Any],
    ) -> Any:
        """``caller(session, service)``: ``service()`` calls the decorated function (which
        runs ``body(session)``) with the caller's session."""

        def counted(session: Session) -> None:
            self.calls += 1
            body(session)

        if not self.cell.is_async:

            @transactional(**self.options)
            def service(*, session: Session) -> str:
                counted(session)
                return "done"

            with Session(self.engine) as session:
                return caller(session, lambda: service(session=session))

        @transactional(**self.options)
        async def service_async(*, session: AsyncSession) -> str:
            await session.run_sync(counted)
            return "done"

        async def main() -> Any:
            async with AsyncSession(self.engine) as session:
                outcome = caller(session, lambda: service_async(session=session))
                while asyncio.iscoroutine(outcome) or isinstance(outcome, Awaitable):
                    outcome = await outcome
                return outcome

        return self.cell.run_async(main)


def steps(cell: Cell, session: Any) -> Any:
    """The caller's own statements, run on ``session`` (sync or async) by an awaitable-aware
    helper: ``do(fn)`` runs ``fn(sync_session)``."""
    if not cell.is_async:

        def do_sync(fn: Callable[[Session], Any]) -> Any:
            return fn(session)

        return do_sync

    def do_async(fn: Callable[[Session], Any]) -> Any:
        return session.run_sync(fn)

    return do_async


# -- autobegun, only reads: owned ---------------------------------------------------------------


def test_after_a_read_the_decorator_owns_the_session_and_commits(cell: Cell) -> None:
    """The DB shape: a read autobegins, then the service is called. Its work is
    committed by the decorator (before issue 9: nested use, committed by nobody)."""
    seed(cell, {1: 0})
    scenario = Scenario(cell, engine_for(cell))
    facts: dict[str, Any] = {}

    if cell.is_async:

        async def caller(session: AsyncSession, service: Callable[[], Any]) -> None:
            await session.get(Account, 1)  # a read: the session autobegins
            facts["autobegun"] = session.in_transaction()
            facts["result"] = await service()
            facts["left_open"] = session.in_transaction()

    else:

        def caller(session: Session, service: Callable[[], Any]) -> None:  # type: ignore[misc]
            session.get(Account, 1)
            facts["autobegun"] = session.in_transaction()
            facts["result"] = service()
            facts["left_open"] = session.in_transaction()

    scenario.run(bump, caller)
    assert facts["autobegun"]
    assert facts["result"] == "done"
    assert not facts["left_open"], "the decorator left a transaction open"
    assert balances(cell) == {1: 1}, "the work was reported done and not committed"


def test_after_a_read_a_lock_error_is_retried_as_the_owner(cell: Cell) -> None:
    """Owning the session means retrying it: the first attempt meets a row lock held by
    another connection (NOWAIT), the holder lets go, the second attempt commits — in a
    transaction of the decorator's own, so the lock it took is the one committed."""
    seed(cell, {1: 0, 2: 0})
    engine = engine_for(cell)
    holder = cell.other()
    holder.start()
    first = select(accounts).where(accounts.c.id == 1)
    holder.execute(locksafe.with_row_locks(first, on_unsupported="degrade"))
    seen: list[RetryDetails] = []

    def release(details: RetryDetails) -> None:
        seen.append(details)
        holder.rollback()

    def locked_bump(session: Session) -> None:
        row = select(accounts).where(accounts.c.id == 1)
        session.execute(locksafe.with_row_locks(row, session, nowait=True)).all()
        bump(session)

    scenario = Scenario(cell, engine, attempts=3, on_retry=release)
    try:
        if cell.is_async:

            async def caller(session: AsyncSession, service: Callable[[], Any]) -> Any:
                await session.get(Account, 2)  # a read of another row: autobegun
                return await service()

        else:

            def caller(session: Session, service: Callable[[], Any]) -> Any:  # type: ignore[misc]
                session.get(Account, 2)
                return service()

        result = scenario.run(locked_bump, caller)
    finally:
        holder.close()
    assert result == "done"
    assert len(seen) == 1
    assert seen[0].kind in (LockErrorKind.LOCK_NOT_AVAILABLE, LockErrorKind.DATABASE_BUSY), seen
    assert scenario.calls == 2
    assert balances(cell) == {1: 1, 2: 0}


# -- autobegun, holding the caller's work: refused ----------------------------------------------

#: The caller's work in its autobegun transaction, one way each.
CALLER_WORK: dict[str, Callable[[Session], Any]] = {
    "core write": lambda s: s.execute(update(accounts).where(accounts.c.id == 2).values(note="x")),
    "pending change": lambda s: setattr(s.get(Account, 2), "note", "x"),
    "flushed change": lambda s: (setattr(s.get(Account, 2), "note", "x"), s.flush()),
    "added object": lambda s: s.add(Account(id=3, balance=0)),
    "locked select": lambda s: s.execute(
        locksafe.with_row_locks(select(accounts).where(accounts.c.id == 2), s)
    ).all(),
    "open savepoint": lambda s: (s.get(Account, 2), s.begin_nested()),
}


@pytest.mark.parametrize("work", list(CALLER_WORK))
def test_the_callers_pending_work_is_refused_loudly_and_left_alone(cell: Cell, work: str) -> None:
    """Committing the caller's work unasked, or losing it on a retry, are both wrong: the
    call raises CallerTransactionError before the function runs, and the caller's transaction
    is as it was (before issue 9: the call "succeeded", and nothing was committed)."""
    seed(cell, {1: 0, 2: 0})
    scenario = Scenario(cell, engine_for(cell))
    facts: dict[str, Any] = {}

    def inspect_and_end(session: Session) -> None:
        facts["still_open"] = session.in_transaction()
        facts["own_work_kept"] = (
            session.get(Account, 3) is not None
            if work == "added object"
            else session.get(Account, 2).note == "x"  # type: ignore[union-attr]
            if work not in ("locked select", "open savepoint")
            else True
        )
        session.rollback()

    if cell.is_async:

        async def caller(session: AsyncSession, service: Callable[[], Any]) -> None:
            await session.run_sync(CALLER_WORK[work])
            with pytest.raises(CallerTransactionError) as info:
                await service()
            facts["error"] = info.value
            await session.run_sync(inspect_and_end)

    else:

        def caller(session: Session, service: Callable[[], Any]) -> None:  # type: ignore[misc]
            CALLER_WORK[work](session)
            with pytest.raises(CallerTransactionError) as info:
                service()
            facts["error"] = info.value
            inspect_and_end(session)

    scenario.run(bump, caller)
    assert scenario.calls == 0, "the function ran in a transaction it does not own"
    assert facts["still_open"], "the refusal ended the caller's transaction"
    assert facts["own_work_kept"], "the refusal lost the caller's work"
    assert facts["error"].reason
    assert "with session.begin()" in str(facts["error"])
    assert balances(cell) == {1: 0, 2: 0}, "something was committed"


# -- begun explicitly: joined ------------------------------------------------------------------


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_an_explicit_transaction_of_the_caller_is_joined(cell: Cell, end: str) -> None:
    """``with session.begin():`` (or ``session.begin()``): the caller owns the transaction;
    the call joins it, runs once, and its work commits or rolls back with the caller's."""
    seed(cell, {1: 0, 2: 0})
    scenario = Scenario(cell, engine_for(cell))
    facts: dict[str, Any] = {}

    if cell.is_async:

        async def caller(session: AsyncSession, service: Callable[[], Any]) -> None:
            await session.begin()
            await session.run_sync(bump, 2)  # the caller's own write
            await service()
            facts["open"] = session.in_transaction()
            facts["before_end"] = balances(cell)
            await (session.commit() if end == "commit" else session.rollback())

    else:

        def caller(session: Session, service: Callable[[], Any]) -> None:  # type: ignore[misc]
            session.begin()
            bump(session, 2)
            service()
            facts["open"] = session.in_transaction()
            facts["before_end"] = balances(cell)
            session.commit() if end == "commit" else session.rollback()

    scenario.run(bump, caller)
    assert facts["open"], "the decorator ended the caller's transaction"
    assert facts["before_end"] == {1: 0, 2: 0}, "committed before its owner committed"
    assert scenario.calls == 1
    expected = {1: 1, 2: 1} if end == "commit" else {1: 0, 2: 0}
    assert balances(cell) == expected


def test_an_outer_transactional_is_joined_and_retries_the_whole(cell: Cell) -> None:
    """Real nested use: an outer @transactional calling an inner one with its session. The
    inner call joins; a lock error in it goes up to the outer, which runs everything again;
    both writes are committed once."""
    seed(cell, {1: 0, 2: 0})
    engine = engine_for(cell)
    holder = cell.other()
    holder.start()
    first = select(accounts).where(accounts.c.id == 1)
    holder.execute(locksafe.with_row_locks(first, on_unsupported="degrade"))
    attempts = {"outer": 0, "inner": 0}

    def release(details: RetryDetails) -> None:
        holder.rollback()

    def inner_body(session: Session) -> None:
        attempts["inner"] += 1
        row = select(accounts).where(accounts.c.id == 1)
        session.execute(locksafe.with_row_locks(row, session, nowait=True)).all()
        bump(session, 1)

    def outer_body(session: Session) -> None:
        attempts["outer"] += 1
        bump(session, 2)

    try:
        if cell.is_async:

            @transactional(attempts=3)
            async def inner_async(*, session: AsyncSession) -> None:
                await session.run_sync(inner_body)

            @transactional(attempts=3, on_retry=release)
            async def outer_async(*, session: AsyncSession) -> None:
                await inner_async(session=session)
                await session.run_sync(outer_body)

            async def main() -> None:
                async with AsyncSession(engine) as session:
                    await outer_async(session=session)

            cell.run_async(main)
        else:

            @transactional(attempts=3)
            def inner(*, session: Session) -> None:
                inner_body(session)

            @transactional(attempts=3, on_retry=release)
            def outer(*, session: Session) -> None:
                inner(session=session)
                outer_body(session)

            with Session(engine) as session:
                outer(session=session)
    finally:
        holder.close()
    assert attempts == {"outer": 1, "inner": 2}
    assert balances(cell) == {1: 1, 2: 1}


# -- a real FastAPI app: DB ---------------------------------------------------------


def fastapi_app(cell: Cell, engine: Any) -> FastAPI:
    """The docs' shape: a per-request session from a dependency that does not commit, a read
    in the route, then the decorated service function."""
    app = FastAPI()
    locksafe.starlette.install_lock_error_handlers(app)

    if cell.is_async:

        async def get_db_async() -> Any:
            async with AsyncSession(engine) as session:
                yield session

        @transactional
        async def transfer_async(src: int, dst: int, amount: int, *, session: AsyncSession) -> None:
            await session.run_sync(bump, src, -amount)
            await session.run_sync(bump, dst, amount)

        @app.post("/transfers/{src}/{dst}/{amount}")
        async def post_transfer_async(
            src: int, dst: int, amount: int, session: AsyncSession = Depends(get_db_async)  # noqa: B008
        ) -> dict[str, bool]:
            if await session.get(Account, src) is None:  # a read: the session autobegins
                raise HTTPException(404)
            await transfer_async(src, dst, amount, session=session)
            return {"ok": True}

        @app.post("/noted-transfers/{src}/{dst}/{amount}")
        async def post_noted_transfer_async(
            src: int, dst: int, amount: int, session: AsyncSession = Depends(get_db_async)  # noqa: B008
        ) -> dict[str, bool]:
            await session.execute(update(accounts).values(note="noted"))  # the route's write
            await transfer_async(src, dst, amount, session=session)
            return {"ok": True}

        return app

    def get_db() -> Any:
        with Session(engine) as session:
            yield session

    @transactional
    def transfer(src: int, dst: int, amount: int, *, session: Session) -> None:
        bump(session, src, -amount)
        bump(session, dst, amount)

    @app.post("/transfers/{src}/{dst}/{amount}")
    def post_transfer(
        src: int, dst: int, amount: int, session: Session = Depends(get_db)  # noqa: B008
    ) -> dict[str, bool]:
        if session.get(Account, src) is None:  # a read: the session autobegins
            raise HTTPException(404)
        transfer(src, dst, amount, session=session)
        return {"ok": True}

    @app.post("/noted-transfers/{src}/{dst}/{amount}")
    def post_noted_transfer(
        src: int, dst: int, amount: int, session: Session = Depends(get_db)  # noqa: B008
    ) -> dict[str, bool]:
        session.execute(update(accounts).values(note="noted"))  # the route's own write
        transfer(src, dst, amount, session=session)
        return {"ok": True}

    return app


def test_fastapi_depends_get_db_commits_the_service_work(cell: Cell) -> None:
    seed(cell, {1: 100, 2: 100})
    engine = engine_for(cell)
    app = fastapi_app(cell, engine)
    with TestClient(app) as client:
        for _ in range(3):
            response = client.post("/transfers/1/2/10")
            assert response.status_code == 200, response.text
            assert response.json() == {"ok": True}
        assert client.post("/transfers/9/2/10").status_code == 404
    assert balances(cell) == {1: 70, 2: 130}, "the API answered 200 and committed nothing"


def test_fastapi_a_route_write_before_the_service_is_refused_not_lost(cell: Cell) -> None:
    seed(cell, {1: 100, 2: 100})
    engine = engine_for(cell)
    app = fastapi_app(cell, engine)
    with TestClient(app) as client, pytest.raises(CallerTransactionError):
        client.post("/noted-transfers/1/2/10")
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/noted-transfers/1/2/10").status_code == 500
    assert balances(cell) == {1: 100, 2: 100}
    with cell.sync_engine().connect() as conn:
        assert conn.execute(select(accounts.c.note)).scalars().all() == [None, None]


def test_unrelated_database_errors_still_reach_the_caller(cell: Cell) -> None:
    """A sanity check of the owned path after a read: a non-lock error goes up as it is, and
    nothing is committed."""
    seed(cell, {1: 0})
    scenario = Scenario(cell, engine_for(cell))

    def duplicate(session: Session) -> None:
        bump(session)
        session.execute(insert(accounts).values(id=1, balance=0))

    if cell.is_async:

        async def caller(session: AsyncSession, service: Callable[[], Any]) -> None:
            await session.get(Account, 1)
            with pytest.raises(DBAPIError):
                await service()

    else:

        def caller(session: Session, service: Callable[[], Any]) -> None:  # type: ignore[misc]
            session.get(Account, 1)
            with pytest.raises(DBAPIError):
                service()

    scenario.run(duplicate, caller)
    assert scenario.calls == 1
    assert balances(cell) == {1: 0}
