"""The DAG `mesh_emergency_rollback`, the big red button (see meshwave.emergency); dags/ holds a thin file.

    validate -> confirm (optional: a person confirms the dry run's plan of action, then it is applied)
             -> stage_1: to_permissive (one mapped task per cluster) -> stage_1_done
             -> stage_2: remove_sidecars (optional, deferrable, chunked) -> stage_3: verify_health -> report

Parsing reads the local plan files only (for the cluster list), at each parse; nothing here depends on the wave
DAGs. The tasks' operators and triggers are in emergency_tasks.py, what they do in emergency.py.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, BaseHook, Param, TaskGroup, TriggerRule, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from meshwave import emergency as em
from meshwave.access import connection_prefixes, operator_access_control
from meshwave.connections import mesh_kube
from meshwave.emergency_tasks import (
    ConfirmRollback,
    RemoveSidecarsOperator,
    VerifyHealthOperator,
    begin,
    log_changes,
    request_of,
    tell,
)
from meshwave.fleet import Fleet, load_fleet, plans_dir
from meshwave.names import RFC1123_LABEL
from meshwave.plan import NotifyEvent

# Airflow sends a task's stdlib logging to its task log, each line with its level and this module's name
log = logging.getLogger(__name__)

DAG_ID = "mesh_emergency_rollback"
SERVICE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SCOPE, STAGE_2, STAGE_3 = "Scope", "Stage 2: remove sidecars (optional, restarts)", "Stage 3: verify health"


def emergency_dag() -> DAG:
    """The DAG, its form offering the clusters of the local plan files as they are at this parse."""
    fleet = load_fleet()  # local plan files only; a broken one keeps its error for the docs
    with DAG(DAG_ID, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
             max_active_runs=1, params=params(fleet), doc_md=_doc(fleet), tags=["meshwave", "emergency"],
             # under FAB only the operator role (and roles with every DAG) may trigger it: meshwave.access
             access_control=operator_access_control(),
             # retries for a worker that could not start (an API server stalled) or a transient API error; a refused
             # form or change is not retried
             default_args={"owner": "meshwave", "retries": 2, "retry_delay": timedelta(seconds=10),
                           "retry_exponential_backoff": 2}) as dag:
        validated = _validate()
        stage_1 = _stage_1(validated)
        stage_2 = _stage_2()
        stage_3 = _stage_3()
        confirm = ConfirmRollback(task_id="confirm", doc_md="With the form's `confirm`: the plan of action (a dry run) "
                                  "goes to a person, who applies it in this run or cancels; without it, nobody is "
                                  "asked.")
        validated >> confirm >> stage_1 >> stage_2 >> stage_3 >> _report()
    return dag


def params(fleet: Fleet) -> dict[str, Param]:
    """The trigger form; the clusters offered are those of the plans."""
    return {
        "dry_run": Param(True, type="boolean", title="Dry run: show the plan of action, change nothing",
                         description="ON (default): every stage logs exactly what it would change, with the request, "
                                     "and stage 3 reports the current health once. Switch OFF to APPLY the rollback."),
        "confirm": Param(False, type="boolean", title="Dry run, then ask, then apply: in this one run",
                         description="ON: the run shows its plan of action (a dry run, nothing changed) to a person in "
                                     "the UI's Required Actions and waits; 'apply the rollback' applies it in the same "
                                     "run, 'cancel' or no answer in time leaves it a dry run. Overrides 'Dry run'."),
        "confirm_timeout_seconds": Param(900, type="integer", minimum=10, maximum=24 * 3600,
                                         title="Wait for the confirmation (s)",
                                         description="With 'confirm': no answer by then is 'cancel' (nothing "
                                                     "changed)."),
        "clusters": Param([em.ALL], type="array", title="Clusters", examples=[em.ALL, *sorted(fleet.clusters)],
                          items={"type": "string"}, section=SCOPE,
                          description=f"'{em.ALL}' = every cluster the plans name, or pick clusters. A cluster that no "
                                      "plan names needs its connections in 'Cluster connections'."),
        "namespace": Param(None, type=["null", "string"], title="Namespace (optional)", section=SCOPE,
                           pattern=RFC1123_LABEL.pattern,
                           description="Only this namespace (plus the mesh-wide policy, always). Empty: every "
                                       "namespace."),
        "services": Param(None, type=["null", "array"], title="Services (optional)", section=SCOPE,
                          items={"type": "string", "pattern": SERVICE},
                          description="Only these services, one namespace/workload per line (e.g. payments/payment-"
                                      "service), in every cluster chosen. Empty: the whole namespace or cluster."),
        "cluster_connections": Param(None, type=["null", "object"],
                                     title="Cluster connections (only if not in a plan)", section=SCOPE,
                                     description='For clusters no plan names (or whose plan file is broken): '
                                                 '{"prod-x-1": {"kubernetes_conn_id": "...", "prometheus_conn_id": '
                                                 '"..."}}. Only connection ids starting with '
                                                 f'{" or ".join(connection_prefixes())} '
                                                 '(MESHWAVE_CONNECTION_PREFIXES).'),
        "remove_sidecars": Param(False, type="boolean", title="Remove sidecars (restarts pods)", section=STAGE_2,
                                 description="Stage 2: label sidecar.istio.io/inject=false and roll the pods of every "
                                             "workload in scope that has a sidecar, critical services first. Off: "
                                             "stage 1 only (PERMISSIVE, no restart)."),
        "max_parallel": Param(5, type="integer", minimum=1, maximum=50, title="Restarts at a time", section=STAGE_2,
                              description="At most this many workloads rolling at once in stage 2."),
        "rollout_timeout_seconds": Param(300, type="integer", minimum=10, maximum=3600, section=STAGE_2,
                                         title="Rollout timeout per chunk (s)",
                                         description="A chunk whose rollouts are not done by then is reported, and the "
                                                     "next chunk starts."),
        "min_success_rate": Param(0.99, type="number", minimum=0, maximum=1, title="Healthy at or above",
                                  section=STAGE_3,
                                  description="Application success rate (non-5xx / all, the app's own "
                                              "http_requests_total) a service with traffic must reach."),
        "health_window": Param("1m", type="string", pattern=r"^([0-9]+[smh])+$", title="Rate window", section=STAGE_3,
                               description="PromQL rate window, at least 2 scrape intervals (e.g. 30s, 1m, 2m)."),
        "health_timeout_seconds": Param(300, type="integer", minimum=0, maximum=7200, title="Wait for health (s)",
                                        section=STAGE_3,
                                        description="Poll until every service is healthy or this many seconds; 0: "
                                                    "check once."),
    }


def _doc(fleet: Fleet) -> str:
    """The DAG's doc_md: what each stage does, and the clusters the plans offer."""
    clusters = ", ".join(f"`{c}`" for c in sorted(fleet.clusters)) or "none (give `cluster_connections`)"
    errors = "".join(f"\n- `{e.splitlines()[0]}`" for e in fleet.errors)
    broken = f"\n\nPlan files with errors (their clusters are not offered):{errors}" if errors else ""
    return f"""# Emergency rollback: the big red button

Puts the mesh back to where every caller reaches every service, fast, **without the wave DAGs** (they may
be paused or broken; this DAG only reads the plans' cluster list and criticality).

0. **freeze** (not in a dry run): `validate` sets the Airflow Variable `meshwave_freeze` (an existing one is
   kept) before anything is relaxed: every wave re-reads it just before each inject or flip to STRICT, so a
   service in flight stops PERMISSIVE (outcome `frozen`). It stays until an operator deletes it.
1. **stage_1** (seconds, no restart): every PeerAuthentication in scope whose mode or any port is STRICT goes
   to PERMISSIVE, the mesh-wide one (root namespace) first, then namespace-wide, then workload policies. The
   object is kept and annotated with its previous modes (`meshwave.io/emergency-previous-mtls`) and the run
   (`meshwave.io/emergency-rollback`); meshwave never makes a policy so marked STRICT again until an operator
   runs `mesh_service` `clear_emergency` on the workload. A policy that cannot be written (webhook denial,
   RBAC, conflict) is recorded and the rest are still tried; the cluster's task then fails listing what is
   still STRICT and why. One task per cluster, in parallel.
2. **stage_2** (optional, `remove_sidecars`): `sidecar.istio.io/inject=false` and a rollout for every workload
   in scope with a sidecar, critical first, at most `max_parallel` at a time; waits deferrably.
3. **stage_3**: the application's own success rate per workload from Prometheus (one query per cluster)
   until every service in scope with traffic is at or above `min_success_rate`; reports what is still
   unhealthy and the seconds from stage-1 start to all healthy.

**Dry run is ON by default**: trigger once to see the plan of action, then again with dry run OFF. Or, in one
run, **`confirm`**: the task `confirm` shows the plan of action to a person (the UI's Required Actions) and waits;
"apply the rollback" sets the freeze and applies it in the same run; "cancel", or no answer within
`confirm_timeout_seconds`, leaves the run a dry run.
Re-running changes nothing already rolled back.

Clusters from the plans in `{plans_dir()}`: {clusters}.{broken}
"""


