"""Issue 9's API points for row locks: every option of ``with_row_locks``, ``plan_row_locks``
and ``LockOptions`` is checked at call time, and a refusal names the real reason.

``nowait="false"`` used to render ``NOWAIT`` (a non-empty string is true), ``of=42`` was
"not in the FROM", and a UNION's refusal named ``nowait``.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, select, union_all
from sqlalchemy.orm import DeclarativeBase, Session, aliased

from harness.cells import Cell
from locksafe import (
    LockOptions,
    UnsupportedLockOption,
    plan_row_locks,
    with_row_locks,
)
from locksafe.binds import offline_dialect

metadata = MetaData()
jobs = Table("ro_jobs", metadata, Column("id", Integer, primary_key=True))
owners = Table("ro_owners", metadata, Column("id", Integer, primary_key=True))


class Base(DeclarativeBase):
    pass


class Job(Base):
    __table__ = jobs


BOOL_OPTIONS = ("nowait", "skip_locked", "read", "key_share")
NOT_BOOLS: tuple[Any, ...] = ("false", "False", "no", "", 0, 1, None, 1.0, [])
SERVERS = (
    offline_dialect("postgresql", (15, 0)),
    offline_dialect("mariadb", (10, 11, 0)),
    offline_dialect("mysql", (8, 0, 36)),
    offline_dialect("sqlite"),
)


@pytest.mark.parametrize("option", BOOL_OPTIONS)
@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
def test_lock_flags_must_be_bools(option: str, value: Any) -> None:
    """``nowait="false"`` renders NOWAIT if accepted: a TypeError naming the option and
    what it accepts, from all three entry points, with or without a bind."""
    pattern = rf"^{option}=.* must be a bool \(True or False\)"
    with pytest.raises(TypeError, match=pattern):
        with_row_locks(select(jobs), **{option: value})
    for dialect in SERVERS:
        with pytest.raises(TypeError, match=pattern):
            with_row_locks(select(jobs), dialect, **{option: value})
        with pytest.raises(TypeError, match=pattern):
            plan_row_locks(dialect, **{option: value})
    with pytest.raises(TypeError, match=pattern):
        LockOptions(**{option: value})


@pytest.mark.parametrize("value", [42, 4.2, "ro_jobs", b"x", True, object(), [jobs, None], (42,)])
def test_of_must_name_something_to_lock(value: Any) -> None:
    """``of=42``: a TypeError saying what ``of`` accepts, not "not in the FROM"."""
    for call in (
        lambda: with_row_locks(select(jobs), of=value),
        lambda: with_row_locks(select(jobs), SERVERS[0], of=value),
        lambda: plan_row_locks(SERVERS[0], of=value),
    ):
        with pytest.raises(
            TypeError, match=r"of= accepts a Table, an alias, an ORM entity"
        ) as info:
            call()
        assert "FROM" not in str(info.value)
    with pytest.raises(TypeError, match="of="):
        LockOptions(of=value if isinstance(value, tuple) else (value,))
    with pytest.raises(TypeError, match="of="):
        LockOptions(of=[jobs])  # type: ignore[arg-type]


def test_of_accepts_tables_entities_aliases_and_columns() -> None:
    alias = aliased(Job)
    for of in (jobs, Job, Job.id, jobs.c.id, [jobs], (Job, Job.id)):
        with_row_locks(select(jobs), SERVERS[0], of=of)
    with_row_locks(select(alias), SERVERS[0], of=alias)
    # A table that is not in the FROM is still a ValueError that says so.
    with pytest.raises(ValueError, match="not in the statement's FROM"):
        with_row_locks(select(jobs), of=owners)


@pytest.mark.parametrize("value", ["RAISE", "", None, 1, True])
def test_on_unsupported_must_be_one_of_its_values(value: Any) -> None:
    with pytest.raises(ValueError, match=r"on_unsupported=.* is not one of 'raise', 'warn'"):
        with_row_locks(select(jobs), on_unsupported=value)
    with pytest.raises(ValueError, match=r"on_unsupported="):
        plan_row_locks(SERVERS[0], on_unsupported=value)


@pytest.mark.parametrize("options", [{}, {"nowait": True}, {"skip_locked": True}, {"read": True}])
def test_union_refusal_names_the_union_not_an_option(options: dict[str, bool]) -> None:
    """SQLAlchemy renders no lock for a UNION: the refusal says so, and does not blame
    ``nowait`` (which the server supports)."""
    compound = union_all(select(jobs.c.id), select(owners.c.id))
    for dialect in (SERVERS[0], SERVERS[1]):
        with pytest.raises(UnsupportedLockOption) as info:
            with_row_locks(compound, dialect, **options)  # type: ignore[arg-type]
        assert info.value.option == "FOR UPDATE on a UNION / INTERSECT / EXCEPT"
        assert "no lock for a UNION" in str(info.value)
        for name in options:
            assert name not in info.value.options
            assert not str(info.value).startswith(name)


def test_lock_flags_are_checked_before_anything_runs(cell: Cell) -> None:
    """On every cell: the bad option fails at the call, and no statement is sent."""
    engine = cell.engine()

    def work(session: Session) -> None:
        for option in BOOL_OPTIONS:
            with pytest.raises(TypeError, match=option):
                with_row_locks(select(jobs), session, **{option: "false"})
        with pytest.raises(TypeError, match="of= accepts"):
            with_row_locks(select(jobs), session, of=42)
        assert not session.in_transaction()  # nothing was executed

    cell.run_session(work, engine=engine)
