"""The options of a row-lock request, and their checks: vocabulary shared by the dialects and
the planner. Imports nothing of locksafe."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

__all__ = ["LockOptions", "OnUnsupported", "check_number", "check_seconds"]

#: What :func:`~locksafe.with_row_locks` does with an option the server cannot honour.
OnUnsupported = Literal["raise", "warn", "degrade"]
ON_UNSUPPORTED: Final = ("raise", "warn", "degrade")


@dataclass(frozen=True)
class LockOptions:
    """The lock a statement asks for, in ``with_for_update()`` terms.

    A :class:`~locksafe.RowLockPlan` holds two: what was ``requested``, and what is
    ``effective`` on this server after degradations.

    >>> from sqlalchemy.dialects import mysql
    >>> from locksafe import plan_row_locks
    >>> dialect = mysql.dialect()
    >>> dialect.server_version_info = (5, 7, 44)  # MySQL 5.7 has no SKIP LOCKED
    >>> plan = plan_row_locks(dialect, read=True, skip_locked=True, on_unsupported="degrade")
    >>> plan.requested.names, plan.effective.names
    (('read', 'skip_locked'), ('read',))
    >>> LockOptions(nowait="yes")
    Traceback (most recent call last):
    ...
    TypeError: nowait='yes' must be a bool (True or False), not str
    """

    read: bool = False
    key_share: bool = False
    nowait: bool = False
    skip_locked: bool = False
    of: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        for name in BOOL_OPTIONS:
            check_bool(name, getattr(self, name))
        if self.of is not None:
            if not isinstance(self.of, tuple):
                raise TypeError(
                    f"LockOptions(of={self.of!r}) must be None or a tuple of tables, entities "
                    "or columns"
                )
            for element in self.of:
                check_of_element(element)

    @property
    def names(self) -> tuple[str, ...]:
        """The options that are set, by name."""
        return tuple(
            name
            for name in ("read", "key_share", "nowait", "skip_locked", "of")
            if getattr(self, name)
        )

    def for_update_kwargs(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "key_share": self.key_share,
            "nowait": self.nowait,
            "skip_locked": self.skip_locked,
            "of": list(self.of) if self.of else None,
        }



BOOL_OPTIONS: Final = ("read", "key_share", "nowait", "skip_locked")


def check_bool(name: str, value: object) -> None:
    """A lock option is a bool: ``nowait="false"`` would otherwise render ``NOWAIT``."""
    if not isinstance(value, bool):
        raise TypeError(
            f"{name}={value!r} must be a bool (True or False), not {type(value).__name__}"
        )


def check_of_element(element: object) -> None:
    """``of=`` names tables, aliases, ORM entities or columns; anything else (a number, a
    string, ``None`` in a list...) is a ``TypeError`` saying so, not a FROM mismatch."""
    from sqlalchemy import inspect
    from sqlalchemy.sql.elements import ClauseElement

    if isinstance(element, ClauseElement) or hasattr(element, "__clause_element__"):
        return
    if (
        not isinstance(element, (str, bytes, int, float, bool))
        and element is not None
        and inspect(element, raiseerr=False) is not None  # a mapped class, an aliased entity
    ):
        return
    raise TypeError(
        f"of={element!r} ({type(element).__name__}) is not something to lock: of= accepts a "
        "Table, an alias, an ORM entity (mapped class or aliased()), a column or mapped "
        "attribute, or a list / tuple of them"
    )


def check_number(name: str, value: object) -> float:
    """A real number (not a bool), as a float; ``TypeError`` naming the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a number of seconds (int or float)")
    try:
        return float(value)
    except OverflowError:  # an int past float's range: more seconds than any bound
        return -math.inf if cast(float, value) < 0 else math.inf


def check_seconds(name: str, value: object) -> float:
    """A finite number of seconds ≥ 0 (waits, ``retry_after``).

    >>> check_seconds("retry_after", 2)
    2.0
    """
    seconds = check_number(name, value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name}={value!r} must be a finite number of seconds ≥ 0")
    return seconds
