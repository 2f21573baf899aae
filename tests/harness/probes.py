"""Is a SQLite database's write lock taken? Asked from a fresh connection, without waiting."""

from __future__ import annotations

import os
import sqlite3

from locksafe import LockErrorKind, classify


def sqlite_write_locked(path: str | os.PathLike[str]) -> bool:
    """Whether another connection holds the write lock of the database file at ``path`` now:
    a fresh connection's ``BEGIN IMMEDIATE`` with no busy timeout fails (with an error the
    classifier calls ``database_busy``)."""
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    error: BaseException | None = None
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        error = exc
    finally:
        probe.close()
    if error is None:
        return False
    assert classify(error) is LockErrorKind.DATABASE_BUSY, error
    return True
