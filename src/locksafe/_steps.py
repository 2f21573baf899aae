"""One algorithm for sync and async callers: a generator *yields steps*, and a driver runs them
— :func:`run_sync` directly, :func:`run_async` by awaiting (a bind's ``run_sync``,
``asyncio.sleep``). The algorithm is written once; only the two small drivers differ.

Vocabulary layer: imports nothing of locksafe.

>>> def steps():
...     got = yield Call(lambda bind, x: bind + x, 1)
...     yield Sleep(0)
...     return got * 10
>>> run_sync(steps(), 41)
420
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["Call", "Sleep", "Steps", "run_async", "run_sync"]

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """Run ``fn(bind, *args)`` with the sync bind (an async bind's ``run_sync`` gives it);
    the generator is sent its result, or has its exception thrown in."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "args", args)


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds`` (``time.sleep`` / ``await asyncio.sleep``)."""

    seconds: float


Steps = Generator["Call | Sleep", Any, T]


class _Driver:
    """What both drivers share: iterating gives the generator's steps, each after the generator
    was sent the last one's result (:attr:`send`) or thrown its error (a ``with driver:``
    block around a step catches it: handed to the generator, which decides); :attr:`result`
    is what the generator returned."""

    def __init__(self, steps: Steps[Any]) -> None:
        self._steps = steps
        self._error: BaseException | None = None
        self.send: Any = None
        self.result: Any = None

    def __iter__(self) -> Iterator[Call | Sleep]:
        while True:
            try:
                if self._error is not None:
                    step = self._steps.throw(self._error)
                else:
                    step = self._steps.send(self.send)
            except StopIteration as stop:
                self.result = stop.value
                return
            self.send, self._error = None, None
            yield step

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._error = exc
        return True


def run_sync(steps: Steps[T], bind: Any) -> T:
    """Run ``steps`` with a sync ``bind``; returns what the generator returns."""
    driver = _Driver(steps)
    for step in driver:
        with driver:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
            else:
                driver.send = step.fn(bind, *step.args)
    return driver.result  # type: ignore[no-any-return]


async def run_async(steps: Steps[T], bind: Any) -> T:
    """Run ``steps`` with an async ``bind`` (``AsyncConnection`` / ``AsyncSession``: each
    :class:`Call` goes through its ``run_sync``)."""
    driver = _Driver(steps)
    for step in driver:
        with driver:
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
            else:
                driver.send = await bind.run_sync(step.fn, *step.args)
    return driver.result  # type: ignore[no-any-return]
