"""Distributed test DAGs (airflow dag factory): the wave of tests/distributed/plans/celery.yaml."""

from meshwave.wave import wave_dags

globals().update(wave_dags("celery.yaml"))
