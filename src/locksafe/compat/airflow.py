"""Apache Airflow's row-lock helpers, with Airflow's exact signatures, done by locksafe.

Replace ``from airflow.utils.sqlalchemy import with_row_locks, is_lock_not_available_error``
with ``from locksafe.compat.airflow import with_row_locks, is_lock_not_available_error``.

What changes, on purpose:

- On MariaDB and MySQL < 8, Airflow returns the query *unlocked*; here it is locked with the
  strongest lock the server has instead (``OF`` dropped, ``NOWAIT`` / ``SKIP LOCKED`` waiting),
  so concurrent schedulers still exclude each other.
- On SQLite, Airflow's query runs unlocked (SQLAlchemy renders nothing); here it takes SQLite's
  database write lock first.
- ``is_lock_not_available_error`` also recognises psycopg 3, asyncpg, pg8000, the MariaDB
  connector, SQLite and MySQL 8's 3572 by code, and never raises.
- :func:`create_global_lock` (``airflow.utils.db``'s, for ``airflow db migrate`` and friends)
  waits ``lock_timeout`` *seconds* on every database (Airflow's: milliseconds on PostgreSQL,
  seconds on MySQL), raises when the wait runs out, namespaces its names, and excludes on
  SQLite too (Airflow's does nothing there).

``[scheduler] use_row_level_locking = False`` (for a single scheduler) still turns row locks
off: :func:`use_row_level_locking` reads it from Airflow's configuration when Airflow is
importable, else from ``AIRFLOW__SCHEDULER__USE_ROW_LEVEL_LOCKING``, unless
:func:`set_row_level_locking` set it.

A whole Airflow deployment is switched over with :func:`install`, from
``airflow_local_settings.py`` (see ``examples/airflow_local_settings.py``)::

    import locksafe.compat.airflow as locksafe_airflow

    create_metadata_engine, create_async_metadata_engine = locksafe_airflow.install()
"""

from __future__ import annotations

import importlib.abc
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar

from locksafe.classify import is_lock_not_available_error as _is_lock_not_available_error
from locksafe.rowlocks import with_row_locks as _with_row_locks

__all__ = [
    "create_global_lock",
    "install",
    "is_lock_not_available_error",
    "set_row_level_locking",
    "use_row_level_locking",
    "with_row_locks",
]

Q = TypeVar("Q")

_TRUE = {"true", "t", "1", "yes", "y", "on"}
_FALSE = {"false", "f", "0", "no", "n", "off"}
_override: bool | None = None


def set_row_level_locking(enabled: bool | None) -> None:
    """Force row-level locking on or off (``None``: follow Airflow's configuration again).

    >>> set_row_level_locking(False)  # one scheduler: no row locks
    >>> use_row_level_locking()
    False
    >>> set_row_level_locking(None)
    """
    global _override
    _override = enabled


def use_row_level_locking() -> bool:
    """Airflow's ``[scheduler] use_row_level_locking`` (default True).

    >>> set_row_level_locking(True)
    >>> use_row_level_locking()
    True
    >>> set_row_level_locking(None)  # Airflow's configuration decides again
    """
    if _override is not None:
        return _override
    try:
        from airflow.configuration import conf  # type: ignore[import-not-found]
    except Exception:
        value = os.environ.get("AIRFLOW__SCHEDULER__USE_ROW_LEVEL_LOCKING", "").strip().lower()
        if value in _FALSE:
            return False
        if value in _TRUE or not value:
            return True
        raise ValueError(
            f"AIRFLOW__SCHEDULER__USE_ROW_LEVEL_LOCKING={value!r} is not a boolean"
        ) from None
    return bool(conf.getboolean("scheduler", "use_row_level_locking", fallback=True))


