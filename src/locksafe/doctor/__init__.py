"""``locksafe doctor``: prove that locking works on *your* database, with your driver and your
configuration.

:func:`diagnose` connects to a database (or, without a URL, to an embedded SQLite database in a
temporary directory), reads the server's version and lock-related settings, and runs eight live
probes with two or more real connections each — a row lock excludes, NOWAIT fails fast, SKIP
LOCKED skips, a lock timeout is honoured, a deadlock is detected, a named lock excludes,
``@transactional`` retries a provoked deadlock, two sessions in one thread do not deadlock. Each
ends PASS, FAIL or UNSUPPORTED, with its timing and a one-line explanation. The command line is
``locksafe doctor [URL]`` (or ``python -m locksafe doctor``); see ``docs/doctor.md``.

It is safe on a production database: it works only in one scratch table of its own (a unique
``locksafe_doctor_<random>`` name, dropped at the end, also after Ctrl-C), every wait is bounded,
and it reads nothing else but server settings.

.. code-block:: python

    report = locksafe.doctor.diagnose("postgresql+psycopg://app:secret@db/app")
    failed = [probe.title for probe in report.probes if probe.status == "FAIL"]
"""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import column, insert, text
from sqlalchemy import table as lightweight_table
from sqlalchemy.engine import URL

from locksafe import LockCapabilities, UnsupportedLockOption, lock_capabilities, plan_row_locks
from locksafe.doctor._inspect import Advice, ServerFacts, inspect_server
from locksafe.doctor._probes import PROBES, ROWS, ProbeContext, scratch_table
from locksafe.doctor._target import (
    DoctorError,
    Target,
    connect_error,
    describe_error,
    option_error,
    python_version,
    resolve_target,
    setup_error,
)
from locksafe.doctor._workers import Worker, stop_all

__all__ = [
    "Advice",
    "DoctorError",
    "DoctorInterrupted",
    "ProbeResult",
    "Progress",
    "Report",
    "diagnose",
    "main",
]

Status = Literal["PASS", "FAIL", "UNSUPPORTED"]

#: The row-lock options whose rendering the report shows, with their keyword arguments.
RENDERED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default", {}),
    ("read=True", {"read": True}),
    ("key_share=True", {"key_share": True}),
    ("nowait=True", {"nowait": True}),
    ("skip_locked=True", {"skip_locked": True}),
    ("of=<table>", {"of": "<table>"}),
)

_ENGINE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class DoctorInterrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C); its scratch table was dropped first (``cleanup``
    says so, or names what is left). A ``KeyboardInterrupt``: a program that does not catch
    it stops, as on any Ctrl-C.

    >>> class CtrlC(Progress):  # as if Ctrl-C were pressed when the first probe starts
    ...     def probe_started(self, index, total, title):
    ...         raise KeyboardInterrupt
    >>> try:
    ...     diagnose(progress=CtrlC())  # embedded SQLite
    ... except DoctorInterrupted as interrupted:
    ...     print(interrupted.cleanup)
    scratch table locksafe_doctor_... dropped
    """

    def __init__(self, cleanup: str) -> None:
        super().__init__(cleanup)
        self.cleanup = cleanup


@dataclass(frozen=True)
class ProbeResult:
    """How one probe ended: an item of :attr:`Report.probes`, also given to
    :meth:`Progress.probe_finished` as soon as the probe ends.

    >>> class FirstProbe(Progress):  # keeps the first result, then stops, as Ctrl-C would
    ...     def probe_finished(self, result):
    ...         self.result = result
    ...         raise KeyboardInterrupt
    >>> progress = FirstProbe()
    >>> try:
    ...     diagnose(progress=progress)  # embedded SQLite
    ... except DoctorInterrupted:
    ...     pass
    >>> result = progress.result
    >>> result.name, result.title, result.status
    ('row_lock_excludes', 'row lock excludes', 'PASS')
    >>> result.detail
    '2 connections x 10 locked read-modify-write increments: the counter reads 20 from a third connection, no update lost'
    >>> sorted(result.as_dict())
    ['detail', 'name', 'seconds', 'status', 'title']
    """  # noqa: E501

    #: ``"row_lock_excludes"``, ``"nowait_fails_fast"``...
    name: str
    #: For people: ``"row lock excludes"``.
    title: str
    #: ``"PASS"``, ``"FAIL"`` (locking does not work as locksafe promises here, or the probe
    #: failed) or ``"UNSUPPORTED"`` (locksafe refuses the feature on this database).
    status: Status
    #: Seconds the probe took.
    seconds: float
    #: One line: what was done, what was measured or read back.
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (an item of ``probes`` in ``locksafe doctor
        --json``)."""
        return {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
        }


