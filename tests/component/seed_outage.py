"""The seed's outage, step by step, on a seed lab: shared by the outage replay and the emergency rollback test."""

from __future__ import annotations

from kubernetes import client, config

from meshstack.process import LabProcess, PrometheusProcess
from tests.conftest import eventually

INJECTED = ("identity", "payments", "commerce", "platform")  # "kubectl label namespace production istio-injection"
MESH_STRICT = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}}


def inject_namespaces(lab: LabProcess, prom: PrometheusProcess, cluster: str = "prod-eu-1") -> None:
    """Day 3: namespace-wide injection and a restart of everything in those namespaces; wait for the OOMKills."""
    api = config.new_client_from_config(config_file=lab.kubeconfig(cluster))
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    for ns in INJECTED:
        core.patch_namespace(ns, {"metadata": {"labels": {"istio-injection": "enabled"}}})
        for dep in apps.list_namespaced_deployment(ns).items:
            apps.patch_namespaced_deployment(dep.metadata.name, ns, {"spec": {"template": {"metadata": {
                "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-25T14:00:00Z"}}}}})
    oom = f'count(kube_pod_container_status_last_terminated_reason{{cluster="{cluster}", reason="OOMKilled"}})'
    eventually(lambda: prom.query(oom), timeout=60, what="undersized critical pods OOMKilled")


def mesh_wide_strict(lab: LabProcess, cluster: str) -> None:
    """Day 5, 2:47 PM: the mesh-wide STRICT policy."""
    custom = client.CustomObjectsApi(config.new_client_from_config(config_file=lab.kubeconfig(cluster)))
    custom.create_namespaced_custom_object("security.istio.io", "v1", "istio-system", "peerauthentications",
                                           MESH_STRICT)
