"""Small applications driven by the scenario tests (``backfill``: Airflow's backfill creation as
a FastAPI app; ``shapes``: a multi-process SQLite application, run in spawned workers)."""
