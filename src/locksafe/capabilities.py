"""What a database can lock: :class:`LockCapabilities` (vocabulary: imports nothing of locksafe
but its exceptions). :func:`locksafe.lock_capabilities` finds them for a bind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from locksafe.kinds import UnsupportedLockOption

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

__all__ = ["LockCapabilities", "Mechanism", "unsupported", "version_of"]

#: How row locks are taken on a database:
#: ``"row"``: a ``FOR UPDATE``-style clause on the SELECT locks the rows it returns;
#: ``"database"``: the whole database is write-locked for the rest of the transaction (SQLite);
#: ``"none"``: locksafe knows no way to lock rows there, so every request raises.
Mechanism = Literal["row", "database", "none"]


@dataclass(frozen=True)
class LockCapabilities:
    """The row-lock features of one server, resolved from dialect, flavour and version.

    >>> from sqlalchemy.dialects import postgresql
    >>> from locksafe import lock_capabilities
    >>> lock_capabilities(postgresql.dialect()).skip_locked
    True
    """

    #: SQLAlchemy dialect name (``"postgresql"``, ``"mysql"``, ``"sqlite"``...).
    dialect: str
    #: The server product: ``"postgresql"``, ``"mysql"``, ``"mariadb"``, ``"sqlite"``...
    flavour: str
    #: The server version, when known (``None`` before the first connection).
    server_version: tuple[int, ...] | None
    # Every capability defaults to the conservative value (no locking, no option): a dialect
    # module states only what its server can do.
    mechanism: Mechanism = "none"
    #: Exclusive row locks (``FOR UPDATE``).
    for_update: bool = False
    #: Shared row locks (``FOR SHARE`` / ``LOCK IN SHARE MODE``).
    for_share: bool = False
    #: PostgreSQL's weaker ``FOR NO KEY UPDATE`` / ``FOR KEY SHARE``.
    key_share: bool = False
    #: Fail at once instead of waiting (``NOWAIT``).
    nowait: bool = False
    #: Skip rows locked by others (``SKIP LOCKED``).
    skip_locked: bool = False
    #: Lock only the named tables of a join (``FOR UPDATE OF t``).
    of: bool = False
    #: One line on how locking works there, for logs, docs and ``locksafe doctor``.
    summary: str = ""
    #: The server's name for people (``"MariaDB"``, ``"SQL Server"``); ``flavour`` if unset.
    product: str = ""

    @property
    def title(self) -> str:
        """The server's name for people, e.g. in messages."""
        return self.product or self.flavour

    @property
    def version_string(self) -> str:
        """The server version as text (``"unknown"`` before the first connection)."""
        if self.server_version is None:
            return "unknown"
        return ".".join(str(part) for part in self.server_version)

    def supports(self, option: str) -> bool:
        """Whether the named option is supported: a :func:`~locksafe.with_row_locks` keyword
        (``"read"``, ``"key_share"``, ``"nowait"``, ``"skip_locked"``, ``"of"``) or a field
        name (``"for_update"``, ``"for_share"``)."""
        value = getattr(self, _FIELD_OF_OPTION.get(option, option), None)
        return value is True


#: with_row_locks() keywords whose capability field has another name.
_FIELD_OF_OPTION = {"read": "for_share"}


def version_of(dialect: Dialect) -> tuple[int, ...] | None:
    """The numeric part of ``dialect.server_version_info``, or ``None`` before connecting."""
    info = getattr(dialect, "server_version_info", None)
    if not info:
        return None
    numbers: list[int] = []
    for part in info:
        if not isinstance(part, int):
            break
        numbers.append(part)
    return tuple(numbers) or None


def unsupported(caps: LockCapabilities, *options: str, reason: str = "") -> UnsupportedLockOption:
    """An :class:`UnsupportedLockOption` for these capabilities."""
    return UnsupportedLockOption(
        options, dialect=caps.flavour, server_version=caps.server_version, reason=reason
    )
