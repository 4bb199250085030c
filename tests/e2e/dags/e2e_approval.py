"""End-to-end test DAGs (airflow dag factory): the waves of tests/e2e/plans/approval.yaml (MESHWAVE_PLANS_DIR)."""

from meshwave.wave import wave_dags

globals().update(wave_dags("approval.yaml"))
