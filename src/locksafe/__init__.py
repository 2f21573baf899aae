"""locksafe: row locks and lock failures that behave the same, and safely, on SQLite,
PostgreSQL and MySQL/MariaDB, for any SQLAlchemy application.

Everything public is importable from here; the modules say where it lives.

>>> import locksafe
>>> locksafe.classify(ValueError("not a database error")) is None
True
>>> locksafe.__version__.count(".")  # major.minor.patch
2
"""

from locksafe.binds import lock_capabilities
from locksafe.capabilities import LockCapabilities
from locksafe.classify import (
    classify,
    classify_raised,
    is_deadlock_error,
    is_lock_not_available_error,
    is_retryable_lock_error,
)
from locksafe.kinds import (
    CallerTransactionError,
    LockDegradedWarning,
    LockErrorKind,
    LocksafeError,
    LockUnavailable,
    NamedLockError,
    SelfDeadlock,
    TransactionAborted,
    TransactionLost,
    UnsupportedLockOption,
)
from locksafe.named_locks import (
    NamedLock,
    TryNamedLock,
    named_lock,
    try_named_lock,
)
from locksafe.options import LockOptions
from locksafe.rowlocks import RowLockPlan, plan_row_locks, with_row_locks
from locksafe.timeouts import LockTimeout, lock_timeout
from locksafe.transactions import (
    NEW_SESSION,
    RetryDetails,
    retry_if_lock_error,
    set_testing,
    transactional,
)

__version__ = "0.1.0"

__all__ = [
    "NEW_SESSION",
    "CallerTransactionError",
    "LockCapabilities",
    "LockDegradedWarning",
    "LockErrorKind",
    "LockOptions",
    "LockTimeout",
    "LockUnavailable",
    "LocksafeError",
    "NamedLock",
    "NamedLockError",
    "RetryDetails",
    "RowLockPlan",
    "SelfDeadlock",
    "TransactionAborted",
    "TransactionLost",
    "TryNamedLock",
    "UnsupportedLockOption",
    "__version__",
    "classify",
    "classify_raised",
    "is_deadlock_error",
    "is_lock_not_available_error",
    "is_retryable_lock_error",
    "lock_capabilities",
    "lock_timeout",
    "named_lock",
    "plan_row_locks",
    "retry_if_lock_error",
    "set_testing",
    "transactional",
    "try_named_lock",
    "with_row_locks",
]
