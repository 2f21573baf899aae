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
from collections.abc import Callable, Generator
from dataclasses import dataclass
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


def run_sync(steps: Steps[T], bind: Any) -> T:
    """Run ``steps`` with a sync ``bind``; returns what the generator returns."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        send, error = None, None
        try:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
            else:
                send = step.fn(bind, *step.args)
        except BaseException as raised:  # handed to the generator, which decides
            error = raised


async def run_async(steps: Steps[T], bind: Any) -> T:
    """Run ``steps`` with an async ``bind`` (``AsyncConnection`` / ``AsyncSession``: each
    :class:`Call` goes through its ``run_sync``)."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        send, error = None, None
        try:
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
            else:
                send = await bind.run_sync(step.fn, *step.args)
        except BaseException as raised:
            error = raised
