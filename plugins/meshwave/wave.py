"""The wave DAG factory: one DAG per wave of a plan.

    wave_preflight -> batch_1 (the service group, mapped over the batch's services) -> after_batch_1 (circuit
      breaker) -> batch_2 ...
      -> report [-> publish: the Asset the next wave waits for, when this wave ended within its budget]

Schedules: the wave's maintenance window (cron or explicit dates), its own cron, or the Asset of the wave
it comes `after`; the freeze switch and the window are checked before anything changes (guards.py).

Parsing reads the plan file and nothing else (no network, no database).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pendulum
from airflow.sdk import (
    DAG,
    Asset,
    BaseHook,
    CronTriggerTimetable,
    Param,
    TriggerRule,
    get_parsing_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

# The core class, not airflow.sdk's: in Airflow 3.3.2 the SDK EventsTimetable's encoder leaves out the
# `_summary` the scheduler's decoder reads, so a DAG using it fails to serialize (KeyError '_summary').
from airflow.timetables.events import EventsTimetable

from meshwave import guards
from meshwave.fleet import ROOT, check_unique, plans_dir
from meshwave.group_state import decoded
from meshwave.kube_errors import KubeError
from meshwave.outcomes import ServiceOutcome
from meshwave.plan import NotifyEvent, Plan, Wave, load_plan
from meshwave.record import ServiceRecord, unrecorded
from meshwave.service_group import DEFAULT_ARGS, service_group
from meshwave.steps import Service, peers_of

# Airflow sends a task's stdlib logging to its task log, each line with its level and this module's name
log = logging.getLogger(__name__)

START = pendulum.datetime(2026, 1, 1, tz="UTC")


def dry_run_param() -> Param:
    return Param(False, type="boolean", title="Dry run",
                 description="Log the exact patches and objects each step would apply; change nothing, wait for "
                             "nothing.")


def outside_window_param() -> Param:
    return Param(False, type="boolean", title="Run outside the maintenance window",
                 description="Override: start this wave although its maintenance window is closed. The run's log "
                             "records that the override was used.")


def wave_asset(plan: Plan, wave: Wave) -> Asset:
    """Updated when the wave ended within its failure budget with every service attempted (not in a dry run)."""
    return Asset(name=f"{plan.dag_id(wave)}_done", uri=f"meshwave://{plan.migration}/{wave.name}")


def _schedule(plan: Plan, wave: Wave) -> Any:
    if wave.after:
        return wave_asset(plan, plan.wave(wave.after))
    if wave.window and wave.window.cron:
        return CronTriggerTimetable(wave.window.cron, timezone=wave.window.timezone)
    if wave.window:
        return EventsTimetable(event_dates=[start for start, _ in wave.window.occurrences()],
                               description=f"maintenance windows: {wave.window.describe()}")
    cron = wave.schedule or plan.defaults.schedule
    return CronTriggerTimetable(cron, timezone="UTC") if cron else None


def _catchup(wave: Wave) -> bool:
    """Explicit window dates catch up: without it, a dag-processor re-parse at the window's start drops the
    event before the scheduler creates its run (EventsTimetable skips past events when catchup is off). A date
    that had passed before the plan was deployed then gets a run that the window guard refuses, visibly."""
    return bool(wave.window and wave.window.dates)


def services_of(plan: Plan, wave: Wave) -> list[Service]:
    size = plan.defaults.batch_size
    return [Service(svc, plan.settings_of(wave, svc), plan.clusters[svc.cluster], i // size + 1,
                    peers=peers_of(plan.clusters, svc.cluster)) for i, svc in enumerate(wave.services)]


def batch_group(batch: int) -> str:
    return f"batch_{batch}"


def label_template(keys: list[str]) -> str:
    """Names a map index by its service's key, from a literal list (keys are RFC 1123 names and slashes)."""
    return "{{ " + json.dumps(keys) + "[ti.map_index] }}"


def _doc(plan: Plan, wave: Wave, source: str) -> str:
    d = plan.defaults
    rows = "\n".join(f"| {s.key} | {s.criticality} | {'STRICT' if s.strict else 'PERMISSIVE'} |"
                     for s in wave.services)
    return (f"# {plan.migration}: {wave.name}\n\n{wave.description or plan.description}\n\n"
            f"Plan: `{source}`. Batches of {d.batch_size}; the wave stops after {d.max_failures} rollbacks "
            f"(the services not started are reported as skipped).\n\nEach service: preflight (sidecar memory "
            "headroom) -> baseline -> inject -> rollout -> soak with checks against the baseline -> STRICT gate "
            "(no plaintext caller) -> STRICT -> verify the service and its callers; a confirmed breach rolls back "
            "(STRICT problems to PERMISSIVE, injection problems remove the sidecar).\n\n"
            f"| service | criticality | target |\n|---|---|---|\n{rows}\n\n"
            "Param `dry_run`: log what would change, change nothing. The report is in the `report` task's log."
            + _schedule_doc(plan, wave))


