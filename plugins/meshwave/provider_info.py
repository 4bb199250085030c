"""meshwave as an Airflow provider: what the `apache_airflow_provider` entry point returns.

Every Airflow process that lists providers (scheduler, API server, workers, each task's runtime when it looks up a
connection type) loads this module and calls `get_provider_info`, so it imports nothing and reads nothing: a literal
dict. The hook class is named as a string and Airflow imports it only when that connection type is used.

The connection form is declared here (`conn-fields`, `ui-field-behaviour`) and not on the hook: Airflow 3.2+ reads
the form from provider info without importing the hook, and deprecates `get_connection_form_widgets` /
`get_ui_field_behaviour` on hooks. Each conn-field is stored in the connection's extra under its own name, which
is the extra meshwave.connections.prometheus_source reads (`cluster`, `headers`, `verify`, `ca_bundle`), so an
old `http` connection and a `meshwave_prometheus` one hold the same things in the same places.
"""

from __future__ import annotations

from typing import Any

# The package's version too (pyproject: [tool.setuptools.dynamic]), read statically by setuptools.
VERSION = "0.1.0"

PROMETHEUS_CONN_TYPE = "meshwave_prometheus"


def get_provider_info() -> dict[str, Any]:
    return {
        # must equal the distribution's (canonical) name, or Airflow refuses the provider
        "package-name": "meshwave",
        "name": "meshwave",
        "description": "Moves Kubernetes services onto an Istio mesh, one wave at a time: the Prometheus "
                       "connection type its DAGs read the mesh's metrics through.",
        "versions": [VERSION],
        "connection-types": [
            {
                "connection-type": PROMETHEUS_CONN_TYPE,
                "hook-class-name": "meshwave.hooks.PrometheusHook",
                "hook-name": "Prometheus (meshwave)",
                "ui-field-behaviour": {
                    # login/password stay: prometheus_source sends them as basic auth
                    "hidden-fields": ["schema", "extra"],
                    "relabeling": {"host": "Prometheus URL"},
                    "placeholders": {
                        "host": "http://prometheus.monitoring:9090",
                        "port": "(optional: when the URL has none)",
                        "login": "(optional: basic auth)",
                        "password": "(optional: basic auth)",
                        "cluster": "prod-eu-1",
                        "headers": '{"X-Scope-OrgID": "mesh"}',
                        "ca_bundle": "/etc/ssl/certs/prometheus-ca.pem",
                    },
                },
                "conn-fields": {
                    "cluster": {
                        "label": "Cluster label",
                        "description": "Optional. When one Prometheus serves several clusters: every query is "
                                       "restricted to cluster=\"<this>\".",
                        "schema": {"type": ["string", "null"]},
                    },
                    "headers": {
                        "label": "Extra headers",
                        "description": "Optional. JSON object of HTTP headers sent with every query "
                                       "(a tenant header, a bearer token).",
                        "schema": {"type": ["object", "null"]},
                    },
                    "verify": {
                        "label": "Verify TLS certificate",
                        "description": "For an https URL: check the server's certificate (against the CA bundle "
                                       "below, else the system's CAs). Turn off only for a self-signed test server.",
                        "schema": {"type": "boolean", "default": True},
                    },
                    "ca_bundle": {
                        "label": "CA bundle",
                        "description": "Optional. Path of a PEM file of the CAs to trust for an https URL (a private "
                                       "CA); it must exist on the workers and the triggerer. Implies verify.",
                        "schema": {"type": ["string", "null"]},
                    },
                },
            },
        ],
    }
