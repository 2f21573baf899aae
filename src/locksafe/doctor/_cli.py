"""The ``locksafe`` command line: ``locksafe doctor [URL]`` (also ``python -m locksafe``).

Text for people on standard output (on a terminal, a status line shows the probe running and
its time; elsewhere, plain lines as each probe ends), ``--json`` for machines. Exit status: 0
when no probe FAILed, 1 when one did, 2 when the database could not be examined (the error
is one paragraph on standard error), 130 after Ctrl-C (the scratch table dropped first).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import textwrap
import threading
import time
from typing import Any, TextIO

import sqlalchemy

import locksafe
from locksafe.doctor import (
    DoctorError,
    DoctorInterrupted,
    ProbeResult,
    Progress,
    Report,
    diagnose,
)
from locksafe.doctor._target import OPTION_ERROR, python_version

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locksafe",
        description="locksafe: row locks and lock failures that behave the same on SQLite, "
        "PostgreSQL and MySQL/MariaDB.",
    )
    parser.add_argument("--version", action="version", version=f"locksafe {locksafe.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    doctor = commands.add_parser(
        "doctor",
        help="prove that locking works on your database",
        description="Connect to the database at URL (default: an embedded SQLite database in a "
        "temporary directory), show what locksafe does there and how the server is configured, "
        "and run eight live probes with two or more connections each. Safe on a production "
        "database: it works only in a scratch table of its own (dropped at the end, also after "
        "Ctrl-C), and every wait is bounded.",
        epilog="Exit status: 0 all probes PASS (or UNSUPPORTED), 1 a probe FAILed, 2 the "
        "database could not be examined, 130 interrupted.",
    )
    doctor.add_argument(
        "url",
        nargs="?",
        metavar="URL",
        help="a SQLAlchemy database URL, any driver locksafe supports, sync or asyncio "
        "(postgresql+psycopg://user:password@host/db, mysql+aiomysql://..., "
        "sqlite:///app.db); default: an embedded SQLite database",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    configure = doctor.add_mutually_exclusive_group()
    configure.add_argument(
        "--sqlite-configure",
        dest="sqlite_configure",
        action="store_const",
        const=True,
        default=None,
        help="SQLite URL: set the engine up with locksafe.sqlite.configure() (as an application "
        "calling it does; the file's journal mode is left alone)",
    )
    configure.add_argument(
        "--no-sqlite-configure",
        dest="sqlite_configure",
        action="store_const",
        const=False,
        help="SQLite: examine the engine as SQLAlchemy makes it, without configure() (the "
        "default for a URL)",
    )
    doctor.add_argument(
        "--mysql-engine",
        metavar="ENGINE",
        help="MySQL/MariaDB: the scratch table's storage engine (default: the server's "
        "default), e.g. MyISAM to see what row locks do on such tables",
    )
    doctor.add_argument(
        "--probe-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a probe's connections may hold a transaction (default 30)",
    )
    return parser


def _width(stream: TextIO) -> int:
    if stream.isatty():
        return max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    return 100


def _wrap(text: str, width: int, indent: int) -> list[str]:
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=" " * indent,
        subsequent_indent=" " * indent,
        break_on_hyphens=False,
        break_long_words=False,
    ) or [" " * indent]


def _hanging(prefix: str, text: str, width: int, indent: int) -> list[str]:
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=" " * indent + prefix,
        subsequent_indent=" " * (indent + len(prefix)),
        break_on_hyphens=False,
        break_long_words=False,
    ) or [" " * indent + prefix]


def render_header(report: Report, width: int) -> list[str]:
    """The report up to the probes: the database, the server, what locksafe does there, and
    the configuration advice."""
    caps = report.capabilities
    lines = [
        f"locksafe doctor {locksafe.__version__} (SQLAlchemy {sqlalchemy.__version__}, Python "
        f"{python_version()})",
        "",
        f"database  {report.url}",
    ]
    if report.embedded:
        lines += _wrap(
            "an embedded SQLite database in a temporary directory (no URL given), removed "
            "afterwards",
            width,
            10,
        )
    lines += [f"server    {report.server}", f"driver    {report.driver_description}", ""]
    lines.append(f"what locksafe does here ({caps.title} {caps.version_string})")
    lines += _wrap(caps.summary or caps.mechanism, width, 2)
    lines.append("  with_row_locks(...)")
    for label, rendered in report.renders.items():
        lines += _hanging(f"{label:<18}", rendered, width, 4)

    lines += ["", "configuration"]
    for item in report.advice:
        mark = "!" if item.warning else " "
        lines.append(f"{mark} {item.setting} = {item.value}")
        lines += _wrap(item.advice, width, 4)
    lines += [
        "",
        f"probes (two or more connections each, every wait bounded; scratch table "
        f"{report.scratch_table})",
    ]
    return [line.rstrip() for line in lines]


def render_probe(result: ProbeResult, width: int) -> list[str]:
    head = f"  {result.status:<11} {result.title:<26} {result.seconds:6.2f} s"
    return [head.rstrip(), *_wrap(result.detail, width, 6)]


def render_summary(report: Report) -> str:
    counts = report.counts()
    return (
        f"{len(report.probes)} probes: {counts['PASS']} PASS, {counts['FAIL']} FAIL, "
        f"{counts['UNSUPPORTED']} UNSUPPORTED in {report.seconds:.1f} s; {report.cleanup}"
    )


def render_text(report: Report, width: int = 100) -> str:
    """The whole report as ``locksafe doctor`` prints it."""
    lines = render_header(report, width)
    for probe in report.probes:
        lines += render_probe(probe, width)
    lines += ["", render_summary(report)]
    return "\n".join(lines) + "\n"


class _Console(Progress):
    """Prints the report as it is made (text mode), with a status line on a terminal."""

    SPINNER = "|/-\\"

    def __init__(self, out: TextIO, status: TextIO, *, text: bool) -> None:
        self.out = out
        self.status = status
        self.text = text
        self.tty = status.isatty()
        self.width = _width(out)
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._label = ""
        self._began = 0.0
        self._shown = 0

    def _print(self, lines: list[str]) -> None:
        if self.text:
            with self._lock:
                self._clear()
                self.out.write("\n".join(lines) + "\n")
                self.out.flush()

    def ready(self, report: Report) -> None:
        self._print(render_header(report, self.width))

    def probe_started(self, index: int, total: int, title: str) -> None:
        if not self.tty:
            return
        self._label = f"[{index}/{total}] {title}"
        self._began = time.monotonic()
        self._stop.clear()
        self._ticker = threading.Thread(
            target=self._tick, name="locksafe-doctor-status", daemon=True
        )
        self._ticker.start()

    def probe_finished(self, result: ProbeResult) -> None:
        self._end_status()
        self._print(render_probe(result, self.width))

    def cleaning_up(self, table: str) -> None:
        if self.tty:
            with self._lock:
                self._clear()
                self._show(f"dropping the scratch table {table} ...")

    def _end_status(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            self._stop.set()
            ticker.join()
        with self._lock:
            self._clear()

    def _tick(self) -> None:
        n = 0
        while not self._stop.is_set():
            with self._lock:
                spin = self.SPINNER[n % len(self.SPINNER)]
                self._show(f"  {spin} {self._label}  {time.monotonic() - self._began:.1f} s")
            n += 1
            self._stop.wait(0.1)

    def _show(self, line: str) -> None:
        line = line[: self.width - 1]
        self.status.write("\r" + line.ljust(self._shown))
        self.status.flush()
        self._shown = max(len(line), self._shown)

    def _clear(self) -> None:
        if self._shown:
            self.status.write("\r" + " " * self._shown + "\r")
            self.status.flush()
            self._shown = 0


def _error(message: str, *, as_json: bool, stdout: TextIO, stderr: TextIO) -> int:
    stderr.write("\n".join(_wrap(f"locksafe doctor: {message}", 100, 0)) + "\n")
    stderr.flush()
    if as_json:
        json.dump({"ok": False, "error": message, "exit_status": EXIT_ERROR}, stdout, indent=2)
        stdout.write("\n")
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run ``locksafe`` with ``argv`` (default: the command line); returns the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the run began (or after it ended): nothing to undo
        sys.stderr.write("locksafe doctor: interrupted\n")
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    # @transactional logs each retry: the probes report them in their own lines instead.
    quiet = logging.getLogger("locksafe")
    if not any(isinstance(handler, logging.NullHandler) for handler in quiet.handlers):
        quiet.addHandler(logging.NullHandler())
    stdout, stderr = sys.stdout, sys.stderr
    console = _Console(stdout, stderr if args.json else stdout, text=not args.json)
    restore = _terminate_as_interrupt()
    try:
        report = diagnose(
            args.url,
            sqlite_configure=args.sqlite_configure,
            mysql_engine=args.mysql_engine,
            probe_timeout=args.probe_timeout,
            progress=console,
        )
    except DoctorError as exc:
        console._end_status()
        return _error(str(exc), as_json=args.json, stdout=stdout, stderr=stderr)
    except (TypeError, ValueError) as exc:
        if not getattr(exc, OPTION_ERROR, False):
            raise  # not an option: a bug, with its traceback
        console._end_status()
        return _error(str(exc), as_json=args.json, stdout=stdout, stderr=stderr)
    except DoctorInterrupted as exc:
        console._end_status()
        stderr.write(f"locksafe doctor: interrupted; {exc.cleanup}\n")
        stderr.flush()
        return EXIT_INTERRUPTED
    finally:
        restore()
    console._end_status()
    if args.json:
        json.dump(report.as_dict(), stdout, indent=2)
        stdout.write("\n")
    else:
        stdout.write("\n" + render_summary(report) + "\n")
    stdout.flush()
    return report.exit_status


def _terminate_as_interrupt() -> Any:
    """SIGTERM ends the run like Ctrl-C (the scratch table is dropped first)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except (ValueError, OSError):
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)
