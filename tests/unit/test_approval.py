"""A person before STRICT (issue 18 item 1): the plan's `approval`, the batch's approval task, the flip's reading of
its answer and the record. The e2e run is tests/e2e/test_wave_approval.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowSkipException

from meshwave import approval as ap
from meshwave import decisions as d
from meshwave import service_group as sg
from meshwave.checks import Outcome, Verdict
from meshwave.plan import PlanError, parse_plan
from meshwave.record import ApprovalRecord
from meshwave.report import render, report_frame
from meshwave.triggers import ended
from meshwave.wave import services_of, wave_dag
from tests.unit.test_decisions import BASELINE, GATE_PASS, INJECT, PREFLIGHT, SOAK_PASS, rollout, states, typed
from tests.unit.test_service_group_routing import GROUP, FakeTI, context

CLUSTERS = {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}}


def plan(approval: Any = None, wave_approval: Any = None, batch_size: int = 2) -> Any:
    defaults: dict[str, Any] = {"batch_size": batch_size}
    if approval is not None:
        defaults["approval"] = approval
    wave: dict[str, Any] = {"name": "w", "services": [
        {"cluster": "lab", "namespace": "shop", "workload": "pay", "criticality": "critical"},
        {"cluster": "lab", "namespace": "shop", "workload": "cart", "criticality": "high", "strict": False},
        {"cluster": "lab", "namespace": "shop", "workload": "ads", "criticality": "low"}]}
    if wave_approval is not None:
        wave["approval"] = wave_approval
    return parse_plan({"migration": "m", "clusters": CLUSTERS, "defaults": defaults, "waves": [wave]})


# ---- the plan ------------------------------------------------------------------------------------------------
def test_the_plan_names_the_criticalities_that_need_approval_per_wave_or_default() -> None:
    p = plan({"before_strict": ["critical", "high"], "timeout_seconds": 900})
    needs = {s.plan.workload: s.needs_approval for s in services_of(p, p.waves[0])}
    assert needs == {"pay": True, "cart": False, "ads": False}, "cart stays PERMISSIVE anyway (strict: false)"
    p = plan({"before_strict": ["critical"]}, wave_approval={"before_strict": "all", "timeout_seconds": 60})
    svcs = services_of(p, p.waves[0])
    assert {s.plan.workload: s.needs_approval for s in svcs} == {"pay": True, "cart": False, "ads": True}
    assert {s.settings.approval.timeout_seconds for s in svcs} == {60}, "the wave's own over the defaults'"
    assert not any(s.needs_approval for s in services_of(plan(), plan().waves[0])), "none unless asked"


@pytest.mark.parametrize(("data", "expect"), [
    ({"defaults": {"approval": {"before_strict": ["critical", "urgent"]}}},
     "defaults.approval.before_strict: ['critical', 'urgent']: give 'all' or a list of criticalities (critical, "
     "high, medium, low)"),
    ({"defaults": {"approval": {"before_strict": "all", "timeout_seconds": 0}}},
     "defaults.approval.timeout_seconds: Input should be greater than or equal to 1"),
    ({"services": {"approval": {"before_strict": "all"}}},
     "waves[0].services[0]: approval: set it per wave or in defaults, not per service"),
])
def test_a_bad_approval_is_named_where_it_is(data: dict, expect: str) -> None:
    raw: dict[str, Any] = {"migration": "m", "clusters": CLUSTERS, "defaults": data.get("defaults", {}),
                           "waves": [{"name": "w", "services": [
                               {"cluster": "lab", "namespace": "shop", "workload": "pay",
                                **data.get("services", {})}]}]}
    with pytest.raises(PlanError) as found:
        parse_plan(raw, "plan.yaml")
    assert f"plan.yaml: {expect}" in str(found.value), str(found.value)


def test_the_trial_and_the_lease_last_through_the_approval_s_timeout() -> None:
    """A sidecar on trial waits for the person with its batch: mesh_reconcile must not take it for abandoned."""
    without, asked = plan(), plan({"before_strict": ["critical"], "timeout_seconds": 5000})
    a = services_of(without, without.waves[0])[2].settings
    b = services_of(asked, asked.waves[0])[2].settings  # ads (low): its batch-mate's approval holds it too
    assert sg._trial_seconds(b) - sg._trial_seconds(a) == 5000


# ---- the DAG ---------------------------------------------------------------------------------------------------
def test_the_approval_task_sits_between_the_batch_s_gates_and_flips_only_where_someone_needs_it() -> None:
    p = plan({"before_strict": ["critical"]})  # batch 1: pay, cart; batch 2: ads (low)
    dag = wave_dag(p, p.waves[0], "plan.yaml")
    approve = dag.get_task("approve_batch_1")
    assert approve.upstream_task_ids == {"batch_1.strict_gate"}
    assert approve.downstream_task_ids == {"batch_1.flip_strict"}
    assert approve.trigger_rule == "all_done", "it runs once every gate of the batch has ended, however"
    assert dag.get_task("batch_1.flip_strict").upstream_task_ids == {"batch_1.strict_gate", "approve_batch_1"}
    assert "approve_batch_2" not in dag.task_dict, "nobody in batch 2 needs approval: no task, no wait"


# ---- the answer ---------------------------------------------------------------------------------------------------
def candidate(service: str, to: str = d.FLIP, timeout: int = 600) -> ap.Candidate:
    return ap.Candidate(service=service, criticality="critical", timeout_seconds=timeout, to=to,
                        why="all 4.00/s inbound is mutual TLS, no plaintext caller in the last 60s",
                        success_before=1.0, success_soak=0.998, p99_before_ms=12.0, p99_soak_ms=14.2)


def test_the_answer_approves_only_what_was_offered_and_chosen() -> None:
    ready = [candidate("lab/shop/pay"), candidate("lab/shop/ads")]
    found = ap.answer_of(ready, ["lab/shop/pay", "lab/shop/other"], "alice", "2026-11-29T01:00:00+00:00", False)
    assert (found.asked, found.approved) == (["lab/shop/pay", "lab/shop/ads"], ["lab/shop/pay"])
    contradiction = ap.answer_of(ready, ["lab/shop/pay", ap.NONE], "alice", None, False)
    assert contradiction.approved == [] and "nothing is approved" in contradiction.note
    timeout = ap.answer_of(ready, [ap.NONE], None, None, True)
    assert timeout.approved == [] and timeout.timed_out


@pytest.mark.parametrize(("answer", "approved", "why"), [
    (None, False, "not approved: the batch's approval task left no answer (see its log)"),
    (ap.Answer(asked=["lab/shop/pay"], approved=["lab/shop/pay"], by="alice", at="T"), True,
     "approved by alice at T"),
    (ap.Answer(asked=["lab/shop/pay"], approved=[], by="alice", at="T"), False,
     "not approved: alice did not choose it"),
    (ap.Answer(asked=["lab/shop/pay"], timed_out=True, at="T"), False,
     "not approved: nobody answered the approval in time"),
    (ap.Answer(asked=["lab/shop/ads"], approved=["lab/shop/ads"], by="alice"), False,
     "not approved: it was not among the services offered for approval"),
    (ap.Answer(asked=["lab/shop/pay"], approved=["lab/shop/pay"], dry_run=True), True, "dry run: approval not asked"),
])
def test_each_answer_decides_the_flip(answer: ap.Answer | None, approved: bool, why: str) -> None:
    ok, record = ap.decide("lab/shop/pay", answer)
    assert (ok, record.approved, record.why) == (approved, approved, why)


# ---- the flip's check, on a fake task instance -------------------------------------------------------------------
class ApprovalTI(FakeTI):
    """FakeTI, and the batch's approval task's answer (an unmapped task: pulled without a map index)."""

    def __init__(self, answer: ap.Answer | None, svc: dict[str, Any], gate_ended: float | None = None) -> None:
        xcoms = {("admit", 0, "service"): svc, ("strict_gate", 0, "decision"): {"to": d.FLIP, "why": "gate passed"}}
        if gate_ended is not None:
            xcoms[("strict_gate", 0, "strict_gate")] = {"stage": "strict_gate", "status": "pass", "reason": "ok",
                                                        "ended": gate_ended}
        super().__init__(0, xcoms, {})
        self.answer = answer

    def xcom_pull(self, task_ids: str, key: str = "return_value", map_indexes: int | None = None) -> Any:
        if task_ids == "approve_batch_1":
            return self.answer.model_dump(mode="json") if self.answer else None
        return super().xcom_pull(task_ids, key, map_indexes)


def critical() -> dict[str, Any]:
    p = plan({"before_strict": ["critical"]})
    return services_of(p, p.waves[0])[0].to_dict()


class Source:
    def close(self) -> None:
        pass


@pytest.fixture
def gate_now(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The STRICT gate read again at the flip: what it sees (a Verdict, or an exception to raise) and its lookback."""
    seen: dict[str, Any] = {"verdict": Verdict("strict_plaintext", Outcome.PASS, "all 4.00/s inbound is mutual TLS")}
    monkeypatch.setattr(sg, "prometheus_for", lambda svc: Source())

    def strict_gate(source: Any, namespace: str, workload: str, window: str, lookback: str) -> Any:
        seen["lookback"] = lookback
        if isinstance(seen["verdict"], Exception):
            raise seen["verdict"]
        return seen["verdict"], []

    monkeypatch.setattr("meshwave.checks.strict_gate", strict_gate)
    return seen


