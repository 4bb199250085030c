"""The hook behind the `meshwave_prometheus` connection type (registered in meshwave.provider_info).

Airflow imports this module only when something asks for that connection type's hook (the connection form's
"Test" button, `BaseHook.get_hook`); the DAGs themselves go through meshwave.connections. So it imports only the
hook base class at module level: the Prometheus client (requests, prometheus-api-client) loads in get_conn.

The form's fields are declared in provider_info (Airflow 3.2+ reads them from there without importing the hook);
they are the extras meshwave.connections.prometheus_source reads, so this hook only wraps that builder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseHook

from meshwave.provider_info import PROMETHEUS_CONN_TYPE

if TYPE_CHECKING:
    from meshwave.prometheus import PrometheusSource


class PrometheusHook(BaseHook):
    """A Prometheus the mesh's metrics are read from: host = its URL; optional basic auth, extra headers, the
    `cluster` label value when one Prometheus serves several clusters, and for https the certificate check (`verify`,
    `ca_bundle`)."""

    conn_name_attr = "prometheus_conn_id"
    default_conn_name = "prometheus_default"
    conn_type = PROMETHEUS_CONN_TYPE
    hook_name = "Prometheus (meshwave)"

    def __init__(self, prometheus_conn_id: str = default_conn_name, timeout: float = 10) -> None:
        super().__init__()
        self.prometheus_conn_id = prometheus_conn_id
        self.timeout = timeout

    def get_conn(self) -> PrometheusSource:
        from meshwave.connections import prometheus_source

        return prometheus_source(self.get_connection(self.prometheus_conn_id), timeout=self.timeout)

    def test_connection(self) -> tuple[bool, str]:
        """One instant query: the URL answers, the credentials and headers are accepted."""
        try:
            source = self.get_conn()
            try:
                source.instant("vector(1)")
            finally:
                source.close()
        except Exception as e:  # the form shows the reason; nothing here may escape into the API server
            return False, f"{type(e).__name__}: {e}"
        return True, "Prometheus answered"
