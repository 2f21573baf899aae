"""Throw-away PostgreSQL and MariaDB servers for the test suite.

``start_postgresql()`` and ``start_mariadb()`` each start a private server in a fresh temporary
directory on a free TCP port of 127.0.0.1 and return a :class:`Server`; ``Server.stop()`` stops
it by its own pid (never by process name) and removes the directory.  ``stop()`` is idempotent,
and every server still running is also stopped at interpreter exit and on SIGTERM/SIGHUP.

Run ``python tests/harness/servers.py [--hold SECONDS]`` for a quick manual check.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

__all__ = ["Server", "ServerStartError", "start_mariadb", "start_postgresql"]

PG_BIN = Path(os.environ.get("LOCKSAFE_PG_BIN", "/usr/lib/postgresql/15/bin"))
STOP_TIMEOUT = 20.0  # seconds between the polite signal and SIGKILL
KILL_TIMEOUT = 5.0  # seconds to wait after SIGKILL
START_TIMEOUT = 60.0  # seconds for a server to become ready
COMMAND_TIMEOUT = 120.0  # seconds for one helper command (initdb, mariadb-install-db, ...)
PORT_ATTEMPTS = 3  # a port picked free can be taken before the server binds it: retry
LOG_TAIL_LINES = 40


class ServerStartError(RuntimeError):
    """A throw-away server could not be started."""


@dataclass
class Server:
    """A running throw-away server; ``stop()`` it when done (idempotent)."""

    name: str
    url: str
    pid: int
    port: int
    base_dir: Path
    log_path: Path
    startup_seconds: float
    _stop_signal: signal.Signals = field(repr=False)
    _starttime: str | None = field(repr=False)
    _reap: Callable[[], object] = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def running(self) -> bool:
        return not self._stopped and _alive(self.pid, self._starttime, self._reap)

    def stop(self) -> None:
        """Stop the server (polite signal, bounded wait, SIGKILL) and remove its directory.

        Every step is idempotent, so a repeated or re-entrant call (e.g. from a signal handler
        interrupting a stop in progress) is harmless.
        """
        if self._stopped:
            return
        _terminate(self.pid, self._starttime, self._stop_signal, self._reap)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        # Only now: a stop interrupted above (Ctrl-C) is done again by the atexit safety net.
        self._stopped = True
        _forget(self)


# ---------------------------------------------------------------------------------------------
# Safety net: at interpreter exit and on SIGTERM / SIGHUP, stop every live server and undo every
# start-up in progress.  No locks: the signal handler runs on the main thread between bytecodes
# and must never wait for a lock that the code it interrupted holds.

_live: list[Server] = []
_pending: list[_Pending] = []
_atexit_registered = False
_handlers_installed = False
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Pending:
    """A start-up in progress: what to undo if it fails or is interrupted."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.helper: subprocess.Popen[str] | None = None  # the helper command running now
        self.stop_server: Callable[[], None] | None = None

    def undo(self) -> None:
        helper = self.helper
        if helper is not None and helper.poll() is None:
            _kill_group(helper)
        stop_server = self.stop_server
        if stop_server is not None:
            stop_server()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def _starting(prefix: str, owner: str) -> Iterator[_Pending]:
    """Make the base directory and undo everything if the block does not complete."""
    _install_safety_net()
    pending = _Pending(_make_base_dir(prefix, owner))
    _pending.append(pending)
    try:
        yield pending
    except BaseException:
        pending.undo()
        raise
    finally:
        with contextlib.suppress(ValueError):
            _pending.remove(pending)


# The last line of defence, for a test process that dies without running any Python clean-up
# (a segfault in a C driver, SIGKILL): a watchdog process per server, in its own session, that
# stops the server and removes its directory once the process that started it is gone.
_WATCHDOG = """
import os, shutil, signal, sys, time
owner, pid, signum, base = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def alive(p):
    try:
        os.kill(p, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
while alive(owner):
    time.sleep(0.5)
if alive(pid):
    os.kill(pid, signum)
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
shutil.rmtree(base, ignore_errors=True)
"""
_watchdogs: dict[int, subprocess.Popen[bytes]] = {}


