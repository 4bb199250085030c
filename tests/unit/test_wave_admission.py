"""The wave's own guards, on a fake task context: when a run may start and when a service may."""

from __future__ import annotations

import logging
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
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    plan = parse_plan(PLAN)
    clock[0] = AFTER
    with pytest.raises(ValueError, match="outside the maintenance window"):
        wave._admit_wave(plan, plan.waves[0], context(FakeTI()))
    ti = FakeTI()
    wave._admit_wave(plan, plan.waves[0], context(ti, outside_window=True))
    assert ti.pushed["window"]["override"] is True
    with caplog.at_level(logging.WARNING, logger="meshwave.wave"):
        wave._admit_wave(plan, plan.waves[0], context(FakeTI(), dry_run=True))
    out = caplog.text
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


class PullingTI:
    """Answers xcom_pull from a dict keyed by (task id, key); anything else is None, as Airflow answers."""

    def __init__(self, xcoms: dict[tuple[str, str], Any]) -> None:
        self.xcoms = xcoms
        self.pushed: dict[str, Any] = {}

    def xcom_pull(self, task_ids: str, key: str = "return_value", **_: Any) -> Any:
        return self.xcoms.get((task_ids, key))

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def _report_context(ti: PullingTI, dag: Any) -> dict[str, Any]:
    return {"ti": ti, "params": {"dry_run": False}, "dag": dag, "run_id": "manual__1"}


SKIPPED = {"service": "lab/shop/cart", "outcome": "skipped",
           "reason": "not started: the wave stopped before this batch"}


def test_a_wave_whose_preflight_left_nothing_is_not_green(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The preflight broke without naming why (or never ran): every service was skipped, which is within any budget,
    and the report used to end the run green. It fails, saying so."""
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("MESHWAVE_REPORT_DIR", str(tmp_path))
    plan = parse_plan({**PLAN, "waves": [{**PLAN["waves"][0], "window": None}]})
    dag = wave.wave_dag(plan, plan.waves[0], "plan.yaml")
    report = dag.get_task("report").python_callable
    records = {("batch_1.outcome", "record"): [SKIPPED]}
    with pytest.raises(AirflowFailException, match="wave preflight did not complete"):
        report(**_report_context(PullingTI(records), dag))
    # the same records after a preflight that returned its checks: the report returns
    passed = PullingTI({**records, ("wave_preflight", "return_value"): {"lab": {"version": "v1.31"}}})
    assert report(**_report_context(passed, dag))["counts"] == {"skipped": 1}


def test_the_preflight_names_any_error_before_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection id the deployment does not define raises Airflow's own not-found error, which the preflight's
    named errors did not catch: it left no error for the services' records to give. Now it names it, and re-raises
    (a task retry may find the connection created meanwhile)."""
    from airflow.exceptions import AirflowNotFoundException

    plan = parse_plan({**PLAN, "waves": [{**PLAN["waves"][0], "window": None}]})
    dag = wave.wave_dag(plan, plan.waves[0], "plan.yaml")
    preflight = dag.get_task("wave_preflight").python_callable

    def missing(conn_id: str) -> Any:
        raise AirflowNotFoundException(f"The conn_id `{conn_id}` isn't defined")

    monkeypatch.setattr(wave.BaseHook, "get_connection", missing)
    ti = PullingTI({})
    with pytest.raises(AirflowNotFoundException):
        preflight(**{**_report_context(ti, dag), "dag_run": FakeRun("manual")})
    assert ti.pushed["error"] == "wave preflight: AirflowNotFoundException: The conn_id `p` isn't defined"
