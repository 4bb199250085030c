"""`meshwave plan propose --conn CLUSTER=KUBERNETES_CONN_ID,PROMETHEUS_CONN_ID`: the clusters reached through the
Airflow connections the plan's DAGs will use, with the clients the DAG tasks build (meshwave.connections).

Airflow loads only when --conn is given (a few seconds of imports that --kubeconfig does without)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshwave.propose.command import CONN_FORM, PROMETHEUS_TIMEOUT, ProposeError, pairs, probe

if TYPE_CHECKING:
    from meshwave.kube import MeshKube
    from meshwave.prometheus import PrometheusSource


def connect_airflow(values: list[str]) -> tuple[dict[str, MeshKube], dict[str, PrometheusSource],
                                                 dict[str, tuple[str, str]]]:
    """Each cluster's MeshKube and Prometheus source, and its (Kubernetes, Prometheus) connection ids; a ProposeError
    names the cluster and the connection that is missing or does not answer."""
    ids = {cluster: _ids(cluster, text) for cluster, text in pairs(values, "--conn", CONN_FORM).items()}
    kubes = {cluster: _kube(cluster, kube_id) for cluster, (kube_id, _) in sorted(ids.items())}
    return kubes, _sources({cluster: prom_id for cluster, (_, prom_id) in ids.items()}), ids


def lookup(cluster: str, conn_id: str, what: str) -> Any:
    """A connection as `airflow connections get` finds it outside a task: the configured secrets backend, then
    AIRFLOW_CONN_<ID>, then the metastore. (The Task SDK's BaseHook.get_connection reads no metastore outside a
    task: without a supervisor it searches the environment and the secrets backend only.)"""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    try:
        return Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        raise ProposeError(f"cluster {cluster}: {what} connection {conn_id} is not defined (searched: the secrets "
                           f"backend, AIRFLOW_CONN_{conn_id.upper()}, the metastore)") from None
    except Exception as exc:  # a secrets backend that refuses it
        raise ProposeError(f"cluster {cluster}: {what} connection {conn_id}: {type(exc).__name__}: {exc}") from None


def _ids(cluster: str, text: str) -> tuple[str, str]:
    kube_id, sep, prom_id = (part.strip() for part in text.partition(","))
    if not sep or not kube_id or not prom_id or "," in prom_id:
        raise ProposeError(f"--conn {cluster}={text}: expected {CONN_FORM}")
    return kube_id, prom_id


def _kube(cluster: str, conn_id: str) -> MeshKube:
    """The DAG tasks' client on that connection, asked for its version: an unreachable cluster fails first."""
    from meshwave.connections import mesh_kube
    from meshwave.kube_errors import KubeError

    connection = lookup(cluster, conn_id, "Kubernetes")
    try:
        kube = mesh_kube(connection, cluster)
        kube.ping()
    except KubeError as exc:
        raise ProposeError(f"cluster {cluster} (connection {conn_id}): {exc}") from None
    except Exception as exc:  # a connection the provider's hook cannot use (no kubeconfig, a broken one)
        raise ProposeError(f"cluster {cluster}: connection {conn_id}: {type(exc).__name__}: {exc}") from None
    return kube


def _sources(prom_ids: dict[str, str]) -> dict[str, PrometheusSource]:
    """One source per Prometheus: clusters whose connections reach the same one (same URL and headers) share it, so
    each query runs once and its series are split by their `cluster` label, as with one --prometheus URL."""
    built = {cluster: _source(cluster, conn_id) for cluster, conn_id in sorted(prom_ids.items())}
    _one_cluster_per_prometheus(built, prom_ids)
    shared: dict[tuple[str, str], PrometheusSource] = {}
    found = {}
    for cluster, (_, source) in built.items():
        if source.identity not in shared:
            users = [c for c, (_, s) in built.items() if s.identity == source.identity]
            what = f"Prometheus for {', '.join(users)} (connection {', '.join(prom_ids[c] for c in users)})"
            shared[source.identity] = probe(source, what)
        found[cluster] = shared[source.identity]
    return found


def _source(cluster: str, conn_id: str) -> tuple[Any, PrometheusSource]:
    from meshwave.connections import prometheus_source

    connection = lookup(cluster, conn_id, "Prometheus")
    scope = (connection.extra_dejson or {}).get("cluster")
    if scope is not None and scope != cluster:
        # The DAGs' checks read the series labelled cluster=<extra>; the proposer keys what it reads by the name
        # given here: they must be the same, or the plan would be read from one cluster and checked on another.
        raise ProposeError(f"cluster {cluster}: Prometheus connection {conn_id} has the extra cluster {scope!r}: "
                           f"give the cluster as {scope} in --conn, or set the extra to {cluster!r}")
    try:
        return connection, prometheus_source(connection, timeout=PROMETHEUS_TIMEOUT)
    except ValueError as exc:  # no host, a cluster extra that is no label value
        raise ProposeError(f"cluster {cluster}: {exc}") from None


def _one_cluster_per_prometheus(built: dict[str, tuple[Any, PrometheusSource]], prom_ids: dict[str, str]) -> None:
    """The DAGs refuse a Prometheus shared by clusters whose connections do not all set the `cluster` extra (a
    check would sum the same-named workloads of all of them): a plan on such connections would fail its first run."""
    from meshwave.prometheus import shared_without_cluster

    refused = shared_without_cluster({c: (s.url, (conn.extra_dejson or {}).get("cluster"))
                                      for c, (conn, s) in built.items()})
    if refused:
        raise ProposeError(f"clusters {', '.join(refused)} read one Prometheus (connections "
                           f"{', '.join(prom_ids[c] for c in refused)}) but not every connection sets the extra "
                           '{"cluster": "<name>"}: the plan\'s checks would refuse them; set it on each')
