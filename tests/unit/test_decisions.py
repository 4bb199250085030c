"""meshwave.decisions: the four branches of a service's task group and the final record, on realistic inputs.

The inputs are what the group's tasks leave behind: XCom results (step dicts, sensor events), Airflow states of
every task of the group, the errors failed steps recorded, and the branches' decisions. Gate events carry a real
`GateResult.to_dict()` with `Verdict`s, as the trigger emits them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from meshwave import decisions as d
from meshwave.changes import Change
from meshwave.checks import GateResult, GateStatus, Outcome, Verdict
from meshwave.outcomes import ServiceOutcome
from meshwave.plan import parse_plan
from meshwave.record import ServiceRecord
from meshwave.results import GateEvent, StepResults
from meshwave.steps import Service
from meshwave.triggers import ended

MI = 2**20
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
TASKS = ("admit", "to_permissive", "to_remove", "preflight", "baseline", "inject", "wait_rollout", "after_rollout",
         "soak", "rollback_after_rollout",
         "not_started", "after_soak", "strict_gate", "rollback_after_soak", "hold_permissive", "after_strict_gate",
         "flip_strict", "stay_permissive", "verify_strict", "after_strict", "strict_done", "back_to_permissive",
         "verify_recovery", "rollback_injection", "wait_rollback", "outcome")
BRANCHES = ("after_rollout", "after_soak", "after_strict_gate", "after_strict")


# ---- the service and what its tasks leave behind ---------------------------------------------------------------
def service(defaults: dict[str, Any] | None = None, **own: Any) -> Service:
    plan = parse_plan({
        "migration": "shop-mesh",
        "clusters": {"lab": {"kubernetes_conn_id": "k8s_lab", "prometheus_conn_id": "prom_lab"}},
        "defaults": {"soak_seconds": 60, "batch_size": 2, **(defaults or {})},
        "waves": [{"name": "wave-1", "services": [
            {"cluster": "lab", "namespace": "shop", "workload": "auth"},
            {"cluster": "lab", "namespace": "shop", "workload": "user"},
            {"cluster": "lab", "namespace": "shop", "workload": "payment", "criticality": "critical", **own},
        ]}],
    })
    svc = plan.waves[0].services[2]
    return Service(svc, svc.settings(plan.defaults), plan.clusters[svc.cluster], batch=2)


def change(action: str, target: str, before: Any, after: Any, reason: str, dry_run: bool = False) -> dict[str, Any]:
    return Change("lab", action, target, before, after, applied=not dry_run, dry_run=dry_run, reason=reason,
                  timestamp="2026-01-01T00:00:05Z").to_dict()


LABEL = change("label-workload", "deployment shop/payment", {"sidecar.istio.io/inject": None},
               {"sidecar.istio.io/inject": "true"}, "pod template label sidecar.istio.io/inject=true")
UNLABEL = change("remove-injection", "deployment shop/payment", {"sidecar.istio.io/inject": "true"},
                 {"sidecar.istio.io/inject": "false"}, "pod template label sidecar.istio.io/inject=false")
TO_STRICT = change("set-mtls", "peerauthentication shop/meshwave-payment", None,
                   {"mode": "STRICT", "selector": {"app": "payment"}}, "create STRICT policy")
TO_PERMISSIVE = change("set-mtls", "peerauthentication shop/meshwave-payment",
                       {"mode": "STRICT", "selector": {"app": "payment"}},
                       {"mode": "PERMISSIVE", "selector": {"app": "payment"}}, "STRICT -> PERMISSIVE")

PREFLIGHT = {"replicas": 2, "app_container": "payment", "changes": [], "notes": [], "seconds": 0.41,
             "headroom": "limit 512Mi, app uses up to 210Mi, headroom 302Mi >= the sidecar's expected 128Mi"}
BASELINE = {"baseline": {"namespace": "shop", "workload": "payment", "window": "60s", "cluster": None,
                         "success_rate": 0.998, "request_rate": 38.5, "request_count": 2310.0, "p50_ms": 6.0,
                         "p99_ms": 14.2, "app_memory_bytes": {"payment": 210.0 * MI}, "queries": {}, "notes": [],
                         "at": "2026-01-01T00:00:01Z"}, "seconds": 0.82}
INJECT = {"changes": [LABEL], "seconds": 0.33}
FLIP = {"changes": [TO_STRICT], "mode": "STRICT", "seconds": 0.27}
BACK = {"changes": [TO_PERMISSIVE], "mode": "PERMISSIVE", "seconds": 0.25}
ROLLBACK = {"changes": [UNLABEL], "outbound": {"query": "outbound_destinations", "destinations": []},
            "success_before": 0.998, "seconds": 0.3}
OOM = ("pod payment-6b7f9c5d4-qx2lp of the new template: container payment OOMKilled (exit code 137, "
       "restarted 2 times)")
CALLERS = ["shop/checkout http 4.2 rps", "unknown (a caller without sidecar) http 0.5 rps"]


def rollout(status: str, message: str, started: float = T0 + 2, ended: float = T0 + 44.5) -> dict[str, Any]:
    return {"status": status, "message": message, "state": {"replicas": 2}, "started": started, "ended": ended}


def verdict(check: str, outcome: str, reason: str, **values: Any) -> Verdict:
    return Verdict(check, Outcome(outcome), reason, values, at="2026-01-01T00:05:00Z")


def gate(stage: str, status: str, reason: str, verdicts: list[Verdict], extra: dict[str, Any] | None = None,
         started: float = T0 + 50, ended: float = T0 + 170.25) -> dict[str, Any]:
    result = GateResult(GateStatus(status), reason, 4, verdicts=verdicts).to_dict()
    return {"stage": stage, "status": status, "reason": reason, "polls": 4, "result": result,
            "extra": extra if extra is not None else {}, "history": [], "started": started, "ended": ended}


def soak_verdicts(success: float = 0.997, p99: float = 15.1, success_outcome: str = "pass") -> list[Verdict]:
    return [
        verdict("app_success_rate", success_outcome, f"success rate {success:.2f} vs baseline 1.00 - 0.02",
                success_rate=success, requests=2280.0, baseline=0.998, floor=0.978),
        verdict("app_latency_p99", "pass", f"p99 {p99:.1f} ms vs baseline 14.2 ms", p99_ms=p99, p50_ms=6.3,
                requests=2280.0, baseline_p99_ms=14.2, baseline_p50_ms=6.0),
        verdict("restarts", "pass", "3 container(s), none restarted more than 0 time(s) in 60s"),
        verdict("oom_killed", "pass", "no OOMKilled restart in 60s"),
        verdict("sidecar_memory", "pass", "istio-proxy working set 71 Mi (recorded only)"),
    ]


SOAK_PASS = gate("soak", "pass", "all 5 checks passed 1 poll(s) in a row", soak_verdicts())
SOAK_FAIL_REASON = "app_success_rate: success rate 0.81 < baseline 1.00 - 0.02 (3 polls in a row)"
SOAK_FAIL = gate("soak", "fail", SOAK_FAIL_REASON, soak_verdicts(success=0.81, p99=48.0, success_outcome="fail"))
SOAK_NO_DATA = gate("soak", "no_data", "deadline reached without data for app_latency_p99, app_success_rate: pending",
                    [verdict("app_success_rate", "no_data", "too little traffic to judge: 3 requests in 60s")])
GATE_PASS = gate("strict_gate", "pass", "all 1 checks passed 1 poll(s) in a row",
                 [verdict("strict_plaintext", "pass", "all 38.5/s inbound is mutual TLS")],
                 {"plaintext_callers": [], "callers": [{"namespace": "shop", "workload": "checkout"}],
                  "inbound_before": 38.5}, started=T0 + 171, ended=T0 + 201)
GATE_TIMEOUT_REASON = ("deadline reached with unconfirmed breaches (strict_plaintext failed 20x in a row; "
                       "1000000000 needed)")
GATE_TIMEOUT = gate("strict_gate", "inconclusive", GATE_TIMEOUT_REASON,
                    [verdict("strict_plaintext", "fail", "plaintext into shop/payment in 60s")],
                    {"plaintext_callers": CALLERS}, started=T0 + 171, ended=T0 + 771)
VERIFY_PASS = gate("verify_strict", "pass", "all 3 checks passed 1 poll(s) in a row",
                   [verdict("istio_success_rate", "pass", "success rate 1.00 >= 0.98")], started=T0 + 202,
                   ended=T0 + 322.5)
BREACH = "caller_success_rate[shop/checkout]: success rate 0.42 < before 1.00 - 0.02 (3 polls in a row)"
VERIFY_FAIL = gate("verify_strict", "fail", BREACH,
                   [verdict("caller_success_rate[shop/checkout]", "fail", "success rate 0.42 < before 1.00 - 0.02")],
                   started=T0 + 202, ended=T0 + 292)
VERIFY_NO_DATA = gate("verify_strict", "no_data", "deadline reached without data for istio_success_rate: pending",
                      [verdict("istio_success_rate", "no_data", "no Istio-reported series")])
RECOVERY_PASS = gate("verify_recovery", "pass", "all 2 checks passed 1 poll(s) in a row",
                     [verdict("caller_success_rate[shop/checkout]", "pass", "success rate 1.00 >= 0.98")],
                     started=T0 + 300, ended=T0 + 330)


def states(*succeeded: str, **others: str | None) -> dict[str, str | None]:
    """Every task of the group: the ones named succeeded, `others` as given, the rest skipped (not chosen).

    `admit` succeeded unless given: the service was admitted (not frozen, inside its window)."""
    found: dict[str, str | None] = {t: "skipped" for t in TASKS}
    found.update(outcome="running", admit="success")
    found.update({t: "success" for t in succeeded})
    found.update(others)
    return found


def typed(results: dict[str, Any]) -> StepResults:
    """The steps' results as the group reads them back: validated once (group_state.GroupState)."""
    return StepResults.model_validate(results)


