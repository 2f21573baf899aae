"""Issue 9, the row-lock side: no silent data loss, on every driver cell.

1. A lock error the application catches must not turn its COMMIT into a silent ROLLBACK
   (PostgreSQL aborts the transaction on any error) or a half commit (InnoDB rolls the whole
   transaction back on a deadlock and goes on in a new one): locksafe's NOWAIT locking SELECTs
   run in a savepoint where the server aborts on errors, and a COMMIT after another aborting
   lock error raises :class:`~locksafe.TransactionAborted` (which ``@transactional`` retries).
2. A locked ORM SELECT refreshes the objects it returns (``populate_existing``): values read
   under the lock are the committed ones, not the identity map's (no lost update).
3. A row lock on a connection without a transaction (``AUTOCOMMIT``) is refused before it is
   sent: it would end with the statement, locking nothing.

Every outcome is checked from a second connection; contention is real (two connections).
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session

import locksafe
from harness.cells import Cell
from locksafe import (
    LockErrorKind,
    TransactionAborted,
    UnsupportedLockOption,
    classify,
    is_deadlock_error,
    is_lock_not_available_error,
    transactional,
    with_row_locks,
)
from locksafe.testing import OtherConnection, hold_row_lock

metadata = MetaData()
jobs = Table(
    "sl_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("state", String(20), nullable=False),
)
accounts = Table(
    "sl_accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("balance", Integer, nullable=False),
)
#: Rows a deadlock's other party writes, so that InnoDB picks the session under test (which
#: has written less) as the victim.
filler = Table(
    "sl_filler",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("v", Integer, nullable=False),
)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __table__ = jobs


class Account(Base):
    __table__ = accounts


@pytest.fixture
def db(cell: Cell) -> Cell:
    locksafe.set_testing(True)
    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(jobs), [{"id": i, "state": "queued"} for i in (1, 2, 3)])
        conn.execute(insert(accounts), [{"id": 1, "balance": 100}])
        conn.execute(insert(filler), [{"id": i, "v": 0} for i in range(1, 41)])
    return cell


def states(cell: Cell) -> dict[int, str]:
    """The jobs as another connection sees them (what was committed)."""
    with cell.sync_engine().connect() as conn:
        return {row.id: row.state for row in conn.execute(select(jobs).order_by(jobs.c.id))}


def balance(cell: Cell) -> int:
    with cell.sync_engine().connect() as conn:
        return int(conn.execute(select(accounts.c.balance).where(accounts.c.id == 1)).scalar_one())


def job(job_id: int) -> Any:
    return select(Job).where(Job.id == job_id)


def mark(session: Session | Connection, job_id: int, state: str = "done") -> None:
    session.execute(update(jobs).where(jobs.c.id == job_id).values(state=state))


# -- 1. a caught lock error and the COMMIT after it --------------------------------------------


@pytest.mark.cells("postgresql", "mariadb")
def test_caught_nowait_failure_then_commit_commits_the_rest(db: Cell) -> None:
    """Quick start's pattern 2: write job 1, try job 2 with NOWAIT while another connection
    holds it, skip it, commit. Job 1 is committed on every server (PostgreSQL used to abort
    the transaction, and its COMMIT silently rolled job 1 back)."""

    def work(session: Session) -> dict[int, str]:
        outcome: dict[int, str] = {}
        mark(session, 1)
        outcome[1] = "done"
        with pytest.raises(DBAPIError) as info:
            session.execute(with_row_locks(job(2), session, nowait=True)).scalars().all()
        assert is_lock_not_available_error(info.value), info.value
        outcome[2] = "skipped"  # and carry on
        # The transaction is still usable: another write goes in after the caught error.
        mark(session, 3)
        session.commit()
        return outcome

    with hold_row_lock(db.url, select(jobs).where(jobs.c.id == 2)):
        assert db.run_session(work) == {1: "done", 2: "skipped"}
    assert states(db) == {1: "done", 2: "queued", 3: "done"}


@pytest.mark.cells("postgresql", "mariadb")
def test_caught_nowait_failure_inside_transactional_commits_the_rest(db: Cell) -> None:
    """The same inside ``@transactional``: the call returns and its work is committed."""
    calls = []

    @transactional(attempts=3)
    def process(session: Session) -> dict[int, str]:
        calls.append(1)
        outcome: dict[int, str] = {}
        for job_id in (1, 2):
            try:
                session.execute(with_row_locks(job(job_id), session, nowait=True)).scalar_one()
            except DBAPIError as exc:
                if not is_lock_not_available_error(exc):
                    raise
                outcome[job_id] = "skipped"
                continue
            mark(session, job_id)
            outcome[job_id] = "done"
        return outcome

    with hold_row_lock(db.url, select(jobs).where(jobs.c.id == 2)):
        assert db.run_session(process) == {1: "done", 2: "skipped"}
    assert len(calls) == 1
    assert states(db) == {1: "done", 2: "queued", 3: "queued"}


@pytest.mark.cells("postgresql", "mariadb")
def test_caught_nowait_failure_on_a_core_connection(db: Cell) -> None:
    """Core: ``conn.begin()``, a caught NOWAIT failure, more work, COMMIT."""

    def work(conn: Connection) -> None:
        with conn.begin():
            mark(conn, 1)
            with pytest.raises(DBAPIError) as info:
                conn.execute(with_row_locks(select(jobs).where(jobs.c.id == 2), nowait=True))
            assert classify(info.value) is LockErrorKind.LOCK_NOT_AVAILABLE
            mark(conn, 3)

    with hold_row_lock(db.url, select(jobs).where(jobs.c.id == 2)):
        db.run(work)
    assert states(db) == {1: "done", 2: "queued", 3: "done"}


@pytest.mark.cells("postgresql", "mariadb")
def test_nowait_success_keeps_its_lock_after_the_savepoint(db: Cell) -> None:
    """A NOWAIT SELECT that gets its rows keeps their locks until the transaction ends (the
    savepoint around it is released, not rolled back), inside a user savepoint too."""

    def work(session: Session) -> None:
        session.execute(with_row_locks(job(1), session, nowait=True)).scalar_one()
        with session.begin_nested():
            session.execute(with_row_locks(job(3), session, nowait=True)).scalar_one()
        with OtherConnection(db.url, lock_timeout=1.0) as other:
            for job_id in (1, 3):
                with pytest.raises(DBAPIError) as info:
                    other.execute(
                        with_row_locks(select(jobs).where(jobs.c.id == job_id), nowait=True)
                    )
                assert classify(info.value) is LockErrorKind.LOCK_NOT_AVAILABLE
        mark(session, 1)
        session.commit()

    db.run_session(work)
    assert states(db)[1] == "done"


def abort_with_a_lock_error(db: Cell, session: Session, other: OtherConnection) -> DBAPIError:
    """Make the server abort ``session``'s transaction with a lock error, and return it
    (caught): on PostgreSQL a lock wait that times out (55P03; no NOWAIT, so no savepoint);
    on MariaDB a deadlock (1213) whose victim is ``session`` (``other`` has written more)."""
    if db.backend == "postgresql":
        other.execute(with_row_locks(select(jobs).where(jobs.c.id == 2)))
        session.execute(text("SET lock_timeout = '300ms'"))
        with pytest.raises(DBAPIError) as timed_out:
            session.execute(with_row_locks(job(2), session)).scalar_one()
        assert classify(timed_out.value) is LockErrorKind.LOCK_TIMEOUT, timed_out.value
        return timed_out.value
    # MariaDB: other holds job 2 and waits for job 1, which session holds; session asks for
    # job 2: a deadlock, and InnoDB rolls back the transaction that wrote less (session's).
    other.execute(update(filler).values(v=filler.c.v + 1))
    other.execute(update(jobs).where(jobs.c.id == 2).values(state="other"))
    waiting = other.submit(update(jobs).where(jobs.c.id == 1).values(state="other"))
    time.sleep(0.5)  # let it wait for session's lock on job 1
    with pytest.raises(DBAPIError) as deadlocked:
        session.execute(with_row_locks(job(2), session)).scalar_one()
    assert is_deadlock_error(deadlocked.value), deadlocked.value
    waiting.result(timeout=10)  # got job 1: session's transaction was rolled back
    return deadlocked.value


@pytest.mark.cells("postgresql", "mariadb")
def test_commit_after_a_caught_aborting_lock_error_raises(db: Cell) -> None:
    """A lock error that aborted the transaction, caught: the COMMIT raises
    TransactionAborted (retryable, the lock error as its cause) instead of committing nothing
    (PostgreSQL) or only what ran after the error (MariaDB) — and nothing is committed."""

    def work(session: Session) -> None:
        mark(session, 1)
        with OtherConnection(db.url, lock_timeout=10.0) as other:
            caught = abort_with_a_lock_error(db, session, other)
            if db.backend == "mariadb":
                mark(session, 3)  # runs, in the new transaction InnoDB began
            with pytest.raises(TransactionAborted) as info:
                session.commit()
            other.rollback()
        assert info.value.__cause__ is caught
        assert info.value.kind is classify(caught)
        assert classify(info.value) is classify(caught)
        assert locksafe.is_retryable_lock_error(info.value)
        copy = pickle.loads(pickle.dumps(info.value))
        assert type(copy) is TransactionAborted
        assert (copy.kind, str(copy)) == (info.value.kind, str(info.value))
        session.rollback()
        # The session is usable again, and the flag is gone with the rollback.
        mark(session, 3, "again")
        session.commit()

    db.run_session(work)
    assert states(db) == {1: "queued", 2: "queued", 3: "again"}


@pytest.mark.cells("postgresql", "mariadb")
def test_transactional_retries_a_commit_refused_after_an_aborting_lock_error(db: Cell) -> None:
    """Inside ``@transactional``: the refused COMMIT is a failed attempt, run again; the call
    returns only when its work is committed."""
    attempts: list[int] = []
    others: list[OtherConnection] = []

    def release(details: Any) -> None:
        for other in others:
            other.rollback()

    @transactional(attempts=3, on_retry=release)
    def process(session: Session) -> str:
        attempts.append(1)
        mark(session, 1)
        if len(attempts) == 1:
            abort_with_a_lock_error(db, session, others[0])  # caught there
            return "skipped job 2"
        session.execute(with_row_locks(job(2), session)).scalar_one()
        mark(session, 2)
        return "did job 2"

    with OtherConnection(db.url, lock_timeout=10.0) as other:
        others.append(other)
        assert db.run_session(process) == "did job 2"
    assert len(attempts) == 2
    assert states(db) == {1: "done", 2: "done", 3: "queued"}


@pytest.mark.cells("postgresql")
def test_lock_error_rolled_back_to_a_savepoint_does_not_refuse_the_commit(db: Cell) -> None:
    """PostgreSQL: a lock error inside ``begin_nested()``, rolled back to its savepoint,
    leaves the transaction usable: the COMMIT commits."""

    # abort_with_a_lock_error returns the caught error: raised again inside the savepoint.
    def raising(session: Session, other: OtherConnection) -> None:
        raise abort_with_a_lock_error(db, session, other)

    def work_raising(session: Session) -> None:
        mark(session, 1)
        with OtherConnection(db.url, lock_timeout=10.0) as other:
            with pytest.raises(DBAPIError), session.begin_nested():
                raising(session, other)
            mark(session, 3)
            session.commit()

    db.run_session(work_raising)
    assert states(db) == {1: "done", 2: "queued", 3: "done"}


# -- 2. a locked ORM SELECT refreshes what it locks ---------------------------------------------


@pytest.mark.parametrize("api", ["select", "query"])
def test_locked_select_refreshes_stale_identity_map_objects(db: Cell, api: str) -> None:
    """``expire_on_commit=False`` session holds account 1 (balance 100); another connection
    sets 50; lock + subtract 10 gives 40 (not 90: a lost update)."""

    def work(session: Session) -> None:
        account = session.get(Account, 1)
        assert account is not None
        assert account.balance == 100
        session.commit()  # expire_on_commit=False: the object keeps balance 100
        with OtherConnection(db.url) as other:
            other.execute(update(accounts).where(accounts.c.id == 1).values(balance=50))
            other.commit()
        if api == "select":
            locked = session.execute(
                with_row_locks(select(Account).where(Account.id == 1), session)
            ).scalar_one()
        else:
            locked = with_row_locks(session.query(Account).filter(Account.id == 1), session).one()
        assert locked is account
        assert locked.balance == 50
        locked.balance -= 10
        session.commit()

    db.run_session(work, expire_on_commit=False)
    assert balance(db) == 40


# -- 3. no row lock without a transaction --------------------------------------------------------


@pytest.mark.parametrize("how", ["connection", "engine"])
def test_row_lock_in_autocommit_is_refused(db: Cell, how: str) -> None:
    """AUTOCOMMIT (per connection, or engine-wide): the lock would end with the statement.
    Refused before it is sent; had it run, the row would have to be locked as seen from
    another connection."""
    engine = db.engine(isolation_level="AUTOCOMMIT") if how == "engine" else db.engine()

    def work(conn: Connection) -> None:
        if how == "connection":
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        refused: UnsupportedLockOption | None = None
        try:
            conn.execute(with_row_locks(select(jobs).where(jobs.c.id == 1), conn)).all()
        except UnsupportedLockOption as exc:
            refused = exc
        if refused is not None:
            assert "transaction" in str(refused)
            return
        # It ran: it must hold the lock now, or it locked nothing.
        if db.backend == "sqlite":
            pytest.fail("SQLite ran a row lock in AUTOCOMMIT")
        with OtherConnection(db.url, lock_timeout=1.0) as other, pytest.raises(DBAPIError):
            other.execute(with_row_locks(select(jobs).where(jobs.c.id == 1), nowait=True))

    db.run(work, engine=engine)
    # Nothing was left locked or changed.
    with OtherConnection(db.url, lock_timeout=1.0) as other:
        rows = other.execute(with_row_locks(select(jobs).where(jobs.c.id == 1), nowait=True))
    assert [tuple(row) for row in rows] == [(1, "queued")]
