"""Faults in the middle of transfers (issue 13, reliability suite): the server kills the
connection (``pg_terminate_backend``, MariaDB ``KILL``), a SQLite writer process is SIGKILLed
holding the write lock, the PostgreSQL server is stopped and started again while workers run.

Afterwards, checked from a second connection: no partial write (a transfer is both legs and its
log row, or nothing), the total balance conserved, the balances what the committed-transfer log
says, SQLite's ``PRAGMA integrity_check`` ``ok``; later calls work again.

What ``@transactional`` does with a connection error, as documented (``transactional``'s
docstring): it is not a lock error (``classify()`` is ``None``, never ``LockUnavailable``), so the
default rule does not retry it and it goes up as it is, the function having run once; a COMMIT
that failed for any reason but a lock error the server reported is never retried, whatever
``retry_on`` says (its outcome is unknown), and ``is_retryable_lock_error()`` then says no; a
custom ``retry_on`` that accepts the error retries a connection error *before* the COMMIT, on a
new connection.

CI runs the kills on one sync driver per server (postgresql+psycopg, mysql+pymysql);
``LOCKSAFE_RELIABILITY=full`` runs them on every sync server driver, with more kill rounds::

    LOCKSAFE_RELIABILITY=full pytest tests/test_reliability_faults.py
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

import locksafe
import locksafe.sqlite
from harness.cells import Cell
from harness.reliability import (
    SHORT_LOCK_TIMEOUT,
    SIZE,
    Tally,
    Transfer,
    apply_transfer,
    audit,
    ballast,
    is_connection_error,
    metadata,
    on_connect,
    plan,
    private_postgresql,
    read_writer_log,
    run_threads,
    seed_bank,
    sigkill,
    start_writer,
)
from locksafe import NEW_SESSION, LockUnavailable, is_retryable_lock_error, transactional
from locksafe.testing import OtherConnection

pytestmark = pytest.mark.usefixtures("quiet_retries")


PID_SQL = {"postgresql": "SELECT pg_backend_pid()", "mariadb": "SELECT CONNECTION_ID()"}


def kill_sql(backend: str, pid: int) -> str:
    if backend == "postgresql":
        return f"SELECT pg_terminate_backend({int(pid)}, 5000)"  # waits until it is gone
    return f"KILL CONNECTION {int(pid)}"


def server_engine(cell: Cell, **kw: Any) -> Any:
    kw.setdefault("poolclass", QueuePool)
    engine = cell.engine(**kw)
    if cell.backend == "postgresql":
        on_connect(engine, "SET deadlock_timeout = '50ms'", "SET lock_timeout = '10s'")
    else:
        on_connect(engine, "SET SESSION innodb_lock_wait_timeout = 10")
    return cell.warm_up(engine)


def transfer(call_id: str, src: int = 1, dst: int = 2, amount: int = 10) -> Transfer:
    return Transfer(call_id, src, dst, amount, "deadlock", 0.0)


# -- the server kills one connection, at a chosen point ---------------------------------------


@pytest.mark.cells(*SIZE.fault_cells)
@pytest.mark.parametrize(
    ("where", "retry_on"),
    [
        ("between the legs", "default"),
        ("at the commit", "anything"),
        ("between the legs", "anything"),
    ],
)
def test_a_connection_killed_by_the_server(cell: Cell, where: str, retry_on: str) -> None:
    """The server kills the call's connection between the debit and the credit, or when the
    COMMIT is about to go out. Default rule: a connection error is no lock error: raised as it
    is after one run. At the COMMIT: never retried even by a ``retry_on`` that accepts
    anything. Before the COMMIT, that ``retry_on`` retries it on a new connection. In every
    case nothing is half written, and the next calls commit."""
    cell.create_all(metadata)
    admin = cell.sync_engine()
    seed_bank(admin)
    engine = server_engine(cell, pool_size=2)
    runs: list[str] = []
    armed = {"kill": True}

    with OtherConnection(cell.admin_url) as killer:

        def kill(conn: Any) -> None:
            if not armed["kill"]:
                return
            armed["kill"] = False
            pid = conn.exec_driver_sql(PID_SQL[cell.backend]).scalar_one()
            killer.execute(kill_sql(cell.backend, pid))

        if where == "at the commit":
            event.listen(engine, "commit", kill)
        rule: Any = (lambda exc: True) if retry_on == "anything" else None

        @transactional(sessionmaker=sessionmaker(engine), retry_on=rule, attempts=3)
        def call(t: Transfer, *, session: Session = NEW_SESSION) -> None:
            runs.append(t.call_id)
            apply_transfer(
                session,
                t,
                short_timeout=1.0,
                after_debit=(
                    (lambda s, _t: kill(s.connection())) if where == "between the legs" else None
                ),
            )

        committed: set[str] = set()
        if retry_on == "anything" and where == "between the legs":
            call(transfer("killed"))  # retried on a new connection, and committed
            assert runs == ["killed", "killed"]
            committed.add("killed")
        else:
            with pytest.raises(DBAPIError) as info:
                call(transfer("killed"))
            error = info.value
            assert runs == ["killed"], "a connection error was retried"
            assert not isinstance(error, LockUnavailable)
            assert locksafe.classify(error) is None, "a connection error classified as a lock error"
            assert not is_retryable_lock_error(error)
        assert not armed["kill"], "the kill did not happen"

        # no partial write: the killed attempt left nothing
        audit(admin).check(committed)
        # later calls work again, on the same engine (its pool dropped the dead connection)
        for n in range(5):
            call(transfer(f"after-{n}", src=1 + n % 3, dst=4 + n % 3))
            committed.add(f"after-{n}")
    audit(admin).check(committed)


# -- the server kills random connections of busy workers --------------------------------------


@pytest.mark.timeout(300 if SIZE.kill_rounds > 10 else 120)
@pytest.mark.cells(*SIZE.fault_cells)
def test_connections_killed_at_random_during_contended_transfers(cell: Cell) -> None:
    """Workers run contended transfers; another connection kills, ``kill_rounds`` times, a
    worker connection that is in a transaction (at any statement, the COMMIT included). Every
    call commits, raises LockUnavailable, or raises the connection error as a SQLAlchemy
    ``DBAPIError`` that is no lock error (never retried); the bank holds — a call that raised
    the connection error may or may not be in the log (the kill may have hit its COMMIT), but
    never half of it."""
    cell.create_all(metadata)
    admin = cell.sync_engine()
    seed_bank(admin)
    threads = 4
    engine = server_engine(cell, pool_size=threads, max_overflow=threads)
    ours: set[int] = set()

    @event.listens_for(engine, "connect")
    def remember(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(PID_SQL[cell.backend])
        ours.add(int(cursor.fetchone()[0]))
        cursor.close()

    tally = Tally()
    done = threading.Event()

    @transactional(
        sessionmaker=sessionmaker(engine), attempts=10, on_retry=tally.on_retry, wait_max=0.05
    )
    def call(t: Transfer, *, session: Session = NEW_SESSION) -> None:
        tally.attempt(t)
        apply_transfer(session, t, short_timeout=SHORT_LOCK_TIMEOUT[cell.backend])

    def worker(index: int) -> None:
        for t in plan(f"k{index}", 100_000, seed=index):
            if done.is_set():
                return
            tally.begin_call(t)
            try:
                call(t)
            except Exception as exc:
                tally.outcome(t, exc, expected=is_connection_error)
            else:
                tally.outcome(t, None)

    in_transaction = (
        "SELECT pid FROM pg_stat_activity WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()"
        if cell.backend == "postgresql"
        else "SELECT trx_mysql_thread_id FROM information_schema.innodb_trx"
    )
    kills = 0
    rng = random.Random(7)

    def killer() -> None:
        nonlocal kills
        try:
            with OtherConnection(cell.admin_url, hold_timeout=200) as other:
                deadline = time.monotonic() + 60
                while kills < SIZE.kill_rounds and time.monotonic() < deadline:
                    time.sleep(rng.uniform(0.05, 0.2))
                    busy = sorted({int(r[0]) for r in other.execute(in_transaction)} & ours)
                    other.rollback()  # a fresh snapshot of the activity each time
                    if busy and kill(other, rng.choice(busy)):
                        kills += 1
        finally:
            done.set()

    def kill(other: OtherConnection, pid: int) -> bool:
        """Whether the connection was killed (it may have ended in between)."""
        try:
            rows = other.execute(kill_sql(cell.backend, pid))
        except DBAPIError as exc:
            if "Unknown thread id" not in str(exc):  # MariaDB: it ended in between
                raise
            return False
        finally:
            other.rollback()
        return cell.backend != "postgresql" or bool(rows and rows[0][0])

    run_threads([killer, *[lambda i=i: worker(i) for i in range(threads)]], deadline=240)
    print(f"\n{cell.name}: {kills} kills: {tally.summary()}")

    assert kills == SIZE.kill_rounds
    assert not tally.errors, f"{len(tally.errors)} unhandled errors: {tally.unhandled()}"
    assert tally.expected_errors, "no call saw its connection killed"
    assert "NOT A LOCK ERROR" not in tally.retried_kinds(), "a connection error was retried"
    for call_id, _ in tally.expected_errors:
        assert tally.attempts[call_id] == tally.retries[call_id] + 1, call_id
    unknown = {call_id for call_id, _ in tally.expected_errors}
    audit(admin).check(tally.committed, unknown=unknown)

    # later calls work again
    later = {f"later-{n}" for n in range(5)}
    for n in range(5):
        call(transfer(f"later-{n}"))
    audit(admin).check(tally.committed | later, unknown=unknown)


# -- what the storms above found: one connection loss, each reproduced alone -------------------


def chain(error: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    node: BaseException | None = error
    while node is not None and node not in found and len(found) < 20:
        found.append(node)
        node = node.__cause__ or node.__context__
    return found


@pytest.mark.cells(*SIZE.fault_cells)
def test_a_pooled_connection_the_server_closed_raises_sqlalchemys_error(cell: Cell) -> None:
    """The server closes a connection while it waits in the pool (MySQL's ``wait_timeout``, a
    ``KILL``, a restart): the next call through ``@transactional`` must raise what SQLAlchemy
    raises for it — a ``DBAPIError`` with ``connection_invalidated`` — and the call after that
    must work.

    LIBRARY BUG (MySQL / MariaDB, every driver; found by the kill storm above): the decorator's
    deadline (``timeout=``, 30 s by default) reads ``innodb_lock_wait_timeout`` through the raw
    DB-API cursor (``locksafe.timeouts._on_dbapi`` from ``LockTimeout._apply``, in the session's
    ``after_begin``), so the driver's own exception (``pymysql.err.OperationalError: (2013,
    'Lost connection to MySQL server during query')``) escapes unwrapped: ``except
    sqlalchemy.exc.DBAPIError`` misses it, SQLAlchemy's ``handle_error`` hooks never see it and
    do not invalidate the connection. Without locksafe, the same engine raises
    ``sqlalchemy.exc.OperationalError`` (checked first, below)."""
    engine = server_engine(cell, pool_size=1, max_overflow=0)

    @transactional(sessionmaker=sessionmaker(engine))
    def read(*, session: Session = NEW_SESSION) -> int:
        """The server's id of the connection it ran on."""
        return int(session.execute(text(PID_SQL[cell.backend])).scalar_one())

    def close_the_pooled_connection(pid: int) -> None:
        with OtherConnection(cell.admin_url) as killer:
            killer.execute(kill_sql(cell.backend, pid))
        time.sleep(0.2)  # MariaDB's KILL is asynchronous

    pid = read()  # one connection, now in the pool
    # SQLAlchemy alone: its own error (closing the session may fail too, on some drivers)
    close_the_pooled_connection(pid)
    session = Session(engine)
    with pytest.raises(DBAPIError) as plain:
        session.execute(select(1))
    with contextlib.suppress(DBAPIError):
        session.close()
    pid = read()
    # through @transactional: the same
    close_the_pooled_connection(pid)
    with pytest.raises(Exception) as info:
        read()
    assert isinstance(info.value, DBAPIError), (
        f"@transactional let the driver's own {type(info.value).__module__}."
        f"{type(info.value).__name__} through: {info.value}"
    )
    # as SQLAlchemy alone tells a lost connection (its is_disconnect, per driver)
    assert info.value.connection_invalidated == plain.value.connection_invalidated
    assert locksafe.classify(info.value) is None
    assert read() != pid  # a new connection


