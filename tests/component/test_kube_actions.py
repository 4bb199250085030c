"""meshwave.kube against the lab (include/lab/small.yaml): injection, rollouts, rollback, mTLS, dry run, errors.

The module lab is shared by tests that touch disjoint workloads and never label the shop namespace; namespace
mode and the stopped lab get labs of their own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshstack.process import LabProcess
from meshwave.kube import (
    ClusterUnreachable,
    InjectionBlocked,
    MeshKube,
    NotFound,
    RolloutState,
    WorkloadNotFound,
)
from tests.component.kubes import api_client
from tests.conftest import SMALL, eventually

pytestmark = pytest.mark.component

MI = 2**20




def settle(kube: MeshKube, ns: str, name: str, expect_proxy: bool | None, timeout: float = 30) -> RolloutState:
    """Poll the rollout until it is done or failed."""
    def finished() -> RolloutState | None:
        verdict = kube.rollout(ns, name, expect_proxy)
        return None if verdict.status == "progressing" else verdict
    return eventually(finished, timeout=timeout, interval=0.25, what=f"rollout of {ns}/{name}")  # type: ignore[return-value]


def raw_deployment(kube: MeshKube, ns: str, name: str) -> dict[str, Any]:
    return json.loads(kube.apps.read_namespaced_deployment(name, ns, _preload_content=False).data)


def test_hook_api_client_reads_the_workload(lab: LabProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW_CONN_K8S_LAB", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": lab.kubeconfig()}}))
    kube = MeshKube(KubernetesHook(conn_id="k8s_lab").api_client, "lab")
    assert kube.ping() == "v1.32.0-meshlab"
    user = kube.workload("shop", "user")
    assert (user.replicas, user.app_container, user.memory_limit_bytes, user.memory_request_bytes) == (
        2, "user", 512 * MI, 256 * MI)
    assert (user.pods_total, user.pods_ready, user.pods_with_proxy) == (2, 2, 0)
    assert user.generation == user.observed_generation and len(user.new_pods) == 2
    assert user.template_labels == {"app": "user", "version": "v1"}


def test_workload_mode_injects_and_a_second_run_changes_nothing(kube: MeshKube) -> None:
    [change] = kube.ensure_injected("shop", "auth", "workload")
    assert change.applied and change.action == "label-workload" and change.target == "deployment shop/auth"
    assert change.request is not None and (change.request.verb, change.request.path, change.request.content_type) == (
        "PATCH", "/apis/apps/v1/namespaces/shop/deployments/auth", "application/strategic-merge-patch+json")
    assert change.request.body == {"spec": {"template": {"metadata": {"labels": {"sidecar.istio.io/inject": "true"}}}}}
    assert (change.before, change.after) == ({"sidecar.istio.io/inject": None}, {"sidecar.istio.io/inject": "true"})
    verdict = settle(kube, "shop", "auth", expect_proxy=True)
    assert verdict.done, verdict
    assert (verdict.with_proxy, verdict.proxies_ready) == (2, 2)
    generation = raw_deployment(kube, "shop", "auth")["metadata"]["generation"]
    again = kube.ensure_injected("shop", "auth", "workload")
    assert not any(c.applied for c in again) and again[0].reason == "already injected"
    assert raw_deployment(kube, "shop", "auth")["metadata"]["generation"] == generation


def test_undersized_payment_fails_fast_then_rollback_removes_the_sidecars(kube: MeshKube) -> None:
    started = time.monotonic()
    assert kube.ensure_injected("shop", "payment", "workload")[0].applied
    verdict = settle(kube, "shop", "payment", expect_proxy=True, timeout=20)
    elapsed = time.monotonic() - started
    assert verdict.failed and verdict.reason == "OOMKilled", verdict
    # The sidecar (150Mi) is over its own limit (128Mi): the istio-proxy container is the one OOMKilled.
    assert verdict.pod and verdict.pod.startswith("payment-") and verdict.container == "istio-proxy"
    assert elapsed < 15, f"OOM seen after {elapsed:.1f}s; the lab's progress deadline is 600s"
    # A retried inject must not restart a rollout that has failed.
    retry = kube.ensure_injected("shop", "payment", "workload")
    assert not any(c.applied for c in retry) and "failed" in retry[0].reason

    [rollback] = kube.remove_injection("shop", "payment")
    assert rollback.applied and rollback.action == "remove-injection"
    assert rollback.after == {"sidecar.istio.io/inject": "false"}
    verdict = settle(kube, "shop", "payment", expect_proxy=False)
    assert verdict.done, verdict
    payment = kube.workload("shop", "payment")
    assert payment.pods_total == 2 and payment.pods_with_proxy == 0 and payment.pods_ready == 2
    again = kube.remove_injection("shop", "payment")
    assert not any(c.applied for c in again) and again[0].reason == "injection already removed"


def test_sidecar_resources_and_exclusions_are_idempotent(kube: MeshKube) -> None:
    sized = kube.ensure_sidecar_resources("shop", "ledger", memory="64Mi", memory_limit="256Mi", cpu="50m")
    assert sized.applied and sized.after == {"sidecar.istio.io/proxyCPU": "50m", "sidecar.istio.io/proxyMemory": "64Mi",
                                             "sidecar.istio.io/proxyMemoryLimit": "256Mi"}
    assert not kube.ensure_sidecar_resources("shop", "ledger", memory="64Mi", memory_limit="256Mi").applied
    with pytest.raises(ValueError, match="above its limit"):
        kube.ensure_sidecar_resources("shop", "ledger", memory="512Mi")
    excluded = kube.ensure_exclusions("shop", "ledger", inbound_ports=[5432, 3306], outbound_ports=[3306])
    assert excluded.applied
    assert not kube.ensure_exclusions("shop", "ledger", inbound_ports=[3306, 5432]).applied
    annotations = kube.workload("shop", "ledger").template_annotations
    assert annotations["traffic.sidecar.istio.io/excludeInboundPorts"] == "3306,5432"
    assert annotations["traffic.sidecar.istio.io/excludeOutboundPorts"] == "3306"
    assert annotations["sidecar.istio.io/proxyMemoryLimit"] == "256Mi"
    cleared = kube.ensure_exclusions("shop", "ledger", outbound_ports=[])
    assert cleared.applied
    assert "traffic.sidecar.istio.io/excludeOutboundPorts" not in kube.workload("shop", "ledger").template_annotations
    assert settle(kube, "shop", "ledger", expect_proxy=False).done


def versions(kube: MeshKube, workload: str) -> dict[str, Any]:
    ns = json.loads(kube.core.read_namespace("shop", _preload_content=False).data)
    policies = kube.mtls.list("shop")
    return {"namespace": ns["metadata"]["resourceVersion"],
            "deployment": raw_deployment(kube, "shop", workload)["metadata"]["resourceVersion"],
            "policies": sorted(p["metadata"]["name"] for p in policies)}


def test_dry_run_writes_nothing(lab: LabProcess, kube: MeshKube) -> None:
    before = versions(kube, "user")
    dry = MeshKube(api_client(lab), "lab", dry_run=True)
    changes = [*dry.ensure_injected("shop", "user", "workload"), *dry.ensure_injected("shop", "user", "namespace"),
               *dry.remove_injection("shop", "user"), dry.ensure_sidecar_resources("shop", "user", memory="200Mi"),
               dry.ensure_exclusions("shop", "user", inbound_ports=[9090])]
    assert [c.action for c in changes] == ["label-workload", "label-namespace", "restart", "remove-injection",
                                           "set-sidecar-resources", "set-exclusions"]
    for change in changes:
        assert change.dry_run and not change.applied and change.request is not None, change
        assert change.reason.startswith(f"dry run: would {change.request.verb} /"), change.reason
    assert changes[1].request.body == {"metadata": {  # type: ignore[union-attr]
        "resourceVersion": before["namespace"], "labels": {"istio-injection": "enabled"},
        "annotations": {"meshwave.io/injection-label-before": '{"istio-injection": null}'}}}
    assert "EVERY workload" in changes[1].reason
    restart = changes[2].request.body["spec"]["template"]["metadata"]["annotations"]  # type: ignore[union-attr]
    assert list(restart) == ["kubectl.kubernetes.io/restartedAt"]
    assert versions(kube, "user") == before


def test_disabled_namespace_blocks_injection(kube: MeshKube) -> None:
    kube.core.create_namespace({"metadata": {"name": "vault", "labels": {"istio-injection": "disabled"}}})
    kube.apps.create_namespaced_deployment("vault", {
        "metadata": {"name": "vault"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "vault"}}, "template": {
            "metadata": {"labels": {"app": "vault"}}, "spec": {"containers": [{"name": "vault", "image": "v:1"}]}}}})
    for mode in ("workload", "namespace"):
        with pytest.raises(InjectionBlocked, match="namespace vault is labelled istio-injection=disabled"):
            kube.ensure_injected("vault", "vault", mode)  # type: ignore[arg-type]
    assert raw_deployment(kube, "vault", "vault")["metadata"]["generation"] == 1


def test_missing_objects_and_api_errors_are_kube_errors(kube: MeshKube) -> None:
    with pytest.raises(WorkloadNotFound, match=r"cluster lab: deployment shop/nope not found"):
        kube.workload("shop", "nope")
    with pytest.raises(WorkloadNotFound):
        kube.rollout("shop", "nope")
    with pytest.raises(NotFound, match='namespace nowhere.*namespaces "nowhere" not found'):
        kube.ensure_injected("nowhere", "auth", "workload")


def test_namespace_mode_labels_the_namespace_and_restarts(tmp_path: Path) -> None:
    with LabProcess(SMALL, tmp_path / "lab") as own:
        kube = MeshKube(api_client(own), "lab")
        label, restart = kube.ensure_injected("shop", "user", "namespace")
        assert label.applied and label.action == "label-namespace" and label.after == {"istio-injection": "enabled"}
        assert "EVERY workload" in label.reason and "auth" in label.reason and "payment" in label.reason
        assert restart.applied and restart.action == "restart" and restart.request is not None
        assert restart.request.content_type == "application/strategic-merge-patch+json"
        assert settle(kube, "shop", "user", expect_proxy=True).done
        assert kube.workload("shop", "auth").pods_with_proxy == 0  # the others wait for their next restart
        assert not any(c.applied for c in kube.ensure_injected("shop", "user", "namespace"))

        kube.remove_injection("shop", "user")  # the pod label "false", and the namespace label as it was
        assert settle(kube, "shop", "user", expect_proxy=False).done
        label, relabel = kube.ensure_injected("shop", "user", "namespace")  # a retry after the rollback
        assert label.applied and relabel.applied and relabel.after == {"sidecar.istio.io/inject": None}
        assert settle(kube, "shop", "user", expect_proxy=True).done


def test_a_stopped_cluster_is_unreachable_fast(tmp_path: Path) -> None:
    with LabProcess(SMALL, tmp_path / "lab") as own:
        kube = MeshKube(api_client(own), "prod-eu-1")
        assert kube.ping()
    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=r"cluster prod-eu-1 \(http://127\.0\.0\.1:\d+\): connection refused"):
        kube.ping()
    with pytest.raises(ClusterUnreachable):
        kube.workload("shop", "auth")
    assert time.monotonic() - started < 5


# ---- rollouts followed by ReplicaSet, revisions, namespace rollback, GitOps owners ----------------------
def lab_topology(tmp_path: Path, **cluster: Any) -> Path:
    """small.yaml with the cluster's fields changed (revisions, admission knobs, namespace labels)."""
    data = yaml.safe_load(SMALL.read_text())
    data["clusters"][0].update(cluster)
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def namespace_meta(kube: MeshKube, ns: str = "shop") -> dict[str, Any]:
    return json.loads(kube.core.read_namespace(ns, _preload_content=False).data)["metadata"]


