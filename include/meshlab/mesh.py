"""The simulated mesh: effective mTLS per workload and the request flow through the call graph.

Rules (istio-facts.md):
- PeerAuthentication precedence: workload selector > namespace-wide > mesh-wide (root namespace),
  the oldest wins within a level, UNSET inherits, port-level modes need a selector.
- Auto-mTLS: a caller with a sidecar speaks mTLS to pods with sidecars and plaintext to the rest.
  STRICT, enforced by the server's proxy, resets plaintext; the caller's own success rate shows it.
- Ports excluded from capture bypass the proxy: no policy, no Istio telemetry.
- Each proxy on a hop adds latency; a request's latency includes its calls, one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshlab import resources as r
from meshlab.selectors import matches_labels
from meshlab.store import Store
from meshlab.topology import Call, Service

WorkloadKey = tuple[str, str, str]  # (cluster, namespace, name)


def _oldest(policies: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    return min(policies, key=lambda p: (p["metadata"].get("creationTimestamp", ""),
                                        int(p["metadata"].get("resourceVersion", "0")),
                                        p["metadata"]["name"]), default=None)


def _mode_of(policy: dict[str, Any] | None, port: int | None = None) -> str:
    if policy is None:
        return "UNSET"
    spec = policy.get("spec") or {}
    if port is not None and spec.get("selector"):
        port_level = (spec.get("portLevelMtls") or {}).get(str(port)) or (spec.get("portLevelMtls") or {}).get(port)
        if port_level and port_level.get("mode", "UNSET") != "UNSET":
            return port_level["mode"]
    return (spec.get("mtls") or {}).get("mode") or "UNSET"


def _selector(policy: dict[str, Any]) -> dict[str, str]:
    """matchLabels of a policy; empty (as Istio reads it) means namespace- or mesh-wide."""
    return ((policy.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}


def effective_mode(store: Store, root_namespace: str, namespace: str, pod_labels: dict[str, str],
                   port: int | None = None) -> str:
    """The mTLS mode a workload's proxy enforces on a port: STRICT, PERMISSIVE or DISABLE."""
    policies = list(store.items(r.PEER_AUTHENTICATIONS, namespace))
    workload = []
    if namespace != root_namespace:  # selector policies in the root namespace are ignored
        workload = [p for p in policies if _selector(p) and matches_labels(_selector(p), pod_labels)]
    namespace_wide = [p for p in policies if not _selector(p)]
    mesh_wide = [p for p in store.items(r.PEER_AUTHENTICATIONS, root_namespace) if not _selector(p)]
    for mode in (_mode_of(_oldest(workload), port), _mode_of(_oldest(namespace_wide)),
                 _mode_of(_oldest(mesh_wide))):
        if mode != "UNSET":
            return mode
    return "PERMISSIVE"


@dataclass
class Workload:
    """A workload as the mesh sees it this tick."""

    key: WorkloadKey
    service: Service
    available: bool
    sidecar_fraction: float  # of the ready pods, how many carry a proxy
    mode_for_port: Callable[[int], str]
    inbound_bypass: set[int] = field(default_factory=set)
    outbound_excluded: set[int] = field(default_factory=set)
    sidecar_latency_ms: float = 0.5

    def proxied_inbound(self, port: int) -> float:
        return 0.0 if port in self.inbound_bypass else self.sidecar_fraction

    def proxied_outbound(self, port: int) -> float:
        return 0.0 if port in self.outbound_excluded else self.sidecar_fraction


@dataclass
class EdgeFlow:
    """Requests (or TCP connections) per second on one edge, split by what happens to them."""

    source: Workload | None  # None: traffic from outside the mesh (ingress)
    dest: Workload
    port: int
    protocol: str
    offered: float = 0.0
    mtls: float = 0.0            # caller proxy -> server proxy: both report, mutual_tls
    plaintext: float = 0.0       # no caller proxy -> server proxy, accepted (PERMISSIVE): server reports "none"
    reset: float = 0.0           # no caller proxy -> server proxy in STRICT: refused, nobody reports a request
    to_unproxied: float = 0.0    # any caller -> server pod without proxy (only a caller proxy reports)
    client_proxied: float = 0.0  # fraction of the caller's requests that leave through its proxy
    unavailable: float = 0.0     # no ready pod: the caller's proxy (if any) reports 503 UH
    latency_ms: float = 0.0      # seen by the caller, proxies included


@dataclass
class WorkloadFlow:
    reached: float = 0.0      # requests per second that reach the application
    ok: float = 1.0           # fraction of those answered 2xx
    own_error: float = 0.0    # fraction answered 500 by the app itself (the rest of failures are 503)
    latency_ms: float = 0.0