def decide(svc: Service, results: StepResults, st: dict[str, str | None],
           errors: dict[str, str] | None = None) -> dict[str, str]:
    """What the group's branches decided (as GroupState reads them back); each route is a task that ran."""
    deciders = {"after_rollout": lambda: d.after_rollout(results, st, errors),
                "after_soak": lambda: d.after_soak(svc, results, st),
                "after_strict_gate": lambda: d.after_strict_gate(results, st),
                "after_strict": lambda: d.after_strict(svc, results, st)}
    found: dict[str, str] = {}
    for name in BRANCHES:
        if st.get(name) == "success":
            to, why = deciders[name]()
            assert st[to] not in ("skipped", None), f"{name} routes to {to}, which did not run in this scenario"
            found[name], found[f"{name}_to"] = why, to
    return found


def record(svc: Service, results: dict[str, Any], st: dict[str, str | None], errors: dict[str, str] | None = None,
           dry_run: bool = False) -> ServiceRecord:
    full = {s: None for s in ("preflight", "baseline", "inject", "wait_rollout", "soak", "strict_gate", "flip_strict",
                              "verify_strict", "back_to_permissive", "verify_recovery", "rollback_injection",
                              "wait_rollback")}
    full.update(results)
    found = typed(full)
    return d.outcome(svc, found, st, errors or {}, decide(svc, found, st, errors), dry_run)


