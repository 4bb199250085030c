"""include/lab/seed.yaml: the seed's fleet at full size, as include/lab/generate_seed.py writes it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from meshlab.lab import Lab
from meshlab.topology import Call, Service, Topology, load_topology

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "include" / "lab" / "seed.yaml"
GENERATOR = ROOT / "include" / "lab" / "generate_seed.py"
CRITICAL_FOUR = ("auth-service", "payment-service", "user-service", "api-gateway")
Key = tuple[str, str, str]


@pytest.fixture(scope="module")
def seed() -> Topology:
    return load_topology(SEED)


def key(s: Service) -> Key:
    return (s.cluster or "", s.namespace, s.name)


def deployments(topology: Topology) -> list[Service]:
    """The fleet's own workloads: deployments that are not an ingress gateway."""
    return [s for s in topology.services if s.kind == "deployment" and not s.gateway]


def by_name(topology: Topology, name: str) -> Service:
    found = [s for s in topology.services if s.name == name]
    assert len(found) == 1, f"{name}: {len(found)} services of that name"
    return found[0]


def target(call: Call) -> Key:
    cluster, namespace, name = call.service.split("/")  # the model resolves every call to all three
    return cluster, namespace, name


def callees(topology: Topology, protocol: str | None = None) -> dict[Key, list[Key]]:
    return {key(s): [target(c) for c in s.calls if protocol in (None, c.protocol)] for s in topology.services}


def longest_from(graph: dict[Key, list[Key]], start: Key) -> int:
    """Hops on the longest call path from `start` (the graph has no cycle: the model checks it)."""
    memo: dict[Key, int] = {}

    def longest(node: Key) -> int:
        if node not in memo:
            memo[node] = max((1 + longest(n) for n in graph.get(node, [])), default=0)
        return memo[node]

    return longest(start)


def sidecar_mi(topology: Topology, s: Service) -> float:
    return topology.mesh.sidecar_memory_mi if s.sidecar_memory_mi is None else s.sidecar_memory_mi


# ---- size ---------------------------------------------------------------------------------------
def test_187_deployments_about_800_pods_over_three_clusters(seed: Topology) -> None:
    fleet = deployments(seed)
    assert len(fleet) == 187
    assert len({s.name for s in fleet}) == 187, "service names are unique across the fleet"
    assert len(seed.clusters) >= 3
    assert {s.cluster for s in fleet} == {c.name for c in seed.clusters}
    for cluster in seed.clusters:
        assert len(cluster.namespaces) >= 5, f"{cluster.name}: several namespaces"
    pods = sum(s.replicas for s in seed.services if s.kind == "deployment")
    assert 750 <= pods <= 850
    replicas = [s.replicas for s in fleet]
    assert min(replicas) >= 2 and max(replicas) <= 8
    assert sum(1 for r in replicas if 3 <= r <= 5) > len(replicas) / 2, "most have 3-5 replicas"


def test_mesh_settings_are_the_seeds(seed: Topology) -> None:
    assert seed.mesh.sidecar_memory_mi == 200
    assert seed.mesh.sidecar_latency_ms == 20, "per proxy: 40 ms for a hop with a sidecar at each end (seed: 35-50)"
    assert seed.mesh.root_namespace == "istio-system"


def test_start_state_has_no_injection_and_no_peer_authentication(seed: Topology) -> None:
    assert seed.peer_authentications == []
    for cluster in seed.clusters:
        for ns in cluster.namespaces:
            if ns.name == "monitoring":
                assert ns.labels == {"istio-injection": "disabled"}
            else:
                assert "istio-injection" not in ns.labels, f"{cluster.name}/{ns.name}"
                assert "istio.io/rev" not in ns.labels, f"{cluster.name}/{ns.name}"


# ---- who is who ---------------------------------------------------------------------------------
def test_the_four_critical_services(seed: Topology) -> None:
    first = seed.clusters[0].name
    for name in CRITICAL_FOUR:
        s = by_name(seed, name)
        assert s.kind == "deployment" and not s.gateway
        assert s.criticality == "critical"
        assert s.cluster == first


def test_every_cluster_has_an_ingress_gateway_in_front_of_an_entry_service(seed: Topology) -> None:
    graph = callees(seed)
    for cluster in seed.clusters:
        gateways = [s for s in seed.services if s.gateway and s.cluster == cluster.name]
        assert len(gateways) == 1, cluster.name
        gw = gateways[0]
        assert (gw.name, gw.namespace, gw.kind, gw.replicas) == ("istio-ingressgateway", "istio-system",
                                                                  "deployment", 2)
        assert gw.ingress_rps > 0
        assert graph[key(gw)], f"{cluster.name}: the gateway calls an entry service"
        assert all(target[0] == cluster.name for target in graph[key(gw)])
    eu_gateway = next(s for s in seed.services if s.gateway and s.cluster == seed.clusters[0].name)
    assert key(by_name(seed, "api-gateway")) in graph[key(eu_gateway)]


