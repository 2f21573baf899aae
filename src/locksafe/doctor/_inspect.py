"""What the doctor reads from the server before probing: its version, and the settings that
decide how lock waits end, each with locksafe's advice."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from locksafe.doctor._target import SESSION_LOCK_WAIT, Target

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = ["Advice", "ServerFacts", "inspect_server"]


@dataclass(frozen=True)
class Advice:
    """One setting of this database, its value, and what it means for locking here: an item
    of :attr:`Report.advice <locksafe.doctor.Report.advice>`.

    >>> from locksafe.doctor import DoctorInterrupted, Progress, diagnose
    >>> class Inspected(Progress):  # keeps the report, then stops the run, as Ctrl-C would
    ...     def ready(self, report):
    ...         self.report = report
    ...         raise KeyboardInterrupt
    >>> progress = Inspected()
    >>> try:
    ...     diagnose(progress=progress)  # embedded SQLite
    ... except DoctorInterrupted:
    ...     pass
    >>> journal_mode = progress.report.advice[1]
    >>> journal_mode
    Advice(setting='journal_mode', value='wal', advice='readers and the writer do not block each other', warning=False)
    >>> journal_mode.as_dict()["warning"]
    False
    """  # noqa: E501

    #: The setting, or what was looked at: ``"lock_timeout"``, ``"innodb_lock_wait_timeout"``,
    #: ``"journal_mode"``, ``"engine set-up"``...
    setting: str
    #: Its value here: ``"0 (no bound)"``, ``"50 s"``, ``"wal"``, ``"ON"``...
    value: str
    #: What it means for locking on this database, and what to change if it is worth changing.
    advice: str
    #: Worth changing (shown with ``!``), not only worth knowing.
    warning: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The item as JSON-ready data (an item of ``advice`` in ``locksafe doctor --json``)."""
        return {
            "setting": self.setting,
            "value": self.value,
            "advice": self.advice,
            "warning": self.warning,
        }


@dataclass
class ServerFacts:
    version: str
    advice: list[Advice] = field(default_factory=list)
    #: PostgreSQL's deadlock_timeout, in seconds (how long a deadlock lasts before detection).
    deadlock_timeout: float = 1.0
    #: MySQL / MariaDB: the storage engine tables get by default.
    default_engine: str | None = None


def inspect_server(conn: Connection, target: Target) -> ServerFacts:
    """Read the server's version and lock-related settings on ``conn`` (a connection as the
    application would have it: none of the doctor's own bounds)."""
    try:
        if target.backend == "postgresql":
            return _postgresql(conn)
        if target.backend == "mysql":
            return _mysql(conn, target)
        return _sqlite(conn, target)
    finally:
        conn.rollback()


def _scalar(conn: Connection, sql: str) -> Any:
    return conn.execute(text(sql)).scalar()


def _optional(conn: Connection, sql: str) -> Any:
    """A setting the server may not have (older or other versions): ``None`` then."""
    try:
        with conn.begin_nested():
            return _scalar(conn, sql)
    except DBAPIError:
        return None


# -- PostgreSQL ---------------------------------------------------------------------------------


def _pg_seconds(setting: str, unit: str | None) -> float:
    value = float(setting)
    return value / 1000 if unit == "ms" else value if unit == "s" else value / 1000


