"""meshwave: Airflow DAGs that move Kubernetes services onto an Istio mesh, one wave at a time."""