# ---- after_rollout -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("st", [
    {"preflight": "failed", "baseline": "upstream_failed", "inject": "upstream_failed",
     "wait_rollout": "upstream_failed"},
    {"preflight": "success", "baseline": "failed", "inject": "upstream_failed", "wait_rollout": "upstream_failed"},
], ids=["preflight failed", "baseline failed"])
def test_after_rollout_not_started_when_preflight_or_baseline_did_not_pass(st: dict[str, str]) -> None:
    assert d.after_rollout(typed({"preflight": None, "baseline": None}), st) == \
        (d.NOT_STARTED, "not started: preflight or baseline did not pass")


def test_after_rollout_a_failed_inject_after_preflight_rolls_back() -> None:
    st = {"preflight": "success", "baseline": "success", "inject": "failed", "wait_rollout": "upstream_failed"}
    assert d.after_rollout(typed({"preflight": PREFLIGHT, "baseline": BASELINE, "inject": None}), st) == \
        (d.ROLLBACK_AFTER_ROLLOUT, "injection failed part-way: undo whatever was applied")


def test_after_rollout_a_failed_wait_rolls_back() -> None:
    st = {"preflight": "success", "baseline": "success", "inject": "success", "wait_rollout": "failed"}
    assert d.after_rollout(typed({"inject": INJECT, "wait_rollout": None}), st) == \
        (d.ROLLBACK_AFTER_ROLLOUT, "could not follow the rollout")


def test_after_rollout_done_goes_to_the_soak() -> None:
    st = {"preflight": "success", "baseline": "success", "inject": "success", "wait_rollout": "success"}
    message = "2/2 pods updated and available, 2 proxies ready"
    assert d.after_rollout(typed({"wait_rollout": rollout("done", message)}), st) == (d.SOAK, message)


@pytest.mark.parametrize(("status", "message"), [
    ("failed", OOM),
    ("failed", "the deployment exceeded its progress deadline (ProgressDeadlineExceeded)"),
    ("timeout", "rollout not finished by the deadline: 1/2 updated, 1/2 available, 1 old pod(s) left"),
    ("error", "rollout not finished by the deadline: error: cluster lab: GET deployment shop/payment: 503"),
])
def test_after_rollout_a_rollout_not_done_rolls_back_with_its_message(status: str, message: str) -> None:
    st = {"preflight": "success", "baseline": "success", "inject": "success", "wait_rollout": "success"}
    assert d.after_rollout(typed({"wait_rollout": rollout(status, message)}), st) == \
        (d.ROLLBACK_AFTER_ROLLOUT, f"rollout {status}: {message}")


# ---- after_soak ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_no_data", ["hold", "rollback"])
def test_after_soak_pass_goes_to_the_strict_gate(on_no_data: str) -> None:
    svc = service(on_no_data=on_no_data)
    assert d.after_soak(svc, typed({"soak": SOAK_PASS}), {"soak": "success"}) == \
        (d.STRICT_GATE, "soak passed: all 5 checks passed 1 poll(s) in a row")


def test_after_soak_pass_holds_when_the_plan_keeps_permissive() -> None:
    assert d.after_soak(service(strict=False), typed({"soak": SOAK_PASS}), {"soak": "success"}) == \
        (d.HOLD, "soak passed; the plan keeps this service PERMISSIVE (strict: false)")


@pytest.mark.parametrize("on_no_data", ["hold", "rollback"])
def test_after_soak_fail_rolls_back_whatever_the_no_data_policy(on_no_data: str) -> None:
    assert d.after_soak(service(on_no_data=on_no_data), typed({"soak": SOAK_FAIL}), {"soak": "success"}) == \
        (d.ROLLBACK_AFTER_SOAK, f"soak failed: {SOAK_FAIL_REASON}")


@pytest.mark.parametrize("status", ["no_data", "error", "inconclusive"])
def test_after_soak_without_a_verdict_holds_when_the_plan_says_hold(status: str) -> None:
    soak = gate("soak", status, f"deadline reached: {status}", [])
    assert d.after_soak(service(), typed({"soak": soak}), {"soak": "success"}) == \
        (d.HOLD, f"soak ended {status}; the plan says hold (sidecar kept, PERMISSIVE): deadline reached: {status}")


@pytest.mark.parametrize("status", ["no_data", "error", "inconclusive"])
def test_after_soak_without_a_verdict_rolls_back_when_the_plan_says_rollback(status: str) -> None:
    soak = gate("soak", status, f"deadline reached: {status}", [])
    assert d.after_soak(service(on_no_data="rollback"), typed({"soak": soak}), {"soak": "success"}) == \
        (d.ROLLBACK_AFTER_SOAK, f"soak ended {status} and the plan says roll back: deadline reached: {status}")


def test_after_soak_no_data_policy_is_inherited_and_overridable() -> None:
    results, st = typed({"soak": SOAK_NO_DATA}), {"soak": "success"}
    assert d.after_soak(service(defaults={"on_no_data": "rollback"}), results, st)[0] == d.ROLLBACK_AFTER_SOAK
    assert d.after_soak(service(defaults={"on_no_data": "rollback"}, on_no_data="hold"), results, st)[0] == d.HOLD


