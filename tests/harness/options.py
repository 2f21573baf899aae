"""Every combination of options ``with_row_locks`` accepts, shared by the row-lock tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

WAITS: tuple[dict[str, Any], ...] = ({}, {"nowait": True}, {"skip_locked": True})


def option_combinations(of_target: Any) -> Iterator[dict[str, Any]]:
    """The 24 combinations of read, key_share, (nothing | nowait | skip_locked) and of."""
    for read, key_share, wait, of in itertools.product(
        (False, True), (False, True), WAITS, (False, True)
    ):
        options: dict[str, Any] = dict(wait)
        if read:
            options["read"] = True
        if key_share:
            options["key_share"] = True
        if of:
            options["of"] = of_target
        yield options
