"""What the plan costs once every planned service runs its sidecar: per cluster and for the fleet, the sidecars, their
requests and limits (as the injector will size them, or the plan's override), and the latency the proxies add along
the longest call chains at a per-hop estimate (the seed measured 35-50 ms per hop on its own workloads)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field

from meshwave.propose.models import CallGraph, Frozen, Inventory, Proposal, Workload
from meshwave.propose.order import components


class Resources(Frozen):
    services: int = 0
    sidecars: int = 0
    cpu_request_m: float = 0
    cpu_limit_m: float = 0
    memory_request_mi: float = 0
    memory_limit_mi: float = 0
    without_cpu_limit: int = 0  # sidecars whose proxy has no cpu limit (not counted in cpu_limit_m)
    without_memory_limit: int = 0

    def plus(self, other: Resources) -> Resources:
        return Resources(**{f: getattr(self, f) + getattr(other, f) for f in Resources.model_fields})


class Chain(Frozen):
    path: list[str]
    hops: int  # hops that get a proxy at one end or both
    added_ms_low: float
    added_ms_high: float


class Cost(Frozen):
    clusters: dict[str, Resources]
    fleet: Resources
    chains: list[Chain] = Field(default_factory=list)
    per_hop_ms: tuple[float, float]


def project(inventory: Inventory, graph: CallGraph, proposal: Proposal, per_hop_ms: tuple[float, float],
            chains: int = 3) -> Cost:
    workloads = inventory.by_key()
    overrides = {s.key: s.sidecar_memory_limit for w in proposal.waves for s in w.services}
    clusters: dict[str, Resources] = {}
    for key, limit in overrides.items():
        w = workloads[key]
        clusters[w.cluster] = clusters.get(w.cluster, Resources()).plus(_sidecars(w, limit))
    fleet = Resources()
    for found in clusters.values():
        fleet = fleet.plus(found)
    proxied = set(overrides) | {k for k, w in workloads.items() if w.meshed}
    return Cost(clusters=dict(sorted(clusters.items())), fleet=fleet, per_hop_ms=per_hop_ms,
                chains=longest_chains(graph, proxied, set(overrides), per_hop_ms, chains))


def _sidecars(w: Workload, memory_limit: str | None) -> Resources:
    """The proxies this workload's pods get: none for pods that run one already."""
    n = max(w.replicas - w.pods_with_sidecar, 0)
    limit = _mi(memory_limit) if memory_limit else w.proxy.memory_limit_mi
    request = w.proxy.memory_request_mi
    if memory_limit and request == w.proxy.memory_limit_mi:  # a limit alone is also the request: it follows
        request = limit or 0
    cpu_limit = w.proxy.cpu_limit_m
    return Resources(services=1, sidecars=n, cpu_request_m=n * w.proxy.cpu_request_m,
                     cpu_limit_m=n * (cpu_limit or 0), memory_request_mi=n * request,
                     memory_limit_mi=n * (limit or 0), without_cpu_limit=n if cpu_limit is None else 0,
                     without_memory_limit=n if limit is None else 0)


def _mi(quantity: str) -> float:
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(quantity)) / 2**20


def longest_chains(graph: CallGraph, proxied: set[str], planned: set[str], per_hop_ms: tuple[float, float],
                   count: int) -> list[Chain]:
    """The longest call chains (by hops that gain a proxy), each from a different entry; a cycle's calls back up the
    chain are left out (they would make every chain endless)."""
    callees: dict[str, list[str]] = {}
    for e in graph.edges:
        callees.setdefault(e.client, []).append(e.server)
    nodes = set(callees) | {e.server for e in graph.edges}
    unit = {k: u for u in components(nodes, {n: [] for n in nodes} | _callers(graph)) for k in u}
    best: dict[str, tuple[int, list[str]]] = {}

    def walk(node: str) -> tuple[int, list[str]]:  # memoised: the condensed graph is a DAG
        if node in best:
            return best[node]
        best[node] = (0, [node])
        options = [(_hop(node, nxt, proxied, planned) + walk(nxt)[0], [node, *walk(nxt)[1]])
                   for nxt in sorted(set(callees.get(node, []))) if unit[nxt] != unit[node]]
        best[node] = max(options, key=lambda o: (o[0], len(o[1])), default=(0, [node]))
        return best[node]

    entries = sorted(n for n in nodes if not any(n in callees.get(c, []) for c in nodes if unit[c] != unit[n]))
    found = sorted((walk(n) for n in entries), key=lambda r: (-r[0], -len(r[1]), r[1]))
    low, high = per_hop_ms
    return [Chain(path=path, hops=hops, added_ms_low=hops * low, added_ms_high=hops * high)
            for hops, path in found[:count] if hops > 0]


def _callers(graph: CallGraph) -> Mapping[str, list[str]]:
    found: dict[str, list[str]] = {}
    for e in graph.edges:
        found.setdefault(e.server, []).append(e.client)
    return found


def _hop(client: str, server: str, proxied: set[str], planned: set[str]) -> int:
    """A hop gains latency when the plan puts a proxy at one end or both (and some end has one at the end)."""
    return int((client in planned or server in planned) and (client in proxied or server in proxied))
