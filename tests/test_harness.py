"""Each driver cell talks to a real server: version, a real write and a real read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text
from sqlalchemy.engine import Connection

from harness.cells import Cell

metadata = MetaData()
notes = Table(
    "harness_notes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("body", String(50)),
)

VERSION_SQL = {
    "sqlite": "select sqlite_version()",
    "postgresql": "show server_version",
    "mariadb": "select version()",
}


def test_cell_talks_to_a_real_server(cell: Cell) -> None:
    cell.create_all(metadata)

    def work(conn: Connection) -> tuple[str, list[tuple[int, str]], str]:
        version = conn.execute(text(VERSION_SQL[cell.backend])).scalar_one()
        conn.execute(insert(notes), [{"id": 1, "body": cell.name}, {"id": 2, "body": "two"}])
        conn.commit()
        rows = [tuple(r) for r in conn.execute(select(notes).order_by(notes.c.id))]
        return str(version), rows, f"{conn.dialect.driver}:{conn.dialect.is_async}"

    version, rows, driver = cell.run(work)
    assert rows == [(1, cell.name), (2, "two")]
    assert driver == f"{cell.driver.removesuffix('_async')}:{cell.is_async}"
    if cell.backend == "postgresql":
        assert version.startswith("15.")
    elif cell.backend == "mariadb":
        assert "MariaDB" in version
    else:
        assert version.startswith("3.")

    # What one connection committed, another (a different driver) reads.
    with cell.sync_engine().connect() as other:
        assert other.execute(select(func.count()).select_from(notes)).scalar_one() == 2


def test_other_connection_holds_a_real_row_lock(cell: Cell) -> None:
    """locksafe.testing: a row lock held from another connection blocks this one's NOWAIT."""
    import locksafe
    from locksafe.testing import hold_row_lock

    cell.create_all(metadata)
    with cell.sync_engine().begin() as conn:
        conn.execute(insert(notes), [{"id": 1, "body": "x"}])

    def try_lock(conn: Connection) -> str:
        stmt = locksafe.with_row_locks(select(notes).where(notes.c.id == 1), nowait=True)
        try:
            with conn.begin():
                conn.execute(stmt).all()
        except Exception as exc:
            return str(locksafe.classify(exc))
        return "locked"

    with hold_row_lock(cell.url, select(notes).where(notes.c.id == 1)):
        kind = cell.run(try_lock)
    assert kind in {"lock_not_available", "database_busy"}
    assert cell.run(try_lock) == "locked"  # released when the holder's block ended


@pytest.mark.cells("sqlite+pysqlite")
def test_cells_marker_restricts_cells(cell: Cell) -> None:
    assert cell.name == "sqlite+pysqlite"


@pytest.mark.cells("postgresql+psycopg2")
def test_suite_runs_against_servers_given_by_url(cell: Cell, tmp_path: Path) -> None:
    """LOCKSAFE_TEST_POSTGRESQL_URL replaces the throw-away server: with PostgreSQL's binaries
    made unfindable and CI=true, the inner run can only pass by using the given server."""
    given = cell.admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    env = {
        **os.environ,
        "CI": "true",
        "LOCKSAFE_TEST_POSTGRESQL_URL": given,
        "LOCKSAFE_PG_BIN": str(tmp_path / "no-postgresql-here"),
        "PATH": "/usr/bin:/bin",
    }
    test_id = f"{Path(__file__).name}::test_cell_talks_to_a_real_server[postgresql+psycopg2]"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id],
        cwd=Path(__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout


# -- the harness's own shape ---------------------------------------------------------------------

TESTS = Path(__file__).parent
#: The top-level helper modules the harness package replaced: importing one by its old name
#: would only work by accident of sys.path.
OLD_HELPERS = ("conftest", "servers", "options", "sqlite_probe", "backfill_app", "shapes_app")


def python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_imports_conftest_or_an_old_helper_module() -> None:
    """conftest.py is pytest's, not a module to import; helpers come from the harness package."""
    import ast

    found = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in OLD_HELPERS or top == "fixtures":
                    found.append(f"{path.relative_to(TESTS)}:{node.lineno}: {name}")
    assert python_files(), TESTS
    assert found == []


def test_the_check_above_sees_a_conftest_import(tmp_path: Path) -> None:
    """The control: the scan does catch the forms it forbids."""
    import ast

    source = "from conftest import Cell\nimport servers\nfrom harness.cells import Cell\n"
    tops = [
        (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0]
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    assert [t for t in tops if t in OLD_HELPERS] == ["conftest", "servers"]


def test_conftest_holds_only_fixtures_and_hooks() -> None:
    import ast

    tree = ast.parse((TESTS / "conftest.py").read_text())
    others = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            fixture = any("fixture" in ast.unparse(d) for d in node.decorator_list)
            if fixture or node.name.startswith("pytest_"):
                continue
            others.append(node.name)
        elif isinstance(node, ast.ClassDef | ast.AsyncFunctionDef):
            others.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            others.append(ast.unparse(node))
    assert others == []


def test_markers_are_registered_once_in_pyproject() -> None:
    """Every marker the tests use is declared in pyproject.toml (--strict-markers), and nothing
    registers markers a second time from code."""
    import re

    pyproject = (TESTS.parent / "pyproject.toml").read_text()
    block = re.search(r"^markers = \[(.*?)^\]", pyproject, re.S | re.M)
    assert block is not None
    declared = re.findall(r'^\s*"(\w+)[(:]', block.group(1), re.M)
    assert len(declared) == len(set(declared)), declared
    registering = "addinivalue_line(" + '"markers"'  # split: this file must not match itself
    used = set()
    for path in python_files():
        text = path.read_text()
        assert registering not in text, path
        used |= set(re.findall(r"pytest\.mark\.(\w+)", text))
    builtin = {"parametrize", "skipif", "skip", "xfail", "filterwarnings", "usefixtures", "timeout"}
    assert used - builtin <= set(declared), used - builtin - set(declared)


def test_the_tests_left_out_of_the_compat_leg_are_the_ones_scripts_test_sh_names() -> None:
    """scripts/test.sh says which tests the compat leg leaves out (``-m "not slow"``) and why:
    that list and the ``slow`` markers stay the same set."""
    import ast
    import re

    marked = set()
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(
                ast.unparse(d) == "pytest.mark.slow" for d in node.decorator_list
            ):
                marked.add(node.name)
    script = (TESTS.parent / "scripts" / "test.sh").read_text()
    listed = re.search(
        r"^#\s+Deselected here(.*?)^#\s+`pytest --co -q -m slow`", script, re.S | re.M
    )
    assert listed is not None
    assert 'leg compat "$COMPAT_PY" -p no:cacheprovider -m "not slow"' in script
    assert set(re.findall(r"\b(test_\w+)\b(?!\.py)", listed.group(1))) == marked
    assert marked
