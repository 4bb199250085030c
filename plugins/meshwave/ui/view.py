"""What the "Mesh migration" page shows: every planned service's state in its wave's latest run, counts and progress
per wave, totals per cluster. Built from what Airflow holds (runs, task instances, the outcome records) and the plan
files; it makes no cluster or Prometheus call.

A service's state is its outcome record when its outcome task wrote one (the same record the report and the
notifications read); before that, the group task it is in (in progress, with the step), or not started. A finished
run with no record for a service shows it failed, "no outcome recorded", as the wave's report counts it.
"""

from __future__ import annotations

import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from meshwave.approval import approval_task_id
from meshwave.group_state import TASKS
from meshwave.outcomes import ServiceOutcome
from meshwave.plan import Plan, ServicePlan, Wave
from meshwave.record import ServiceRecord, unrecorded

# A task instance in one of these is the service's step now (Airflow's TaskInstanceState values).
ACTIVE = ("running", "deferred", "queued", "scheduled", "up_for_retry", "up_for_reschedule", "restarting",
          "awaiting_input")
# A task in one of these did not run its steps: a path not taken (it skips itself), or an upstream that broke.
NOT_RUN = ("skipped", "upstream_failed", "removed")
# A run in one of these has ended: a service without a record then never got one.
ENDED = ("success", "failed")


class PageState(StrEnum):
    """A service's state on the page: not yet an outcome, or its record's outcome (ServiceOutcome's values)."""

    NOT_STARTED = "not started"
    IN_PROGRESS = "in progress"


_BEFORE = {s.value for s in PageState}
# The page's order of states: before any outcome, then the outcomes in the report's order.
STATE_ORDER = [*PageState, *ServiceOutcome]

_FROZEN = ConfigDict(frozen=True)


class RunInfo(BaseModel):
    """A wave DAG's run as Airflow holds it."""

    model_config = _FROZEN

    dag_id: str
    run_id: str
    state: str
    run_type: str
    run_after: datetime
    dry_run: bool = False


class TaskInfo(BaseModel):
    """One task instance of a run (a mapped one: one map index)."""

    model_config = _FROZEN

    task_id: str
    map_index: int = -1
    state: str | None = None


class LaterRecord(BaseModel):
    """A service's record from a run after its wave's: `mesh_service` or `mesh_reconcile` acted on it since (the same
    service group, the same record)."""

    model_config = _FROZEN

    record: ServiceRecord
    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    run_after: datetime


class WaveData(BaseModel):
    """What Airflow holds for a wave's latest run: the run, its task instances, the outcome records by service key,
    and whether its report's CSV and chart are on disk."""

    run: RunInfo | None = None
    tasks: list[TaskInfo] = Field(default_factory=list)
    records: dict[str, ServiceRecord] = Field(default_factory=dict)
    report: bool = False
    chart: bool = False


