"""meshwave.results: the typed step results (issue 15, item 3). What a task pushes is `model_dump(mode="json")`, and
it is the JSON the steps pushed as dicts before: the same keys in the same order, the same values, a key a step did
not write left out (not null). The expected JSON below is what the dict-returning steps produced at 6f683b5 on the
same fakes (the time frozen, change timestamps masked)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from meshwave import connections, steps, triggers
from meshwave.changes import Change
from meshwave.checks import Verdict
from meshwave.group_state import decoded
from meshwave.kube_errors import MtlsRefused
from meshwave.results import (
    BackToPermissiveResult,
    ClearEmergencyResult,
    FlipResult,
    GateEvent,
    InjectResult,
    PreflightResult,
    RollbackResult,
    RolloutResult,
    StepError,
    StepResults,
)
from meshwave.service_group import dry_rollout
from meshwave.stages import Poll
from tests.unit import test_steps as t

T0 = 1_767_225_600.0
NOT_THERE = "a step that did not write a key leaves it out"

CHANGE = ('{"cluster": "lab", "action": "%s", "target": "%s", "before": %s, "after": %s, "request": null, '
          '"applied": true, "dry_run": false, "reason": "%s", "resource_version": "81724", "timestamp": "T"}')
LABEL = CHANGE % ("label-workload", "deployment shop/payment", '{"sidecar.istio.io/inject": null}',
                  '{"sidecar.istio.io/inject": "true"}', "pod template label; the template change rolls the pods")
DELETED = CHANGE % ("delete-mtls", "peerauthentication shop/meshwave-payment", '{"mode": "STRICT"}', "null",
                    "deleted")
CLEARED = CHANGE % ("clear-emergency", "peerauthentication shop/meshwave-payment", '{"a": 1}', "null", "cleared")
DEFAULT = ('{"mode": "PERMISSIVE", "ports": {}, "decided_by": null, '
           '"describe": "PERMISSIVE (no policy applies: Istio\'s default)"}')


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step's `seconds` is 0.0: its start and end are the same instant."""
    monkeypatch.setattr(steps, "time", SimpleNamespace(time=lambda: T0))


def pushed(result: BaseModel) -> str:
    """The JSON a task pushes, with the changes' wall-clock timestamps masked."""
    return re.sub(r'"timestamp": "[^"]*"', '"timestamp": "T"', json.dumps(result.model_dump(mode="json")))


def strict_namespace() -> t.FakeSource:
    return t.fits(t.FakeSource()).set("app_request_rate", 12.0).set("meshed_request_rate", 12.0)


# ---- each step's JSON, as before ------------------------------------------------------------------------------
def test_preflight_keeps_its_keys_and_leaves_the_plaintext_count_out_when_not_asked() -> None:
    plain = steps.preflight(t.service(), t.FakeKube(), t.fits(t.FakeSource()))  # type: ignore[arg-type]
    assert list(json.loads(pushed(plain))) == ["replicas", "app_container", "changes", "notes", "mtls_in_force",
                                               "headroom", "seconds"], NOT_THERE
    assert pushed(plain).startswith('{"replicas": 2, "app_container": "payment", "changes": [], "notes": [], '
                                    f'"mtls_in_force": {DEFAULT}, "headroom": "the istio-proxy limit 1024Mi')
    assert pushed(plain).endswith('Istio\'s default proxy resources assumed", "seconds": 0.0}')
    strict = steps.preflight(t.service(exclude_inbound_ports=[8081]),  # type: ignore[arg-type]
                             t.FakeKube(policies=[t.pa(t.NS, "default", "STRICT")]), strict_namespace())
    assert list(json.loads(pushed(strict))) == ["replicas", "app_container", "changes", "notes", "mtls_in_force",
                                                "plaintext_before_injection", "headroom", "seconds"]
    assert json.loads(pushed(strict))["plaintext_before_injection"] == (
        "STRICT once injected (all ports: peerauthentication shop/default (namespace-wide, STRICT; not meshwave's)); "
        "0 of 12 rps come from callers without a sidecar: every caller already speaks mTLS")