def test_the_seeds_problem_services(seed: Topology) -> None:
    email = by_name(seed, "email-service")
    assert email.kind == "deployment" and email.legacy
    reporting = by_name(seed, "legacy-reporting")
    assert reporting.kind == "deployment" and reporting.legacy

    batch = by_name(seed, "batch-processor")
    assert batch.kind == "external"
    assert batch.ingress_rps > 0, "its job rate"
    targets = {target(c) for c in batch.calls if c.protocol == "http"}
    assert len(targets) >= 3, "calls several services"
    kinds = {key(s): s.kind for s in seed.services}
    assert all(kinds[t] == "deployment" for t in targets)

    export = by_name(seed, "data-export")
    assert export.kind == "deployment" and not export.legacy
    postgres = by_name(seed, "postgres")
    assert postgres.kind == "external"
    db_calls = [c for c in export.calls if c.service == "/".join(key(postgres))]
    assert len(db_calls) == 1
    assert (db_calls[0].port, db_calls[0].protocol) == (5432, "tcp")
    assert 5432 not in export.bypass_ports, "the database traffic is outbound"


def test_blackbox_exporter_probes_the_critical_services_from_outside_the_mesh(seed: Topology) -> None:
    blackbox = by_name(seed, "blackbox-exporter")
    assert (blackbox.kind, blackbox.namespace) == ("deployment", "monitoring")
    cluster = next(c for c in seed.clusters if c.name == blackbox.cluster)
    monitoring = next(ns for ns in cluster.namespaces if ns.name == "monitoring")
    assert monitoring.labels.get("istio-injection") == "disabled"
    assert blackbox.ingress_rps > 0, "the probe schedule"
    probed = {c.service: c for c in blackbox.calls}
    for name in CRITICAL_FOUR:
        call = probed["/".join(key(by_name(seed, name)))]
        assert call.protocol == "http" and call.per_request <= 1


# ---- the call graph -----------------------------------------------------------------------------
def test_a_chain_of_exactly_8_hops_from_an_ingress_gateway_and_none_longer(seed: Topology) -> None:
    graph = callees(seed)
    from_gateways = [longest_from(graph, key(s)) for s in seed.services if s.gateway]
    assert max(from_gateways) == 8
    called = {t for targets in graph.values() for t in targets}
    roots = [k for k in graph if k not in called]
    assert max(longest_from(graph, r) for r in roots) <= 8


def test_every_deployment_receives_traffic(seed: Topology) -> None:
    """Reachable over HTTP calls from something with its own ingress traffic (no orphans)."""
    graph = callees(seed, "http")
    reached: set[Key] = set()
    todo: list[Key] = [key(s) for s in seed.services if s.ingress_rps > 0]
    while todo:
        node = todo.pop()
        if node not in reached:
            reached.add(node)
            todo.extend(graph[node])
    orphans = [key(s) for s in seed.services if s.kind == "deployment" and key(s) not in reached]
    assert orphans == []


def test_fan_out_is_modest_and_cross_cluster_calls_rare(seed: Topology) -> None:
    calls = [(s, c) for s in seed.services for c in s.calls]
    assert all(0 < c.per_request <= 1 for _, c in calls)
    assert max(len(s.calls) for s in seed.services) <= 8
    cross = [(s.name, c.service) for s, c in calls if c.service.split("/")[0] != s.cluster]
    assert 1 <= len(cross) <= len(calls) * 0.05
    cross_ns = [1 for s, c in calls if c.service.split("/")[1] != s.namespace]
    assert len(cross_ns) > len(calls) * 0.2, "cross-namespace calls are normal"


# ---- memory -------------------------------------------------------------------------------------
def test_critical_pods_have_no_room_for_their_sidecar(seed: Topology) -> None:
    critical = [s for s in deployments(seed) if s.criticality == "critical"]
    assert {s.name for s in critical} >= set(CRITICAL_FOUR)
    for s in critical:
        assert s.memory_limit_mi == 512, s.name
        assert 380 <= s.app_memory_mi <= 450, s.name
        assert 150 <= sidecar_mi(seed, s) <= 300, s.name
        assert s.app_memory_mi + sidecar_mi(seed, s) > s.memory_limit_mi, s.name


def test_a_fair_number_of_services_have_room(seed: Topology) -> None:
    fleet = deployments(seed)
    assert all(150 <= sidecar_mi(seed, s) <= 300 for s in fleet if s.name != "blackbox-exporter")
    fits = [s for s in fleet if not s.legacy and s.app_memory_mi + sidecar_mi(seed, s) <= s.memory_limit_mi]
    assert len(fits) >= len(fleet) // 3
    assert any(s.memory_limit_mi >= 1024 for s in fits)


# ---- in the lab ---------------------------------------------------------------------------------
def test_the_lab_runs_the_seed_healthy_at_rest(seed: Topology) -> None:
    lab = Lab(seed)
    lab.tick()
    described = [lab.describe(k) for k in lab.knobs]
    assert len(described) == len(seed.services)
    assert [d["name"] for d in described if d["success_rate"] != 1.0] == []
    idle = [d["name"] for d in described if d["kind"] == "deployment" and not d["requests_per_second"] > 0]
    assert idle == []
    assert all(d["available"] for d in described if d["kind"] == "deployment")


# ---- the generator ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generate_seed() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_seed", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_the_generator_is_deterministic_and_the_committed_file_is_its_output(generate_seed: ModuleType) -> None:
    first, second = generate_seed.generate(), generate_seed.generate()
    assert first == second
    assert SEED.read_text() == first, "seed.yaml is out of date: run include/lab/generate_seed.py"
    assert first.startswith("# GENERATED by include/lab/generate_seed.py")


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_the_generator_output_does_not_depend_on_hash_randomisation(hash_seed: str) -> None:
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": hash_seed}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "187 services" in result.stdout and "longest chain 8 hops" in result.stdout
