"""Doctor connections: each one a thread with its own engine (and event loop, for an asyncio
driver) and one connection, driven step by step by a probe.

Like :class:`locksafe.testing.OtherConnection`, but on engines the doctor makes (a SQLite engine
set up by :func:`locksafe.sqlite.configure`, bounded waits), and able to run a whole piece of
work with its own sessions. Every wait is bounded: a step is waited for at most its timeout, a
worker gives its transaction up by itself after ``hold_timeout`` seconds, and every worker still
running is stopped (rolled back, closed) by :func:`stop_all`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import Engine as SyncEngine

from locksafe.doctor._target import Target

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Handle", "Worker", "stop_all"]

T = TypeVar("T")

_STOP = object()
_live: weakref.WeakSet[Worker] = weakref.WeakSet()
_live_lock = threading.Lock()


class Handle:
    """What a piece of work run by :meth:`Worker.work` gets: the worker's engine, its
    connection (``call``) and its event loop (``wait``)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    @property
    def engine(self) -> Engine | AsyncEngine:
        engine = self._worker._engine
        assert engine is not None
        return engine

    @property
    def is_async(self) -> bool:
        return self._worker.target.is_async

    def call(self, fn: Callable[[Connection], T]) -> T:
        """``fn(connection)`` on the worker's own connection (through ``run_sync`` on an
        asyncio driver)."""
        return self._worker._call(fn)

    def wait(self, awaitable: Awaitable[T]) -> T:
        """Run a coroutine to its end in the worker's event loop (asyncio drivers)."""
        loop = self._worker._event_loop
        assert loop is not None
        return loop.run_until_complete(awaitable)

    @property
    def async_connection(self) -> AsyncConnection:
        aconn = self._worker._aconn
        assert aconn is not None
        return aconn


class Worker:
    """One doctor connection in its own thread; use as a context manager."""

    def __init__(
        self, target: Target, label: str, *, hold_timeout: float, bounded: bool = True
    ) -> None:
        self.target = target
        self.bounded = bounded
        self.label = label
        self.hold_timeout = hold_timeout
        self._commands: queue.Queue[Any] = queue.Queue()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread: threading.Thread | None = None
        self._engine: Engine | AsyncEngine | None = None
        self._conn: Connection | None = None
        self._aconn: AsyncConnection | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._handle = Handle(self)
        #: The server's id of this connection (PostgreSQL backend pid, MySQL connection id),
        #: to cancel a statement that still waits when the doctor is interrupted.
        self.server_id: int | None = None

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- driving it ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Connect (in the thread); raises what connecting raised."""
        if self._thread is not None:
            return
        with _live_lock:
            _live.add(self)
        self._thread = threading.Thread(
            target=self._main, name=f"locksafe-doctor-{self.label}", daemon=True
        )
        self._thread.start()
        try:
            self._ready.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no connection after {timeout:g} s") from None

    def submit(self, fn: Callable[[Connection], T]) -> concurrent.futures.Future[T]:
        """Start ``fn(connection)`` on this worker's connection; returns at once."""
        return self._put(("call", fn))

    def run(self, fn: Callable[[Connection], T], *, timeout: float) -> T:
        """``fn(connection)`` on this worker's connection, waited for ``timeout`` seconds at
        most."""
        return _result(self.submit(fn), timeout)

    def submit_work(self, fn: Callable[[Handle], T]) -> concurrent.futures.Future[T]:
        """Start ``fn(handle)`` in this worker's thread (for work with its own sessions)."""
        return self._put(("work", fn))

    def rollback(self, timeout: float = 15.0) -> None:
        self.run(lambda conn: conn.rollback(), timeout=timeout)

    def ask_to_stop(self) -> None:
        """Roll back, close and end the thread after the step it runs; returns at once."""
        self._commands.put(_STOP)

    def stop(self, timeout: float = 15.0) -> bool:
        """Roll back, close and end the thread; ``False`` if it did not end in time (it is
        still waiting on the server, which ends that wait by its own bound)."""
        thread = self._thread
        if thread is None:
            return True
        self._commands.put(_STOP)
        try:
            thread.join(timeout)
        except RuntimeError:  # interrupted (Ctrl-C) before or while the thread started
            time.sleep(0.05)
            if thread.ident is not None:
                thread.join(timeout)
        with _live_lock:
            _live.discard(self)
        return not thread.is_alive()

    def _put(self, command: tuple[str, Any]) -> concurrent.futures.Future[Any]:
        if self._thread is None:
            self.start()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._commands.put((*command, future))
        return future

    # -- the thread ---------------------------------------------------------------------------

    def _call(self, fn: Callable[[Connection], T]) -> T:
        if self._aconn is not None:
            assert self._event_loop is not None
            return self._event_loop.run_until_complete(self._aconn.run_sync(fn))
        assert self._conn is not None
        return fn(self._conn)

    def _main(self) -> None:
        try:
            if self.target.is_async:
                self._event_loop = asyncio.new_event_loop()
                asyncio.set_event_loop(self._event_loop)
            self._engine = self.target.make_engine(bounded=self.bounded)
            if self._event_loop is not None:
                self._aconn = self._event_loop.run_until_complete(
                    self._engine.connect().start()  # type: ignore[union-attr]
                )
            else:
                self._conn = self._engine.connect()  # type: ignore[assignment]
            sql = session_id_sql(self.target.backend)
            if sql is not None:
                self.server_id = self._call(lambda conn: _scalar_then_rollback(conn, sql))
        except BaseException as exc:
            self._ready.set_exception(exc)
            self._close()
            return
        self._ready.set_result(None)
        try:
            self._serve()
        finally:
            self._close()

    def _serve(self) -> None:
        deadline = time.monotonic() + self.hold_timeout
        while True:
            try:
                command = self._commands.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break  # held too long: give everything up
            if command is _STOP:
                break
            kind, fn, future = command
            if not future.set_running_or_notify_cancel():
                continue
            try:
                value = self._call(fn) if kind == "call" else fn(self._handle)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(value)

    def _close(self) -> None:
        loop = self._event_loop
        with contextlib.suppress(Exception):
            if self._aconn is not None and loop is not None:
                loop.run_until_complete(self._aconn.rollback())
                loop.run_until_complete(self._aconn.close())
            elif self._conn is not None:
                self._conn.rollback()
                self._conn.close()
        with contextlib.suppress(Exception):
            engine = self._engine
            if isinstance(engine, SyncEngine):
                engine.dispose()
            elif engine is not None and loop is not None:
                loop.run_until_complete(engine.dispose())
        if loop is not None:
            with contextlib.suppress(Exception):
                loop.close()
        while True:  # fail whatever was still queued
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command is not _STOP:
                command[2].set_exception(RuntimeError(f"doctor connection {self.label} closed"))


