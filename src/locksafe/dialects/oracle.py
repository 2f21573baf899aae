"""Oracle: row-lock capabilities (no lock-error table yet).

Oracle has ``FOR UPDATE [OF ...] [NOWAIT | SKIP LOCKED]`` but no shared row lock: SQLAlchemy
renders ``read=True`` as a plain ``FOR UPDATE`` without a word. locksafe reports ``read`` and
``key_share`` as unsupported, so they raise, or with ``on_unsupported="degrade"`` become the
exclusive lock knowingly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from locksafe.capabilities import LockCapabilities, version_of
from locksafe.dialects.base import DialectSupport

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect


def capabilities(dialect: Dialect) -> LockCapabilities:
    return LockCapabilities(
        product="Oracle",
        dialect=dialect.name,
        flavour="oracle",
        server_version=version_of(dialect),
        mechanism="row",
        for_update=True,
        nowait=True,
        skip_locked=True,
        of=True,
        summary="row locks: FOR UPDATE [OF] [NOWAIT | SKIP LOCKED]; no shared row lock",
    )


def _column_of(element: Any) -> Any:
    from sqlalchemy import inspect
    from sqlalchemy.sql.elements import ColumnElement
    from sqlalchemy.sql.selectable import FromClause

    clause = element.__clause_element__() if hasattr(element, "__clause_element__") else element
    if isinstance(clause, ColumnElement):
        return element
    selectable = clause if isinstance(clause, FromClause) else None
    if selectable is None:
        selectable = getattr(inspect(element, raiseerr=False), "selectable", None)
    if isinstance(selectable, FromClause):
        columns = list(selectable.primary_key) or list(selectable.c)
        if columns:
            return columns[0]
    return element


def lock_targets(elements: tuple[Any, ...]) -> tuple[Any, ...]:
    """Oracle's ``FOR UPDATE OF`` names columns (each locks the rows of its table);
    SQLAlchemy renders an empty ``OF`` for a table, so each table or ORM entity becomes one
    of its columns (the first primary-key column)."""
    return tuple(_column_of(element) for element in elements)


SUPPORT = DialectSupport(
    names=("oracle",),
    title="Oracle",
    capabilities=capabilities,
    lock_targets=lock_targets,
    documented_versions=(("Oracle", "oracle", None),),
)