@dataclass
class Flows:
    workloads: dict[WorkloadKey, WorkloadFlow]
    edges: list[EdgeFlow]
    gateways: set[WorkloadKey] = field(default_factory=set)  # Envoy only: no application metrics


def topological_order(workloads: dict[WorkloadKey, Workload]) -> list[WorkloadKey]:
    """Callers before callees (the topology forbids cycles)."""
    order: list[WorkloadKey] = []
    seen: set[WorkloadKey] = set()

    def visit(key: WorkloadKey) -> None:
        if key in seen:
            return
        seen.add(key)
        for call in workloads[key].service.calls:
            callee = _key(call)
            if callee in workloads:
                visit(callee)
        order.append(key)

    for key in workloads:
        visit(key)
    return list(reversed(order))


def _key(call: Call) -> WorkloadKey:
    cluster, ns, name = call.service.split("/")
    return cluster, ns, name


def compute_flows(workloads: dict[WorkloadKey, Workload]) -> Flows:
    order = topological_order(workloads)
    flows = {k: WorkloadFlow() for k in workloads}
    # Callees first: what fraction of the requests reaching a workload succeed, and how long they take.
    for key in reversed(order):
        w, f = workloads[key], flows[key]
        ok, latency = 1.0 - w.service.error_rate, w.service.latency_ms
        for call in w.service.calls:
            callee = workloads.get(_key(call))
            if callee is None:
                continue
            edge = _edge(w, callee, call.port, call.protocol, flows[callee.key])
            ok *= _calls_succeed(_edge_success(edge, callee, flows[callee.key]), call.per_request)
            latency += call.per_request * edge.latency_ms
        f.ok, f.own_error, f.latency_ms = ok, w.service.error_rate, latency
    # Callers first: how much traffic each edge carries, and how much of it reaches the application.
    edges: list[EdgeFlow] = []
    for key in order:
        w = workloads[key]
        if w.service.ingress_rps:
            edge = _edge(None, w, w.service.port, "http", flows[key])
            _split(edge, w.service.ingress_rps)
            edges.append(edge)
            flows[key].reached += edge.mtls + edge.plaintext + edge.to_unproxied
        for call in w.service.calls:
            callee = workloads.get(_key(call))
            if callee is None:
                continue
            edge = _edge(w, callee, call.port, call.protocol, flows[callee.key])
            _split(edge, flows[key].reached * call.per_request)
            edges.append(edge)
            if call.protocol == "http":
                flows[callee.key].reached += edge.mtls + edge.plaintext + edge.to_unproxied
    return Flows(flows, edges, {k for k, w in workloads.items() if w.service.gateway})


def _edge(source: Workload | None, dest: Workload, port: int, protocol: str, dest_flow: WorkloadFlow) -> EdgeFlow:
    edge = EdgeFlow(source, dest, port, protocol)
    client_proxy = source.proxied_outbound(port) if source else 0.0
    server_proxy = dest.proxied_inbound(port)
    edge.latency_ms = dest_flow.latency_ms + dest.sidecar_latency_ms * (client_proxy + server_proxy)
    return edge


def _split(edge: EdgeFlow, rate: float) -> None:
    """Divide an edge's offered rate over what happens to it."""
    edge.offered = rate
    edge.client_proxied = edge.source.proxied_outbound(edge.port) if edge.source else 0.0
    if not edge.dest.available:
        edge.unavailable = rate
        return
    client = edge.source.proxied_outbound(edge.port) if edge.source else 0.0
    server = edge.dest.proxied_inbound(edge.port)
    strict = edge.dest.mode_for_port(edge.port) == "STRICT"
    edge.mtls = rate * client * server
    edge.to_unproxied = rate * (1 - server)
    plaintext_into_proxy = rate * (1 - client) * server
    if strict:
        edge.reset = plaintext_into_proxy
    else:
        edge.plaintext = plaintext_into_proxy


def _calls_succeed(success: float, per_request: float) -> float:
    """Chance that all calls of one request succeed: `per_request` 2.5 is 2 calls plus a third half the time."""
    whole = int(per_request)
    extra = per_request - whole
    return success**whole * (1 - extra * (1 - success))


def _edge_success(edge: EdgeFlow, callee: Workload, callee_flow: WorkloadFlow) -> float:
    """Fraction of one call that succeeds, whatever the rate."""
    probe = EdgeFlow(edge.source, callee, edge.port, edge.protocol)
    _split(probe, 1.0)
    delivered = probe.mtls + probe.plaintext + probe.to_unproxied
    return delivered * (callee_flow.ok if edge.protocol == "http" else 1.0)
