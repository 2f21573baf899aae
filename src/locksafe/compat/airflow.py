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

``[scheduler] use_row_level_locking = False`` (for a single scheduler) still turns row locks
off: :func:`use_row_level_locking` reads it from Airflow's configuration when Airflow is
importable, else from ``AIRFLOW__SCHEDULER__USE_ROW_LEVEL_LOCKING``, unless
:func:`set_row_level_locking` set it.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from locksafe.classify import is_lock_not_available_error as _is_lock_not_available_error
from locksafe.rowlocks import with_row_locks as _with_row_locks

__all__ = [
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
    """Force row-level locking on or off (``None``: follow Airflow's configuration again)."""
    global _override
    _override = enabled


def use_row_level_locking() -> bool:
    """Airflow's ``[scheduler] use_row_level_locking`` (default True)."""
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
    lock wait timed out, SQLite busy or locked). Never raises."""
    return _is_lock_not_available_error(error)