@dataclass
class Report:
    """What :func:`diagnose` found: the server, its settings with locksafe's advice, what
    each row-lock option does here, and the probes' results.

    :func:`diagnose` returns it once every probe has run (see its example);
    :meth:`Progress.ready` is given it before the first probe. Here a :class:`Progress` keeps
    it and stops the run after the first probe, to stay short:

    >>> class FirstProbe(Progress):
    ...     def ready(self, report):
    ...         self.report = report
    ...     def probe_finished(self, result):
    ...         raise KeyboardInterrupt  # as Ctrl-C would
    >>> progress = FirstProbe()
    >>> try:
    ...     diagnose(progress=progress)  # embedded SQLite
    ... except DoctorInterrupted:
    ...     pass
    >>> report = progress.report
    >>> report.dialect, report.driver, report.embedded, report.sqlite_configured
    ('sqlite', 'pysqlite', True, True)
    >>> report.renders["nowait=True"]
    'database write lock before the SELECT, failing at once if busy'
    >>> [probe.status for probe in report.probes], report.counts()
    (['PASS'], {'PASS': 1, 'FAIL': 0, 'UNSUPPORTED': 0})
    >>> report.ok, report.exit_status, report.as_dict()["ok"]
    (True, 0, True)
    """

    #: The URL, password hidden.
    url: str
    #: SQLAlchemy's backend name: ``"postgresql"``, ``"mysql"``, ``"mariadb"``, ``"sqlite"``.
    dialect: str
    #: SQLAlchemy's driver name: ``"psycopg"``, ``"asyncpg"``, ``"pymysql"``, ``"pysqlite"``...
    driver: str
    #: The driver is an asyncio one (the probes then run on ``AsyncConnection`` objects).
    is_async: bool
    #: No URL was given: an embedded SQLite database in a temporary directory.
    embedded: bool
    #: SQLite: engines were set up by :func:`locksafe.sqlite.configure` (``None`` elsewhere).
    sqlite_configured: bool | None
    #: ``"PostgreSQL 15.6"``, ``"MariaDB 10.11.6-MariaDB"``, ``"SQLite 3.40.1"``.
    server: str
    #: The installed package of the driver: ``"psycopg"``, ``"sqlite3"`` (Python's own for
    #: pysqlite); ``None`` if it cannot be found.
    driver_package: str | None
    #: That package's version: ``"3.2.1"`` (for Python's sqlite3: the Python version).
    driver_version: str | None
    #: The driver in words: ``"psycopg (psycopg 3.2.1, sync)"``.
    driver_description: str
    #: What :func:`locksafe.lock_capabilities` says of this database.
    capabilities: LockCapabilities
    #: What ``with_row_locks`` does here per option (``"default"``, ``"nowait=True"``...): the
    #: clause it renders, SQLite's write lock, or why it refuses the option.
    renders: dict[str, str]
    #: The settings that decide how lock waits end here, each with locksafe's advice.
    advice: list[Advice]
    #: The name of the run's scratch table (``locksafe_doctor_<random>``).
    scratch_table: str
    #: The probes' results, in the order they ran.
    probes: list[ProbeResult] = field(default_factory=list)
    #: What became of the scratch table: ``"scratch table <name> dropped"``, or what is left
    #: and why.
    cleanup: str = ""
    #: Seconds the whole run took.
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No probe FAILed."""
        return all(probe.status != "FAIL" for probe in self.probes)

    @property
    def exit_status(self) -> int:
        """The command's exit status: 0 when no probe FAILed, else 1."""
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        """How many probes ended PASS, FAIL and UNSUPPORTED."""
        counts = {"PASS": 0, "FAIL": 0, "UNSUPPORTED": 0}
        for probe in self.probes:
            counts[probe.status] += 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``locksafe doctor --json``)."""
        from locksafe import __version__

        caps = self.capabilities
        return {
            "locksafe": __version__,
            "url": self.url,
            "dialect": self.dialect,
            "driver": self.driver,
            "driver_package": self.driver_package,
            "driver_version": self.driver_version,
            "driver_description": self.driver_description,
            "async": self.is_async,
            "embedded": self.embedded,
            "sqlite_configured": self.sqlite_configured,
            "server": self.server,
            "server_version": list(caps.server_version) if caps.server_version else None,
            "python": python_version(),
            "capabilities": {
                "product": caps.title,
                "mechanism": caps.mechanism,
                "for_update": caps.for_update,
                "for_share": caps.for_share,
                "key_share": caps.key_share,
                "nowait": caps.nowait,
                "skip_locked": caps.skip_locked,
                "of": caps.of,
                "summary": caps.summary,
            },
            "renders": dict(self.renders),
            "advice": [item.as_dict() for item in self.advice],
            "probes": [probe.as_dict() for probe in self.probes],
            "summary": self.counts(),
            "scratch_table": self.scratch_table,
            "cleanup": self.cleanup,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "exit_status": self.exit_status,
        }


class Progress:
    """Receives :func:`diagnose`'s progress (the command line shows it); every method does
    nothing unless overridden. A method runs in the thread that called :func:`diagnose`;
    what it raises stops the run (the scratch table is dropped first).

    >>> class Printed(Progress):
    ...     def probe_started(self, index, total, title):
    ...         if index == 3:
    ...             raise KeyboardInterrupt  # stop here, as Ctrl-C would: the example stays short
    ...         print(f"[{index}/{total}] {title}:", end=" ")
    ...     def probe_finished(self, result):
    ...         print(result.status)
    ...     def cleaning_up(self, table):
    ...         print("dropping", table)
    >>> try:
    ...     diagnose(progress=Printed())  # embedded SQLite
    ... except DoctorInterrupted:
    ...     print("interrupted")
    [1/8] row lock excludes: PASS
    [2/8] NOWAIT fails fast: PASS
    dropping locksafe_doctor_...
    interrupted
    """

    def ready(self, report: Report) -> None:
        """Connected and inspected: ``report`` has everything but the probes."""

    def probe_started(self, index: int, total: int, title: str) -> None:
        """Probe ``index`` (from 1) of ``total`` starts."""

    def probe_finished(self, result: ProbeResult) -> None:
        """A probe ended."""

    def cleaning_up(self, table: str) -> None:
        """The scratch table is being dropped (after the probes, or after an interrupt)."""


def _check_options(
    url: object,
    sqlite_configure: object,
    mysql_engine: object,
    probe_timeout: object,
    progress: object,
) -> float:
    if url is not None and not isinstance(url, (str, URL)):
        raise option_error(
            TypeError,
            f"url must be a database URL (str or sqlalchemy URL) or None for an embedded SQLite "
            f"database, got {type(url).__name__}",
        )
    if sqlite_configure is not None and not isinstance(sqlite_configure, bool):
        raise option_error(
            TypeError,
            f"sqlite_configure must be True, False or None, got {type(sqlite_configure).__name__}",
        )
    if mysql_engine is not None:
        if not isinstance(mysql_engine, str):
            raise option_error(
                TypeError,
                f"mysql_engine must be a storage engine name (str) or None, got "
                f"{type(mysql_engine).__name__}",
            )
        if not _ENGINE_NAME.match(mysql_engine):
            raise option_error(
                ValueError,
                f"mysql_engine={mysql_engine!r} is not a storage engine name (InnoDB, MyISAM, "
                "Aria...)",
            )
    if isinstance(probe_timeout, bool) or not isinstance(probe_timeout, (int, float)):
        raise option_error(
            TypeError,
            f"probe_timeout must be a number of seconds, got {type(probe_timeout).__name__}",
        )
    seconds = float(probe_timeout)
    if not 10 <= seconds <= 3600:
        raise option_error(
            ValueError, f"probe_timeout={probe_timeout!r} must be between 10 and 3600 seconds"
        )
    if progress is not None and not isinstance(progress, Progress):
        raise option_error(
            TypeError,
            f"progress must be a locksafe.doctor.Progress or None, got {type(progress).__name__}",
        )
    return seconds


def diagnose(
    url: str | URL | None = None,
    *,
    sqlite_configure: bool | None = None,
    mysql_engine: str | None = None,
    probe_timeout: float = 30.0,
    progress: Progress | None = None,
) -> Report:
    """Examine the database at ``url`` and run the eight probes: a :class:`Report`.

    - ``url``: a SQLAlchemy URL with any driver locksafe supports, sync or asyncio; ``None``:
      an embedded SQLite database in a temporary directory (removed afterwards), set up by
      :func:`locksafe.sqlite.configure` as locksafe recommends.
    - ``sqlite_configure``: for a SQLite URL, set its engines up with
      :func:`locksafe.sqlite.configure` (``journal_mode=None``: the file's journal mode is left
      alone) — examine the database as an application that calls it sees it. Default: only
      for the embedded database; a URL is examined as SQLAlchemy opens it.
    - ``mysql_engine``: MySQL / MariaDB: the scratch table's storage engine (``"MyISAM"`` to see
      what row locks do on such tables); default: the server's default.
    - ``probe_timeout``: seconds a probe's connections may hold a transaction (10 to 3600).
    - ``progress``: a :class:`Progress` told of each step.

    Raises :class:`DoctorError` (one paragraph: what is wrong and what to do) for a bad URL,
    a driver that is not installed, a server it cannot reach, missing privileges;
    :class:`DoctorInterrupted` on Ctrl-C, after dropping the scratch table. The options are
    checked first: ``TypeError`` / ``ValueError`` naming the option.

    >>> report = diagnose()  # embedded SQLite, set up as locksafe recommends
    >>> [(probe.name, probe.status) for probe in report.probes][:2]
    [('row_lock_excludes', 'PASS'), ('nowait_fails_fast', 'PASS')]
    >>> report.ok, report.exit_status, report.cleanup.endswith("dropped")
    (True, 0, True)
    >>> diagnose("sqlite://")  # nothing two connections could share
    Traceback (most recent call last):
    ...
    locksafe.doctor.DoctorError: sqlite:// is an in-memory SQLite database: each connection ...
    """
    timeout = _check_options(url, sqlite_configure, mysql_engine, probe_timeout, progress)
    observer = progress if progress is not None else Progress()
    with contextlib.ExitStack() as stack:
        directory = None
        if url is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="locksafe-doctor-"))
        target = resolve_target(
            url, sqlite_configure=sqlite_configure, mysql_engine=mysql_engine, directory=directory
        )
        return _Run(target, timeout, observer).execute()
    raise AssertionError("unreachable")  # pragma: no cover


class _Run:
    def __init__(self, target: Target, timeout: float, progress: Progress) -> None:
        self.target = target
        self.timeout = timeout
        self.progress = progress
        token = secrets.token_hex(4)
        self.table = scratch_table(f"locksafe_doctor_{token}", mysql_engine=target.mysql_engine)
        self.lock_name = f"locksafe-doctor-{token}"
        #: Set (in the set-up connection's thread) once CREATE TABLE succeeded: only then is
        #: the table dropped, so a table of the same name that was there before is never.
        self.created = threading.Event()
        self.scratch_engine: str | None = None
        self.cleanup = ""

    def execute(self) -> Report:
        began = time.monotonic()
        try:
            report = self._run()
        except KeyboardInterrupt:
            self._clean_up()
            raise DoctorInterrupted(self.cleanup) from None
        except DoctorError as exc:
            self._clean_up()
            if self.cleanup.startswith("the scratch table"):
                raise DoctorError(f"{exc} Also, {self.cleanup}.") from None
            raise
        except BaseException:
            self._clean_up()
            raise
        self._clean_up()
        report.cleanup = self.cleanup
        report.seconds = time.monotonic() - began
        return report

    # -- steps --------------------------------------------------------------------------------

    def _worker(self, label: str, *, bounded: bool = True) -> Worker:
        worker = Worker(self.target, label, hold_timeout=self.timeout, bounded=bounded)
        try:
            worker.start()
        except Exception as exc:
            worker.stop()
            raise connect_error(self.target, exc) from None
        return worker

    def _run(self) -> Report:
        target = self.target
        with contextlib.closing(_Stopper(self._worker("inspect", bounded=False))) as inspector:
            try:
                facts: ServerFacts = inspector.worker.run(
                    lambda conn: inspect_server(conn, target), timeout=self.timeout
                )
                caps, renders = inspector.worker.run(_capabilities, timeout=self.timeout)
            except Exception as exc:
                if target.backend == "sqlite":
                    raise DoctorError(
                        f"opened {target.display_url}, but cannot read it as an SQLite database "
                        f"({describe_error(exc)}): is the path that of the database file, and "
                        "is that file an SQLite database (not another file, not encrypted)?"
                    ) from None
                raise DoctorError(
                    f"connected to {target.display_url}, but cannot read the server's version "
                    f"and settings ({describe_error(exc)}); locksafe doctor reads them with "
                    "plain SELECT / SHOW / PRAGMA statements, which any user may run."
                ) from None
        report = Report(
            url=target.display_url,
            dialect=target.url.get_backend_name(),
            driver=target.driver,
            is_async=target.is_async,
            embedded=target.embedded,
            sqlite_configured=target.sqlite_configure if target.backend == "sqlite" else None,
            server=facts.version,
            driver_package=target.driver_package()[0],
            driver_version=target.driver_package()[1],
            driver_description=target.driver_description(),
            capabilities=caps,
            renders=renders,
            advice=facts.advice,
            scratch_table=self.table.name,
        )
        engine = self._create()
        if engine is not None:
            report.advice.append(
                Advice(
                    "scratch table engine",
                    engine,
                    "the probes run on a table of this storage engine"
                    + ("" if engine.lower() == "innodb" else ", which has no row locks"),
                    warning=engine.lower() != "innodb",
                )
            )
        self.progress.ready(report)
        deadlock_wait = facts.deadlock_timeout + 5 if target.backend == "postgresql" else 10.0
        ctx = ProbeContext(
            scratch_engine=engine,
            target=target,
            table=self.table,
            capabilities=caps,
            hold_timeout=self.timeout,
            lock_name=self.lock_name,
            deadlock_wait=min(deadlock_wait, self.timeout - 5),
        )
        for index, probe in enumerate(PROBES, start=1):
            self.progress.probe_started(index, len(PROBES), probe.title)
            began = time.monotonic()
            try:
                verdict = probe.run(ctx)
                status, detail = verdict.status, verdict.detail
            except UnsupportedLockOption as exc:
                status, detail = "UNSUPPORTED", f"locksafe refuses it here: {exc}"
            except TimeoutError as exc:
                status, detail = "FAIL", f"a step did not end in time ({exc})"
            except Exception as exc:
                status, detail = "FAIL", f"error: {describe_error(exc)}"
            except BaseException:
                ctx.stop_workers(wait=False)  # the clean-up stops them, cancelling any wait
                raise
            ctx.stop_workers()
            result = ProbeResult(probe.name, probe.title, status, time.monotonic() - began, detail)
            report.probes.append(result)
            self.progress.probe_finished(result)
        return report

    def _create(self) -> str | None:
        """Create and fill the scratch table; MySQL / MariaDB: returns its storage engine, as
        the server made it (it may substitute another for one it does not have)."""
        table = self.table
        mysql = self.target.backend == "mysql"

        def create(conn: Any) -> str | None:
            table.create(conn)
            self.created.set()
            conn.execute(insert(table), [{"id": row, "value": 0} for row in ROWS])
            conn.commit()
            if not mysql:
                return None
            engine = conn.execute(
                text(
                    "SELECT engine FROM information_schema.tables "
                    "WHERE table_schema = DATABASE() AND table_name = :name"
                ),
                {"name": table.name},
            ).scalar_one()
            conn.rollback()
            return str(engine)

        with contextlib.closing(_Stopper(self._worker("setup"))) as setup:
            try:
                engine: str | None = setup.worker.run(create, timeout=self.timeout)
            except Exception as exc:
                raise setup_error(self.target, table.name, exc) from None
        self.scratch_engine = engine
        return engine

    def _clean_up(self) -> None:
        """Stop every doctor connection, then drop the scratch table (bounded; a second
        Ctrl-C meanwhile does not stop it)."""
        with _sigint_deferred():
            try:
                stuck = stop_all(self.target, timeout=20.0)
            except Exception as exc:  # the table must still go
                stuck = [f"({describe_error(exc)})"]
            self._remove_lock_file()
            if not self.created.is_set():
                self.cleanup = "no scratch table was created"
                return
            self.progress.cleaning_up(self.table.name)
            table = self.table
            try:
                with contextlib.closing(_Stopper(self._worker("cleanup"))) as cleaner:

                    def drop(conn: Any) -> None:
                        table.drop(conn, checkfirst=True)
                        conn.commit()

                    cleaner.worker.run(drop, timeout=30.0)
            except BaseException as exc:
                self.cleanup = (
                    f"the scratch table {table.name} could not be dropped "
                    f"({describe_error(exc) if isinstance(exc, Exception) else type(exc).__name__}"
                    f"{'; connections still waiting: ' + ', '.join(stuck) if stuck else ''}): "
                    f"drop it by hand with DROP TABLE {table.name}"
                )
                return
            self.cleanup = f"scratch table {table.name} dropped"

    def _remove_lock_file(self) -> None:
        """SQLite: the named-lock probe's lock file (a unique name, used by nobody else)."""
        path = self.target.sqlite_path
        if path is None:
            return
        with contextlib.suppress(OSError):
            import os

            os.remove(_sqlite_lock_file(path, self.lock_name))


