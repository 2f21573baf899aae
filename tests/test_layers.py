"""The shape of the package (issue 10): imports only go down the layers, every module imports
on its own in any order, and only ``locksafe/_sa.py`` names SQLAlchemy's private attributes.

Layers, bottom to top:

0. vocabulary: ``kinds``, ``capabilities``, ``options``, ``_sa``, ``_cache``, ``_steps``
   (nothing of locksafe above them);
1. dialects: ``locksafe.dialects`` and everything in it (one module or package per database);
2. engines: ``classify``, ``binds``, ``rowlocks``, ``timeouts``, ``named_locks``,
   ``transactions``, ``matrix``;
3. integrations: ``starlette``, ``testing``, ``compat.*``, ``alembic``, ``doctor``, the public
   façades (``locksafe``, ``locksafe.sqlite``) and ``__main__``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy

SRC = Path(__file__).resolve().parent.parent / "src" / "locksafe"

VOCABULARY = {"locksafe.kinds", "locksafe.capabilities", "locksafe.options", "locksafe._sa"}
VOCABULARY_PREFIXES = ("locksafe._cache", "locksafe._steps")
ENGINES = {
    "locksafe.classify",
    "locksafe.binds",
    "locksafe.rowlocks",
    "locksafe.timeouts",
    "locksafe.named_locks",
    "locksafe.transactions",
    "locksafe.matrix",
}


def layer_of(module: str) -> int:
    if module in VOCABULARY or module.startswith(VOCABULARY_PREFIXES):
        return 0
    if module == "locksafe.dialects" or module.startswith("locksafe.dialects."):
        return 1
    if module in ENGINES:
        return 2
    return 3


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = sorted(
    (module_name(path), path) for path in SRC.rglob("*.py") if "__pycache__" not in path.parts
)


def imported_modules(name: str, path: Path) -> set[str]:
    """Every locksafe module ``path`` imports, at module level, in functions and under
    ``TYPE_CHECKING`` alike."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # ``from locksafe import kinds`` imports a module, not a name
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if any(candidate == other for other, _ in MODULES):
                    found.add(candidate)
    return {module for module in found if module == "locksafe" or module.startswith("locksafe.")}


def test_every_module_has_a_layer() -> None:
    names = {name for name, _ in MODULES}
    assert {"locksafe._sa", "locksafe.dialects.base", "locksafe.binds"} <= names
    assert all(layer_of(name) in (0, 1, 2, 3) for name in names)


@pytest.mark.parametrize(("name", "path"), MODULES, ids=[name for name, _ in MODULES])
def test_imports_only_go_down(name: str, path: Path) -> None:
    own = layer_of(name)
    upward = sorted(
        f"{target} (layer {layer_of(target)})"
        for target in imported_modules(name, path)
        if layer_of(target) > own
    )
    assert not upward, f"{name} (layer {own}) imports from a layer above it: {upward}"


def test_the_vocabulary_imports_only_the_vocabulary() -> None:
    for name, path in MODULES:
        if layer_of(name) == 0:
            outside = {t for t in imported_modules(name, path) if layer_of(t) != 0}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an upward import in a vocabulary module is found."""
    fake = SRC / "kinds.py"
    source = fake.read_text(encoding="utf-8") + "\n\ndef _f():\n    from .rowlocks import x\n"
    copy = tmp_path / "kinds.py"
    copy.write_text(source, encoding="utf-8")
    # imported_modules() resolves relative imports from the module name, not the path
    assert "locksafe.rowlocks" in imported_modules("locksafe.kinds", copy)


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """Each module imported first (no import circle needs another module loaded before it),
    then all the others, in one interpreter with locksafe's modules dropped in between."""
    names = [name for name, _ in MODULES if name != "locksafe.__main__"]
    script = (
        "import importlib, sys\n"
        f"names = {names!r}\n"
        "for first in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'locksafe' or "
        "m.startswith('locksafe.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(first)\n"
        "    for other in reversed(names):\n"
        "        importlib.import_module(other)\n"
        "print(len(names))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) == len(names)


# -- SQLAlchemy's private names: only in locksafe/_sa.py ------------------------------------------


def sqlalchemy_private_names() -> set[str]:
    """Every ``_name`` SQLAlchemy's own source defines as an attribute, method or function."""
    root = Path(sqlalchemy.__file__).parent
    pattern = re.compile(
        r"(?:\bdef\s+|\bself\.|\bcls\.|^\s+|^)(_[A-Za-z][A-Za-z0-9_]*)\s*(?:=|\(|:)",
        re.MULTILINE,
    )
    names: set[str] = set()
    for path in root.rglob("*.py"):
        names.update(pattern.findall(path.read_text(encoding="utf-8", errors="replace")))
    names.add("_Session__binds")
    return {name for name in names if not name.startswith("__")}


def private_accesses(path: Path) -> dict[str, int]:
    """The ``_private`` attribute names ``path`` reads or writes on objects other than
    ``self`` / ``cls`` / its own modules, including through ``getattr``-style string names:
    name -> first line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own_modules = {
        alias.asname or alias.name.rpartition(".")[2]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("locksafe")
        for alias in node.names
    } | {"locksafe"}
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__") and node.attr.endswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in {"self", "cls", *own_modules}:
                continue
            found.setdefault(node.attr, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "hasattr", "setattr", "delattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and node.args[1].value.startswith("_")
            and not node.args[1].value.startswith("__")
        ):
            found.setdefault(node.args[1].value, node.lineno)
    return found


#: Private names locksafe reads that belong to other libraries, not SQLAlchemy, with why.
NOT_SQLALCHEMY = {
    # Airflow's private function that locksafe.compat.airflow wraps (an Airflow name that
    # SQLAlchemy happens not to define; listed so that a collision would still be seen).
    "_create_backfill",
}


def test_only_the_private_access_module_names_sqlalchemy_private_attributes() -> None:
    private = sqlalchemy_private_names()
    assert {"_for_update_arg", "_is_autocommit_isolation", "_connections"} <= private
    hits = []
    for name, path in MODULES:
        if name == "locksafe._sa":
            continue
        for attr, line in private_accesses(path).items():
            if attr in private and attr not in NOT_SQLALCHEMY:
                hits.append(f"{path.relative_to(SRC.parent)}:{line}: {attr}")
    assert not hits, "SQLAlchemy private names outside locksafe/_sa.py:\n" + "\n".join(hits)


def test_the_private_name_scan_sees_each_form(tmp_path: Path) -> None:
    """The scanner itself: attribute access and getattr-style strings are both found."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(stmt, conn):\n"
        "    a = stmt._for_update_arg\n"
        "    b = getattr(conn, '_is_autocommit_isolation', None)\n"
        "    return self._mine, a, b\n",
        encoding="utf-8",
    )
    assert set(private_accesses(sample)) == {"_for_update_arg", "_is_autocommit_isolation"}
