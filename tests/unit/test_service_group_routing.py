"""The service group's routing on a fake task instance: a path's first task runs only when a decision of its own
map index chose it, and back_to_permissive decides after STRICT by itself."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowSkipException

from meshwave import service_group as sg
from meshwave.mtls import Mode
from meshwave.plan import parse_plan
from meshwave.results import FlipResult
from meshwave.wave import services_of
from tests.unit.test_decisions import BASELINE, FLIP, PREFLIGHT

PLAN = {"migration": "m", "clusters": {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}},
        "waves": [{"name": "wave-1", "services": [{"cluster": "lab", "namespace": "shop", "workload": "cart"}]}]}
GROUP = "batch_1"


class FakeTI:
    """XComs and states of one DAG run, by (task, map index); the caller is map index `map_index`."""

    dag_id, run_id = "d", "r"

    def __init__(self, map_index: int, xcoms: dict[tuple[str, int, str], Any], states: dict[tuple[str, int], str]):
        self.map_index, self.xcoms, self.states = map_index, xcoms, states
        self.pushed: dict[str, Any] = {}

    def xcom_pull(self, task_ids: str, key: str = "return_value", map_indexes: int | None = None) -> Any:
        assert map_indexes == self.map_index, "a service reads only its own map index"
        return self.xcoms.get((task_ids.removeprefix(f"{GROUP}."), map_indexes, key))

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def get_task_states(self, dag_id: str, task_group_id: str, map_index: int, run_ids: list[str]) -> dict:
        return {self.run_id: {f"{task_group_id}.{task}_{i}": st for (task, i), st in self.states.items()
                              if i == map_index}}


class FakeMtls:
    def __init__(self, mode: Mode) -> None:
        self.mode = mode

    def effective(self, ns: str, workload: str) -> Any:
        from meshwave.mtls import EffectiveMtls
        return EffectiveMtls(mode=self.mode)


class FakeKube:
    """What the after-STRICT decision reads of the cluster: the mode in force and the pending annotation."""

    def __init__(self, mode: Mode) -> None:
        self.mtls, self.cleared = FakeMtls(mode), []

    def pending(self, ns: str, workload: str) -> Any:
        return None  # nothing left to settle

    def clear_pending(self, ns: str, workload: str, why: str) -> Any:
        self.cleared.append(why)


def service() -> dict[str, Any]:
    plan = parse_plan(PLAN)
    return services_of(plan, plan.waves[0])[0].to_dict()


def context(ti: FakeTI) -> dict[str, Any]:
    return {"ti": ti, "params": {"dry_run": False}}


def test_a_path_runs_only_when_its_own_map_index_chose_it() -> None:
    xcoms = {("inject", 0, "decision"): {"to": "rollback_after_rollout", "why": "OOMKilled"},
             ("inject", 1, "decision"): {"to": "soak", "why": "rolled out"},
             ("soak", 1, "decision"): {"to": "strict_gate", "why": "soak passed"},
             ("admit", 0, "decision"): {"to": "inject", "why": "action migrate"},
             ("admit", 1, "decision"): {"to": "inject", "why": "action migrate"}}
    sg.rollback_if_chosen(GROUP)(context(FakeTI(0, xcoms, {})))  # chosen: no exception
    with pytest.raises(AirflowSkipException, match="not on this service's path"):
        sg.rollback_if_chosen(GROUP)(context(FakeTI(1, xcoms, {})))  # every wait decided, none for a rollback
    sg.on_path(GROUP, "soak")(context(FakeTI(1, xcoms, {})))
    with pytest.raises(AirflowSkipException):
        sg.on_path(GROUP, "soak")(context(FakeTI(0, xcoms, {})))


@pytest.mark.parametrize(("inject", "left", "expect"), [
    # the write went through, then the rollout wait's trigger crashed: what was applied is undone
    ("failed", {("inject", 0, "inject"): {"changes": [], "seconds": 0.1, "pending": None}}, "rollback"),
    # the write failed part-way (an API error after its retries): undo whatever was applied
    ("failed", {("inject", 0, "error"): {"step": "inject", "message": "KubeError: 500"}}, "rollback"),
    # refused before any change: nothing to undo
    ("failed", {("inject", 0, "error"): {"step": "inject", "message": "blocked: limit 87Mi"}}, "skip"),
    # the freeze came before the injection: nothing was written
    ("skipped", {("inject", 0, "error"): {"step": "inject", "message": "frozen: emergency"}}, "skip"),
    ("upstream_failed", {}, "skip"),
])
def test_a_wait_that_failed_is_decided_from_what_its_task_left(inject: str, left: dict, expect: str) -> None:
    """A task whose trigger crashed (or whose retries ran out) pushed no decision: the rollback's check makes it
    from the step states, as the wait would have."""
    xcoms: dict[tuple[str, int, str], Any] = {("admit", 0, "service"): service(),
                                              ("admit", 0, "decision"): {"to": "inject", "why": "action migrate"},
                                              ("admit", 0, "preflight"): PREFLIGHT, ("admit", 0, "baseline"): BASELINE,
                                              **left}
    states = {("admit", 0): "success", ("inject", 0): inject}
    check = sg.rollback_if_chosen(GROUP)
    if expect == "skip":
        with pytest.raises(AirflowSkipException):
            check(context(FakeTI(0, xcoms, states)))
    else:
        check(context(FakeTI(0, xcoms, states)))


@pytest.mark.parametrize(("flip", "verify", "expect", "in_force"), [
    (None, None, "skip", Mode.PERMISSIVE),  # STRICT never attempted
    ("success", {"status": "pass", "reason": "ok"}, "skip", Mode.STRICT),  # verified: STRICT stays
    # verified, but undone while the run waited (mesh_reconcile): the record must follow the data plane
    ("success", {"status": "pass", "reason": "ok"}, "back", Mode.PERMISSIVE),
    ("success", {"status": "fail", "reason": "caller_success_rate"}, "back", Mode.STRICT),
    ("failed", None, "back", Mode.STRICT),  # a flip that did not complete: make sure it is PERMISSIVE
])
def test_back_to_permissive_decides_after_strict_itself(flip: str | None, verify: dict | None, expect: str,
                                                         in_force: Mode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sg, "kube_for", lambda svc, c: FakeKube(in_force))
    xcoms: dict[tuple[str, int, str], Any] = {("admit", 0, "service"): service(),
                                              ("admit", 0, "decision"): {"to": "inject", "why": "action migrate"}}
    states = {("admit", 0): "success"}
    if flip:
        states[("flip_strict", 0)] = flip
    if flip == "success":
        xcoms[("flip_strict", 0, "flip_strict")] = FLIP
    if verify:
        xcoms[("flip_strict", 0, "verify_strict")] = {"stage": "verify_strict", **verify}
    ti = FakeTI(0, xcoms, states)
    check = sg.strict_undone_if_needed(GROUP)
    if expect == "skip":
        with pytest.raises(AirflowSkipException):
            check(context(ti))
    else:
        check(context(ti))
        assert ti.pushed["decision"]["to"] == "back_to_permissive"
    if flip == "success":
        assert ti.pushed["decision"]["to"] == ("strict_done" if expect == "skip" else "back_to_permissive")


def test_a_requested_permissive_runs_without_looking_at_strict() -> None:
    ti = FakeTI(0, {("admit", 0, "decision"): {"to": "to_permissive", "why": "action permissive"}}, {})
    sg.strict_undone_if_needed(GROUP)(context(ti))
    assert "decision" not in ti.pushed


@pytest.mark.parametrize(("try_number", "mark_run", "refused"), [
    (2, "d/r", True),       # this run's flip, unverified: a retry does not verify again from zero
    (1, "d/r", False),      # a first try goes ahead (pods already STRICT: no new mark)
    (2, "d/other", False),  # STRICT that another run left: not this run's unverified flip
])
def test_a_retry_after_this_runs_flip_does_not_verify_again(try_number: int, mark_run: str, refused: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Safety review finding 15: a verification that failed (trigger crash, lost worker) must not start over while
    STRICT stays unverified; the flip task fails and back_to_permissive makes the workload PERMISSIVE."""
    from airflow.sdk.exceptions import AirflowFailException

    from meshwave.pending import Undo, expecting

    class Marked(FakeKube):
        dry_run = False

        def pending(self, ns: str, workload: str) -> Any:
            return expecting(sg.UNVERIFIED, Undo.PERMISSIVE, 60, mark_run, {})

    monkeypatch.setattr(sg, "kube_for", lambda svc, c: Marked(Mode.STRICT))
    monkeypatch.setattr(sg.guards, "frozen_now", lambda key: None)
    monkeypatch.setattr(sg.steps, "flip_strict", lambda svc, kube: FlipResult(changes=[], seconds=0.1))
    ti = FakeTI(0, {}, {})
    ti.try_number = try_number
    ctx = {**context(ti), "dag": type("Dag", (), {"dag_id": "d"}), "run_id": "r"}
    svc = sg.Service.from_dict(service())
    if refused:
        with pytest.raises(AirflowFailException, match="did not finish verifying"):
            sg._flip(svc, ctx)
    else:
        assert sg._flip(svc, ctx).model_dump(mode="json") == {"changes": [], "seconds": 0.1, "pending": None}


def test_what_a_trigger_ended_its_task_with_is_read_like_a_workers_push() -> None:
    """Airflow 3.3.2 stores a TaskSuccessEvent's XComs JSON-encoded once more (seen in the e2e run's database): the
    decision after the rollout reaches the soak's check as a string, and must still route the service."""
    import json

    xcoms = {("inject", 0, "decision"): json.dumps({"to": "soak", "why": "rolled out"})}
    sg.on_path(GROUP, "soak")(context(FakeTI(0, xcoms, {})))  # chosen: no exception
    with pytest.raises(AirflowSkipException):
        sg.on_path(GROUP, "strict_gate")(context(FakeTI(0, xcoms, {})))