def pod_objects(kube: MeshKube, app: str) -> list[dict[str, Any]]:
    found = kube.core.list_namespaced_pod("shop", label_selector=f"app={app}", _preload_content=False)
    return json.loads(found.data)["items"]


def test_the_rollout_is_followed_through_metrics_merging_and_digest_pinning(tmp_path: Path) -> None:
    with LabProcess(lab_topology(tmp_path, metrics_merge=True, image_digest=True), tmp_path / "lab") as own:
        kube = MeshKube(api_client(own), "lab")
        scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
        kube.apps.patch_namespaced_deployment("auth", "shop", {"spec": {"template": {"metadata": {
            "annotations": scrape}}}})
        assert settle(kube, "shop", "auth", expect_proxy=False).done
        assert kube.ensure_injected("shop", "auth", "workload")[0].applied
        verdict = settle(kube, "shop", "auth", expect_proxy=True)
        assert verdict.done and verdict.proxies_ready == 2, verdict
        pods = pod_objects(kube, "auth")  # the pods really differ from their template
        assert {p["metadata"]["annotations"]["prometheus.io/port"] for p in pods} == {"15020"}
        assert all("@sha256:" in p["spec"]["containers"][0]["image"] for p in pods)
        auth = kube.workload("shop", "auth")
        assert auth.replicaset and {p["metadata"]["ownerReferences"][0]["name"] for p in pods} == {auth.replicaset}
        assert len(auth.new_pods) == 2 and not auth.old_pods