def with_row_locks(
    query: Q,
    session: Any,
    *,
    nowait: bool = False,
    skip_locked: bool = False,
    key_share: bool = True,
    **kwargs: Any,
) -> Q:
    """Airflow's ``with_row_locks``: lock the rows ``query`` returns, if row locking is on.

    ``kwargs`` are ``with_for_update()``'s other options (``of``, ``read``). Unsupported options
    degrade to a stronger lock, never to no lock.

    >>> from sqlalchemy import column, create_engine, select, table
    >>> dag_run = table("dag_run", column("id"), column("state"))
    >>> pg = create_engine("postgresql+psycopg2://")
    >>> set_row_level_locking(True)
    >>> print(with_row_locks(select(dag_run), pg, skip_locked=True).compile(pg))
    ... # doctest: +NORMALIZE_WHITESPACE
    SELECT dag_run.id, dag_run.state FROM dag_run FOR NO KEY UPDATE SKIP LOCKED
    >>> set_row_level_locking(None)
    """
    if not use_row_level_locking():
        return query
    unknown = set(kwargs) - {"of", "read"}
    if unknown:
        raise TypeError(
            f"with_row_locks() got unexpected keyword arguments: {', '.join(sorted(unknown))}"
        )
    return _with_row_locks(  # type: ignore[type-var]
        query,
        session,
        nowait=nowait,
        skip_locked=skip_locked,
        key_share=key_share,
        on_unsupported="degrade",
        **kwargs,
    )


def is_lock_not_available_error(error: object) -> bool:
    """Airflow's ``is_lock_not_available_error``: the lock could not be had (NOWAIT failed,
    lock wait timed out, SQLite busy or locked). Never raises.

    >>> import sqlite3
    >>> is_lock_not_available_error(sqlite3.OperationalError("database is locked"))
    True
    >>> is_lock_not_available_error("not an exception")
    False
    """
    return _is_lock_not_available_error(error)


# -- Airflow's global lock (airflow.utils.db.create_global_lock) ---------------------------------

#: Airflow's default ``lock_timeout``, which locksafe reads as seconds (see create_global_lock).
GLOBAL_LOCK_TIMEOUT = 1800


def _global_lock_name(lock: object) -> str:
    import enum

    if isinstance(lock, enum.Enum):
        name = str(lock)  # Airflow's DBLocks: "airflow_MIGRATIONS", "airflow_SCHEDULER_..."
    elif isinstance(lock, str):
        name = lock
    else:
        raise TypeError(f"lock={lock!r} must be one of Airflow's DBLocks (an enum member) or a str")
    if not name:
        raise ValueError("lock='' must be a non-empty name")
    return name


def create_global_lock(
    session: Any,
    lock: Any,
    lock_timeout: float | None = GLOBAL_LOCK_TIMEOUT,
) -> Any:
    """Airflow's ``airflow.utils.db.create_global_lock``, with its signature, on
    :func:`locksafe.named_lock`: a lock for the ``with`` block, one holder at a time across
    processes and hosts::

        from airflow.utils.db import DBLocks
        from locksafe.compat.airflow import create_global_lock

        with create_global_lock(session=session, lock=DBLocks.MIGRATIONS):
            command.upgrade(config, "heads")

    - ``lock_timeout`` is in **seconds on every database** (floats allowed, ``None``: no bound),
      so the default 1800 waits 30 minutes for a migration running elsewhere. Airflow's own
      passes the same number to PostgreSQL's ``lock_timeout``, which reads it as milliseconds
      (1.8 s), and to MySQL's ``GET_LOCK``, which reads seconds. Seconds are what Airflow's
      callers mean: every one (``airflow db migrate`` / ``reset`` / ``downgrade``, the
      providers' database managers) takes the default around a whole migration, which runs
      for minutes, and the number is 30 minutes' worth of seconds; at 1.8 s a second
      ``airflow db migrate`` fails while the first is still at work.
    - When the wait runs out it raises :class:`locksafe.alembic.MigrationLockTimeout` (a
      :class:`~locksafe.LockUnavailable`) — never runs the block unlocked.
    - ``lock`` is one of Airflow's ``DBLocks`` (its ``str()``, ``airflow_MIGRATIONS``, is the
      name) or a name; :func:`~locksafe.named_lock` namespaces it per database (PostgreSQL: a
      64-bit key hashed from ``locksafe:<database>:<name>``, not Airflow's bare ``1``; MySQL:
      ``locksafe:<database>:<name>``).
    - SQLite: a lock file next to the database (Airflow's does nothing), so two
      ``airflow db migrate`` on one SQLite file take turns.
    - The lock is held on a connection of its own (``session``'s engine), idle in
      ``AUTOCOMMIT`` and closed at the end (see :func:`locksafe.alembic.migration_lock`): the
      migration's COMMITs and DDL do not end it.

    The options are checked now (``TypeError`` / ``ValueError`` naming the option). Processes
    that still run Airflow's own ``create_global_lock`` use other keys: install locksafe on
    every component that migrates (:func:`install` patches Airflow's).

    >>> create_global_lock(None, "airflow_MIGRATIONS", lock_timeout=-1)
    Traceback (most recent call last):
    ...
    ValueError: lock_timeout=-1 must be a finite number of seconds ≥ 0 (0: try once), or None to wait without a bound
    """  # noqa: E501
    from locksafe.alembic import MigrationLock, check_timeout

    seconds = check_timeout(lock_timeout, "lock_timeout")
    name = _global_lock_name(lock)
    get_bind = getattr(session, "get_bind", None)
    if not callable(get_bind):
        raise TypeError(f"session={session!r} must be a SQLAlchemy Session (Airflow's session)")
    bind = get_bind()
    engine = getattr(bind, "engine", bind)  # a Session bound to a Connection: its engine
    holder = "an Airflow migration" if name == "airflow_MIGRATIONS" else "Airflow work"
    return MigrationLock(engine, name=name, timeout=seconds, holder=holder, session=session)


