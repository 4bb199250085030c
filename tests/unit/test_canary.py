"""The canary (meshwave.canary): its copy of the Deployment, its judgement against the primary's live metrics, the
decisions after it, the record it leaves, and where its tasks sit in a wave's DAG."""

from __future__ import annotations

from typing import Any

import pytest

from meshwave import canary as cn
from meshwave import checks as c
from meshwave import decisions as d
from meshwave import prometheus as p
from meshwave import service_group as sg
from meshwave.checks import Outcome
from meshwave.outcomes import ServiceOutcome
from meshwave.plan import PlanError, parse_plan
from meshwave.results import GateEvent, RolloutResult, RolloutStatus
from meshwave.triggers import ended
from meshwave.wave import services_of, wave_dag
from tests.unit.test_checks import NS, WIN, FakeSource, by_check, down
from tests.unit.test_decisions import BASELINE, PREFLIGHT, change, states, typed

CLUSTERS = {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}}
PRIMARY = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "pay", "namespace": "shop", "uid": "u-1", "resourceVersion": "42", "generation": 7,
                 "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"app": "pay", "team": "payments"},
                 "annotations": {"deployment.kubernetes.io/revision": "3", "meshwave.io/lease": "{}",
                                 "owner": "payments"}},
    "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "pay"}}, "paused": True,
             "template": {"metadata": {"labels": {"app": "pay", "version": "v1"}},
                          "spec": {"containers": [{"name": "pay", "image": "pay:1"}]}}},
    "status": {"replicas": 4},
}


def plan(canary: Any = None, own: dict[str, Any] | None = None) -> Any:
    defaults: dict[str, Any] = {"soak_seconds": 60, "batch_size": 1}
    if canary is not None:
        defaults["canary"] = canary
    services = [{"cluster": "lab", "namespace": "shop", "workload": "pay", **(own or {})},
                {"cluster": "lab", "namespace": "shop", "workload": "ads", "canary": False}]
    return parse_plan({"migration": "m", "clusters": CLUSTERS, "defaults": defaults,
                       "waves": [{"name": "w", "services": services}]}, "plan.yaml")


# ---- the copy ----------------------------------------------------------------------------------------------------
def test_the_copy_keeps_the_services_labels_adds_the_sidecar_and_a_selector_of_its_own() -> None:
    made = cn.manifest(PRIMARY, 1, {"sidecar.istio.io/inject": "true"}, "meshwave_w/run-1")
    assert made["metadata"]["name"] == "pay-canary" and made["metadata"]["namespace"] == "shop"
    assert made["metadata"]["labels"] == {"app": "pay", "team": "payments", cn.CANARY_LABEL: "pay"}
    assert made["metadata"]["annotations"] == {"owner": "payments", "meshwave.io/canary-run": "meshwave_w/run-1"}
    assert not {"uid", "resourceVersion", "generation", "creationTimestamp"} & set(made["metadata"])
    assert made["spec"]["replicas"] == 1 and "paused" not in made["spec"] and "status" not in made
    assert made["spec"]["selector"] == {"matchLabels": {"app": "pay", cn.CANARY_LABEL: "pay"}}
    assert made["spec"]["template"]["metadata"]["labels"] == {
        "app": "pay", "version": "v1", "sidecar.istio.io/inject": "true", cn.CANARY_LABEL: "pay"}
    assert PRIMARY["spec"]["replicas"] == 4 and cn.CANARY_LABEL not in PRIMARY["spec"]["selector"]["matchLabels"]
    revision = cn.manifest(PRIMARY, 2, {"istio.io/rev": "1-24", "sidecar.istio.io/inject": None}, "r")
    assert revision["spec"]["template"]["metadata"]["labels"]["istio.io/rev"] == "1-24"
    assert "sidecar.istio.io/inject" not in revision["spec"]["template"]["metadata"]["labels"]


def test_the_canarys_name_stays_an_rfc_1123_label() -> None:
    assert cn.canary_name("pay") == "pay-canary"
    long = cn.canary_name("a" * 55 + "-" + "b" * 7)
    assert len(long) <= 63 and long.endswith("-canary") and "--" not in long
    assert cn.is_canary_of({"metadata": {"labels": {cn.CANARY_LABEL: "pay"}}}, "pay")
    assert not cn.is_canary_of({"metadata": {"labels": {"app": "pay"}}}, "pay")


# ---- the plan ----------------------------------------------------------------------------------------------------
def test_a_canary_is_set_in_defaults_or_per_service_and_a_bad_one_is_named() -> None:
    p_ = plan({"replicas": 2, "soak_seconds": 90})
    pay, ads = services_of(p_, p_.waves[0])
    assert (pay.settings.canary.replicas, pay.settings.canary.soak_seconds) == (2, 90)
    assert ads.settings.canary is None
    with pytest.raises(PlanError, match=r"plan.yaml: .*canary.*replicas"):
        plan({"replicas": 0})
    with pytest.raises(PlanError, match="canary.soak_seconds: 10 is shorter than query_window_seconds 60"):
        plan({"soak_seconds": 10})