def _problems(summary: dict[str, Any], prometheus_errors: dict[str, str]) -> list[str]:
    problems = []
    if summary["failed_clusters"]:
        problems.append(f"stage 1 did not complete on {', '.join(summary['failed_clusters'])}")
    if summary["stage_2_failed"]:
        problems.append(f"stage 2 did not roll out {', '.join(summary['stage_2_failed'])}")
    if summary["health"] != "healthy":
        problems.append(f"stage 3: {summary['health']}: {len(summary['unhealthy'])} service(s) below the floor"
                        + "".join(f"; Prometheus of {c}: {e}" for c, e in prometheus_errors.items()))
    return problems


def _not_relaxed(cluster: str, left: list[dict[str, Any]]) -> str:
    """The task's failure: every policy still STRICT on the cluster, and why (each other one was relaxed)."""
    for item in left:
        log.warning(f"STILL STRICT: {cluster}: peerauthentication {item['policy']} ({item['scope']}): {item['why']}: "
                    f"{item['message']}")
    return (f"stage 1 on {cluster}: {len(left)} polic(ies) still STRICT, every other one relaxed: "
            + "; ".join(f"{i['policy']} ({i['scope']}): {i['why']}" for i in left))


def _kube(target: dict[str, Any], dry_run: bool) -> Any:
    return mesh_kube(BaseHook.get_connection(target["kubernetes_conn_id"]), target["cluster"],
                     target["root_namespace"], dry_run=dry_run)


