"""meshwave.connections: a Kubernetes connection with `in_cluster` reaches the API server as the pod's service
account (host from the environment, its token and CA), on a client configuration of its own; a Prometheus
connection reads the same whether its type is the old `http` or meshwave's own `meshwave_prometheus`."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from airflow.models.connection import Connection
from kubernetes.config import incluster_config

from meshwave.connections import mesh_kube, prometheus_source
from meshwave.hooks import PrometheusHook


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


# The Prometheus connection: the old way (the unregistered `http` type) and meshwave's own type are read alike.
PROMETHEUS_EXTRA = '{"cluster": "prod-eu-1", "headers": {"X-Scope-OrgID": "mesh"}}'


@pytest.mark.parametrize("conn_type", ["http", "meshwave_prometheus"])
def test_a_prometheus_connection_of_either_type_gives_the_same_source(conn_type: str) -> None:
    connection = Connection(conn_id="prom", conn_type=conn_type, host="prometheus.monitoring", port=9090,
                            login="mesh", password="s3cret", extra=PROMETHEUS_EXTRA)
    source = prometheus_source(connection)
    assert source.url == "http://prometheus.monitoring:9090"
    assert source.cluster == "prod-eu-1"
    sent = dict(source._client.headers)
    assert sent["X-Scope-OrgID"] == "mesh"
    assert sent["Authorization"] == "Basic " + base64.b64encode(b"mesh:s3cret").decode()


def test_headers_typed_as_a_json_string_are_read_as_the_object() -> None:
    as_object = Connection(conn_id="p", conn_type="meshwave_prometheus", host="http://p:9090", extra=PROMETHEUS_EXTRA)
    as_string = Connection(conn_id="p", conn_type="meshwave_prometheus", host="http://p:9090",
                           extra=json.dumps({"headers": json.dumps({"X-Scope-OrgID": "mesh"}), "cluster": "prod-eu-1"}))
    assert prometheus_source(as_object).identity == prometheus_source(as_string).identity


@pytest.mark.parametrize("headers", [["X-Scope-OrgID: mesh"], "X-Scope-OrgID: mesh"])
def test_headers_that_are_not_an_object_are_refused_by_name(headers: object) -> None:
    connection = Connection(conn_id="p", conn_type="meshwave_prometheus", host="http://p:9090",
                            extra=json.dumps({"headers": headers}))
    with pytest.raises(ValueError, match="connection p: extra headers"):
        prometheus_source(connection)


def test_the_hook_builds_the_source_from_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_PROM_HOOKED", json.dumps(
        {"conn_type": "meshwave_prometheus", "host": "http://prometheus.monitoring:9090",
         "extra": json.loads(PROMETHEUS_EXTRA)}))
    source = PrometheusHook("prom_hooked", timeout=3).get_conn()
    assert (source.url, source.cluster, source.timeout) == ("http://prometheus.monitoring:9090", "prod-eu-1", 3.0)


# TLS: requests' `verify` from the extras `verify` (default true) and `ca_bundle` (implies verify), for either type.
def prometheus(extra: dict[str, Any], conn_type: str = "meshwave_prometheus") -> Connection:
    return Connection(conn_id="prom_tls", conn_type=conn_type, host="https://prometheus.monitoring:9090",
                      extra=json.dumps(extra))


def sent_verify(extra: dict[str, Any], conn_type: str = "meshwave_prometheus") -> bool | str:
    """What PrometheusConnect passes as `verify` with each request: its session's."""
    return prometheus_source(prometheus(extra, conn_type))._client._session.verify


@pytest.mark.parametrize("conn_type", ["http", "meshwave_prometheus"])
def test_by_default_the_servers_certificate_is_verified(conn_type: str) -> None:
    assert sent_verify({}, conn_type) is True
    assert sent_verify({"verify": None, "ca_bundle": None}, conn_type) is True  # fields left empty in the form
    assert sent_verify({"verify": True, "ca_bundle": ""}, conn_type) is True


@pytest.mark.parametrize("conn_type", ["http", "meshwave_prometheus"])
def test_verify_false_turns_verification_off(conn_type: str) -> None:
    assert sent_verify({"verify": False}, conn_type) is False
    assert sent_verify({"verify": "false"}, conn_type) is False  # as a connection URI's query gives it


@pytest.mark.parametrize("conn_type", ["http", "meshwave_prometheus"])
def test_a_ca_bundle_is_what_requests_verifies_with(conn_type: str, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert sent_verify({"ca_bundle": str(bundle)}, conn_type) == str(bundle)
    assert sent_verify({"ca_bundle": str(bundle), "verify": True}, conn_type) == str(bundle)


def test_a_missing_ca_bundle_is_refused_naming_the_connection_and_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    with pytest.raises(ValueError, match=f"connection prom_tls: extra ca_bundle: {missing} does not exist"):
        prometheus_source(prometheus({"ca_bundle": str(missing)}))


def test_a_ca_bundle_with_verify_false_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    with pytest.raises(ValueError, match="connection prom_tls: extra ca_bundle: .* verify is false"):
        prometheus_source(prometheus({"ca_bundle": str(bundle), "verify": False}))


@pytest.mark.parametrize("value", ["no", "0", 0, 1, "", {"on": True}])
def test_a_verify_that_is_not_a_boolean_is_refused_naming_the_connection_and_the_field(value: Any) -> None:
    with pytest.raises(ValueError, match="connection prom_tls: extra verify: true or false, got"):
        prometheus_source(prometheus({"verify": value}))


def test_sources_that_verify_differently_do_not_share_answers(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    identities = {prometheus_source(prometheus(extra)).identity
                  for extra in ({}, {"verify": False}, {"ca_bundle": str(bundle)})}
    assert len(identities) == 3


def test_the_hook_refuses_a_missing_ca_bundle_in_its_test(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_PROM_NO_CA", json.dumps(
        {"conn_type": "meshwave_prometheus", "host": "https://prometheus.monitoring:9090",
         "extra": {"ca_bundle": str(tmp_path / "ca.pem")}}))
    ok, message = PrometheusHook("prom_no_ca").test_connection()
    assert not ok and "connection prom_no_ca: extra ca_bundle: " in message, message