@pytest.mark.cells(*SIZE.fault_cells)
def test_a_connection_lost_inside_a_lock_timeout_block_is_not_hidden(cell: Cell) -> None:
    """The server kills the connection inside a ``locksafe.lock_timeout()`` block, after its
    last statement: the call must fail with the connection error (a ``DBAPIError`` whose
    connection is invalidated, raised or in the chain of what is raised), nothing committed.

    LIBRARY BUG (PostgreSQL; found by the kill storm above): setting ``lock_timeout`` back at
    the block's end fails on the dead connection, and ``LockTimeout._set_back`` swallows every
    ``DBAPIError`` there (meant for a transaction the server already aborted, logged at DEBUG),
    the connection loss included. The block ends as if nothing happened; the decorator's COMMIT
    then raises ``PendingRollbackError: Can't reconnect until invalid transaction is rolled
    back``, with no trace of the connection loss (no ``__cause__``, no ``__context__``)."""
    cell.create_all(metadata)
    admin = cell.sync_engine()
    seed_bank(admin)
    engine = server_engine(cell, pool_size=1)

    with OtherConnection(cell.admin_url) as killer:

        @transactional(sessionmaker=sessionmaker(engine))
        def call(t: Transfer, *, session: Session = NEW_SESSION) -> None:
            with locksafe.lock_timeout(session, 2):
                apply_transfer(session, t, short_timeout=2)
                pid = session.execute(text(PID_SQL[cell.backend])).scalar_one()
                killer.execute(kill_sql(cell.backend, pid))
                if cell.backend == "mariadb":
                    time.sleep(0.2)  # KILL is asynchronous there

        with pytest.raises(Exception) as info:
            call(transfer("killed"))
    lost = [e for e in chain(info.value) if isinstance(e, DBAPIError) and e.connection_invalidated]
    assert lost, (
        f"the connection loss is hidden: {type(info.value).__name__}: {info.value} "
        f"(chain: {[type(e).__name__ for e in chain(info.value)]})"
    )
    assert not is_retryable_lock_error(info.value)
    audit(admin).check(set())


