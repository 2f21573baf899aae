"""What a database can lock, and how locksafe asks for it: :class:`LockCapabilities`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from locksafe.kinds import UnsupportedLockOption

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

__all__ = [
    "LockCapabilities",
    "Mechanism",
    "dialect_of",
    "lock_capabilities",
    "offline_dialect",
]

#: How row locks are taken on a database:
#: ``"row"``: a ``FOR UPDATE``-style clause on the SELECT locks the rows it returns;
#: ``"database"``: the whole database is write-locked for the rest of the transaction (SQLite);
#: ``"none"``: locksafe knows no way to lock rows there, so every request raises.
Mechanism = Literal["row", "database", "none"]


@dataclass(frozen=True)
class LockCapabilities:
    """The row-lock features of one server, resolved from dialect, flavour and version.

    >>> from sqlalchemy.dialects import postgresql
    >>> lock_capabilities(postgresql.dialect()).skip_locked
    True
    """

    #: SQLAlchemy dialect name (``"postgresql"``, ``"mysql"``, ``"sqlite"``...).
    dialect: str
    #: The server product: ``"postgresql"``, ``"mysql"``, ``"mariadb"``, ``"sqlite"``...
    flavour: str
    #: The server version, when known (``None`` before the first connection).
    server_version: tuple[int, ...] | None
    mechanism: Mechanism
    #: Exclusive row locks (``FOR UPDATE``).
    for_update: bool
    #: Shared row locks (``FOR SHARE`` / ``LOCK IN SHARE MODE``).
    for_share: bool
    #: PostgreSQL's weaker ``FOR NO KEY UPDATE`` / ``FOR KEY SHARE``.
    key_share: bool
    #: Fail at once instead of waiting (``NOWAIT``).
    nowait: bool
    #: Skip rows locked by others (``SKIP LOCKED``).
    skip_locked: bool
    #: Lock only the named tables of a join (``FOR UPDATE OF t``).
    of: bool
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


def dialect_of(bind: Any, clause: Any = None) -> Dialect:
    """The SQLAlchemy :class:`~sqlalchemy.engine.Dialect` behind any bind-like object.

    Accepts a Dialect, Engine, Connection, Session, AsyncEngine, AsyncConnection or
    AsyncSession (or anything with ``get_bind()`` or ``dialect``). With ``clause`` (the
    statement about to run, or an ORM ``Query``) a Session is resolved as ``Session.execute()``
    resolves it: its per-entity and per-table ``binds`` before its default bind. Without one,
    its default bind, else its binds when they all lead to the same kind of server; otherwise
    :class:`~sqlalchemy.exc.UnboundExecutionError`.

    >>> from sqlalchemy import create_engine
    >>> from sqlalchemy.orm import Session
    >>> dialect_of(Session(create_engine("sqlite://"))).name
    'sqlite'
    """
    from sqlalchemy.engine import Dialect

    if isinstance(bind, Dialect):
        return bind
    for attribute in ("sync_session", "sync_engine"):
        inner = getattr(bind, attribute, None)
        if inner is not None:
            return dialect_of(inner, clause)
    get_bind = getattr(bind, "get_bind", None)
    if callable(get_bind):
        return dialect_of(_session_bind(bind, clause))
    dialect = getattr(bind, "dialect", None)
    if isinstance(dialect, Dialect):
        return dialect
    raise TypeError(
        f"cannot find a SQLAlchemy dialect on {type(bind).__name__!r}: pass a Session, "
        "AsyncSession, Connection, AsyncConnection, Engine, AsyncEngine or Dialect"
    )


def _session_bind(session: Any, clause: Any) -> Any:
    """The Engine or Connection a Session would use for ``clause``: resolved as
    ``Session.execute()`` does (``get_bind(mapper=<the statement's entity>, clause=...)``);
    without a clause, its default bind, else the one server all its binds lead to."""
    from sqlalchemy.exc import UnboundExecutionError
    from sqlalchemy.orm import Query

    if clause is not None:
        # As Session.execute() resolves it: the statement's ORM entity first (per-entity
        # binds win over the Session's default bind), then its tables, then the default.
        statement = clause.statement if isinstance(clause, Query) else clause
        mapper = None
        attrs = getattr(statement, "_propagate_attrs", None) or {}
        if attrs.get("compile_state_plugin") == "orm":
            mapper = getattr(attrs.get("plugin_subject"), "mapper", None)
        return session.get_bind(mapper=mapper, clause=statement)
    try:
        return session.get_bind()
    except UnboundExecutionError:
        if not _binds_of(session):
            raise
    binds = _binds_of(session)
    servers = {server_key(dialect_of(bind)): bind for bind in binds}
    if len(servers) == 1:
        return next(iter(servers.values()))
    names = sorted(
        f"{name} {'.'.join(map(str, version)) if version else '(version unknown)'}"
        for name, version, _ in servers
    )
    raise UnboundExecutionError(
        "this Session is bound per mapper or table to several kinds of server ("
        + ", ".join(names)
        + "): pass the Engine or Connection in question, or session.get_bind(<mapped class>)"
    )


def _binds_of(session: Any) -> list[Any]:
    """The engines and connections of a Session's per-mapper / per-table ``binds``."""
    from collections.abc import Mapping

    # Session.binds in SQLAlchemy 2.1; private (name-mangled) in 2.0.
    binds = getattr(session, "binds", None)
    if not isinstance(binds, Mapping):
        binds = getattr(session, "_Session__binds", None)
    if not isinstance(binds, Mapping):
        return []
    unique: dict[int, Any] = {}
    for bind in binds.values():
        unique.setdefault(id(bind), bind)
    return list(unique.values())


def server_key(dialect: Dialect) -> tuple[Any, ...]:
    """What lock capabilities and plans depend on: dialect, server version and flavour
    (MySQL vs MariaDB)."""
    return (dialect.name, version_of(dialect), getattr(dialect, "is_mariadb", False))


def lock_capabilities(bind: Any) -> LockCapabilities:
    """What the database behind ``bind`` can lock, and how.

    ``bind`` is a Session, AsyncSession, Connection, AsyncConnection, Engine, AsyncEngine or a
    Dialect. The server version is read from the dialect, which learns it on its first
    connection; before that, version-dependent features are reported for the oldest server
    locksafe supports.

    >>> from sqlalchemy import create_engine
    >>> caps = lock_capabilities(create_engine("sqlite://"))
    >>> caps.mechanism
    'database'
    """
    from locksafe.dialects import support_for

    dialect = dialect_of(bind)
    support = support_for(dialect.name)
    if support is None:
        version = getattr(dialect, "server_version_info", None)
        return LockCapabilities(
            dialect=dialect.name,
            flavour=dialect.name,
            server_version=tuple(version) if version else None,
            mechanism="none",
            for_update=False,
            for_share=False,
            key_share=False,
            nowait=False,
            skip_locked=False,
            of=False,
            summary=f"locksafe has no module for the {dialect.name!r} dialect",
        )
    return support.capabilities(dialect)


def offline_dialect(name: str, version: tuple[int, ...] | None = None) -> Dialect:
    """A dialect set up as if it had connected to a ``name`` server of ``version``, without a
    server: for docs, diagnostics and compile-level checks.

    >>> lock_capabilities(offline_dialect("mariadb", (10, 5, 0))).skip_locked
    False
    """
    from sqlalchemy.engine import make_url

    from locksafe.dialects import support_for

    support = support_for(name)
    if support is not None and support.offline_dialect is not None:
        return support.offline_dialect(name, version)
    dialect: Dialect = make_url(f"{name}://").get_dialect()()
    if version is not None:
        dialect.server_version_info = version
    return dialect


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
