"""Oracle: row-lock capabilities (no lock-error table yet).

Oracle has ``FOR UPDATE [OF ...] [NOWAIT | SKIP LOCKED]`` but no shared row lock: SQLAlchemy
renders ``read=True`` as a plain ``FOR UPDATE`` without a word. locksafe reports ``read`` and
``key_share`` as unsupported, so they raise, or with ``on_unsupported="degrade"`` become the
exclusive lock knowingly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from locksafe.capabilities import LockCapabilities, version_of
from locksafe.dialects import DialectSupport

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect


def capabilities(dialect: Dialect) -> LockCapabilities:
    return LockCapabilities(
        dialect=dialect.name,
        flavour="oracle",
        server_version=version_of(dialect),
        mechanism="row",
        for_update=True,
        for_share=False,
        key_share=False,
        nowait=True,
        skip_locked=True,
        of=True,
        summary="row locks: FOR UPDATE [OF] [NOWAIT | SKIP LOCKED]; no shared row lock",
    )


SUPPORT = DialectSupport(
    names=("oracle",),
    title="Oracle",
    capabilities=capabilities,
    documented_versions=(("Oracle", "oracle", None),),
)
