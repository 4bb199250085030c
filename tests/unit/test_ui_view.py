"""The migration page's view: each planned service's state from its wave's latest run, as Airflow holds it."""

from __future__ import annotations

from datetime import UTC, datetime

from meshwave.plan import parse_plan
from meshwave.record import ServiceRecord
from meshwave.ui.view import Links, RunInfo, TaskInfo, WaveData, fleet_view

PLAN = parse_plan({
    "migration": "shop-mesh",
    "clusters": {"east": {"kubernetes_conn_id": "k8s_east", "prometheus_conn_id": "prom_east"},
                 "west": {"kubernetes_conn_id": "k8s_west", "prometheus_conn_id": "prom_west"}},
    "defaults": {"soak_seconds": 30, "poke_interval_seconds": 5, "query_window_seconds": 15, "batch_size": 2},
    "waves": [
        {"name": "wave-1", "services": [
            {"cluster": "east", "namespace": "shop", "workload": "auth", "criticality": "critical"},
            {"cluster": "east", "namespace": "shop", "workload": "user"},
            {"cluster": "west", "namespace": "shop", "workload": "cart"},
            {"cluster": "west", "namespace": "shop", "workload": "search"},
        ]},
        {"name": "wave-2", "after": "wave-1", "services": [
            {"cluster": "west", "namespace": "shop", "workload": "orders"}]},
    ],
}, "plan.yaml")
DAG1, DAG2 = (PLAN.dag_id(w) for w in PLAN.waves)
RUN = "manual__2026-11-29T21:00:00+00:00"


def run(state: str) -> RunInfo:
    return RunInfo(dag_id=DAG1, run_id=RUN, state=state, run_type="manual",
                   run_after=datetime(2026, 11, 29, tzinfo=UTC))


def record(key: str, outcome: str, reason: str, **kw) -> ServiceRecord:
    return ServiceRecord(service=key, outcome=outcome, reason=reason, **kw)


def test_each_service_shows_its_record_or_its_step() -> None:
    data = WaveData(
        run=run("running"),
        tasks=[TaskInfo(task_id="wave_preflight", state="success"),
               TaskInfo(task_id="batch_1.admit", map_index=0, state="success"),
               TaskInfo(task_id="batch_1.outcome", map_index=0, state="success"),
               TaskInfo(task_id="batch_1.admit", map_index=1, state="success"),
               TaskInfo(task_id="batch_1.inject", map_index=1, state="success"),
               TaskInfo(task_id="batch_1.soak", map_index=1, state="deferred"),
               TaskInfo(task_id="batch_1.outcome", map_index=1, state=None)],
        records={"east/shop/auth": record("east/shop/auth", "rolled_back", "p99 breached 3 polls in a row",
                                          mtls="PERMISSIVE", sidecar=False)},
        report=False, chart=False)
    view = fleet_view([PLAN], {DAG1: data}, Links())
    wave1, wave2 = view.waves
    rows = {r.service: r for r in wave1.services}
    assert rows["east/shop/auth"].state == "rolled_back"
    assert rows["east/shop/auth"].reason == "p99 breached 3 polls in a row"
    assert rows["east/shop/auth"].task_url == f"/dags/{DAG1}/runs/manual__2026-11-29T21%3A00%3A00%2B00%3A00/tasks/" \
                                              "batch_1.outcome/mapped/0"
    assert rows["east/shop/user"].state == "in progress"
    assert rows["east/shop/user"].step == "soak (deferred)"
    assert rows["east/shop/user"].task_url.endswith("/tasks/batch_1.soak/mapped/1")
    # batch 2 has not started: its two services are not started, and say so
    assert rows["west/shop/cart"].state == "not started"
    assert rows["west/shop/cart"].reason == "batch_2 has not reached it"
    assert (wave1.done, wave1.total) == (1, 4)
    assert wave1.counts == {"not started": 2, "in progress": 1, "rolled_back": 1}
    assert wave2.run_id is None and [r.state for r in wave2.services] == ["not started"]
    assert wave2.services[0].reason == "no run of this wave yet"
    totals = {c.cluster: (c.total, c.counts) for c in view.clusters}
    assert totals == {"east": (2, {"in progress": 1, "rolled_back": 1}), "west": (3, {"not started": 3})}


def test_a_map_index_is_the_services_place_in_its_batch() -> None:
    """batch 2's first service is map index 0 of batch_2, not index 2 of the wave."""
    data = WaveData(run=run("running"), tasks=[TaskInfo(task_id="batch_2.inject", map_index=0, state="running")])
    rows = {r.service: r for r in fleet_view([PLAN], {DAG1: data}, Links()).waves[0].services}
    assert rows["west/shop/cart"].step == "inject (running)"
    assert rows["east/shop/auth"].state == "not started"


def test_an_ended_run_without_a_record_shows_failed_as_the_report_counts_it() -> None:
    data = WaveData(run=run("failed"), records={
        k: record(k, "strict", "STRICT verified") for k in ("east/shop/auth", "east/shop/user", "west/shop/cart")})
    rows = {r.service: r for r in fleet_view([PLAN], {DAG1: data}, Links()).waves[0].services}
    assert (rows["west/shop/search"].state, rows["west/shop/search"].reason) == ("failed", "no outcome recorded")
    assert rows["east/shop/auth"].state == "strict"