def _validate() -> Any:
    """validate: the form checked, the freeze set (unless a dry run); its targets feed stage 1."""
    @task
    def validate(**context: Any) -> list[dict[str, Any]]:
        """Every form field checked before any change; the scope and the clusters' connections."""
        try:
            request = em.parse_request(dict(context["params"]), load_fleet())
        except em.ScopeError as exc:
            raise AirflowFailException(str(exc)) from None
        for note in request.notes:
            log.warning(note)
        mode = ("TO BE CONFIRMED: a dry run until a person applies it (task confirm)" if request.confirm else
                "DRY RUN: nothing will be changed" if request.dry_run else "APPLYING")
        log.info(f"{mode}: {request.scope.describe()}; stage 2 (remove sidecars): "
                 f"{'on, ' + str(request.max_parallel) + ' at a time' if request.remove_sidecars else 'off'}")
        if not request.dry_run:  # before stage 1: no wave may write inject or STRICT from here on
            begin(request, context)
        context["ti"].xcom_push(key="request", value=request.to_dict())
        return [t.to_dict() for t in request.targets]  # stage 1 maps over them

    return validate()


def _stage_1(validated: Any) -> TaskGroup:
    """stage_1: one to_permissive per cluster, then stage_1_done."""
    with TaskGroup("stage_1", tooltip="PeerAuthentications back to PERMISSIVE, no restart",
                   doc_md="Every STRICT PeerAuthentication in scope to PERMISSIVE (the mesh-wide one always), per "
                          "cluster in parallel; the previous modes are annotated on the object.") as stage_1:

        @task(retries=2, retry_delay=timedelta(seconds=3), map_index_template="{{ cluster }}")
        def to_permissive(target: dict[str, Any]) -> dict[str, Any]:
            context = get_current_context()
            context["cluster"] = target["cluster"]  # type: ignore[typeddict-unknown-key]
            request = request_of(context)
            assert request is not None
            note = f"{DAG_ID} {context['run_id']}"
            result = em.relax_cluster(_kube(target, request.dry_run), request.scope, note)
            log.info(em.table(result["policies"], ["policy", "scope", "strict"]))
            log_changes(result["changes"])
            for key in result["missing_services"]:
                log.warning(f"{key}: no such deployment in {target['cluster']}")
            for key, sources in result["still_strict"].items():  # from every policy, after the writes
                log.warning(f"STILL STRICT: {target['cluster']}/{key}: {'; '.join(sources)}")
            log.info(f"stage 1 on {target['cluster']}: {result['ended'] - result['started']:.2f}s")
            context["ti"].xcom_push(key="result", value=result)  # kept when the task fails below
            if result["not_relaxed"]:  # every policy was tried; a retry would be refused the same way
                raise AirflowFailException(_not_relaxed(target["cluster"], result["not_relaxed"]))
            return result

        @task(trigger_rule=TriggerRule.ALL_DONE)
        def stage_1_done(results: Any, **context: Any) -> dict[str, Any]:
            """The stage-1 window (first cluster's start to last cluster's end) and any cluster that failed."""
            request = request_of(context)
            if request is None:
                raise AirflowSkipException("the form did not validate: nothing was changed")
            done = [r for r in results or [] if r]
            started, ended = em.stage1_window(done)
            failed = sorted(set(request.scope.clusters) - {r["cluster"] for r in done})
            changed = [c for r in done for c in r["changes"] if c["applied"] or c["dry_run"]]
            for cluster in failed:
                log.warning(f"cluster {cluster}: stage 1 did not complete: see stage_1.to_permissive [{cluster}]")
            if started is not None:
                log.info(f"stage 1: {len(changed)} polic(ies) {'to change' if request.dry_run else 'changed'} in "
                         f"{ended - started:.2f}s")
            return {"started": started, "ended": ended, "seconds": None if started is None else ended - started,
                    "failed_clusters": failed, "changes": changed}

        stage_1_done(to_permissive.expand(target=validated))
    return stage_1


