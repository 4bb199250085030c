"""The simulated mesh: effective mTLS per workload and the request flow through the call graph.

Rules (istio-facts.md):
- PeerAuthentication precedence as pilot composes it (ComposePeerAuthentication): mesh-wide, then
  namespace-wide, then the workload's own policy, each overriding the mode so far unless UNSET; the oldest
  wins within a level (creationTimestamp, then name, then namespace); port-level modes need a selector.
- Auto-mTLS: a caller with a sidecar speaks mTLS to pods with sidecars and plaintext to the rest.
  STRICT, enforced by the server's proxy, resets plaintext; the caller's own success rate shows it.
- Ports excluded from capture bypass the proxy: no policy, no Istio telemetry.
- A server proxy that fails what it accepted (`proxy_drop`: its upstream, the app, unreachable) answers 503 with
  response flag UF itself: those requests never reach the app. The lab models no Envoy retries.
- A call in bursts sends its average rate in short bursts (`Call.burst_factor` over the tick's interval).
- Each proxy on a hop adds latency; a request's latency includes its calls, one after another.
- A Service's traffic is spread evenly over every ready pod its selector matches, whatever Deployment owns it
  (kube-proxy, Envoy's endpoints): a workload is a topology service's Service, its endpoints the ready pods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, NamedTuple, Protocol

from meshlab import resources as r
from meshlab.selectors import matches_labels
from meshlab.store import Store
from meshlab.topology import Call, Service

WorkloadKey = tuple[str, str, str]  # (cluster, namespace, name)
Owners = tuple[tuple[str, float], ...]  # (Deployment, its share of the requests)
UNSET = "UNSET"
_NEVER = datetime.min.replace(tzinfo=UTC)


def _created(policy: dict[str, Any]) -> datetime:
    """creationTimestamp as a time: pilot compares times, and a text compare would break on other formats."""
    stamp = policy["metadata"].get("creationTimestamp")
    try:
        parsed = datetime.fromisoformat(stamp) if stamp else _NEVER
    except (TypeError, ValueError):
        return _NEVER
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # naive and aware times do not compare


def _oldest(policies: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The policy in force within one level, in pilot's order (sortConfigByCreationTime).

    Timestamps have one-second resolution, so ties are common: the name decides, then the namespace. Never the
    resourceVersion, which moves on every edit and would let a label-only edit hand the level to another policy.
    """
    return min(policies, key=lambda p: (_created(p), p["metadata"]["name"], p["metadata"].get("namespace", "")),
               default=None)


def _spec(policy: dict[str, Any] | None) -> dict[str, Any]:
    spec = (policy or {}).get("spec")
    return spec if isinstance(spec, dict) else {}


def _mode(mtls: Any) -> str:
    """The mode of an `mtls` block (the policy's or a port's); a missing block or mode is UNSET."""
    return (mtls.get("mode") or UNSET) if isinstance(mtls, dict) else UNSET


def _selector(policy: dict[str, Any]) -> dict[str, str]:
    """matchLabels of a policy; empty (as Istio reads it) means namespace- or mesh-wide."""
    return (_spec(policy).get("selector") or {}).get("matchLabels") or {}


def _port_setting(policy: dict[str, Any] | None, port: int) -> Any:
    """The portLevelMtls entry for a port, or None; keys are strings over JSON, ints from in-process callers."""
    ports = _spec(policy).get("portLevelMtls") or {}
    return next((mtls for key, mtls in ports.items() if str(key) == str(port)), None)


def _levels(store: Store, root_namespace: str, namespace: str, pod_labels: dict[str, str]) -> list[dict[str, Any]]:
    """The policies in force for a workload: [mesh, namespace, workload], None where a level has none.

    For a workload in the root namespace the namespace-wide level is the mesh-wide policy itself, and selector
    policies in the root namespace never apply (pilot looks up workload policies outside the root only).
    """
    root = list(store.items(r.PEER_AUTHENTICATIONS, root_namespace))
    local = root if namespace == root_namespace else list(store.items(r.PEER_AUTHENTICATIONS, namespace))
    mesh = _oldest(p for p in root if not _selector(p))
    namespace_wide = None if namespace == root_namespace else _oldest(p for p in local if not _selector(p))
    workload = None
    if namespace != root_namespace:
        workload = _oldest(p for p in local if _selector(p) and matches_labels(_selector(p), pod_labels))
    return [mesh, namespace_wide, workload]


