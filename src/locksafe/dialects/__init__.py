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
from types import ModuleType

from locksafe._cache import Memo
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


_loaded: Memo[str, DialectSupport | None] = Memo("dialects.support", maxsize=None)
_by_module: Memo[str, tuple[DialectSupport, DriverErrors] | None] = Memo(
    "dialects.driver_of_module", maxsize=4096
)
_index: Memo[None, dict[str, tuple[DialectSupport, DriverErrors]]] = Memo(
    "dialects.driver_index", maxsize=None
)
_named: Memo[str, NamedLockSupport | None] = Memo("dialects.named_locks", maxsize=None)


def _module(dialect_name: str) -> ModuleType | None:
    module_name = MODULES.get(dialect_name)
    if module_name is None:
        return None
    return importlib.import_module(f"{__name__}.{module_name}")


def _load_support(dialect_name: str) -> DialectSupport | None:
    module = _module(dialect_name)
    if module is None:
        return None
    support = module.SUPPORT
    assert isinstance(support, DialectSupport)
    return support


def support_for(dialect_name: str) -> DialectSupport | None:
    """The :class:`DialectSupport` for a SQLAlchemy dialect name, or ``None`` if unknown."""
    return _loaded.get_or_make(dialect_name, _load_support)


def all_supports() -> list[DialectSupport]:
    """Every known dialect, each once, in :data:`MODULES` order."""
    seen: list[DialectSupport] = []
    for name in MODULES:
        support = support_for(name)
        if support is not None and support not in seen:
            seen.append(support)
    return seen


def _driver_index(_: None = None) -> dict[str, tuple[DialectSupport, DriverErrors]]:
    index: dict[str, tuple[DialectSupport, DriverErrors]] = {}
    for support in all_supports():
        for driver in support.errors.drivers:
            for module in driver.modules:
                index[module] = (support, driver)
    return index


def driver_for_module(module: str) -> tuple[DialectSupport, DriverErrors] | None:
    """The dialect and driver whose exceptions live in ``module`` (longest prefix wins)."""
    return _by_module.get_or_make(module, _find_driver_for_module)


def _find_driver_for_module(module: str) -> tuple[DialectSupport, DriverErrors] | None:
    index = _index.get_or_make(None, _driver_index)
    candidate = module
    while candidate:
        found = index.get(candidate)
        if found is not None:
            return found
        candidate = candidate.rpartition(".")[0]
    return None


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


def named_lock_support_for(dialect_name: str) -> NamedLockSupport | None:
    """The named-lock support (a dialect module's ``NAMED_LOCKS``) of a SQLAlchemy dialect
    name, or ``None``."""
    return _named.get_or_make(dialect_name, _load_named_locks)


def _load_named_locks(dialect_name: str) -> NamedLockSupport | None:
    module = _module(dialect_name)
    found = getattr(module, "NAMED_LOCKS", None) if module is not None else None
    assert found is None or isinstance(found, NamedLockSupport)
    return found
