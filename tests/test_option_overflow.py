"""Options given an int beyond float's range (found by the reliability suite's fuzzing): a clear
``ValueError`` naming the option, or the value taken as "no bound" where that is allowed — never
an ``OverflowError`` from deep inside; a huge finite float is clamped where it becomes
milliseconds."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import create_engine, text
from starlette.applications import Starlette

import locksafe
import locksafe.sqlite
from locksafe.options import check_number
from locksafe.starlette import install_lock_error_handlers

HUGE = 10**400


def test_check_number_takes_a_huge_int_as_infinite() -> None:
    assert check_number("timeout", HUGE) == math.inf
    assert check_number("timeout", -HUGE) == -math.inf


def test_lock_timeout_refuses_a_huge_int_and_clamps_a_huge_float(tmp_path: object) -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        with pytest.raises(ValueError, match="seconds"):
            locksafe.lock_timeout(conn, HUGE)
        with conn.begin(), locksafe.lock_timeout(conn, 1e308):  # finite: clamped, not overflowed
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2**31 - 1


def test_named_lock_and_configure_refuse_a_huge_int() -> None:
    with create_engine("sqlite://").connect() as conn, pytest.raises(ValueError, match="timeout"):
        locksafe.named_lock(conn, "x", timeout=HUGE)
    with pytest.raises(ValueError, match="busy_timeout"):
        locksafe.sqlite.configure(create_engine("sqlite://"), busy_timeout=HUGE)


def test_transactional_takes_a_huge_timeout_as_no_limit() -> None:
    @locksafe.transactional(timeout=HUGE)
    def answer(session: object) -> int:
        return 42

    from sqlalchemy.orm import Session

    with Session(create_engine("sqlite://")) as session:
        assert answer(session) == 42
        assert session.execute(text("SELECT 1")).scalar() == 1


def test_install_lock_error_handlers_names_a_wrong_app() -> None:
    with pytest.raises(TypeError, match="app="):
        install_lock_error_handlers(1.5)  # type: ignore[arg-type]
    install_lock_error_handlers(Starlette())