def _schedule_doc(plan: Plan, wave: Wave) -> str:
    lines = []
    if wave.window:
        lines.append(f"Maintenance window: {wave.window.describe()}. No service starts once it has closed (those "
                     "in flight finish or roll back); a run outside it needs the param `outside_window`.")
    if wave.after:
        lines.append(f"Starts when wave `{wave.after}` ended within its failure budget (Asset "
                     f"`{wave_asset(plan, plan.wave(wave.after)).uri}`).")
    lines.append(f"Freeze: the Airflow Variable `{guards.FREEZE_VARIABLE}` (any value but false/off/empty) or the "
                 "plan's `freeze` stops every wave before its next change.")
    return "\n\n" + "\n\n".join(lines)


def _batch_doc(batch: int, members: list[Service]) -> str:
    rows = "\n".join(_service_doc(svc) for svc in members)
    return (f"Batch {batch}: {len(members)} services in parallel, one map index each (named by the service).\n\n"
            f"{rows}")


def _service_doc(svc: Service) -> str:
    p, s = svc.plan, svc.settings
    return (f"- **{p.key}** ({p.criticality}): inject ({s.injection} label), soak {s.soak_seconds}s, verify against "
            f"its baseline, then {'STRICT mTLS once no plaintext caller is left' if p.strict else 'stay PERMISSIVE'}"
            f"; rollback on {s.breaches_to_fail} breaches in a row; on no data: {s.on_no_data}.")


def _planned(members: list[Service]):
    """The batch's services by key: what each map index of its group resolves to (no I/O)."""
    by_key = {svc.plan.key: svc for svc in members}

    def resolve(context: dict[str, Any], key: str) -> Service:
        if key not in by_key:
            raise ValueError(f"{key!r} is not a service of this batch (the plan changed under the run?)")
        return by_key[key]

    return resolve


def _guard(plan: Plan):
    """A service of this wave starts only while the migration is not frozen and its window is open."""

    def guard(svc: Service, context: dict[str, Any]) -> None:
        if (reason := guards.frozen(plan.freeze)) and not context["params"].get("dry_run"):
            raise AirflowSkipException(f"frozen: {reason}")
        window = context["ti"].xcom_pull(task_ids="wave_preflight", key="window")
        if reason := guards.window_closed(window, guards.now()):
            raise AirflowSkipException(reason)

    return guard


def wave_dag(plan: Plan, wave: Wave, source: str) -> DAG:
    params = {"dry_run": dry_run_param()}
    if wave.window:
        params["outside_window"] = outside_window_param()
    dag = DAG(
        dag_id=plan.dag_id(wave),
        schedule=_schedule(plan, wave),
        start_date=START, catchup=_catchup(wave), max_active_runs=1,
        params=params,
        doc_md=_doc(plan, wave, source),
        tags=["meshwave", plan.migration, wave.name],
        default_args=DEFAULT_ARGS,
    )
    with dag:
        services = services_of(plan, wave)
        wave_preflight = _wave_preflight(plan, wave)
        upstream: Any = wave_preflight
        batches = sorted({svc.batch for svc in services})
        for batch in batches:
            members = [svc for svc in services if svc.batch == batch]
            keys = [svc.plan.key for svc in members]
            group = service_group(batch_group(batch), _planned(members), _batch_doc(batch, members), keys,
                                  label=label_template(keys), guard=_guard(plan),
                                  wave_error_task="wave_preflight",
                                  approval_asked=any(svc.needs_approval for svc in members),
                                  canary_asked=any(svc.settings.canary is not None for svc in members))
            upstream >> group
            if batch != batches[-1]:
                breaker = _circuit_breaker(plan, services, batch)
                group >> breaker
                upstream = breaker
            else:
                upstream = group
        report = _report(plan, services)
        upstream >> report
        if any(w.after == wave.name for w in plan.waves):
            report >> _publish(plan, wave, services)
    return dag


