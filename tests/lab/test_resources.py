"""Per-container limits, ResourceQuota, LimitRange and nodes in the lab, as a real cluster admits, schedules and
OOM-kills pods (tests/component/headroom.yaml is the same cast, served)."""

from __future__ import annotations

from typing import Any

import pytest

from meshlab import resources as r
from meshlab.errors import ApiError
from meshlab.lab import Lab
from meshlab.store import Store
from meshlab.topology import TopologyError, parse_topology
from tests.lab.sim import Clock

STRATEGIC = "application/strategic-merge-patch+json"


def make_lab(**cluster: Any) -> tuple[Lab, Clock, Store]:
    namespaces = cluster.pop("namespaces", [])
    services = cluster.pop("services", [])
    topology = parse_topology({"name": "t", "mesh": {"sidecar_memory_mi": 80},
                               "clusters": [{"name": "lab", "namespaces": namespaces, **cluster}],
                               "services": services})
    lab = Lab(topology)
    return lab, Clock(lab), lab.clusters["lab"].store


def inject(s: Store, ns: str, name: str, annotations: dict[str, str] | None = None) -> None:
    s.patch(r.DEPLOYMENTS, ns, name, STRATEGIC, {"spec": {"template": {"metadata": {
        "labels": {"sidecar.istio.io/inject": "true"}, "annotations": annotations or {}}}}})


def pods(s: Store, ns: str, app: str) -> list[dict[str, Any]]:
    return [p for p in s.items(r.PODS, ns) if p["metadata"]["labels"].get("app") == app]


