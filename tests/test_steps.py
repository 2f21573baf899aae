"""locksafe._steps: the two drivers run one algorithm alike — results sent in, errors thrown in
(the generator decides: handles, or lets them go up), sleeps, the generator's return value.
Driven here with a sync bind and an async one whose ``run_sync`` gives its sync side, as
SQLAlchemy's AsyncConnection does (the drivers are used on real databases by named_lock and
migration_lock: tests/test_named_locks.py, tests/test_alembic.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from locksafe._steps import Call, Sleep, Steps, run_async, run_sync


class AsyncBind:
    """``await bind.run_sync(fn, *args)`` is ``fn(sync_side, *args)``."""

    def __init__(self, sync_side: Any) -> None:
        self.sync_side = sync_side

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        await asyncio.sleep(0)
        return fn(self.sync_side, *args)


def run(steps: Steps[Any], bind: Any, driver: str) -> Any:
    if driver == "sync":
        return run_sync(steps, bind)
    return asyncio.run(run_async(steps, AsyncBind(bind)))


def fail(bind: list[str], error: BaseException) -> None:
    bind.append(f"raised {type(error).__name__}")
    raise error


def algorithm(log: list[str]) -> Steps[str]:
    got = yield Call(lambda bind, x: bind.append(x) or len(bind), "first")
    log.append(f"got {got}")
    try:
        yield Call(fail, ValueError("no"))
    except ValueError as error:
        log.append(f"handled {error}")
    started = time.monotonic()
    yield Sleep(0.05)
    log.append(f"slept {time.monotonic() - started >= 0.05}")
    try:
        yield Call(fail, KeyboardInterrupt())
    except BaseException:
        yield Call(lambda bind: bind.append("cleaned up"))
        raise
    return "unreachable"


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_results_errors_sleeps_and_the_return_value(driver: str) -> None:
    bind: list[str] = []
    log: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run(algorithm(log), bind, driver)
    assert bind == ["first", "raised ValueError", "raised KeyboardInterrupt", "cleaned up"]
    assert log == ["got 1", "handled no", "slept True"]

    def returns() -> Steps[int]:
        first = yield Call(lambda bind: 20)
        second = yield Call(lambda bind, x: x + bind, 1)
        return first + second

    assert run(returns(), 1, driver) == 22


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_an_unhandled_error_goes_up_with_its_traceback(driver: str) -> None:
    def steps() -> Steps[None]:
        yield Call(fail, LookupError("gone"))

    with pytest.raises(LookupError, match="gone") as caught:
        run(steps(), [], driver)
    assert "fail" in {entry.name for entry in caught.traceback}
