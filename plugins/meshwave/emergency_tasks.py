"""The emergency rollback's confirmation (a person between the dry run's plan of action and the rollback, in one run)
and its waits: stage 2 (sidecars out, a bounded number at a time) and stage 3 (health).

Both are deferrable: no worker slot is held while pods roll or while Prometheus is polled. Stage 2 is one
task that re-defers once per chunk: it removes injection from at most `max_parallel` workloads, defers
until their rollouts finish, then starts the next chunk (critical services first). One task rather than
mapped tasks because `max_parallel` is a run-time choice (a mapped task's concurrency is fixed at parse
time) and the order must hold across chunks; each chunk and each workload is in the task log.

Triggers only read (they may run twice); every write is in the operators, through MeshKube.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import BaseHook, BaseOperator
from airflow.sdk.exceptions import AirflowSkipException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from meshwave import emergency as em
from meshwave import guards, outbound
from meshwave.approval import asked_again, responder
from meshwave.changes import Change
from meshwave.connections import mesh_kube, prometheus_source
from meshwave.fleet import load_fleet
from meshwave.kube_errors import KubeError
from meshwave.plan import NotifyEvent
from meshwave.prometheus import PrometheusError, Source

if TYPE_CHECKING:
    from meshwave.kube import MeshKube

# Airflow sends a task's stdlib logging to its task log, each line with its level and this module's name
log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
MARGIN = 120  # seconds the task timeout leaves a trigger to report its own deadline
VALIDATE, CONFIRM = "validate", "confirm"
STAGE_1_DONE = "stage_1.stage_1_done"
DAG_ID = "mesh_emergency_rollback"


def request_of(context: Any) -> em.Request | None:
    """What the stages do: the confirmed request once a person confirmed it, else the form's (a dry run when it
    asked for a confirmation that did not come)."""
    ti = context["ti"]
    data = ti.xcom_pull(task_ids=CONFIRM, key="request") or ti.xcom_pull(task_ids=VALIDATE, key="request")
    return em.Request.from_dict(data) if data else None


def tell(request: em.Request, context: Any, event: NotifyEvent, subject: str, what: str, why: str) -> None:
    """The targets of the plans naming the clusters in scope (a real run only; never raises: see notify.py)."""
    from meshwave import notify

    notify.tell(notify.fleet_targets(load_fleet(), request.scope.clusters), event, subject, what, why, DAG_ID,
                context)


def begin(request: em.Request, context: Any) -> None:
    """Before stage 1 of a real rollback: the freeze (no wave writes inject or STRICT from here on), then the news."""
    why = guards.freeze_for_emergency(f"{DAG_ID} {context['run_id']}: emergency rollback of "
                                      f"{request.scope.describe()}")
    log.info(f"FREEZE: {why}; every wave's next inject or flip to STRICT stops there (outcome frozen). Lift it "
             f"when the incident is over: airflow variables delete {guards.FREEZE_VARIABLE}")
    tell(request, context, NotifyEvent.EMERGENCY_STARTED, "emergency rollback STARTED",
         f"stage 1 (every STRICT in scope to PERMISSIVE) starts now; stage 2 (remove sidecars) "
         f"{'on' if request.remove_sidecars else 'off'}", f"{request.scope.describe()}; freeze: {why}")


# ---- the confirmation -----------------------------------------------------------------------------------------
APPLY, CANCEL = "apply the rollback", "cancel: change nothing"


def plan_of_action(request: em.Request, kube_of: Callable[[em.Target], MeshKube]) -> tuple[str, dict[str, Any]]:
    """What the rollback would change, per cluster, read now (read-only): the policies stage 1 relaxes and, with
    stage 2, the workloads whose sidecars go. Markdown for the person, and the counts."""
    lines, counts = [f"Scope: {request.scope.describe()}.", ""], {}
    for target in request.targets:
        try:
            kube = kube_of(target)
            relax = sorted(em.would_relax(kube, request.scope))
            restart = em.sidecar_workloads(kube, request.scope) if request.remove_sidecars else []
        except Exception as exc:  # noqa: BLE001 - a cluster that cannot be read is shown to the person, not hidden
            lines.append(f"- **{target.cluster}**: cannot be read ({exc}): stage 1 will fail there")
            counts[target.cluster] = {"error": str(exc)}
            continue
        counts[target.cluster] = {"policies": len(relax), "restarts": len(restart)}
        shown = ", ".join(relax[:20]) + (f" and {len(relax) - 20} more" if len(relax) > 20 else "")
        lines.append(f"- **{target.cluster}**: {len(relax)} STRICT polic(ies) to PERMISSIVE"
                     + (f" ({shown})" if relax else "")
                     + (f"; {len(restart)} workload(s) restarted without a sidecar" if request.remove_sidecars
                        else ""))
    return "\n".join(lines), counts


class ConfirmRollback(HITLOperator):
    """`confirm`: with the form's `confirm` on, the dry run's plan of action is put to a person (Airflow's
    human-in-the-loop: the task waits in `awaiting_input`); applied only when they choose APPLY. CANCEL, or nobody
    answering in `confirm_timeout_seconds`, leaves the run a dry run. Without `confirm` it asks nobody."""

    ui_color = "#fde8e8"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(subject="Emergency rollback: apply?", options=[APPLY, CANCEL], defaults=[CANCEL],
                         **kwargs)

    def execute(self, context: Any) -> Any:
        request = request_of(context)
        if request is None or not request.confirm:
            return {"asked": False}
        body, counts = plan_of_action(request, lambda t: mesh_kube(BaseHook.get_connection(t.kubernetes_conn_id),
                                                                   t.cluster, t.root_namespace, dry_run=True))
        log.info(f"plan of action, for confirmation:\n{body}")
        context["ti"].xcom_push(key="plan_of_action", value=counts)
        again = asked_again(context["ti"].try_number)
        if again:
            log.warning(f"asking again (try {context['ti'].try_number}): an earlier answer does not carry over")
        self.body = (f"{again}{body}\n\nChoose **{APPLY}** to relax them now (the freeze is set first); "
                     f"**{CANCEL}**, or no answer in {request.confirm_timeout_seconds} s, changes nothing (the run "
                     "goes on as a dry run).")
        self.response_timeout = timedelta(seconds=request.confirm_timeout_seconds)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        chosen = super().execute_complete(context, event)
        by, at = responder(chosen)
        answer = {"asked": True, "applied": chosen.get("chosen_options") == [APPLY], "by": by, "at": at,
                  "timed_out": bool(event.get("timedout"))}
        request = request_of(context)
        if not answer["applied"] or request is None:
            why = "nobody answered in time" if answer["timed_out"] else f"cancelled by {by or 'unknown'}"
            log.warning(f"NOT APPLIED: {why}: the rest of this run is a dry run, nothing is changed")
            return answer
        log.info(f"APPLYING: confirmed by {by} at {answer['at']}")
        applying = request.applying()
        begin(applying, context)
        context["ti"].xcom_push(key="request", value=applying.to_dict())
        return answer


def log_changes(changes: list[dict[str, Any]]) -> None:
    """Every change in the task log with its exact request (a dry run shows what it would send)."""
    for data in changes:
        change = Change.from_dict(data)
        log.info(change.summary())
        if change.request is not None and (change.applied or change.dry_run):
            log.info(f"    {change.request.describe()} {json.dumps(change.request.body, sort_keys=True)}")


# ---- stage 2 ----------------------------------------------------------------------------------------------
class RolloutsTrigger(BaseTrigger):
    """Polls several deployments until each rollout is done, failed or past the deadline."""

    def __init__(self, items: list[dict[str, Any]], poke_interval: float, deadline: float) -> None:
        super().__init__()
        self.items, self.poke_interval, self.deadline = items, poke_interval, deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("meshwave.emergency_tasks.RolloutsTrigger",
                {"items": self.items, "poke_interval": self.poke_interval, "deadline": self.deadline})

    async def _kubes(self) -> dict[str, MeshKube]:
        kubes = {}
        for item in self.items:
            if item["cluster"] not in kubes:
                connection = await BaseHook.aget_connection(item["kubernetes_conn_id"])
                kubes[item["cluster"]] = await asyncio.to_thread(mesh_kube, connection, item["cluster"])
        return kubes

    async def run(self) -> AsyncIterator[TriggerEvent]:
        kubes = await self._kubes()
        pending = {key(i): i for i in self.items}
        results: dict[str, dict[str, Any]] = {}
        last: dict[str, str] = {}
        while pending:
            for name, item in list(pending.items()):
                try:
                    state = await asyncio.to_thread(kubes[item["cluster"]].rollout, item["namespace"],
                                                    item["workload"], False)
                except KubeError as exc:  # transient: keep polling until the deadline
                    last[name] = f"error: {exc}"
                    continue
                last[name] = state.message
                if state.status != "progressing":
                    results[name] = {"status": state.status, "message": state.message, "ended": time.time()}
                    del pending[name]
            if pending and time.time() >= self.deadline:
                for name in pending:
                    results[name] = {"status": "timeout", "message": f"not finished by the deadline: {last.get(name)}",
                                     "ended": time.time()}
                break
            if pending:
                await asyncio.sleep(self.poke_interval)
        yield TriggerEvent({"results": results})


def key(item: dict[str, Any]) -> str:
    return f"{item['cluster']}/{item['namespace']}/{item['workload']}"


class RemoveSidecarsOperator(BaseOperator):
    """Stage 2: injection removed (pod label sidecar.istio.io/inject=false), critical first, chunk by chunk."""

    ui_color = "#fde8e8"

    def __init__(self, *, poke_interval: float = POLL_SECONDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poke_interval = poke_interval
        self._kubes: dict[str, MeshKube] = {}
        self._sources: dict[str, Source] = {}
        self._would_relax: dict[str, frozenset[str]] = {}

    def _kube(self, request: em.Request, cluster: str) -> MeshKube:
        if cluster not in self._kubes:
            target = next(t for t in request.targets if t.cluster == cluster)
            self._kubes[cluster] = mesh_kube(BaseHook.get_connection(target.kubernetes_conn_id), cluster,
                                             target.root_namespace, dry_run=request.dry_run)
        return self._kubes[cluster]

    def _peer(self, request: em.Request, cluster: str) -> MeshKube:
        """A destination's cluster, when it is one of the request's targets (else its mode cannot be read)."""
        if not any(t.cluster == cluster for t in request.targets):
            return outbound.no_peers(cluster)
        return self._kube(request, cluster)

    def _relaxed_first(self, request: em.Request, cluster: str) -> frozenset[str]:
        """A dry run: the policies stage 1 would have relaxed on `cluster` (it wrote nothing), so that stage 2 counts
        them as relaxed. A real run's stage 2 finds them relaxed."""
        if not request.dry_run:
            return frozenset()
        if cluster not in self._would_relax:
            self._would_relax[cluster] = em.would_relax(self._kube(request, cluster), request.scope)
        return self._would_relax[cluster]

    def _source(self, request: em.Request, cluster: str) -> Source:
        """The cluster's Prometheus: where each workload's proxy calls, before its sidecar goes."""
        if cluster not in self._sources:
            target = next(t for t in request.targets if t.cluster == cluster)
            self._sources[cluster] = prometheus_source(BaseHook.get_connection(target.prometheus_conn_id))
        return self._sources[cluster]

    def execute(self, context: Any) -> dict[str, Any]:
        request = request_of(context)
        if request is None:
            raise AirflowSkipException("the form did not validate: nothing to do")
        if not request.remove_sidecars:
            raise AirflowSkipException("remove_sidecars is off: sidecars stay (stage 1 needs no restart)")
        found, errors = [], {}
        for target in request.targets:
            try:
                found += [{**w, "kubernetes_conn_id": target.kubernetes_conn_id}
                          for w in em.sidecar_workloads(self._kube(request, target.cluster), request.scope)]
            except KubeError as exc:
                errors[target.cluster] = str(exc)
                log.warning(f"cluster {target.cluster}: cannot list workloads: {exc}")
        ordered = em.order_targets(found, em.criticality_of(load_fleet()))
        plan = em.chunks(ordered, request.max_parallel)
        log.info(f"stage 2: {len(ordered)} workload(s) with a sidecar in scope, {len(plan)} chunk(s) of at most "
                 f"{request.max_parallel}, critical first:")
        log.info(em.table([{**w, "chunk": i + 1} for i, c in enumerate(plan) for w in c],
                          ["chunk", "criticality", "cluster", "namespace", "workload", "pods", "with_proxy",
                           "reverted_by"]))
        results = {f"cluster {c}": {"status": "error", "message": m} for c, m in errors.items()}
        return self._next(context, request, plan, 0, results)

    def _next(self, context: Any, request: em.Request, plan: list[list[dict[str, Any]]], index: int,
              results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        for i in range(index, len(plan)):
            wait = self._start_chunk(request, plan[i], i, len(plan), results)
            if wait and not request.dry_run:
                deadline = time.time() + request.rollout_timeout_seconds
                self.defer(trigger=RolloutsTrigger(wait, self.poke_interval, deadline), method_name="chunk_done",
                           kwargs={"plan": plan, "index": i, "results": results},
                           timeout=timedelta(seconds=request.rollout_timeout_seconds + MARGIN))
        return self._summary(request, plan, results)

    def _start_chunk(self, request: em.Request, chunk: list[dict[str, Any]], i: int, total: int,
                     results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        log.info(f"chunk {i + 1}/{total}: {', '.join(key(w) for w in chunk)}")
        wait = []
        for w in chunk:
            try:
                kube = self._kube(request, w["cluster"])
                # its STRICT destinations first: meshwave's own relaxed, any other refuses (outbound.py)
                note = f"meshwave emergency stage 2 ({request.scope.describe()})"
                # the red button overrides any run's lease: broken, so the holder's next write is refused
                changes = [kube.leases.break_(w["namespace"], w["workload"], note)]
                more, _ = outbound.prepare_removal(kube, self._source(request, w["cluster"]), w["namespace"],
                                                   w["workload"], note, lambda c: self._relaxed_first(request, c),
                                                   lambda c: self._peer(request, c))
                changes += more + kube.remove_injection(w["namespace"], w["workload"])
            except outbound.RemovalRefused as exc:  # the sidecar stays; stage 1 left the workload PERMISSIVE
                results[key(w)] = {"status": "refused", "message": str(exc), "criticality": w["criticality"]}
                log.warning(f"  {key(w)}: REFUSED: {exc}")
                continue
            except (KubeError, PrometheusError) as exc:
                results[key(w)] = {"status": "error", "message": str(exc), "criticality": w["criticality"]}
                log.warning(f"  {key(w)}: {exc}")
                continue
            log_changes([c.to_dict() for c in changes])
            results[key(w)] = {"status": "planned" if request.dry_run else "rolling", "criticality": w["criticality"],
                               "changes": [c.to_dict() for c in changes]}
            wait.append(w)
        return wait

    def chunk_done(self, context: Any, event: dict[str, Any] | None = None, plan: list | None = None,
                   index: int = 0, results: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        request = request_of(context)
        assert request is not None and plan is not None and results is not None
        for name, outcome in (event or {}).get("results", {}).items():
            results[name] = {**results.get(name, {}), **outcome}
            log.log(logging.WARNING if outcome["status"] in ("error", "failed", "timeout", "refused") else logging.INFO,
                    f"  {name}: {outcome['status']}: {outcome['message']}")
        return self._next(context, request, plan, index + 1, results)

    @staticmethod
    def _summary(request: em.Request, plan: list[list[dict[str, Any]]], results: dict[str, dict[str, Any]]
                 ) -> dict[str, Any]:
        failed = {k: r for k, r in results.items() if r["status"] in ("error", "failed", "timeout", "refused")}
        log.log(logging.WARNING if failed else logging.INFO,
                f"stage 2 {'planned (dry run)' if request.dry_run else 'done'}: {len(results)} workload(s), "
                f"{len(failed)} not rolled out: {', '.join(failed) or 'none'}")
        return {"order": [key(w) for c in plan for w in c], "chunks": len(plan), "results": results,
                "failed": sorted(failed), "dry_run": request.dry_run}


# ---- stage 3 ----------------------------------------------------------------------------------------------
class HealthTrigger(BaseTrigger):
    """Polls every cluster's per-workload success rate until all in scope are healthy, or the deadline."""

    def __init__(self, prometheus_conn_ids: dict[str, str], scope: dict[str, Any], floor: float, window: str,
                 poke_interval: float, deadline: float, since: float | None = None) -> None:
        super().__init__()
        self.prometheus_conn_ids, self.scope, self.floor = prometheus_conn_ids, scope, floor
        self.window, self.poke_interval, self.deadline, self.since = window, poke_interval, deadline, since

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("meshwave.emergency_tasks.HealthTrigger", {
            "prometheus_conn_ids": self.prometheus_conn_ids, "scope": self.scope, "floor": self.floor,
            "window": self.window, "poke_interval": self.poke_interval, "deadline": self.deadline,
            "since": self.since})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        sources = {}
        for cluster, conn_id in self.prometheus_conn_ids.items():
            connection = await BaseHook.aget_connection(conn_id)
            sources[cluster] = await asyncio.to_thread(prometheus_source, connection)
        scope, polls = em.Scope.from_dict(self.scope), 0
        while True:
            poll = await asyncio.to_thread(em.check_health, sources, scope, self.floor, self.window)
            polls += 1
            if poll["healthy"] or time.time() >= self.deadline:
                recovered = None
                if poll["healthy"] and self.since:
                    recovered = await asyncio.to_thread(em.recovered_at, sources, scope, self.floor, self.window,
                                                        self.since, poll["at"])
                yield TriggerEvent(event(poll, polls, recovered))
                return
            await asyncio.sleep(self.poke_interval)


def event(poll: dict[str, Any], polls: int, recovered_at: float | None) -> dict[str, Any]:
    """The stage-3 result: the rows that are not healthy (the healthy ones are only counted)."""
    rows = [r for r in poll["rows"] if r["status"] != "healthy"]
    status = "healthy" if poll["healthy"] else "unhealthy" if poll["unhealthy"] else (
        "error" if poll["errors"] else "no data")  # no data: no service in scope with traffic to judge
    return {**poll, "rows": rows, "status": status, "polls": polls, "recovered_at": recovered_at}


class VerifyHealthOperator(BaseOperator):
    """Stage 3: every service in scope with traffic at or above the success-rate floor, polled deferrably."""

    ui_color = "#e8f4fd"

    def __init__(self, *, poke_interval: float = POLL_SECONDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poke_interval = poke_interval

    def execute(self, context: Any) -> dict[str, Any] | None:
        request = request_of(context)
        if request is None:
            raise AirflowSkipException("the form did not validate: nothing to verify")
        conn_ids = {t.cluster: t.prometheus_conn_id for t in request.targets}
        if request.dry_run or request.health_timeout_seconds == 0:
            sources = {c: prometheus_source(BaseHook.get_connection(i)) for c, i in conn_ids.items()}
            poll = em.check_health(sources, request.scope, request.min_success_rate, request.health_window)
            return self.verdict(context, {**event(poll, 1, None), "observed_only": True})
        since = (context["ti"].xcom_pull(task_ids=STAGE_1_DONE) or {}).get("started")
        self.defer(trigger=HealthTrigger(conn_ids, request.scope.to_dict(), request.min_success_rate,
                                         request.health_window, self.poke_interval,
                                         time.time() + request.health_timeout_seconds, since),
                   method_name="verdict", timeout=timedelta(seconds=request.health_timeout_seconds + MARGIN))
        return None

    def verdict(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        request = request_of(context)
        assert request is not None and event is not None
        started = (context["ti"].xcom_pull(task_ids=STAGE_1_DONE) or {}).get("started")
        recovered = event.get("recovered_at") or event["at"]  # Prometheus' history, else when stage 3 looked
        event["seconds_since_stage_1"] = round(recovered - started, 1) if started and event["healthy"] else None
        event["confirmed_after"] = round(event["at"] - started, 1) if started else None
        c = event["counts"]
        log.log(logging.INFO if event["healthy"] else logging.WARNING,
                f"stage 3: {event['status']} after {event['polls']} poll(s): {c['healthy']} healthy, "
                f"{c['unhealthy']} below {request.min_success_rate}, {c['no traffic']} without traffic, "
                f"{c['no data']} without data (application success rate over {request.health_window})")
        for cluster, error in event["errors"].items():
            log.warning(f"  cluster {cluster}: Prometheus: {error}")
        if event["seconds_since_stage_1"] is not None:
            how = "from Prometheus' history" if event.get("recovered_at") else "when stage 3 looked"
            when = (f"{event['seconds_since_stage_1']:.1f}s after stage 1 started" if event["seconds_since_stage_1"]
                    else "already when stage 1 started")
            log.info(f"every service in scope healthy {when} ({how}; confirmed by stage 3 "
                     f"{event['confirmed_after']:.1f}s after stage 1 started)")
        log.info(em.table(event["rows"], ["cluster", "service", "success_rate", "status"]))
        return event
