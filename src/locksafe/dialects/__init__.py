"""What locksafe knows about each database, one module per dialect.

Each module in this package describes one SQLAlchemy dialect (or a family: ``mysql`` serves MySQL
and MariaDB) as a :class:`DialectSupport` named ``SUPPORT``: the lock-error codes of every driver
it knows, its row-lock capabilities per server version, and any extra step its row locks need
(SQLite's database write lock). The engines (``classify``, ``binds``, ``rowlocks``,
``timeouts``, ``named_locks``) find a dialect here by name and ask it; they never branch on a
dialect's name themselves. What a dialect module provides is declared in
:mod:`locksafe.dialects.base`.

Adding a dialect is one module plus one line in :data:`MODULES`; adding a driver is one
:class:`DriverErrors` row in its dialect's module.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from locksafe.dialects.base import (
    Code,
    DialectSupport,
    DriverErrors,
    ErrorContext,
    ErrorTable,
    LockWaitSetting,
    NamedLockSupport,
)

__all__ = [
    "MODULES",
    "DialectSupport",
    "DriverErrors",
    "ErrorContext",
    "ErrorTable",
    "LockWaitSetting",
    "NamedLockSupport",
    "all_supports",
    "driver_code",
    "driver_for_module",
    "named_lock_support_for",
    "support_for",
]

#: SQLAlchemy dialect name -> the module (or package) here that describes it.
MODULES: Mapping[str, str] = {
    "postgresql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "sqlite": "sqlite",
    "oracle": "oracle",
    "mssql": "mssql",
}


_loaded: dict[str, DialectSupport] = {}
_by_module: dict[str, tuple[DialectSupport, DriverErrors] | None] = {}


def support_for(dialect_name: str) -> DialectSupport | None:
    """The :class:`DialectSupport` for a SQLAlchemy dialect name, or ``None`` if unknown."""
    support = _loaded.get(dialect_name)
    if support is None:
        module_name = MODULES.get(dialect_name)
        if module_name is None:
            return None
        module = importlib.import_module(f"{__name__}.{module_name}")
        support = module.SUPPORT
        assert isinstance(support, DialectSupport)
        for name in support.names:
            _loaded[name] = support
    return support


def all_supports() -> list[DialectSupport]:
    """Every known dialect, each once, in :data:`MODULES` order."""
    seen: list[DialectSupport] = []
    for name in MODULES:
        support = support_for(name)
        if support is not None and support not in seen:
            seen.append(support)
    return seen


def _driver_index() -> dict[str, tuple[DialectSupport, DriverErrors]]:
    index: dict[str, tuple[DialectSupport, DriverErrors]] = {}
    for support in all_supports():
        for driver in support.errors.drivers:
            for module in driver.modules:
                index[module] = (support, driver)
    return index


_index: dict[str, tuple[DialectSupport, DriverErrors]] | None = None


def driver_for_module(module: str) -> tuple[DialectSupport, DriverErrors] | None:
    """The dialect and driver whose exceptions live in ``module`` (longest prefix wins)."""
    global _index
    try:
        return _by_module[module]
    except KeyError:
        pass
    if _index is None:
        _index = _driver_index()
    found = None
    candidate = module
    while candidate:
        found = _index.get(candidate)
        if found is not None:
            break
        candidate = candidate.rpartition(".")[0]
    if len(_by_module) < 4096:
        _by_module[module] = found
    return found


def driver_code(exc: BaseException) -> tuple[DialectSupport, Code] | None:
    """The dialect and error code of one driver exception (not SQLAlchemy's wrapper: pass its
    ``.orig``), found by the module of its class or of a base class; ``None`` when it is not
    a known driver's exception or carries no code. Never raises."""
    try:
        for cls in type(exc).__mro__:
            module = getattr(cls, "__module__", None)
            if not isinstance(module, str):
                continue
            found = driver_for_module(module)
            if found is not None:
                code = found[1].read_code(exc)
                return (found[0], code) if code is not None else None
    except Exception:
        return None
    return None


_named: dict[str, NamedLockSupport | None] = {}


def named_lock_support_for(dialect_name: str) -> NamedLockSupport | None:
    """The named-lock support (a dialect module's ``NAMED_LOCKS``) of a SQLAlchemy dialect
    name, or ``None``."""
    try:
        return _named[dialect_name]
    except KeyError:
        pass
    module_name = MODULES.get(dialect_name)
    found = None
    if module_name is not None:
        module = importlib.import_module(f"{__name__}.{module_name}")
        found = getattr(module, "NAMED_LOCKS", None)
        assert found is None or isinstance(found, NamedLockSupport)
    _named[dialect_name] = found
    return found