def test_baseline_keeps_its_nested_shape() -> None:
    source = t.FakeSource(window="30s")
    for name, value in (("app_success_rate", 0.998), ("app_request_rate", 38.5), ("app_request_count", 1155.0),
                        ("app_latency_p50_ms", 6.0), ("app_latency_p99_ms", 14.2)):
        source.set(name, value)
    source.set("app_memory_bytes", t.memory(210.0))  # Prometheus answers floats (prometheus.py parses them)
    result = steps.baseline(t.service(query_window_seconds=30), source)  # type: ignore[arg-type]
    data = json.loads(pushed(result))
    assert list(data) == ["baseline", "seconds"] and data["seconds"] == 0.0
    assert list(data["baseline"]) == ["namespace", "workload", "window", "cluster", "success_rate", "request_rate",
                                      "request_count", "p50_ms", "p99_ms", "app_memory_bytes", "queries", "notes",
                                      "at"]
    assert pushed(result).startswith(
        '{"baseline": {"namespace": "shop", "workload": "payment", "window": "30s", "cluster": null, '
        '"success_rate": 0.998, "request_rate": 38.5, "request_count": 1155.0, "p50_ms": 6.0, "p99_ms": 14.2, '
        '"app_memory_bytes": {"payment": 220200960.0}, "queries": {"app_success_rate": ')


def test_the_write_steps_push_the_json_they_pushed_as_dicts() -> None:
    svc, kube = t.service(), t.FakeKube()
    assert pushed(steps.inject(svc, kube)) == f'{{"changes": [{LABEL}], "seconds": 0.0}}'
    only = dataclasses.replace(svc, action="strict_only")
    injected = t.FakeKube(dataclasses.replace(t.deployment_state(), pods=t.pods(2, 0)))
    assert pushed(steps.inject(only, injected)) == \
        '{"changes": [], "sidecars": "2 of 2 pods run their sidecar", "seconds": 0.0}'
    assert pushed(steps.back_to_permissive(svc, kube, "note")) == \
        f'{{"changes": [{DELETED}], "mode": "PERMISSIVE", "seconds": 0.0}}', NOT_THERE
    removed = steps.rollback_injection(svc, kube, t.FakeSource().set("app_success_rate", 0.99))
    assert list(json.loads(pushed(removed))) == ["changes", "outbound", "success_before", "seconds"]
    assert json.loads(pushed(removed))["success_before"] == 0.99


def test_flip_strict_written_dry_and_refused_keep_their_own_keys() -> None:
    dry = steps.flip_strict(t.service(), t.FakeKube())  # the fake's ensure_strict writes nothing: a dry run's result
    assert pushed(dry) == ('{"changes": [' + CHANGE % ("set-mtls", "peerauthentication shop/meshwave-payment", "null",
                                                       '{"mode": "STRICT"}', "create STRICT policy")
                           + '], "mode": "STRICT", "seconds": 0.0}')
    kube = t.FakeKube(policies=[t.pa(t.NS, "team", "PERMISSIVE", {"app": t.WL})])

    def refuse(ns: str, workload: str) -> None:
        raise MtlsRefused("peerauthentication shop/team decides")

    kube.mtls.ensure_strict = refuse  # type: ignore[method-assign]
    assert pushed(steps.flip_strict(t.service(), kube)) == (
        '{"changes": [], "refused": "peerauthentication shop/team decides", "mtls_in_force": {"mode": "PERMISSIVE", '
        '"ports": {}, "decided_by": "peerauthentication shop/team (workload, PERMISSIVE; not meshwave\'s)", '
        '"describe": "PERMISSIVE by peerauthentication shop/team (workload, PERMISSIVE; not meshwave\'s)"}, '
        '"seconds": 0.0}')


def test_clear_emergency_writes_a_null_mode_in_a_dry_run() -> None:
    kube = t.FakeKube()
    kube.mtls.clear_emergency = lambda ns, wl: [  # type: ignore[attr-defined]
        kube._change("clear-emergency", "peerauthentication shop/meshwave-payment", {"a": 1}, None, "cleared")]
    kube.dry_run = False  # type: ignore[attr-defined]
    assert pushed(steps.clear_emergency(t.service(), kube)) == \
        f'{{"changes": [{CLEARED}], "mtls_in_force": {DEFAULT}, "seconds": 0.0}}'
    kube.dry_run = True  # type: ignore[attr-defined]
    assert pushed(steps.clear_emergency(t.service(), kube)) == \
        f'{{"changes": [{CLEARED}], "mtls_in_force": null, "seconds": 0.0}}'


def test_the_service_group_adds_pending_last() -> None:
    result = InjectResult(changes=[], seconds=0.5).model_copy(update={"pending": None})
    assert json.dumps(result.model_dump(mode="json")) == '{"changes": [], "seconds": 0.5, "pending": null}'


