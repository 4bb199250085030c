"""What Airflow's metadata database holds for the waves the page shows: each wave DAG's latest run, that run's task
instances and the outcome records its services' outcome tasks pushed (XCom "record").

Read in the api-server, which owns the metadata database, as Airflow's own REST endpoints read it: three queries per
wave shown, no cluster call. Only DAGs the user may read are asked for (the caller passes them).
"""

from __future__ import annotations

from collections.abc import Iterable

from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select
from sqlalchemy.orm import Session

from meshwave import report
from meshwave.group_state import decoded
from meshwave.record import ServiceRecord
from meshwave.ui.view import RunInfo, TaskInfo, WaveData


def read_waves(dag_ids: Iterable[str]) -> dict[str, WaveData]:
    with create_session() as session:
        return {dag_id: _wave(session, dag_id) for dag_id in dag_ids}


def _wave(session: Session, dag_id: str) -> WaveData:
    run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id)
                          .order_by(DagRun.run_after.desc(), DagRun.id.desc()).limit(1)).first()
    if run is None:
        return WaveData()
    info = RunInfo(dag_id=dag_id, run_id=run.run_id, state=str(run.state), run_type=str(run.run_type),
                   run_after=run.run_after, dry_run=bool((run.conf or {}).get("dry_run")))
    tis = session.execute(select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state)
                          .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id)).all()
    records: dict[str, ServiceRecord] = {}
    for row in session.execute(select(XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run.run_id, XComModel.key == "record")).all():
        if isinstance(value := decoded(XComModel.deserialize_value(row)), dict):
            record = ServiceRecord.model_validate(value)
            records[record.service] = record
    base = report.report_base(dag_id, run.run_id)
    return WaveData(run=info, records=records,
                    tasks=[TaskInfo(task_id=t.task_id, map_index=t.map_index,
                                    state=str(t.state) if t.state is not None else None) for t in tis],
                    report=base.with_suffix(".csv").is_file(), chart=base.with_suffix(".png").is_file())