# -- a SQLite writer process SIGKILLed in the middle of its transaction -----------------------


def sqlite_bank(tmp_path: Path, journal_mode: str) -> tuple[Path, Any]:
    database = tmp_path / "bank.sqlite"
    admin = create_engine(f"sqlite:///{database}", connect_args={"timeout": 30})
    with admin.connect() as conn:
        conn.exec_driver_sql(f"PRAGMA journal_mode = {journal_mode}")
    metadata.create_all(admin)
    seed_bank(admin)
    return database, admin


def integrity(admin: Any) -> str:
    with admin.connect() as conn:
        return "; ".join(row[0] for row in conn.exec_driver_sql("PRAGMA integrity_check"))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def later_calls_work(database: Path, admin: Any, committed: set[str], unknown: set[str]) -> None:
    engine = locksafe.sqlite.configure(create_engine(f"sqlite:///{database}"), journal_mode=None)

    @transactional(sessionmaker=sessionmaker(engine))
    def call(t: Transfer, *, session: Session = NEW_SESSION) -> None:
        apply_transfer(session, t, short_timeout=1.0)

    later = {f"later-{n}" for n in range(5)}
    for n in range(5):
        call(transfer(f"later-{n}"))
    engine.dispose()
    audit(admin).check(committed | later, unknown=unknown)


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_a_sqlite_writer_killed_holding_the_write_lock(tmp_path: Path, journal_mode: str) -> None:
    """One writer process stops after its first leg, with 3,000 ballast rows written in the
    same transaction (a small page cache: they reach the WAL / the database file), holding the
    write lock, while three others wait for it; SIGKILL. The others go on (every call commits
    or raises LockUnavailable), the killed transaction left nothing, the database is intact."""
    database, admin = sqlite_bank(tmp_path, journal_mode)
    victim_out = tmp_path / "victim.out"
    victim = start_writer(
        database, "victim", 3, 1, journal_mode=journal_mode, out=victim_out, hang_at=0
    )
    outs = [tmp_path / f"w{i}.out" for i in range(3)]
    writers: list[Any] = []
    try:
        wait_for(lambda: read_writer_log(victim_out).mid != [], 60, "the victim's first leg")
        writers = [
            start_writer(database, f"w{i}", 30, 10 + i, journal_mode=journal_mode, out=out)
            for i, out in enumerate(outs)
        ]
        # the others are up and waiting for the write lock the victim holds
        wait_for(lambda: all(read_writer_log(o).begun for o in outs), 60, "the writers")
        time.sleep(0.3)
        assert all(read_writer_log(o).ok == set() for o in outs), "the write lock was not held"
        sigkill(victim.pid)
        assert victim.wait(10) == -9
        for writer in writers:
            assert writer.wait(90) == 0, read_writer_log(outs[writers.index(writer)]).other
    finally:
        for process in (victim, *writers):
            if process.poll() is None:
                sigkill(process.pid)
                process.wait(10)

    logs = [read_writer_log(out) for out in outs]
    victim_log = read_writer_log(victim_out)
    assert victim_log.mid == ["victim-0"]
    assert victim_log.ok == set()
    committed: set[str] = set()
    for log in logs:
        assert not log.errors, log.errors
        assert not log.other, log.other
        assert len(log.ok) + len(log.unavailable) == 30
        committed |= log.ok
    assert len(committed) >= 45, "most calls must commit"
    assert integrity(admin) == "ok"
    with admin.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ballast)).scalar_one() == 0
    # the killed transfer is not there, not even its first leg
    audit(admin).check(committed)
    later_calls_work(database, admin, committed, set())


