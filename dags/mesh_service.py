"""Airflow DAG `mesh_service`: one service, one action (migrate, inject only, STRICT only, back to PERMISSIVE,
remove the sidecar), through the same task group as the migration waves. See meshwave/adhoc.py."""

from meshwave.adhoc import mesh_service_dag

dag = mesh_service_dag()
