"""The ad-hoc DAG `mesh_service`: one service, one action, from the trigger form, the REST API or the CLI.

It runs the same service task group as the waves (service_group.py). The form's choices come from the
plan files (parse time, local files only); at run time the input is checked again and the service is
resolved against the plans: a planned service runs with its planned settings (sidecar sizing,
thresholds), another one with the defaults of the plan that names its cluster.
"""

from __future__ import annotations

import logging
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from pydantic import ValidationError

from meshwave import guards
from meshwave.access import operator_access_control
from meshwave.fleet import Fleet, load_fleet
from meshwave.group_state import decoded
from meshwave.names import RFC1123_LABEL, rfc1123_label
from meshwave.plan import ServicePlan, timing_problems
from meshwave.record import ServiceRecord
from meshwave.service_group import DEFAULT_ARGS, service_group
from meshwave.steps import ACTIONS, Service, peers_of
from meshwave.wave import dry_run_param

# Airflow sends a task's stdlib logging to its task log, each line with its level and this module's name
log = logging.getLogger(__name__)

DAG_ID = "mesh_service"
GROUP = "service"
# undoing is allowed while frozen; so is the all-clear of the emergency mark (it changes no mode)
CHANGES_UNDER_FREEZE = ("permissive", "remove_sidecar", "remove_canary", "clear_emergency")
SOAK_RANGE = (10, 24 * 3600)
FORM = "trigger-form"  # the group's one map index: the service named by the trigger form
LABEL = "{{ params.cluster }}/{{ params.namespace }}/{{ params.service }}"


def _label_param(title: str, description: str) -> Param:
    return Param(type="string", title=title, description=description, minLength=1, maxLength=63,
                 pattern=RFC1123_LABEL.pattern)


def _actions(fleet: Fleet) -> dict[str, str]:
    """The actions this DAG offers: remove_canary only where a plan tries canaries (the group has its task then)."""
    return {k: v for k, v in ACTIONS.items() if k != "remove_canary" or fleet.canary_asked}


def form(fleet: Fleet) -> dict[str, Param]:
    clusters = sorted(fleet.clusters)
    cluster = Param(clusters[0] if clusters else None, type="string", title="Cluster",
                    description="The cluster, as the plan files name it (each maps to a Kubernetes and a "
                                "Prometheus connection).",
                    **({"enum": clusters} if clusters else {}))
    return {
        "cluster": cluster,
        "namespace": _label_param("Namespace", "The service's Kubernetes namespace, e.g. payments."),
        "service": _label_param("Service", "The Deployment's name (the workload), e.g. payment-service."),
        "action": Param("migrate", type="string", title="Action", enum=list(_actions(fleet)),
                        values_display=_actions(fleet),
                        description="What to do. migrate = the wave's full path; the undo actions work even when "
                                    "the migration is frozen."),
        "soak_seconds": Param(None, type=["null", "integer"], minimum=SOAK_RANGE[0], maximum=SOAK_RANGE[1],
                              title="Soak (seconds)",
                              description="How long the service must stay healthy with its sidecar before STRICT. "
                                          "Empty: the plan's soak for this service."),
        "dry_run": dry_run_param(),
    }


def resolve_service(params: dict[str, Any], fleet: Fleet) -> Service:
    """The service and settings this run acts on; ValueError (naming the field) for input that is not usable."""
    cluster = params.get("cluster")
    if cluster not in fleet.clusters:
        known = ", ".join(sorted(fleet.clusters)) or "none: no plan file could be read"
        raise ValueError(f"cluster: {cluster!r} is not a cluster of the plans (known: {known})")
    namespace = rfc1123_label(params.get("namespace"), "namespace")
    workload = rfc1123_label(params.get("service"), "service")
    action = params.get("action", "migrate")
    if action not in _actions(fleet):
        raise ValueError(f"action: {action!r} is not one of {', '.join(_actions(fleet))}")
    root = fleet.clusters[cluster].root_namespace
    if namespace == root:  # Istio's own: the control plane and its gateways, never migrated one by one (finding 22)
        raise ValueError(f"namespace: {namespace} is cluster {cluster}'s Istio root namespace: mesh_service does not "
                         "change it (the emergency rollback leaves it alone too)")
    planned = fleet.services.get(f"{cluster}/{namespace}/{workload}")
    if planned:
        plan = planned.plan
        plan_service, settings = planned.service, plan.settings_of(plan.wave_of(planned.service.key), planned.service)
    else:
        plan_service = ServicePlan(cluster=cluster, namespace=namespace, workload=workload)
        settings = plan_service.settings(fleet.defaults[cluster])
    soak = params.get("soak_seconds")
    if soak is not None:
        if not isinstance(soak, int) or not SOAK_RANGE[0] <= soak <= SOAK_RANGE[1]:
            raise ValueError(f"soak_seconds: {soak!r} is not a number of seconds in {SOAK_RANGE[0]}..{SOAK_RANGE[1]}")
        settings = settings.model_copy(update={"soak_seconds": soak})
        if problems := timing_problems(settings):  # the plan's own settings were checked when it loaded
            raise ValueError(f"{problems[0]} (the form's soak_seconds over the plan's settings)")
    return Service(plan_service, settings, fleet.clusters[cluster], batch=1, action=action,
                   peers=peers_of(fleet.clusters, cluster))


def _resolve(context: dict[str, Any], key: str) -> Service:
    try:
        return resolve_service(dict(context["params"]), load_fleet())
    except ValidationError as exc:  # a planned service's settings no longer valid
        raise ValueError(str(exc)) from None


