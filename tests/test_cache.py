"""locksafe/_cache.py: the one cache helper (issue 10)."""

from __future__ import annotations

import gc

import pytest

from locksafe import _cache


def test_memo_remembers_none_and_starts_over_when_full() -> None:
    calls: list[int] = []

    def make(key: int) -> int | None:
        calls.append(key)
        return None if key == 0 else key * 10

    memo: _cache.Memo[int, int | None] = _cache.Memo("test.memo", maxsize=3)
    assert [memo.get_or_make(k, make) for k in (0, 1, 0, 1)] == [None, 10, None, 10]
    assert calls == [0, 1]  # None is a remembered value, not a miss
    memo.get_or_make(2, make)
    memo.get_or_make(3, make)  # full at 3: starts over, then holds 3
    assert len(memo) == 1
    assert 3 in memo
    assert 0 not in memo


def test_memo_does_not_remember_unhashable_keys() -> None:
    memo: _cache.Memo[object, int] = _cache.Memo("test.unhashable")
    assert memo.get_or_make([1, 2], len) == 2  # type: ignore[arg-type]
    assert len(memo) == 0
    assert memo.get([1]) is None  # type: ignore[arg-type]
    assert [1] not in memo


def test_memo_checks_maxsize() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        _cache.Memo("test.bad", maxsize=0)


def test_identity_memo_is_weak() -> None:
    class Thing:
        pass

    memo: _cache.IdentityMemo[Thing, str] = _cache.IdentityMemo("test.identity")
    thing = Thing()
    memo.put(thing, "x")
    assert memo.get(thing) == "x"
    assert memo.get(Thing()) is None
    del thing
    gc.collect()
    assert len(memo) == 0
    assert memo.put(1, "ints cannot be weakly referenced") == "ints cannot be weakly referenced"
    assert len(memo) == 0


def test_clear_all_and_sizes_see_every_cache() -> None:
    import locksafe

    locksafe.classify(ValueError("x"))
    names = set(_cache.sizes())
    assert {"classify.driver_of_type", "rowlocks.scans", "rowlocks.requests"} <= names
    memo: _cache.Memo[int, int] = _cache.Memo("test.clear_all")
    memo.put(1, 1)
    _cache.clear_all()
    assert len(memo) == 0
    assert all(size == 0 for size in _cache.sizes().values())
