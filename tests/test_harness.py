"""Each driver cell talks to a real server: version, a real write and a real read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text
from sqlalchemy.engine import Connection

from conftest import Cell

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