def _stage_2() -> TaskGroup:
    """stage_2: remove_sidecars (emergency_tasks.RemoveSidecarsOperator)."""
    with TaskGroup("stage_2", tooltip="optional: sidecars out, critical first, max_parallel at a time",
                   doc_md="Only with `remove_sidecars`: inject=false and a rollout per workload with a sidecar, "
                          "critical first, at most `max_parallel` rolling at once (one deferrable task).") as stage_2:
        RemoveSidecarsOperator(task_id="remove_sidecars", trigger_rule=TriggerRule.ALL_DONE)
    return stage_2


def _stage_3() -> TaskGroup:
    """stage_3: verify_health (emergency_tasks.VerifyHealthOperator)."""
    with TaskGroup("stage_3", tooltip="success rate per workload from Prometheus",
                   doc_md="The app's own success rate per workload, one query per cluster, polled deferrably until "
                          "every service in scope with traffic is healthy or the wait ends.") as stage_3:
        VerifyHealthOperator(task_id="verify_health", trigger_rule=TriggerRule.ALL_DONE)
    return stage_3


def _report() -> Any:
    """report: the run's summary; fails the run if anything is left."""
    @task(trigger_rule=TriggerRule.ALL_DONE)
    def report(**context: Any) -> dict[str, Any]:
        """What was done, what is still unhealthy, how long it took; fails the run if anything is left."""
        request = request_of(context)
        if request is None:
            raise AirflowSkipException("the form did not validate: nothing was changed")
        ti = context["ti"]
        stage1 = ti.xcom_pull(task_ids="stage_1.stage_1_done") or {}
        stage2 = ti.xcom_pull(task_ids="stage_2.remove_sidecars") or {}
        health = ti.xcom_pull(task_ids="stage_3.verify_health") or {}
        summary = {"dry_run": request.dry_run, "scope": request.scope.to_dict(),
                   "stage_1_seconds": stage1.get("seconds"), "stage_1_changes": len(stage1.get("changes", [])),
                   "failed_clusters": stage1.get("failed_clusters", []),
                   "stage_2_failed": stage2.get("failed", []), "health": health.get("status", "not checked"),
                   "seconds_to_healthy": health.get("seconds_since_stage_1"),
                   "unhealthy": health.get("unhealthy", []), "counts": health.get("counts", {}),
                   "confirmation": ti.xcom_pull(task_ids="confirm") or {"asked": False}}
        log.info(em.table([{"what": k, "value": v if not isinstance(v, list) else len(v)} for k, v in summary.items()
                           if k not in ("scope", "confirmation")], ["what", "value"]))
        if (confirmation := summary["confirmation"]).get("asked"):
            (log.info if confirmation["applied"] else log.warning)(
                "confirmed: applied" if confirmation["applied"] else
                f"NOT APPLIED ({'nobody answered in time' if confirmation['timed_out'] else 'cancelled'}"
                f"{', by ' + confirmation['by'] if confirmation.get('by') else ''}): this run was a dry run")
        log.info(em.table(summary["unhealthy"], ["cluster", "service", "success_rate", "status"]))
        problems = _problems(summary, health.get("errors") or {})
        ti.xcom_push(key="summary", value=summary)
        if request.dry_run:  # the outage is still there in a dry run; an incomplete plan of action is a failure
            problems = [p for p in problems if not p.startswith("stage 3")]
        else:
            seconds = summary["stage_1_seconds"]
            tell(request, context, NotifyEvent.EMERGENCY_FINISHED,
                  f"emergency rollback FINISHED{' with problems' if problems else ''}",
                  f"stage 1 took {'-' if seconds is None else f'{seconds:.2f}'} s; health {summary['health']}, "
                  f"{summary['seconds_to_healthy'] or '-'} s to healthy", "; ".join(problems) or "nothing left")
        if problems:
            raise AirflowFailException(("dry run incomplete: " if request.dry_run else "") + "; ".join(problems))
        return summary

    return report()
