"""End to end, the red button wins (issue 14 items 2 and 3), through the real DAGs on clusters of their own (`red`,
`gk` in tests/e2e/topology.yaml), so relaxing every STRICT policy leaves the other scenarios' policies alone:

- `mesh_emergency_rollback` pressed while a wave soaks: after stage 1 no workload of the cluster is STRICT, none
  becomes STRICT afterwards (the freeze set before stage 1 is re-read before the flip), and the wave's services
  end `frozen` with the freeze's reason, every record as the data plane is;
- a Gatekeeper-style webhook denying one namespace-wide policy: every other policy is relaxed, the mesh-wide one
  first, and the cluster's stage-1 task fails naming the denied policy and why.

The freeze is one Airflow Variable for every wave: it is deleted in a `finally`, and the button is pressed only
once the stack's early runs (waves of other modules running beside this one) have ended.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshwave.guards import FREEZE_VARIABLE
from meshwave.peer_auth import PA_GROUP, PA_PLURAL, PREVIOUS_MTLS_ANNOTATION, RELAXED_BY_ANNOTATION
from meshwave.pending import PENDING_ANNOTATION
from tests.conftest import eventually
from tests.e2e.conftest import Stack
from tests.e2e.test_emergency import (
    DAG,
    FAST,
    freeze_lifted,  # noqa: F401 (the same autouse fixture here)
    patiently,
    trigger,
    xcom,
)
from tests.e2e.test_mtls import assert_records_match_the_data_plane

pytestmark = pytest.mark.e2e

WAVE = "meshwave_e2e_red_soaking"  # tests/e2e/plans/red.yaml
WAVE_NS, WAVE_SERVICES = "redwave", ("rw-api", "rw-web")
GK = {"gk": {"kubernetes_conn_id": "meshlab_gk", "prometheus_conn_id": "meshlab_prometheus_gk"}}  # in no plan


def workloads(stack: Stack, cluster: str) -> dict[str, dict[str, Any]]:
    """Every deployment of a cluster but its gateway (PeerAuthentication does not govern it) as the lab's data plane
    sees it, by namespace/name."""
    return {f"{s['namespace']}/{s['name']}": s for s in stack.lab.admin("GET", "/services")
            if s["cluster"] == cluster and s["kind"] == "deployment" and s["namespace"] != "istio-system"}


def strict_workloads(stack: Stack, cluster: str) -> list[str]:
    return sorted(k for k, s in workloads(stack, cluster).items() if s["mtls_mode"] == "STRICT")


def policy(stack: Stack, cluster: str, ns: str, name: str) -> dict[str, Any] | None:
    custom = stack.k8s(cluster)[2]
    items = custom.list_namespaced_custom_object(PA_GROUP, "v1", ns, PA_PLURAL)["items"]
    return next((p for p in items if p["metadata"]["name"] == name), None)


def soaking(stack: Stack, run_id: str) -> bool:
    tis = stack.airflow.task_instances(WAVE, run_id).values()
    return any(ti["task_id"] == "batch_1.soak" and ti["state"] == "deferred" for ti in tis)


def test_the_button_pressed_while_a_wave_soaks_relaxes_everything_and_the_wave_ends_frozen(
        stack: Stack) -> None:
    assert strict_workloads(stack, "red") == ["red-locked/rl-api", "red-team/rt-api"], "the teams' STRICT policies"
    stack.settle_early()  # the button sets the freeze: no other early wave may still be running
    stack.airflow.wait_for_dag(WAVE)
    wave_run = stack.airflow.trigger(WAVE)
    eventually(lambda: soaking(stack, wave_run), timeout=300, interval=2, what="the red wave's soak deferred")

    run_id, state = trigger(stack, {"clusters": ["red"], "dry_run": False, **FAST})
    stage1 = xcom(stack, run_id, "stage_1.stage_1_done")
    assert state == "success" and not stage1["failed_clusters"], stage1
    assert strict_workloads(stack, "red") == [], "no workload STRICT after stage 1"
    relaxed = sorted(c["target"] for c in stage1["changes"] if c["applied"])
    assert relaxed == ["peerauthentication red-locked/default", "peerauthentication red-team/team-api"], relaxed
    for ns, name in (("red-locked", "default"), ("red-team", "team-api")):
        found = policy(stack, "red", ns, name)
        assert found is not None and found["spec"]["mtls"]["mode"] == "PERMISSIVE", "kept, not deleted"
        annotations = found["metadata"]["annotations"]
        assert json.loads(annotations[PREVIOUS_MTLS_ANNOTATION]) == {"mtls": "STRICT"}
        assert annotations[RELAXED_BY_ANNOTATION] == f"{DAG} {run_id}"
    frozen_by = f"the Airflow Variable {FREEZE_VARIABLE} is set: {DAG} {run_id}: emergency rollback of clusters red"
    freeze = patiently(lambda: stack.airflow.api("GET", f"/variables/{FREEZE_VARIABLE}"))
    assert freeze["value"].startswith(f"{DAG} {run_id}: "), "the freeze set by validate"

    state = stack.airflow.wait_for_run(WAVE, wave_run, timeout=420)
    records = stack.records(WAVE, wave_run)
    summary = {w: (r["outcome"], r["mtls"], r["sidecar"], r["reason"]) for w, r in records.items()}
    assert set(records) == set(WAVE_SERVICES), summary
    for workload, record in records.items():
        assert (record["outcome"], record["mtls"], record["sidecar"]) == ("frozen", "PERMISSIVE", True), summary
        assert record["reason"].startswith(f"sidecar kept, not STRICT: frozen: {frozen_by}"), summary
        assert policy(stack, "red", WAVE_NS, f"meshwave-{workload}") is None, "the flip wrote nothing"
        deployment = stack.k8s("red")[1].read_namespaced_deployment(workload, WAVE_NS)
        assert PENDING_ANNOTATION not in (deployment.metadata.annotations or {}), "frozen settles the trial"
    assert state == "success", f"frozen is not a failure of the wave: {summary}"
    assert strict_workloads(stack, "red") == [], "none became STRICT afterwards"
    assert_records_match_the_data_plane(stack, records)


def test_a_webhook_denying_one_policy_every_other_relaxed_the_mesh_wide_first(stack: Stack) -> None:
    before = workloads(stack, "gk")
    assert {k: s["mtls_mode"] for k, s in before.items()} == {
        "guarded/gd-api": "STRICT", "gk-apps/ga-api": "STRICT", "gk-apps/ga-web": "STRICT"}, before
    stack.settle_early()  # the rollback sets the freeze: no other early wave may still be running
    run_id, state = trigger(stack, {"clusters": ["gk"], "dry_run": False, "cluster_connections": GK, **FAST})
    # kept by the mapped task (map index 0: the only cluster) although it failed
    result = patiently(lambda: stack.airflow.xcom(DAG, run_id, "stage_1.to_permissive", key="result", map_index=0))
    assert [(p["policy"], p["scope"]) for p in result["policies"]] == [
        ("istio-system/default", "mesh-wide"), ("guarded/default", "namespace-wide"), ("gk-apps/team-api", "workload")]
    writes = [(c["target"], c["applied"]) for c in result["changes"]]  # in the order written
    assert writes == [("peerauthentication istio-system/default", True),
                                       ("peerauthentication gk-apps/team-api", True)], "the mesh-wide one first"
    [left] = result["not_relaxed"]
    assert (left["policy"], left["scope"], left["why"], left["code"]) == ("guarded/default", "namespace-wide",
                                                                          "webhook denial", 403), left
    assert 'admission webhook "validation.gatekeeper.sh" denied the request' in left["message"], left

    tis = stack.airflow.task_instances(DAG, run_id)
    stage1 = tis["stage_1.to_permissive[gk]"]
    assert stage1["state"] == "failed" and stage1["try_number"] == 1, "failed at once: a retry is refused the same way"
    log = patiently(lambda: stack.airflow.task_log(stage1))
    assert "STILL STRICT: gk: peerauthentication guarded/default (namespace-wide): webhook denial" in log, log[-3000:]
    assert ("stage 1 on gk: 1 polic(ies) still STRICT, every other one relaxed: guarded/default (namespace-wide): "
            "webhook denial") in log, log[-3000:]  # the task's failure
    assert state == "failed" and xcom(stack, run_id, "stage_1.stage_1_done")["failed_clusters"] == ["gk"]
    assert xcom(stack, run_id, "stage_3.verify_health")["status"] == "healthy", "stage 3 ran all the same"

    after = {k: s["mtls_mode"] for k, s in workloads(stack, "gk").items()}
    assert after == {"guarded/gd-api": "STRICT", "gk-apps/ga-api": "PERMISSIVE", "gk-apps/ga-web": "PERMISSIVE"}
    denied = policy(stack, "gk", "guarded", "default")
    assert denied is not None and denied["spec"]["mtls"]["mode"] == "STRICT"
    assert RELAXED_BY_ANNOTATION not in (denied["metadata"].get("annotations") or {}), "nothing of it was written"
    for ns, name in (("istio-system", "default"), ("gk-apps", "team-api")):
        relaxed = policy(stack, "gk", ns, name)
        assert relaxed is not None and relaxed["spec"]["mtls"]["mode"] == "PERMISSIVE"
        assert relaxed["metadata"]["annotations"][RELAXED_BY_ANNOTATION] == f"{DAG} {run_id}"