def _records(context: dict[str, Any], services: list[Service], up_to: int | None = None) -> list[ServiceRecord]:
    """Every service's outcome record (one read per batch: all its map indexes), in plan order; a service whose
    outcome task recorded nothing (it never ran, or broke) counts as failed."""
    ti = context["ti"]
    found: dict[str, ServiceRecord] = {}
    for batch in sorted({svc.batch for svc in services if up_to is None or svc.batch <= up_to}):
        pulled = ti.xcom_pull(task_ids=f"{batch_group(batch)}.outcome", key="record")
        for value in pulled if isinstance(pulled, list) else [pulled]:
            if isinstance(value := decoded(value), dict):  # None: a map index that pushed nothing
                record = ServiceRecord.model_validate(value)
                found[record.service] = record
    return [found.get(svc.plan.key) or unrecorded(svc.plan.key, svc.batch)
            for svc in services if up_to is None or svc.batch <= up_to]


def _wave_preflight(plan: Plan, wave: Wave):
    @task(task_id="wave_preflight", retries=2)
    def wave_preflight(**context: Any) -> dict[str, Any]:
        """Clusters answer, every service exists, and no mesh-wide STRICT policy (the seed's mistake #1)."""
        from meshwave.connections import mesh_kube  # the kubernetes client: at run time, not at parse time

        checked: dict[str, Any] = {}
        try:
            _admit_wave(plan, wave, context)
        except guards.OutsideWindow as exc:
            if not _scheduled(context):
                context["ti"].xcom_push(key="error", value=f"wave preflight: {exc}")
                raise AirflowFailException(str(exc)) from None
            # The scheduler made this run for a window that had closed by the time it started (the DAG appeared,
            # or the scheduler was down, after the window opened): nothing to do now, and nothing went wrong.
            reason = f"a scheduled run that started after its window: {exc}"
            context["ti"].xcom_push(key="skipped", value=reason)
            raise AirflowSkipException(reason) from None
        try:
            _one_cluster_per_prometheus(plan)
            for name in sorted({s.cluster for s in wave.services}):
                cfg = plan.clusters[name]
                kube = mesh_kube(BaseHook.get_connection(cfg.kubernetes_conn_id), name, cfg.root_namespace,
                                 revision=cfg.revision)
                version = kube.ping()
                mesh = kube.mtls.mesh_wide()
                if mesh is not None and mesh.mode == "STRICT":
                    raise AirflowFailException(
                        f"cluster {name}: {mesh} is STRICT: every workload without a sidecar is cut off. Set it to "
                        "PERMISSIVE before migrating (STRICT goes per workload, after validation)")
                for svc in (s for s in wave.services if s.cluster == name):
                    kube.workload(svc.namespace, svc.workload)
                without_metrics = _app_metrics_missing(cfg, [s for s in wave.services if s.cluster == name])
                checked[name] = {"version": version, "mesh_wide_mtls": str(mesh.mode) if mesh else None,
                                 "peer_authentication_version": kube.mtls.version,
                                 "namespace_wide_strict": _namespace_wide_strict(kube, wave, name),
                                 "without_app_metrics": without_metrics}
        except (AirflowFailException, KubeError, ValueError) as exc:
            context["ti"].xcom_push(key="error", value=f"wave preflight: {exc}")
            if isinstance(exc, KubeError) and getattr(exc, "code", None) not in (404,):
                raise
            raise AirflowFailException(str(exc)) from None
        except Exception as exc:  # a connection that does not exist, a client that broke: named, then retried
            context["ti"].xcom_push(key="error", value=f"wave preflight: {type(exc).__name__}: {exc}")
            raise
        return checked

    return wave_preflight()


def _scheduled(context: dict[str, Any]) -> bool:
    """The scheduler made this run (its timetable), not a person or an Asset."""
    run_type = getattr(context.get("dag_run"), "run_type", None)
    return str(getattr(run_type, "value", run_type)) == "scheduled"


