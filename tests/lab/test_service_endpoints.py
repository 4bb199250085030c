"""A Service's traffic over every ready pod it selects, across Deployments: a canary copy of a Deployment (same app
label, one more label in its own selector, a sidecar injected) takes its pods' share, Istio names the Deployment
that served each request, the application's metrics carry the pod, and deleting the copy gives the primary all of it
back. Each read is what Prometheus would scrape (the exposition's samples)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshlab import resources as r
from meshlab.apiserver import ApiServer
from meshlab.lab import Lab
from meshlab.store import Store
from meshlab.topology import TopologyError, parse_topology
from tests.lab.sim import Clock
from tests.lab.test_gate_faults import increase, scraped

CANARY = "meshwave.io/canary"
INJECT = "sidecar.istio.io/inject"
STRATEGIC = "application/strategic-merge-patch+json"
DEPLOYMENTS = "/apis/apps/v1/namespaces/shop/deployments"
RPS = 40  # front's ingress, and so its calls into api
TOPOLOGY = {
    "clusters": [{"name": "c", "namespaces": [{"name": "shop"}]}],
    "services": [
        {"name": "front", "namespace": "shop", "replicas": 1, "ingress_rps": RPS, "calls": [{"service": "api"}]},
        {"name": "api", "namespace": "shop", "replicas": 3, "app_memory_mi": 300},
    ],
}
Labels = dict[str, str]


@pytest.fixture
def lab() -> Lab:
    """front (1 pod, a sidecar through its pod label) calls api (3 pods, no sidecar, namespace not injected)."""
    lab = Lab(parse_topology(TOPOLOGY))
    store(lab).patch(r.DEPLOYMENTS, "shop", "front", STRATEGIC,
                     {"spec": {"template": {"metadata": {"labels": {INJECT: "true"}}}}})
    return lab


@pytest.fixture
def clock(lab: Lab) -> Clock:
    clock = Clock(lab)
    clock.run(10)  # front's rollout to its injected pod
    return clock


def store(lab: Lab) -> Store:
    return lab.clusters["c"].store


def canary_of(lab: Lab, name: str, replicas: int = 1) -> dict[str, Any]:
    """A copy of Deployment `name`, as meshwave's canary step writes it: the same pod template plus the canary label
    (in its selector too) and the injection label, so the Service `name` selects its pods as well."""
    primary = store(lab).get(r.DEPLOYMENTS, "shop", name)
    template = copy.deepcopy(primary["spec"]["template"])
    template["metadata"]["labels"].update({CANARY: "true", INJECT: "true"})
    selector = {**primary["spec"]["selector"]["matchLabels"], CANARY: "true"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"{name}-canary", "namespace": "shop", "labels": {"app": name, CANARY: "true"}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": selector}, "template": template}}


def add_canary(lab: Lab, clock: Clock) -> None:
    store(lab).create(r.DEPLOYMENTS, "shop", canary_of(lab, "api"))
    clock.run(5)


def pod_names(lab: Lab, deployment: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in store(lab).pods_of("shop", deployment))


def containers(lab: Lab, deployment: str) -> list[list[str]]:
    return [[c["name"] for c in p["spec"]["containers"]] for p in store(lab).pods_of("shop", deployment)]


def by(lab: Lab, metric: str, label: str, **where: str) -> dict[str, float]:
    """A counter's samples summed by one label, over the samples whose labels match `where`."""
    totals: dict[str, float] = {}
    for family in lab.telemetry.families(lab.metric_sources()):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in where.items()):
                key = sample.labels.get(label, "")
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def increase_by(lab: Lab, clock: Clock, seconds: float, metric: str, label: str, **where: str) -> dict[str, float]:
    before = by(lab, metric, label, **where)
    clock.run(seconds)
    after = by(lab, metric, label, **where)
    return {key: after[key] - before.get(key, 0.0) for key in after if after[key] - before.get(key, 0.0) > 1e-9}


def into_api(reporter: str, **labels: str) -> dict[str, str]:
    return {"reporter": reporter, "destination_service_name": "api", **labels}


