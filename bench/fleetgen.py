"""Generated fleets for the benchmarks: plans over the seed topology, and synthetic topologies of any size.

    .venv/bin/python bench/fleetgen.py plan-seed OUT.yaml              # the 187 seed deployments in waves
    .venv/bin/python bench/fleetgen.py topology 2000 OUT.yaml          # a 2,000-service topology
    .venv/bin/python bench/fleetgen.py plan 2000 OUT.yaml              # a plan over that topology

Deterministic: the same arguments always give the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEED_TOPOLOGY = ROOT / "include" / "lab" / "seed.yaml"
SETTINGS: dict[str, Any] = {  # the seed plan's defaults
    "injection": "workload", "soak_seconds": 30, "poke_interval_seconds": 5, "query_window_seconds": 20,
    "verify_seconds": 30, "strict_gate_timeout_seconds": 90, "rollout_timeout_seconds": 120,
    "breaches_to_fail": 2, "min_requests": 10, "on_no_data": "hold", "sidecar": {"expected_memory_mi": 150}}


def conn_suffix(cluster: str) -> str:
    return cluster.replace("-", "_")


def plan_clusters(clusters: list[str]) -> dict[str, dict[str, str]]:
    return {c: {"kubernetes_conn_id": f"meshlab_{conn_suffix(c)}", "prometheus_conn_id": "meshlab_prometheus"}
            for c in clusters}


def make_plan(migration: str, services: list[dict[str, str]], wave_size: int, batch_size: int,
              **settings: Any) -> dict[str, Any]:
    """A plan with `services` cut into waves of `wave_size`, `batch_size` in parallel."""
    clusters = sorted({s["cluster"] for s in services})
    waves = [{"name": f"wave-{i // wave_size + 1}", "services": services[i:i + wave_size]}
             for i in range(0, len(services), wave_size)]
    defaults = {**SETTINGS, "batch_size": batch_size, "max_failures": max(2, batch_size), **settings}
    return {"migration": migration, "clusters": plan_clusters(clusters), "defaults": defaults, "waves": waves}


def deployments(topology: dict[str, Any]) -> list[dict[str, str]]:
    """The topology's deployments (no gateways, nothing in the mesh's root namespace, nothing external)."""
    root = (topology.get("mesh") or {}).get("root_namespace", "istio-system")
    return [{"cluster": s.get("cluster") or topology["clusters"][0]["name"], "namespace": s.get("namespace", "default"),
             "workload": s["name"]}
            for s in topology["services"]
            if s.get("kind", "deployment") == "deployment" and not s.get("gateway") and s.get("namespace") != root]


def seed_plan(wave_size: int = 25, batch_size: int = 5) -> dict[str, Any]:
    services = deployments(yaml.safe_load(SEED_TOPOLOGY.read_text()))
    return make_plan("seed-full", services, wave_size, batch_size)


def synthetic_topology(n: int, clusters: int = 4, namespaces: int = 10, ingress_rps: float = 50) -> dict[str, Any]:
    """`n` deployments over `clusters` x `namespaces`; in each namespace a binary call tree under the cluster's
    ingress gateway (service k calls 2k+1 and 2k+2), so every service gets traffic and chains stay short."""
    names = [f"c{c + 1}" for c in range(clusters)]
    per_ns: dict[tuple[str, str], list[str]] = {}
    for i in range(n):
        cluster, ns = names[i % clusters], f"ns{(i // clusters) % namespaces + 1}"
        per_ns.setdefault((cluster, ns), []).append(f"svc-{i + 1:05d}")
    services: list[dict[str, Any]] = []
    for cluster in names:
        roots = [f"{ns}/{members[0]}" for (c, ns), members in per_ns.items() if c == cluster]
        services.append({"name": "istio-ingressgateway", "cluster": cluster, "namespace": "istio-system",
                         "gateway": True, "replicas": 1, "ingress_rps": ingress_rps, "latency_ms": 1,
                         "calls": [{"service": r, "per_request": 1.0 / len(roots)} for r in roots]})
    for (cluster, ns), members in per_ns.items():
        for k, name in enumerate(members):
            calls = [{"service": members[j], "per_request": 0.6} for j in (2 * k + 1, 2 * k + 2) if j < len(members)]
            services.append({"name": name, "cluster": cluster, "namespace": ns, "replicas": 2, "latency_ms": 5,
                             "app_memory_mi": 150, **({"calls": calls} if calls else {})})
    return {"name": f"synthetic-{n}", "mesh": {"sidecar_memory_mi": 80, "sidecar_latency_ms": 2},
            "clusters": [{"name": c, "namespaces": [{"name": f"ns{k + 1}"} for k in range(namespaces)]}
                         for c in names],
            "services": services}


def synthetic_plan(n: int, wave_size: int = 100, batch_size: int = 10, **settings: Any) -> dict[str, Any]:
    return make_plan(f"synthetic-{n}", deployments(synthetic_topology(n)), wave_size, batch_size, **settings)


def write(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=120))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("plan-seed", "topology", "plan"))
    parser.add_argument("args", nargs="+")
    args = parser.parse_args()
    if args.what == "plan-seed":
        write(seed_plan(), Path(args.args[0]))
    elif args.what == "topology":
        write(synthetic_topology(int(args.args[0])), Path(args.args[1]))
    else:
        write(synthetic_plan(int(args.args[0])), Path(args.args[1]))


if __name__ == "__main__":
    main()