def test_the_lease_and_the_trial_last_through_the_canary() -> None:
    without, with_canary = plan(), plan({"soak_seconds": 200})
    a = services_of(without, without.waves[0])[0].settings
    b = services_of(with_canary, with_canary.waves[0])[0].settings
    assert sg._trial_seconds(b) - sg._trial_seconds(a) == b.rollout_timeout_seconds + 200 + b.verify_seconds


# ---- the DAG -----------------------------------------------------------------------------------------------------
def test_the_canary_tasks_come_before_the_injection_only_in_batches_that_try_one() -> None:
    p_ = plan({"replicas": 1, "soak_seconds": 60})
    dag = wave_dag(p_, p_.waves[0], "plan.yaml")
    assert dag.get_task("batch_1.canary").upstream_task_ids == {"batch_1.admit"}
    assert dag.get_task("batch_1.canary_soak").upstream_task_ids == {"batch_1.canary"}
    remove = dag.get_task("batch_1.remove_canary")
    assert remove.upstream_task_ids == {"batch_1.canary_soak"} and remove.trigger_rule == "all_done"
    assert dag.get_task("batch_1.inject").upstream_task_ids == {"batch_1.admit", "batch_1.remove_canary"}
    assert {"batch_1.canary", "batch_1.canary_soak", "batch_1.remove_canary"} <= \
        dag.get_task("batch_1.outcome").upstream_task_ids
    assert "batch_2.canary" not in dag.task_dict, "ads tries no canary: its batch has no canary task"


# ---- the judgement -----------------------------------------------------------------------------------------------
def judged(canary_success: float, primary_success: float = 1.0, canary_p99: float = 20.0,
           primary_p99: float = 14.0, primary_count: float | None = 300.0, canary_rate: float = 10.0,
           source: FakeSource | None = None) -> dict[str, c.Verdict]:
    src = source or FakeSource()
    for name, value in (("deployment_app_success_rate", primary_success), ("deployment_app_request_count",
                                                                             primary_count),
                        ("deployment_app_latency_p99_ms", primary_p99)):
        src.set(name, value, workload="pay")
    for name, value in (("istio_success_rate", canary_success), ("istio_inbound_request_rate", canary_rate),
                        ("istio_latency_p99_ms", canary_p99)):
        src.set(name, value, workload="pay-canary")
    src.set("container_restarts", [p.Sample({"namespace": NS, "pod": "pay-canary-5d-x", "container": "istio-proxy"},
                                            0.0)], workload="pay-canary")
    return by_check(c.judge_canary(src, NS, "pay", "pay-canary", WIN))


def test_a_canary_whose_proxy_fails_requests_fails_against_the_primarys_live_rate() -> None:
    found = judged(canary_success=0.0, primary_success=0.99)
    assert found["canary_success_rate"].outcome == Outcome.FAIL
    assert "success rate 0.00 < primary 0.99 - 0.02" in found["canary_success_rate"].reason
    ok = judged(canary_success=0.985, primary_success=0.99)
    assert ok["canary_success_rate"].outcome == Outcome.PASS
    assert {v.outcome for v in ok.values()} == {Outcome.PASS}, ok


def test_a_canary_much_slower_than_its_primary_fails() -> None:
    found = judged(canary_success=1.0, canary_p99=900.0, primary_p99=14.0)
    assert found["canary_latency_p99"].outcome == Outcome.FAIL
    assert "canary p99 900.0 ms vs primary 14.0 ms" in found["canary_latency_p99"].reason


def test_a_canary_with_nothing_to_compare_with_is_never_a_pass() -> None:
    no_primary = judged(canary_success=1.0, primary_count=None)
    assert no_primary["canary_success_rate"].outcome == Outcome.NO_DATA
    assert no_primary["canary_latency_p99"].outcome == Outcome.NO_DATA
    idle = judged(canary_success=1.0, canary_rate=0.01)
    assert idle["canary_success_rate"].outcome == Outcome.NO_DATA
    assert "too little traffic to judge the canary" in idle["canary_latency_p99"].reason
    class Down(FakeSource):
        def instant(self, query: str) -> list[p.Sample]:
            raise down()

    unreadable = judged(canary_success=1.0, source=Down())
    assert {v.outcome for v in unreadable.values()} == {Outcome.ERROR}, unreadable