# ---- the API server: overlapping selectors, ownership, garbage collection ------------------------------------------
async def _calls(store: Store, requests: list[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    async with TestClient(TestServer(ApiServer(store).app)) as client:
        answers = []
        for method, path, body in requests:
            response = await client.request(method, path, json=body)
            answers.append((response.status, await response.json(content_type=None)))
        return answers


def call(store: Store, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    [answer] = asyncio.run(_calls(store, [(method, path, body)]))
    return answer


def test_an_overlapping_deployment_is_accepted_counts_its_own_pods_and_its_deletion_collects_them(
        lab: Lab, clock: Clock) -> None:
    code, created = call(store(lab), "POST", DEPLOYMENTS, canary_of(lab, "api"))
    assert code == 201, created  # Kubernetes does not refuse a selector that overlaps another Deployment's
    clock.run(5)
    primary, canary = (store(lab).get(r.DEPLOYMENTS, "shop", n)["status"] for n in ("api", "api-canary"))
    assert (primary["replicas"], primary["availableReplicas"]) == (3, 3), "the canary's pod is not the primary's"
    assert (canary["replicas"], canary["availableReplicas"]) == (1, 1)
    assert containers(lab, "api") == [["api"]] * 3 and containers(lab, "api-canary") == [["api", "istio-proxy"]]
    owners = {rs["metadata"]["name"]: rs["metadata"]["ownerReferences"][0]["name"]
              for rs in store(lab).list(r.REPLICA_SETS, "shop", "app=api")}
    assert sorted(owners.values()) == ["api", "api-canary"]
    for rs, deployment in owners.items():
        owned = [p for p in store(lab).list(r.PODS, "shop", "app=api") if p["metadata"]["ownerReferences"][0]["name"]
                 == rs]
        assert sorted(p["metadata"]["name"] for p in owned) == pod_names(lab, deployment)
        assert store(lab).get(r.REPLICA_SETS, "shop", rs)["status"]["replicas"] == len(owned)
    assert len(store(lab).list(r.PODS, "shop", "app=api")) == 4, "the Service selects all four"

    # kubernetes' delete_namespaced_deployment: DELETE without options, the apps/v1 default (background) propagation
    code, _ = call(store(lab), "DELETE", f"{DEPLOYMENTS}/api-canary")
    assert code == 200
    assert [rs for rs, d in owners.items() if d == "api-canary" and store(lab).peek(r.REPLICA_SETS, "shop", rs)] == []
    assert pod_names(lab, "api-canary") == [] and len(store(lab).list(r.PODS, "shop", "app=api")) == 3
    clock.run(2)
    assert store(lab).get(r.DEPLOYMENTS, "shop", "api")["status"]["availableReplicas"] == 3


# ---- traffic over the Service's endpoints -----------------------------------------------------------------------
def test_the_canarys_one_pod_in_four_takes_a_quarter_and_istio_names_the_deployment_that_served(
        lab: Lab, clock: Clock) -> None:
    add_canary(lab, clock)
    [canary_pod] = pod_names(lab, "api-canary")
    served = increase_by(lab, clock, 10, "http_requests_total", "pod", app="api")
    assert set(served) == {canary_pod, *pod_names(lab, "api")}, "every ready pod the Service selects serves"
    assert sum(served.values()) == pytest.approx(10 * RPS, rel=0.01)
    assert all(rate == pytest.approx(10 * RPS / 4, rel=0.01) for rate in served.values()), "an even spread per pod"

    # Only the canary's pod has a proxy: the destination reports name it, never the primary.
    destination = increase_by(lab, clock, 10, "istio_requests_total", "destination_workload",
                              **into_api("destination"))
    assert set(destination) == {"api-canary"} and destination["api-canary"] == pytest.approx(10 * RPS / 4, rel=0.01)
    # front's proxy reports both: mutual TLS into the canary, plaintext past no proxy into the primary's pods.
    source = increase_by(lab, clock, 10, "istio_requests_total", "destination_workload", **into_api("source"))
    assert source == pytest.approx({"api": 10 * RPS * 3 / 4, "api-canary": 10 * RPS / 4}, rel=0.01)
    reported = [s.labels for f in lab.telemetry.families(lab.metric_sources()) for s in f.samples
                if s.name == "istio_requests_total" and s.labels["destination_workload"] == "api-canary"]
    assert reported and all(labels["destination_service"] == "api.shop.svc.cluster.local"
                            and labels["destination_app"] == "api" and labels["source_workload"] == "front"
                            for labels in reported), "the Service, the app label and the caller stay as they are"
    assert lab.describe(("c", "shop", "api"))["sidecar_fraction"] == 0.25


def test_a_dropping_proxy_fails_only_the_canarys_share(lab: Lab, clock: Clock) -> None:
    add_canary(lab, clock)
    lab.set_knobs(("c", "shop", "api"), {"proxy_drop": 1.0})
    clock.run(1)
    failed = increase_by(lab, clock, 10, "istio_requests_total", "destination_workload",
                         **into_api("destination", response_code="503", response_flags="UF"))
    assert failed == pytest.approx({"api-canary": 10 * RPS / 4}, rel=0.01)
    assert increase(clock, 10, lambda: scraped(lab, "istio_requests_total", lambda found: found.get(
        "destination_service_name") == "api" and found["reporter"] == "destination" and found["response_code"]
        != "503")) == 0.0, "the canary's proxy fails all it accepts"
    primary = set(pod_names(lab, "api"))
    codes = increase_by(lab, clock, 10, "http_requests_total", "code", app="api")
    pods = increase_by(lab, clock, 10, "http_requests_total", "pod", app="api")
    assert codes == pytest.approx({"200": 10 * RPS * 3 / 4}, rel=0.01), "the primary's pods serve normally, no 5xx"
    assert set(pods) == primary, "nothing reaches the canary's app"
    assert lab.flows.workloads[("c", "shop", "front")].ok == pytest.approx(0.75), "the caller sees the canary's share"


def test_the_app_metrics_carry_the_pod_and_add_up_to_what_reached_the_app(lab: Lab, clock: Clock) -> None:
    add_canary(lab, clock)
    served = increase_by(lab, clock, 10, "http_requests_total", "pod", app="api")
    reached = lab.flows.workloads[("c", "shop", "api")].reached
    assert sum(served.values()) == pytest.approx(10 * reached, rel=0.01) and "" not in served
    counted = increase_by(lab, clock, 10, "http_request_duration_seconds_count", "pod", app="api")
    assert counted == pytest.approx(served, rel=0.01), "the histogram counts what the counter counts, per pod"
    front = by(lab, "http_requests_total", "pod", app="front")
    assert set(front) == set(pod_names(lab, "front")), "front's one pod serves its ingress"
    with pytest.raises(TopologyError, match="'pod' is not a Prometheus label name the app metrics can use"):
        lab.set_knobs(("c", "shop", "api"), {"app_metrics_label": "pod"})


def test_a_port_no_proxy_captures_spreads_over_every_pod_and_only_the_caller_reports(lab: Lab, clock: Clock) -> None:
    add_canary(lab, clock)
    lab.set_knobs(("c", "shop", "api"), {"bypass_ports": [8080]})
    clock.run(1)
    served = increase_by(lab, clock, 10, "http_requests_total", "pod", app="api")
    assert len(served) == 4 and all(rate == pytest.approx(10 * RPS / 4, rel=0.01) for rate in served.values())
    assert increase_by(lab, clock, 10, "istio_requests_total", "destination_workload",
                       **into_api("destination")) == {}
    source = increase_by(lab, clock, 10, "istio_requests_total", "destination_workload", **into_api("source"))
    assert source == pytest.approx({"api": 10 * RPS * 3 / 4, "api-canary": 10 * RPS / 4}, rel=0.01)


def test_the_copy_runs_the_same_app(lab: Lab, clock: Clock) -> None:
    add_canary(lab, clock)
    memory = by(lab, "container_memory_working_set_bytes", "pod", namespace="shop", container="api")
    [canary_pod] = pod_names(lab, "api-canary")
    assert memory[canary_pod] == 300 * 2**20 == memory[pod_names(lab, "api")[0]]
    lab.set_knobs(("c", "shop", "api"), {"app_memory_mi": 350})
    assert by(lab, "container_memory_working_set_bytes", "pod", container="api")[canary_pod] == 350 * 2**20
    lab.set_knobs(("c", "shop", "api"), {"legacy": True})
    clock.run(5)
    [status] = [s for p in store(lab).pods_of("shop", "api-canary") for s in p["status"]["containerStatuses"]
                if s["name"] == "api"]
    assert status["lastState"]["terminated"]["reason"] == "Error", "a legacy app crash-loops next to its proxy"


def test_deleting_the_copy_gives_the_primary_all_the_traffic_back(lab: Lab, clock: Clock) -> None:
    add_canary(lab, clock)
    [canary_pod] = pod_names(lab, "api-canary")
    store(lab).delete(r.DEPLOYMENTS, "shop", "api-canary")
    clock.run(1)
    served = increase_by(lab, clock, 10, "http_requests_total", "pod", app="api")
    assert set(served) == set(pod_names(lab, "api")) and len(served) == 3
    assert all(rate == pytest.approx(10 * RPS / 3, rel=0.01) for rate in served.values())
    assert canary_pod not in by(lab, "http_requests_total", "pod", app="api"), "a deleted pod is no longer scraped"
    assert increase_by(lab, clock, 10, "istio_requests_total", "destination_workload",
                       **into_api("destination")) == {}
    assert increase_by(lab, clock, 10, "istio_requests_total", "destination_workload",
                       **into_api("source")) == pytest.approx({"api": 10 * RPS}, rel=0.01)
    assert lab.describe(("c", "shop", "api"))["sidecar_fraction"] == 0.0
