"""Airflow DAG `mesh_emergency_rollback`, the big red button: every STRICT PeerAuthentication in scope back to
PERMISSIVE, optionally the sidecars out, then the services' health. See meshwave/emergency_dag.py."""

from meshwave.emergency_dag import emergency_dag

dag = emergency_dag()