def test_a_revision_only_mesh_injects_with_the_revision_label(tmp_path: Path) -> None:
    with LabProcess(lab_topology(tmp_path, revisions=["1-24-0"]), tmp_path / "lab") as own:
        kube = MeshKube(api_client(own), "lab")
        assert kube.injectors().names == {"1-24-0"} and not kube.injectors().default
        [change] = kube.ensure_injected("shop", "auth", "workload")
        assert change.applied and change.after == {"istio.io/rev": "1-24-0"}, change
        assert settle(kube, "shop", "auth", expect_proxy=True).done
        label, restart = kube.ensure_injected("shop", "user", "namespace")
        assert label.applied and label.after == {"istio.io/rev": "1-24-0"} and restart.applied
        meta = namespace_meta(kube)
        assert meta["labels"].get("istio.io/rev") == "1-24-0" and "istio-injection" not in meta["labels"]
        assert json.loads(meta["annotations"]["meshwave.io/injection-label-before"]) == {"istio.io/rev": None}
        assert settle(kube, "shop", "user", expect_proxy=True).done
        [rollback] = kube.remove_injection("shop", "auth")[:1]  # inject=false beats the revision label
        assert rollback.applied and settle(kube, "shop", "auth", expect_proxy=False).done


def test_several_revisions_without_a_default_need_the_plan_to_choose(tmp_path: Path) -> None:
    with LabProcess(lab_topology(tmp_path, revisions=["1-23-1", "1-24-0"]), tmp_path / "lab") as own:
        generation = raw_deployment(MeshKube(api_client(own), "lab"), "shop", "auth")["metadata"]["generation"]
        for mode in ("workload", "namespace"):
            with pytest.raises(InjectionBlocked, match=r"several revisions \(1-23-1, 1-24-0\) and no default.*"
                                                       r"clusters\.lab\.revision in the plan"):
                MeshKube(api_client(own), "lab").ensure_injected("shop", "auth", mode)  # type: ignore[arg-type]
        chosen = MeshKube(api_client(own), "lab", revision="1-23-1")
        assert raw_deployment(chosen, "shop", "auth")["metadata"]["generation"] == generation
        assert "istio.io/rev" not in namespace_meta(chosen)["labels"]
        [change] = chosen.ensure_injected("shop", "auth", "workload")
        assert change.after == {"istio.io/rev": "1-23-1"}
        assert settle(chosen, "shop", "auth", expect_proxy=True).done
        assert {p["metadata"]["annotations"]["istio.io/rev"] for p in pod_objects(chosen, "auth")} == {"1-23-1"}