def test_an_approved_service_flips_once_its_gate_still_holds(gate_now: dict[str, Any]) -> None:
    import time

    answer = ap.Answer(asked=["lab/shop/pay"], approved=["lab/shop/pay"], by="alice", at="T")
    ti = ApprovalTI(answer, critical(), gate_ended=time.time() - 300)
    sg.approved_if_needed(GROUP, "approve_batch_1")(context(ti))
    assert ti.pushed["decision"]["to"] == d.FLIP
    assert ti.pushed["decision"]["why"].startswith("approved by alice at T; the STRICT gate still held at the flip")
    assert ti.pushed["approval"]["by"] == "alice"
    assert int(gate_now["lookback"].removesuffix("s")) >= 300 + 60, "over the approval's wait and a query window"


@pytest.mark.parametrize(("answer", "verdict", "why"), [
    (ap.Answer(asked=["lab/shop/pay"], by="bob", at="T"), None, "not approved: bob did not choose it"),
    (None, None, "not approved: the batch's approval task left no answer"),
    (ap.Answer(asked=["lab/shop/pay"], approved=["lab/shop/pay"], by="alice", at="T"),
     Verdict("strict_plaintext", Outcome.FAIL, "plaintext into shop/pay in the last 360s: shop/late http 2.0 rps"),
     "approved by alice at T; but 300 s after the STRICT gate passed it no longer holds: plaintext into shop/pay"),
    (ap.Answer(asked=["lab/shop/pay"], approved=["lab/shop/pay"], by="alice", at="T"),
     ConnectionError("Prometheus down"),
     "approved by alice at T; but the STRICT gate could not be read again before the flip: Prometheus down"),
])
def test_a_service_not_approved_or_whose_gate_no_longer_holds_stays_permissive(
        answer: ap.Answer | None, verdict: Any, why: str, gate_now: dict[str, Any]) -> None:
    import time

    if verdict is not None:
        gate_now["verdict"] = verdict
    ti = ApprovalTI(answer, critical(), gate_ended=time.time() - 300)
    with pytest.raises(AirflowSkipException):
        sg.approved_if_needed(GROUP, "approve_batch_1")(context(ti))
    assert ti.pushed["decision"]["to"] == d.STAY
    assert ti.pushed["decision"]["why"].startswith(why), ti.pushed["decision"]["why"]