def effective_mode(store: Store, root_namespace: str, namespace: str, pod_labels: dict[str, str],
                   port: int | None = None) -> str:
    """The mTLS mode a workload's proxy enforces on a port: STRICT, PERMISSIVE or DISABLE.

    Pilot's ComposePeerAuthentication: start PERMISSIVE; the mesh, namespace and workload policy each set the
    mode unless theirs is UNSET; a port in the workload policy's portLevelMtls then takes its own mode, or the
    mode computed so far when it is UNSET.
    """
    mesh, namespace_wide, workload = _levels(store, root_namespace, namespace, pod_labels)
    mode = "PERMISSIVE"
    for policy in (mesh, namespace_wide, workload):
        if policy is not None and _mode(_spec(policy).get("mtls")) != UNSET:
            mode = _mode(_spec(policy).get("mtls"))
    if port is not None and workload is not None:
        setting = _port_setting(workload, port)
        if setting is not None and _mode(setting) != UNSET:
            mode = _mode(setting)
    return mode


class Endpoint(NamedTuple):
    """A ready pod the Service sends traffic to."""

    pod: str
    owner: str  # the Deployment owning it: Istio's workload name for the pod
    proxied: bool  # a proxy (or the gateway's own Envoy) receives its inbound traffic


@dataclass
class Workload:
    """A workload as the mesh sees it this tick: a topology service, served by its Service's endpoints."""

    key: WorkloadKey
    service: Service
    available: bool
    sidecar_fraction: float  # of the ready pods, how many carry a proxy
    mode_for_port: Callable[[int], str]
    inbound_bypass: set[int] = field(default_factory=set)
    outbound_excluded: set[int] = field(default_factory=set)
    sidecar_latency_ms: float = 0.5
    proxy_drop: float = 0.0  # of what its own proxy accepts, failed by that proxy (never reaches the app)
    endpoints: tuple[Endpoint, ...] = ()  # none: outside Kubernetes, or no ready pod

    def proxied_inbound(self, port: int) -> float:
        return 0.0 if port in self.inbound_bypass else self.sidecar_fraction

    def proxied_outbound(self, port: int) -> float:
        return 0.0 if port in self.outbound_excluded else self.sidecar_fraction

    @cached_property
    def proxy_owners(self) -> Owners:
        """Who served what went into the server's proxies: split by the proxied ready pods' owners."""
        return self._owners([e for e in self.endpoints if e.proxied])

    def direct_owners(self, port: int) -> Owners:
        """Who served what reached pods past any proxy: the unproxied ready pods' owners, every ready pod's on a
        port the proxies do not capture."""
        return self._all_owners if port in self.inbound_bypass else self._direct_owners

    @cached_property
    def _direct_owners(self) -> Owners:
        return self._owners([e for e in self.endpoints if not e.proxied])

    @cached_property
    def _all_owners(self) -> Owners:
        return self._owners(list(self.endpoints))

    def _owners(self, endpoints: list[Endpoint]) -> Owners:
        """Each owner's share, in proportion to its pods (an even spread per endpoint); without pods, the service."""
        if not endpoints:
            return ((self.key[2], 1.0),)
        counts: dict[str, int] = {}
        for e in endpoints:
            counts[e.owner] = counts.get(e.owner, 0) + 1
        return tuple((owner, n / len(endpoints)) for owner, n in counts.items())


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
    dropped_mtls: float = 0.0    # caller proxy -> server proxy, accepted, then failed by the server proxy (503 UF)
    dropped_plaintext: float = 0.0  # no caller proxy -> server proxy, accepted, then failed by it (503 UF)
    reset: float = 0.0           # no caller proxy -> server proxy in STRICT: refused, nobody reports a request
    to_unproxied: float = 0.0    # any caller -> server pod without proxy (only a caller proxy reports)
    client_proxied: float = 0.0  # fraction of the caller's requests that leave through its proxy
    unavailable: float = 0.0     # no ready pod: the caller's proxy (if any) reports 503 UH
    latency_ms: float = 0.0      # seen by the caller, proxies included
    bytes_per_second: float = 0.0           # TCP: sent by the caller over its connection(s), however many opened
    response_bytes_per_second: float = 0.0  # TCP: sent back by the service

    def shares(self) -> EdgeShares:
        """Where one unit offered on this edge goes: what the TCP bytes follow (they need no request rate)."""
        unit = EdgeFlow(self.source, self.dest, self.port, self.protocol)
        _split(unit, 1.0)
        return EdgeShares(unit.mtls, unit.plaintext, unit.to_unproxied * unit.client_proxied)


