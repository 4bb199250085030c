"""The provider's KubernetesHook (the kubernetes Python client) against the lab, as meshwave's tasks use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes.client.rest import ApiException

from meshstack.process import LabProcess
from tests.conftest import eventually

pytestmark = pytest.mark.component

PA_GROUP, PA_VERSION, PA_PLURAL = "security.istio.io", "v1", "peerauthentications"


@pytest.fixture
def hook(small_lab: LabProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW_CONN_K8S_LAB", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": small_lab.kubeconfig()}}))
    return KubernetesHook(conn_id="k8s_lab")


def strict_pa(mode: str = "STRICT") -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "auth", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "auth"}}, "mtls": {"mode": mode}}}


def test_read_label_restart_and_watch_the_rollout(hook) -> None:
    core, apps = hook.core_v1_client, hook.apps_v1_client
    assert {"default", "istio-system", "shop"} <= {n.metadata.name for n in core.list_namespace().items}
    labelled = core.patch_namespace("shop", {"metadata": {"labels": {"istio-injection": "enabled"}}})
    assert labelled.metadata.labels["istio-injection"] == "enabled"
    before = apps.read_namespaced_deployment("auth", "shop")
    patched = apps.patch_namespaced_deployment("auth", "shop", {"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2026-11-25T02:00:00Z"}}}}})
    assert patched.metadata.generation == before.metadata.generation + 1

    def rolled_out():
        dep = apps.read_namespaced_deployment("auth", "shop")
        pods = core.list_namespaced_pod("shop", label_selector="app=auth").items
        return (dep.status.observed_generation == dep.metadata.generation and dep.status.updated_replicas == 2
                and dep.status.available_replicas == 2 and len(pods) == 2
                and all({c.name for c in p.spec.containers} == {"auth", "istio-proxy"} for p in pods))

    eventually(rolled_out, timeout=30, what="auth rolled out with sidecars")


def test_peer_authentication_create_patch_get_delete(hook) -> None:
    created = hook.create_custom_object(PA_GROUP, PA_VERSION, PA_PLURAL, strict_pa(), namespace="shop")
    assert created["metadata"]["resourceVersion"]
    patched = hook.custom_object_client.patch_namespaced_custom_object(
        PA_GROUP, PA_VERSION, "shop", PA_PLURAL, "auth", {"spec": {"mtls": {"mode": "PERMISSIVE"}}})
    assert patched["spec"] == {"selector": {"matchLabels": {"app": "auth"}}, "mtls": {"mode": "PERMISSIVE"}}
    assert hook.get_custom_object(PA_GROUP, PA_VERSION, PA_PLURAL, "auth", namespace="shop") == patched
    with pytest.raises(ApiException) as conflict:
        hook.create_custom_object(PA_GROUP, PA_VERSION, PA_PLURAL, strict_pa(), namespace="shop")
    assert conflict.value.status == 409 and json.loads(conflict.value.body)["reason"] == "AlreadyExists"
    hook.delete_custom_object(PA_GROUP, PA_VERSION, PA_PLURAL, "auth", namespace="shop")
    with pytest.raises(ApiException) as missing:
        hook.get_custom_object(PA_GROUP, PA_VERSION, PA_PLURAL, "auth", namespace="shop")
    assert missing.value.status == 404
    body = json.loads(missing.value.body)
    assert body["kind"] == "Status" and body["message"] == 'peerauthentications.security.istio.io "auth" not found'


def test_stale_update_is_a_409_the_client_can_retry(hook) -> None:
    apps = hook.apps_v1_client
    dep = apps.read_namespaced_deployment("user", "shop")
    apps.patch_namespaced_deployment("user", "shop", {"metadata": {"labels": {"touched": "yes"}}})
    dep.spec.replicas = 3
    with pytest.raises(ApiException) as stale:
        apps.replace_namespaced_deployment("user", "shop", dep)
    assert stale.value.status == 409
    fresh = apps.read_namespaced_deployment("user", "shop")
    fresh.spec.replicas = 3
    assert apps.replace_namespaced_deployment("user", "shop", fresh).spec.replicas == 3