def session_id_sql(backend: str) -> str | None:
    """The statement that gives the server's id of a connection, where one can be cancelled."""
    return {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}.get(backend)


def cancel_sql(backend: str, server_id: int) -> str:
    """The statement that cancels what connection ``server_id`` runs (not the connection)."""
    if backend == "postgresql":
        return f"SELECT pg_cancel_backend({int(server_id):d})"
    return f"KILL QUERY {int(server_id):d}"


def _scalar_then_rollback(conn: Connection, sql: str) -> int:
    value = int(conn.exec_driver_sql(sql).scalar_one())
    conn.rollback()
    return value


def _result(future: concurrent.futures.Future[T], timeout: float) -> T:
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"no answer after {timeout:g} s") from None


def result(future: concurrent.futures.Future[T], timeout: float) -> T:
    """A step's value, waited for ``timeout`` seconds at most (``TimeoutError`` after)."""
    return _result(future, timeout)


def stop_all(target: Target, timeout: float) -> list[str]:
    """Stop every worker of ``target`` still running (rolled back, closed), within
    ``timeout`` seconds in all: those still waiting on the server after a moment get their
    statement cancelled (by its server id, from a connection of its own). Returns the labels
    of those that did not end in time."""
    with _live_lock:
        workers = [worker for worker in _live if worker.target is target]
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.ask_to_stop()
    waiting = [worker for worker in workers if not worker.stop(min(1.0, timeout))]
    ids = [w.server_id for w in waiting if w.server_id is not None]
    if ids:
        canceller = Worker(target, "cancel", hold_timeout=timeout, bounded=False)
        with contextlib.suppress(Exception):
            canceller.start(timeout=max(deadline - time.monotonic(), 0.1))

            def cancel(conn: Connection) -> None:
                for server_id in ids:
                    with contextlib.suppress(Exception):
                        conn.exec_driver_sql(cancel_sql(target.backend, server_id))
                conn.rollback()

            canceller.run(cancel, timeout=max(deadline - time.monotonic(), 0.1))
        canceller.stop(max(deadline - time.monotonic(), 0.1))
    return [w.label for w in waiting if not w.stop(max(deadline - time.monotonic(), 0.0))]
