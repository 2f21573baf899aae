"""What a user's type checker sees: mypy --strict on code that uses locksafe's public API.

locksafe ships ``py.typed``; these checks run mypy on small user programs (in a subprocess,
each in its own directory) and compare what it reveals and reports with what the docs promise.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy")

PROGRAM = """
from typing import Any
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import locksafe


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)


jobs = Table("core_jobs", MetaData(), Column("id", Integer, primary_key=True))
engine = create_engine("sqlite://")
make_session = sessionmaker(engine)


@locksafe.transactional(sessionmaker=make_session)
def claim(job_id: int, *, session: Session = locksafe.NEW_SESSION) -> int:
    return job_id


@locksafe.transactional(sessionmaker=async_sessionmaker(create_async_engine("sqlite+aiosqlite://")))
async def claim_async(job_id: int, *, session: AsyncSession = locksafe.NEW_SESSION) -> int:
    return job_id


async def main() -> None:
    reveal_type(await claim_async(1))


def check(session: Session, error: BaseException) -> None:
    reveal_type(claim(1))
    reveal_type(claim(1, session=session))
    # with_row_locks returns what it was given: each pair reveals the same type
    reveal_type(session.query(Job))
    reveal_type(locksafe.with_row_locks(session.query(Job), session))
    reveal_type(select(Job))
    reveal_type(locksafe.with_row_locks(select(Job), session, skip_locked=True))
    reveal_type(select(jobs.c.id).where(jobs.c.id > 1))
    reveal_type(locksafe.with_row_locks(select(jobs.c.id).where(jobs.c.id > 1)))
    reveal_type(locksafe.classify(error))
    reveal_type(locksafe.is_lock_not_available_error(error))
    reveal_type(locksafe.lock_capabilities(engine))
"""

EXPECTED_REVEALS = [
    "int",  # await claim_async(1)
    "int",  # claim(1): no session needed with sessionmaker= and NEW_SESSION
    "int",
    "Query",
    "Query",
    "Select",
    "Select",
    "Select",
    "Select",
    "locksafe.kinds.LockErrorKind | None",
    "bool",
    "locksafe.capabilities.LockCapabilities",
]


def run_mypy(tmp_path: Path, source: str) -> list[str]:
    program = tmp_path / "program.py"
    program.write_text(textwrap.dedent(source))
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "--config-file",
            "",
            "--python-version",
            f"{sys.version_info.major}.{sys.version_info.minor}",
            program.name,
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert completed.returncode in (0, 1), completed.stderr  # 2: mypy itself failed
    return [line for line in completed.stdout.splitlines() if line.startswith("program.py:")]


def revealed(line: str) -> str:
    return line.split('Revealed type is "', 1)[1].rstrip('"').replace("builtins.", "")


def test_user_code_type_checks_as_documented(tmp_path: Path) -> None:
    lines = run_mypy(tmp_path, PROGRAM)
    others = [line for line in lines if "Revealed type" not in line]
    assert others == [], "\n".join(others)
    reveals = [revealed(line) for line in lines if "Revealed type" in line]
    # The statement types' arguments differ between SQLAlchemy 2.0 and 2.1 (Select[Tuple[Job]]
    # vs Select[Job]): compare each with_row_locks result with its input, and the rest whole.
    for given, locked in ((3, 4), (5, 6), (7, 8)):
        assert reveals[locked] == reveals[given], (reveals[given], reveals[locked])
    shapes = [
        r.split("[", 1)[0].rsplit(".", 1)[-1] if r.startswith("sqlalchemy.") else r
        for r in reveals
    ]
    assert shapes == EXPECTED_REVEALS, "\n".join(reveals)


def test_without_new_session_the_checker_wants_a_session(tmp_path: Path) -> None:
    """The control: why NEW_SESSION exists (the decorator keeps the signature)."""
    lines = run_mypy(
        tmp_path,
        """
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session, sessionmaker
        import locksafe

        @locksafe.transactional(sessionmaker=sessionmaker(create_engine("sqlite://")))
        def claim(job_id: int, *, session: Session) -> int:
            return job_id

        claim(1)
        """,
    )
    wanted = [line for line in lines if 'Missing named argument "session"' in line]
    assert wanted, lines
    assert "[call-arg]" in wanted[0], wanted