@pytest.mark.parametrize(("on_no_data", "expected"), [
    ("hold", (d.HOLD, "soak ended error; the plan says hold (sidecar kept, PERMISSIVE): the soak did not report")),
    ("rollback", (d.ROLLBACK_AFTER_SOAK, "soak ended error and the plan says roll back: the soak did not report")),
])
def test_after_soak_a_failed_soak_task_is_an_error(on_no_data: str, expected: tuple[str, str]) -> None:
    # the sensor itself failed: no event, whatever a stale result might say
    svc = service(on_no_data=on_no_data)
    assert d.after_soak(svc, typed({"soak": None}), {"soak": "failed"}) == expected
    assert d.after_soak(svc, typed({"soak": SOAK_PASS}), {"soak": "failed"})[0] == expected[0]


# ---- after_strict_gate ---------------------------------------------------------------------------------------
def test_after_strict_gate_pass_flips() -> None:
    assert d.after_strict_gate(typed({"strict_gate": GATE_PASS}), {"strict_gate": "success"}) == \
        (d.FLIP, "all 1 checks passed 1 poll(s) in a row")


def test_a_passed_gate_whose_callers_could_not_be_read_does_not_flip() -> None:
    """verify_strict watches the callers the gate hands on; none read means no caller watched after the flip (the
    seed's outage: callers cut off by STRICT, and nothing noticing). Through the trigger's own event, as it ends."""
    unread = gate("strict_gate", "pass", "all 1 checks passed 1 poll(s) in a row",
                  [verdict("strict_plaintext", "pass", "all 38.5/s inbound is mutual TLS")],
                  {"plaintext_callers": [], "callers": [], "inbound_before": None,
                   "callers_error": "Prometheus query failed: 503 Service Unavailable"})
    expected = (d.STAY, "STRICT gate passed, but the callers to watch after the flip could not be read from "
                        "Prometheus: Prometheus query failed: 503 Service Unavailable")
    assert d.after_strict_gate(typed({"strict_gate": unread}), {"strict_gate": "success"}) == expected
    event = ended("strict_gate", GateEvent.model_validate(unread), {"after": "strict_gate"})
    assert event.xcoms["decision"] == {"to": d.STAY, "why": expected[1]}
    assert d.after_strict_gate(typed({"strict_gate": GATE_PASS}), {"strict_gate": "success"})[0] == d.FLIP


def test_after_strict_gate_timeout_with_plaintext_callers_names_them() -> None:
    assert d.after_strict_gate(typed({"strict_gate": GATE_TIMEOUT}), {"strict_gate": "success"}) == \
        (d.STAY, "plaintext callers in the lookback when the STRICT gate timed out: shop/checkout http 4.2 rps; "
                 "unknown (a caller without sidecar) http 0.5 rps")


def test_after_strict_gate_timeout_without_callers_says_why() -> None:
    no_data = gate("strict_gate", "no_data", "deadline reached without data for strict_plaintext: pending", [],
                   {"plaintext_callers": []})
    assert d.after_strict_gate(typed({"strict_gate": no_data}), {"strict_gate": "success"}) == \
        (d.STAY, "STRICT gate no_data: deadline reached without data for strict_plaintext: pending")


def test_after_strict_gate_a_failed_gate_task_stays_permissive() -> None:
    assert d.after_strict_gate(typed({"strict_gate": None}), {"strict_gate": "failed"}) == \
        (d.STAY, "STRICT gate error: did not report")
    assert d.after_strict_gate(typed({"strict_gate": GATE_PASS}), {"strict_gate": "failed"})[0] == d.STAY


# ---- after_strict --------------------------------------------------------------------------------------------
def test_after_strict_verified_is_done() -> None:
    st = {"flip_strict": "success", "verify_strict": "success"}
    assert d.after_strict(service(), typed({"flip_strict": FLIP, "verify_strict": VERIFY_PASS}), st) == \
        (d.STRICT_DONE, "STRICT verified (the service and its callers): all 3 checks passed 1 poll(s) in a row")


def test_after_strict_a_failed_flip_goes_back_to_permissive() -> None:
    st = {"flip_strict": "failed", "verify_strict": "upstream_failed"}
    assert d.after_strict(service(), typed({"flip_strict": None, "verify_strict": None}), st) == \
        (d.BACK, "the flip to STRICT did not complete or was not proven in force: make sure it is PERMISSIVE")


@pytest.mark.parametrize("on_no_data", ["hold", "rollback"])
def test_after_strict_a_breach_goes_back(on_no_data: str) -> None:
    st = {"flip_strict": "success", "verify_strict": "success"}
    assert d.after_strict(service(on_no_data=on_no_data), typed({"verify_strict": VERIFY_FAIL}), st) == \
        (d.BACK, f"after STRICT: fail: {BREACH}")
    inconclusive = gate("verify_strict", "inconclusive", "deadline reached with unconfirmed breaches", [])
    assert d.after_strict(service(on_no_data=on_no_data), typed({"verify_strict": inconclusive}), st) == \
        (d.BACK, "after STRICT: inconclusive: deadline reached with unconfirmed breaches")


def test_after_strict_no_data_goes_back_even_when_the_plan_says_hold() -> None:
    st = {"flip_strict": "success", "verify_strict": "success"}
    reason = VERIFY_NO_DATA["reason"]
    assert d.after_strict(service(), typed({"verify_strict": VERIFY_NO_DATA}), st) == \
        (d.BACK, f"after STRICT the checks ended no_data: never leave STRICT unverified: {reason}")
    assert d.after_strict(service(on_no_data="rollback"), typed({"verify_strict": VERIFY_NO_DATA}), st) == \
        (d.BACK, f"after STRICT: no_data: {reason}")