def _postgresql(conn: Connection) -> ServerFacts:
    version = str(_scalar(conn, "SHOW server_version"))
    rows = conn.execute(
        text(
            "SELECT name, setting, unit, current_setting(name) AS shown FROM pg_settings "
            "WHERE name IN ('lock_timeout', 'deadlock_timeout', "
            "'default_transaction_isolation', 'statement_timeout', "
            "'idle_in_transaction_session_timeout')"
        )
    ).all()
    settings = {row.name: row for row in rows}
    facts = ServerFacts(version=f"PostgreSQL {version}")
    advice = facts.advice
    lock = settings.get("lock_timeout")
    if lock is not None:
        if float(lock.setting) == 0:
            advice.append(
                Advice(
                    "lock_timeout",
                    "0 (no bound)",
                    "a request blocked on a row waits until the holder's transaction ends; "
                    "bound the waits: locksafe.lock_timeout(session, seconds) in a block, or "
                    "@transactional(timeout=...), a deadline lock waits included",
                    warning=True,
                )
            )
        else:
            advice.append(
                Advice(
                    "lock_timeout",
                    lock.shown,
                    "lock waits end after this with SQLSTATE 55P03 (classify: lock_timeout), "
                    "which @transactional retries",
                )
            )
    deadlock = settings.get("deadlock_timeout")
    if deadlock is not None:
        facts.deadlock_timeout = _pg_seconds(deadlock.setting, deadlock.unit)
        advice.append(
            Advice(
                "deadlock_timeout",
                deadlock.shown,
                "a deadlock is found after this wait (40P01, classify: deadlock); "
                "@transactional runs the victim's transaction again — and by default its "
                f"early attempts end lock waits sooner (early_lock_timeout={_early_default()} "
                "s, doubling; none on the last attempt), so a deadlock costs milliseconds, "
                "not this wait",
            )
        )
    isolation = settings.get("default_transaction_isolation")
    if isolation is not None:
        level = str(isolation.shown)
        if level == "read committed":
            note = (
                "a locking SELECT (with_row_locks) reads the latest committed row: "
                "read-modify-write under it loses nothing"
            )
        else:
            note = (
                "a transaction that read a row before another one changed it fails with "
                "SQLSTATE 40001 (classify: serialization_failure) when it writes or locks it; "
                "@transactional retries it — lock before reading what you will change"
            )
        advice.append(Advice("default_transaction_isolation", level, note))
    statement = settings.get("statement_timeout")
    if statement is not None and float(statement.setting) != 0:
        advice.append(
            Advice(
                "statement_timeout",
                statement.shown,
                "statements are cancelled after this (57014, classify: statement_timeout, "
                "never retried): keep it above your lock waits",
            )
        )
    idle = settings.get("idle_in_transaction_session_timeout")
    if idle is not None and float(idle.setting) != 0:
        advice.append(
            Advice(
                "idle_in_transaction_session_timeout",
                idle.shown,
                "a session idle in a transaction this long is ended, and its locks released",
            )
        )
    return facts


# -- MySQL / MariaDB ----------------------------------------------------------------------------


def _mysql(conn: Connection, target: Target) -> ServerFacts:
    version = str(_scalar(conn, "SELECT VERSION()"))
    mariadb = "mariadb" in version.lower()
    facts = ServerFacts(version=("MariaDB " if mariadb else "MySQL ") + version)
    advice = facts.advice
    wait = _optional(conn, "SELECT @@SESSION.innodb_lock_wait_timeout")
    if wait is not None:
        seconds = float(wait)
        advice.append(
            Advice(
                "innodb_lock_wait_timeout",
                f"{seconds:g} s",
                "a request blocked on a row waits this long, then fails with error 1205 "
                "(classify: lock_timeout); bound it per block with locksafe.lock_timeout() "
                "or @transactional(timeout=...) (whole seconds here)",
                warning=seconds > 30,
            )
        )
    isolation = _optional(conn, "SELECT @@SESSION.transaction_isolation")
    if isolation is None:
        isolation = _optional(conn, "SELECT @@SESSION.tx_isolation")
    if isolation is not None:
        level = str(isolation).upper()
        if level == "REPEATABLE-READ":
            note = (
                "InnoDB's default: a locking read (with_row_locks) reads the latest committed "
                "row, a plain read the transaction's snapshot — read what you will write "
                "under with_row_locks, or use READ-COMMITTED; a SKIP LOCKED work queue "
                "deadlocks on next-key locks here (8 workers in bench/: 0.17x of 8 x one "
                "worker, 0.81x under READ-COMMITTED): run its claims in READ-COMMITTED"
            )
        elif level == "READ-COMMITTED":
            note = "every read sees the latest commit; a locking read also locks the row"
        elif level == "SERIALIZABLE":
            note = (
                "plain SELECTs take shared locks: more lock waits and deadlocks, which "
                "@transactional retries"
            )
        else:
            note = "dirty reads: what a transaction reads may never be committed"
        advice.append(
            Advice("transaction_isolation", level, note, warning=level == "READ-UNCOMMITTED")
        )
    snapshot = _optional(conn, "SELECT @@SESSION.innodb_snapshot_isolation")
    if snapshot is not None and int(snapshot):
        advice.append(
            Advice(
                "innodb_snapshot_isolation",
                "ON",
                "a REPEATABLE-READ transaction that writes a row changed after its snapshot "
                "fails with error 1020 (classify: serialization_failure), which "
                "@transactional retries",
            )
        )
    detect = _optional(conn, "SELECT @@GLOBAL.innodb_deadlock_detect")
    if detect is not None:
        on = bool(int(detect))
        advice.append(
            Advice(
                "innodb_deadlock_detect",
                "ON" if on else "OFF",
                "deadlocks are found at once (error 1213, classify: deadlock)"
                if on
                else "deadlocks are not detected: they last innodb_lock_wait_timeout, then end "
                "as lock timeouts; turn it ON unless the server runs thousands of concurrent "
                "transactions",
                warning=not on,
            )
        )
    rollback = _optional(conn, "SELECT @@GLOBAL.innodb_rollback_on_timeout")
    if rollback is not None:
        on = bool(int(rollback))
        advice.append(
            Advice(
                "innodb_rollback_on_timeout",
                "ON" if on else "OFF",
                "a lock wait timeout rolls back the whole transaction, which locksafe cannot "
                "see: do not catch a lock timeout and go on in the same transaction "
                "(@transactional runs it again from its start)"
                if on
                else "a lock wait timeout undoes only the statement; @transactional rolls the "
                "transaction back and runs it again",
                warning=on,
            )
        )
    engine = _optional(conn, "SELECT @@SESSION.default_storage_engine")
    if engine is not None:
        facts.default_engine = str(engine)
        innodb = str(engine).lower() == "innodb"
        advice.append(
            Advice(
                "default_storage_engine",
                str(engine),
                "tables created without ENGINE= get row locks"
                if innodb
                else "tables created without ENGINE= get this engine, which has no row locks: "
                "with_row_locks locks nothing on them",
                warning=not innodb,
            )
        )
    others = conn.execute(
        text(
            "SELECT table_name, engine FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_type = 'BASE TABLE' "
            "AND engine IS NOT NULL AND LOWER(engine) <> 'innodb' "
            "AND table_name NOT LIKE 'locksafe\\_doctor\\_%' ORDER BY table_name"
        )
    ).all()
    if others:
        shown = ", ".join(f"{row[0]} ({row[1]})" for row in others[:5])
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        advice.append(
            Advice(
                "tables without row locks",
                str(len(others)),
                f"{shown}{more}: not InnoDB, so a row lock on them locks nothing (the "
                "engine locks whole tables, one statement at a time); ALTER TABLE ... "
                "ENGINE=InnoDB",
                warning=True,
            )
        )
    return facts


