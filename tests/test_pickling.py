"""Every public exception of locksafe crosses a process boundary with its attributes (issue 9,
item 6): ``pickle`` round trips, and a ``ProcessPoolExecutor`` worker raising one does not
break the pool (Celery and RQ pickle exceptions the same way)."""

from __future__ import annotations

import concurrent.futures
import inspect
import multiprocessing
import pickle
from typing import Any

import pytest

import locksafe
import locksafe.kinds
from locksafe import (
    CallerTransactionError,
    LockErrorKind,
    LocksafeError,
    LockUnavailable,
    UnsupportedLockOption,
)


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def public_exception_classes() -> list[type[BaseException]]:
    """Every exception class exported by locksafe, every LocksafeError subclass locksafe
    defines, and every exception class in ``locksafe.kinds``."""
    classes: dict[str, type[BaseException]] = {}
    candidates = [getattr(locksafe, name) for name in locksafe.__all__]
    candidates += [getattr(locksafe.kinds, name) for name in dir(locksafe.kinds)]
    candidates += _subclasses(LocksafeError)
    for obj in candidates:
        if (
            inspect.isclass(obj)
            and issubclass(obj, BaseException)
            and obj.__module__.startswith("locksafe")
        ):
            classes[obj.__qualname__] = obj
    return [classes[name] for name in sorted(classes)]


#: How to build each known exception, with attributes that all differ from the defaults.
KNOWN: dict[type[BaseException], Any] = {
    LockUnavailable: lambda: LockUnavailable(
        LockErrorKind.DEADLOCK, attempts=4, elapsed=1.25, retry_after=3.0, operation="transfer"
    ),
    UnsupportedLockOption: lambda: UnsupportedLockOption(
        ["skip_locked", "of"], dialect="mysql", server_version=(5, 7, 44), reason="too old"
    ),
    CallerTransactionError: lambda: CallerTransactionError(
        "refused", operation="transfer", reason="changes not flushed yet"
    ),
    LocksafeError: lambda: LocksafeError("plain", 42),
}


def build(cls: type[BaseException]) -> BaseException:
    if cls in KNOWN:
        return KNOWN[cls]()  # type: ignore[no-any-return]
    try:  # a class added later: its own constructor, with what it says it needs
        exc = cls()
    except TypeError:
        exc = cls.__new__(cls, "made for the pickling test")
    exc.locksafe_test_attribute = ("kept", 1)  # type: ignore[attr-defined]
    return exc


def same(a: BaseException, b: BaseException) -> None:
    assert type(a) is type(b)
    assert a.args == b.args
    assert str(a) == str(b)
    assert vars(a) == vars(b)


def test_the_known_exceptions_are_all_found() -> None:
    found = set(public_exception_classes())
    assert {LockUnavailable, UnsupportedLockOption, LocksafeError, CallerTransactionError} <= found
    assert locksafe.LockDegradedWarning in found


@pytest.mark.parametrize("cls", public_exception_classes(), ids=lambda cls: cls.__qualname__)
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_every_public_exception_round_trips_with_its_attributes(
    cls: type[BaseException], protocol: int
) -> None:
    exc = build(cls)
    again = pickle.loads(pickle.dumps(exc, protocol=protocol))
    same(exc, again)


def test_attributes_survive_and_behave() -> None:
    unavailable = pickle.loads(pickle.dumps(KNOWN[LockUnavailable]()))
    assert unavailable.kind is LockErrorKind.DEADLOCK
    assert (unavailable.attempts, unavailable.elapsed, unavailable.retry_after) == (4, 1.25, 3.0)
    assert unavailable.operation == "transfer"
    assert locksafe.classify(unavailable) is LockErrorKind.DEADLOCK
    unsupported = pickle.loads(pickle.dumps(KNOWN[UnsupportedLockOption]()))
    assert unsupported.options == ("skip_locked", "of")
    assert unsupported.option == "skip_locked"
    assert unsupported.server_version == (5, 7, 44)
    assert (unsupported.dialect, unsupported.reason) == ("mysql", "too old")


def test_a_subclass_with_its_own_signature_round_trips() -> None:
    class Mine(LockUnavailable):
        def __init__(self, tag: str) -> None:
            super().__init__(LockErrorKind.LOCK_TIMEOUT, attempts=1, elapsed=0.0, retry_after=1)
            self.tag = tag

    exc = Mine("x")
    # a local class cannot be pickled by reference; copy goes through the same __reduce__
    import copy

    same(exc, copy.copy(exc))
    same(exc, copy.deepcopy(exc))


def raise_in_worker(which: str) -> None:
    """Runs in a worker process."""
    raise KNOWN[{cls.__name__: cls for cls in KNOWN}[which]]()


@pytest.mark.parametrize("which", [cls.__name__ for cls in KNOWN])
def test_a_process_pool_worker_raising_one_keeps_the_pool(which: str) -> None:
    context = multiprocessing.get_context("spawn")  # no fork of a threaded test process
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(raise_in_worker, which)
        error = future.exception(timeout=60)
        assert error is not None
        assert not isinstance(error, concurrent.futures.process.BrokenProcessPool), error
        expected = {cls.__name__: cls for cls in KNOWN}[which]
        same(KNOWN[expected](), error)
        # the pool still works
        assert pool.submit(pow, 2, 10).result(timeout=60) == 1024
