"""The service task group: the same group in a wave DAG and in the ad-hoc DAG (one code path).

It is a *mapped* task group: one group per batch, expanded over the batch's services (one map index per
service, labelled with the service's key in the UI). A DAG then has the same 8 tasks per batch however many
services a batch holds, which keeps parsing and every task start cheap (a task process parses its DAG). Inside the
group, every XCom read and task state is the calling service's own map index.

A task runs one or more steps (group_state.TASKS), and a wait ends its task in the triggerer with its result and
the decision after it: on the happy path a service costs 8 task runs (starts and resumes), every one of them needed.

    admit: resolve the service (the plan, or the trigger form), refuse bad input, apply the guards (freeze,
      maintenance window), take the workload's lease; on the forward path, preflight and baseline; route by action:
      inject | to_permissive | to_remove
    canary (only in a group where some service tries a canary first, canary.py): the canary copy, then wait_canary
      in the triggerer, which decides: canary_soak | canary_failed; or inject at once when there is no canary to try
    canary_soak decides: inject | canary_failed | canary_held (the end: the primary is never changed)
    remove_canary, whatever the canary did (its undo's retries); the injection follows it
    inject: the sidecar, then wait_rollout in the triggerer, which decides: soak | rollback_after_rollout |
      not_started (the end)
    soak decides: strict_gate | rollback_after_soak | hold_permissive (the end)
    strict_gate decides: flip_strict | stay_permissive (the end)
    flip_strict: STRICT, proven in force, then verify_strict in the triggerer
    back_to_permissive, then verify_recovery: on request (admit: to_permissive), or after STRICT unless it was
      verified (it decides that itself, as `after_strict`)
    rollback_injection, then wait_rollback (admit: to_remove, or a rollback decision)
    outcome, once everything else is done: the final state and why (red when rolled back, blocked or failed)

The first task of each path runs only when a decision chose it and skips itself otherwise (what follows it is then
skipped by its trigger rule). Not branch operators: in Airflow 3.3 a branch inside a mapped task group skips task
instances that the scheduler has not expanded yet, so the skip is lost and the path not chosen runs as well
(apache/airflow#65745).

Waits are deferrable (no worker slot while soaking); cluster changes read before they write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from airflow.sdk import BaseHook, TriggerRule, XComArg, chain, task, task_group
from airflow.sdk.definitions._internal.abstractoperator import DAGNode
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException, AirflowSkipException, TaskDeferred

from meshwave import approval, decisions, guards, outbound, stages, steps
from meshwave.canary import canary_name
from meshwave.changes import Change
from meshwave.group_state import GroupState, decision, decoded, pull, results_of
from meshwave.kube_errors import InjectionBlocked, KubeError, NotInForce
from meshwave.lease import LeaseRefused
from meshwave.pending import PENDING_ANNOTATION, Undo, expecting
from meshwave.plan import ClusterConfig, Settings
from meshwave.record import ServiceRecord
from meshwave.results import (
    BackToPermissiveResult,
    CanaryResult,
    ClearEmergencyResult,
    FlipResult,
    GateEvent,
    GateExtra,
    InjectResult,
    PreflightResult,
    RemoveCanaryResult,
    RollbackResult,
    RolloutResult,
    RolloutStatus,
    StepError,
)
from meshwave.sensors import (
    BatchWait,
    GateSensor,
    GateWatch,
    RolloutWatch,
    dry_gate,
    gate_deferral,
    push_ended,
    rollout_deferral,
)
from meshwave.steps import ACTIONS, Service

# Airflow sends a task's stdlib logging to its task log, each line with its level and this module's name
log = logging.getLogger(__name__)

NEVER = 10**9
FORWARD, TO_PERMISSIVE, TO_REMOVE = "inject", "to_permissive", "to_remove"
TO_REMOVE_CANARY = "to_remove_canary"
ROUTES = {"migrate": FORWARD, "inject_only": FORWARD, "strict_only": FORWARD,
          "permissive": TO_PERMISSIVE, "remove_sidecar": TO_REMOVE, "remove_canary": TO_REMOVE_CANARY,
          "clear_emergency": TO_PERMISSIVE}  # its one write, in back_to_permissive's place (no mode changes)
UNDO_ROUTES = (TO_PERMISSIVE, TO_REMOVE, TO_REMOVE_CANARY)
# The first task of each path, and the decisions (deciding task: what it chose) that put a service on it.
ON_PATH = {
    "canary": {"admit": FORWARD},
    "canary_soak": {"canary": decisions.CANARY_SOAK},
    "inject": {"admit": FORWARD},
    "soak": {"inject": decisions.SOAK},
    "strict_gate": {"soak": decisions.STRICT_GATE},
    "flip_strict": {"strict_gate": decisions.FLIP},
    "back_to_permissive": {"admit": TO_PERMISSIVE},  # and after STRICT: see strict_undone_if_needed
    "rollback_injection": {"admit": TO_REMOVE, "inject": decisions.ROLLBACK_AFTER_ROLLOUT,
                           "soak": decisions.ROLLBACK_AFTER_SOAK},
}
# In a group with a canary, the injection follows the canary's decision (inject at once when there is none to try).
AFTER_CANARY = {"canary": decisions.INJECT, "canary_soak": decisions.INJECT}
Resolve = Callable[[dict[str, Any], str], Service]  # (context, the map index's key) -> the service
Guard = Callable[[Service, dict[str, Any]], None]
Written = InjectResult | FlipResult | BackToPermissiveResult | ClearEmergencyResult | RollbackResult
Run = Callable[[Service, dict[str, Any]], Written]
Wait = Callable[[Service, Written, dict[str, Any]], TaskDeferred | None]  # (service, write's result, context)
Dry = Callable[[], RolloutResult | GateEvent]  # what a dry run's wait ends with (nothing to wait for)
Seconds = Callable[[Settings], int]
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=5)}
# An undo outlasts a managed control-plane upgrade: 5 s doubling to 5 min between tries, 12 retries, over 30 minutes
# in all (5+10+20+40+80+160+6x300 s, before Airflow's jitter) before it fails, loudly, in the outcome and the report.
# Airflow 3.3 reads retry_exponential_backoff as a multiplier (True would be 1: no backoff at all).
UNDO_RETRIES = {"retries": 12, "retry_delay": timedelta(seconds=5), "retry_exponential_backoff": 2.0,
                "max_retry_delay": timedelta(minutes=5)}
# Every task may be retried: a worker that dies or an API that times out must not decide a migration.
# A refusal (AirflowFailException) is never retried.
DEFAULT_ARGS = {"owner": "meshwave", **RETRIES}


def dry_rollout() -> RolloutResult:
    """A dry run's rollout: done, nothing to wait for (a function: a model built at import costs every task start)."""
    return RolloutResult(status=RolloutStatus.DONE, message="dry run: nothing changed, nothing to wait for",
                         dry_run=True)