def test_report_links_only_when_the_files_exist_and_under_the_ui_root() -> None:
    links = Links(ui_root="/airflow", app_root="/airflow/meshwave")
    wave = fleet_view([PLAN], {DAG1: WaveData(run=run("success"), report=True, chart=False)}, links).waves[0]
    assert wave.report_url == f"/airflow/meshwave/reports/{DAG1}/manual__2026-11-29T21%3A00%3A00%2B00%3A00.csv"
    assert wave.chart_url is None
    assert wave.run_url.startswith(f"/airflow/dags/{DAG1}/runs/")


def test_between_two_tasks_a_service_is_in_progress_after_the_last_that_ran() -> None:
    """Its soak ended and its STRICT gate is not queued yet: in progress after the soak, not "not started"; a path
    not taken (rollback_injection skipped itself) is not where it is."""
    data = WaveData(run=run("running"), tasks=[
        TaskInfo(task_id="batch_1.admit", map_index=0, state="success"),
        TaskInfo(task_id="batch_1.inject", map_index=0, state="success"),
        TaskInfo(task_id="batch_1.soak", map_index=0, state="success"),
        TaskInfo(task_id="batch_1.rollback_injection", map_index=0, state="skipped"),
        TaskInfo(task_id="batch_1.strict_gate", map_index=0, state=None)])
    row = fleet_view([PLAN], {DAG1: data}, Links()).waves[0].services[0]
    assert (row.state, row.step) == ("in progress", "soak (success)")


def test_a_later_mesh_service_run_is_where_the_service_is_an_earlier_one_is_not() -> None:
    from datetime import timedelta

    from meshwave.ui.view import LaterRecord

    wave_run = run("success")
    data = WaveData(run=wave_run, records={
        k: record(k, "strict", "STRICT verified") for k in ("east/shop/auth", "east/shop/user", "west/shop/cart",
                                                            "west/shop/search")})

    def later(key: str, outcome: str, reason: str, delta: int) -> LaterRecord:
        return LaterRecord(record=record(key, outcome, reason, mtls="PERMISSIVE", sidecar=True), dag_id="mesh_service",
                           run_id=f"manual__{delta}", task_id="service.outcome", map_index=0,
                           run_after=wave_run.run_after + timedelta(minutes=delta))
    after = {"east/shop/auth": later("east/shop/auth", "permissive", "PERMISSIVE verified", 5),
             "east/shop/user": later("east/shop/user", "permissive", "PERMISSIVE verified", -5)}
    rows = {r.service: r for r in fleet_view([PLAN], {DAG1: data}, Links(), later=after).waves[0].services}
    assert rows["east/shop/auth"].state == "permissive"
    assert rows["east/shop/auth"].reason == "mesh_service manual__5, after the wave's run: PERMISSIVE verified"
    assert rows["east/shop/auth"].task_url == "/dags/mesh_service/runs/manual__5/tasks/service.outcome/mapped/0"
    assert rows["east/shop/user"].state == "strict", "a run before the wave's is not where the service is now"
    # a wave that never ran: the later run is all there is
    none_yet = {r.service: r for r in fleet_view([PLAN], {}, Links(), later=after).waves[0].services}
    assert none_yet["east/shop/auth"].state == "permissive"
    assert none_yet["west/shop/cart"].state == "not started"


def test_only_runs_that_changed_something_stand_for_a_service() -> None:
    from meshwave.outcomes import ServiceOutcome

    assert {o.value for o in ServiceOutcome if o.changed_nothing} == {"blocked", "frozen", "skipped", "planned"}


def test_the_page_names_broken_plans_the_freeze_and_each_service_s_state() -> None:
    """The HTML as the app renders it (the template alone: no Airflow database)."""
    import re

    from meshwave.ui.app import page_html
    from meshwave.ui.view import EmergencyView

    data = WaveData(run=run("running"), records={
        "east/shop/auth": record("east/shop/auth", "rolled_back", "p99 <breached> & more")})
    view = fleet_view([PLAN], {DAG1: data}, Links(), errors=["broken.yaml: waves[0].name: Field required"],
                      emergency=EmergencyView(freeze="mesh_emergency_rollback manual__1: incident 42"))
    html = page_html(view, user="ops")
    assert "broken.yaml: waves[0].name: Field required" in html
    assert "The freeze is on" in html and "incident 42" in html
    assert 'data-service="east/shop/auth" data-state="rolled_back"' in html
    assert "p99 &lt;breached&gt; &amp; more" in html, "record text is escaped"
    assert len(re.findall(r'data-service="[^"]+" data-state="not started"', html)) == 4  # wave-1: 3, wave-2: 1


def test_a_batch_waiting_for_its_approval_links_to_where_a_person_answers() -> None:
    """Issue 18: between the STRICT gates and the flips, the batch's approval task (outside the group) is where
    every service of the batch is; the link opens the run's required action, where the approver answers."""
    data = WaveData(run=run("running"), tasks=[
        TaskInfo(task_id="batch_1.strict_gate", map_index=0, state="success"),
        TaskInfo(task_id="batch_1.strict_gate", map_index=1, state="success"),
        TaskInfo(task_id="batch_1.rollback_injection", map_index=1, state="skipped"),
        TaskInfo(task_id="approve_batch_1", state="awaiting_input"),
        TaskInfo(task_id="batch_1.flip_strict", map_index=0, state=None)])
    rows = fleet_view([PLAN], {DAG1: data}, Links()).waves[0].services
    for row in rows[:2]:
        assert (row.state, row.step) == ("in progress", "approve_batch_1 (awaiting_input)"), row
        assert row.task_url.endswith("/tasks/approve_batch_1/required_actions"), row.task_url
    assert rows[2].state == "not started", "batch 2's services do not wait for batch 1's approval"
