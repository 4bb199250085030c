"""Telemetry in the names and labels Prometheus sees on a real cluster.

- the application's own metrics (exist before and after injection): `http_requests_total`,
  `http_request_duration_seconds`, per pod (the `pod` label Prometheus' pod scraping adds): each ready pod serves
  its share, what passed the server's proxies evenly over the proxied pods, the rest over the unproxied ones; a
  deleted pod's series go with it;
- Istio standard metrics, only where a proxy handled the traffic: `istio_requests_total`,
  `istio_request_duration_milliseconds`, `istio_tcp_connections_opened_total` / `_closed_total`,
  `istio_tcp_received_bytes_total` / `istio_tcp_sent_bytes_total` (bytes from / to the downstream caller, both
  reporters, while a connection is open: a long-lived one keeps counting bytes and opens nothing new);
  a request the server's proxy failed itself (`proxy_drop`) is a 503 with response flag UF at the destination;
  `destination_workload` is the Deployment owning the pod that served the request (split by the proxied pods'
  owners for what went into server proxies, by the unproxied pods' owners for the rest); the Service is
  `destination_service`;
- the OpenTelemetry Collector's `servicegraph` connector (Grafana Tempo's service graph processor, ported), which
  sees every call between traced services, sidecar or not: `traces_service_graph_request_total`,
  `traces_service_graph_request_failed_total` and the histograms `traces_service_graph_request_server_seconds` /
  `_client_seconds` (see `ServiceGraph`);
- cAdvisor `container_memory_working_set_bytes`; kube-state-metrics pod restarts, termination and
  waiting reasons, readiness, deployment replicas, and the owner series that join a pod to its Deployment
  (`kube_pod_owner`, `kube_replicaset_owner`, from the objects' ownerReferences as kube-state-metrics reads them).

Counters grow by rate x elapsed time every tick, so a 10-30 s `rate()` window has data. Latencies are
spread log-normally around the simulated value so `histogram_quantile` gives a believable p50/p99.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import Metric

from meshlab import resources as r
from meshlab.injection import parse_quantity
from meshlab.mesh import EdgeFlow, Endpoint, Flows, Owners, Workload, WorkloadFlow, WorkloadKey
from meshlab.textformat import COUNTER, GAUGE, HISTOGRAM, Family

NONE = "<none>"  # kube-state-metrics' owner labels of an object without ownerReferences
POD_OWNER_LABELS = ("cluster", "namespace", "pod", "uid", "owner_kind", "owner_name", "owner_is_controller")
RS_OWNER_LABELS = ("cluster", "namespace", "replicaset", "owner_kind", "owner_name", "owner_is_controller")

ISTIO_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
APP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIGMA = 0.35  # log-normal spread: p99 is about 2.3 x the median

ISTIO_LABELS = (
    "cluster", "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_cluster", "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_cluster", "request_protocol", "response_code", "response_flags", "connection_security_policy",
)
TCP_LABELS = tuple(label for label in ISTIO_LABELS if label not in ("request_protocol", "response_code"))
APP_LABEL = "app"  # the label the application's metrics name it by, unless its service says otherwise
DROPPED = "UF"  # Envoy's upstream connection failure: the server proxy could not reach the app


@functools.lru_cache(maxsize=4096)  # a tick asks it per edge and pod, for latencies that rarely change
def _cdf(bounds: tuple[float, ...], median: float) -> tuple[float, ...]:
    """Fraction of observations at or below each bound, for a log-normal with this median."""
    if median <= 0:
        return (1.0,) * len(bounds)
    return tuple(0.5 * (1 + math.erf(math.log(b / median) / (SIGMA * math.sqrt(2)))) for b in bounds)


class Histogram:
    __slots__ = ("buckets", "sum", "count")

    def __init__(self, n: int) -> None:
        self.buckets = [0.0] * n
        self.sum = 0.0
        self.count = 0.0

    def observe(self, bounds: tuple[float, ...], cdf: tuple[float, ...], amount: float, value: float) -> None:
        self.buckets = [total + amount * fraction for total, fraction in zip(self.buckets, cdf, strict=True)]
        self.count += amount
        self.sum += amount * value * math.exp(SIGMA**2 / 2)  # mean of the log-normal


def _principal(w: Workload) -> str:
    return f"spiffe://cluster.local/ns/{w.key[1]}/sa/{w.key[2]}"


class Telemetry:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], float] = defaultdict(float)
        self.durations: dict[tuple[str, ...], Histogram] = {}
        self.tcp_opened: dict[tuple[str, ...], float] = defaultdict(float)
        self.tcp_closed: dict[tuple[str, ...], float] = defaultdict(float)
        self.tcp_received: dict[tuple[str, ...], float] = defaultdict(float)
        self.tcp_sent: dict[tuple[str, ...], float] = defaultdict(float)
        # keyed (cluster, namespace, the app's label name, app, pod[, code]): an app may name itself by another label
        self.app_requests: dict[tuple[str, ...], float] = defaultdict(float)
        self.app_durations: dict[tuple[str, ...], Histogram] = {}
        self._pod_series: dict[tuple[str, str, str], set[tuple[str, ...]]] = {}  # (cluster, ns, pod) -> app keys
        self.service_graph = ServiceGraph()

    # ---- accumulation, once per tick -----------------------------------------------------------
    def advance(self, flows: Flows, dt: float) -> None:
        for key, f in flows.workloads.items():
            if f.reached > 0 and key not in flows.gateways:
                self._app(key, f, flows.app_labels.get(key, APP_LABEL), flows.endpoints.get(key, ()), dt)
        for edge in flows.edges:
            self._edge(edge, flows, dt)
            self.service_graph.edge(edge, flows.workloads[edge.dest.key], dt)

    def _app(self, key: WorkloadKey, f: WorkloadFlow, label: str, endpoints: tuple[Endpoint, ...],
             dt: float) -> None:
        """The application's own metrics, each ready pod's by its share of what reached the app."""
        cluster, ns, app = key
        fail = 1 - f.ok
        codes = [(code, share) for code, share in (("200", f.ok), ("500", min(f.own_error, fail)),
                                                   ("503", max(0.0, fail - f.own_error))) if share > 1e-12]
        seconds = f.latency_ms / 1000
        cdf = _cdf(APP_BUCKETS_S, seconds)
        for pod, rate in _pod_rates(f, endpoints):
            named = (cluster, ns, label, app, pod)
            amount = rate * dt
            for code, share in codes:
                self.app_requests[(*named, code)] += amount * share
            hist = self.app_durations.get(named)
            if hist is None:
                hist = self.app_durations[named] = Histogram(len(APP_BUCKETS_S))
                self._pod_series.setdefault((cluster, ns, pod), set()).add(named)
            hist.observe(APP_BUCKETS_S, cdf, amount, seconds)

    def forget_pod(self, cluster: str, namespace: str, pod: str) -> None:
        """A deleted pod's application series: no longer scraped, so no longer exposed."""
        for named in self._pod_series.pop((cluster, namespace, pod), ()):
            self.app_durations.pop(named, None)
            for code in ("200", "500", "503"):
                self.app_requests.pop((*named, code), None)

    def _edge(self, e: EdgeFlow, flows: Flows, dt: float) -> None:
        dest_flow = flows.workloads[e.dest.key]
        server_latency = dest_flow.latency_ms + e.dest.sidecar_latency_ms
        # Istio names the pod's owner: what went into a server proxy was served by a proxied pod, the rest by the
        # pods without one (or, on a port no proxy captures, by any); no ready pod at all leaves the service's name.
        proxied, direct = e.dest.proxy_owners, e.dest.direct_owners(e.port)
        if e.mtls:
            self._report("destination", e, e.source, e.mtls, "mutual_tls", dest_flow.ok, server_latency, dt, proxied)
            self._report("source", e, e.source, e.mtls, "unknown", dest_flow.ok, e.latency_ms, dt, proxied)
        if e.plaintext:
            self._report("destination", e, None, e.plaintext, "none", dest_flow.ok, server_latency, dt, proxied)
        if e.to_unproxied * e.client_proxied:
            self._report("source", e, e.source, e.to_unproxied * e.client_proxied, "unknown", dest_flow.ok,
                         e.latency_ms, dt, direct)
        if e.unavailable * e.client_proxied:
            self._report("source", e, e.source, e.unavailable * e.client_proxied, "unknown", 0.0, 1.0, dt, direct,
                         flags="UH")
        # Failed by the server's proxy: it answers 503 UF itself, the caller's proxy relays the 503 it received.
        failed_latency = 2 * e.dest.sidecar_latency_ms
        if e.dropped_mtls:
            self._report("destination", e, e.source, e.dropped_mtls, "mutual_tls", 0.0, failed_latency, dt, proxied,
                         DROPPED)
            self._report("source", e, e.source, e.dropped_mtls, "unknown", 0.0, failed_latency, dt, proxied,
                         upstream_failed=True)
        if e.dropped_plaintext:
            self._report("destination", e, None, e.dropped_plaintext, "none", 0.0, failed_latency, dt, proxied,
                         DROPPED)
        if e.protocol == "tcp" and (e.bytes_per_second or e.response_bytes_per_second):
            self._bytes(e, dt)

    def _bytes(self, e: EdgeFlow, dt: float) -> None:
        """Bytes of the edge's open connection(s), split like its connections; one that no request rate opens is a
        long-lived connection: opened once (its first byte), never closed."""
        shares = e.shares()
        proxied, direct = e.dest.proxy_owners, e.dest.direct_owners(e.port)
        reports = (("destination", e.source, shares.mtls, "mutual_tls", proxied),
                   ("source", e.source, shares.mtls, "unknown", proxied),
                   ("destination", None, shares.plaintext, "none", proxied),
                   ("source", e.source, shares.source_only, "unknown", direct))
        for reporter, source, share, security, owners in reports:
            if share <= 1e-12 or (reporter == "source" and e.source is None):
                continue
            for owner, part in owners:
                labels = (*self._base(reporter, e, source, security, owner), "-", security)
                self.tcp_received[labels] += e.bytes_per_second * share * part * dt
                self.tcp_sent[labels] += e.response_bytes_per_second * share * part * dt
                if e.offered <= 0 and labels not in self.tcp_opened:
                    self.tcp_opened[labels] = 1.0

    def _base(self, reporter: str, e: EdgeFlow, source: Workload | None, security: str,
              dest_workload: str) -> tuple[str, ...]:
        """The Istio labels up to destination_cluster, as `reporter` writes them; `dest_workload` is the Deployment
        that owns the serving pod (destination_app and the service stay the Service's)."""
        dest = e.dest
        cluster = dest.key[0] if reporter == "destination" else (source.key[0] if source else dest.key[0])
        src_name, src_ns, src_principal, src_cluster = ("unknown",) * 4
        if source is not None and (reporter == "source" or security == "mutual_tls"):
            src_name, src_ns, src_principal, src_cluster = (source.key[2], source.key[1], _principal(source),
                                                            source.key[0])
        dest_host = f"{dest.key[2]}.{dest.key[1]}.svc.cluster.local"
        return (cluster, reporter, src_name, src_ns, src_principal, src_name, src_cluster, dest_workload, dest.key[1],
                _principal(dest), dest.key[2], dest_host, dest.key[2], dest.key[1], dest.key[0])

    def _report(self, reporter: str, e: EdgeFlow, source: Workload | None, rate: float, security: str,
                ok: float, latency_ms: float, dt: float, owners: Owners, flags: str = "-",
                upstream_failed: bool = False) -> None:
        """`owners`: the Deployments whose pods served it, with their shares. `flags`: what this proxy itself did to
        the request ("-": nothing). `upstream_failed`: the 503 came from the next proxy (a relayed answer carries no
        flag of this proxy's)."""
        for owner, part in owners:
            amount = rate * part * dt
            base = self._base(reporter, e, source, security, owner)
            if e.protocol == "tcp":
                self.tcp_opened[(*base, flags, security)] += amount
                self.tcp_closed[(*base, flags, security)] += amount  # short connections: closed as they open
            else:
                self._requests(base, e, ok, latency_ms, amount, flags, upstream_failed, security)

    def _requests(self, base: tuple[str, ...], e: EdgeFlow, ok: float, latency_ms: float, amount: float, flags: str,
                  upstream_failed: bool, security: str) -> None:
        own = 0.0 if flags != "-" or upstream_failed else min(e.dest.service.error_rate, 1 - ok)
        for code, share in (("200", ok), ("500", own), ("503", max(0.0, 1 - ok - own))):
            if share <= 1e-12:
                continue
            labels = (*base, "http", code, flags if code == "503" else "-", security)
            self.requests[labels] += amount * share
            hist = self.durations.get(labels)
            if hist is None:
                hist = self.durations[labels] = Histogram(len(ISTIO_BUCKETS_MS))
            hist.observe(ISTIO_BUCKETS_MS, _cdf(ISTIO_BUCKETS_MS, latency_ms), amount * share, latency_ms)

    # ---- exposition ----------------------------------------------------------------------------
    def exposed(self, clusters: Iterable[tuple[str, Any, Any]]) -> Iterator[Family]:
        """Every family the lab exposes, its series read off the counters as they are now (the `/metrics` body)."""
        yield from self._istio_families()
        yield from self._app_families()
        yield from self.service_graph.families()
        sources = list(clusters)  # read twice: the pods' own series, then their owners
        yield from _cluster_families(sources)
        yield from _owner_families(sources)

    def families(self, clusters: Iterable[tuple[str, Any, Any]]) -> Iterator[Metric]:
        """The same families as prometheus_client's (generate_latest's input; the tests read samples off them)."""
        for family in self.exposed(clusters):
            yield family.metric()

    def _istio_families(self) -> Iterator[Family]:
        yield Family("istio_requests", COUNTER, "Requests handled by Istio proxies.", ISTIO_LABELS,
                     self.requests.items())
        yield Family("istio_request_duration_milliseconds", HISTOGRAM, "Request duration seen by proxies.",
                     ISTIO_LABELS, self.durations.items(), ISTIO_LE)
        for name, doc, values in (("istio_tcp_connections_opened", "TCP connections opened.", self.tcp_opened),
                                  ("istio_tcp_connections_closed", "TCP connections closed.", self.tcp_closed),
                                  ("istio_tcp_received_bytes", "Bytes received from the downstream (the caller).",
                                   self.tcp_received),
                                  ("istio_tcp_sent_bytes", "Bytes sent to the downstream (the caller).",
                                   self.tcp_sent)):
            yield Family(name, COUNTER, doc, TCP_LABELS, values.items())

    def _app_families(self) -> Iterator[Family]:
        """One family per metric for every app: each names itself by its own label (others' are empty, which
        Prometheus stores as absent)."""
        names = sorted({key[2] for key in self.app_requests} | {APP_LABEL})
        yield Family("http_requests", COUNTER, "Requests served, by the application itself.",
                     ("cluster", "namespace", *names, "pod", "code"),
                     (((cluster, ns, *_named(names, label, app), pod, code), value)
                      for (cluster, ns, label, app, pod, code), value in self.app_requests.items()))
        yield Family("http_request_duration_seconds", HISTOGRAM, "Request duration, by the application.",
                     ("cluster", "namespace", *names, "pod"),
                     (((cluster, ns, *_named(names, label, app), pod), h)
                      for (cluster, ns, label, app, pod), h in self.app_durations.items()), APP_LE)


