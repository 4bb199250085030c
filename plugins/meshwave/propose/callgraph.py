"""Who calls whom, from telemetry that exists before any sidecar does.

- The OpenTelemetry Collector's servicegraph connector (or Tempo's metrics-generator: the same series):
  `traces_service_graph_request_total{client, server, connection_type, failed}` with the dimensions
  `service.namespace` and `k8s.cluster.name` as `client_/server_service_namespace` and `..._k8s_cluster_name`.
  A caller that is not traced is the connector's `user` virtual node; a callee that is not traced is named by the
  client's peer attribute (peer.service), without namespace: resolved as DNS resolves a short Service name (the
  client's namespace first), then by a name unique in the cluster.
- Istio's `istio_requests_total` / `istio_tcp_*` (reporter destination) where proxies already run: a caller with a
  sidecar is named; `source_workload="unknown"` is a caller without one, used only for a callee the traces show no
  caller of (it is most likely one of them, not yet meshed).
The rate of an edge seen by both is the larger of the two.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Protocol

from meshwave.prometheus import Sample
from meshwave.propose.models import CallGraph, Edge, Inventory

USER = "user"
SG_BY = ("cluster, client, server, connection_type, client_service_namespace, client_k8s_cluster_name, "
         "server_service_namespace, server_k8s_cluster_name")
SERVICE_GRAPH = "sum by ({by}) (increase(traces_service_graph_{metric}_total[{w}]))"
ISTIO_BY = ("cluster, source_workload, source_workload_namespace, source_cluster, destination_workload, "
            "destination_workload_namespace, destination_cluster")
ISTIO = 'sum by ({by}) (increase({metric}{{reporter="destination"}}[{w}]))'
APP = "sum by (cluster, namespace, app) (increase(http_requests_total[{w}]))"
WORKING_SET = ('max by (cluster, namespace, pod) (max_over_time(container_memory_working_set_bytes{{container!="", '
               'container!="istio-proxy", container!="POD"}}[{w}]))')


class Source(Protocol):
    def instant(self, query: str, at: float | None = None) -> list[Sample]: ...


def read_graph(sources: dict[str, Source], inventory: Inventory, lookback: str, seconds: float) -> CallGraph:
    """`sources`: cluster -> its Prometheus (clusters may share one: each is asked once, its series split by the
    `cluster` label)."""
    samples = _query_all(sources, lookback)
    names = _Names(inventory)
    edges: dict[tuple[str, str, str], dict] = {}
    for s in samples["sg"]:
        _add(edges, names.service_graph(s), s.value / seconds, "servicegraph")
    for s in samples["sg_failed"]:
        key = names.service_graph(s)
        if key is not None and key in edges:
            edges[key]["failed_rate"] += s.value / seconds
    traced_servers = {k[1] for k in edges}
    for metric, protocol in (("istio_requests_total", "http"), ("istio_tcp_connections_opened_total", "tcp"),
                             ("istio_tcp_received_bytes_total", "tcp")):
        for s in samples[metric]:
            key = names.istio(s, protocol, traced_servers)
            if key is not None and key not in _seen_tcp(edges, key, metric):
                _add(edges, key, s.value / seconds, "istio")
    app_rates: dict[str, float] = defaultdict(float)
    for s in samples["app"]:
        app_rates[f"{s.labels.get('cluster', '')}/{s.labels.get('namespace', '')}/{s.labels.get('app', '')}"] += \
            s.value / seconds
    return CallGraph(edges=[Edge(client=c, server=sv, protocol=p, rate=round(v["rate"], 6),
                                 failed_rate=round(v["failed_rate"], 6), sources=sorted(v["sources"]))
                            for (c, sv, p), v in sorted(edges.items()) if v["rate"] > 0],
                     app_rates={k: round(v, 6) for k, v in sorted(app_rates.items())}, lookback_seconds=seconds,
                     notes=names.notes)


def working_sets(sources: dict[str, Source], lookback: str) -> dict[tuple[str, str, str], float]:
    """(cluster, namespace, pod) -> the largest app-container working set over the lookback, MiB."""
    found = {}
    for cluster, source in _distinct(sources):
        for s in source.instant(WORKING_SET.format(w=lookback)):
            c = s.labels.get("cluster") or cluster
            found[(c, s.labels.get("namespace", ""), s.labels.get("pod", ""))] = s.value / 2**20
    return found


def _query_all(sources: dict[str, Source], lookback: str) -> dict[str, list[Sample]]:
    queries = {"sg": SERVICE_GRAPH.format(by=SG_BY, metric="request", w=lookback),
               "sg_failed": SERVICE_GRAPH.format(by=SG_BY, metric="request_failed", w=lookback),
               "app": APP.format(w=lookback)}
    for metric in ("istio_requests_total", "istio_tcp_connections_opened_total", "istio_tcp_received_bytes_total"):
        queries[metric] = ISTIO.format(by=ISTIO_BY, metric=metric, w=lookback)
    found: dict[str, list[Sample]] = {name: [] for name in queries}
    # One evaluation time for every query: the same scrapes under every increase(), so a service's own request count
    # and what its callers sent it compare exactly (apart, they differ by up to a scrape interval's worth).
    at = time.time()
    for cluster, source in _distinct(sources):
        clusters = {c for c, s in sources.items() if s is source}
        for name, query in queries.items():
            for s in source.instant(query, at=at):
                labels = dict(s.labels)
                labels.setdefault("cluster", cluster)  # a Prometheus of one cluster may not add the label
                if labels["cluster"] in clusters:
                    found[name].append(Sample(labels, s.value, s.timestamp))
    return found


def _distinct(sources: dict[str, Source]) -> Iterable[tuple[str, Source]]:
    seen: set[int] = set()
    for cluster in sorted(sources):
        if id(sources[cluster]) not in seen:
            seen.add(id(sources[cluster]))
            yield cluster, sources[cluster]


def _add(edges: dict, key: tuple[str, str, str] | None, rate: float, source: str) -> None:
    if key is None or rate <= 0:
        return
    entry = edges.setdefault(key, {"rate": 0.0, "failed_rate": 0.0, "sources": set(), "by": {}})
    entry["by"][source] = entry["by"].get(source, 0.0) + rate
    entry["rate"] = max(entry["by"].values())  # the same calls seen twice: the larger count, not the sum
    entry["sources"].add(source)


def _seen_tcp(edges: dict, key: tuple[str, str, str], metric: str) -> set:
    """Bytes only prove a long-lived connection: an edge whose connections were counted needs no bytes entry."""
    return set(edges) if metric == "istio_tcp_received_bytes_total" else set()


class _Names:
    """Telemetry names to inventory keys."""

    def __init__(self, inventory: Inventory) -> None:
        self.keys = {w.key for w in inventory.workloads}
        self.by_name: dict[tuple[str, str], list[str]] = defaultdict(list)  # (cluster, name) -> keys
        for w in inventory.workloads:
            self.by_name[(w.cluster, w.name)].append(w.key)
        self.notes: list[str] = []

    def key(self, cluster: str, namespace: str, name: str) -> str | None:
        key = f"{cluster}/{namespace}/{name}"
        return key if key in self.keys else None

    def short(self, cluster: str, namespace: str, name: str) -> str:
        """A name without namespace (a peer.service): the caller's namespace first, then unique in the cluster."""
        if (key := self.key(cluster, namespace, name)) is not None:
            return key
        found = self.by_name.get((cluster, name), [])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            self.notes.append(f"{cluster}: the callee {name!r} matches {', '.join(found)}: left unresolved")
        return name

    def service_graph(self, s: Sample) -> tuple[str, str, str] | None:
        labels = s.labels
        kind = labels.get("connection_type", "")
        client = self._side(labels, "client") or labels.get("client", "")
        server = self._side(labels, "server")
        if server is None:  # a virtual or database node: the peer name, resolved from the client's place
            c_cluster, c_ns = labels.get("client_k8s_cluster_name") or labels.get("cluster", ""), \
                labels.get("client_service_namespace", "")
            server = self.short(c_cluster, c_ns, labels.get("server", ""))
        return client, server, "tcp" if kind == "database" else "http"

    def _side(self, labels: dict[str, str], side: str) -> str | None:
        cluster, ns = labels.get(f"{side}_k8s_cluster_name", ""), labels.get(f"{side}_service_namespace", "")
        if not ns:
            return None
        return self.key(cluster or labels.get("cluster", ""), ns, labels.get(side, "")) or \
            f"{cluster or labels.get('cluster', '')}/{ns}/{labels.get(side, '')}"

    def istio(self, s: Sample, protocol: str, traced_servers: set[str]) -> tuple[str, str, str] | None:
        labels = s.labels
        cluster = labels.get("destination_cluster") or labels.get("cluster", "")
        server = self.key(cluster, labels.get("destination_workload_namespace", ""),
                          labels.get("destination_workload", ""))
        if server is None:
            return None
        source = labels.get("source_workload", "unknown")
        if source == "unknown":  # no sidecar on the caller: trust the traces when they name callers of it
            return None if server in traced_servers else ("unknown", server, protocol)
        client = self.key(labels.get("source_cluster") or cluster, labels.get("source_workload_namespace", ""),
                          source) or f"{labels.get('source_cluster') or cluster}/" \
                                      f"{labels.get('source_workload_namespace', '')}/{source}"
        return client, server, protocol