def test_after_strict_a_failed_verify_task_goes_back() -> None:
    st = {"flip_strict": "success", "verify_strict": "failed"}
    assert d.after_strict(service(), typed({"verify_strict": VERIFY_PASS}), st) == \
        (d.BACK, "after STRICT the checks ended error: never leave STRICT unverified: "
                 "all 3 checks passed 1 poll(s) in a row")


# ---- outcome: the record -------------------------------------------------------------------------------------
def test_a_verified_strict_without_the_strict_done_decision_is_never_reported_strict() -> None:
    """back_to_permissive makes the after_strict decision (and undoes a failed verification); a run stopped before
    it decided left STRICT in force unconfirmed: the record says so, red, and never "strict"."""
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_PASS, "strict_gate": GATE_PASS, "flip_strict": FLIP, "verify_strict": VERIFY_FAIL}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "strict_gate", "after_strict_gate", "flip_strict", "verify_strict", back_to_permissive="removed")
    r = record(service(), results, st)
    assert (r.outcome, r.mtls, r.sidecar) == ("failed", "STRICT?", True), r.reason
    assert r.reason == ("STRICT flipped but not confirmed as verified (after_strict: not decided); make sure it is "
                        "PERMISSIVE")


def test_strict_record_with_baseline_after_changes_verdicts_and_step_seconds() -> None:
    svc = service()
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_PASS, "strict_gate": GATE_PASS, "flip_strict": FLIP, "verify_strict": VERIFY_PASS}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "strict_gate", "after_strict_gate", "flip_strict", "verify_strict", "after_strict", "strict_done")
    r = record(svc, results, st)
    assert {k: getattr(r, k) for k in ("outcome", "mtls", "sidecar", "reason")} == \
        {"outcome": "strict", "mtls": "STRICT", "sidecar": True,
         "reason": "STRICT verified (the service and its callers): all 3 checks passed 1 poll(s) in a row"}
    assert {k: getattr(r, k) for k in ("service", "cluster", "namespace", "workload", "criticality", "batch")} == \
        {"service": "lab/shop/payment", "cluster": "lab", "namespace": "shop", "workload": "payment",
         "criticality": "critical", "batch": 2}
    assert r.baseline.model_dump() == {"success_rate": 0.998, "p99_ms": 14.2, "request_rate": 38.5}
    assert r.after.model_dump() == {"success_rate": 0.997, "p99_ms": 15.1}
    assert r.changes == [LABEL, TO_STRICT]
    assert r.steps == {"preflight": 0.41, "baseline": 0.82, "inject": 0.33, "wait_rollout": 42.5,
                       "soak": 120.2, "strict_gate": 30.0, "flip_strict": 0.27, "verify_strict": 120.5}
    assert [(v["stage"], v["check"]) for v in r.verdicts] == \
        [("soak", "app_success_rate"), ("soak", "app_latency_p99"), ("soak", "restarts"), ("soak", "oom_killed"),
         ("soak", "sidecar_memory"), ("strict_gate", "strict_plaintext"), ("verify_strict", "istio_success_rate")]
    assert r.plaintext_callers == []
    assert r.decisions == {"after_rollout": "2/2 pods updated and available, 2 proxies ready",
                           "after_rollout_to": "soak",
                           "after_soak": "soak passed: all 5 checks passed 1 poll(s) in a row",
                           "after_soak_to": "strict_gate",
                           "after_strict_gate": "all 1 checks passed 1 poll(s) in a row",
                           "after_strict_gate_to": "flip_strict",
                           "after_strict": "STRICT verified (the service and its callers): "
                           "all 3 checks passed 1 poll(s) in a row",
                           "after_strict_to": "strict_done"}
    assert r.errors == {}


def test_rolled_back_after_an_oom_rollout() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT, "wait_rollout": rollout("failed", OOM),
               "rollback_injection": ROLLBACK,
               "wait_rollback": rollout("done", "2/2 pods updated and available", T0 + 46, T0 + 80.5)}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "rollback_after_rollout",
                "rollback_injection", "wait_rollback")
    r = record(service(), results, st)
    assert {k: getattr(r, k) for k in ("outcome", "mtls", "sidecar", "reason")} == \
        {"outcome": "rolled_back", "mtls": "PERMISSIVE", "sidecar": False, "reason": f"rollout failed: {OOM}"}
    assert r.decisions["after_rollout_to"] == d.ROLLBACK_AFTER_ROLLOUT
    assert r.changes == [LABEL, UNLABEL]
    assert r.after.model_dump() == {} and r.verdicts == []
    assert r.baseline.success_rate == 0.998
    assert r.steps == {"preflight": 0.41, "baseline": 0.82, "inject": 0.33, "wait_rollout": 42.5,
                       "rollback_injection": 0.3, "wait_rollback": 34.5}


def test_rolled_back_after_a_failed_soak_says_why_and_keeps_the_after_values() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_FAIL, "rollback_injection": ROLLBACK, "wait_rollback": rollout("done", "2/2 pods updated")}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "rollback_after_soak", "rollback_injection", "wait_rollback")
    r = record(service(), results, st)
    assert (r.outcome, r.mtls, r.sidecar) == ("rolled_back", "PERMISSIVE", False)
    assert r.reason == f"soak failed: {SOAK_FAIL_REASON}"
    assert r.after.model_dump() == {"success_rate": 0.81, "p99_ms": 48.0}


def test_rolled_back_after_a_failed_inject() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "rollback_injection": ROLLBACK,
               "wait_rollback": rollout("done", "2/2 pods updated and available")}
    st = states("preflight", "baseline", "after_rollout", "rollback_after_rollout", "rollback_injection",
                "wait_rollback", inject="failed", wait_rollout="upstream_failed")
    errors = {"inject": "cluster lab: PATCH deployment shop/payment: 422 Invalid: spec.template: invalid"}
    r = record(service(), results, st, errors)
    assert (r.outcome, r.sidecar) == ("rolled_back", False)
    assert r.reason == "injection failed part-way: undo whatever was applied"
    assert r.errors == errors