def _pod_rates(f: WorkloadFlow, endpoints: tuple[Endpoint, ...]) -> list[tuple[str, float]]:
    """Each ready pod's requests per second, as kube-proxy and Envoy spread a Service's traffic (evenly per endpoint):
    what passed the server's proxies over the proxied pods, what went past them over the unproxied ones, what a port
    no proxy captures carried over all. A caller outside Kubernetes has no pod: one series without it."""
    if not endpoints:
        return [("", f.reached)]
    every = [e.pod for e in endpoints]
    proxied = [e.pod for e in endpoints if e.proxied]
    direct = [e.pod for e in endpoints if not e.proxied]
    rates = dict.fromkeys(every, 0.0)
    for pods, rate in ((proxied or every, f.proxied), (direct or every, f.reached - f.proxied - f.bypassed),
                       (every, f.bypassed)):
        if rate > 1e-12:
            for pod in pods:
                rates[pod] += rate / len(pods)
    return [(pod, rate) for pod, rate in rates.items() if rate > 0]


def _named(names: list[str], label: str, app: str) -> list[str]:
    return [app if name == label else "" for name in names]


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


ISTIO_LE = tuple(_le(b) for b in ISTIO_BUCKETS_MS)  # the buckets' `le` values, as exposed
APP_LE = tuple(_le(b) for b in APP_BUCKETS_S)


