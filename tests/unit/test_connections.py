"""meshwave.connections: a Kubernetes connection with `in_cluster` reaches the API server as the pod's service
account (host from the environment, its token and CA), on a client configuration of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.models.connection import Connection
from kubernetes.config import incluster_config

from meshwave.connections import mesh_kube


def test_an_in_cluster_connection_uses_the_pods_service_account(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token-123")
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    connection = Connection(conn_id="k8s_in_cluster", conn_type="kubernetes", extra='{"in_cluster": true}')
    kube = mesh_kube(connection, "prod-eu-1")
    configuration = kube.api_client.configuration
    assert configuration.host == "https://10.0.0.1:443"
    assert configuration.get_api_key_with_prefix("BearerToken") == "bearer sa-token-123"
    assert configuration.ssl_ca_cert == str(ca)