# ---- the waits' JSON, as the triggers ended their tasks with it --------------------------------------------------
def test_a_rollout_the_trigger_saw_done_and_a_dry_run_s() -> None:
    class Done:
        status, message = "done", "1/1 updated, 1 ready"

        def to_dict(self) -> dict[str, Any]:
            return {"status": self.status, "replicas": 1}

    async def connection(conn_id: str) -> str:
        return conn_id

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triggers.BaseHook, "aget_connection", connection)
        mp.setattr(connections, "mesh_kube", lambda conn, cluster: SimpleNamespace(rollout=lambda *a: Done()))
        mp.setattr(triggers, "EARLIEST_EVENT_SECONDS", 0.0)
        trigger = triggers.RolloutTrigger("kube", "lab", "shop", "auth", True, 3.0, time.time() + 60,
                                          decide={"after": "wait_rollout"})
        event = asyncio.run(anext(trigger.run()))
    pushed_ = event.xcoms["wait_rollout"]
    assert list(pushed_) == ["status", "message", "state", "started", "ended"]
    assert (pushed_["status"], pushed_["state"]) == ("done", {"status": "done", "replicas": 1})
    assert event.xcoms["decision"] == {"to": "soak", "why": "1/1 updated, 1 ready"}
    assert json.dumps(dry_rollout().model_dump(mode="json")) == \
        '{"status": "done", "message": "dry run: nothing changed, nothing to wait for", "dry_run": true}'


def test_a_gate_event_keeps_its_keys_and_the_strict_gate_s_extra_its_order() -> None:
    async def connection(conn_id: str) -> str:
        return conn_id

    def evaluate(stage: str, source: Any, params: dict[str, Any]) -> Poll:
        return Poll([Verdict("strict_plaintext", "pass", "ok", at="2026-01-01T00:00:00Z")],
                    {"plaintext_callers": []})

    on_pass = {"callers": [], "inbound_before": None, "callers_error": "Prometheus down"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triggers.BaseHook, "aget_connection", connection)
        mp.setattr(connections, "prometheus_source", lambda conn: SimpleNamespace(cluster="lab"))
        mp.setattr(triggers.stages, "evaluate", evaluate)
        mp.setattr(triggers.stages, "on_pass", lambda stage, source, params: on_pass)
        gate = triggers.GateTrigger("prom", "strict_gate", {}, {}, 1.0, T0, 0, 1, decide={"after": "strict_gate"})
        event = asyncio.run(anext(gate.run()))
    found = event.xcoms["strict_gate"]
    assert list(found) == ["stage", "status", "reason", "polls", "result", "extra", "history", "started", "ended"]
    assert found["extra"] == {"plaintext_callers": [], "callers": [], "inbound_before": None,
                              "callers_error": "Prometheus down"}, "an explicit null stays, the unset key stays out"
    assert list(found["extra"]) == ["plaintext_callers", "callers", "inbound_before", "callers_error"]
    assert (found["stage"], found["status"], found["started"]) == ("strict_gate", "pass", T0)
    # callers that could not be read: nothing would watch them after the flip, so it is not made
    assert event.xcoms["decision"]["to"] == "stay_permissive"
    assert event.xcoms["decision"]["why"].endswith("could not be read from Prometheus: Prometheus down")


# ---- round trips, also through the triggerer's second encoding -------------------------------------------------
SHAPES: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (PreflightResult, {"replicas": 2, "app_container": None, "changes": [], "notes": ["n"],
                       "mtls_in_force": json.loads(DEFAULT), "headroom": "ok", "seconds": 0.4}),
    (InjectResult, {"changes": [json.loads(LABEL)], "seconds": 0.3, "pending": None}),
    (FlipResult, {"changes": [], "mode": "STRICT", "mtls_in_force": {**json.loads(DEFAULT), "mode": "STRICT",
                                                                     "ports": {"9090": "DISABLE"}},
                  "probe": {"verdict": "refused", "message": "curl exit 56", "url": "http://payment.shop:8080/",
                            "pod": "probe-1", "exit_code": 56, "seconds": 1.5}, "seconds": 2.1, "pending": None}),
    (BackToPermissiveResult, {"changes": [json.loads(DELETED)], "mode": "PERMISSIVE",
                              "mtls_in_force": json.loads(DEFAULT), "seconds": 0.2, "pending": None}),
    (ClearEmergencyResult, {"changes": [], "mtls_in_force": None, "seconds": 0.1}),
    (RollbackResult, {"changes": [], "outbound": {"query": "q", "destinations": []}, "success_before": None,
                      "seconds": 0.3, "pending": None}),
    (RolloutResult, {"status": "timeout", "message": "rollout not finished by the deadline: 1/2",
                     "started": T0, "ended": T0 + 300.5}),
    (GateEvent, {"stage": "verify_recovery", "status": "pass", "reason": "dry run: not checked", "dry_run": True}),
    (StepError, {"step": "inject", "message": "blocked: limit 87Mi"}),
]


