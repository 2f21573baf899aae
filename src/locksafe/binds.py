"""From a bind to its database: the :class:`~sqlalchemy.engine.Dialect` behind any Session,
Connection or Engine (sync or async), and what that server can lock
(:func:`lock_capabilities`).

Engine layer: it asks the dialect packages (:mod:`locksafe.dialects`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from locksafe._sa import orm_entity_mapper, session_binds
from locksafe.capabilities import LockCapabilities, version_of
from locksafe.dialects import support_for

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

__all__ = ["dialect_of", "lock_capabilities", "offline_dialect", "server_key"]


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
        return session.get_bind(mapper=orm_entity_mapper(statement), clause=statement)
    try:
        return session.get_bind()
    except UnboundExecutionError:
        if not session_binds(session):
            raise
    binds = session_binds(session)
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
    dialect = dialect_of(bind)
    support = support_for(dialect.name)
    if support is None:
        return LockCapabilities(
            dialect=dialect.name,
            flavour=dialect.name,
            server_version=version_of(dialect),
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

    support = support_for(name)
    if support is not None and support.offline_dialect is not None:
        return support.offline_dialect(name, version)
    dialect: Dialect = make_url(f"{name}://").get_dialect()()
    if version is not None:
        dialect.server_version_info = version
    return dialect