def test_a_service_that_needs_no_approval_does_not_read_one(gate_now: dict[str, Any]) -> None:
    p = plan({"before_strict": ["critical"]})
    ads = services_of(p, p.waves[0])[2].to_dict()
    ti = ApprovalTI(None, ads)  # no answer: it must not matter
    sg.approved_if_needed(GROUP, "approve_batch_1")(context(ti))
    assert ti.pushed == {} and "lookback" not in gate_now


# ---- the record and the report ---------------------------------------------------------------------------------
def _record(decided: dict[str, str], st: dict[str, str | None], approval: ApprovalRecord | None) -> Any:
    p = plan({"before_strict": ["critical"]})
    svc = services_of(p, p.waves[0])[0]
    results = typed({"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
                     "wait_rollout": rollout("done", "rolled out"), "soak": SOAK_PASS, "strict_gate": GATE_PASS})
    return d.outcome(svc, results, st, {}, decided, False, approval)


def test_not_approved_is_permissive_with_the_answer_in_the_record_and_the_report() -> None:
    why = "not approved: bob did not choose it"
    answer = ApprovalRecord(approved=False, by="bob", at="2026-11-29T01:00:00+00:00", why=why)
    decided = {"after_strict_gate": "gate passed", "after_strict_gate_to": d.FLIP, "after_approval": why,
               "after_approval_to": d.STAY}
    st = states("preflight", "baseline", "inject", "wait_rollout", "soak", "strict_gate", flip_strict="skipped")
    r = _record(decided, st, answer)
    assert (r.outcome, r.mtls, r.sidecar, r.reason) == ("permissive", "PERMISSIVE", True, why)
    assert r.model_dump(mode="json")["approval"] == {"approved": False, "by": "bob",
                                                     "at": "2026-11-29T01:00:00+00:00", "timed_out": False, "why": why}
    frame = report_frame([r])
    assert frame.loc[0, "approval"] == "refused by bob"
    assert "approval" in render(frame).splitlines()[0]


