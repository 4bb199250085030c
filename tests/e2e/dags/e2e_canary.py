"""End-to-end test DAGs (airflow dag factory): the wave of tests/e2e/plans/canary.yaml (MESHWAVE_PLANS_DIR)."""

from meshwave.wave import wave_dags

globals().update(wave_dags("canary.yaml"))