CONTAINER_LABELS = ("cluster", "namespace", "pod", "container")
DEPLOYMENT_METRICS = ("spec_replicas", "status_replicas", "status_replicas_available", "status_replicas_updated",
                      "status_replicas_unavailable")
Series = list[tuple[tuple[str, ...], float]]  # (label values, value) of a family's series


def _cluster_families(clusters: Iterable[tuple[str, Any, Any]]) -> Iterator[Family]:
    """cAdvisor and kube-state-metrics series, read off each cluster's pods and deployments."""
    memory: Series = []
    restarts: Series = []
    terminated: Series = []
    waiting: Series = []
    ready: Series = []
    limits: Series = []
    deployments: dict[str, Series] = {name: [] for name in DEPLOYMENT_METRICS}
    for cluster, store, memory_of in clusters:
        for pod in store.items(r.PODS):
            meta = pod["metadata"]
            ns, name = meta["namespace"], meta["name"]
            usage = memory_of(pod)
            specs = {c["name"]: c for c in pod["spec"].get("containers", [])}
            for st in pod.get("status", {}).get("containerStatuses", []):
                c = st["name"]
                labels = (cluster, ns, name, c)
                restarts.append((labels, st.get("restartCount", 0)))
                ready.append((labels, 1.0 if st.get("ready") else 0.0))
                if "running" in st.get("state", {}):
                    memory.append((labels, usage.get(c, 0.0)))
                if reason := st.get("lastState", {}).get("terminated", {}).get("reason"):
                    terminated.append(((*labels, reason), 1.0))
                if reason := st.get("state", {}).get("waiting", {}).get("reason"):
                    waiting.append(((*labels, reason), 1.0))
                limit = parse_quantity(((specs.get(c, {}).get("resources") or {}).get("limits") or {}).get("memory"))
                if limit is not None:
                    limits.append(((*labels, "memory", "byte"), limit))
        for dep in store.items(r.DEPLOYMENTS):
            labels = (cluster, dep["metadata"]["namespace"], dep["metadata"]["name"])
            st = dep.get("status", {})
            deployments["spec_replicas"].append((labels, dep["spec"].get("replicas", 1)))
            deployments["status_replicas"].append((labels, st.get("replicas", 0)))
            deployments["status_replicas_available"].append((labels, st.get("availableReplicas", 0)))
            deployments["status_replicas_updated"].append((labels, st.get("updatedReplicas", 0)))
            deployments["status_replicas_unavailable"].append((labels, st.get("unavailableReplicas", 0)))
    yield Family("container_memory_working_set_bytes", GAUGE, "Working set (cAdvisor).", CONTAINER_LABELS, memory)
    yield Family("kube_pod_container_status_restarts", COUNTER, "Container restarts (kube-state-metrics).",
                 CONTAINER_LABELS, restarts)
    yield Family("kube_pod_container_status_last_terminated_reason", GAUGE,
                 "Last termination reason (kube-state-metrics).", (*CONTAINER_LABELS, "reason"), terminated)
    yield Family("kube_pod_container_status_waiting_reason", GAUGE, "Waiting reason (kube-state-metrics).",
                 (*CONTAINER_LABELS, "reason"), waiting)
    yield Family("kube_pod_container_status_ready", GAUGE, "Container readiness (kube-state-metrics).",
                 CONTAINER_LABELS, ready)
    yield Family("kube_pod_container_resource_limits", GAUGE, "Container limits (kube-state-metrics).",
                 (*CONTAINER_LABELS, "resource", "unit"), limits)
    for name, series in deployments.items():
        yield Family(f"kube_deployment_{name}", GAUGE, f"Deployment {name} (kube-state-metrics).",
                     ("cluster", "namespace", "deployment"), series)


