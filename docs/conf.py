"""Sphinx configuration: ``sphinx-build -W --keep-going -b html docs <out>``
(``tests/test_docs_site.py`` runs exactly that).

The pages are Markdown (MyST). The API reference (``api.md``) is autodoc over the docstrings,
which are reStructuredText, so their ``:func:`` / ``:class:`` roles become links. Every such
reference must resolve (``nitpicky``): a role naming something the reference does not document
is a warning, so an error under ``-W``, instead of silently rendering as plain text.

The generated page (``matrix.md``: the dialect × feature matrix and the lock-error codes) is
compared with what the code renders now: a stale page is a warning too
(``python docs/generate.py`` rewrites it).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
SRC = DOCS.parent / "src"
sys.path.insert(0, str(SRC))  # this checkout's locksafe, whether installed or not

import locksafe  # noqa: E402

project = "locksafe"
author = "locksafe developers"
copyright = "locksafe developers"
release = locksafe.__version__
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 4

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}

html_theme = "furo"
html_title = f"locksafe {release}"

# Every cross reference must resolve, except to what this site cannot link to (there is no
# network at build time, so no intersphinx inventories): names of other packages and of the
# standard library in signatures (type hints, base classes), and type variables.
nitpicky = True
_EXTERNAL = (
    "sqlalchemy",
    "starlette",
    "tenacity",
    "typing",
    "typing_extensions",
    "collections",
    "concurrent",
    "enum",
    "asyncio",
    "contextlib",
    "types",
)
# Type hints that stay strings (imported under TYPE_CHECKING) keep their bare SQLAlchemy names.
_BARE_SQLALCHEMY = ("URL", "Engine", "AsyncEngine", "Connection", "Session", "AsyncSession")
_BARE_SQLALCHEMY += ("AsyncConnection", "Table", "Executable", "Dialect", "Select")
_BARE_SQLALCHEMY += ("scoped_session", "async_scoped_session")
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..+)?"),
    (r"py:class", rf"({'|'.join(_BARE_SQLALCHEMY)})"),
    (r"py:class", r"(locksafe(\.\w+)*\.)?[A-Z]"),  # a type variable: T, P, Q, E ...
    (r"py:class", r"locksafe(\.\w+)*\._\w+"),  # a private base class or helper type
]


def _home(module: str, name: str) -> tuple[str, str]:
    """The module (and name there) whose source assigns ``module.name``: a name imported by
    ``from x import name [as alias]`` is followed to ``x``."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    assert spec.origin is not None, module
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _home(node.module, alias.name)
    return module, name


def _data_docstring(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """A module-level value's docstring is its ``#:`` comment where it is assigned, also when
    the reference documents it where it is re-exported (``locksafe.NEW_SESSION``): never the
    docstring of its type (``None``'s, ``str``'s, tenacity's ``retry_if_exception``)."""
    if what != "data" or not name.startswith("locksafe."):
        return
    from sphinx.pycode import ModuleAnalyzer

    module, _, attr = name.rpartition(".")
    home, home_name = _home(module, attr)
    comment = ModuleAnalyzer.for_module(home).find_attr_docs().get(("", home_name))
    lines[:] = list(comment or [])


def _check_generated_pages(app: Any) -> None:
    from sphinx.util import logging

    from locksafe.matrix import render_markdown

    page = DOCS / "matrix.md"
    if page.read_text(encoding="utf-8") != render_markdown():
        logging.getLogger(__name__).warning(
            "docs/matrix.md is stale (the code's tables changed): run python docs/generate.py",
            location="matrix",
        )


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _data_docstring)
    app.connect("builder-inited", _check_generated_pages)
    return {"parallel_read_safe": True}