def test_a_broken_approval_task_leaves_the_service_permissive_and_says_so() -> None:
    decided = {"after_strict_gate": "gate passed", "after_strict_gate_to": d.FLIP}
    st = states("preflight", "baseline", "inject", "wait_rollout", "soak", "strict_gate", flip_strict="upstream_failed")
    r = _record(decided, st, None)
    assert (r.outcome, r.sidecar) == ("permissive", True)
    assert r.reason == "STRICT not flipped: the batch's approval task did not complete (see its log)"
    assert "approval" not in r.model_dump(mode="json"), "a record without approval keeps its old shape"


def test_the_gate_hands_its_decision_and_evidence_to_the_approval() -> None:
    from meshwave.results import GateEvent

    event = GateEvent.model_validate({**GATE_PASS, "ended": 1_767_225_700.0})
    offered = candidate("lab/shop/pay", to="").model_dump(mode="json")
    found = ended("strict_gate", event, {"after": "strict_gate", "candidate": offered}).xcoms
    c = ap.candidates([found["candidate"], None])[0]
    assert (c.to, c.gate_ended, c.service) == (d.FLIP, 1_767_225_700.0, "lab/shop/pay")
    assert c.why == "all 38.5/s inbound is mutual TLS", "the check's own words, not 'all 1 checks passed'"
    assert "success 1.000 -> 0.998, p99 12 -> 14 ms" in c.evidence()


# ---- the operator ------------------------------------------------------------------------------------------------
class OperatorTI:
    def __init__(self, pulled: Any, try_number: int = 1) -> None:
        self.pulled, self.id, self.try_number = pulled, "0193c6f8-0000-7000-8000-000000000000", try_number

    def xcom_pull(self, task_ids: str, key: str) -> Any:
        assert (task_ids, key) == ("batch_1.strict_gate", "candidate")
        return self.pulled


