"""The test harness: what the tests use that is not a test (imported as ``harness.<module>``).

- :mod:`harness.cells`: the 13 driver cells (``CELLS``), :class:`~harness.cells.Cell` (engines
  and one way to run sync or async code on a cell's driver), the per-run server registry, and
  ``unavailable()`` (skip outside CI, fail under ``CI=true``).
- :mod:`harness.servers`: throw-away PostgreSQL and MariaDB servers on loopback.
- :mod:`harness.probes`: questions asked of a database from outside the code under test
  (is SQLite's write lock held now?).
- :mod:`harness.options`: every option combination ``with_row_locks`` accepts.
- :mod:`harness.apps`: small applications the scenario tests drive (``backfill``, and
  ``shapes``, whose functions run in spawned worker processes).
- :mod:`harness.mysql8_errors`: recorded MySQL 8 errors no harness server can produce.
- ``harness/fake_airflow/``: a fake Airflow, put on ``PYTHONPATH`` of subprocesses only.

``tests/`` is on ``sys.path`` (``pythonpath`` in pyproject.toml), and spawned processes inherit
the parent's ``sys.path``, so ``harness`` imports the same way in both. This module imports
nothing: a spawned worker that needs ``harness.apps.shapes`` pays for nothing else.
``tests/conftest.py`` holds only the fixtures (``servers``, ``cell``) and the hooks.
"""