def kube_for(svc: Service, context: dict[str, Any]) -> Any:
    """The cluster's MeshKube, one per task execution: a step that renews the lease, re-reads the freeze and writes
    asks for it several times, and each new one would fetch the connection and rediscover the API again."""
    return _kube(context, svc.plan.cluster, svc.cluster)


def peers_for(svc: Service, context: dict[str, Any]) -> outbound.Peers:
    """The plan's other clusters, built on first use: where a rollback reads a destination its workload calls."""

    def peer(cluster: str) -> Any:
        if cluster not in svc.peers:
            return outbound.no_peers(cluster)
        try:
            return _kube(context, cluster, svc.peers[cluster])
        except AirflowNotFoundException as exc:
            raise outbound.PeerUnavailable(f"cluster {cluster}: connection "
                                           f"{svc.peers[cluster].kubernetes_conn_id}: {exc}") from None

    return peer


def _kube(context: dict[str, Any], cluster: str, config: ClusterConfig) -> Any:
    from meshwave.connections import mesh_kube  # the kubernetes client: at run time, not at parse time

    dry_run = bool(context["params"].get("dry_run"))
    kubes = context.setdefault("meshwave_kubes", {})
    key = (config.kubernetes_conn_id, cluster, dry_run)
    if key not in kubes:
        connection = BaseHook.get_connection(config.kubernetes_conn_id)
        kubes[key] = mesh_kube(connection, cluster, config.root_namespace, dry_run=dry_run, revision=config.revision)
    return kubes[key]


def prometheus_for(svc: Service) -> Any:
    from meshwave.connections import prometheus_source

    return prometheus_source(BaseHook.get_connection(svc.cluster.prometheus_conn_id))


Logged = TypeVar("Logged", PreflightResult, InjectResult, FlipResult, BackToPermissiveResult, ClearEmergencyResult,
                 RollbackResult)


def logged(result: Logged) -> Logged:
    """Log every change of a step in its task log, with the exact request (what a dry run would send)."""
    for data in result.changes:
        change = Change.from_dict(data)
        log.info(change.summary())
        if change.request is not None and (change.applied or change.dry_run):
            log.info(f"    {change.request.describe()} {json.dumps(change.request.body, sort_keys=True)}")
    return result


def _error(context: dict[str, Any], step: str, message: str) -> None:
    """What went wrong in `step`, for the outcome (one per task: a task stops at its first error)."""
    context["ti"].xcom_push(key="error", value=StepError(step=step, message=message).model_dump(mode="json"))