@pytest.mark.parametrize(("model", "data"), SHAPES, ids=[m.__name__ for m, _ in SHAPES])
def test_a_result_round_trips_through_its_json_and_the_triggerer_s(model: type[BaseModel],
                                                                    data: dict[str, Any]) -> None:
    text = json.dumps(data)
    assert json.dumps(model.model_validate(data).model_dump(mode="json")) == text
    twice = json.dumps(text)  # a TaskSuccessEvent's XCom, as the Task SDK reads it back (group_state.decoded)
    assert json.dumps(model.model_validate(decoded(json.loads(twice))).model_dump(mode="json")) == text


@pytest.mark.parametrize(("model", "data"), SHAPES, ids=[m.__name__ for m, _ in SHAPES])
def test_an_unknown_key_is_refused(model: type[BaseModel], data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="extra_forbidden"):
        model.model_validate({**data, "tracker": {}})


@pytest.mark.parametrize(("model", "data"), [
    (RolloutResult, {"status": "progressing", "message": "a wait ends only when the rollout did"}),
    (GateEvent, {"stage": "after_strict", "status": "pass", "reason": "not a gated stage"}),
    (GateEvent, {"stage": "soak", "status": "passed", "reason": "not a gate status"}),
    (BackToPermissiveResult, {"changes": [], "mode": "LOOSE", "seconds": 0.1}),
], ids=["rollout status", "stage", "gate status", "mTLS mode"])
def test_a_value_outside_its_closed_set_is_refused(model: type[BaseModel], data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="enum"):
        model.model_validate(data)


def test_a_result_is_frozen() -> None:
    result = StepError(step="inject", message="x")
    with pytest.raises(ValidationError, match="frozen"):
        result.step = "soak"  # type: ignore[misc]


# ---- every step's result of one service, read back once ----------------------------------------------------------
def test_back_to_permissive_holds_either_its_own_result_or_clear_emergency_s() -> None:
    back = StepResults.model_validate({"back_to_permissive": SHAPES[3][1]}).back_to_permissive
    cleared = StepResults.model_validate({"back_to_permissive": SHAPES[4][1]}).back_to_permissive
    assert isinstance(back, BackToPermissiveResult) and isinstance(cleared, ClearEmergencyResult)


def test_the_record_s_changes_verdicts_and_seconds_come_in_step_order() -> None:
    verdict = {"check": "x", "outcome": "pass", "reason": "ok", "values": {}, "expectation": "", "queries": {},
               "at": "2026-01-01T00:00:00Z"}
    found = StepResults.model_validate({
        "rollback_injection": {**SHAPES[5][1], "changes": [json.loads(DELETED)]},
        "inject": {"changes": [json.loads(LABEL)], "seconds": 0.0},
        "wait_rollout": {"status": "done", "message": "ok", "started": T0, "ended": T0 + 44.46},
        "soak": {"stage": "soak", "status": "pass", "reason": "ok", "polls": 1, "result": {"verdicts": [verdict]},
                 "extra": {}, "history": [], "started": T0 + 50, "ended": T0 + 170.25},
        "verify_recovery": SHAPES[7][1]})
    assert [c["action"] for c in found.changes()] == ["label-workload", "delete-mtls"]
    assert found.verdicts() == [{**verdict, "stage": "soak"}]
    assert found.seconds() == {"inject": 0.0, "wait_rollout": 44.5, "soak": 120.2, "rollback_injection": 0.3}, \
        "a dry run's wait has no start or end: no seconds"
    assert [step for step, _ in found.present()] == ["inject", "wait_rollout", "soak", "verify_recovery",
                                                     "rollback_injection"]


def test_a_change_of_a_step_is_read_back_as_the_ledger_wrote_it() -> None:
    change = Change("lab", "restart", "deployment shop/payment", None, {}, applied=True, reason="restarting once",
                    timestamp="2026-01-01T00:00:05Z").to_dict()
    result = InjectResult.model_validate({"changes": [change], "seconds": 0.1})
    assert Change.from_dict(result.changes[0]) == Change.from_dict(change)
