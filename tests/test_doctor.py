"""``locksafe doctor`` (issue 12): the command that proves locking works on a given database.

- On every driver cell, every probe PASSes where the server supports it (UNSUPPORTED where
  locksafe's capability table says it cannot), the report names the driver and the settings the
  harness gave the server, no scratch table is left (checked from another connection), and a
  table of the application is untouched.
- Deliberately broken set-ups FAIL the probes they break: a MyISAM table on MariaDB (row locks
  lock nothing: lost updates, NOWAIT returns the row...), SQLite without locksafe's
  ``configure()`` (a second session of the same thread hangs on the first one's write lock).
- A bad URL, an unknown dialect or driver, a driver that is not installed, greenlet missing for
  an asyncio driver, an unreachable server, missing privileges, an in-memory or missing SQLite
  database: a clear one-paragraph error naming the fix, exit status 2, no traceback.
- ``--json`` parses; SIGINT in the middle of a probe ends the run within seconds with exit
  status 130 and the scratch table dropped; a table that happens to have the scratch table's
  name is never dropped.
- ``python -m locksafe doctor`` without a URL on a base install (no greenlet) runs every probe
  on embedded SQLite, PASS, well under a minute; on a terminal it shows a status line.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text
from sqlalchemy.engine import URL

import locksafe.doctor
from harness.cells import Cell
from locksafe.doctor import DoctorError, Report, diagnose, main

ROOT = Path(__file__).resolve().parent.parent
PROBE_NAMES = [
    "row_lock_excludes",
    "nowait_fails_fast",
    "skip_locked_skips",
    "lock_timeout_honoured",
    "deadlock_detected",
    "named_lock_excludes",
    "transactional_retries",
    "two_sessions_one_thread",
]
#: A doctor run takes 3-8 s on a cell; the bound allows for a loaded 2-core machine.
RUN_BOUND = 40.0

canary_metadata = MetaData()
canary = Table(
    "doctor_canary",
    canary_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("note", String(40), nullable=False),
)


def doctor_url(cell: Cell) -> URL:
    """The cell's URL; a SQLite cell's database file exists first (the doctor never creates a
    database file for a URL)."""
    if cell.backend == "sqlite":
        assert cell.url.database is not None
        sqlite3.connect(cell.url.database).close()
    return cell.url


def scratch_tables(cell: Cell) -> list[str]:
    """The doctor's tables on the cell's database, read from another connection."""
    engine = cell.sync_engine()
    with engine.connect() as conn:
        if cell.backend == "postgresql":
            sql = "SELECT tablename FROM pg_tables WHERE tablename LIKE 'locksafe_doctor_%'"
        elif cell.backend == "mariadb":
            sql = (
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name LIKE 'locksafe_doctor_%'"
            )
        else:
            sql = "SELECT name FROM sqlite_master WHERE name LIKE 'locksafe_doctor_%'"
        return [row[0] for row in conn.execute(text(sql))]


def statuses(report: Report) -> dict[str, str]:
    return {probe.name: probe.status for probe in report.probes}


def explain(report: Report) -> str:
    return "\n".join(f"{p.status} {p.name} {p.seconds:.2f}s: {p.detail}" for p in report.probes)


def expected_statuses(report: Report) -> dict[str, str]:
    """PASS everywhere, except UNSUPPORTED where locksafe's capability table says the server
    cannot (the test servers support everything)."""
    caps = report.capabilities
    expected = dict.fromkeys(PROBE_NAMES, "PASS")
    if not caps.nowait:
        expected["nowait_fails_fast"] = "UNSUPPORTED"
    if not caps.skip_locked:
        expected["skip_locked_skips"] = "UNSUPPORTED"
    return expected


def run_cli(
    args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None, preamble: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python -m locksafe`` in a subprocess (``preamble``: Python run first, e.g. to make a
    module unimportable)."""
    code = f"{preamble}\nimport runpy, sys\nsys.argv = ['locksafe', *{args!r}]\n"
    code += "runpy.run_module('locksafe', run_name='__main__', alter_sys=True)\n"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def run_main(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> subprocess.CompletedProcess[str]:
    """``locksafe`` in this process (for errors that leave no state behind)."""
    code = main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_clear_error(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    message = " ".join(result.stderr.split())
    assert message.startswith("locksafe doctor: "), message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- every cell ---------------------------------------------------------------------------------


def test_every_probe_passes_on_every_cell(cell: Cell) -> None:
    cell.create_all(canary_metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(canary), [{"id": 1, "note": "the application's row"}])
    began = time.monotonic()
    # SQLite: examined as an application set up by locksafe.sqlite.configure() sees it
    # (without it, one probe FAILs: test_sqlite_without_configure_fails_two_sessions).
    report = diagnose(doctor_url(cell), sqlite_configure=True if cell.backend == "sqlite" else None)
    took = time.monotonic() - began
    assert [probe.name for probe in report.probes] == PROBE_NAMES
    assert statuses(report) == expected_statuses(report), explain(report)
    assert report.ok
    assert report.exit_status == 0
    assert report.driver == cell.driver
    assert report.is_async == cell.is_async
    if report.driver_package != "sqlite3":  # else Python's own module (test_json_is_for_machines)
        assert report.driver_package is not None
        assert report.driver_version == importlib.metadata.version(report.driver_package)
        assert f"{report.driver_package} {report.driver_version}" in report.driver_description
    assert report.cleanup == f"scratch table {report.scratch_table} dropped"
    assert scratch_tables(cell) == []
    with cell.sync_engine().connect() as conn:
        assert conn.execute(select(canary)).all() == [(1, "the application's row")]
    assert took < RUN_BOUND, explain(report)
    for probe in report.probes:
        assert probe.detail
        assert probe.seconds >= 0


@pytest.mark.cells("postgresql+psycopg", "mysql+pymysql", "sqlite+pysqlite")
def test_the_report_shows_what_the_server_has(
    cell: Cell, capsys: pytest.CaptureFixture[str]
) -> None:
    """The settings shown are the server's, as a new connection gets them (the harness sets
    PostgreSQL's lock_timeout for the database and MariaDB's innodb_lock_wait_timeout
    globally, to 30 s): read here on a connection of the test's own."""
    with cell.sync_engine().connect() as conn:
        if cell.backend == "postgresql":
            lock = conn.execute(text("SELECT current_setting('lock_timeout')")).scalar_one()
            deadlock = conn.execute(text("SELECT current_setting('deadlock_timeout')")).scalar()
        elif cell.backend == "mariadb":
            wait = conn.execute(text("SELECT @@SESSION.innodb_lock_wait_timeout")).scalar_one()
    args = ["doctor", doctor_url(cell).render_as_string(hide_password=False)]
    if cell.backend == "sqlite":
        args.append("--sqlite-configure")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\r" not in out  # not a terminal: plain lines
    assert out.count("\n  PASS ") == 8, out
    assert f"driver    {cell.driver}" in out
    if cell.backend == "postgresql":
        assert "server    PostgreSQL " in out
        shown = "0 (no bound)" if lock == "0" else lock
        assert f"\n! lock_timeout = {shown}\n" in out or f"\n  lock_timeout = {shown}\n" in out
        assert f"  deadlock_timeout = {deadlock}\n" in out
        assert "    default           FOR UPDATE\n" in out
        assert "    key_share=True    FOR NO KEY UPDATE\n" in out
        assert "    skip_locked=True  FOR UPDATE SKIP LOCKED\n" in out
    elif cell.backend == "mariadb":
        assert "server    MariaDB " in out
        assert f"innodb_lock_wait_timeout = {float(wait):g} s\n" in out
        assert "\n  transaction_isolation = " in out
        assert "default_storage_engine = InnoDB" in out
        assert "    nowait=True       FOR UPDATE NOWAIT\n" in out
    else:
        assert "engine set-up = configure()" in out
        assert "journal_mode = delete" in out  # the file's own: --sqlite-configure leaves it
        assert "    nowait=True       database write lock before the SELECT, failing at once" in out
    assert re.search(
        r"8 probes: 8 PASS, 0 FAIL, 0 UNSUPPORTED in [\d.]+ s; scratch table "
        r"locksafe_doctor_[0-9a-f]{8} dropped",
        out,
    ), out


# -- broken set-ups -----------------------------------------------------------------------------


@pytest.mark.cells("mysql+pymysql", "mysql+asyncmy")
def test_a_myisam_table_fails_the_row_lock_probes(cell: Cell) -> None:
    """MyISAM has no row locks: FOR UPDATE is accepted and locks nothing. Named locks (GET_LOCK)
    do not depend on the table, nor does a second session's write of another row."""
    own = MetaData()
    Table("doctor_myisam_app", own, Column("id", Integer, primary_key=True), mysql_engine="MyISAM")
    cell.create_all(own)
    report = diagnose(doctor_url(cell), mysql_engine="MyISAM")
    assert statuses(report) == {
        "row_lock_excludes": "FAIL",
        "nowait_fails_fast": "FAIL",
        "skip_locked_skips": "FAIL",
        "lock_timeout_honoured": "FAIL",
        "deadlock_detected": "FAIL",
        "named_lock_excludes": "PASS",
        "transactional_retries": "FAIL",
        "two_sessions_one_thread": "PASS",
    }, explain(report)
    row_lock = report.probes[0].detail
    assert row_lock.startswith("lost updates:"), row_lock
    assert "not 20" in row_lock, row_lock
    assert "MyISAM" in row_lock
    assert report.exit_status == 1
    assert scratch_tables(cell) == []
    warnings = {item.setting: item for item in report.advice if item.warning}
    assert "doctor_myisam_app (MyISAM)" in warnings["tables without row locks"].advice


@pytest.mark.cells("sqlite+pysqlite", "sqlite+aiosqlite")
def test_sqlite_without_configure_fails_two_sessions(cell: Cell) -> None:
    """A SQLite URL is examined as SQLAlchemy opens it. with_row_locks still excludes there
    (it takes the write lock itself), but a second session of the same thread that writes while
    the first holds the write lock waits for it — in an application, the whole busy timeout on
    every such call; configure() raises SelfDeadlock at once instead."""
    report = diagnose(doctor_url(cell))
    expected = dict.fromkeys(PROBE_NAMES, "PASS")
    expected["two_sessions_one_thread"] = "FAIL"
    assert statuses(report) == expected, explain(report)
    detail = report.probes[-1].detail
    assert "waited" in detail, detail
    assert "database_busy" in detail, detail
    assert "locksafe.sqlite.configure()" in detail
    assert report.exit_status == 1
    assert report.sqlite_configured is False
    warnings = {item.setting for item in report.advice if item.warning}
    assert "engine set-up" in warnings
    assert scratch_tables(cell) == []
    assert cell.url.database is not None
    assert list(Path(cell.url.database).parent.glob("*-locksafe-*.lock")) == []


# -- safety -------------------------------------------------------------------------------------


@pytest.mark.cells("postgresql+psycopg2", "sqlite+pysqlite")
def test_a_table_with_the_scratch_name_is_never_dropped(
    cell: Cell, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scratch table's name is random; should a table of that name exist, the doctor
    cannot create its own and stops, leaving that table as it was."""
    monkeypatch.setattr(locksafe.doctor.secrets, "token_hex", lambda n: "0badcafe")
    theirs = MetaData()
    table = Table(
        "locksafe_doctor_0badcafe",
        theirs,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("note", String(40), nullable=False),
    )
    cell.create_all(theirs)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(table), [{"id": 7, "note": "not the doctor's"}])
    with pytest.raises(DoctorError, match="cannot create and fill the scratch table"):
        diagnose(doctor_url(cell))
    with cell.sync_engine().connect() as conn:
        assert conn.execute(select(table)).all() == [(7, "not the doctor's")]


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.cells("postgresql+psycopg2", "postgresql+asyncpg", "mysql+pymysql", "sqlite+pysqlite")
def test_sigint_mid_probe_drops_the_scratch_table(cell: Cell) -> None:
    """SIGINT while the lock-timeout probe's connection waits on the server: the run stops
    within seconds (the wait is cancelled on the server), exit status 130, table dropped."""
    args = ["-m", "locksafe", "doctor", doctor_url(cell).render_as_string(hide_password=False)]
    if cell.backend == "sqlite":
        args.append("--sqlite-configure")
    process = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + RUN_BOUND
        while not any("SKIP LOCKED skips" in line for line in lines):
            assert time.monotonic() < deadline, lines
            assert process.poll() is None, lines
            lines.append(process.stdout.readline())
        assert scratch_tables(cell) != []
        time.sleep(0.4)  # the next probe's waiter is now waiting for the held row (1 s)
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, err = process.communicate(timeout=60)
        took = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err, err
    assert re.search(r"interrupted; scratch table locksafe_doctor_[0-9a-f]{8} dropped", err), err
    assert "lock timeout honoured" not in out  # it was interrupted, not finished
    assert took < 10.0, took
    assert scratch_tables(cell) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_on_embedded_sqlite_removes_its_directory(signum: int) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "locksafe", "doctor"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        directory = None
        lines: list[str] = []
        deadline = time.monotonic() + RUN_BOUND
        while not any("NOWAIT fails fast" in line for line in lines):
            assert time.monotonic() < deadline, lines
            assert process.poll() is None, lines
            line = process.stdout.readline()
            lines.append(line)
            found = re.match(r"database  sqlite\+pysqlite:///(.*)/doctor\.db$", line.strip())
            if found:
                directory = Path(found.group(1))
        assert directory is not None
        assert directory.is_dir()
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, (out, err)
    assert re.search(r"interrupted; scratch table locksafe_doctor_\w+ dropped", err), err
    assert not directory.exists()


# -- the command line ---------------------------------------------------------------------------


def test_no_url_on_a_base_install_passes_every_probe_well_under_a_minute() -> None:
    """What a newcomer runs first: no server, no greenlet (the base install), no options."""
    began = time.monotonic()
    result = run_cli(["doctor"], preamble="import sys; sys.modules['greenlet'] = None")
    took = time.monotonic() - began
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    out = result.stdout
    assert "an embedded SQLite database in a temporary directory" in out
    assert "locksafe.sqlite.configure(engine) as recommended" in out
    assert out.count("\n  PASS ") == 8, out
    assert "8 probes: 8 PASS, 0 FAIL, 0 UNSUPPORTED" in out
    assert took < 60, took
    print(f"python -m locksafe doctor (no URL, no greenlet): {took:.1f} s")


def test_json_is_for_machines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["ok"] is True
    assert data["exit_status"] == 0
    assert data["dialect"] == "sqlite"
    assert data["embedded"] is True
    assert data["sqlite_configured"] is True
    assert data["capabilities"]["mechanism"] == "database"
    # pysqlite is Python's own sqlite3: its "version" is Python's; the words say SQLite's too.
    assert data["driver_package"] == "sqlite3"
    assert data["driver_version"] == platform.python_version()
    assert data["driver_description"].startswith("pysqlite (Python's sqlite3, SQLite ")
    assert [probe["name"] for probe in data["probes"]] == PROBE_NAMES
    assert {probe["status"] for probe in data["probes"]} == {"PASS"}
    assert all(isinstance(probe["seconds"], float) for probe in data["probes"])
    assert data["summary"] == {"PASS": 8, "FAIL": 0, "UNSUPPORTED": 0}
    assert data["cleanup"] == f"scratch table {data['scratch_table']} dropped"
    assert {item["setting"] for item in data["advice"]} >= {"journal_mode", "busy_timeout"}
    assert "PASS" not in captured.err  # the report is the JSON; no text around it


def test_json_with_an_error_is_json_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "sqlite://", "--json"]) == 2
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["ok"] is False
    assert data["exit_status"] == 2
    assert "in-memory SQLite database" in data["error"]
    assert captured.err.startswith("locksafe doctor: ")


def test_a_terminal_gets_a_status_line_while_probing() -> None:
    import pty
    import select

    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "locksafe", "doctor"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        close_fds=True,
    )
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + RUN_BOUND
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # the other side closed
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        assert process.wait(timeout=30) == 0, output.decode(errors="replace")
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
            process.wait()
    text_out = output.decode().replace("\r\n", "\n")  # the terminal's line ends
    # the status line, redrawn in place, names the probe running and its time so far
    assert re.search(r"\r  [|/\\-] \[4/8\] lock timeout honoured  \d\.\d s", text_out), text_out
    # what stays on the screen: each line as the status line left it
    screen = [line.rsplit("\r", 1)[-1] for line in text_out.split("\n")]
    assert sum(line.startswith("  PASS ") for line in screen) == 8, screen
    assert any(line.startswith("8 probes: 8 PASS") for line in screen), screen


def test_the_console_script_is_the_doctor() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = pyproject.split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert section.strip() == 'locksafe = "locksafe.doctor:main"'
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main([])  # a command is required
    assert exit_info.value.code == 2


# -- clear errors -------------------------------------------------------------------------------


def test_a_bad_url_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(
        run_main(capsys, ["doctor", "not a url"]), "'not a url' is not a database URL"
    )


def test_another_dialect_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(
        run_main(capsys, ["doctor", "oracle://scott:tiger@db/xe"]),
        "examines PostgreSQL, MySQL, MariaDB and SQLite",
        "oracle://scott:***@db/xe",
    )
    assert_clear_error(
        run_main(capsys, ["doctor", "postgresql+nosuch://db/app"]),
        "SQLAlchemy has no driver 'nosuch' for postgresql",
        "postgresql+psycopg",
    )


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [
        ("postgresql+psycopg2://app@db/app", "psycopg2", "postgresql"),
        ("postgresql+asyncpg://app@db/app", "asyncpg", "postgresql"),
        ("mysql+pymysql://app@db/app", "pymysql", "mysql"),
        ("mariadb+mariadbconnector://app@db/app", "mariadb", "mariadb"),
        ("sqlite+aiosqlite:///app.db", "aiosqlite", "aiosqlite"),
    ],
)
def test_a_missing_driver_names_the_extra(url: str, module: str, extra: str) -> None:
    result = run_cli(["doctor", url], preamble=f"import sys; sys.modules[{module!r}] = None")
    assert_clear_error(
        result,
        "is not installed",
        f"pip install 'sqlalchemy-locksafe[{extra}]'",
    )


def test_an_asyncio_driver_without_greenlet_names_the_extra() -> None:
    result = run_cli(
        ["doctor", "postgresql+asyncpg://app@db/app"],
        preamble="import sys; sys.modules['greenlet'] = None",
    )
    assert_clear_error(
        result, "needs the greenlet package", "pip install 'sqlalchemy-locksafe[postgresql]'"
    )


@pytest.mark.parametrize(
    "drivername", ["postgresql+psycopg", "postgresql+asyncpg", "mysql+pymysql", "mysql+aiomysql"]
)
def test_an_unreachable_server_is_a_clear_error(
    drivername: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{drivername}://app:secret@127.0.0.1:{free_port()}/app"
    result = run_main(capsys, ["doctor", url])
    assert_clear_error(result, "cannot connect to", "app:***@127.0.0.1", "is running and reachable")
    assert "secret" not in result.stderr


def test_sqlite_urls_that_cannot_be_examined(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_clear_error(run_main(capsys, ["doctor", "sqlite://"]), "is an in-memory SQLite database")
    assert_clear_error(
        run_main(capsys, ["doctor", "sqlite:///file:shared?mode=memory&cache=shared&uri=true"]),
        "is an in-memory SQLite database",
    )
    missing = tmp_path / "nope.db"
    assert_clear_error(
        run_main(capsys, ["doctor", f"sqlite:///{missing}"]),
        f"there is no SQLite database at {missing}",
        "does not create one",
    )
    assert not missing.exists()
    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("not an SQLite database: a text file\n" * 20)
    assert_clear_error(
        run_main(capsys, ["doctor", f"sqlite:///{not_sqlite}"]),
        "cannot read it as an SQLite database",
        "file is not a database",
    )
    assert not_sqlite.read_text() == "not an SQLite database: a text file\n" * 20


@pytest.fixture
def limited_user(cell: Cell) -> Iterator[URL]:
    """A user of the cell's server that may connect and read, not create tables."""
    engine = cell.sync_engine()
    name = "locksafe_doctor_limited"
    if cell.backend == "postgresql":
        with engine.connect() as conn:
            conn.execute(text(f"DROP ROLE IF EXISTS {name}"))
            conn.execute(text(f"CREATE ROLE {name} LOGIN PASSWORD 'limited'"))
            conn.commit()
    else:
        with engine.connect() as conn:
            conn.execute(text(f"DROP USER IF EXISTS '{name}'@'127.0.0.1'"))
            conn.execute(text(f"CREATE USER '{name}'@'127.0.0.1' IDENTIFIED BY 'limited'"))
            conn.execute(text(f"GRANT SELECT ON {cell.url.database}.* TO '{name}'@'127.0.0.1'"))
            conn.commit()
    try:
        yield cell.url.set(username=name, password="limited")
    finally:
        with engine.connect() as conn:
            if cell.backend == "postgresql":
                conn.execute(text(f"DROP ROLE IF EXISTS {name}"))
            else:
                conn.execute(text(f"DROP USER IF EXISTS '{name}'@'127.0.0.1'"))
            conn.commit()


@pytest.mark.cells("postgresql+psycopg", "mysql+mysqldb")
def test_missing_privileges_are_a_clear_error(
    cell: Cell, limited_user: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_main(capsys, ["doctor", limited_user.render_as_string(hide_password=False)])
    assert_clear_error(
        result,
        "connected, but cannot create and fill the scratch table locksafe_doctor_",
        "permission denied" if cell.backend == "postgresql" else "CREATE command denied",
        "needs the CREATE privilege" if cell.backend == "postgresql" else "CREATE, INSERT",
    )
    assert scratch_tables(cell) == []


def test_options_are_checked_and_name_themselves() -> None:
    with pytest.raises(TypeError, match="url must be a database URL"):
        diagnose(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sqlite_configure must be True, False or None"):
        diagnose(sqlite_configure="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mysql_engine must be a storage engine name"):
        diagnose(mysql_engine=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mysql_engine='My ISAM' is not a storage engine name"):
        diagnose(mysql_engine="My ISAM")
    with pytest.raises(ValueError, match="mysql_engine='MyISAM' applies to MySQL and MariaDB"):
        diagnose(mysql_engine="MyISAM")
    with pytest.raises(TypeError, match="probe_timeout must be a number of seconds"):
        diagnose(probe_timeout=True)
    with pytest.raises(ValueError, match="probe_timeout=1 must be between 10 and 3600"):
        diagnose(probe_timeout=1)
    with pytest.raises(TypeError, match=r"progress must be a locksafe\.doctor\.Progress"):
        diagnose(progress=print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="positional"):
        diagnose(None, True)  # type: ignore[misc]


def test_an_option_error_on_the_command_line_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert_clear_error(
        run_main(capsys, ["doctor", "--mysql-engine", "MyISAM"]),
        "mysql_engine='MyISAM' applies to MySQL and MariaDB only, not to sqlite",
    )
    assert_clear_error(
        run_main(capsys, ["doctor", "--probe-timeout", "5"]),
        "probe_timeout=5.0 must be between 10 and 3600 seconds",
    )
