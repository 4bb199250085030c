"""`meshlab import`: a lab topology from a fleet's own inventory and call graph (issue 16, item 5).

The readers are meshwave's (`meshwave plan propose`'s inventory and call graph, and its PeerAuthentication list):
the lab reads through them, meshwave never imports the lab. What the topology cannot express, or the telemetry does
not give, is said in the written file's header and in the command's output, never filled in silently.

How the measured graph becomes the lab's model (meshlab.mesh.compute_flows): the lab drives every call by the
requests that reach its caller, `rate(client -> server) = reached(client) x per_request`, so each edge's
`per_request` is its measured rate over what reaches the client (its inbound calls, its untraced callers, its unseen
callers), and what reaches nobody's call is an ingress rate:
- `user` (the service graph's untraced caller) and `unknown` (Istio's caller without a sidecar) into a gateway are
  its `ingress_rps`; into any other service they are calls of one external caller per cluster, `untraced-callers`
  (namespace `external`, not traced: the lab's telemetry names it `user` again);
- a service whose own request count is above what its callers send has callers nobody sees (the proposer's "unseen
  callers"): the same external caller sends the difference, and the service is `traced: false` (were it traced, its
  server spans would name those callers `user`);
- a caller outside the inventory (a cluster not read, a Job) is an external service of its own name, traced;
- the graph's cycles are closed by a call marked `cycle` (the lab refuses any other), its rate left as measured.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from meshlab.topology import parse_topology
from meshwave.propose.callgraph import USER, Source, read_graph, working_sets
from meshwave.propose.inventory import INJECT_LABEL, NS_INJECT_LABEL, REV_LABEL, read_inventory, with_working_sets
from meshwave.propose.models import CallGraph, Edge, Inventory, Workload

UNTRACED_CALLERS, EXTERNAL_NS = "untraced-callers", "external"
UNSEEN_MIN = 0.01  # requests/s and share: below it, the difference is the scrapes' own noise (as the proposer's 1 %)
PROXY_ANNOTATIONS = (("cpu_request_m", "sidecar.istio.io/proxyCPU", "m"),
                     ("cpu_limit_m", "sidecar.istio.io/proxyCPULimit", "m"),
                     ("memory_request_mi", "sidecar.istio.io/proxyMemory", "Mi"),
                     ("memory_limit_mi", "sidecar.istio.io/proxyMemoryLimit", "Mi"))
NOT_CARRIED = [
    "latency_ms and error_rate: the topology's defaults (the call-graph reader gives rates and failed rates per "
    "edge, not a service's own latency or errors)",
    "memory requests, CPU limits and Deployment labels other than criticality: not in the inventory (topology "
    "defaults)",
    "which services are legacy (crash-loop with a sidecar): not visible in telemetry; legacy: false everywhere",
    "ports: every Service and call on 8080 (the call graph has no ports); bypass_ports, burst timing and TCP bytes "
    "of long-lived connections are not read",
    "clusters' nodes, ResourceQuotas, LimitRanges, the injector's proxy resources and Gatekeeper constraints: not "
    "read (topology defaults)",
    "port-level PeerAuthentication settings: the topology's peer_authentications have a mode and a selector only",
]


@dataclass
class Imported:
    topology: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def text(self, source: str) -> str:
        header = [f"# Imported by `meshlab import` from {source}.", "#",
                  "# Not carried over (the topology cannot express it, or the telemetry does not give it):"]
        header += [f"#   - {line}" for line in NOT_CARRIED]
        if self.notes:
            header += ["#", "# Notes on this fleet:"] + [f"#   - {line}" for line in self.notes]
        return "\n".join(header) + "\n\n" + yaml.safe_dump(self.topology, sort_keys=False, width=120)


def read_fleet(kubes: Mapping[str, Any], sources: Mapping[str, Source], lookback: str,
               lookback_seconds: float) -> tuple[Inventory, CallGraph, dict[str, list[dict[str, Any]]]]:
    """The inventory, call graph and PeerAuthentications, with the proposer's own readers."""
    inventory = read_inventory(dict(kubes))
    inventory = with_working_sets(inventory, working_sets(dict(sources), lookback))
    graph = read_graph(dict(sources), inventory, lookback, lookback_seconds)
    policies = {cluster: kube.mtls.list(None) for cluster, kube in kubes.items()}
    return inventory, graph, policies


