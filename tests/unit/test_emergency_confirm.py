"""The emergency rollback's confirmation (issue 18 item 2): a dry run's plan of action put to a person, then applied
in the same run, or not. The e2e run is tests/e2e/test_emergency.py's rollback."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskAwaitingInput

from meshwave import emergency as em
from meshwave import emergency_tasks as et
from meshwave.fleet import Fleet
from tests.unit.test_emergency import fleet  # noqa: F401 - the fixture


class TI:
    id = "0193c6f8-0000-7000-8000-000000000000"
    try_number = 1

    def __init__(self, request: em.Request) -> None:
        self.request, self.pushed = request, {}

    def xcom_pull(self, task_ids: str, key: str) -> Any:
        if task_ids == et.CONFIRM:
            return self.pushed.get(key)
        return self.request.to_dict() if (task_ids, key) == (et.VALIDATE, "request") else None

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the confirmation wrote for the person, and whether the rollback began (the freeze, the news)."""
    seen: dict[str, Any] = {"began": []}
    monkeypatch.setattr("airflow.providers.standard.operators.hitl.upsert_hitl_detail", lambda **kw: seen.update(kw))
    monkeypatch.setattr(et, "mesh_kube", lambda connection, cluster, root, dry_run: (cluster, dry_run))
    monkeypatch.setattr(et.BaseHook, "get_connection", staticmethod(lambda conn_id: conn_id))
    monkeypatch.setattr(et.em, "would_relax", lambda kube, scope: frozenset(
        {"istio-system/default", "payments/payment"} if kube == ("prod-eu-1", True) else set()))
    monkeypatch.setattr(et.em, "sidecar_workloads", lambda kube, scope: [{"workload": "w"}] * 3)
    monkeypatch.setattr(et, "begin", lambda request, context: seen["began"].append(request))
    return seen


def context(request: em.Request) -> dict[str, Any]:
    ti = TI(request)
    return {"ti": ti, "task_instance": ti, "run_id": "r", "params": {}}


def test_without_confirm_nobody_is_asked(fleet: Fleet, asked: dict[str, Any]) -> None:  # noqa: F811
    op = et.ConfirmRollback(task_id="confirm")
    assert op.execute(context(em.parse_request({"dry_run": False}, fleet))) == {"asked": False}
    assert "options" not in asked and asked["began"] == []


def test_the_plan_of_action_is_shown_and_applied_only_when_confirmed(fleet: Fleet,  # noqa: F811
                                                                     asked: dict[str, Any]) -> None:
    request = em.parse_request({"confirm": True, "remove_sidecars": True, "confirm_timeout_seconds": 120}, fleet)
    ctx = context(request)
    with pytest.raises(TaskAwaitingInput):
        et.ConfirmRollback(task_id="confirm").execute(ctx)
    assert asked["options"] == [et.APPLY, et.CANCEL] and asked["defaults"] == [et.CANCEL]
    assert "- **prod-eu-1**: 2 STRICT polic(ies) to PERMISSIVE (istio-system/default, payments/payment); 3 " \
           "workload(s) restarted without a sidecar" in asked["body"]
    assert "no answer in 120 s, changes nothing" in asked["body"]
    assert "Asked again" not in asked["body"], "asked the first time"
    assert ctx["ti"].pushed["plan_of_action"]["prod-eu-1"] == {"policies": 2, "restarts": 3}
    assert asked["began"] == [] and et.request_of(ctx).dry_run, "nothing applied while it waits"

    at = datetime(2026, 11, 29, 1, 0, tzinfo=UTC)
    resumed = et.ConfirmRollback(task_id="confirm")  # a new process
    cancelled = resumed.execute_complete(ctx, {"chosen_options": [et.CANCEL], "params_input": {}, "responded_at": at,
                                               "responded_by_user": {"id": "1", "name": "bob"}, "timedout": False})
    assert cancelled == {"asked": True, "applied": False, "by": "bob", "at": at.isoformat(), "timed_out": False}
    assert asked["began"] == [] and et.request_of(ctx).dry_run, "cancelled: the stages run dry"

    applied = resumed.execute_complete(ctx, {"chosen_options": [et.APPLY], "params_input": {}, "responded_at": at,
                                             "responded_by_user": {"id": "2", "name": "alice"}, "timedout": False})
    assert applied["applied"] is True and applied["by"] == "alice"
    assert [r.dry_run for r in asked["began"]] == [False], "the freeze and the news, once, before stage 1"
    assert et.request_of(ctx) == request.applying(), "the stages read the confirmed request"


def test_nobody_answering_in_time_changes_nothing(fleet: Fleet, asked: dict[str, Any]) -> None:  # noqa: F811
    ctx = context(em.parse_request({"confirm": True, "dry_run": False}, fleet))
    found = et.ConfirmRollback(task_id="confirm").execute_complete(
        ctx, {"chosen_options": [et.CANCEL], "params_input": {}, "responded_at": datetime.now(UTC),
              "responded_by_user": None, "timedout": True})
    assert found["timed_out"] is True and found["applied"] is False and found["by"] is None
    assert asked["began"] == [] and et.request_of(ctx).dry_run


def test_asked_again_after_a_lost_answer_the_person_is_told(fleet: Fleet, asked: dict[str, Any],  # noqa: F811
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Airflow 3.3 can lose an answer given within moments of the question and retry the task, which asks again:
    the question says so, or the person would think their APPLY was taken (docs/known-airflow-issues.md)."""
    ctx = context(em.parse_request({"confirm": True, "dry_run": False}, fleet))
    ctx["ti"].try_number = 2
    with pytest.raises(TaskAwaitingInput):
        et.ConfirmRollback(task_id="confirm").execute(ctx)
    assert asked["body"].startswith("**Asked again (try 2)**: this question was asked before in this run, and an "
                                     "answer given then does not carry over to this try")
    assert "- **prod-eu-1**: 2 STRICT polic(ies)" in asked["body"], "the plan of action follows"
    assert "asking again (try 2): an earlier answer does not carry over" in caplog.text