@pytest.mark.timeout(300 if SIZE.kill_rounds > 10 else 120)
def test_sqlite_writers_killed_at_random(tmp_path: Path) -> None:
    """``kill_rounds`` times: three writer processes run transfers, one of them (at random) is
    SIGKILLed at a random moment and replaced. The survivors report every call committed or
    LockUnavailable; each killed writer's call in flight is the only one whose outcome is
    unknown; the bank holds and the database is intact."""
    database, admin = sqlite_bank(tmp_path, "wal")
    rng = random.Random(11)
    running: list[tuple[Any, Path]] = []
    finished: list[tuple[Any, Path]] = []
    killed: list[Path] = []
    started = 0

    def start() -> None:
        nonlocal started
        out = tmp_path / f"r{started}.out"
        running.append(
            (
                start_writer(
                    database, f"r{started}", 40, 100 + started, journal_mode="wal", out=out
                ),
                out,
            )
        )
        started += 1

    try:
        for _ in range(3):
            start()
        while len(killed) < SIZE.kill_rounds:
            for entry in [(p, o) for p, o in running if p.poll() is not None]:
                running.remove(entry)
                finished.append(entry)
                start()
            process, out = rng.choice(running)
            # kill it in the middle of its work: once it has begun a few calls, at a random
            # moment after that
            calls = rng.randint(1, 30)
            wait_for(
                lambda p=process, o=out, n=calls: (
                    p.poll() is not None or len(read_writer_log(o).begun) >= n
                ),
                60,
                "the writer's calls",
            )
            time.sleep(rng.uniform(0, 0.02))
            if process.poll() is not None:
                continue  # it finished first: it counts as finished, above
            sigkill(process.pid)
            process.wait(10)
            running.remove((process, out))
            killed.append(out)
            start()
        for process, out in running:
            assert process.wait(120) == 0, read_writer_log(out).other
            finished.append((process, out))
    finally:
        for process, _ in running:
            if process.poll() is None:
                sigkill(process.pid)
                process.wait(10)

    committed: set[str] = set()
    unknown: set[str] = set()
    calls = 0
    for _, out in finished:
        log = read_writer_log(out)
        assert not log.errors, log.errors
        assert not log.other, log.other
        assert len(log.ok) + len(log.unavailable) == 40
        committed |= log.ok
        calls += 40
    for out in killed:
        log = read_writer_log(out)
        assert not log.errors, log.errors
        assert len(log.in_flight) <= 1, log.in_flight
        committed |= log.ok
        unknown |= log.in_flight
        calls += len(log.begun)
    print(
        f"\n{len(killed)} writers killed, {started} started: {calls} calls, "
        f"{len(committed)} committed, {len(unknown)} in flight when killed"
    )
    assert len(killed) == SIZE.kill_rounds
    assert integrity(admin) == "ok"
    audit(admin).check(committed, unknown=unknown)
    later_calls_work(database, admin, committed, unknown)


