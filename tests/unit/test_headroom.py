"""meshwave.headroom's arithmetic: the proxy's sizing as Istio's template writes it, the rollout's extra, and what
quotas, limit ranges and nodes say of it (the same rules the lab enforces: tests/lab/test_resources.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meshwave import headroom as h

MI = 2**20
TEMPLATE = h.ISTIO_DEFAULT_RESOURCES


def test_no_annotation_takes_the_template_whole() -> None:
    proxy = h.proxy_sizing({}, TEMPLATE, "Istio's defaults")
    assert proxy.resources == {"requests": {"cpu": Decimal("0.1"), "memory": 128 * MI},
                               "limits": {"cpu": Decimal(2), "memory": 1024 * MI}}


def test_any_annotation_takes_only_the_annotations_a_request_alone_has_no_limit() -> None:
    proxy = h.proxy_sizing({"sidecar.istio.io/proxyMemory": "160Mi"}, TEMPLATE, "x")
    assert proxy.resources == {"requests": {"memory": 160 * MI}, "limits": {}}
    assert h.check_expected_memory(proxy, 4000).startswith("the istio-proxy container has no memory limit")


def test_a_limit_alone_makes_the_request_equal_to_it() -> None:
    proxy = h.proxy_sizing({"sidecar.istio.io/proxyMemoryLimit": "256Mi"}, TEMPLATE, "x")
    assert proxy.get("requests", "memory") == proxy.get("limits", "memory") == 256 * MI
    assert proxy.get("requests", "cpu") is None


@pytest.mark.parametrize(("spec", "surge"), [({"replicas": 2}, 1), ({"replicas": 10}, 3), ({"replicas": 4, "strategy": {
    "rollingUpdate": {"maxSurge": 0}}}, 0), ({"replicas": 4, "strategy": {"type": "Recreate"}}, 0),
    ({"replicas": 3, "strategy": {"rollingUpdate": {"maxSurge": "50%"}}}, 2)])
def test_surge_as_the_deployment_controller_resolves_it(spec: dict, surge: int) -> None:
    assert h.surge_of(spec) == surge


def test_the_rollout_needs_every_replica_s_proxy_plus_whole_surge_pods() -> None:
    pod = h.pod_resources([{"resources": {"requests": {"memory": "256Mi"}, "limits": {"memory": "512Mi"}}}])
    extra = h.Rollout(3, 1, pod).extra(h.proxy_sizing({}, TEMPLATE, "x"))
    assert extra["limits.memory"] == 3 * 1024 * MI + (512 + 1024) * MI
    assert extra["requests.memory"] == extra["memory"] == 3 * 128 * MI + (256 + 128) * MI
    assert extra["pods"] == 1


def test_limit_range_refusals_are_the_api_s_words() -> None:
    lr = {"metadata": {"name": "limits", "namespace": "shop"},
          "spec": {"limits": [{"type": "Container", "max": {"memory": "512Mi", "cpu": "1"}, "min": {"cpu": "200m"}}]}}
    refusals = h.limit_range_refusals(h.proxy_sizing({}, TEMPLATE, "x"), [lr])
    assert refusals == ["LimitRange shop/limits: minimum cpu usage per Container is 200m, but request is 100m.",
                        "LimitRange shop/limits: maximum memory usage per Container is 512Mi, but limit is 1024Mi.",
                        "LimitRange shop/limits: maximum cpu usage per Container is 1000m, but limit is 2000m."]
    unlimited = h.proxy_sizing({"sidecar.istio.io/proxyMemory": "64Mi"}, TEMPLATE, "x")
    assert "maximum memory usage per Container is 512Mi.  No limit is specified." in \
        h.limit_range_refusals(unlimited, [lr])[1]


def test_a_quota_on_memory_limits_needs_a_proxy_that_sets_one() -> None:
    quota = {"metadata": {"name": "compute", "namespace": "shop"}, "spec": {"hard": {"limits.memory": "100Gi"}}}
    unlimited = h.proxy_sizing({"sidecar.istio.io/proxyMemory": "64Mi"}, TEMPLATE, "the annotations")
    [refusal] = h.quota_refusals([quota], unlimited, h.Rollout(2, 1, h.pod_resources([])))
    assert refusal.startswith("ResourceQuota shop/compute tracks limits.memory and the istio-proxy container sets "
                              "none (the sidecar.istio.io/proxy* annotations)")


def test_a_quota_with_room_passes_and_pods_count_too() -> None:
    quota = {"metadata": {"name": "q", "namespace": "shop"},
             "status": {"hard": {"limits.memory": "10Gi", "pods": "3"}, "used": {"limits.memory": "1Gi", "pods": "2"}}}
    proxy = h.proxy_sizing({}, TEMPLATE, "x")
    assert h.quota_refusals([quota], proxy, h.Rollout(2, 1, h.pod_resources([]))) == []
    [refusal] = h.quota_refusals([quota], proxy, h.Rollout(2, 2, h.pod_resources([])))
    assert refusal.startswith("ResourceQuota shop/q: pods hard 3, used 2, free 1 < 2 needed")


def test_node_room_is_allocatable_minus_the_bound_pods_requests() -> None:
    nodes = [{"metadata": {"name": "a"}, "status": {"allocatable": {"cpu": "4", "memory": "8Gi"}}},
             {"metadata": {"name": "b"}, "spec": {"unschedulable": True},
              "status": {"allocatable": {"cpu": "4", "memory": "8Gi"}}}]
    pods = [{"spec": {"nodeName": "a", "containers": [{"resources": {"requests": {"cpu": "1", "memory": "7Gi"}}}]}},
            {"spec": {"nodeName": "a", "containers": [{"resources": {"requests": {"memory": "1Gi"}}}]},
             "status": {"phase": "Succeeded"}}]
    room = h.node_room(nodes, pods)
    assert room == {"cpu": 3, "memory": 1024 * MI}
    proxy = h.proxy_sizing({}, TEMPLATE, "x")
    pod = h.pod_resources([{"resources": {"requests": {"memory": "512Mi"}}}])
    assert h.node_refusals(room, proxy, h.Rollout(2, 1, pod), 2) == [], "2 x 128Mi + (512Mi + 128Mi) = 896Mi fits"
    assert h.node_refusals(room, proxy, h.Rollout(6, 1, pod), 2) == [
        "the 2 node(s) have 1024Mi of allocatable memory not yet requested < 1408Mi requested by a proxy for each of "
        "6 replicas plus 1 surge pod(s) of the rollout: the new pods would stay Pending (Unschedulable)"]