def test_namespace_mode_keeps_a_namespace_revision(tmp_path: Path) -> None:
    with LabProcess(lab_topology(tmp_path, revisions=["default", "1-24-0"]), tmp_path / "lab") as own:
        kube = MeshKube(api_client(own), "lab")
        kube.core.patch_namespace("shop", {"metadata": {"labels": {"istio.io/rev": "1-24-0"}}})
        label, restart = kube.ensure_injected("shop", "user", "namespace")
        assert not label.applied and label.request is None and "revision 1-24-0" in label.reason, label
        assert restart.applied
        meta = namespace_meta(kube)
        assert "istio-injection" not in meta["labels"] and "meshwave.io/injection-label-before" not in (
            meta.get("annotations") or {})
        assert settle(kube, "shop", "user", expect_proxy=True).done
        assert {p["metadata"]["annotations"]["istio.io/rev"] for p in pod_objects(kube, "user")} == {"1-24-0"}


def test_namespace_mode_rollback_restores_the_namespace_label(tmp_path: Path) -> None:
    with LabProcess(SMALL, tmp_path / "lab") as own:
        kube = MeshKube(api_client(own), "lab")
        kube.ensure_injected("shop", "user", "namespace")
        assert settle(kube, "shop", "user", expect_proxy=True).done
        assert json.loads(namespace_meta(kube)["annotations"]["meshwave.io/injection-label-before"]) == {
            "istio-injection": None}
        rollback, restore = kube.remove_injection("shop", "user")
        assert rollback.action == "remove-injection" and restore.action == "restore-namespace-label"
        assert restore.applied and (restore.before, restore.after) == ({"istio-injection": "enabled"},
                                                                       {"istio-injection": None})
        meta = namespace_meta(kube)
        assert "istio-injection" not in meta["labels"]
        assert "meshwave.io/injection-label-before" not in (meta.get("annotations") or {})
        assert settle(kube, "shop", "user", expect_proxy=False).done
        kube._restart(kube.workload("shop", "payment"), "a routine deploy")  # no sidecar, no OOM for payment now
        assert settle(kube, "shop", "payment", expect_proxy=False).done
        assert len(kube.remove_injection("shop", "user")) == 1  # the record is gone: nothing more to restore