def _app_metrics_missing(cfg: Any, services: list[Any]) -> list[str]:
    """The services of one cluster that Prometheus has no application request metrics for (each is blocked at its
    baseline); a Prometheus that does not answer stops the wave: no service is injected blind."""
    from meshwave.connections import prometheus_source
    from meshwave.prometheus import PrometheusError, render

    source = prometheus_source(BaseHook.get_connection(cfg.prometheus_conn_id))
    missing = []
    for svc in services:
        query = render("app_request_rate", namespace=svc.namespace, workload=svc.workload, window="5m",
                       cluster=source.cluster)
        try:
            found = source.instant(query)
        except PrometheusError as exc:
            raise AirflowFailException(f"cluster {svc.cluster}: Prometheus does not answer ({exc}): no service is "
                                       "injected without a baseline to judge it by") from None
        if not found:
            missing.append(f"{svc.namespace}/{svc.workload}")
    if missing:
        log.warning(f"no application request metrics in Prometheus for {', '.join(missing)} (query: app_request_rate): "
                    "they are blocked at their baseline")
    return missing


def _one_cluster_per_prometheus(plan: Plan) -> None:
    """Every check of a cluster must read that cluster alone: a Prometheus shared by several clusters needs the
    `cluster` extra on each of their connections, or a failure in one is diluted by the others' workloads."""
    from meshwave.connections import prometheus_url
    from meshwave.prometheus import shared_without_cluster

    found = {}
    for name, cfg in plan.clusters.items():
        connection = BaseHook.get_connection(cfg.prometheus_conn_id)
        found[name] = (prometheus_url(connection), (connection.extra_dejson or {}).get("cluster"))
    shared = shared_without_cluster(found)
    if shared:
        raise AirflowFailException(
            f"clusters {', '.join(shared)} read one Prometheus ({found[shared[0]][0]}) but not every connection sets "
            'the extra {"cluster": "<name>"}: every check would sum the same-named workloads of all of them. Set it '
            "on each of their Prometheus connections")


def _namespace_wide_strict(kube: Any, wave: Wave, cluster: str) -> dict[str, str]:
    """The wave's namespaces of one cluster whose namespace-wide policy is STRICT: each pod there enforces STRICT
    the moment it gets a sidecar, so their services are blocked at preflight while callers without one remain."""
    found = {}
    for ns in sorted({s.namespace for s in wave.services if s.cluster == cluster}):
        policy = kube.mtls.namespace_wide(ns)
        if policy is not None and policy.mode == "STRICT":
            found[ns] = str(policy)
            log.warning(f"cluster {cluster}: namespace {ns} is STRICT namespace-wide ({policy}): its services are "
                        "blocked at preflight unless every caller already has a sidecar")
    return found


def _admit_wave(plan: Plan, wave: Wave, context: dict[str, Any]) -> None:
    """Not frozen, and inside the maintenance window (or overridden, loudly). Raises ValueError otherwise.

    A dry run changes nothing, so it is allowed under a freeze and outside the window (and says so)."""
    dry_run = bool(context["params"].get("dry_run"))
    if reason := guards.frozen(plan.freeze):
        if not dry_run:
            raise ValueError(f"frozen: {reason}: no change is made while the freeze is on")
        log.warning(f"frozen ({reason}): a dry run changes nothing, so it goes ahead")
    override = bool(context["params"].get("outside_window"))
    window = guards.window_at_start(wave.window, override or dry_run, guards.now())
    if window.get("note"):
        log.warning(window["note"] + ("" if override else " (a dry run: nothing changes)"))
    elif window.get("closes"):
        log.info(f"maintenance window {window['window']}: open since {window['opened']}, closes {window['closes']}; "
                 "no service starts after that")
    context["ti"].xcom_push(key="window", value=window)


def _tell(plan: Plan, context: dict[str, Any], event: NotifyEvent, subject: str, what: str, why: str) -> None:
    """The plan's notification targets told about the wave's own event (a real run only; never raises)."""
    if not plan.defaults.notify or context["params"].get("dry_run"):
        return
    from meshwave import notify

    dag_id = context["dag"].dag_id
    notify.tell(plan.defaults.notify, event, f"{dag_id}: {subject}", what, why, dag_id, context)


def _circuit_breaker(plan: Plan, services: list[Service], batch: int):
    @task(task_id=f"after_batch_{batch}", trigger_rule=TriggerRule.ALL_DONE)
    def breaker(**context: Any) -> dict[str, Any]:
        if context["ti"].xcom_pull(task_ids="wave_preflight", key="error"):
            raise AirflowSkipException("the wave preflight failed: no batch starts")
        records = _records(context, services, up_to=batch)
        failed = [r.service for r in records if r.outcome.against_budget]
        limit = plan.defaults.max_failures
        if len(failed) >= limit:
            why = (f"circuit breaker: {len(failed)} rollbacks/failures ({', '.join(failed)}) >= max_failures "
                   f"{limit}: the remaining batches are skipped")
            _tell(plan, context, NotifyEvent.CIRCUIT_BREAKER, "circuit breaker TRIPPED",
                  f"after batch {batch}, the batches after it are not started", why)
            raise AirflowSkipException(why)
        return {"failed": failed, "limit": limit}

    return breaker()