# -- the whole deployment: install() from airflow_local_settings.py ------------------------------

log = logging.getLogger(__name__)

#: Airflow's module that defines the helpers every other Airflow module imports.
HELPERS_MODULE = "airflow.utils.sqlalchemy"
_HELPER_NAMES = ("with_row_locks", "is_lock_not_available_error")
#: Marks locksafe's engine factories (their Airflow original in this attribute).
_ORIGINAL = "__locksafe_original__"
_install_lock = threading.RLock()
_logged = False


def _ours() -> dict[str, Any]:
    return {
        "with_row_locks": with_row_locks,
        "is_lock_not_available_error": is_lock_not_available_error,
    }


def replace_helpers(modules: Sequence[ModuleType] | None = None) -> int:
    """Bind locksafe's helpers wherever an Airflow module bound Airflow's: in
    ``airflow.utils.sqlalchemy`` itself and in every module that ran
    ``from airflow.utils.sqlalchemy import with_row_locks`` (the name bound in its own globals).
    Modules imported afterwards get locksafe's from ``airflow.utils.sqlalchemy``. Returns how
    many names were rebound."""
    helpers = sys.modules.get(HELPERS_MODULE)
    if helpers is None:
        return 0
    ours = _ours()
    originals = {}
    for name in _HELPER_NAMES:
        current = getattr(helpers, name, None)
        if current is not None and current is not ours[name]:
            originals[name] = current
        setattr(helpers, name, ours[name])
    known = getattr(helpers, "__locksafe_originals__", {})
    known.update(originals)
    helpers.__locksafe_originals__ = known  # type: ignore[attr-defined]
    return _rebind_in_airflow(
        {helper: (original, ours[helper]) for helper, original in known.items()}, modules
    )


def _rebind_in_airflow(
    replacements: Mapping[str, tuple[object, object]],
    modules: Sequence[ModuleType] | None = None,
) -> int:
    """Rebind names in every ``airflow`` module (of ``modules``, by default of ``sys.modules``)
    that bound an original by ``from ... import`` (the name in its own globals):
    ``replacements`` maps each name to ``(original, replacement)``; a module whose name is
    bound to something else keeps it. Returns how many names were rebound."""
    replaced = 0
    targets = modules if modules is not None else list(sys.modules.values())
    for module in targets:
        name = getattr(module, "__name__", "")
        if not isinstance(name, str) or not (name == "airflow" or name.startswith("airflow.")):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, (original, replacement) in replacements.items():
            if namespace.get(attribute) is original:
                namespace[attribute] = replacement
                replaced += 1
    return replaced


#: The Airflow module whose ``action_logging`` dependency writes the audit log.
AUDIT_LOG_MODULE = "airflow.api_fastapi.logging.decorators"


