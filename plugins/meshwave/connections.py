"""From Airflow connection ids to clients: the provider's KubernetesHook, and a Prometheus source.

Tasks fetch connections with `BaseHook.get_connection`, triggers with the async `aget_connection`
(the triggerer must not block its loop); both then go through the same builders below.

Connections:
- Kubernetes: conn type `kubernetes`, extras as the provider documents them (`kube_config_path`,
  `kube_config`, `in_cluster`, `cluster_context`).
- Prometheus: conn type `meshwave_prometheus` (this package's, see provider_info; its form has a field for each
  extra below) or, as before it existed, `http`: both are read the same way. Host `http://127.0.0.1:9090` (or
  host + port + schema); login/password become basic auth; extra `{"headers": {...}}` is sent with every query;
  extra `{"cluster": "x"}` restricts every selector to `cluster="x"` when one Prometheus serves several clusters;
  TLS of an https host: extra `{"verify": false}` turns certificate verification off (default true), extra
  `{"ca_bundle": "/path/ca.pem"}` verifies against that CA bundle instead of the system's (the file must exist
  where the queries run: worker and triggerer).
"""

from __future__ import annotations

import base64
import json
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshwave.prometheus import PrometheusSource

if TYPE_CHECKING:  # the kubernetes client loads when a cluster is first called, not at DAG parse or plugin load
    from meshwave.kube import MeshKube


def _kubernetes_hook_class() -> type:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes import client as k8s_client

    class ConnectedKubernetesHook(KubernetesHook):
        """The provider's hook on an already-fetched connection, with a client configuration of its own
        (the kubernetes client's global default would be shared between clusters and threads)."""

        def __init__(self, connection: Any) -> None:
            configuration = k8s_client.Configuration()
            super().__init__(conn_id=connection.conn_id, client_configuration=configuration)
            self._connection = connection
            if self._get_field("in_cluster"):  # as the provider reads it
                # The provider loads the pod's service account into the kubernetes client's global default and
                # then builds its client on our own configuration, which would stay empty (no host, no token).
                from kubernetes import config

                config.load_incluster_config(client_configuration=configuration)

        @cached_property
        def conn_extras(self) -> dict[str, Any]:
            return self._connection.extra_dejson

    return ConnectedKubernetesHook


def mesh_kube(connection: Any, cluster: str, root_namespace: str = "istio-system", dry_run: bool = False, *,
              revision: str | None = None) -> MeshKube:
    """`revision`: the plan's clusters.<name>.revision; None lets MeshKube find it from the injection webhooks."""
    from meshwave.kube import MeshKube

    hook = _kubernetes_hook_class()(connection)
    return MeshKube(hook.api_client, cluster, root_namespace=root_namespace, dry_run=dry_run, revision=revision)


def prometheus_url(connection: Any) -> str:
    host = (connection.host or "").rstrip("/")
    if not host:
        raise ValueError(f"connection {connection.conn_id}: no host: set it to the Prometheus URL")
    base = host if "://" in host else f"{connection.schema or 'http'}://{host}"
    if connection.port and not re.search(r":\d+$", base.split("://", 1)[1].split("/", 1)[0]):
        scheme, rest = base.split("://", 1)
        netloc, _, path = rest.partition("/")
        base = f"{scheme}://{netloc}:{connection.port}" + (f"/{path}" if path else "")
    return base


def prometheus_source(connection: Any, timeout: float = 10) -> PrometheusSource:
    extras = connection.extra_dejson or {}
    headers = extras.get("headers") or {}
    if isinstance(headers, str):  # a JSON object typed into a text field, or set from the CLI as a string
        try:
            headers = json.loads(headers)
        except ValueError as exc:
            raise ValueError(f"connection {connection.conn_id}: extra headers: not JSON ({exc})") from None
    if not isinstance(headers, dict):
        raise ValueError(f"connection {connection.conn_id}: extra headers: a JSON object, got {type(headers).__name__}")
    headers = {str(k): str(v) for k, v in headers.items()}
    if connection.login:
        token = base64.b64encode(f"{connection.login}:{connection.password or ''}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return PrometheusSource(prometheus_url(connection), headers=headers or None, timeout=timeout,
                            cluster=extras.get("cluster"), verify=tls_verify(connection))


def tls_verify(connection: Any) -> bool | str:
    """requests' `verify` from the extras: False, True (the system's CAs) or the path of the CA bundle to trust."""
    extras = connection.extra_dejson or {}
    verify = _boolean(connection.conn_id, "verify", extras.get("verify"), default=True)
    bundle = extras.get("ca_bundle")
    if bundle is None or bundle == "":  # an empty form field
        return verify
    where = f"connection {connection.conn_id}: extra ca_bundle"
    if not isinstance(bundle, str):
        raise ValueError(f"{where}: a file path, got {type(bundle).__name__}")
    if not verify:
        raise ValueError(f"{where}: {bundle} is set but verify is false: a CA bundle is for verifying "
                         "(set verify true, or remove ca_bundle)")
    if not Path(bundle).exists():
        raise ValueError(f"{where}: {bundle} does not exist on this host (it must, wherever the queries run)")
    return bundle


def _boolean(conn_id: str, name: str, value: Any, default: bool) -> bool:
    """A boolean extra: JSON true/false, or the text "true"/"false" (a connection URI's query carries only text)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"connection {conn_id}: extra {name}: true or false, got {value!r}")