# -- SQLite -------------------------------------------------------------------------------------


def _sqlite(conn: Connection, target: Target) -> ServerFacts:
    facts = ServerFacts(version=f"SQLite {sqlite3.sqlite_version}")
    advice = facts.advice
    journal = str(_scalar(conn, "PRAGMA journal_mode")).lower()
    busy_ms = int(_scalar(conn, "PRAGMA busy_timeout"))
    if target.sqlite_configure:
        how = (
            "locksafe.sqlite.configure(engine) as recommended (WAL, begin='first_write'), with "
            f"busy_timeout={SESSION_LOCK_WAIT} to bound the probes (30 s by default)"
            if target.embedded
            else "locksafe.sqlite.configure(engine, journal_mode=None) (--sqlite-configure; "
            f"the journal mode is the file's own), busy_timeout={SESSION_LOCK_WAIT}"
        )
        advice.append(
            Advice(
                "engine set-up",
                "configure()",
                f"{how}: real BEGIN and SAVEPOINT, BEGIN IMMEDIATE right before a "
                "transaction's first write, writers queue fairly for the write lock, two "
                "sessions of one call get SelfDeadlock at once instead of a hang",
            )
        )
    else:
        advice.append(
            Advice(
                "engine set-up",
                "as the URL gives it",
                "the doctor examines the engine SQLAlchemy makes from the URL, without "
                "locksafe.sqlite.configure(); if the application calls configure(engine) at "
                "start-up (as it should), rerun with --sqlite-configure",
                warning=True,
            )
        )
    advice.append(
        Advice(
            "journal_mode",
            journal,
            "readers and the writer do not block each other"
            if journal == "wal"
            else "a writer's COMMIT waits for every reader, and readers wait for it: "
            "configure() sets WAL (it stays with the file)",
            warning=journal != "wal",
        )
    )
    advice.append(
        Advice(
            "busy_timeout",
            f"{busy_ms / 1000:g} s",
            "how long a writer waits for the write lock before failing (classify: "
            "database_busy, which @transactional retries); configure() sets 30 s",
            warning=busy_ms < 1000,
        )
    )
    advice.append(
        Advice(
            "write lock",
            "one per database file",
            "one writer at a time: with_row_locks takes the write lock before its SELECT, so "
            "a locked read-modify-write cannot lose an update; readers never wait in WAL mode",
        )
    )
    return facts


def _early_default() -> object:
    """``@transactional``'s default ``early_lock_timeout`` (read from its signature)."""
    import inspect

    from locksafe.transactions import transactional

    return inspect.signature(transactional).parameters["early_lock_timeout"].default
