"""The DAG `mesh_reconcile`: finishes the undo that a wave could not.

A wave that is paused, whose plan file broke, or whose undo ran out of retries leaves a change nobody confirmed:
a sidecar still on trial, a STRICT never verified. Each such change carries what meshwave expects next (the
annotation `meshwave.io/pending` on the Deployment, see pending.py). This DAG, on a schedule, lists those
annotations in every cluster of the plan files and, for each one past its deadline, carries out its undo (back to
PERMISSIVE, or remove the sidecar) through the same service task group as the waves and `mesh_service`, with the
same checks (PERMISSIVE proven from every policy and the recovery verified; the rollback's rollout watched). An
undo that fails again stays due: the next run tries again, and the run fails, naming it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pendulum
from airflow.sdk import DAG, BaseHook, Param, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from meshwave.fleet import load_fleet
from meshwave.group_state import decoded
from meshwave.pending import Pending
from meshwave.record import ServiceRecord
from meshwave.service_group import DEFAULT_ARGS, kube_for, service_group
from meshwave.steps import Service

# Airflow sends a task's stdlib logging to its task log, each line with its level and this module's name
log = logging.getLogger(__name__)

DAG_ID = "mesh_reconcile"
GROUP = "undo"
# Every 10 minutes by default; MESHWAVE_RECONCILE_SCHEDULE sets another cron expression, or "none" (triggered only).
SCHEDULE_ENV, DEFAULT_SCHEDULE = "MESHWAVE_RECONCILE_SCHEDULE", "*/10 * * * *"
LABEL = "{{ ti.xcom_pull(task_ids='find_due')[ti.map_index] }}"


def schedule() -> str | None:
    value = os.environ.get(SCHEDULE_ENV, DEFAULT_SCHEDULE).strip()
    return None if value.lower() in ("", "none") else value


def _find_due():
    @task(task_id="find_due")
    def find_due(**context: Any) -> list[str]:
        """Every pending state in every cluster of the plans; the keys of those past their deadline."""
        from meshwave.connections import mesh_kube  # the kubernetes client: at run time

        fleet = load_fleet()
        due: dict[str, Any] = {}
        problems = [f"plan file: {e}" for e in fleet.errors]
        wanted = list(context["params"].get("clusters") or fleet.clusters)
        problems += [f"cluster {c}: not a cluster of the plan files" for c in wanted if c not in fleet.clusters]
        for name, cfg in sorted((c, fleet.clusters[c]) for c in wanted if c in fleet.clusters):
            try:
                kube = mesh_kube(BaseHook.get_connection(cfg.kubernetes_conn_id), name, cfg.root_namespace,
                                 revision=cfg.revision)
                found, unreadable = kube.list_pending()
            except Exception as exc:  # one cluster that cannot be read must not hide the others' undo
                problems.append(f"cluster {name}: cannot list pending states: {type(exc).__name__}: {exc}")
                continue
            problems += unreadable
            for ns, workload, pending in found:
                key = f"{name}/{ns}/{workload}"
                log.info(f"{'DUE' if pending.due() else 'not due'}: {key}: {pending.describe()}")
                if pending.due():
                    due[key] = pending.model_dump(mode="json")
        for problem in problems:
            log.warning(f"PROBLEM: {problem}")
        context["ti"].xcom_push(key="pending", value=due)
        context["ti"].xcom_push(key="problems", value=problems)
        return sorted(due)

    return find_due()


def _resolve(context: dict[str, Any], key: str) -> Service:
    """The service as the run that changed it admitted it (the annotation's copy), with the undo as its action."""
    data = (context["ti"].xcom_pull(task_ids="find_due", key="pending") or {}).get(key)
    if data is None:
        raise ValueError(f"{key}: no pending state was found for it")
    pending = Pending.model_validate(data)
    return Service.from_dict({**pending.service, "action": str(pending.undo)})


def _still_due(svc: Service, context: dict[str, Any]) -> None:
    """Read again before acting: a run that settled it meanwhile (or a later change) wins."""
    p = svc.plan
    current = kube_for(svc, context).pending(p.namespace, p.workload)
    if current is None or not current.due() or str(current.undo) != svc.action:
        now = current.describe() if current else "nothing pending"
        raise AirflowSkipException(f"{p.key}: settled meanwhile ({now})")
    log.info(f"{p.key}: {current.describe()}: carrying out {current.undo}")


def not_reconciled(problems: list[str], records: list[ServiceRecord]) -> list[str]:
    """What this run could not settle: clusters or annotations it could not read, undos that did not complete."""
    left = [r for r in records if not r.outcome.undone]
    return problems + [f"{r.service}: {r.outcome}: {r.reason}" for r in left]


def _summary():
    @task(task_id="summary", trigger_rule="all_done")
    def summary(**context: Any) -> dict[str, Any]:
        ti = context["ti"]
        keys = ti.xcom_pull(task_ids="find_due") or []
        # explicit map indexes: a pull of all of them returns a lone record bare, not in a list
        pulled = ti.xcom_pull(task_ids=f"{GROUP}.outcome", key="record",
                              map_indexes=list(range(len(keys)))) if keys else []
        records = [ServiceRecord.model_validate(decoded(r)) for r in pulled if r]
        for r in records:
            log.log(logging.INFO if r.outcome.undone else logging.WARNING, f"{r.service}: {r.outcome}: {r.reason}")
        left = not_reconciled(ti.xcom_pull(task_ids="find_due", key="problems") or [], records)
        if left:
            raise AirflowFailException("NOT RECONCILED (the next run tries again): " + "; ".join(left))
        return {"undone": len(records)}

    return summary()


DOC = f"""# mesh_reconcile: finish the undo a wave could not

A wave that is **paused**, whose **plan file broke**, or whose **undo ran out of retries** leaves a change nobody
confirmed. Before each such change meshwave writes what it expects next onto the Deployment (annotation
`meshwave.io/pending`: the state, the undo, a deadline, the run, and the service's settings), and removes it when
the run settles it. This DAG lists those annotations in every cluster of the plan files; for each one past its
deadline it carries out the undo (`permissive`, `remove_sidecar`, or `remove_canary`) through the same service task
group as the waves, with the same checks. An undo that fails stays due and fails this run, naming it; the next run
tries again.

Scheduled every 10 minutes (environment `{SCHEDULE_ENV}`: another cron expression, or `none`); trigger it by hand
after pausing a wave. `clusters` limits it to some clusters; `dry_run` lists and logs, and changes nothing.
"""


def mesh_reconcile_dag() -> DAG:
    with DAG(dag_id=DAG_ID, schedule=schedule(), start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
             max_active_runs=1, doc_md=DOC, tags=["meshwave", "reconcile"], default_args=DEFAULT_ARGS,
             params={"clusters": Param([], type="array", items={"type": "string"}, title="Clusters",
                                       description="Only these clusters (as the plan files name them); empty: all."),
                     "dry_run": Param(False, type="boolean", title="Dry run",
                                      description="List what is due and log the undo's requests; change nothing.")}
             ) as dag:
        keys = _find_due()
        group = service_group(GROUP, _resolve, "A pending state past its deadline: its undo, with the same checks.",
                              keys, label=LABEL, guard=_still_due, canary_asked=True)
        group >> _summary()
    return dag