def test_the_operator_asks_only_about_the_ready_services_and_returns_the_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import TaskAwaitingInput

    from meshwave.approval_task import StrictApproval

    written: dict[str, Any] = {}
    monkeypatch.setattr("airflow.providers.standard.operators.hitl.upsert_hitl_detail",
                        lambda **kwargs: written.update(kwargs))
    op = StrictApproval(task_id="approve_batch_1", group_id="batch_1")
    told: list[tuple] = []
    monkeypatch.setattr("meshwave.notify.tell", lambda *args: told.append(args))
    chat = {"channel": "webhook", "conn_id": "chat", "events": ["approval_needed"]}
    pulled = [candidate("lab/shop/pay", timeout=900).model_copy(update={"notify": [chat]}).model_dump(mode="json"),
              candidate("lab/shop/ads", to=d.STAY).model_dump(mode="json"),  # its gate timed out: not offered
              candidate("lab/shop/db", timeout=300).model_dump(mode="json")]
    ctx = {"ti": OperatorTI(pulled), "task_instance": OperatorTI(pulled), "params": {"dry_run": False},
           "dag": type("Dag", (), {"dag_id": "meshwave_m_w"}), "run_id": "r"}
    with pytest.raises(TaskAwaitingInput):
        op.execute(ctx)
    [(targets, event, subject, what, why, dag_id, _)] = told  # a person is needed: the services' targets are told
    assert ([t.conn_id for t in targets], event, dag_id) == (["chat"], "approval_needed", "meshwave_m_w")
    assert subject == "meshwave_m_w: approval needed before STRICT"
    assert what == "batch_1: lab/shop/pay, lab/shop/db ready for STRICT, waiting for a person"
    assert "within 300 s; no answer keeps them PERMISSIVE" in why
    assert written["options"] == ["lab/shop/pay", "lab/shop/db", ap.NONE] and written["defaults"] == [ap.NONE]
    assert op.response_timeout.total_seconds() == 300, "the shortest timeout of the batch"
    assert "**lab/shop/pay** (critical)" in written["body"] and "lab/shop/ads" not in written["body"]
    assert "Asked again" not in written["body"], "asked the first time"

    resumed = StrictApproval(task_id="approve_batch_1", group_id="batch_1")  # a new process: options from XCom again
    at = datetime(2026, 11, 29, 1, 0, tzinfo=UTC)
    found = resumed.execute_complete(ctx, {"chosen_options": ["lab/shop/db"], "params_input": {}, "responded_at": at,
                                           "responded_by_user": {"id": "7", "name": "alice"}, "timedout": False})
    assert found == ap.Answer(asked=["lab/shop/pay", "lab/shop/db"], approved=["lab/shop/db"], by="alice",
                              at=at.isoformat()).model_dump(mode="json")
    timed_out = resumed.execute_complete(ctx, {"chosen_options": [ap.NONE], "params_input": {}, "responded_at": at,
                                               "responded_by_user": None, "timedout": True})
    assert timed_out["timed_out"] is True and timed_out["approved"] == []


def test_asked_again_after_a_lost_answer_the_approver_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried approval task (Airflow 3.3 lost an answer given within moments: docs/known-airflow-issues.md) says
    an earlier answer does not carry over, above the same evidence."""
    from airflow.sdk.exceptions import TaskAwaitingInput

    from meshwave.approval_task import StrictApproval

    written: dict[str, Any] = {}
    monkeypatch.setattr("airflow.providers.standard.operators.hitl.upsert_hitl_detail",
                        lambda **kwargs: written.update(kwargs))
    monkeypatch.setattr("meshwave.notify.tell", lambda *args: None)
    ti = OperatorTI([candidate("lab/shop/pay").model_dump(mode="json")], try_number=3)
    ctx = {"ti": ti, "task_instance": ti, "params": {"dry_run": False},
           "dag": type("Dag", (), {"dag_id": "meshwave_m_w"}), "run_id": "r"}
    with pytest.raises(TaskAwaitingInput):
        StrictApproval(task_id="approve_batch_1", group_id="batch_1").execute(ctx)
    assert written["body"].startswith("**Asked again (try 3)**: this question was asked before in this run, and an "
                                      "answer given then does not carry over to this try")
    assert "**lab/shop/pay**" in written["body"], "the evidence follows"


def test_the_operator_asks_nobody_when_nothing_is_ready_or_in_a_dry_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshwave.approval_task import StrictApproval

    monkeypatch.setattr("airflow.providers.standard.operators.hitl.upsert_hitl_detail",
                        lambda **kwargs: pytest.fail("nobody is to be asked"))
    op = StrictApproval(task_id="approve_batch_1", group_id="batch_1")
    nothing = {"ti": OperatorTI(candidate("lab/shop/ads", to=d.STAY).model_dump(mode="json")),
               "params": {"dry_run": False}}
    assert op.execute(nothing) == ap.Answer().model_dump(mode="json")
    dry = {"ti": OperatorTI([candidate("lab/shop/pay").model_dump(mode="json")]), "params": {"dry_run": True}}
    assert op.execute(dry)["approved"] == ["lab/shop/pay"]