@contextlib.contextmanager
def recording(context: dict[str, Any], step: str, final: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Keep a failed step's error for the outcome; a Blocked service, a refused change or an error of a `final`
    type is not retried."""
    try:
        yield
    except AirflowSkipException:  # frozen: the step pushed its own reason
        raise
    except steps.Blocked as exc:
        _error(context, step, f"blocked: {exc}")
        raise AirflowFailException(str(exc)) from None
    except (KubeError, ValueError) as exc:
        _error(context, step, str(exc))
        if isinstance(exc, (ValueError, *final)) or getattr(exc, "code", None) in (400, 403, 404, 409, 415, 422):
            raise AirflowFailException(str(exc)) from None
        raise
    except Exception as exc:
        _error(context, step, f"{type(exc).__name__}: {exc}")
        raise


def _service(context: dict[str, Any], prefix: str) -> Service:
    """The service this map index's `admit` task resolved (every later task runs on exactly that)."""
    cached = context.setdefault("meshwave_services", {})
    if prefix not in cached:
        data = pull(context, prefix, "admit", "service")
        if not data:
            raise AirflowFailException(f"{prefix}: no admitted service (the admit task did not run or was refused)")
        cached[prefix] = Service.from_dict(data)
    return cached[prefix]


def _chosen(context: dict[str, Any], prefix: str, decider: str) -> str | None:
    """Where `decider`'s decision sends this service (None: it made none)."""
    chosen = decision(context, prefix, decider)
    return chosen.to if chosen else None


def on_path(prefix: str, step: str, routes: dict[str, str] | None = None) -> Callable[[dict[str, Any]], None]:
    """The check a path's first task runs before anything else: skip unless a decision chose this path (`routes`:
    deciding task -> its choice, ON_PATH[step] unless given)."""
    routes = routes or ON_PATH[step]

    def check(context: dict[str, Any]) -> None:
        if not any(_chosen(context, prefix, decider) == target for decider, target in routes.items()):
            raise AirflowSkipException(f"{step}: not on this service's path (no decision chose it)")

    return check


def approved_if_needed(prefix: str, approval_task: str | None) -> Callable[[dict[str, Any]], None]:
    """flip_strict's check: on its path (the STRICT gate chose the flip), and, for a service that needs a person's
    approval, approved in the batch's answer and its gate still true after the time the approval took. Not
    approved, the service stays PERMISSIVE: the decision `after_approval` says why, the XCom "approval" what the
    answer was (both for the outcome)."""
    chosen = on_path(prefix, "flip_strict")

    def check(context: dict[str, Any]) -> None:
        chosen(context)
        svc = _service(context, prefix)
        if approval_task is None or not svc.needs_approval:
            return
        pulled = decoded(context["ti"].xcom_pull(task_ids=approval_task))
        approved, answer = approval.decide(svc.plan.key, approval.Answer.model_validate(pulled) if pulled else None)
        to, why = (decisions.FLIP, answer.why) if approved else (decisions.STAY, answer.why)
        if approved and not _dry(context):
            to, why = _gate_still_holds(svc, context, prefix, why)
        context["ti"].xcom_push(key="approval", value=answer.model_dump(mode="json"))
        context["ti"].xcom_push(key="decision", value=decisions.Decision(to=to, why=why).model_dump())
        log.info(f"after_approval: -> {to}: {why}")
        if to != decisions.FLIP:
            raise AirflowSkipException(why)

    return check


def _gate_still_holds(svc: Service, context: dict[str, Any], prefix: str, why: str) -> tuple[str, str]:
    """The STRICT gate's own check once more, over the time since the gate ended (the approval's wait) plus a query
    window: a caller that started sending plaintext meanwhile keeps the service PERMISSIVE; so does a Prometheus
    that does not answer (STRICT is not made on evidence that could not be read again)."""
    from meshwave import checks
    from meshwave.checks import Outcome
    from meshwave.prometheus import window_seconds

    gate = results_of(context, prefix, "strict_gate").strict_gate
    ended = gate.ended if gate is not None and gate.ended else None
    waited = max(0.0, time.time() - ended) if ended else float(svc.settings.approval.timeout_seconds)
    lookback = stages.strict_lookback(svc.window, window_seconds(svc.window), waited)
    p = svc.plan
    try:
        with contextlib.closing(prometheus_for(svc)) as source:
            verdict, _ = checks.strict_gate(source, p.namespace, p.workload, svc.window, lookback=lookback)
    except Exception as exc:  # noqa: BLE001 - whatever broke, STRICT is not made unchecked
        return decisions.STAY, f"{why}; but the STRICT gate could not be read again before the flip: {exc}"
    if verdict.outcome != Outcome.PASS:
        return decisions.STAY, (f"{why}; but {waited:.0f} s after the STRICT gate passed it no longer holds: "
                                f"{verdict.reason}")
    return decisions.FLIP, f"{why}; the STRICT gate still held at the flip ({verdict.reason})"


def rollback_if_chosen(prefix: str) -> Callable[[dict[str, Any]], None]:
    """rollback_injection's check: on request, or when the rollout or the soak decided to roll back. A wait whose
    task failed (its trigger crashed, its retries ran out) made no decision: GroupState makes it, as the wait
    would have (an injection that failed part-way is undone)."""

    def check(context: dict[str, Any]) -> None:
        chosen = {decider: _chosen(context, prefix, decider) for decider in ON_PATH["rollback_injection"]}
        if any(chosen[decider] == target for decider, target in ON_PATH["rollback_injection"].items()):
            return
        if chosen["admit"] != FORWARD or (chosen["inject"] is not None
                                          and (chosen["inject"] != decisions.SOAK or chosen["soak"] is not None)):
            raise AirflowSkipException("rollback_injection: not on this service's path (no decision chose it)")
        group = GroupState(context, prefix)
        if group.decisions.get("after_rollout_to") == decisions.ROLLBACK_AFTER_ROLLOUT or \
                group.decisions.get("after_soak_to") == decisions.ROLLBACK_AFTER_SOAK:
            log.warning("rollback_injection: "
                        f"{group.decisions.get('after_soak') or group.decisions.get('after_rollout')}")
            return
        raise AirflowSkipException("rollback_injection: not on this service's path (no decision chose it)")

    return check


def _note(context: dict[str, Any]) -> str:
    """Who changed a policy, for the annotation it leaves on someone else's policy."""
    return f"meshwave {context['dag'].dag_id} {context['run_id']}"


def _run_of(context: dict[str, Any]) -> str:
    return f"{context['dag'].dag_id}/{context['run_id']}"


# What a run leaves on a workload before a change it has yet to confirm (pending.py): mesh_reconcile undoes it
# when the run has not settled it by then (paused, plan file broken, undo out of retries).
TRIAL, UNVERIFIED = "sidecar on trial (the soak has not accepted it yet)", "STRICT, not verified yet"
CANARY_TRIAL = "a canary copy with a sidecar on trial (not removed yet)"


def _trial_seconds(s: Settings) -> int:
    """Until the run's own decisions should have settled the sidecar: the canary, rollout, soak, STRICT gate, flip,
    verify."""
    return (_canary_seconds(s) + s.rollout_timeout_seconds + s.soak_seconds + s.verify_seconds
            + s.strict_gate_timeout_seconds + _approval_seconds(s) + s.probe.timeout_seconds + 2 * s.verify_seconds
            + s.reconcile_grace_seconds)


def _canary_seconds(s: Settings) -> int:
    """The canary's rollout and soak (and the verification's margin), when the service has one."""
    return s.rollout_timeout_seconds + s.canary.soak_seconds + s.verify_seconds if s.canary is not None else 0


def _approval_seconds(s: Settings) -> int:
    """A batch with an approval waits for it, every service of it (the approver may take the whole timeout)."""
    return s.approval.timeout_seconds if s.approval.asked else 0


def _unverified_seconds(s: Settings) -> int:
    return s.probe.timeout_seconds + 2 * s.verify_seconds + s.reconcile_grace_seconds


def _expect(svc: Service, kube: Any, context: dict[str, Any], state: str, undo: Undo, seconds: int) -> dict[str, Any]:
    """Write what is expected next onto the workload, before the change it covers."""
    change = kube.set_pending(svc.plan.namespace, svc.plan.workload,
                              expecting(state, undo, seconds, _run_of(context), svc.to_dict()))
    log.info(change.summary())
    return change.to_dict()


def _settle(svc: Service, kube: Any, why: str, only: Undo | None = None) -> dict[str, Any] | None:
    """The pending state is settled (an undo done): its annotation goes. `only`: settle only that undo (going back
    to PERMISSIVE does not settle a sidecar still on trial)."""
    p = svc.plan
    current = kube.pending(p.namespace, p.workload)
    if current is None or (only is not None and current.undo != only):
        return None
    change = kube.clear_pending(p.namespace, p.workload, why)
    log.info(change.summary())
    return change.to_dict()


def _not_frozen(svc: Service, kube: Any, context: dict[str, Any], step: str, write: str) -> None:
    """The freeze, read again immediately before a write that makes the mesh stricter: a service in flight when
    it came (the emergency rollback sets it) stops here, as it is, and its outcome says `frozen` and why."""
    if kube.dry_run:
        return
    if reason := guards.frozen_now(svc.plan.key):
        _error(context, step, f"frozen: {reason}")
        raise AirflowSkipException(f"frozen before {write}: {reason}")


def _inject(svc: Service, context: dict[str, Any]) -> InjectResult:
    """A sidecar this run puts on trial is marked first; pods that all run one already are not this run's change
    (a re-run changes nothing)."""
    kube, p = kube_for(svc, context), svc.plan
    if svc.action != "strict_only":
        _not_frozen(svc, kube, context, "inject", "the injection")
    pending = None
    w = kube.workload(p.namespace, p.workload)
    if svc.action != "strict_only" and not (w.pods_total > 0 and w.pods_with_proxy == w.pods_total):
        pending = _expect(svc, kube, context, TRIAL, Undo.REMOVE_SIDECAR, _trial_seconds(svc.settings))
    return logged(steps.inject(svc, kube)).model_copy(update={"pending": pending})


def _flip(svc: Service, context: dict[str, Any]) -> FlipResult:
    """STRICT this run is about to write is marked first; pods already STRICT are not this run's change.

    A retry after this run's flip (its verification's trigger crashed, its worker was lost) does not verify again
    from zero while STRICT stays unverified: it fails, and back_to_permissive makes the workload PERMISSIVE."""
    kube, p = kube_for(svc, context), svc.plan
    _not_frozen(svc, kube, context, "flip_strict", "the flip to STRICT")
    strict = kube.mtls.effective(p.namespace, p.workload).strict_everywhere
    if context["ti"].try_number > 1 and strict and not kube.dry_run:
        mark = kube.pending(p.namespace, p.workload)
        if mark is not None and mark.run == _run_of(context) and mark.state == UNVERIFIED:
            raise AirflowFailException("a previous try flipped STRICT and did not finish verifying it: STRICT is not "
                                       "verified twice from zero; back to PERMISSIVE")
    pending = None
    if not strict:
        pending = _expect(svc, kube, context, UNVERIFIED, Undo.PERMISSIVE, _unverified_seconds(svc.settings))
    return logged(steps.flip_strict(svc, kube)).model_copy(update={"pending": pending})


def _back(svc: Service, context: dict[str, Any]) -> BackToPermissiveResult | ClearEmergencyResult:
    kube = kube_for(svc, context)
    if svc.action == "clear_emergency":
        return logged(steps.clear_emergency(svc, kube))
    result = logged(steps.back_to_permissive(svc, kube, _note(context)))
    return result.model_copy(update={"pending": _settle(svc, kube, "back to PERMISSIVE", only=Undo.PERMISSIVE)})


def _rollback(svc: Service, context: dict[str, Any]) -> RollbackResult:
    kube = kube_for(svc, context)
    result = logged(steps.rollback_injection(svc, kube, prometheus_for(svc), _note(context),
                                             peers_for(svc, context)))
    return result.model_copy(update={"pending": _settle(svc, kube, "sidecar removed")})


def _after_removal(svc: Service, state: GroupState) -> outbound.AfterRemoval | None:
    """Once the pods run without a sidecar: the workload's own success rate against its rate before the removal
    (else its baseline), so that a removal that made things worse says so in the outcome."""
    removed, rollout, base = state.results.rollback_injection, state.results.wait_rollback, state.results.baseline
    if state.states.get("wait_rollback") != "success" or rollout is None or rollout.status != RolloutStatus.DONE \
            or rollout.dry_run:
        return None
    before = removed.success_before if removed is not None else None
    if before is None and base is not None:
        before = base.baseline.success_rate
    p = svc.plan
    try:
        with contextlib.closing(prometheus_for(svc)) as source:
            found = outbound.after_removal(source, p.namespace, p.workload, svc.window, before,
                                           svc.settings.thresholds.max_success_drop, rollout.ended)
    except Exception as exc:  # the outcome must still be recorded: an unchecked removal says so, never "fine"
        found = outbound.AfterRemoval(status="no_data", before=before, after=None,
                                      reason=f"not checked: {type(exc).__name__}: {exc}")
    log.info(f"after the removal: {found.status}: {found.reason}")
    return found


# ---- one writer per workload (lease.py) ----------------------------------------------------------------


def _undo_seconds(s: Settings) -> int:
    """An undo and the wait after it: the rollout (or the recovery check), plus the grace."""
    return s.rollout_timeout_seconds + 2 * s.verify_seconds + s.reconcile_grace_seconds


def _take_lease(svc: Service, context: dict[str, Any]) -> None:
    """admit: this run becomes the workload's one writer, for as long as its whole path may take (LeaseRefused
    names the holder). In a dry run it is only checked: nothing is written."""
    p = svc.plan
    change = kube_for(svc, context).leases.take(p.namespace, p.workload, _run_of(context), p.key,
                                                _trial_seconds(svc.settings))
    log.info(change.summary())


def _dry(context: dict[str, Any]) -> bool:
    return bool(context["params"].get("dry_run"))


def _renewing(run: Run, seconds: Seconds, *, undo: bool) -> Run:
    """The lease renewed first, to `seconds` from now. A forward write is refused (blocked, nothing written) when
    this run no longer holds the workload (taken over, broken by the emergency rollback); an undo goes ahead: a
    lease keeps a second run out, it never keeps an undo from making the workload safer."""

    def step(svc: Service, context: dict[str, Any]) -> dict[str, Any]:
        if not _dry(context):
            p = svc.plan
            try:
                log.info(kube_for(svc, context).leases.renew(p.namespace, p.workload, _run_of(context),
                                                             seconds(svc.settings)).summary())
            except LeaseRefused as exc:
                if not undo:
                    raise steps.Blocked(f"lease: {exc}") from None
                log.warning(f"the undo goes ahead: {exc}")
        return run(svc, context)

    return step


def holding(run: Run, seconds: Seconds) -> Run:
    """A forward write, renewed up to the deadline of the pending state it is about to leave."""
    return _renewing(run, seconds, undo=False)


def undoing(run: Run) -> Run:
    """An undo, renewed for its own wait when this run holds the lease, carried out when it does not."""
    return _renewing(run, _undo_seconds, undo=True)


def _release_lease(svc: Service, record: ServiceRecord, context: dict[str, Any]) -> None:
    """The outcome: the workload is free for the next run. A release that fails leaves a lease that expires by
    itself (no later than the pending deadline): said, not failed."""
    p = svc.plan
    try:
        change = kube_for(svc, context).leases.release(p.namespace, p.workload, _run_of(context), record.outcome)
        log.info(change.summary())
    except (KubeError, ValueError) as exc:
        log.warning(f"{p.key}: the lease could not be released ({exc}); it expires by itself")


def strict_undone_if_needed(prefix: str) -> Callable[[dict[str, Any]], None]:
    """back_to_permissive's check: it runs on request (admit), or after a flip to STRICT that was not verified
    (the `after_strict` decision, made here rather than in a task of its own: one task start less between a
    breach and PERMISSIVE)."""
    requested = on_path(prefix, "back_to_permissive")

    def check(context: dict[str, Any]) -> None:
        with contextlib.suppress(AirflowSkipException):
            return requested(context)
        group = GroupState(context, prefix)
        if group.states.get("flip_strict") in (None, "skipped", "upstream_failed"):
            raise AirflowSkipException("back_to_permissive: not on this service's path (STRICT was not attempted)")
        to, why = decisions.after_strict(group.service, group.results, group.states)
        if to == decisions.STRICT_DONE:
            to, why = _confirm_strict(group.service, context, why)
        context["ti"].xcom_push(key="decision", value=decisions.Decision(to=to, why=why).model_dump())
        log.info(f"after_strict: -> {to}: {why}")
        if to != decisions.BACK:
            raise AirflowSkipException(f"STRICT stays: {why}")

    return check


def _confirm_strict(svc: Service, context: dict[str, Any], why: str) -> tuple[str, str]:
    """Verified: STRICT stays, unless it was undone while this run waited (mesh_reconcile, an operator): the
    record must say what the data plane does."""
    kube, p = kube_for(svc, context), svc.plan
    state = kube.mtls.effective(p.namespace, p.workload)
    if not state.strict_everywhere:
        return decisions.BACK, (f"verified, but STRICT is no longer in force ({state.describe()}): undone while "
                                "this run waited (mesh_reconcile or an operator)")
    _settle(svc, kube, "STRICT verified")
    return decisions.STRICT_DONE, why


def _guard_and_lease(svc: Service, guard: Guard | None, context: dict[str, Any]) -> None:
    """The guards (freeze, window, mesh_service's refusals), then the workload's lease."""
    if guard is not None:
        try:
            guard(svc, context)
        except AirflowSkipException as exc:
            _error(context, "admit", str(exc))
            log.warning(f"{svc.plan.key}: not started: {exc}")
            raise
        except ValueError as exc:  # the guard refuses the service (mesh_service: a gateway)
            _error(context, "admit", f"refused: {exc}")
            raise AirflowFailException(f"refused before any change: {exc}") from None
    with recording(context, "admit"):  # a lease held by another run refuses the service (LeaseRefused: a ValueError)
        _take_lease(svc, context)


def _prepare(svc: Service, context: dict[str, Any]) -> None:
    """The forward path's read-only steps (they run for real in a dry run too): preflight, then the baseline."""
    ti, prometheus = context["ti"], prometheus_for(svc)
    with recording(context, "preflight"):
        found = logged(steps.preflight(svc, kube_for(svc, context), prometheus))
        ti.xcom_push(key="preflight", value=found.model_dump(mode="json"))
    with recording(context, "baseline"):
        ti.xcom_push(key="baseline", value=steps.baseline(svc, prometheus).model_dump(mode="json"))


def _admit(prefix: str, resolve: Resolve, guard: Guard | None, key: Any):
    # An undo (on request, or mesh_reconcile's) outlasts a control plane that does not answer, as the undo steps do;
    # a forward change gives up after the usual tries (see admit).
    @task(task_id="admit", multiple_outputs=False, **UNDO_RETRIES)
    def admit(key: str, **context: Any) -> dict[str, str]:
        """Resolve the service, refuse bad input, apply the guards, take the workload's lease; on the forward path,
        preflight and baseline; route by action. Changes nothing but the lease annotation."""
        ti = context["ti"]
        try:
            svc = resolve(context, key)
        except ValueError as exc:
            _error(context, "admit", f"refused: {exc}")
            raise AirflowFailException(f"refused before any change: {exc}") from None
        route = ROUTES[svc.action]
        try:
            _guard_and_lease(svc, guard, context)
            ti.xcom_push(key="service", value=svc.to_dict())
            log.info(f"{svc.plan.key}: {ACTIONS[svc.action]}; settings: {svc.settings.model_dump_json()}")
            if route == FORWARD:
                _prepare(svc, context)
        except (AirflowSkipException, AirflowFailException):
            raise
        except Exception as exc:  # the cluster did not answer: an undo waits it out, a forward change gives up
            if route in UNDO_ROUTES or ti.try_number <= RETRIES["retries"]:
                raise
            raise AirflowFailException(f"not started after {ti.try_number} tries: {exc}") from None
        chosen = decisions.Decision(to=route, why=f"action {svc.action}")
        ti.xcom_push(key="decision", value=chosen.model_dump())
        return chosen.model_dump()

    return admit(key)


def _rollout_watch(svc: Service) -> RolloutWatch:
    return RolloutWatch(svc.cluster.kubernetes_conn_id, svc.plan.cluster, svc.plan.namespace, svc.plan.workload,
                        svc.settings.rollout_timeout_seconds, min(svc.settings.poke_interval_seconds, 3))


def _gate_watch(prefix: str, stage: str) -> Callable[[dict[str, Any]], GateWatch]:
    """Each stage's parameters, policy and timing, from the admitted service and upstream XComs."""

    def watch(context: dict[str, Any]) -> GateWatch:
        svc = _service(context, prefix)
        s, p = svc.settings, svc.plan
        params: dict[str, Any] = {"namespace": p.namespace, "workload": p.workload, "window": svc.window,
                                  "thresholds": svc.thresholds()}
        policy, wait, minimum = svc.gate_policy(), float(s.verify_seconds), 0.0
        if stage == "canary_soak":  # the canary's own name: it is judged against this workload's pods
            assert s.canary is not None  # on its path only when a canary was made
            params["canary"] = canary_name(p.workload)
            wait, minimum = s.canary.soak_seconds + s.verify_seconds, s.canary.soak_seconds
        elif stage == "soak":
            base = results_of(context, prefix, "baseline").baseline
            if base is None:
                raise ValueError(f"{p.key}: no baseline result: the soak has nothing to compare with")
            params["baseline"] = base.baseline.model_dump(mode="json")
            wait, minimum = s.soak_seconds + s.verify_seconds, s.soak_seconds
        elif stage == "strict_gate":  # plaintext is counted since the sidecars came; it never "confirms" a failure
            found = results_of(context, prefix, "soak", "wait_rollout")
            sidecar = stages.sidecar_seconds(found.soak.started if found.soak else None,
                                             found.wait_rollout.ended if found.wait_rollout else None,
                                             s.soak_seconds, batch_ended=_batch_ended(context, prefix))
            minimum = stages.strict_gate_hold(sidecar, s.soak_seconds)
            policy, wait = {**policy, "breaches_to_fail": NEVER}, s.strict_gate_timeout_seconds + minimum
            params["sidecar_seconds"] = sidecar
        else:  # verify_strict, verify_recovery: whom STRICT could hurt, as the gate saw them
            found = results_of(context, prefix, "strict_gate", "baseline")
            gate = (found.strict_gate.extra if found.strict_gate else None) or GateExtra()
            own = found.baseline.baseline.success_rate if found.baseline else None
            # each caller against its own rate before STRICT (as the gate saw it), the workload against its baseline
            before = {**(gate.callers_success_before or {}),
                      **({f"{p.namespace}/{p.workload}": own} if own is not None else {})}
            params.update(callers=gate.callers if gate.callers is not None else [],
                          inbound_before=gate.inbound_before, success_before=before or None)
            if stage == "verify_strict":
                wait, minimum = 2 * s.verify_seconds, s.verify_seconds
            else:
                policy = {**policy, "breaches_to_fail": NEVER}
        return GateWatch(svc.cluster.prometheus_conn_id, params, policy, wait, s.poke_interval_seconds, minimum)

    return watch


def _gate_decides(prefix: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The STRICT gate's decision needs nothing; a service that needs approval hands on what its approver sees."""

    def decide(context: dict[str, Any]) -> dict[str, Any]:
        svc = _service(context, prefix)
        if not svc.needs_approval:
            return {"after": "strict_gate"}
        found = results_of(context, prefix, "baseline", "soak")
        base = found.baseline.baseline if found.baseline is not None else None
        soak = decisions.soaked_values(found.soak)
        candidate = approval.Candidate(
            service=svc.plan.key, criticality=svc.plan.criticality,
            timeout_seconds=svc.settings.approval.timeout_seconds, to="", why="",
            success_before=base.success_rate if base else None, p99_before_ms=base.p99_ms if base else None,
            success_soak=soak.success_rate, p99_soak_ms=soak.p99_ms,
            notify=[t.model_dump(mode="json") for t in svc.settings.notify])
        return {"after": "strict_gate", "candidate": candidate.model_dump(mode="json")}

    return decide


def _soak_decides(prefix: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def decide(context: dict[str, Any]) -> dict[str, Any]:
        svc = _service(context, prefix)
        return {"after": "soak", "strict": svc.strict, "action": svc.action, "on_no_data": svc.settings.on_no_data}

    return decide


BATCH_POKE_SECONDS = 15  # how often a gate waiting for late batch-mates looks again (each look is a task start)


# Task instance states in which a batch-mate's rollout wait will not change what its pods run any more.
FINISHED = ("success", "failed", "skipped", "upstream_failed", "removed")


def batch_mates(states: dict[str, Any], task_id: str, own_map_index: int) -> dict[int, str]:
    """The states of `task_id`'s map indexes other than the caller's own. `states` is get_task_states' answer for
    one run: a mapped task instance comes keyed "<task id>_<map index>"."""
    mates = {}
    for key, state in states.items():
        head, _, index = key.rpartition("_")
        if head == task_id and index.isdigit() and int(index) != own_map_index:
            mates[int(index)] = state
    return mates


def unfinished(mates: dict[int, str]) -> list[int]:
    return sorted(i for i, state in mates.items() if state not in FINISHED)


def _batch_mates(context: dict[str, Any], prefix: str) -> tuple[str, dict[int, str]]:
    """The batch's other injections, each of which ends when its rollout wait does (this group's other map
    indexes in the run), and their states."""
    ti, task_id = context["ti"], f"{prefix}.inject"
    found = ti.get_task_states(dag_id=ti.dag_id, task_ids=[task_id], run_ids=[ti.run_id]).get(ti.run_id, {})
    return task_id, batch_mates(found, task_id, ti.map_index)


def _batch_ended(context: dict[str, Any], prefix: str) -> float | None:
    """When the last of the batch's other rollouts ended. One request for every map index's rollout result (Airflow
    3.3's pull without map indexes; a list of indexes costs a round trip each: 49 per gate in a 50-service batch,
    minutes of a loaded API server). Only a finished wait pushed one; this service's own is taken out once."""
    pulled = context["ti"].xcom_pull(task_ids=f"{prefix}.inject", key="wait_rollout")
    # a lone value comes bare, not in a list (the pull of one task); a map index that has not ended pushed None
    rollouts = [RolloutResult.model_validate(decoded(e)) for e in (pulled if isinstance(pulled, list) else [pulled])
                if e is not None]
    ended = [r.ended for r in rollouts if r.ended is not None]
    own = results_of(context, prefix, "wait_rollout").wait_rollout
    if own is not None and own.ended in ended:
        ended.remove(own.ended)
    return max(ended, default=None)


def _batch_wait(prefix: str) -> Callable[[dict[str, Any]], BatchWait | None]:
    """The strict gate's wait for the batch's other rollouts: a batch-mate that calls this service sends plaintext
    until its own sidecar is in (a killed worker can delay it by minutes). None when none is still rolling out."""

    def batch(context: dict[str, Any]) -> BatchWait | None:
        _, mates = _batch_mates(context, prefix)
        pending = unfinished(mates)
        if not pending:
            return None
        s = _service(context, prefix).settings
        what = ", ".join(f"map index {i} ({mates[i] or 'not started'})" for i in pending)
        return BatchWait(what, float(s.rollout_timeout_seconds + s.strict_gate_timeout_seconds),
                         max(float(s.poke_interval_seconds), BATCH_POKE_SECONDS))

    return batch


# ---- the canary (canary.py) ---------------------------------------------------------------------------------


def _no_canary(svc: Service, kube: Any) -> str | None:
    """Why the service has no canary to try, or None."""
    if svc.settings.canary is None:
        return "the plan sets no canary for it"
    if svc.action not in ("migrate", "inject_only"):
        return f"action {svc.action} injects no sidecar"
    w = kube.workload(svc.plan.namespace, svc.plan.workload)
    if w.pods_total > 0 and w.pods_with_proxy == w.pods_total:
        return f"all {w.pods_total} pods already run a sidecar"
    return None


def _make_canary(svc: Service, context: dict[str, Any]) -> CanaryResult:
    started, kube, p = time.time(), kube_for(svc, context), svc.plan
    if why := _no_canary(svc, kube):
        return CanaryResult(changes=[], none=why, seconds=steps.took(started))
    assert svc.settings.canary is not None
    _not_frozen(svc, kube, context, "canary", "the canary")
    pending = None
    if not kube.dry_run:  # a run that dies before removing its canary leaves it to mesh_reconcile
        pending = _expect(svc, kube, context, CANARY_TRIAL, Undo.REMOVE_CANARY,
                          _canary_seconds(svc.settings) + svc.settings.reconcile_grace_seconds)
    try:
        change = kube.ensure_canary(p.namespace, p.workload, svc.settings.canary.replicas, _run_of(context))
    except InjectionBlocked as exc:  # refused before any write
        raise steps.Blocked(str(exc)) from None
    log.info(change.summary())
    return CanaryResult(changes=[change.to_dict()], canary=canary_name(p.workload), seconds=steps.took(started),
                        pending=pending)


def _canary_task(prefix: str):
    """The canary copy made, then its rollout followed in the triggerer, which decides: canary_soak | canary_failed.
    A service with no canary to try goes on to its injection at once."""

    @task(task_id="canary", **RETRIES)
    def canary(**context: Any) -> None:
        on_path(prefix, "canary")(context)
        svc, ti = _service(context, prefix), context["ti"]
        with recording(context, "canary"):
            done = holding(_make_canary, _trial_seconds)(svc, context)
        ti.xcom_push(key="canary", value=done.model_dump(mode="json"))
        if done.none is not None:
            chosen = decisions.Decision(to=decisions.INJECT, why=f"no canary: {done.none}")
            ti.xcom_push(key="decision", value=chosen.model_dump())
            log.info(f"after_canary_rollout: -> {chosen.to}: {chosen.why}")
            return
        decide = {"after": "wait_canary"}
        if _dry(context):
            push_ended(context, "wait_canary", dry_rollout(), decide)
            return
        s, p = svc.settings, svc.plan
        watch = RolloutWatch(svc.cluster.kubernetes_conn_id, p.cluster, p.namespace, canary_name(p.workload),
                             s.rollout_timeout_seconds, min(s.poke_interval_seconds, 3))
        raise rollout_deferral(watch, True, "wait_canary", decide)

    return canary()


def _remove_canary_task(prefix: str):
    """Whatever the canary did: the workload's canary deleted (read first: nothing there, nothing deleted). It runs
    before the injection, which follows only a canary that passed; an undo's retries: a canary is never left
    taking traffic because the API did not answer for a while."""

    @task(task_id="remove_canary", trigger_rule=TriggerRule.ALL_DONE, **UNDO_RETRIES)
    def remove_canary(**context: Any) -> None:
        route = _chosen(context, prefix, "admit")
        if route not in (FORWARD, TO_REMOVE_CANARY):
            return  # not admitted, or on another path: no canary was made
        svc = _service(context, prefix)
        if route == FORWARD and svc.settings.canary is None:
            return
        started = time.time()
        with recording(context, "remove_canary"):
            kube = kube_for(svc, context)
            change = kube.remove_canary(svc.plan.namespace, svc.plan.workload)
            log.info(change.summary())
            settled = None if kube.dry_run else _settle(svc, kube, "canary removed", only=Undo.REMOVE_CANARY)
        done = RemoveCanaryResult(changes=[change.to_dict()], seconds=steps.took(started), pending=settled)
        context["ti"].xcom_push(key="remove_canary", value=done.model_dump(mode="json"))

    return remove_canary()


def _canary_decides(prefix: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def decide(context: dict[str, Any]) -> dict[str, Any]:
        return {"after": "canary_soak", "on_no_data": _service(context, prefix).settings.on_no_data}

    return decide


def _write_then_wait(name: str, prefix: str, write: Run, wait_step: str, wait: Wait,
                     check: Callable[[dict[str, Any]], None], dry: Dry, decide: dict[str, Any] | None = None,
                     final: tuple[type[Exception], ...] = (), **kwargs: Any):
    """A step that writes, then waits for what the write does (`wait`: a deferral whose trigger ends the task, or
    None when there is nothing to wait for). `check(context)` first: it skips the task when the service's path does
    not go here. An error of a `final` type fails the task at once (no retry)."""

    @task(task_id=name, **kwargs)
    def step(**context: Any) -> None:
        check(context)
        svc = _service(context, prefix)
        with recording(context, name, final):
            done = write(svc, context)
        context["ti"].xcom_push(key=name, value=done.model_dump(mode="json"))
        if _dry(context):
            push_ended(context, wait_step, dry(), decide)
            return
        with recording(context, wait_step):
            deferral = wait(svc, done, context)
        if deferral is not None:
            raise deferral

    return step()


def _rollout_wait(result_key: str, expect_proxy: bool, decide: dict[str, Any] | None = None) -> Wait:
    return lambda svc, done, context: rollout_deferral(_rollout_watch(svc), expect_proxy, result_key, decide)


def _verify(prefix: str, stage: str) -> Wait:
    """The check after a change of mode; none after a flip that was refused (another policy decides the mode) or
    after clearing the emergency mark (no mode changes)."""
    watch = _gate_watch(prefix, stage)

    def wait(svc: Service, done: Written, context: dict[str, Any]) -> TaskDeferred | None:
        if (isinstance(done, FlipResult) and done.refused) or svc.action == "clear_emergency":
            return None
        return gate_deferral(watch(context), stage)

    return wait


def _settle_outcome(svc: Service, record: ServiceRecord, context: dict[str, Any]) -> ServiceRecord:
    """Settle what this run left pending on the workload. A run that could not (an undo out of retries, a step
    that broke) makes its undo due now for mesh_reconcile, and the record says what is left, as the cluster has it."""
    p = svc.plan
    try:
        kube = kube_for(svc, context)
        current = kube.pending(p.namespace, p.workload)
        if current is None or current.run != _run_of(context):
            return record  # nothing of this run's (mesh_reconcile's runs undo another run's)
        if record.outcome.settled:
            log.info(kube.clear_pending(p.namespace, p.workload, f"{record.outcome}: {record.reason}"[:300]).summary())
            return record
        due = current.model_copy(update={"until": datetime.now(UTC)})
        log.info(kube.set_pending(p.namespace, p.workload, due).summary())
        left = _what_is_left(kube, svc)
    except (KubeError, ValueError) as exc:
        return record.model_copy(update={
            "reason": f"{record.reason}; what is left could not be read ({exc}): see annotation "
                      f"{PENDING_ANNOTATION} on deployment {p.namespace}/{p.workload}"})
    log.warning(f"LEFT: {p.key}: {left['describe']}; {current.undo} is due now for mesh_reconcile")
    return record.model_copy(update={
        "mtls": left["mtls"], "sidecar": left["sidecar"],
        "reason": f"{record.reason}; LEFT: {left['describe']}; mesh_reconcile carries out {current.undo}"})


def _what_is_left(kube: Any, svc: Service) -> dict[str, Any]:
    """The workload as the cluster has it now: its sidecars and the mTLS mode its pods enforce."""
    p = svc.plan
    w, mtls = kube.workload(p.namespace, p.workload), kube.mtls.effective(p.namespace, p.workload)
    sidecar = None if 0 < w.pods_with_proxy < w.pods_total else w.pods_with_proxy > 0
    mode = str(mtls.mode) + "".join(f", port {port} {m}" for port, m in sorted(mtls.ports.items()))
    return {"mtls": mode,
            "sidecar": sidecar, "describe": f"{w.pods_with_proxy} of {w.pods_total} pods with a sidecar, mTLS "
                                            f"{mtls.describe()}"}


def _notify(svc: Service, record: Any, state: GroupState, context: dict[str, Any]) -> None:
    """The service's own notification targets told what they asked for (never raises: see notify.py)."""
    from meshwave import notify

    dag_id = context["dag"].dag_id
    messages = notify.service_messages(record, state.states, state.errors, dag_id,
                                       notify.run_link(dag_id, context["run_id"]))
    notify.send(svc.settings.notify, messages, context)


def _outcome(prefix: str, resolve: Resolve, wave_error_task: str | None, key: Any):
    @task(task_id="outcome", trigger_rule=TriggerRule.ALL_DONE)
    def outcome(key: str, **context: Any) -> dict[str, Any]:
        state = GroupState(context, prefix)
        wave_error = (context["ti"].xcom_pull(task_ids=wave_error_task, key="error")
                      or context["ti"].xcom_pull(task_ids=wave_error_task, key="skipped")) if wave_error_task else None
        if wave_error:
            state.errors["wave"] = wave_error
        svc = state.service
        if svc is None:  # refused or never admitted: name it as well as the input allows
            with contextlib.suppress(ValueError):
                svc = resolve(context, key)
        dry_run = bool(context["params"].get("dry_run"))
        if state.service is not None and not dry_run:
            state.results = state.results.model_copy(update={"after_removal": _after_removal(state.service, state)})
        record = decisions.outcome(svc, state.results, state.states, state.errors, state.decisions, dry_run,
                                   state.approval)
        if state.service is not None and not dry_run:
            record = _settle_outcome(state.service, record, context)
            _release_lease(state.service, record, context)
        # plain JSON, as every reader has always had it (the outcome a string); they validate it back
        pushed = record.model_dump(mode="json")
        context["ti"].xcom_push(key="record", value=pushed)
        (log.warning if record.outcome.against_budget else log.info)(f"{record.service}: {record.outcome}: "
                                                                     f"{record.reason}")
        if state.service is not None and state.service.settings.notify and not dry_run:
            _notify(state.service, record, state, context)
        if record.outcome.red:
            raise AirflowFailException(f"{record.service}: {record.outcome}: {record.reason}")
        return pushed

    return outcome(key)


def service_group(group_id: str, resolve: Resolve, doc: str, keys: list[str] | XComArg, label: str, *,
                  guard: Guard | None = None, wave_error_task: str | None = None, approval_asked: bool = False,
                  canary_asked: bool = False) -> DAGNode:
    """Build the mapped service group in the current DAG context, one map index per entry of `keys`.

    `resolve(context, key)` gives the service at run time (a ValueError refuses it before any change);
    `guard(service, context)` may raise AirflowSkipException to keep it from starting (freeze, window), or a
    ValueError to refuse it before any change;
    `label` is the Jinja template that names a map index in the UI (rendered before each task runs);
    `approval_asked`: some service may need a person's approval before STRICT: the batch's approval task
    (approval.py) sits between the group's STRICT gates and its flips;
    `canary_asked`: some service may try its sidecar on a canary first (canary.py): the group starts its forward
    path with canary -> canary_soak -> remove_canary before the injection.
    """
    approval_task = approval.approval_task_id(group_id) if approval_asked else None

    @task_group(group_id=group_id, tooltip=doc.split("\n")[0][:200], doc_md=doc,
                default_args={"map_index_template": label})
    def services(key: str) -> None:
        prefix = group_id
        admit = _admit(prefix, resolve, guard, key)
        inject = _write_then_wait("inject", prefix, holding(_inject, _trial_seconds), "wait_rollout",
                                  _rollout_wait("wait_rollout", True, {"after": "wait_rollout"}),
                                  on_path(prefix, "inject", AFTER_CANARY if canary_asked else None), dry_rollout,
                                  {"after": "wait_rollout"}, **RETRIES)
        canary: list[Any] = []
        if canary_asked:
            canary = [_canary_task(prefix),
                      GateSensor(task_id="canary_soak", stage="canary_soak", watch=_gate_watch(prefix, "canary_soak"),
                                 decide=_canary_decides(prefix), on_path=on_path(prefix, "canary_soak"), **RETRIES),
                      _remove_canary_task(prefix)]
            chain(admit, *canary, inject)
        soak = GateSensor(task_id="soak", stage="soak", watch=_gate_watch(prefix, "soak"),
                          decide=_soak_decides(prefix), on_path=on_path(prefix, "soak"), **RETRIES)
        strict_gate = GateSensor(task_id="strict_gate", stage="strict_gate", watch=_gate_watch(prefix, "strict_gate"),
                                 decide=_gate_decides(prefix), batch=_batch_wait(prefix),
                                 on_path=on_path(prefix, "strict_gate"), **RETRIES)
        # STRICT not proven in force goes back to PERMISSIVE at once: a retry would only prolong it
        flip = _write_then_wait("flip_strict", prefix, holding(_flip, _unverified_seconds), "verify_strict",
                                _verify(prefix, "verify_strict"), approved_if_needed(prefix, approval_task),
                                lambda: dry_gate("verify_strict"), final=(NotInForce,), **RETRIES)
        # an undo waits for everything that could call for it, and runs when something did
        undo = {"trigger_rule": TriggerRule.ALL_DONE, **UNDO_RETRIES}
        back = _write_then_wait("back_to_permissive", prefix, undoing(_back), "verify_recovery",
                                _verify(prefix, "verify_recovery"), strict_undone_if_needed(prefix),
                                lambda: dry_gate("verify_recovery"), **undo)
        rollback = _write_then_wait("rollback_injection", prefix, undoing(_rollback), "wait_rollback",
                                    _rollout_wait("wait_rollback", False), rollback_if_chosen(prefix), dry_rollout,
                                    **undo)

        admit >> inject >> soak >> strict_gate >> flip >> back
        admit >> back
        [admit, inject, soak] >> rollback
        [admit, *canary, inject, soak, strict_gate, flip, back, rollback] >> _outcome(prefix, resolve, wave_error_task,
                                                                                      key)

    group = services.expand(key=keys)
    if approval_task is not None:
        _approval_between(group, group_id, approval_task)
    return group


def _approval_between(group: Any, group_id: str, task_id: str) -> None:
    """The batch's approval task, outside the mapped group, between its STRICT gates and its flips (a task outside
    a mapped group may sit between two of its tasks: each flip waits for it and its own gate)."""
    from meshwave.approval_task import StrictApproval  # the HITL operator: only in DAGs that ask for approval

    dag = group.dag
    approve = StrictApproval(task_id=task_id, group_id=group_id, doc_md=approval.__doc__)
    dag.get_task(f"{group_id}.strict_gate") >> approve >> dag.get_task(f"{group_id}.flip_strict")

