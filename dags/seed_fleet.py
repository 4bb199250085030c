"""Airflow DAGs for the plan include/plans/seed-fleet.yaml: one DAG per wave (meshwave_seed_fleet_<wave>).

A plan with a mistake shows as an import error of this file only; each plan has its own DAG file.
"""

from meshwave.wave import wave_dags

globals().update(wave_dags("seed-fleet.yaml"))