# -- the PostgreSQL server stopped and started again during a run ----------------------------


@pytest.mark.timeout(240)
def test_postgresql_stopped_and_restarted_during_a_run() -> None:
    """Workers run transfers on a private PostgreSQL; it is stopped (fast shutdown: every
    session aborted), left down for a second, and started again. Calls in flight and calls
    while it is down raise the connection error (not a lock error, not retried); calls after
    the restart commit, on the same engine; the bank holds."""
    with private_postgresql() as server:
        url = server.url.replace("postgresql://", "postgresql+psycopg://")
        admin = create_engine(url.replace("+psycopg", "+psycopg2"), poolclass=NullPool)
        engine = create_engine(url, pool_size=4, max_overflow=4)
        on_connect(engine, "SET deadlock_timeout = '50ms'", "SET lock_timeout = '10s'")
        try:
            metadata.create_all(admin)
            seed_bank(admin)
            tally = Tally()
            phase = {"name": "before"}
            by_phase: dict[str, set[str]] = {
                name: set() for name in ("before", "stopping", "down", "starting", "after")
            }
            done = threading.Event()

            @transactional(
                sessionmaker=sessionmaker(engine),
                attempts=10,
                on_retry=tally.on_retry,
                wait_max=0.05,
            )
            def call(t: Transfer, *, session: Session = NEW_SESSION) -> None:
                tally.attempt(t)
                apply_transfer(session, t, short_timeout=SHORT_LOCK_TIMEOUT["postgresql"])

            def worker(index: int) -> None:
                for t in plan(f"s{index}", 100_000, seed=index):
                    if done.is_set():
                        return
                    tally.begin_call(t)
                    started_in = phase["name"]
                    try:
                        call(t)
                    except Exception as exc:
                        tally.outcome(t, exc, expected=is_connection_error)
                        if is_connection_error(exc):
                            time.sleep(0.05)  # the server is down: do not spin
                    else:
                        tally.outcome(t, None)
                        if phase["name"] == started_in:
                            by_phase[started_in].add(t.call_id)

            def conductor() -> None:
                try:
                    wait_for(lambda: len(tally.committed) >= 40, 60, "40 commits")
                    phase["name"] = "stopping"
                    server.stop()
                    phase["name"] = "down"
                    time.sleep(1.0)
                    phase["name"] = "starting"
                    server.start()
                    phase["name"] = "after"
                    wait_for(lambda: len(by_phase["after"]) >= 40, 60, "40 commits after")
                finally:
                    done.set()

            run_threads([conductor, *[lambda i=i: worker(i) for i in range(4)]], deadline=200)
            print(f"\nstop / restart: {tally.summary()}")

            assert not tally.errors, f"{len(tally.errors)} unhandled: {tally.unhandled()}"
            assert tally.expected_errors, "the stop went unnoticed"
            assert not by_phase["down"], "a call committed while the server was down"
            assert len(by_phase["after"]) >= 40, "calls after the restart did not commit"
            assert "NOT A LOCK ERROR" not in tally.retried_kinds(), "a connection error was retried"
            for call_id, _ in tally.expected_errors:
                assert tally.attempts[call_id] == tally.retries[call_id] + 1, call_id
            unknown = {call_id for call_id, _ in tally.expected_errors}
            audit(admin).check(tally.committed, unknown=unknown)
            with admin.connect() as conn:  # the server's own view of the table is sound
                conn.exec_driver_sql("SELECT count(*) FROM rel_transfers").scalar_one()
        finally:
            engine.dispose()
            admin.dispose()


def test_sqlite_integrity_check_reports_damage(tmp_path: Path) -> None:
    """The integrity check above can fail: on a database file whose pages were overwritten it
    does not answer ``ok``."""
    database, admin = sqlite_bank(tmp_path, "delete")
    with admin.begin() as conn:
        conn.execute(ballast.insert(), [{"payload": "y" * 300} for _ in range(500)])
    admin.dispose()
    raw = bytearray(database.read_bytes())
    page = 4096
    for offset in range(2 * page, len(raw) - page, 3 * page):
        raw[offset + 100 : offset + 400] = b"\xff" * 300
    database.write_bytes(bytes(raw))
    try:
        result = integrity(admin)
    except sqlite3.DatabaseError as exc:  # "database disk image is malformed": also not ok
        result = str(exc)
    except DBAPIError as exc:
        result = str(exc)
    assert result != "ok"