# ---- the decisions and the record -------------------------------------------------------------------------------
def test_after_the_canary_only_a_pass_lets_the_primary_be_injected() -> None:
    done = RolloutResult(status=RolloutStatus.DONE, message="1/1 ready", started=1.0, ended=2.0)
    oom = RolloutResult(status=RolloutStatus.FAILED, message="pod pay-canary-x: istio-proxy OOMKilled")
    assert d.canary_rollout_decision(done)[0] == d.CANARY_SOAK
    assert d.canary_rollout_decision(oom) == (d.CANARY_FAILED, "canary rollout failed: pod pay-canary-x: istio-proxy "
                                                               "OOMKilled")
    gate = {s: GateEvent(stage="canary_soak", status=s, reason=f"{s} reason") for s in ("pass", "fail", "no_data")}
    assert d.canary_decision(gate["pass"], "hold")[0] == d.INJECT
    assert d.canary_decision(gate["fail"], "hold")[0] == d.CANARY_FAILED
    assert d.canary_decision(gate["no_data"], "hold")[0] == d.CANARY_HELD
    assert d.canary_decision(gate["no_data"], "rollback")[0] == d.CANARY_FAILED
    assert d.canary_decision(None, "hold")[0] == d.CANARY_HELD
    event = ended("canary_soak", gate["fail"], {"after": "canary_soak", "on_no_data": "hold"})
    assert event.xcoms["decision"] == {"to": d.CANARY_FAILED, "why": "canary failed: fail reason"}


CREATED = change("create-canary", "deployment shop/pay-canary", None, {"replicas": 1}, "a canary of shop/pay")
DELETED = change("delete-canary", "deployment shop/pay-canary", {"replicas": 1}, None, "the canary removed")


def canary_record(chosen: str, why: str, remove: str = "success", **others: str) -> Any:
    p_ = plan({"replicas": 1, "soak_seconds": 60})
    svc = services_of(p_, p_.waves[0])[0]
    results = typed({"preflight": PREFLIGHT, "baseline": BASELINE,
                     "canary": {"changes": [CREATED], "canary": "pay-canary", "seconds": 0.2},
                     "remove_canary": {"changes": [DELETED], "seconds": 0.1}})
    st = states("preflight", "baseline", "canary", "canary_soak", remove_canary=remove, **others)
    decided = {"after_canary_rollout": "canary ready", "after_canary_rollout_to": d.CANARY_SOAK,
               "after_canary": why, "after_canary_to": chosen}
    errors = {"remove_canary": "cluster lab: DELETE deployment shop/pay-canary: 503"} if remove != "success" else {}
    return d.outcome(svc, results, st, errors, decided, False)


def test_a_failed_canary_is_rolled_back_and_says_its_primary_was_never_touched() -> None:
    rec = canary_record(d.CANARY_FAILED, "canary failed: success rate 0.00 < primary 1.00 - 0.02")
    assert (rec.outcome, rec.sidecar) == (ServiceOutcome.ROLLED_BACK, False)
    assert rec.reason == ("canary failed: success rate 0.00 < primary 1.00 - 0.02; the canary was removed; shop/pay "
                          "was not changed or restarted")
    assert [ch["action"] for ch in rec.changes] == ["create-canary", "delete-canary"]
    held = canary_record(d.CANARY_HELD, "canary ended no_data: not judged, so the workload is not injected")
    assert (held.outcome, held.sidecar) == (ServiceOutcome.HELD, False)


def test_a_canary_that_could_not_be_removed_is_failed_and_left_named() -> None:
    rec = canary_record(d.CANARY_FAILED, "canary failed: p99", remove="failed")
    assert rec.outcome == ServiceOutcome.FAILED
    assert "the canary could not be removed (cluster lab: DELETE deployment shop/pay-canary: 503)" in rec.reason
    assert "LEFT: deployment shop/pay-canary with a sidecar takes a share of the Service's traffic" in rec.reason


def test_mesh_reconcile_removes_a_canary_a_run_left_and_says_the_workload_was_not_touched() -> None:
    p_ = plan({"replicas": 1, "soak_seconds": 60})
    svc = services_of(p_, p_.waves[0])[0]
    undo = type(svc)(svc.plan, svc.settings, svc.cluster, svc.batch, "remove_canary")
    results = typed({"remove_canary": {"changes": [DELETED], "seconds": 0.1}})
    done = d.outcome(undo, results, states("remove_canary"), {}, {}, False)
    assert (done.outcome, done.reason) == (ServiceOutcome.REMOVED, "canary shop/pay-canary removed; shop/pay was not "
                                                                   "touched")
    assert done.outcome.undone
    broken = d.outcome(undo, typed({}), states(remove_canary="failed"), {"remove_canary": "503"}, {}, False)
    assert broken.outcome == ServiceOutcome.FAILED and "could not be removed: 503" in broken.reason


def test_only_a_fleet_that_tries_canaries_offers_their_removal_ad_hoc() -> None:
    from meshwave import adhoc
    from meshwave.fleet import Fleet

    with_canary, without = Fleet(), Fleet()
    with_canary.add(plan({"replicas": 1, "soak_seconds": 60}), "a.yaml")
    without.add(plan(), "b.yaml")
    assert with_canary.canary_asked and not without.canary_asked
    assert "remove_canary" in adhoc._actions(with_canary) and "remove_canary" not in adhoc._actions(without)
    with pytest.raises(ValueError, match="action: 'remove_canary' is not one of"):
        adhoc.resolve_service({"cluster": "lab", "namespace": "shop", "service": "pay", "action": "remove_canary"},
                              without)