class Links(BaseModel):
    """Where the page's links go: the Airflow UI's own routes, and this app's report files."""

    model_config = _FROZEN

    ui_root: str = ""  # the UI's path prefix ([api] base_url's path), "" at the root
    app_root: str = "/meshwave"

    def run(self, dag_id: str, run_id: str) -> str:
        return f"{self.ui_root}/dags/{_q(dag_id)}/runs/{_q(run_id)}"

    def task(self, dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
        """The task instance's page: its log is the first tab."""
        mapped = f"/mapped/{map_index}" if map_index >= 0 else ""
        return f"{self.run(dag_id, run_id)}/tasks/{_q(task_id)}{mapped}"

    def required_actions(self, dag_id: str, run_id: str, task_id: str) -> str:
        """Where a person answers a human-in-the-loop task (the batch's approval before STRICT)."""
        return f"{self.run(dag_id, run_id)}/tasks/{_q(task_id)}/required_actions"

    def report(self, dag_id: str, run_id: str, suffix: str) -> str:
        return f"{self.app_root}/reports/{_q(dag_id)}/{_q(run_id)}.{suffix}"


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


class ServiceRow(BaseModel):
    service: str
    cluster: str
    namespace: str
    workload: str
    criticality: str
    batch: int
    state: str = Field(description="a PageState or a ServiceOutcome value")
    step: str | None = Field(None, description="in progress: the group task it is in, and that task's state")
    reason: str = ""
    mtls: str | None = None
    sidecar: bool | None = None
    task_url: str | None = Field(None, description="its task instance now, or its outcome task once recorded")


class WaveView(BaseModel):
    migration: str
    wave: str
    dag_id: str
    run_id: str | None = None
    run_state: str | None = None
    run_type: str | None = None
    dry_run: bool = False
    run_url: str | None = None
    report_url: str | None = None
    chart_url: str | None = None
    counts: dict[str, int] = Field(description="services per state, in the page's order; only states present")
    done: int = Field(description="services with an outcome record")
    total: int
    services: list[ServiceRow]


class ClusterTotals(BaseModel):
    cluster: str
    total: int
    counts: dict[str, int]


class EmergencyView(BaseModel):
    """The freeze, and the emergency rollback's latest real run: records before it may say STRICT where it relaxed."""

    freeze: str | None = Field(None, description="why changes are frozen (the Airflow Variable), or None")
    run_id: str | None = None
    run_state: str | None = None
    run_after: datetime | None = None
    run_url: str | None = None


class FleetView(BaseModel):
    waves: list[WaveView]
    clusters: list[ClusterTotals]
    errors: list[str] = Field(default_factory=list, description="plan files that did not load, and why")
    emergency: EmergencyView = Field(default_factory=EmergencyView)


def counts(states: Iterable[str]) -> dict[str, int]:
    found = Counter(states)
    return {str(s): found[s] for s in STATE_ORDER if found.get(s)}


def wave_view(plan: Plan, wave: Wave, data: WaveData, links: Links,
              later: Mapping[str, LaterRecord] | None = None) -> WaveView:
    from meshwave.wave import batch_group, services_of  # the DAG factory's own batching: one rule for both

    dag_id = plan.dag_id(wave)
    run = data.run
    by_group: dict[str, list[TaskInfo]] = {}  # the task group (a batch), then the task
    for ti in data.tasks:
        by_group.setdefault(ti.task_id.partition(".")[0], []).append(ti)
    rows = []
    position: Counter[int] = Counter()  # a service's map index: its place among its batch's services
    for svc in services_of(plan, wave):
        index = position[svc.batch]
        position[svc.batch] += 1
        own = [ti for ti in by_group.get(batch_group(svc.batch), []) if ti.map_index == index]
        own += by_group.get(approval_task_id(batch_group(svc.batch)), [])  # the batch's approval: every service's
        row = _row(svc.plan, svc.batch, batch_group(svc.batch), index, own, data.records.get(svc.plan.key), run, links)
        rows.append(_since(row, (later or {}).get(svc.plan.key), run, links))
    wave_counts = counts(r.state for r in rows)
    return WaveView(
        migration=plan.migration, wave=wave.name, dag_id=dag_id,
        run_id=run.run_id if run else None, run_state=run.state if run else None,
        run_type=run.run_type if run else None, dry_run=bool(run and run.dry_run),
        run_url=links.run(dag_id, run.run_id) if run else None,
        report_url=links.report(dag_id, run.run_id, "csv") if run and data.report else None,
        chart_url=links.report(dag_id, run.run_id, "png") if run and data.chart else None,
        counts=wave_counts, done=sum(1 for r in rows if r.state not in _BEFORE), total=len(rows), services=rows)


def _row(planned: ServicePlan, batch: int, group: str, index: int, tasks: list[TaskInfo], record: ServiceRecord | None,
         run: RunInfo | None, links: Links) -> ServiceRow:
    base = dict(service=planned.key, cluster=planned.cluster, namespace=planned.namespace,
                workload=planned.workload, criticality=str(planned.criticality), batch=batch)
    if run is not None and record is None and run.state in ENDED:
        record = unrecorded(planned.key, batch)
    if record is not None:
        url = links.task(run.dag_id, run.run_id, f"{group}.outcome", index) if run else None
        return ServiceRow(**base, state=record.outcome.value, reason=record.reason, mtls=record.mtls,
                          sidecar=record.sidecar, task_url=url)
    current = _current(group, tasks)
    if run is None or current is None:
        why = "no run of this wave yet" if run is None else f"{group} has not reached it"
        return ServiceRow(**base, state=PageState.NOT_STARTED.value, reason=why)
    if current.task_id == approval_task_id(group):  # the batch waits for a person: the link is where they answer
        return ServiceRow(**base, state=PageState.IN_PROGRESS.value, step=f"{current.task_id} ({current.state})",
                          reason="the batch's approval before STRICT",
                          task_url=links.required_actions(run.dag_id, run.run_id, current.task_id))
    step = current.task_id.partition(".")[2]
    return ServiceRow(**base, state=PageState.IN_PROGRESS.value, step=f"{step} ({current.state})",
                      task_url=links.task(run.dag_id, run.run_id, current.task_id, index))


def _since(row: ServiceRow, later: LaterRecord | None, run: RunInfo | None, links: Links) -> ServiceRow:
    """The row as a run after the wave's left the service, when one did: the latest record is where it is."""
    if later is None or (run is not None and later.run_after <= run.run_after):
        return row
    r = later.record
    return row.model_copy(update={
        "state": r.outcome.value, "step": None, "mtls": r.mtls, "sidecar": r.sidecar,
        "reason": f"{later.dag_id} {later.run_id}, after the wave's run: {r.reason}",
        "task_url": links.task(later.dag_id, later.run_id, later.task_id, later.map_index)})


def _current(group: str, tasks: list[TaskInfo]) -> TaskInfo | None:
    """Where the service is: its furthest group task under way (the tasks run in TASKS' order, with the batch's
    approval between strict_gate and flip_strict, then outcome); between two tasks (one ended, the next not queued
    yet), the furthest that ran; None when none has a state yet."""
    order = [*TASKS, "outcome"]
    order.insert(order.index("flip_strict"), approval_task_id(group))

    def step(ti: TaskInfo) -> str:
        return ti.task_id if ti.task_id == approval_task_id(group) else ti.task_id.partition(".")[2]

    own = [ti for ti in tasks if ti.state and step(ti) in order]
    active = [ti for ti in own if ti.state in ACTIVE]
    ran = [ti for ti in own if ti.state not in NOT_RUN]
    return max(active or ran or own, key=lambda ti: order.index(step(ti)), default=None)


def cluster_totals(waves: Iterable[WaveView]) -> list[ClusterTotals]:
    by_cluster: dict[str, list[str]] = {}
    for wave in waves:
        for row in wave.services:
            by_cluster.setdefault(row.cluster, []).append(row.state)
    return [ClusterTotals(cluster=c, total=len(states), counts=counts(states))
            for c, states in sorted(by_cluster.items())]


def fleet_view(plans: Iterable[Plan], data: Mapping[str, WaveData], links: Links, errors: Iterable[str] = (),
               later: Mapping[str, LaterRecord] | None = None,
               emergency: EmergencyView | None = None) -> FleetView:
    """`data` by wave DAG id (a wave with none shows every service not started); `later`: by service key, the latest
    record a `mesh_service` or `mesh_reconcile` run left, which stands for a service when newer than its wave's."""
    waves = [wave_view(plan, wave, data.get(plan.dag_id(wave)) or WaveData(), links, later)
             for plan in plans for wave in plan.waves]
    return FleetView(waves=waves, clusters=cluster_totals(waves), errors=list(errors),
                     emergency=emergency or EmergencyView())
