"""The wave's own guards, on a fake task context: when a run may start and when a service may."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowSkipException

from meshwave import guards, wave
from meshwave.plan import parse_plan

PLAN = {
    "migration": "m",
    "clusters": {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}},
    "waves": [{"name": "wave-1",
               "window": {"dates": [{"start": "2026-12-01T02:00:00Z", "end": "2026-12-01T04:00:00Z"}]},
               "services": [{"cluster": "lab", "namespace": "shop", "workload": "cart"}]}],
}
INSIDE, AFTER = datetime.fromisoformat("2026-12-01T03:00:00+00:00"), datetime.fromisoformat("2026-12-01T05:00:00+00:00")


class FakeTI:
    def __init__(self, window: dict[str, Any] | None = None) -> None:
        self.pushed: dict[str, Any] = {}
        self.window = window

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def xcom_pull(self, task_ids: str, key: str) -> Any:
        assert (task_ids, key) == ("wave_preflight", "window")
        return self.window


def context(ti: FakeTI, **params: Any) -> dict[str, Any]:
    return {"ti": ti, "params": {"dry_run": False, "outside_window": False, **params}}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    now = [INSIDE]
    monkeypatch.setattr(guards, "now", lambda: now[0])
    monkeypatch.setattr(guards, "frozen", lambda plan_freeze=False: "the plan says freeze" if plan_freeze else None)
    return now


def test_inside_the_window_the_run_records_when_it_closes(clock: list[datetime]) -> None:
    plan = parse_plan(PLAN)
    ti = FakeTI()
    wave._admit_wave(plan, plan.waves[0], context(ti))
    assert ti.pushed["window"]["closes"] == "2026-12-01T04:00:00+00:00"


def test_outside_the_window_only_the_override_or_a_dry_run_starts(clock: list[datetime],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    plan = parse_plan(PLAN)
    clock[0] = AFTER
    with pytest.raises(ValueError, match="outside the maintenance window"):
        wave._admit_wave(plan, plan.waves[0], context(FakeTI()))
    ti = FakeTI()
    wave._admit_wave(plan, plan.waves[0], context(ti, outside_window=True))
    assert ti.pushed["window"]["override"] is True
    wave._admit_wave(plan, plan.waves[0], context(FakeTI(), dry_run=True))
    out = capsys.readouterr().out
    assert "OVERRIDE: running outside the maintenance window" in out and "(a dry run: nothing changes)" in out


def test_a_frozen_plan_refuses_a_real_run_and_lets_a_dry_run_through(clock: list[datetime]) -> None:
    plan = parse_plan({**PLAN, "freeze": True})
    with pytest.raises(ValueError, match="frozen: the plan says freeze: no change is made"):
        wave._admit_wave(plan, plan.waves[0], context(FakeTI()))
    wave._admit_wave(plan, plan.waves[0], context(FakeTI(), dry_run=True))
    svc = wave.services_of(plan, plan.waves[0])[0]
    with pytest.raises(AirflowSkipException, match="frozen: the plan says freeze"):
        wave._guard(plan)(svc, context(FakeTI()))


def test_a_service_does_not_start_once_the_window_has_closed(clock: list[datetime]) -> None:
    plan = parse_plan(PLAN)
    svc = wave.services_of(plan, plan.waves[0])[0]
    state = {"closes": "2026-12-01T04:00:00+00:00"}
    wave._guard(plan)(svc, context(FakeTI(state)))  # 03:00: starts
    clock[0] = AFTER
    with pytest.raises(AirflowSkipException, match="the maintenance window closed at 2026-12-01T04:00:00"):
        wave._guard(plan)(svc, context(FakeTI(state)))
    wave._guard(plan)(svc, context(FakeTI({"override": True, "closes": None})))  # overridden: no closing time


def test_clusters_sharing_a_prometheus_without_the_cluster_extra_stop_the_wave(monkeypatch: pytest.MonkeyPatch) -> None:
    """Safety review finding 20: each check must read one cluster; a shared Prometheus needs `cluster` on each."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    plan = parse_plan({**PLAN, "clusters": {
        "eu": {"kubernetes_conn_id": "k_eu", "prometheus_conn_id": "p_eu"},
        "us": {"kubernetes_conn_id": "k_us", "prometheus_conn_id": "p_us"}},
        "waves": [{"name": "wave-1", "services": [{"cluster": "eu", "namespace": "shop", "workload": "cart"}]}]})
    extras = {"p_eu": {"cluster": "eu"}, "p_us": {}}
    connections = {c: SimpleNamespace(conn_id=c, host="http://prom:9090", port=None, schema=None, extra_dejson=e)
                   for c, e in extras.items()}
    monkeypatch.setattr(wave.BaseHook, "get_connection", lambda conn_id: connections[conn_id])
    with pytest.raises(AirflowFailException, match=r"clusters eu, us read one Prometheus \(http://prom:9090\)"):
        wave._one_cluster_per_prometheus(plan)
    extras["p_us"]["cluster"] = "us"
    wave._one_cluster_per_prometheus(plan)  # both scoped: fine


class FakeRun:
    def __init__(self, run_type: str) -> None:
        self.run_type = run_type


def test_outside_the_window_only_a_scheduled_run_is_told_apart(clock: list[datetime]) -> None:
    """wave_preflight skips a scheduled run that starts after its window (the scheduler made it for a window that had
    closed) and fails any other; both come from the same OutsideWindow."""
    plan = parse_plan(PLAN)
    clock[0] = AFTER
    with pytest.raises(guards.OutsideWindow, match="outside the maintenance window"):
        wave._admit_wave(plan, plan.waves[0], context(FakeTI()))
    assert wave._scheduled({"dag_run": FakeRun("scheduled")})
    assert not wave._scheduled({"dag_run": FakeRun("manual")})
    assert not wave._scheduled({"dag_run": FakeRun("asset_triggered")}) and not wave._scheduled({})