def test_strict_undone_after_a_caller_breach_keeps_the_sidecar() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_PASS, "strict_gate": GATE_PASS, "flip_strict": FLIP, "verify_strict": VERIFY_FAIL,
               "back_to_permissive": BACK, "verify_recovery": RECOVERY_PASS}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "strict_gate", "after_strict_gate", "flip_strict", "verify_strict", "after_strict",
                "back_to_permissive", "verify_recovery")
    r = record(service(), results, st)
    assert {k: getattr(r, k) for k in ("outcome", "mtls", "sidecar")} == \
        {"outcome": "rolled_back", "mtls": "PERMISSIVE", "sidecar": True}
    assert r.reason == f"STRICT undone, sidecar kept: after STRICT: fail: {BREACH}; recovery: pass"
    assert r.changes == [LABEL, TO_STRICT, TO_PERMISSIVE]
    assert r.steps["verify_strict"] == 90.0 and r.steps["verify_recovery"] == 30.0
    assert ("verify_strict", "caller_success_rate[shop/checkout]") in [(v["stage"], v["check"]) for v in r.verdicts]


def test_a_failed_flip_is_undone_and_recorded_with_the_recovery() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_PASS, "strict_gate": GATE_PASS, "back_to_permissive": BACK}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "strict_gate", "after_strict_gate", "after_strict", "back_to_permissive", flip_strict="failed",
                verify_strict="upstream_failed", verify_recovery="failed")
    errors = {"flip_strict": "cluster lab: POST peerauthentication shop/meshwave-payment: 403 Forbidden: denied"}
    r = record(service(), results, st, errors)
    assert (r.outcome, r.mtls, r.sidecar) == ("rolled_back", "PERMISSIVE", True)
    assert r.reason == ("STRICT undone, sidecar kept: the flip to STRICT did not complete or was not proven in "
                        "force: make sure it is PERMISSIVE; recovery: unknown")


def test_back_to_permissive_failing_is_failed_with_strict_maybe_left() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_PASS, "strict_gate": GATE_PASS, "flip_strict": FLIP, "verify_strict": VERIFY_FAIL}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "strict_gate", "after_strict_gate", "flip_strict", "verify_strict", "after_strict",
                back_to_permissive="failed", verify_recovery="upstream_failed")
    errors = {"back_to_permissive": "cluster lab (https://10.0.0.1:6443): PATCH peerauthentication "
                                    "shop/meshwave-payment: connection refused"}
    r = record(service(), results, st, errors)
    assert {k: getattr(r, k) for k in ("outcome", "mtls", "sidecar")} == \
        {"outcome": "failed", "mtls": "STRICT?", "sidecar": True}
    assert r.reason == f"could not go back to PERMISSIVE: {errors['back_to_permissive']}"


def test_held_permissive_when_plaintext_callers_remain() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_PASS, "strict_gate": GATE_TIMEOUT}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "strict_gate", "after_strict_gate", "stay_permissive")
    r = record(service(), results, st)
    assert {k: getattr(r, k) for k in ("outcome", "mtls", "sidecar")} == \
        {"outcome": "permissive", "mtls": "PERMISSIVE", "sidecar": True}
    assert r.reason == ("plaintext callers in the lookback when the STRICT gate timed out: shop/checkout http 4.2 "
                        "rps; unknown (a caller without sidecar) http 0.5 rps")
    assert r.plaintext_callers == CALLERS
    assert r.changes == [LABEL]
    assert r.steps["strict_gate"] == 600.0


@pytest.mark.parametrize(("own", "soak", "outcome", "reason"), [
    ({"strict": False}, SOAK_PASS, "permissive", "soak passed; the plan keeps this service PERMISSIVE (strict: false)"),
    # judged blind is not green (safety review finding 7): its own outcome, red, against the failure budget
    ({}, SOAK_NO_DATA, "held", "soak ended no_data; the plan says hold (sidecar kept, PERMISSIVE): "
                               "deadline reached without data for app_latency_p99, app_success_rate: pending"),
], ids=["strict false", "soak no_data, hold"])
def test_held_permissive_after_the_soak(own: dict[str, Any], soak: dict[str, Any], outcome: str, reason: str) -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"), "soak": soak}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "hold_permissive")
    r = record(service(**own), results, st)
    assert {k: getattr(r, k) for k in ("outcome", "mtls", "sidecar", "reason")} == \
        {"outcome": outcome, "mtls": "PERMISSIVE", "sidecar": True, "reason": reason}
    assert ServiceOutcome(outcome).red == (outcome == "held")


def test_skipped_by_the_circuit_breaker() -> None:
    r = record(service(), {}, states(admit="skipped"))
    assert {k: getattr(r, k) for k in ("outcome", "mtls", "sidecar", "reason")} == \
        {"outcome": "skipped", "mtls": None, "sidecar": False,
         "reason": "not started: the wave stopped before this batch"}
    assert r.baseline.model_dump() == {"success_rate": None, "p99_ms": None, "request_rate": None}
    assert (r.after.model_dump(), r.changes, r.verdicts, r.steps, r.decisions) == ({}, [], [], {}, {})