def _owner_values(obj: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(owner_kind, owner_name, owner_is_controller) per ownerReference, as kube-state-metrics writes them: one
    series per owner, "false" for a reference without `controller`, one "<none>" series without any owner."""
    refs = obj["metadata"].get("ownerReferences") or []
    if not refs:
        return [(NONE, NONE, NONE)]
    return [(ref.get("kind", ""), ref.get("name", ""), "true" if ref.get("controller") else "false") for ref in refs]


def _replicasets(store: Any) -> Iterator[tuple[str, str, list[tuple[str, str, str]]]]:
    """(namespace, ReplicaSet, owners) of every ReplicaSet. The store's own ReplicaSets when it keeps them; a store
    without them (older labs) has them derived from its pods' references, named `<deployment>-<hash>`: the
    Deployment is the name without its last segment. That rule lives in the lab only, never in meshwave's queries."""
    resource = getattr(r, "REPLICA_SETS", None)
    if resource is not None:
        for rs in store.items(resource):
            yield rs["metadata"]["namespace"], rs["metadata"]["name"], _owner_values(rs)
        return
    seen = set()
    for pod in store.items(r.PODS):
        ns = pod["metadata"]["namespace"]
        for kind, name, _ in _owner_values(pod):
            if kind == "ReplicaSet" and (ns, name) not in seen:
                seen.add((ns, name))
                yield ns, name, [("Deployment", name.rsplit("-", 1)[0], "true")]


def _owner_families(clusters: Iterable[tuple[str, Any, Any]]) -> Iterator[Family]:
    pod_owner: Series = []
    rs_owner: Series = []
    for cluster, store, _ in clusters:
        for pod in store.items(r.PODS):
            meta = pod["metadata"]
            for owner in _owner_values(pod):
                pod_owner.append(((cluster, meta["namespace"], meta["name"], meta.get("uid", ""), *owner), 1.0))
        for ns, name, owners in _replicasets(store):
            for owner in owners:
                rs_owner.append(((cluster, ns, name, *owner), 1.0))
    yield Family("kube_pod_owner", GAUGE, "Information about the Pod's owner.", POD_OWNER_LABELS, pod_owner)
    yield Family("kube_replicaset_owner", GAUGE, "Information about the ReplicaSet's owner.", RS_OWNER_LABELS, rs_owner)


# ---- the OpenTelemetry Collector's servicegraph connector ----------------------------------------------------
# As open-telemetry/opentelemetry-collector-contrib connector/servicegraphconnector (connector.go, internal/store)
# emits it, exported to Prometheus (its unit "s" becomes the `_seconds` suffix, the counters get `_total`):
# - an edge is a client span (the caller's) paired with the server span (the callee's) whose parent it is; labels
#   `client`, `server` (each side's service.name), `connection_type` and `failed` (either span had status Error:
#   the connector keys its series by it, so `request_total` has a series per value);
# - a caller that is not traced sends no trace context: the callee's server span is a root span, which never
#   pairs; when it expires the connector records it with client "user" and connection_type "virtual_node";
# - a client span whose callee is not traced (or never answered) expires unpaired too: server is its first peer
#   attribute (virtual_node_peer_attributes: peer.service, db.name, db.system), else "unknown", also
#   "virtual_node". The lab's traced clients set peer.service to the Service they call (a usual SDK setting);
# - a client span with db.name is a database call, complete on its own: connection_type "database", server the
#   database name (the lab: the TCP service called), both latencies the client span's;
# - the configured `dimensions` [service.namespace, k8s.cluster.name] come out as client_/server_-prefixed labels
#   (dots become underscores in Prometheus), from the span of that side only: absent for a virtual node.
# One collector tier for the fleet (the Collector's load-balancing exporter in front, by trace id) pairs spans across
# clusters. Every lab series carries `cluster`: here the server span's cluster, else the client's.
# Not modelled: Envoy's own spans once a sidecar runs (Istio's tracing samples 1% by default), sampling.
SERVICE_GRAPH_BUCKETS_S = (0.002, 0.004, 0.006, 0.008, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1, 1.4, 2, 5, 10, 15)
SERVICE_GRAPH_LABELS = ("cluster", "client", "server", "connection_type", "failed", "client_service_namespace",
                        "client_k8s_cluster_name", "server_service_namespace", "server_k8s_cluster_name")
VIRTUAL_NODE, DATABASE, UNSET_TYPE = "virtual_node", "database", ""
UNTRACED_CLIENT = "user"  # the connector's name for the caller of a root server span
SERVICE_GRAPH_LE = tuple(_le(b) for b in SERVICE_GRAPH_BUCKETS_S)


class ServiceGraph:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], float] = defaultdict(float)
        self.failed: dict[tuple[str, ...], float] = defaultdict(float)
        self.server_seconds: dict[tuple[str, ...], Histogram] = {}
        self.client_seconds: dict[tuple[str, ...], Histogram] = {}

    def edge(self, e: EdgeFlow, dest_flow: Any, dt: float) -> None:
        """One tick of an edge, as the spans of its calls would reach the connector."""
        client = e.source if e.source is not None and e.source.service.is_traced else None
        server = e.dest if e.dest.service.is_traced else None
        if e.protocol == "tcp":  # no HTTP spans: a traced client's database call, complete with its client span
            if client is not None and e.offered > 0:
                failed = (e.offered - e.mtls - e.plaintext - e.to_unproxied) / e.offered
                self._record(client, None, e.dest.key[2], DATABASE, e.offered * dt, failed, e.latency_ms, e.latency_ms)
            return
        delivered = e.mtls + e.plaintext + e.to_unproxied  # requests that reached the application: server spans
        fail = 1 - dest_flow.ok
        if server is not None and delivered > 0:
            name = client.key[2] if client is not None else UNTRACED_CLIENT
            kind = UNSET_TYPE if client is not None else VIRTUAL_NODE
            self._record(client, server, name, kind, delivered * dt, fail, dest_flow.latency_ms,
                         e.latency_ms if client is not None else 0.0)
        elif client is not None and delivered > 0:  # an untraced callee: the client span expires unpaired
            self._record(client, None, e.dest.key[2], VIRTUAL_NODE, delivered * dt, fail, 0.0, e.latency_ms)
        undelivered = e.offered - delivered  # reset, refused or failed by a proxy: no server span, status Error
        if client is not None and undelivered > 1e-12:
            self._record(client, None, e.dest.key[2], VIRTUAL_NODE, undelivered * dt, 1.0, 0.0, e.latency_ms)

    def _record(self, client: Workload | None, server: Workload | None, other: str, kind: str, amount: float,
                failed: float, server_ms: float, client_ms: float) -> None:
        """`other`: the name of the side that has no span (client "user", or the server's peer name)."""
        for is_failed, share in ((False, 1 - failed), (True, failed)):
            if share <= 1e-12:
                continue
            labels = _graph_labels(client, server, other, kind, is_failed)
            self.requests[labels] += amount * share
            if is_failed:
                self.failed[labels] += amount * share
            for store, ms in ((self.server_seconds, server_ms), (self.client_seconds, client_ms)):
                hist = store.get(labels)
                if hist is None:
                    hist = store[labels] = Histogram(len(SERVICE_GRAPH_BUCKETS_S))
                seconds = ms / 1000
                hist.observe(SERVICE_GRAPH_BUCKETS_S, _cdf(SERVICE_GRAPH_BUCKETS_S, seconds), amount * share, seconds)

    def families(self) -> Iterator[Family]:
        for name, doc, values in (
                ("traces_service_graph_request", "Total count of requests between two nodes", self.requests),
                ("traces_service_graph_request_failed", "Total count of failed requests between two nodes",
                 self.failed)):
            yield Family(name, COUNTER, doc, SERVICE_GRAPH_LABELS, values.items())
        for name, doc, hists in (
                ("traces_service_graph_request_server_seconds",
                 "Time for a request between two nodes as seen from the server", self.server_seconds),
                ("traces_service_graph_request_client_seconds",
                 "Time for a request between two nodes as seen from the client", self.client_seconds)):
            yield Family(name, HISTOGRAM, doc, SERVICE_GRAPH_LABELS, hists.items(), SERVICE_GRAPH_LE)


def _graph_labels(client: Workload | None, server: Workload | None, other: str, kind: str,
                  failed: bool) -> tuple[str, ...]:
    client_dims = (client.key[1], client.key[0]) if client is not None else ("", "")
    server_dims = (server.key[1], server.key[0]) if server is not None else ("", "")
    cluster = (server or client).key[0]  # type: ignore[union-attr]  # one side always has a span
    return (cluster, client.key[2] if client is not None else other, server.key[2] if server is not None else other,
            kind, "true" if failed else "false", *client_dims, *server_dims)
