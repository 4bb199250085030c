"""What Airflow's metadata database holds for the page: each wave DAG's latest run, that run's task instances and
the outcome records its services' outcome tasks pushed (XCom "record"); the records `mesh_service` and
`mesh_reconcile` runs left since; the freeze and the emergency rollback's latest real run.

Read in the api-server, which owns the metadata database, as Airflow's own REST endpoints read it: three queries per
wave shown and three more, no cluster call. Only DAGs the user may read are asked for (the caller passes them).
"""

from __future__ import annotations

from collections.abc import Iterable

from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.models.variable import Variable
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from meshwave import report
from meshwave.group_state import decoded
from meshwave.guards import FREEZE_VARIABLE, OFF
from meshwave.record import ServiceRecord
from meshwave.ui.view import EmergencyView, LaterRecord, Links, RunInfo, TaskInfo, WaveData

# The DAGs whose service group acts on a planned service after its wave (they push the same record).
AFTER_THE_WAVE = ("mesh_service", "mesh_reconcile")
EMERGENCY = "mesh_emergency_rollback"
LATER_ROWS = 2000  # the newest records read; an older one would have been replaced by a newer wave run anyway


class Snapshot(BaseModel):
    waves: dict[str, WaveData]
    later: dict[str, LaterRecord]
    emergency: EmergencyView


def read(dag_ids: Iterable[str], readable: set[str], links: Links) -> Snapshot:
    """The waves `dag_ids`; records after them and the emergency run only from DAGs in `readable`."""
    with create_session() as session:
        return Snapshot(waves={dag_id: _wave(session, dag_id) for dag_id in dag_ids},
                        later=_later(session, [d for d in AFTER_THE_WAVE if d in readable]),
                        emergency=_emergency(session, EMERGENCY in readable, links))


def _record(row) -> ServiceRecord | None:
    value = decoded(XComModel.deserialize_value(row))
    return ServiceRecord.model_validate(value) if isinstance(value, dict) else None


def _wave(session: Session, dag_id: str) -> WaveData:
    run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id)
                          .order_by(DagRun.run_after.desc(), DagRun.id.desc()).limit(1)).first()
    if run is None:
        return WaveData()
    info = RunInfo(dag_id=dag_id, run_id=run.run_id, state=str(run.state), run_type=str(run.run_type),
                   run_after=run.run_after, dry_run=bool((run.conf or {}).get("dry_run")))
    tis = session.execute(select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state)
                          .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id)).all()
    records = {}
    for row in session.execute(select(XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run.run_id, XComModel.key == "record")).all():
        if (record := _record(row)) is not None:
            records[record.service] = record
    base = report.report_base(dag_id, run.run_id)
    return WaveData(run=info, records=records,
                    tasks=[TaskInfo(task_id=t.task_id, map_index=t.map_index,
                                    state=str(t.state) if t.state is not None else None) for t in tis],
                    report=base.with_suffix(".csv").is_file(), chart=base.with_suffix(".png").is_file())


def _later(session: Session, dag_ids: list[str]) -> dict[str, LaterRecord]:
    """Per service, the newest record of those DAGs' runs that changed something (a dry run, a refusal, a frozen or
    skipped run left the service as it was)."""
    if not dag_ids:
        return {}
    rows = session.execute(
        select(XComModel.value, XComModel.dag_id, XComModel.run_id, XComModel.task_id, XComModel.map_index,
               DagRun.run_after)
        .join(DagRun, (DagRun.dag_id == XComModel.dag_id) & (DagRun.run_id == XComModel.run_id))
        .where(XComModel.dag_id.in_(dag_ids), XComModel.key == "record")
        .order_by(DagRun.run_after.desc()).limit(LATER_ROWS)).all()
    found: dict[str, LaterRecord] = {}
    for row in rows:
        record = _record(row)
        if record is None or record.outcome.changed_nothing or record.service in found:
            continue
        found[record.service] = LaterRecord(record=record, dag_id=row.dag_id, run_id=row.run_id,
                                            task_id=row.task_id, map_index=row.map_index, run_after=row.run_after)
    return found


def _confirmed(session: Session, run: DagRun) -> bool:
    """A run whose form asked for a confirmation and whose person applied it (its `confirm` task's answer)."""
    if not (run.conf or {}).get("confirm"):
        return False
    row = session.execute(select(XComModel.value).where(
        XComModel.dag_id == EMERGENCY, XComModel.run_id == run.run_id, XComModel.task_id == "confirm",
        XComModel.key == "return_value")).first()
    value = decoded(XComModel.deserialize_value(row)) if row is not None else None
    return isinstance(value, dict) and value.get("applied") is True


def _emergency(session: Session, readable: bool, links: Links) -> EmergencyView:
    """The freeze (an Airflow Variable: no cluster call) and, when the user may read it, the emergency rollback's
    latest run that was not a dry run (its form's dry_run defaults to on), or that a person confirmed."""
    variable = session.scalars(select(Variable).where(Variable.key == FREEZE_VARIABLE)).first()
    value = str(variable.val).strip() if variable is not None and variable.val is not None else ""
    freeze = value if value.lower() not in OFF else None
    if not readable:
        return EmergencyView(freeze=freeze)
    runs = session.scalars(select(DagRun).where(DagRun.dag_id == EMERGENCY)
                           .order_by(DagRun.run_after.desc()).limit(50)).all()
    real = next((r for r in runs if (r.conf or {}).get("dry_run") is False or _confirmed(session, r)), None)
    if real is None:
        return EmergencyView(freeze=freeze)
    return EmergencyView(freeze=freeze, run_id=real.run_id, run_state=str(real.state), run_after=real.run_after,
                         run_url=links.run(EMERGENCY, real.run_id))