def test_skipped_when_the_wave_preflight_failed() -> None:
    st = {t: "upstream_failed" for t in TASKS} | {"outcome": "running"}
    wave = ("wave preflight: cluster lab: a mesh-wide PeerAuthentication in istio-system is STRICT: every workload "
            "without a sidecar is cut off. Set it to PERMISSIVE before migrating (STRICT goes per workload, after "
            "validation)")
    r = record(service(), {}, st, {"wave": wave})
    assert (r.outcome, r.mtls, r.sidecar) == ("skipped", None, False)
    assert r.reason == f"not started: {wave}"


def test_blocked_by_preflight_with_its_message() -> None:
    message = ("blocked: limit 256Mi, app uses up to 200Mi, headroom 56Mi < the sidecar's expected 128Mi: the pod "
               "would be OOMKilled. Raise the memory limit, or give the sidecar a limit of its own in the plan "
               "(sidecar.memory_limit)")
    st = states("after_rollout", "not_started", preflight="failed", baseline="upstream_failed",
                inject="upstream_failed", wait_rollout="upstream_failed")
    r = record(service(), {}, st, {"preflight": message})
    assert {k: getattr(r, k) for k in ("outcome", "mtls", "sidecar", "reason")} == \
        {"outcome": "blocked", "mtls": None, "sidecar": False,
         "reason": f"preflight: {message.removeprefix('blocked: ')}"}
    assert r.decisions["after_rollout_to"] == d.NOT_STARTED
    assert r.changes == []


def test_blocked_by_baseline() -> None:
    st = states("preflight", "after_rollout", "not_started", baseline="failed", inject="upstream_failed",
                wait_rollout="upstream_failed")
    error = "ValueError: window: '0s' is not a Prometheus duration"
    r = record(service(), {"preflight": PREFLIGHT}, st, {"baseline": error})
    assert (r.outcome, r.reason) == ("blocked", f"baseline: {error}")
    assert r.steps == {"preflight": 0.41}


def test_dry_run_is_planned_with_the_changes_it_would_make() -> None:
    would = change("label-workload", "deployment shop/payment", {"sidecar.istio.io/inject": None},
                   {"sidecar.istio.io/inject": "true"}, "dry run: would PATCH /apis/apps/v1/...", dry_run=True)
    would_flip = change("set-mtls", "peerauthentication shop/meshwave-payment", None, {"mode": "STRICT"},
                        "dry run: would POST ...", dry_run=True)
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": {"changes": [would], "seconds": 0.2},
               "wait_rollout": {"status": "done", "message": "dry run: nothing changed, nothing to wait for",
                                "dry_run": True},
               "soak": {"stage": "soak", "status": "pass", "reason": "dry run: not checked", "dry_run": True},
               "strict_gate": {"stage": "strict_gate", "status": "pass", "reason": "dry run: not checked",
                               "dry_run": True},
               "flip_strict": {"changes": [would_flip], "mode": "STRICT", "seconds": 0.1},
               "verify_strict": {"stage": "verify_strict", "status": "pass", "reason": "dry run: not checked",
                                 "dry_run": True}}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "strict_gate", "after_strict_gate", "flip_strict", "verify_strict", "after_strict", "strict_done")
    r = record(service(), results, st, dry_run=True)
    assert {k: getattr(r, k) for k in ("outcome", "mtls", "sidecar", "reason")} == \
        {"outcome": "planned", "mtls": None, "sidecar": False,
         "reason": "dry run: the changes listed were logged, none applied"}
    assert r.changes == [would, would_flip]
    assert r.decisions["after_strict_to"] == d.STRICT_DONE
    assert r.steps == {"preflight": 0.41, "baseline": 0.82, "inject": 0.2, "flip_strict": 0.1}
    assert r.plaintext_callers == [] and r.after.model_dump() == {}


def test_a_rollback_that_did_not_complete_is_failed() -> None:
    stuck = rollout("timeout", "rollout not finished by the deadline: 1/2 updated, 2/2 available, 1 old pod(s) left, "
                               "0/3 proxies ready", T0 + 46, T0 + 646)
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_FAIL, "rollback_injection": ROLLBACK, "wait_rollback": stuck}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "rollback_after_soak", "rollback_injection", "wait_rollback")
    r = record(service(), results, st)
    assert (r.outcome, r.mtls, r.sidecar) == ("failed", None, None)
    assert r.reason == (f"rollback did not complete ({stuck['message']}); it was rolled back because soak failed: "
                        f"{SOAK_FAIL_REASON}")
    assert r.steps["wait_rollback"] == 600.0


def test_a_rollback_refused_by_the_api_is_failed_with_its_error() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT, "wait_rollout": rollout("failed", OOM)}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "rollback_after_rollout",
                rollback_injection="failed", wait_rollback="upstream_failed")
    error = "cluster lab: PATCH deployment shop/payment: 403 Forbidden: cannot patch deployments"
    r = record(service(), results, st, {"rollback_injection": error})
    assert (r.outcome, r.sidecar) == ("failed", None)
    assert r.reason == f"rollback did not complete ({error}); it was rolled back because rollout failed: {OOM}"


def test_an_unknown_state_names_the_broken_tasks() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"), "soak": SOAK_PASS}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", after_soak="failed",
                strict_gate="upstream_failed", rollback_after_soak="upstream_failed",
                hold_permissive="upstream_failed")
    r = record(service(), results, st)
    assert (r.outcome, r.mtls, r.sidecar) == ("failed", None, None)
    assert r.reason == ("after_soak: failed; strict_gate: upstream_failed; rollback_after_soak: upstream_failed; "
                        "hold_permissive: upstream_failed")


def test_the_record_is_json_safe() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_PASS, "strict_gate": GATE_TIMEOUT}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "strict_gate", "after_strict_gate", "stay_permissive")
    r = record(service(), results, st).model_dump(mode="json")
    assert json.loads(json.dumps(r)) == r