def _sqlite_lock_file(database_file: str, name: str) -> str:
    """The file :func:`locksafe.named_lock` locks for ``name`` next to a SQLite database.

    Not public API: locksafe keeps lock files (removing one while others may open it would
    break the exclusion), but the doctor's name is unique to its run."""
    from locksafe.dialects.sqlite import lock_file

    return lock_file(database_file, name)


def _capabilities(conn: Any) -> tuple[LockCapabilities, dict[str, str]]:
    caps = lock_capabilities(conn)
    renders: dict[str, str] = {}
    for label, options in RENDERED:
        if options.get("of") == "<table>":
            options = {"of": lightweight_table("t", column("id"))}
        try:
            plan = plan_row_locks(conn, **options)
        except UnsupportedLockOption as exc:
            renders[label] = f"refused (UnsupportedLockOption): {exc}"
            continue
        renders[label] = plan.describe().partition(": ")[2]
    conn.rollback()
    return caps, renders


class _Stopper:
    """``contextlib.closing`` for a worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def close(self) -> None:
        self.worker.stop()


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """While cleaning up, Ctrl-C (and SIGTERM, which the command line turns into one) does not
    interrupt: every step is bounded, and the scratch table must go."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}
    try:
        for which in (signal.SIGINT, signal.SIGTERM):
            previous[which] = signal.signal(which, lambda signum, frame: None)
    except (ValueError, OSError):  # not the main interpreter, or no such signal here
        pass
    try:
        yield
    finally:
        for which, handler in previous.items():
            signal.signal(which, handler)


def main(argv: list[str] | None = None) -> int:
    """The ``locksafe`` command (``python -m locksafe``): ``locksafe doctor [URL]``; returns
    the exit status (0 all PASS, 1 a FAIL, 2 the database could not be examined, 130
    interrupted). ``argv`` defaults to the command line.

    >>> main(["doctor", "sqlite://"])  # the error, one paragraph, goes to standard error
    2
    """
    from locksafe.doctor._cli import main as cli_main

    return cli_main(argv)
