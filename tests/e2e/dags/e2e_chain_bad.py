"""End-to-end test DAGs (airflow dag factory): the chained waves of tests/e2e/plans/chain-bad.yaml."""

from meshwave.wave import wave_dags

globals().update(wave_dags("chain-bad.yaml"))