# ---- bugs ----------------------------------------------------------------------------------------------------
def test_a_dry_run_still_reports_a_blocked_preflight() -> None:
    message = "blocked: limit 256Mi, app uses up to 200Mi, headroom 56Mi < the sidecar's expected 128Mi: ..."
    st = states("after_rollout", "not_started", preflight="failed", baseline="upstream_failed",
                inject="upstream_failed", wait_rollout="upstream_failed")
    r = record(service(), {}, st, {"preflight": message}, dry_run=True)
    assert (r.outcome, r.reason) == ("blocked", f"preflight: {message.removeprefix('blocked: ')}")


def test_a_failed_wait_for_the_rollback_says_what_failed() -> None:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT, "wait_rollout": rollout("failed", OOM),
               "rollback_injection": ROLLBACK}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "rollback_after_rollout",
                "rollback_injection", wait_rollback="failed")
    r = record(service(), results, st)
    assert r.outcome == "failed"
    assert "None" not in r.reason, r.reason


def test_an_injection_refused_before_any_change_is_blocked_not_rolled_back() -> None:
    error = "blocked: cluster lab: namespace shop is labelled istio-injection=disabled"
    st = states("preflight", "baseline", inject="failed", wait_rollout="upstream_failed")
    assert d.after_rollout(typed({}), st, {"inject": error}) == (d.NOT_STARTED,
                                                          f"injection refused before any change: {error}")
    st.update({"after_rollout": "success", "not_started": "success"})
    r = record(service(), {"preflight": PREFLIGHT, "baseline": BASELINE}, st, {"inject": error})
    assert (r.outcome, r.reason) == ("blocked", f"inject: {error.removeprefix('blocked: ')}")


# ---- admit: refused input, the guards, and the ad-hoc actions ---------------------------------------------------
def acting(action: str) -> Service:
    return dataclasses.replace(service(), action=action)


def test_refused_input_is_blocked_with_the_reason_and_names_no_service() -> None:
    r = d.outcome(None, typed({}), states(admit="failed"), {"admit": "refused: namespace: '../etc' is not a valid RFC "
                                                                "1123 label"}, {}, False)
    assert (r.outcome, r.service, r.reason) == \
        ("blocked", "(refused input)", "refused: namespace: '../etc' is not a valid RFC 1123 label")


@pytest.mark.parametrize("why", ["frozen: the Airflow Variable meshwave_freeze is set: INC-1",
                                 "the maintenance window closed at 2026-11-28T06:00:00+01:00"])
def test_a_guard_keeps_the_service_from_starting_and_the_report_says_why(why: str) -> None:
    r = record(service(), {}, states(admit="skipped"), {"admit": why})
    assert (r.outcome, r.sidecar, r.changes, r.reason) == ("skipped", False, [], f"not started: {why}")


def test_back_to_permissive_on_request_is_a_green_outcome() -> None:
    st = states("to_permissive", "back_to_permissive", "verify_recovery")
    r = record(acting("permissive"), {"back_to_permissive": {**BACK, "seconds": 0.2},
                                      "verify_recovery": RECOVERY_PASS}, st)
    assert (r.outcome, r.mtls, r.action) == ("permissive", "PERMISSIVE", "permissive")
    assert r.reason.startswith("set to PERMISSIVE on request; recovery check: pass")
    assert r.changes == [TO_PERMISSIVE]
    assert not ServiceOutcome(r.outcome).red


def test_back_to_permissive_that_could_not_be_applied_is_failed_with_the_error() -> None:
    st = states("to_permissive", back_to_permissive="failed", verify_recovery="upstream_failed")
    r = record(acting("permissive"), {}, st, {"back_to_permissive": "403 Forbidden: peerauthentications"})
    assert (r.outcome, r.reason) == ("failed", "could not set PERMISSIVE: 403 Forbidden: peerauthentications")


def test_remove_sidecar_on_request_waits_for_the_rollout() -> None:
    st = states("to_remove", "rollback_injection", "wait_rollback")
    done = {"status": "done", "message": "2/2 pods ready, 0 with istio-proxy"}
    r = record(acting("remove_sidecar"), {"rollback_injection": ROLLBACK, "wait_rollback": done}, st)
    assert (r.outcome, r.sidecar, r.reason) == \
        ("removed", False, "sidecar removed on request: 2/2 pods ready, 0 with istio-proxy")
    stuck = record(acting("remove_sidecar"), {"rollback_injection": ROLLBACK,
                                              "wait_rollback": {"status": "timeout", "message": "1/2 ready"}}, st)
    assert (stuck.outcome, stuck.reason) == ("failed", "sidecar removal did not complete: 1/2 ready")


def test_an_ad_hoc_dry_run_is_planned() -> None:
    st = states("to_remove", "rollback_injection", "wait_rollback")
    r = record(acting("remove_sidecar"), {"rollback_injection": ROLLBACK}, st, dry_run=True)
    assert (r.outcome, r.reason) == ("planned", "dry run of remove_sidecar: the changes listed were logged, "
                                                   "none applied")


def test_inject_only_holds_permissive_after_a_good_soak() -> None:
    passed = typed({"soak": {"stage": "soak", "status": "pass", "reason": "ok"}})
    to, why = d.after_soak(acting("inject_only"), passed, {"soak": "success"})
    assert (to, why) == (d.HOLD, "soak passed; action inject_only: stays PERMISSIVE")
    to, _ = d.after_soak(acting("strict_only"), passed, {"soak": "success"})
    assert to == d.STRICT_GATE
