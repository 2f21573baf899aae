"""The docs are true: the quick start runs, the generated matrix is current, the README gives
the commands CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from locksafe.matrix import render_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "counter = 200, events = 200" in result.stdout
    assert "classify: database_busy | retryable: True" in result.stdout


def test_matrix_page_is_generated_from_the_code() -> None:
    page = (ROOT / "docs" / "matrix.md").read_text(encoding="utf-8")
    assert page == render_markdown(), "docs/matrix.md is stale: run python docs/generate.py"


def test_matrix_states_the_issue_capability_table() -> None:
    page = render_markdown()
    rows = {line.split(" | ")[0].strip("| "): line for line in page.splitlines() if "|" in line}
    assert "`FOR NO KEY UPDATE`" in rows["PostgreSQL ≥ 9.5"]
    assert "`FOR KEY SHARE`" in rows["PostgreSQL ≥ 9.5"]
    assert "`LOCK IN SHARE MODE`" in rows["MySQL 5.7"]
    assert "`FOR SHARE`" in rows["MySQL ≥ 8.0.1"]
    assert "raises, always" in rows["SQL Server"]


def test_readme_gives_the_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert blocks[0].strip().endswith(".venv/bin/locksafe doctor")
    assert "python examples/quickstart.py" in readme
    assert blocks[1].strip() == "bash scripts/test.sh"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line for line in ci.splitlines() if line and not line.startswith(("#", "set "))]
    assert commands[-1] == "bash scripts/test.sh"


def test_every_docs_page_is_linked_from_the_index() -> None:
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"{page.name} is not in docs/index.md"


def test_the_base_install_needs_no_extra() -> None:
    """`pip install sqlalchemy-locksafe` has no greenlet (SQLAlchemy's asyncio extra): every
    module but the Starlette integration imports, and the quick start runs, without it."""
    code = (
        "import sys, runpy\n"
        "sys.modules['greenlet'] = None\n"  # import greenlet now raises ImportError
        "import locksafe, locksafe.sqlite, locksafe.testing, locksafe.compat.airflow\n"
        "import locksafe.matrix, locksafe.transactions, locksafe.rowlocks\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'quickstart.py')!r}, run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "counter = 200, events = 200" in result.stdout