def _remember(server: Server) -> None:
    _live.append(server)
    _watchdogs[id(server)] = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _WATCHDOG,
            str(os.getpid()),
            str(server.pid),
            str(int(server._stop_signal)),
            str(server.base_dir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _forget(server: Server) -> None:
    with contextlib.suppress(ValueError):
        _live.remove(server)
    watchdog = _watchdogs.pop(id(server), None)
    if watchdog is not None:
        watchdog.kill()
        watchdog.wait(5)


def stop_all() -> None:
    """Undo start-ups in progress and stop every server this process started."""
    for pending in list(_pending):
        try:
            pending.undo()
        except Exception as exc:  # keep going: the others must be cleaned up too
            print(f"servers.py: undoing a start-up failed: {exc!r}", file=sys.stderr)
    for server in reversed(list(_live)):
        try:
            server.stop()
        except Exception as exc:
            print(f"servers.py: stopping {server.name} failed: {exc!r}", file=sys.stderr)


def _install_safety_net() -> None:
    global _atexit_registered, _handlers_installed
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(stop_all)
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread: maybe next time
    _handlers_installed = True
    for signum in _HANDLED_SIGNALS:
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue  # whoever started us wants this signal ignored
        signal.signal(signum, _make_handler(previous))


_SignalHandler = Callable[[int, FrameType | None], object]


def _make_handler(previous: _SignalHandler | int | None) -> _SignalHandler:
    def handler(signum: int, frame: FrameType | None) -> None:
        if _live or _pending:
            name = signal.Signals(signum).name
            print(f"servers.py: {name} received, stopping the test servers", file=sys.stderr)
        stop_all()
        if callable(previous):
            previous(signum, frame)
            return
        # Default disposition: die of the same signal, as if we had not been here.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return handler


# ---------------------------------------------------------------------------------------------
# Process helpers.


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def _starttime(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _alive(pid: int, starttime: str | None, reap: Callable[[], object]) -> bool:
    """Whether the process still runs (zombies count as dead; a reused pid is not ours)."""
    reap()
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return starttime is None or (len(fields) > 19 and fields[19] == starttime)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    result = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat(int(entry.name))
        if fields is not None and len(fields) > 1 and fields[1] == str(pid):
            result.append(int(entry.name))
    return result


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_gone(pid: int, starttime: str | None, reap: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid, starttime, reap):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate(
    pid: int, starttime: str | None, first: signal.Signals, reap: Callable[[], object]
) -> None:
    """Send ``first`` to pid, wait up to STOP_TIMEOUT, then SIGKILL it and its children."""
    if not _alive(pid, starttime, reap):
        return
    _signal(pid, first)
    if _wait_gone(pid, starttime, reap, STOP_TIMEOUT):
        return
    print(
        f"servers.py: pid {pid} ignored {first.name} for {STOP_TIMEOUT:.0f} s, sending SIGKILL",
        file=sys.stderr,
    )
    children = _children(pid)
    _signal(pid, signal.SIGKILL)
    for child in children:
        _signal(child, signal.SIGKILL)
    if not _wait_gone(pid, starttime, reap, KILL_TIMEOUT):
        print(f"servers.py: pid {pid} survived SIGKILL", file=sys.stderr)


def _no_reap() -> None:
    return None


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a helper started in its own session, with everything else in its group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _run(
    args: Sequence[str | Path],
    *,
    what: str,
    pending: _Pending,
    timeout: float = COMMAND_TIMEOUT,
    env: dict[str, str] | None = None,
) -> str:
    """Run a helper command in its own process group; return its output or raise.

    On timeout or interruption the whole group is killed, so no grandchild (e.g. the
    ``mariadbd --bootstrap`` that mariadb-install-db starts) outlives us.
    """
    argv = [str(a) for a in args]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd=pending.base,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise ServerStartError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    pending.helper = proc
    try:
        output, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:
        _kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise ServerStartError(f"{what} timed out after {timeout:.0f} s") from None
        raise
    finally:
        pending.helper = None
    if proc.returncode != 0:
        raise ServerStartError(
            f"{what} failed (exit {proc.returncode}): {shlex.join(argv)}\n{_tail_text(output)}"
        )
    return output


def _tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    return f"--- last lines of {path} ---\n{_tail_text(text, lines)}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find(name: str, *dirs: str | Path, dirs_first: bool = False) -> str:
    """Path of an executable: on $PATH, or in one of ``dirs`` (searched first if asked)."""
    in_dirs = (Path(d) / name for d in dirs)
    found = next((str(c) for c in in_dirs if os.access(c, os.X_OK)), None)
    if found and dirs_first:
        return found
    found = shutil.which(name) or found
    if found:
        return found
    raise ServerStartError(
        f"{name} not found on PATH nor in {', '.join(map(str, dirs)) or '-'}; "
        "run scripts/test.sh once, it installs the database servers"
    )


def _is_root() -> bool:
    return os.geteuid() == 0


def _make_base_dir(prefix: str, owner: str) -> Path:
    """A fresh temporary directory, owned by ``owner`` when we are root.

    Unix socket paths are limited to ~107 bytes, so a long $TMPDIR falls back to /tmp.
    """
    parent = tempfile.gettempdir()
    if len(parent) > 60 and Path("/tmp").is_dir():
        parent = "/tmp"
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if _is_root():
        try:
            shutil.chown(base, owner, owner)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
    return base


def _as_user(user: str, argv: Sequence[str | Path]) -> list[str | Path]:
    """``argv`` run as ``user`` when we are root (PostgreSQL refuses to run as root)."""
    if _is_root():
        return ["runuser", "-u", user, "--", *argv]
    return list(argv)


# ---------------------------------------------------------------------------------------------
# PostgreSQL.


def start_postgresql() -> Server:
    """Start a throw-away PostgreSQL (superuser ``postgres``, trust auth) and return it."""
    started = time.monotonic()
    initdb = _find("initdb", PG_BIN, dirs_first=True)
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    with _starting("locksafe-pg-", "postgres") as pending:
        base = pending.base
        data = base / "data"
        log = base / "postgresql.log"
        # From here on, a postmaster that wrote its pid file is stopped if anything goes wrong.
        pending.stop_server = lambda: _stop_postmaster(data)
        initdb_cmd: list[str | Path] = [initdb, "-D", data, "-U", "postgres", "--auth=trust"]
        initdb_cmd += ["-E", "UTF8", "--no-locale", "--no-sync"]
        _run(_as_user("postgres", initdb_cmd), what="initdb", pending=pending)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = _free_port()
            settings = [
                "listen_addresses=127.0.0.1",
                "max_connections=200",
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
            ]
            options = ["-p", str(port), "-k", str(base)]
            for setting in settings:
                options += ["-c", setting]
            start_cmd: list[str | Path] = [pg_ctl, "-D", data, "-l", log, "-w"]
            start_cmd += ["-t", f"{START_TIMEOUT:.0f}", "-o", shlex.join(options), "start"]
            try:
                _run(
                    _as_user("postgres", start_cmd),
                    what="pg_ctl start",
                    pending=pending,
                    timeout=START_TIMEOUT + 15,
                )
            except ServerStartError as exc:
                clash = "already in use" in _tail(log)
                if clash and attempt < PORT_ATTEMPTS and _postmaster_pid(data) is None:
                    continue
                raise ServerStartError(f"{exc}\n{_tail(log)}") from None
            break
        pid = _postmaster_pid(data)
        if pid is None:
            raise ServerStartError(f"PostgreSQL started but left no postmaster.pid\n{_tail(log)}")
        server = Server(
            name="postgresql",
            url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
            pid=pid,
            port=port,
            base_dir=base,
            log_path=log,
            startup_seconds=time.monotonic() - started,
            _stop_signal=_PG_STOP_SIGNAL,
            _starttime=_starttime(pid),
            _reap=_no_reap,
        )
        _remember(server)
    return server


# SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to disconnect; SIGINT
# is its "fast" shutdown (pg_ctl stop -m fast): abort the sessions, checkpoint, exit.
_PG_STOP_SIGNAL = signal.SIGINT


def _stop_postmaster(data: Path) -> None:
    pid = _postmaster_pid(data)
    if pid is not None:
        _terminate(pid, _starttime(pid), _PG_STOP_SIGNAL, _no_reap)


def _postmaster_pid(data: Path) -> int | None:
    try:
        first_line = (data / "postmaster.pid").read_text().splitlines()[0]
        return int(first_line.strip())
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# MariaDB.

MARIADB_USER = "locksafe"
MARIADB_PASSWORD = "locksafe"
MARIADB_DATABASE = "locksafe"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")


def start_mariadb() -> Server:
    """Start a throw-away MariaDB with database/user/password ``locksafe`` and return it."""
    started = time.monotonic()
    mariadbd = _find("mariadbd", *_SBIN)
    install_db = _find("mariadb-install-db", *_SBIN)
    admin = _find("mariadb-admin", *_SBIN)
    client = _find("mariadb", *_SBIN)
    # The unix account that may log in as a MariaDB superuser over the socket (unix_socket auth).
    socket_user = pwd.getpwuid(os.geteuid()).pw_name
    user_args = ["--user=mysql"] if _is_root() else []
    with _starting("locksafe-mariadb-", "mysql") as pending:
        base = pending.base
        data = base / "data"
        sock = base / "mariadb.sock"
        err_log = base / "error.log"
        out_log = base / "stdout.log"
        # mariadbd puts temporary files in $TMPDIR, which its unprivileged user may not be able
        # to write (e.g. a TMPDIR owned by root): use the base directory, which it owns.
        env = {**os.environ, "TMPDIR": str(base)}
        install_cmd = [install_db, "--no-defaults", *user_args, f"--datadir={data}"]
        install_cmd += ["--skip-test-db", "--auth-root-authentication-method=socket"]
        install_cmd += [f"--auth-root-socket-user={socket_user}"]
        _run(install_cmd, what="mariadb-install-db", pending=pending, env=env)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = _free_port()
            argv = [
                mariadbd,
                "--no-defaults",
                *user_args,
                f"--datadir={data}",
                f"--socket={sock}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={base / 'mariadbd.pid'}",
                f"--log-error={err_log}",
                f"--tmpdir={base}",
                "--skip-name-resolve",
                "--max-connections=300",
                "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=16M",
                "--innodb-flush-log-at-trx-commit=0",
            ]
            with out_log.open("ab") as out:
                # mariadbd drops privileges in the same pid, so proc.pid is the server's pid.
                # Its own session keeps a terminal's Ctrl-C away from it: we stop it ourselves.
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=base,
                    env=env,
                    start_new_session=True,
                )
            pending.stop_server = _mariadbd_stopper(proc)
            if _wait_mariadb_ready(proc, admin, sock, socket_user):
                break
            returncode = proc.poll()
            if returncode is None:
                raise ServerStartError(
                    f"MariaDB not ready after {START_TIMEOUT:.0f} s\n{_tail(err_log)}"
                )
            if attempt < PORT_ATTEMPTS and "already in use" in _tail(err_log):
                continue
            raise ServerStartError(
                f"mariadbd exited with status {returncode} during start-up\n{_tail(err_log)}"
                f"\n{_tail(out_log)}"
            )
        quoted_user = f"'{MARIADB_USER}'@'127.0.0.1'"
        sql = (
            f"CREATE DATABASE IF NOT EXISTS `{MARIADB_DATABASE}`;"
            f" CREATE USER {quoted_user} IDENTIFIED BY '{MARIADB_PASSWORD}';"
            f" GRANT ALL PRIVILEGES ON *.* TO {quoted_user} WITH GRANT OPTION;"
        )
        _run(
            [client, "--no-defaults", f"--socket={sock}", f"--user={socket_user}", "-e", sql],
            what="creating the MariaDB user",
            pending=pending,
            timeout=30,
        )
        server = Server(
            name="mariadb",
            url=f"mysql://{MARIADB_USER}:{MARIADB_PASSWORD}@127.0.0.1:{port}/{MARIADB_DATABASE}",
            pid=proc.pid,
            port=port,
            base_dir=base,
            log_path=err_log,
            startup_seconds=time.monotonic() - started,
            _stop_signal=signal.SIGTERM,
            _starttime=_starttime(proc.pid),
            _reap=proc.poll,
        )
        _remember(server)
    return server


def _mariadbd_stopper(proc: subprocess.Popen[bytes]) -> Callable[[], None]:
    starttime = _starttime(proc.pid)

    def stop() -> None:
        _terminate(proc.pid, starttime, signal.SIGTERM, proc.poll)

    return stop


def _wait_mariadb_ready(
    proc: subprocess.Popen[bytes], admin: str, sock: Path, socket_user: str
) -> bool:
    """Ping over the socket until the server answers (True) or exits / times out (False)."""
    deadline = time.monotonic() + START_TIMEOUT
    ping = [admin, "--no-defaults", f"--socket={sock}", f"--user={socket_user}"]
    ping += ["--connect-timeout=2", "ping"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if sock.exists():
            try:
                result = subprocess.run(
                    ping,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=10,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0:
                return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------------------------
# Manual check.


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start and stop the throw-away test servers.")
    parser.add_argument(
        "--hold",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep the servers up this long before stopping them",
    )
    parser.add_argument("--only", choices=("postgresql", "mariadb"), help="start only this server")
    args = parser.parse_args(argv)
    starters: dict[str, Callable[[], Server]] = {
        "postgresql": start_postgresql,
        "mariadb": start_mariadb,
    }
    servers: list[Server] = []
    try:
        for name, start in starters.items():
            if args.only not in (None, name):
                continue
            server = start()
            servers.append(server)
            print(
                f"{server.name}: {server.url} (pid {server.pid}, "
                f"started in {server.startup_seconds:.2f} s)",
                flush=True,
            )
        if args.hold > 0:
            print(f"holding for {args.hold:g} s", flush=True)
            time.sleep(args.hold)
    finally:
        for server in reversed(servers):
            began = time.monotonic()
            server.stop()
            print(f"{server.name}: stopped in {time.monotonic() - began:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
