"""A kubernetes-client ApiClient for a running lab's cluster (the components' way in, as an Airflow hook's)."""

from __future__ import annotations

from kubernetes import client, config

from meshstack.process import LabProcess


def api_client(lab: LabProcess, cluster: str | None = None) -> client.ApiClient:
    return config.new_client_from_config(config_file=lab.kubeconfig(cluster))
