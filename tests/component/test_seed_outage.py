"""The seed's outage, replayed on the full seed fleet and seen in a real Prometheus, then recovered."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client, config

from meshlab.process import LabProcess, PrometheusProcess
from tests.conftest import SEED, below, eventually

pytestmark = pytest.mark.component

CLUSTER = "prod-eu-1"
INJECTED = ("identity", "payments", "commerce", "platform")  # "kubectl label namespace production istio-injection"
SUCCESS = ('sum(rate(http_requests_total{{cluster="{c}", {sel}code!~"5.."}}[10s])) / '
           'sum(rate(http_requests_total{{cluster="{c}", {sel}}}[10s]))')


def success(prom: PrometheusProcess, selector: str = "") -> float | None:
    result = prom.query(SUCCESS.format(c=CLUSTER, sel=selector))
    return float(result[0]["value"][1]) if result else None


def test_mesh_wide_strict_reproduces_the_outage_and_permissive_recovers(tmp_path: Path) -> None:
    with LabProcess(SEED, tmp_path / "lab") as lab, PrometheusProcess([lab.metrics_target], tmp_path / "prom") as prom:
        api = config.new_client_from_config(config_file=lab.kubeconfig(CLUSTER))
        core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
        eventually(lambda: success(prom) == 1.0, timeout=40, what="a healthy fleet in Prometheus")

        # Day 3: namespace-wide injection and a restart of everything in those namespaces.
        for ns in INJECTED:
            core.patch_namespace(ns, {"metadata": {"labels": {"istio-injection": "enabled"}}})
            for dep in apps.list_namespaced_deployment(ns).items:
                apps.patch_namespaced_deployment(dep.metadata.name, ns, {"spec": {"template": {"metadata": {
                    "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-25T14:00:00Z"}}}}})
        oom = 'count(kube_pod_container_status_last_terminated_reason{cluster="prod-eu-1", reason="OOMKilled"})'
        eventually(lambda: prom.query(oom), timeout=60, what="undersized critical pods OOMKilled")
        assert success(prom) == 1.0, "PERMISSIVE: sidecars or not, everyone still talks"

        # Day 5, 2:47 PM: the mesh-wide STRICT policy.
        custom.create_namespaced_custom_object("security.istio.io", "v1", "istio-system", "peerauthentications", {
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}})
        eventually(lambda: below(success(prom), 0.9), timeout=40, what="the fleet's success rate collapsing")
        for caller, ns in (("blackbox-exporter", "monitoring"), ("batch-processor", "external"),
                           ("api-gateway", "edge")):
            eventually(lambda c=caller, n=ns: below(success(prom, f'namespace="{n}", app="{c}", '), 0.5),
                       timeout=30, what=f"{caller} cut off")

        # The fix that works: back to PERMISSIVE (no restart needed).
        custom.patch_namespaced_custom_object("security.istio.io", "v1", "istio-system", "peerauthentications",
                                              "default", {"spec": {"mtls": {"mode": "PERMISSIVE"}}})
        eventually(lambda: success(prom) == 1.0, timeout=40, what="the fleet recovering under PERMISSIVE")
