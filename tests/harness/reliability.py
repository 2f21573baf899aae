"""Shared by the reliability suite (``tests/test_reliability_*.py``): its size, the bank (accounts,
the committed-transfer log, one transfer through ``@transactional``), the invariant audit read
from a second connection, and a PostgreSQL server that can be stopped and started again.

Two sizes, chosen by one environment variable:

- ``LOCKSAFE_RELIABILITY`` unset or ``ci``: the size CI runs (each file well under a minute);
- ``LOCKSAFE_RELIABILITY=full``: 10,000 contended transfers per driver cell, on every driver cell
  (async ones included), the fault scenarios on every server driver, and 400 fuzzed examples
  per function (random, not the fixed CI ones) on every driver cell::

      LOCKSAFE_RELIABILITY=full pytest tests/test_reliability_*.py

Anything else is an error at collection, not a silent fallback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import locksafe
from locksafe import LockUnavailable, RetryDetails, with_row_locks

# -- the size -----------------------------------------------------------------------------------

LEVEL = os.environ.get("LOCKSAFE_RELIABILITY", "ci").strip().lower() or "ci"
if LEVEL not in ("ci", "full"):
    raise RuntimeError(
        f"LOCKSAFE_RELIABILITY={os.environ['LOCKSAFE_RELIABILITY']!r}: must be 'ci' (the default) "
        "or 'full'"
    )
FULL = LEVEL == "full"


@dataclass(frozen=True)
class Size:
    #: Contended transfer calls per driver cell in the bank test.
    transfers: int
    #: Worker threads per driver cell.
    threads: int
    #: Driver cells of the bank test (names or backends, as ``@pytest.mark.cells`` takes them).
    bank_cells: tuple[str, ...]
    #: Driver cells of the server fault tests (kills).
    fault_cells: tuple[str, ...]
    #: Kill rounds in the storms (server kills, SIGKILLed SQLite writers).
    kill_rounds: int
    #: Hypothesis examples per fuzzed function.
    examples: int
    #: Driver cells of the fuzz tests that run on a database.
    fuzz_cells: tuple[str, ...]
    #: pytest-timeout for one bank cell, seconds.
    bank_timeout: float


CI_SIZE = Size(
    transfers=240,
    threads=6,
    bank_cells=("sqlite+pysqlite", "postgresql+psycopg", "mysql+pymysql"),
    fault_cells=("postgresql+psycopg", "mysql+pymysql"),
    kill_rounds=6,
    examples=60,
    fuzz_cells=("sqlite+pysqlite", "postgresql+psycopg", "mysql+pymysql"),
    bank_timeout=120,
)
FULL_SIZE = Size(
    transfers=10_000,
    threads=8,
    bank_cells=("sqlite", "postgresql", "mariadb"),  # every driver cell, async ones included
    fault_cells=(
        "postgresql+psycopg",
        "postgresql+psycopg2",
        "postgresql+pg8000",
        "mysql+pymysql",
        "mysql+mysqldb",
        "mysql+mysqlconnector",
        "mariadb+mariadbconnector",
    ),
    kill_rounds=30,
    examples=400,
    fuzz_cells=("sqlite", "postgresql", "mariadb"),  # every driver cell, async ones included
    bank_timeout=1800,
)
SIZE = FULL_SIZE if FULL else CI_SIZE

# -- the bank -------------------------------------------------------------------------------------

metadata = MetaData()
accounts = Table(
    "rel_accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("balance", BigInteger, nullable=False),
)
#: One row per committed transfer, written in the transfer's own transaction: the record the
#: balances are checked against. ``call_id`` is unique: a call committed twice cannot hide.
transfers = Table(
    "rel_transfers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("call_id", String(40), nullable=False, unique=True),
    Column("src", Integer, nullable=False),
    Column("dst", Integer, nullable=False),
    Column("amount", Integer, nullable=False),
)

#: Written by a transfer that a test kills mid-transaction, to make that transaction big
#: (SQLite writes it to the WAL / database file before the COMMIT): none may survive.
ballast = Table(
    "rel_ballast",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("payload", String(300), nullable=False),
)

ACCOUNTS = 6
INITIAL = 1_000_000

#: How each transfer fails when it cannot have its locks: the server's deadlock detector (rows
#: locked in the order the transfer names them, a short pause between the two), a short
#: ``locksafe.lock_timeout``, or ``with_row_locks(nowait=True)``.
MODES = ("deadlock", "timeout", "nowait")
#: NOWAIT fails at once and holds nothing for long; deadlocks need two transfers that wait.
MODE_WEIGHTS = {"deadlock": 3, "timeout": 2, "nowait": 1}

#: The short ``lock_timeout`` of the "timeout" mode, per backend (MariaDB counts whole seconds,
#: 1 at least).
SHORT_LOCK_TIMEOUT = {"sqlite": 0.02, "postgresql": 0.05, "mariadb": 1.0}


@dataclass(frozen=True)
class Transfer:
    call_id: str
    src: int
    dst: int
    amount: int
    mode: str
    #: Seconds between locking the first row and the second (widens the deadlock window).
    pause: float


def plan(
    worker: str,
    count: int,
    seed: int,
    *,
    long_pause: float = 0.0,
    long_fraction: float = 0.0,
    modes: tuple[str, ...] = MODES,
) -> list[Transfer]:
    """``count`` transfers between random accounts, in random lock order, in random modes.

    Deadlock-mode transfers pause a few milliseconds between their two locks; a
    ``long_fraction`` of all transfers holds the first lock ``long_pause`` seconds instead
    (longer than the short lock timeout, so that waiters behind it do time out)."""
    rng = random.Random(seed)
    planned = []
    for n in range(count):
        src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
        mode = rng.choices(modes, weights=[MODE_WEIGHTS[m] for m in modes])[0]
        if rng.random() < long_fraction:
            pause = long_pause
        elif mode == "deadlock":
            pause = rng.choice((0.001, 0.003, 0.005))
        else:
            pause = rng.choice((0.0, 0.001))
        planned.append(
            Transfer(
                call_id=f"{worker}-{n}",
                src=src,
                dst=dst,
                amount=rng.randint(1, 1000),
                mode=mode,
                pause=pause,
            )
        )
    return planned


def seed_bank(engine: Engine) -> None:
    """Fresh balances and an empty log (the tables exist)."""
    with engine.begin() as conn:
        conn.execute(transfers.delete())
        conn.execute(accounts.delete())
        conn.execute(
            insert(accounts), [{"id": i, "balance": INITIAL} for i in range(1, ACCOUNTS + 1)]
        )


def apply_transfer(
    session: Session,
    t: Transfer,
    *,
    short_timeout: float,
    locked: bool = True,
    after_debit: Callable[[Session, Transfer], object] | None = None,
) -> None:
    """One transfer: lock both rows (in the order given), read, write both balances from what
    was read (a read-modify-write: an update is lost unless the reads were locked), log it.
    ``after_debit`` runs between the two writes (where a fault makes a half transfer)."""
    block = (
        locksafe.lock_timeout(session, short_timeout)
        if t.mode == "timeout"
        else contextlib.nullcontext()
    )
    with block:
        seen: dict[int, int] = {}
        for i, account in enumerate((t.src, t.dst)):
            query = select(accounts.c.balance).where(accounts.c.id == account)
            if locked:
                query = with_row_locks(query, session, nowait=t.mode == "nowait")
            seen[account] = session.execute(query).scalar_one()
            if i == 0 and t.pause:
                time.sleep(t.pause)
        session.execute(
            update(accounts).where(accounts.c.id == t.src).values(balance=seen[t.src] - t.amount)
        )
        if after_debit is not None:
            after_debit(session, t)
        session.execute(
            update(accounts).where(accounts.c.id == t.dst).values(balance=seen[t.dst] + t.amount)
        )
        session.execute(
            insert(transfers).values(call_id=t.call_id, src=t.src, dst=t.dst, amount=t.amount)
        )


# -- counting what happened ---------------------------------------------------------------------


@dataclass
class Tally:
    """What the calls did, counted from the caller's side (thread-safe)."""

    committed: set[str] = field(default_factory=set)
    #: Calls that raised LockUnavailable, by kind.
    unavailable: Counter[str] = field(default_factory=Counter)
    #: Failed attempts that @transactional retried, by (mode, kind).
    retried: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Calls that raised anything else: (call id, exception).
    errors: list[tuple[str, BaseException]] = field(default_factory=list)
    #: Calls that raised an error the test expects (a connection error, in the fault tests).
    expected_errors: list[tuple[str, BaseException]] = field(default_factory=list)
    #: Attempts begun, per call id.
    attempts: Counter[str] = field(default_factory=Counter)
    #: on_retry calls per call id.
    retries: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)

    def begin_call(self, t: Transfer) -> None:
        self._local.transfer = t

    def attempt(self, t: Transfer) -> None:
        with self._lock:
            self.attempts[t.call_id] += 1

    def on_retry(self, details: RetryDetails) -> None:
        t: Transfer = self._local.transfer
        kind = details.kind.value if details.kind is not None else "NOT A LOCK ERROR"
        with self._lock:
            self.retried[(t.mode, kind)] += 1
            self.retries[t.call_id] += 1

    def outcome(
        self,
        t: Transfer,
        error: BaseException | None,
        expected: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        with self._lock:
            if error is None:
                self.committed.add(t.call_id)
            elif isinstance(error, LockUnavailable):
                self.unavailable[error.kind.value] += 1
            elif expected(error):
                self.expected_errors.append((t.call_id, error))
            else:
                self.errors.append((t.call_id, error))

    def retried_kinds(self) -> Counter[str]:
        kinds: Counter[str] = Counter()
        for (_, kind), n in self.retried.items():
            kinds[kind] += n
        return kinds

    def retried_modes(self) -> Counter[str]:
        modes: Counter[str] = Counter()
        for (mode, _), n in self.retried.items():
            modes[mode] += n
        return modes

    def summary(self) -> str:
        return (
            f"committed {len(self.committed)}, LockUnavailable {dict(self.unavailable)}, "
            f"expected errors {len(self.expected_errors)}, unhandled {len(self.errors)}; "
            f"retried attempts by kind {dict(self.retried_kinds())}, by mode "
            f"{dict(self.retried_modes())}"
        )

    def unhandled(self, limit: int = 5) -> str:
        return "; ".join(f"{cid}: {type(e).__name__}: {e}" for cid, e in self.errors[:limit])


def run_threads(bodies: Iterable[Callable[[], None]], *, deadline: float) -> None:
    """Run each body in its own thread, all at once; fail if one is still running after
    ``deadline`` seconds or raised (a body records its calls' errors itself)."""
    crashed: list[BaseException] = []

    def guard(body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:
            crashed.append(exc)

    threads = [
        threading.Thread(target=guard, args=(body,), name=f"rel-worker-{i}", daemon=True)
        for i, body in enumerate(bodies)
    ]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    alive = [thread.name for thread in threads if thread.is_alive()]
    assert not alive, f"workers still running after {deadline:.0f} s: {alive}"
    if crashed:
        raise crashed[0]


# -- the audit, from a second connection -------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    total: int
    balances: dict[int, int]
    #: Per account, what the committed-transfer log says the balance must be.
    expected: dict[int, int]
    logged: frozenset[str]
    #: Log rows per call id above one (impossible with the unique constraint; checked anyway).
    duplicates: int

    @property
    def lost_updates(self) -> dict[int, int]:
        """Accounts whose balance is not what the log says, with the difference."""
        return {
            account: self.balances.get(account, 0) - want
            for account, want in self.expected.items()
            if self.balances.get(account, 0) != want
        }

    def check(
        self, committed: set[str], *, unknown: Iterable[str] = (), accounts_n: int = ACCOUNTS
    ) -> None:
        """The bank invariants: total conserved, no lost update (every balance is what the
        log says), every call reported committed is logged, and nothing is logged that was
        not reported committed — except calls whose outcome is ``unknown`` (an error that
        may hide a successful COMMIT)."""
        assert self.total == accounts_n * INITIAL, (
            f"total balance {self.total} != {accounts_n * INITIAL}: money created or destroyed"
        )
        assert not self.lost_updates, f"lost updates (balance - logged): {self.lost_updates}"
        assert self.duplicates == 0, f"{self.duplicates} calls logged more than once"
        missing = committed - self.logged
        assert not missing, f"{len(missing)} calls reported committed are not in the log: " + (
            ", ".join(sorted(missing)[:5])
        )
        phantom = self.logged - committed - set(unknown)
        assert not phantom, (
            f"{len(phantom)} calls are in the log but raised (or never ran): "
            + ", ".join(sorted(phantom)[:5])
        )


def audit(engine: Engine) -> Audit:
    """Read the bank from a connection of its own, in one transaction."""
    with engine.connect() as conn:
        balances = {row.id: int(row.balance) for row in conn.execute(select(accounts))}
        rows = conn.execute(
            select(transfers.c.call_id, transfers.c.src, transfers.c.dst, transfers.c.amount)
        ).all()
        total = int(conn.execute(select(func.sum(accounts.c.balance))).scalar_one() or 0)
    expected = dict.fromkeys(balances, INITIAL)
    ids: Counter[str] = Counter()
    for call_id, src, dst, amount in rows:
        expected[src] = expected.get(src, INITIAL) - amount
        expected[dst] = expected.get(dst, INITIAL) + amount
        ids[call_id] += 1
    return Audit(
        total=total,
        balances=balances,
        expected=expected,
        logged=frozenset(ids),
        duplicates=sum(n - 1 for n in ids.values()),
    )


# -- engines ------------------------------------------------------------------------------------


def on_connect(engine: Any, *statements: str) -> None:
    """Run ``statements`` on every new DB-API connection of ``engine`` (sync or async)."""
    sync = getattr(engine, "sync_engine", engine)

    @event.listens_for(sync, "connect")
    def _settings(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for sql in statements:
                cursor.execute(sql)
        finally:
            cursor.close()
        dbapi_connection.commit()


def is_connection_error(exc: BaseException) -> bool:
    """What SQLAlchemy raises for a killed connection or a stopped server, and is no lock
    error: a ``DBAPIError`` that ``classify()`` calls nothing — or the ``OSError`` of a driver
    that reads its socket itself (pg8000's ``ConnectionResetError``), which SQLAlchemy passes on
    unwrapped without locksafe too. A driver's own DB-API exception is *not* one: SQLAlchemy
    wraps those, so one that escapes unwrapped went round SQLAlchemy."""
    if locksafe.classify(exc) is not None:
        return False
    return isinstance(exc, (DBAPIError, OSError))


# -- a PostgreSQL that can be stopped and started again ---------------------------------------


@contextlib.contextmanager
def private_postgresql() -> Iterator[RestartablePostgres]:
    """A throw-away PostgreSQL of this test alone (tests/servers.py), stopped at the end."""
    from harness import servers

    server = servers.start_postgresql()
    try:
        yield RestartablePostgres(server)
    finally:
        server.stop()


class RestartablePostgres:
    """Stops the server (``pg_ctl stop -m fast``: sessions aborted, as a crash-free shutdown
    does) and starts it again on the same port and data directory."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.url: str = server.url
        self.data = Path(server.base_dir) / "data"

    def _pg_ctl(self, *args: str, timeout: float = 90) -> None:
        from harness import servers

        pg_ctl = str(
            Path(servers._find("initdb", servers.PG_BIN, dirs_first=True)).with_name("pg_ctl")
        )
        argv = [str(a) for a in servers._as_user("postgres", [pg_ctl, "-D", str(self.data), *args])]
        subprocess.run(
            argv,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )

    def stop(self) -> None:
        self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")

    def start(self) -> None:
        from harness import servers

        options = ["-p", str(self.server.port), "-k", str(self.server.base_dir)]
        for setting in (
            "listen_addresses=127.0.0.1",
            "max_connections=200",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ):
            options += ["-c", setting]
        log = str(Path(self.server.base_dir) / "postgresql.log")
        self._pg_ctl("-l", log, "-w", "-t", "60", "-o", " ".join(options), "start")
        # The server object (and its watchdog) must follow the new postmaster, so that the
        # test run's clean-up stops this one and not a pid that is gone.
        pid = servers._postmaster_pid(self.data)
        assert pid is not None, "PostgreSQL restarted but left no postmaster.pid"
        servers._forget(self.server)
        self.server.pid = pid
        self.server._starttime = servers._starttime(pid)
        self.server._stopped = False
        servers._remember(self.server)


def sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# -- a SQLite writer process (run as a script: ``python tests/reliability.py writer ...``) ----

WRITER_LINES = ("BEGIN", "OK", "UNAVAILABLE", "ERROR", "MID")


def start_writer(
    database: Path,
    name: str,
    count: int,
    seed: int,
    *,
    journal_mode: str,
    out: Path,
    hang_at: int = -1,
) -> subprocess.Popen[bytes]:
    """A process that runs ``count`` transfers on the SQLite ``database`` through
    ``@transactional`` and writes a line per step to ``out`` (``BEGIN id``, then ``OK id``,
    ``UNAVAILABLE id kind`` or ``ERROR id ...``). With ``hang_at``, that transfer writes a
    ballast of rows, prints ``MID id`` after its first leg and waits there, holding the write
    lock, for the test to kill it."""
    import sys

    import locksafe as package

    env = dict(os.environ)
    source = str(Path(package.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH", "")]))
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "writer",
        str(database),
        name,
        str(count),
        str(seed),
        journal_mode,
        str(hang_at),
    ]
    with out.open("wb") as stdout:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT, env=env
        )


@dataclass
class WriterLog:
    begun: list[str] = field(default_factory=list)
    ok: set[str] = field(default_factory=set)
    unavailable: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    mid: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    @property
    def in_flight(self) -> set[str]:
        """Begun, never reported: the call a kill interrupted (its outcome unknown)."""
        return set(self.begun) - self.ok - self.unavailable - {e.split()[0] for e in self.errors}


def read_writer_log(path: Path) -> WriterLog:
    found = WriterLog()
    for line in path.read_text(errors="replace").splitlines():
        word, _, rest = line.partition(" ")
        if word == "BEGIN":
            found.begun.append(rest)
        elif word == "OK":
            found.ok.add(rest)
        elif word == "UNAVAILABLE":
            found.unavailable.add(rest.split()[0])
        elif word == "ERROR":
            found.errors.append(rest)
        elif word == "MID":
            found.mid.append(rest)
        elif line.strip():
            found.other.append(line)
    return found


def _writer(argv: list[str]) -> int:
    import sys

    from sqlalchemy import create_engine, insert
    from sqlalchemy.orm import sessionmaker

    import locksafe.sqlite
    from locksafe import NEW_SESSION, transactional

    database, name, count, seed, journal_mode, hang_at = argv
    # retries are counted by the test from the lines below, not logged (warnings would mix in)
    logging.getLogger("locksafe.transactions").setLevel(logging.ERROR)
    engine = create_engine(f"sqlite:///{database}")
    locksafe.sqlite.configure(engine, busy_timeout=20, journal_mode=journal_mode)
    hang = int(hang_at)
    if hang >= 0:
        # A small page cache: the ballast spills to the WAL / the database file before COMMIT.
        on_connect_sqlite = "PRAGMA cache_size = 20"

        @event.listens_for(engine, "connect")
        def _small_cache(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.execute(on_connect_sqlite)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def hang_here(session: Session, t: Transfer) -> None:
        session.execute(insert(ballast), [{"payload": "x" * 300} for _ in range(3000)])
        say(f"MID {t.call_id}")
        time.sleep(600)

    @transactional(sessionmaker=sessionmaker(engine), attempts=10, wait_max=0.05)
    def call(t: Transfer, n: int, *, session: Session = NEW_SESSION) -> None:
        apply_transfer(
            session,
            t,
            short_timeout=SHORT_LOCK_TIMEOUT["sqlite"],
            after_debit=hang_here if n == hang else None,
        )

    for n, t in enumerate(plan(name, int(count), int(seed))):
        say(f"BEGIN {t.call_id}")
        try:
            call(t, n)
        except LockUnavailable as exc:
            say(f"UNAVAILABLE {t.call_id} {exc.kind.value}")
        except Exception as exc:
            message = " ".join(f"{type(exc).__name__}: {exc}".split())
            say(f"ERROR {t.call_id} {message}")
        else:
            say(f"OK {t.call_id}")
    engine.dispose()
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["writer"]:
        raise SystemExit("usage: reliability.py writer DATABASE NAME COUNT SEED JOURNAL HANG_AT")
    raise SystemExit(_writer(sys.argv[2:]))
