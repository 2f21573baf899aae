"""The documentation site builds cleanly, its API reference covers every public name, and every
public name has a runnable example that the test suite executes.

The site is built the way CI builds it: ``sphinx-build -W --keep-going -b html docs <out>``, in a
subprocess. ``docs/conf.py`` makes every cross reference of the docstrings resolve
(``nitpicky``) and warns when the generated matrix page is stale, so any of these fails the
build. Without the ``docs`` extra the build tests are skipped, except under ``CI=true``, where
a missing extra is a failure (``tests/conftest.py``'s rule).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from harness.cells import unavailable
from locksafe.matrix import render_markdown

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: The modules whose ``__all__`` is the public API (the reference documents each of them).
PUBLIC_MODULES = (
    "locksafe",
    "locksafe.sqlite",
    "locksafe.starlette",
    "locksafe.testing",
    "locksafe.alembic",
    "locksafe.doctor",
    "locksafe.compat.airflow",
)
#: The packages of the ``docs`` extra, by import name.
DOCS_EXTRA = ("sphinx", "myst_parser", "furo")
#: The roles a docstring uses; none may reach a rendered page as text.
ROLES = re.compile(r":(func|class|meth|attr|data|mod|exc|obj):`")


@dataclass(frozen=True)
class Build:
    returncode: int
    output: str
    warnings: str
    seconds: float
    html: Path


def _sphinx_build(source: Path, out: Path) -> Build:
    """``sphinx-build -W --keep-going -b html source out``, from scratch; warnings also go to a
    file of their own."""
    warnings_file = out.parent / f"{out.name}-warnings.txt"
    # This checkout's locksafe for autodoc, also for a copy of conf.py elsewhere.
    paths = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-E",
            "-b",
            "html",
            "-d",
            str(out.parent / f"{out.name}-doctrees"),
            "-w",
            str(warnings_file),
            str(source),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    seconds = time.monotonic() - started
    warnings = warnings_file.read_text(encoding="utf-8") if warnings_file.exists() else ""
    return Build(result.returncode, result.stdout + result.stderr, warnings, seconds, out)


@pytest.fixture(scope="module")
def docs_extra() -> None:
    missing = [name for name in DOCS_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        unavailable(
            f"the docs extra is not installed (no {', '.join(missing)}): pip install -e '.[docs]'"
        )


@pytest.fixture(scope="module")
def site(docs_extra: None, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The whole site, built once for the tests of this module."""
    return _sphinx_build(DOCS, tmp_path_factory.mktemp("docs") / "html")


def test_the_site_builds_without_a_warning(site: Build) -> None:
    problems = f"sphinx-build -W failed with these warnings:\n{site.warnings or site.output}"
    if site.warnings.strip() or site.returncode != 0:
        pytest.fail(problems, pytrace=False)
    assert (site.html / "index.html").is_file()
    # Not a bound on the build (the machine is shared): the figure, for whoever reads -rA.
    print(f"docs built in {site.seconds:.1f} s")


def test_every_page_is_rendered(site: Build) -> None:
    pages = {page.stem for page in DOCS.glob("*.md")}
    rendered = {page.stem for page in site.html.glob("*.html")}
    assert pages <= rendered, f"pages not rendered: {sorted(pages - rendered)}"
    assert "api" in pages


def test_docstring_roles_render_as_links(site: Build) -> None:
    """``:func:`~locksafe.classify``` in ``with_row_locks``'s docstring is a link to
    ``classify``'s entry, and no page shows a role as raw text."""
    api = (site.html / "api.html").read_text(encoding="utf-8")
    start = api.index('id="locksafe.with_row_locks"')
    entry = api[start : api.index("</dd>", start)]
    link = re.search(
        r'<a class="reference internal" href="#locksafe\.classify"[^>]*>'
        r'<code class="xref py py-func[^"]*"><span class="pre">classify\(\)</span>',
        entry,
    )
    assert link, f"no link to classify() in with_row_locks' entry:\n{entry[:3000]}"
    for page in site.html.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        raw = ROLES.search(re.sub(r"<[^>]+>", "", text))
        assert raw is None, f"{page.name} shows a raw role: {raw.group(0) if raw else ''}"


def test_the_api_reference_documents_every_public_name(site: Build) -> None:
    api = (site.html / "api.html").read_text(encoding="utf-8")
    missing = [
        f"{module}.{name}"
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
        if f'id="{module}.{name}"' not in api
    ]
    assert not missing, f"not in docs/api.md's reference: {missing}"


def test_a_stale_generated_page_fails_the_build(docs_extra: None, tmp_path: Path) -> None:
    """The build compares docs/matrix.md with what the code renders now: the docs cannot drift
    from the dialect modules' tables."""
    source = tmp_path / "docs"
    source.mkdir()
    shutil.copy(DOCS / "conf.py", source / "conf.py")
    (source / "index.md").write_text("# Index\n\n```{toctree}\nmatrix\n```\n", encoding="utf-8")
    stale = render_markdown().replace("| `1213` | `deadlock` |", "| `1213` | `lock_timeout` |")
    assert stale != render_markdown()
    (source / "matrix.md").write_text(stale, encoding="utf-8")
    build = _sphinx_build(source, tmp_path / "html")
    assert build.returncode != 0
    assert "docs/matrix.md is stale" in build.warnings, build.output


# -- every public name has a runnable example ------------------------------------------------


def _home(module: str, name: str) -> tuple[str, str]:
    """The module whose source assigns ``module.name`` (``from x import name`` followed)."""
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


def _doctests(module: ModuleType) -> list[doctest.DocTest]:
    """The examples ``pytest --doctest-modules`` runs from this module (the same finder)."""
    return [test for test in doctest.DocTestFinder().find(module) if test.examples]


def _has_example(module_name: str, name: str) -> bool:
    module = importlib.import_module(module_name)
    obj = getattr(module, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        home = importlib.import_module(obj.__module__)
        return f"{obj.__module__}.{obj.__qualname__}" in {test.name for test in _doctests(home)}
    # A value (a constant, a sentinel, a type alias) has no docstring of its own: an example
    # that uses it, in its module or where it is defined.
    home_name, attr = _home(module_name, name)
    used = re.compile(rf"\b{re.escape(attr)}\b|\b{re.escape(name)}\b")
    return any(
        used.search(example.source)
        for where in {module_name, home_name}
        for test in _doctests(importlib.import_module(where))
        for example in test.examples
    )


def test_the_test_suite_runs_the_examples() -> None:
    """pytest collects the docstrings' examples of the whole package (tomllib is Python 3.11+:
    the two settings are read as text)."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    testpaths = re.search(r"^testpaths = \[(.*)\]$", pyproject, flags=re.M)
    addopts = re.search(r'^addopts = "(.*)"$', pyproject, flags=re.M)
    assert testpaths, "no testpaths in pyproject.toml"
    assert '"src/locksafe"' in testpaths.group(1)
    assert addopts, "no addopts in pyproject.toml"
    assert "--doctest-modules" in addopts.group(1).split()


def test_every_public_name_has_a_runnable_example() -> None:
    """Every name of the public modules' ``__all__`` has a ``>>>`` example in its own docstring
    (a value: an example that uses it, in its module), which ``pytest --doctest-modules``
    (``pyproject.toml``) runs."""
    missing = [
        f"{module}.{name}"
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
        if not _has_example(module, name)
    ]
    assert not missing, f"public names without a runnable example: {missing}"