def audit_log_off_the_event_loop(module: ModuleType) -> bool:
    """Make Airflow's ``action_logging()`` dependency write and commit its audit-log row in a
    worker thread instead of on the event loop.

    Airflow's ``log_action`` is an ``async def`` that calls ``session.commit()`` — blocking
    database work on the event loop. On SQLite that COMMIT's INSERT waits for the database
    write lock, and the lock may be held by a request of the same process whose transaction
    ends in its dependency teardown — which needs the event loop the audit log is blocking.
    Neither can go on until the busy timeout ends the wait with "database is locked" (an HTTP
    500 on every action-logged route: POST /backfills, cancel, PATCH). Run in a worker thread,
    the audit log waits for the write lock like any other writer while the loop serves the
    holder. The request body is read on the loop first (Starlette caches it), so the same
    ``log_action`` runs unchanged. Returns whether it patched (False: already done, or not the
    expected shape)."""
    original = getattr(module, "action_logging", None)
    if original is None or getattr(original, _ORIGINAL, None) is not None:
        return False

    import asyncio
    import functools

    import anyio.to_thread

    @functools.wraps(original)
    def action_logging(*args: Any, **kwargs: Any) -> Any:
        log_action = original(*args, **kwargs)
        if not inspect.iscoroutinefunction(log_action):
            return log_action

        @functools.wraps(log_action)
        async def log_action_in_a_thread(**values: Any) -> Any:
            request = values.get("request")
            headers = getattr(request, "headers", None)
            if request is not None and "application/json" in (headers or {}).get(
                "content-type", ""
            ):
                await request.body()  # cached on the request: log_action reads it again
            return await anyio.to_thread.run_sync(
                functools.partial(asyncio.run, log_action(**values))
            )

        return log_action_in_a_thread

    setattr(action_logging, _ORIGINAL, original)
    module.action_logging = action_logging  # type: ignore[attr-defined]
    return True


#: The Airflow module whose ``_create_backfill`` counts a DAG's active backfills, then adds one.
BACKFILL_MODULE = "airflow.models.backfill"


def backfill_creation_one_at_a_time(module: ModuleType) -> bool:
    """Run Airflow's ``_create_backfill`` inside :func:`locksafe.sqlite.immediate`.

    It counts the DAG's active backfills, then inserts one and commits, with no lock between
    the two (the count has no row to lock): two concurrent POSTs for one DAG can both count 0
    and both create a backfill — on every database, since PostgreSQL runs READ COMMITTED. On
    SQLite the ``immediate()`` block makes its transactions take the write lock before their
    first statement, so the count and the insert of one creation run before the next creation's
    count. No effect on other databases. Returns whether it patched."""
    original = getattr(module, "_create_backfill", None)
    if original is None or getattr(original, _ORIGINAL, None) is not None:
        return False

    import functools

    from locksafe.sqlite import immediate

    @functools.wraps(original)
    def _create_backfill(*args: Any, **kwargs: Any) -> Any:
        with immediate():
            return original(*args, **kwargs)

    setattr(_create_backfill, _ORIGINAL, original)
    module._create_backfill = _create_backfill  # type: ignore[attr-defined]
    _rebind_in_airflow({"_create_backfill": (original, _create_backfill)})  # bound before
    return True


#: The Airflow module that defines ``create_global_lock`` (and calls it, by its global name).
DB_MODULE = "airflow.utils.db"


def global_lock_on_every_database(module: ModuleType) -> bool:
    """Make ``module.create_global_lock`` (Airflow's ``airflow.utils.db``) locksafe's
    :func:`create_global_lock`: seconds on every database, the result checked, names
    namespaced, exclusion on SQLite — so two ``airflow db migrate`` take turns on every
    backend. Airflow's own calls look the name up in the module at call time
    (``_run_upgradedb``, ``initdb``, ``resetdb``, ``downgrade``; the database managers import
    it when they run), so only that name is rebound (and in any ``airflow.*`` module that bound
    it by ``from ... import`` before). Idempotent; Airflow's original is the wrapper's
    ``__locksafe_original__`` (set it back to undo). Returns whether it patched."""
    original = getattr(module, "create_global_lock", None)
    if original is None or getattr(original, _ORIGINAL, None) is not None:
        return False

    def create_global_lock_(
        session: Any, lock: Any, lock_timeout: float | None = GLOBAL_LOCK_TIMEOUT
    ) -> Any:
        return create_global_lock(session, lock, lock_timeout)

    create_global_lock_.__name__ = create_global_lock_.__qualname__ = "create_global_lock"
    create_global_lock_.__doc__ = create_global_lock.__doc__
    create_global_lock_.__module__ = __name__
    setattr(create_global_lock_, _ORIGINAL, original)
    module.create_global_lock = create_global_lock_  # type: ignore[attr-defined]
    _rebind_in_airflow({"create_global_lock": (original, create_global_lock_)})  # bound before
    return True


