"""SQL Server: no ``FOR UPDATE`` at all.

SQLAlchemy renders nothing for ``with_for_update()`` on SQL Server (locking there is done with
table hints such as ``WITH (UPDLOCK, ROWLOCK)``, which locksafe does not generate yet). A locking
query would silently run unlocked, so every :func:`~locksafe.with_row_locks` request raises
:class:`~locksafe.UnsupportedLockOption`, whatever ``on_unsupported`` says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from locksafe.capabilities import LockCapabilities, version_of
from locksafe.dialects.base import DialectSupport

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect


def capabilities(dialect: Dialect) -> LockCapabilities:
    return LockCapabilities(
        product="SQL Server",
        dialect=dialect.name,
        flavour="mssql",
        server_version=version_of(dialect),
        mechanism="none",
        summary=(
            "SQLAlchemy renders no FOR UPDATE on SQL Server (it needs table hints such as "
            "WITH (UPDLOCK, ROWLOCK)); locksafe raises rather than run the query unlocked"
        ),
    )


SUPPORT = DialectSupport(
    names=("mssql",),
    title="SQL Server",
    capabilities=capabilities,
    documented_versions=(("SQL Server", "mssql", None),),
)
