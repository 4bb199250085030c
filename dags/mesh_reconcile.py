"""Airflow DAG `mesh_reconcile`: finishes the undo that a paused wave, a broken plan file or an undo out of retries
left behind (the `meshwave.io/pending` annotations). See meshwave/reconcile.py."""

from meshwave.reconcile import mesh_reconcile_dag

dag = mesh_reconcile_dag()