#: What install() changes in each Airflow module, as soon as that module has been executed.
_ON_IMPORT: dict[str, Callable[[ModuleType], Any]] = {
    HELPERS_MODULE: lambda module: replace_helpers(),
    AUDIT_LOG_MODULE: audit_log_off_the_event_loop,
    BACKFILL_MODULE: backfill_creation_one_at_a_time,
    DB_MODULE: global_lock_on_every_database,
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patch an Airflow module of ``_ON_IMPORT`` right after it has been executed, when it was
    not imported yet at :func:`install` time (importing it early could run Airflow's import
    cycle in another order, and the routes bind ``action_logging()`` when they are defined)."""

    def __init__(self) -> None:
        self.pending = set(_ON_IMPORT)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.pending:
            return None
        spec = _find_spec_without(self, fullname)
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if spec is None or loader is None or exec_module is None:
            return spec
        patch = _ON_IMPORT[fullname]

        def exec_then_patch(module: ModuleType) -> None:
            exec_module(module)
            # Pending until the module has really been executed: a find_spec() that does not
            # import (importlib.util.find_spec) or an import that failed must not use it up.
            self.pending.discard(fullname)
            if not self.pending:
                _remove_finder()
            patch(module)

        loader.exec_module = exec_then_patch
        return spec


def _find_spec_without(finder: _PatchOnImport, fullname: str) -> Any:
    """The spec the other finders give for ``fullname``."""
    for other in sys.meta_path:
        if other is finder or isinstance(other, _PatchOnImport):
            continue
        find = getattr(other, "find_spec", None)
        if find is None:
            continue
        parent = fullname.rpartition(".")[0]
        search = getattr(sys.modules.get(parent), "__path__", None) if parent else None
        spec = find(fullname, search)
        if spec is not None:
            return spec
    return None


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]


def _airflow_settings() -> Any:
    try:
        import airflow.settings as settings  # type: ignore[import-not-found]
    except Exception as error:  # pragma: no cover - only without Airflow
        raise RuntimeError(
            "locksafe.compat.airflow.install() runs inside Airflow (airflow_local_settings.py)"
        ) from error
    return settings


def unbounded_sqlite_pool(url: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Airflow's engine arguments for a SQLite *file* database with no limit on the pool's
    overflow (``max_overflow=-1``); other databases' arguments are returned as they are.

    Airflow gives every engine a bounded pool (5 + 10 by default), which protects a database
    server from too many connections; a SQLite connection is a file handle. Bounded, the pool
    runs dry once requests wait for SQLite's write lock while holding their connections (each
    POST /backfills holds two), and Airflow's async route dependencies (``requires_access_*``)
    then check a connection out *on the event loop*: the loop blocks for the pool's timeout,
    and the requests holding the connections cannot finish without it (measured: at 32
    clients the API server stopped answering for minutes). Unbounded, those dependencies never
    wait on the loop; requests wait for the write lock in worker threads, as they should."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return kwargs
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or ":memory:" in database:
        return kwargs
    engine_args = dict(kwargs.get("engine_args") or {})
    if "poolclass" in engine_args:  # NullPool, or a pool the operator chose
        return kwargs
    engine_args["max_overflow"] = -1
    return {**kwargs, "engine_args": engine_args}


def _config() -> tuple[bool, float, str]:
    """``[locksafe]`` in Airflow's configuration: ``enabled`` (True), ``sqlite_busy_timeout``
    (seconds, 30), ``sqlite_begin`` ("first_write")."""
    try:
        from airflow.configuration import conf
    except Exception:  # pragma: no cover - only without Airflow
        return True, 30.0, "first_write"
    enabled = conf.getboolean("locksafe", "enabled", fallback=True)
    busy_timeout = conf.getfloat("locksafe", "sqlite_busy_timeout", fallback=30.0)
    begin = conf.get("locksafe", "sqlite_begin", fallback="first_write")
    return bool(enabled), float(busy_timeout), str(begin)


def install() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Switch an Airflow deployment over to locksafe, from ``airflow_local_settings.py``
    (which every Airflow component imports at start-up, before it creates its engines)::

        import locksafe.compat.airflow as locksafe_airflow

        create_metadata_engine, create_async_metadata_engine = locksafe_airflow.install()

    - Airflow's SQLite engines, sync and async, go through :func:`locksafe.sqlite.configure`
      (``begin="first_write"``, a 30 s busy timeout); PostgreSQL and MySQL engines are left
      exactly as Airflow makes them.
    - Every Airflow module uses locksafe's :func:`with_row_locks` and
      :func:`is_lock_not_available_error`, names bound by ``from ... import`` included, now and
      in modules imported later (forked children inherit it; spawned ones import the local
      settings again).
    - Airflow's ``create_global_lock`` (``airflow.utils.db``) is locksafe's
      :func:`create_global_lock`: ``lock_timeout`` in seconds on every database, checked,
      namespaced, and a real lock on SQLite, so two ``airflow db migrate`` take turns.
    - Airflow's configuration switches it: ``[locksafe] enabled = False``
      (``AIRFLOW__LOCKSAFE__ENABLED=False``) leaves Airflow as it is;
      ``[locksafe] sqlite_busy_timeout`` and ``sqlite_begin`` set configure()'s options.

    Idempotent; logs once per process what it did. Returns the two engine factories that
    ``airflow_local_settings.py`` must bind as ``create_metadata_engine`` and
    ``create_async_metadata_engine`` (Airflow's documented override points).

    Outside Airflow it changes nothing and says so:

    >>> install()
    Traceback (most recent call last):
    ...
    RuntimeError: locksafe.compat.airflow.install() runs inside Airflow (airflow_local_settings.py)
    """
    global _logged
    settings = _airflow_settings()
    original_sync = getattr(
        settings.create_metadata_engine, _ORIGINAL, settings.create_metadata_engine
    )
    original_async = getattr(
        settings.create_async_metadata_engine, _ORIGINAL, settings.create_async_metadata_engine
    )
    enabled, busy_timeout, begin = _config()
    if not enabled:
        with _install_lock:
            if not _logged:
                log.info("locksafe: disabled by [locksafe] enabled = False; Airflow left as it is")
                _logged = True
        return original_sync, original_async

    from locksafe.sqlite import configure

    def _configured(engine: Any) -> Any:
        sync_engine = getattr(engine, "sync_engine", engine)
        if sync_engine.dialect.name == "sqlite":
            configure(engine, busy_timeout=busy_timeout, begin=begin)  # type: ignore[arg-type]
        return engine

    def create_metadata_engine(sql_alchemy_conn: str, **kwargs: Any) -> Any:
        return _configured(
            original_sync(sql_alchemy_conn, **unbounded_sqlite_pool(sql_alchemy_conn, kwargs))
        )

    def create_async_metadata_engine(sql_alchemy_conn_async: str, **kwargs: Any) -> Any:
        return _configured(original_async(sql_alchemy_conn_async, **kwargs))

    setattr(create_metadata_engine, _ORIGINAL, original_sync)
    setattr(create_async_metadata_engine, _ORIGINAL, original_async)
    for factory, original in (
        (create_metadata_engine, original_sync),
        (create_async_metadata_engine, original_async),
    ):
        factory.__doc__ = original.__doc__
    with _install_lock:
        replaced = 0
        waiting = False
        for name, patch in _ON_IMPORT.items():
            module = sys.modules.get(name)
            if module is not None:
                outcome = patch(module)
                # replace_helpers() counts names; the other patches say whether they patched
                replaced += outcome if type(outcome) is int else 0
            else:
                waiting = True
        if waiting and not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
            finder = _PatchOnImport()
            finder.pending = {name for name in _ON_IMPORT if name not in sys.modules}
            sys.meta_path.insert(0, finder)
        if not _logged:
            log.info(
                "locksafe: Airflow's SQLite engines use locksafe.sqlite.configure(begin=%r, "
                "busy_timeout=%gs); with_row_locks / is_lock_not_available_error are "
                "locksafe's (%d names rebound now, the rest at import); the audit log is "
                "written off the event loop; backfills are created one at a time; PostgreSQL "
                "and MySQL engines unchanged; create_global_lock waits seconds on every "
                "database and excludes on SQLite",
                begin,
                busy_timeout,
                replaced,
            )
            _logged = True
    return create_metadata_engine, create_async_metadata_engine
