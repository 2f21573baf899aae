import locksafe.compat.airflow as locksafe_airflow

create_metadata_engine, create_async_metadata_engine = locksafe_airflow.install()