def proxy_of(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy")


def test_the_proxy_gets_istio_s_default_resources_and_its_own_limit_decides_its_oom() -> None:
    lab, clock, s = make_lab(services=[{"name": "app", "namespace": "shop", "app_memory_mi": 500,
                                        "sidecar_memory_mi": 300}])
    inject(s, "shop", "app")
    clock.run(8)
    new = [p for p in pods(s, "shop", "app") if any(c["name"] == "istio-proxy" for c in p["spec"]["containers"])]
    assert new and proxy_of(new[0])["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                                     "limits": {"cpu": "2000m", "memory": "1024Mi"}}
    # 500Mi of 512Mi in the app and 300Mi in the proxy: 800Mi in the pod, and nothing is over its own limit.
    assert all(c["restartCount"] == 0 for p in new for c in p["status"]["containerStatuses"])
    assert all(c["ready"] for p in new for c in p["status"]["containerStatuses"])


def test_a_proxy_over_its_own_limit_is_oomkilled_and_the_app_is_not() -> None:
    lab, clock, s = make_lab(services=[{"name": "app", "namespace": "shop", "app_memory_mi": 100,
                                        "sidecar_memory_mi": 300}])
    inject(s, "shop", "app", {"sidecar.istio.io/proxyMemoryLimit": "256Mi"})
    clock.run(10)
    new = [p for p in pods(s, "shop", "app") if "sidecar.istio.io/status" in p["metadata"]["annotations"]]
    proxy = proxy_of(new[0])
    assert proxy["resources"] == {"limits": {"memory": "256Mi"}, "requests": {"memory": "256Mi"}}, \
        "a limit alone: the request defaults to it"
    statuses = {c["name"]: c for c in new[0]["status"]["containerStatuses"]}
    assert statuses["istio-proxy"]["lastState"]["terminated"]["reason"] == "OOMKilled"
    assert "lastState" not in statuses["app"]


def test_a_quota_refuses_the_surge_pod_with_the_api_s_403_and_the_rollout_stalls() -> None:
    lab, clock, s = make_lab(
        namespaces=[{"name": "shop", "resource_quotas": [{"name": "compute", "hard": {"limits.memory": "3Gi"}}]}],
        services=[{"name": "app", "namespace": "shop", "replicas": 2, "memory_limit_mi": 512}])
    quota = s.get(r.RESOURCE_QUOTAS, "shop", "compute")
    assert quota["status"] == {"hard": {"limits.memory": "3Gi"}, "used": {"limits.memory": "1Gi"}}
    inject(s, "shop", "app")
    clock.run(5)
    rs_name = next(n for (ns, n), d in lab.clusters["lab"].controller.failed_create.items())
    # The first new pod (512Mi + the proxy's 1Gi) fits next to the two old ones (2.5Gi of 3Gi) and replaces one;
    # the second would take the namespace to 3.5Gi.
    message = (f'Error creating: pods "{rs_name}-" is forbidden: exceeded quota: compute, requested: '
               "limits.memory=1536Mi, used: limits.memory=2Gi, limited: limits.memory=3Gi")
    assert lab.clusters["lab"].controller.failed_create[("shop", rs_name)] == message
    dep = s.get(r.DEPLOYMENTS, "shop", "app")
    failure = {c["type"]: c for c in dep["status"]["conditions"]}["ReplicaFailure"]
    assert (failure["status"], failure["reason"], failure["message"]) == ("True", "FailedCreate", message)
    assert dep["status"]["updatedReplicas"] == 1 and dep["status"]["readyReplicas"] == 2, "half rolled, stalled"
    rs = s.get(r.REPLICA_SETS, "shop", rs_name)
    assert rs["status"]["conditions"][0]["reason"] == "FailedCreate"


def test_a_pod_created_over_the_quota_gets_the_real_status() -> None:
    lab, clock, s = make_lab(
        namespaces=[{"name": "shop", "resource_quotas": [{"name": "compute", "hard": {"pods": "1",
                                                                                       "requests.memory": "1Gi"}}]}])
    pod = {"metadata": {"name": "a"}, "spec": {"containers": [{"name": "c", "image": "x",
                                                               "resources": {"requests": {"memory": "64Mi"}}}]}}
    s.create(r.PODS, "shop", pod)
    with pytest.raises(ApiError) as info:
        s.create(r.PODS, "shop", {**pod, "metadata": {"name": "b"}})
    assert info.value.code == 403 and info.value.reason == "Forbidden"
    assert info.value.message == ('pods "b" is forbidden: exceeded quota: compute, requested: pods=1, used: pods=1, '
                                  "limited: pods=1")
    bare = {"metadata": {"name": "c"}, "spec": {"containers": [{"name": "nothing", "image": "x"}]}}
    with pytest.raises(ApiError, match=r'^pods "c" is forbidden: failed quota: compute: must specify '
                                       r"requests.memory for: nothing$"):
        s.create(r.PODS, "shop", bare)


def test_a_limit_range_defaults_the_app_not_the_injected_proxy_and_its_max_refuses_the_proxy() -> None:
    lab, clock, s = make_lab(
        namespaces=[{"name": "shop", "limit_ranges": [{"name": "limits", "limits": [{"max": {"memory": "512Mi"}}]}]}],
        services=[{"name": "app", "namespace": "shop", "replicas": 1}])
    stored = s.get(r.LIMIT_RANGES, "shop", "limits")["spec"]["limits"][0]
    assert stored["default"] == {"memory": "512Mi"} and stored["defaultRequest"] == {"memory": "512Mi"}, \
        "the API defaults default and defaultRequest from max"
    bare = s.create(r.PODS, "shop", {"metadata": {"name": "bare"}, "spec": {"containers": [{"name": "c",
                                                                                           "image": "x"}]}})
    assert bare["spec"]["containers"][0]["resources"] == {"limits": {"memory": "512Mi"},
                                                          "requests": {"memory": "512Mi"}}
    inject(s, "shop", "app")
    clock.run(3)
    failed = lab.clusters["lab"].controller.failed_create
    refusal = "maximum memory usage per Container is 512Mi, but limit is 1Gi."
    # LimitRanger checks init containers too: istio-init carries the proxy's resources; the errors are aggregated.
    assert list(failed.values()) == [
        f'Error creating: pods "{next(iter(failed))[1]}-" is forbidden: [{refusal}, {refusal}]']


def test_a_pod_no_node_has_room_for_stays_pending_unschedulable() -> None:
    # istiod requests 1Gi, the app's pod 512Mi: 512Mi left, and the injected pod requests 512Mi + 128Mi.
    lab, clock, s = make_lab(nodes=[{"name": "node-a", "memory": "2Gi"}],
                             services=[{"name": "app", "namespace": "shop", "replicas": 1, "memory_limit_mi": 1024}])
    nodes = s.list(r.NODES)
    assert [n["status"]["allocatable"]["memory"] for n in nodes] == ["2Gi"]
    [running] = pods(s, "shop", "app")
    assert running["spec"]["nodeName"] == "node-a"
    inject(s, "shop", "app")
    clock.run(5)
    pending = [p for p in pods(s, "shop", "app") if p["metadata"]["name"] != running["metadata"]["name"]]
    assert pending and pending[0]["status"]["phase"] == "Pending" and "nodeName" not in pending[0]["spec"]
    cond = pending[0]["status"]["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == ("PodScheduled", "False", "Unschedulable")
    assert cond["message"] == ("0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are "
                               "available: 1 No preemption victims found for incoming pod.")


def test_topology_quantities_are_checked() -> None:
    with pytest.raises(TopologyError, match=r"hard.*limits.memory: 'lots' is not a Kubernetes quantity"):
        make_lab(namespaces=[{"name": "shop", "resource_quotas": [{"hard": {"limits.memory": "lots"}}]}])
