"""The acceptance of the emergency rollback, on the seed's full fleet and a real Prometheus.

The seed's outage reproduced (namespace injection, restarts, then a mesh-wide STRICT policy in every cluster),
seen in Prometheus; then the emergency rollback's stage 1 and stage 3 functions, as the DAG runs them: every
service's application success rate is back above the floor, and the measured times are printed.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kubernetes import config

from meshstack.process import LabProcess, PrometheusProcess
from meshwave import emergency as em
from meshwave.kube import MeshKube
from meshwave.peer_auth import PREVIOUS_MTLS_ANNOTATION
from meshwave.prometheus import PrometheusSource
from tests.component.seed_outage import inject_namespaces, mesh_wide_strict
from tests.conftest import SEED, below, eventually

pytestmark = pytest.mark.component

CLUSTERS = ("prod-eu-1", "prod-us-1", "prod-ap-1")
SEED_HOURS = 72
WINDOW, FLOOR = "10s", 0.99
FLEET_SUCCESS = ('sum(rate(http_requests_total{{code!~"5.."}}[{w}])) / sum(rate(http_requests_total[{w}]))')


def fleet_success(prom: PrometheusProcess) -> float | None:
    result = prom.query(FLEET_SUCCESS.format(w=WINDOW))
    return float(result[0]["value"][1]) if result else None


def reproduce_outage(lab: LabProcess, prom: PrometheusProcess) -> None:
    """Day 3 (namespace-wide injection and restarts in prod-eu-1), day 5 (mesh-wide STRICT everywhere)."""
    inject_namespaces(lab, prom)
    for cluster in CLUSTERS:
        mesh_wide_strict(lab, cluster)


def test_seed_outage_recovered_by_stage_1_alone(tmp_path: Path) -> None:
    with LabProcess(SEED, tmp_path / "lab") as lab, PrometheusProcess([lab.metrics_target], tmp_path / "prom") as prom:
        kubes = {c: MeshKube(config.new_client_from_config(config_file=lab.kubeconfig(c)), c) for c in CLUSTERS}
        sources = {c: PrometheusSource(prom.url, cluster=c) for c in CLUSTERS}
        scope = em.Scope(CLUSTERS)
        eventually(lambda: fleet_success(prom) == 1.0, timeout=40, what="a healthy fleet in Prometheus")

        reproduce_outage(lab, prom)
        eventually(lambda: below(fleet_success(prom), 0.9), timeout=40, what="the fleet's success rate collapsing")
        outage = eventually(lambda: (p := em.check_health(sources, scope, FLOOR, WINDOW))["unhealthy"] and p,
                            timeout=30, what="unhealthy services in the per-workload query")
        cut_off = {r["service"] for r in outage["unhealthy"]}
        assert {"monitoring/blackbox-exporter", "external/batch-processor", "edge/api-gateway"} <= cut_off

        # Stage 1, as the DAG's mapped tasks run it: every cluster at once.
        started = time.time()
        with ThreadPoolExecutor(len(CLUSTERS)) as pool:
            results = list(pool.map(lambda k: em.relax_cluster(k, scope, "test run"), kubes.values()))
        stage1_start, stage1_end = em.stage1_window(results)
        stage1 = stage1_end - stage1_start
        assert all(r["changes"][0]["applied"] for r in results), results

        # Stage 3: poll until every service in scope with traffic is at or above the floor.
        healthy = eventually(lambda: (p := em.check_health(sources, scope, FLOOR, WINDOW))["healthy"] and p,
                             timeout=60, interval=1, what="every service healthy again",
                             describe=lambda: em.check_health(sources, scope, FLOOR, WINDOW)["unhealthy"])
        seen = healthy["at"] - stage1_start
        history = em.recovered_at(sources, scope, FLOOR, WINDOW, stage1_start, healthy["at"])
        assert history is not None
        recovered = history - stage1_start
        message = (f"seed outage (mesh-wide STRICT on {len(CLUSTERS)} clusters, {len(cut_off)} services below "
                   f"{FLOOR}): stage 1 took {stage1:.2f}s; every service healthy {recovered:.1f}s after stage 1 "
                   f"started (Prometheus history; first poll seeing it: {seen:.1f}s; application success rate over "
                   f"a {WINDOW} window; the seed took {SEED_HOURS} hours)")
        print(f"\n{message}")
        assert stage1 < 10, message
        assert 0 < recovered <= seen + 1 and recovered < 60, message
        assert started <= stage1_start
        assert healthy["counts"]["healthy"] >= 180, healthy["counts"]
        assert not any(r["status"] == "unhealthy" for r in healthy["rows"]), message

        # The object is kept, PERMISSIVE, with the previous mode annotated; a second run changes nothing.
        policy = kubes["prod-eu-1"].mtls.list("istio-system")[0]
        assert policy["spec"]["mtls"]["mode"] == "PERMISSIVE"
        assert json.loads(policy["metadata"]["annotations"][PREVIOUS_MTLS_ANNOTATION]) == {"mtls": "STRICT"}
        again = [em.relax_cluster(k, scope, "second run") for k in kubes.values()]
        assert [c for r in again for c in r["changes"]] == [], "idempotent: nothing STRICT is left to change"