def build(name: str, inventory: Inventory, graph: CallGraph, policies: Mapping[str, list[dict[str, Any]]],
          root_namespace: str = "istio-system") -> Imported:
    notes: list[str] = list(graph.notes)
    workloads = inventory.by_key()
    control_plane = {k: w for k, w in workloads.items()
                     if w.namespace == root_namespace and (w.name == "istiod" or w.name.startswith("istiod-"))}
    services = {k: w for k, w in workloads.items() if k not in control_plane}
    services_out_only: set[str] = set()  # external callees
    http_in: dict[str, float] = defaultdict(float)
    for e in graph.edges:
        if e.protocol == "http":
            http_in[e.server] += e.rate
    edges: list[Edge] = []
    callees: dict[str, dict[str, Any]] = {}  # a callee outside the inventory -> its external service
    for e in graph.edges:
        if e.server not in services:
            if e.client not in services:
                notes.append(f"{e.client} -> {e.server} ({e.protocol}, {e.rate:g}/s): neither side is a Deployment "
                             "of the clusters read; left out")
                continue
            parts = e.server.split("/")
            ns = parts[1] if len(parts) == 3 else EXTERNAL_NS
            callee = callees.setdefault(e.server, {"name": parts[-1], "cluster": services[e.client].cluster,
                                                   "namespace": ns, "kind": "external"})
            notes.append(f"{e.client} -> {e.server} ({e.protocol}, {e.rate:g}/s): the callee is no Deployment of "
                         f"the clusters read: an external service {callee['cluster']}/{ns}/{parts[-1]} (its real "
                         "namespace and port are not in the telemetry)")
            e = e.model_copy(update={"server": f"{callee['cluster']}/{ns}/{parts[-1]}"})  # noqa: PLW2901
            services_out_only.add(e.server)
        edges.append(e)
    cycles = _cycle_edges(edges, services)
    # What reaches each service before any cycle call (the lab drives a caller's calls by that).
    reached: dict[str, float] = defaultdict(float)
    untraced: dict[str, dict[str, float]] = defaultdict(dict)  # cluster -> server -> rate of the external caller
    ingress: dict[str, float] = defaultdict(float)
    outside: dict[str, list[Edge]] = defaultdict(list)
    for e in edges:
        if e.protocol != "http":
            continue
        if (e.client, e.server) not in cycles:
            reached[e.server] += e.rate
        if e.server in services_out_only:
            continue
        if e.client in (USER, "unknown"):
            if services[e.server].gateway:
                ingress[e.server] += e.rate
            else:
                cluster = services[e.server].cluster
                untraced[cluster][e.server] = untraced[cluster].get(e.server, 0.0) + e.rate
        elif e.client not in services:
            outside[e.client].append(e)
    for e in edges:  # TCP from an untraced or outside caller: counted above only for HTTP
        if e.protocol == "tcp" and e.client in (USER, "unknown"):
            notes.append(f"{e.client} -> {e.server} (tcp, {e.rate:g}/s): an untraced TCP caller; left out")
        elif e.protocol == "tcp" and e.client not in services:
            outside[e.client].append(e)
    unseen_traced_off: set[str] = set()
    for key, w in services.items():
        served = graph.app_rates.get(key, 0.0)
        unseen = served - http_in.get(key, 0.0)
        if not w.gateway and unseen > max(UNSEEN_MIN * served, UNSEEN_MIN):
            untraced[w.cluster][key] = untraced[w.cluster].get(key, 0.0) + unseen
            reached[key] += unseen
            unseen_traced_off.add(key)
    calls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in edges:
        if e.client not in services:
            continue
        base = reached.get(e.client, 0.0)
        if base <= 0:
            notes.append(f"{e.client} calls {e.server} at {e.rate:g}/s but nothing calls it: the lab drives calls by "
                         "requests served, so it gets ingress_rps 1 (the twin shows `user` calling it at 1/s)")
            ingress[e.client] = ingress.get(e.client, 0.0) or 1.0
            reached[e.client] = base = 1.0
        call: dict[str, Any] = {"service": e.server, "per_request": _round(e.rate / base)}
        if e.protocol != "http":
            call["protocol"] = e.protocol
        if (e.client, e.server) in cycles:
            call["cycle"] = True
        calls[e.client].append(call)

    out_services = [_service(w, calls.get(k, []), ingress.get(k, 0.0), k in unseen_traced_off, notes)
                    for k, w in sorted(services.items())]
    out_services += list(callees.values())
    for cluster, targets in sorted(untraced.items()):
        out_services.append({"name": UNTRACED_CALLERS, "cluster": cluster, "namespace": EXTERNAL_NS,
                             "kind": "external", "ingress_rps": 1.0,
                             "calls": [{"service": s, "per_request": _round(r)} for s, r in sorted(targets.items())]})
    for client, found in sorted(outside.items()):
        parts = client.split("/")
        cluster = parts[0] if len(parts) == 3 and parts[0] in {w.cluster for w in services.values()} \
            else services[found[0].server].cluster
        ns, svc_name = (parts[1], parts[2]) if len(parts) == 3 else (EXTERNAL_NS, parts[-1])
        notes.append(f"{client}: a caller outside the inventory; an external (traced) service")
        out_services.append({"name": svc_name, "cluster": cluster, "namespace": ns, "kind": "external",
                             "traced": True, "ingress_rps": 1.0,
                             "calls": [{"service": e.server, "per_request": _round(e.rate),
                                        **({"protocol": e.protocol} if e.protocol != "http" else {})}
                                       for e in found]})
    clusters = _clusters(services, control_plane, policies, root_namespace)
    topology = {"name": name, "mesh": {"root_namespace": root_namespace}, "clusters": clusters,
                "services": out_services,
                "peer_authentications": _policies(policies, notes)}
    for w in services.values():
        if w.pods_with_sidecar and w.pods_with_sidecar != w.pods:
            notes.append(f"{w.key}: {w.pods_with_sidecar} of {w.pods} pods have a sidecar (a rollout under way); "
                         "the twin's pods follow its injection labels only")
    parse_topology(topology, "imported topology")  # what `meshlab serve --topology` would refuse, refused here
    return Imported(topology, notes)