@dataclass(frozen=True)
class EdgeShares:
    mtls: float          # both proxies report, mutual_tls
    plaintext: float     # the server proxy reports, none
    source_only: float   # only the caller's proxy reports (the server has none)


@dataclass
class WorkloadFlow:
    reached: float = 0.0      # requests per second that reach the application
    proxied: float = 0.0      # of `reached`, through the server's proxies (to the proxied pods)
    bypassed: float = 0.0     # of `reached`, on a port the proxies do not capture (to any ready pod)
    ok: float = 1.0           # fraction of those answered 2xx
    own_error: float = 0.0    # fraction answered 500 by the app itself (the rest of failures are 503)
    latency_ms: float = 0.0


@dataclass
class Flows:
    workloads: dict[WorkloadKey, WorkloadFlow]
    edges: list[EdgeFlow]
    gateways: set[WorkloadKey] = field(default_factory=set)  # Envoy only: no application metrics
    app_labels: dict[WorkloadKey, str] = field(default_factory=dict)  # the label the app's own metrics name it by
    endpoints: dict[WorkloadKey, tuple[Endpoint, ...]] = field(default_factory=dict)  # the pods that serve them


class Bursts(Protocol):
    def __call__(self, call: Call) -> float:
        """How much of its average rate a call sends during this tick (1.0 for a steady caller)."""
        ...


def steady(call: Call) -> float:
    return 1.0


def topological_order(workloads: dict[WorkloadKey, Workload]) -> list[WorkloadKey]:
    """Callers before callees (the topology forbids cycles, except through calls marked `cycle`, left out here)."""
    order: list[WorkloadKey] = []
    seen: set[WorkloadKey] = set()

    def visit(key: WorkloadKey) -> None:
        if key in seen:
            return
        seen.add(key)
        for call in workloads[key].service.calls:
            callee = _key(call)
            if callee in workloads and not call.cycle:
                visit(callee)
        order.append(key)

    for key in workloads:
        visit(key)
    return list(reversed(order))


def _key(call: Call) -> WorkloadKey:
    cluster, ns, name = call.service.split("/")
    return cluster, ns, name


def compute_flows(workloads: dict[WorkloadKey, Workload], bursts: Bursts = steady) -> Flows:
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
            _deliver(flows[key], edge)
        for call in w.service.calls:
            callee = workloads.get(_key(call))
            if callee is None:
                continue
            edge = _edge(w, callee, call.port, call.protocol, flows[callee.key])
            _split(edge, flows[key].reached * call.per_request * bursts(call))
            edge.bytes_per_second, edge.response_bytes_per_second = call.bytes_per_second, \
                call.response_bytes_per_second
            edges.append(edge)
            if call.protocol == "http":
                _deliver(flows[callee.key], edge)
    return Flows(flows, edges, {k for k, w in workloads.items() if w.service.gateway},
                 {k: w.service.app_metrics_label for k, w in workloads.items() if w.service.app_metrics_label != "app"},
                 {k: w.endpoints for k, w in workloads.items() if w.endpoints})


def _deliver(flow: WorkloadFlow, edge: EdgeFlow) -> None:
    """Count what an edge delivers to the application, and by which way, so each pod gets its own share."""
    flow.reached += edge.mtls + edge.plaintext + edge.to_unproxied
    flow.proxied += edge.mtls + edge.plaintext
    if edge.port in edge.dest.inbound_bypass:
        flow.bypassed += edge.to_unproxied


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
    drop = edge.dest.proxy_drop  # the server proxy fails a share of what it accepted (after any TLS handshake)
    mtls_into_proxy = rate * client * server
    edge.mtls, edge.dropped_mtls = mtls_into_proxy * (1 - drop), mtls_into_proxy * drop
    edge.to_unproxied = rate * (1 - server)
    plaintext_into_proxy = rate * (1 - client) * server
    if strict:  # refused at the handshake: the proxy never routes it, so it cannot fail it either
        edge.reset = plaintext_into_proxy
    else:
        edge.plaintext, edge.dropped_plaintext = plaintext_into_proxy * (1 - drop), plaintext_into_proxy * drop


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