def test_namespace_mode_rollback_keeps_the_label_while_a_neighbour_is_meshed(tmp_path: Path) -> None:
    with LabProcess(SMALL, tmp_path / "lab") as own:
        kube = MeshKube(api_client(own), "lab")
        for name in ("user", "auth"):
            kube.ensure_injected("shop", name, "namespace")
            assert settle(kube, "shop", name, expect_proxy=True).done
        rollback, kept = kube.remove_injection("shop", "user")
        assert rollback.applied and not kept.applied and kept.request is None, kept
        assert "keeps istio-injection=enabled: auth still run sidecars" in kept.reason
        assert "api-gateway, email-service, ledger, payment will get a sidecar on their next deploy" in kept.reason
        assert namespace_meta(kube)["labels"]["istio-injection"] == "enabled"
        assert settle(kube, "shop", "user", expect_proxy=False).done
        _, restore = kube.remove_injection("shop", "auth")  # the last meshed one: now the label goes
        assert restore.applied and "istio-injection" not in namespace_meta(kube)["labels"]


def test_removing_injection_names_the_tool_that_will_put_it_back(kube: MeshKube, lab: LabProcess) -> None:
    kube.apps.patch_namespaced_deployment("api-gateway", "shop", {"metadata": {
        "labels": {"app.kubernetes.io/managed-by": "Helm"},
        "annotations": {"meta.helm.sh/release-name": "shop", "meta.helm.sh/release-namespace": "shop"}}})
    dry = MeshKube(api_client(lab), "lab", dry_run=True)
    assert dry.workload("shop", "api-gateway").reverted_by == "Helm (app.kubernetes.io/managed-by: Helm, release " \
                                                              "shop in shop)"
    [change] = dry.remove_injection("shop", "api-gateway")
    assert "will be reverted by Helm (app.kubernetes.io/managed-by: Helm, release shop in shop)" in change.reason
    [plain] = dry.remove_injection("shop", "ledger")
    assert "reverted" not in plain.reason