def _service(w: Workload, calls: list[dict[str, Any]], ingress: float, untraced: bool,
             notes: list[str]) -> dict[str, Any]:
    svc: dict[str, Any] = {"name": w.name, "cluster": w.cluster, "namespace": w.namespace, "replicas": w.replicas}
    if w.criticality != "medium":
        svc["criticality"] = w.criticality
        svc["labels"] = {"criticality": w.criticality}
    if w.app_memory_limit_mi is not None:
        svc["memory_limit_mi"] = w.app_memory_limit_mi
    else:
        notes.append(f"{w.key}: its containers have no memory limit; the topology needs one (its default 512Mi)")
    if w.app_memory_working_set_mi is not None:
        svc["app_memory_mi"] = round(w.app_memory_working_set_mi, 3)
    if w.gateway:
        svc["gateway"] = True
    if untraced:
        svc["traced"] = False
    if ingress:
        svc["ingress_rps"] = _round(ingress)
    annotations = {}
    if "annotation" in w.proxy.source:  # the team's own sizing: every resolved value, as annotations
        for attr, key, unit in PROXY_ANNOTATIONS:
            value = getattr(w.proxy, attr)
            if value is not None and value > 0:
                annotations[key] = f"{value:g}{unit}"
    pod_inject = w.injection_labels.get(f"pod {INJECT_LABEL}") or w.injection_labels.get(
        f"pod annotation {INJECT_LABEL}")
    if pod_inject is not None:
        annotations[INJECT_LABEL] = pod_inject
        if f"pod {INJECT_LABEL}" in w.injection_labels:
            notes.append(f"{w.key}: pod label {INJECT_LABEL}={pod_inject} written as the annotation (the topology "
                         "sets no pod labels; Istio honours both)")
    if rev := w.injection_labels.get(f"pod {REV_LABEL}"):
        notes.append(f"{w.key}: pod label {REV_LABEL}={rev} not carried (the topology sets no pod labels)")
    if annotations:
        svc["annotations"] = annotations
    if calls:
        svc["calls"] = calls
    return svc


def _clusters(services: Mapping[str, Workload], control_plane: Mapping[str, Workload],
              policies: Mapping[str, list[dict[str, Any]]], root: str) -> list[dict[str, Any]]:
    names = sorted({w.cluster for w in services.values()} | {w.cluster for w in control_plane.values()}
                   | set(policies))
    out = []
    for cluster in names:
        namespaces: dict[str, dict[str, str]] = {}
        for w in services.values():
            if w.cluster != cluster:
                continue
            labels = namespaces.setdefault(w.namespace, {})
            for label in (NS_INJECT_LABEL, REV_LABEL):
                if (value := w.injection_labels.get(f"namespace {label}")) is not None:
                    labels[label] = value
        for pa in policies.get(cluster, []):
            namespaces.setdefault(pa["metadata"]["namespace"], {})
        revisions = sorted(w.name.removeprefix("istiod").removeprefix("-") or "default"
                           for w in control_plane.values() if w.cluster == cluster)
        entry: dict[str, Any] = {"name": cluster, "namespaces": [
            {"name": ns, **({"labels": labels} if labels else {})} for ns, labels in sorted(namespaces.items())]}
        if revisions and revisions != ["default"]:
            entry["revisions"] = revisions
        out.append(entry)
    return out


def _policies(policies: Mapping[str, list[dict[str, Any]]], notes: list[str]) -> list[dict[str, Any]]:
    out = []
    for cluster, items in sorted(policies.items()):
        for pa in items:
            meta, spec = pa.get("metadata") or {}, pa.get("spec") or {}
            entry: dict[str, Any] = {"cluster": cluster, "namespace": meta["namespace"], "name": meta["name"],
                                     "mode": ((spec.get("mtls") or {}).get("mode")) or "UNSET"}
            if selector := (spec.get("selector") or {}).get("matchLabels"):
                entry["selector"] = dict(selector)
            if labels := meta.get("labels"):
                entry["labels"] = dict(labels)
            if spec.get("portLevelMtls"):
                notes.append(f"PeerAuthentication {cluster}/{meta['namespace']}/{meta['name']}: portLevelMtls "
                             f"{spec['portLevelMtls']} not carried")
            out.append(entry)
    return out


def _cycle_edges(edges: list[Edge], services: Mapping[str, Workload]) -> set[tuple[str, str]]:
    """Edges that close a cycle (a depth-first search's back edges, in the sorted order of the keys)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for e in edges:
        if e.client in services and e.server not in graph[e.client]:
            graph[e.client].append(e.server)
    state: dict[str, int] = {}
    back: set[tuple[str, str]] = set()

    def visit(node: str) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, [])):
            if state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                visit(nxt)
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return back


def _round(value: float) -> float:
    return float(f"{value:.6g}")