# How Istio's gateways show in their pod template: the `istio` label of the istio-ingressgateway/egressgateway charts
# (what the emergency rollback goes by), and the injection template `gateway` of Istio's gateway chart, whose
# container image `auto` only the injector fills in: taking the injection away leaves pods that cannot pull it.
GATEWAY_TEMPLATE = "inject.istio.io/templates"


def gateway_reason(deployment: dict[str, Any]) -> str | None:
    """Why a Deployment is an Istio gateway (a gateway IS a proxy: never injected, flipped or un-injected), or None."""
    from meshwave.emergency import GATEWAY_LABEL

    template = (deployment.get("spec") or {}).get("template") or {}
    meta, spec = template.get("metadata") or {}, template.get("spec") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    if GATEWAY_LABEL in labels:
        return f"its pods carry the gateway label {GATEWAY_LABEL}={labels[GATEWAY_LABEL]}"
    if "gateway" in str(annotations.get(GATEWAY_TEMPLATE, "")).split(","):
        return f"its pods are injected with Istio's gateway template ({GATEWAY_TEMPLATE}: gateway)"
    auto = [c.get("name") for c in spec.get("containers") or [] if c.get("image") == "auto"]
    if auto:
        return f"its container {auto[0]} has image `auto`, which only Istio's gateway injection fills in"
    return None


def _refuse_gateway(svc: Service, context: dict[str, Any]) -> None:
    """A ValueError refuses the run before any change (admit). A workload that does not exist is the preflight's
    to block, as before."""
    from meshwave.kube_errors import WorkloadNotFound
    from meshwave.service_group import kube_for

    p = svc.plan
    try:
        deployment = kube_for(svc, context).deployment(p.namespace, p.workload)
    except WorkloadNotFound:
        return
    if why := gateway_reason(deployment):
        raise ValueError(f"service: {p.namespace}/{p.workload} is an Istio gateway ({why}): mesh_service does not "
                         "change gateways")


def _guard(svc: Service, context: dict[str, Any]) -> None:
    _refuse_gateway(svc, context)
    fleet = load_fleet()
    planned = fleet.services.get(svc.plan.key)
    reason = guards.frozen(planned.plan.freeze if planned else False)
    if not reason:
        return
    if svc.action in CHANGES_UNDER_FREEZE or context["params"].get("dry_run"):
        log.info(f"the migration is frozen ({reason}); {svc.action} goes ahead: an undo or a dry run")
        return
    raise AirflowSkipException(f"frozen: {reason}")


DOC = f"""# mesh_service: one service, ad hoc

Runs **one service** through the same task group the migration waves use, with one of these actions:

{chr(10).join(f"- `{k}`: {v}" for k, v in ACTIONS.items())}

The form asks for the cluster (from the plan files), namespace, service, action, soak and dry run. The input
is checked again when the run starts (`service.admit`): a bad name or an unknown cluster is refused before
any change, with the reason in that task's log. A planned service runs with its planned settings.

The freeze switch (Airflow Variable `{guards.FREEZE_VARIABLE}` or a plan's `freeze`) stops `migrate`,
`inject_only` and `strict_only`; the undo actions and `clear_emergency` still run. One run at a time.

After an emergency rollback (`mesh_emergency_rollback`), a policy it relaxed carries its mark
(`meshwave.io/emergency-rollback`) and meshwave refuses to make it STRICT again (`flip_strict`: not flipped,
naming the run). When the incident is over, `clear_emergency` removes the mark from the workload's own
policies (meshwave's and any workload policy selecting its pods; namespace- and mesh-wide ones keep theirs)
and changes no mode; the next wave or `strict_only` may then make it STRICT.

REST: `POST /api/v2/dags/{DAG_ID}/dagRuns` with `{{"logical_date": null, "conf": {{"cluster": "prod-eu-1",
"namespace": "payments", "service": "payment-service", "action": "migrate"}}}}`; CLI:
`airflow dags trigger {DAG_ID} -c '{{...}}'`.
"""


def mesh_service_dag() -> DAG:
    fleet = load_fleet()
    with DAG(dag_id=DAG_ID, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
             max_active_runs=1, params=form(fleet), doc_md=DOC + _fleet_doc(fleet),
             tags=["meshwave", "ad-hoc"], default_args=DEFAULT_ARGS,
             # under FAB only the operator role (and roles with every DAG) may trigger it: meshwave.access
             access_control=operator_access_control()) as dag:
        # mapped over one entry: the service comes from the form, at run time
        group = service_group(GROUP, _resolve, "The service from the trigger form, through the wave's task group.",
                              [FORM], label=LABEL, guard=_guard, approval_asked=True,
                              canary_asked=fleet.canary_asked)
        group >> _report()
    return dag


def _fleet_doc(fleet: Fleet) -> str:
    problems = "".join(f"\n- {e}" for e in fleet.errors)
    return f"\nClusters: {', '.join(sorted(fleet.clusters)) or 'none'}." + (
        f"\n\nPlan files with problems (their clusters are not offered):{problems}" if problems else "")


def _report():
    @task(task_id="report", trigger_rule="all_done")
    def report(**context: Any) -> dict[str, Any]:
        from meshwave import report as reports  # pandas: at run time, not at parse time

        pushed = decoded(context["ti"].xcom_pull(task_ids=f"{GROUP}.outcome", key="record", map_indexes=0))
        if not pushed:
            return {"record": None}
        record = ServiceRecord.model_validate(pushed)
        log.info(reports.render(reports.report_frame([record])))
        # the leaf decides the run's state: a refused or failed action fails the run
        if record.outcome.red:
            raise AirflowFailException(f"{record.service}: {record.outcome}: {record.reason}")
        return {"outcome": record.outcome.value, "reason": record.reason}

    return report()