def _report(plan: Plan, services: list[Service]):
    @task(task_id="report", trigger_rule=TriggerRule.ALL_DONE)
    def report(**context: Any) -> dict[str, Any]:
        from meshwave import report as reports  # pandas: at run time, not at parse time

        records = _records(context, services)
        frame = reports.report_frame(records)
        path = reports.save(frame, records, context["dag"].dag_id, context["run_id"])
        log.info(reports.render(frame))
        log.info(f"report saved to {path}")
        chart = reports.chart_of(path)
        log.info(f"chart saved to {chart}" if chart
                 else "no chart drawn (no services, or it failed: see the log above)")
        counts = reports.summary(frame)
        failed = [r for r in records if r.outcome.against_budget]
        preflight_error = context["ti"].xcom_pull(task_ids="wave_preflight", key="error") or _unfinished(context)
        if preflight_error:
            _tell(plan, context, NotifyEvent.WAVE_FAILED, "wave FAILED", "the wave preflight stopped it before any "
                  "change", preflight_error)
            raise AirflowFailException(preflight_error)
        if skipped := context["ti"].xcom_pull(task_ids="wave_preflight", key="skipped"):
            log.warning(f"nothing was started: {skipped}")
            return {"counts": counts, "report": str(path), "skipped": skipped}
        if len(failed) >= plan.defaults.max_failures or any(r.outcome.fails_wave for r in records):
            why = f"wave over its failure budget, with services in an unknown state or held without data: {counts}"
            names = ", ".join(r.service for r in records if r.outcome.against_budget or r.outcome.fails_wave)
            _tell(plan, context, NotifyEvent.WAVE_FAILED, "wave FAILED", f"services that failed it: {names}", why)
            raise AirflowFailException(why)
        return {"counts": counts, "report": str(path)}

    return report()


def _unfinished(context: dict[str, Any]) -> str | None:
    """Why the wave preflight did not end as it ends (its checks returned, or it skipped the run), when it did not:
    it broke without saying why, or never ran. A wave whose preflight did not pass is not green, whatever its
    services' records say (they were all skipped)."""
    ti = context["ti"]
    if ti.xcom_pull(task_ids="wave_preflight") is None and ti.xcom_pull(task_ids="wave_preflight",
                                                                        key="skipped") is None:
        return "wave preflight did not complete (it left no result): see its log"
    return None


def wave_dags(plan_file: str) -> dict[str, DAG]:
    """The wave DAGs of one plan file (relative to the plans directory), keyed by dag_id: all of them, or, when
    a task runner parses the file to run one task, only that task's DAG (Airflow's parsing context; every task
    start parses the file again, and a plan of thousands of services has dozens of waves)."""
    path = plans_dir() / plan_file
    plan = load_plan(path)
    check_unique(plan, path)  # a workload another plan file names too: this file's import error names both
    source = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    wanted = get_parsing_context().dag_id
    waves = [w for w in plan.waves if plan.dag_id(w) == wanted] or plan.waves
    return {plan.dag_id(w): wave_dag(plan, w, source) for w in waves}


def _publish(plan: Plan, wave: Wave, services: list[Service]):
    @task(task_id="publish", outlets=[wave_asset(plan, wave)])
    def publish(**context: Any) -> dict[str, Any]:
        """Tell the next wave to start: only a real run whose every service was attempted, within budget."""
        from meshwave import report as reports

        if context["params"].get("dry_run"):
            raise AirflowSkipException("dry run: the next wave is not started")
        records = _records(context, services)
        left = [r.service for r in records if not r.outcome.attempted]
        if left:
            raise AirflowSkipException(f"{len(left)} services not attempted ({', '.join(left)}): the next wave waits")
        held = [r.service for r in records if r.outcome is ServiceOutcome.HELD]
        if held:
            raise AirflowSkipException(f"{len(held)} services held without data ({', '.join(held)}): the next wave "
                                       "waits")
        counts = reports.summary(reports.report_frame(records))
        log.info(f"{plan.dag_id(wave)} ended within its failure budget ({counts}): updating "
                 f"{wave_asset(plan, wave).uri}, the next wave starts")
        return {"counts": counts}

    return publish()
