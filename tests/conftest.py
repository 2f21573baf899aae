"""Fixtures and hooks only; everything else of the test harness is in ``tests/harness/``.

- ``cell``: parametrised over the 13 driver cells of :data:`harness.cells.CELLS` (restricted by
  ``@pytest.mark.cells(...)``); see :class:`harness.cells.Cell`.
- ``servers``: the PostgreSQL and MariaDB servers of this run, started once, when a test first
  needs one (:class:`harness.cells.Servers`), stopped at the end of the run.
- ``quiet_retries``: ``@transactional``'s retry lines (WARNING on ``locksafe.transactions``)
  left out, for tests whose many retries are the point (``pytestmark =
  pytest.mark.usefixtures("quiet_retries")``).

Markers are registered in pyproject.toml (``--strict-markers``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cells import Cell, CellSpec, Servers, make_cell, select_cells


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` in this run and in the processes it starts, as in a
    terminal: a shell that starts pytest in the background (``scripts/test.sh`` runs its legs
    at once) hands it SIGINT *ignored*, which Python then leaves ignored, and children inherit
    (the tests that interrupt a wait would see nothing arrive)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cell" in metafunc.fixturenames:
        specs = select_cells(metafunc.definition.get_closest_marker("cells"))
        metafunc.parametrize("cell", specs, indirect=True, ids=[spec.name for spec in specs])


@pytest.fixture
def quiet_retries() -> Iterator[None]:
    logger = logging.getLogger("locksafe.transactions")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    found = Servers()
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture
def cell(request: pytest.FixtureRequest, servers: Servers, tmp_path: Path) -> Iterator[Cell]:
    spec: CellSpec = request.param
    the_cell = make_cell(spec, servers, tmp_path)
    try:
        yield the_cell
    finally:
        the_cell.close()
