"""One service's task group: the same group in a wave DAG and in the ad-hoc DAG (one code path).

    admit: resolve the service (the plan, or the trigger form), refuse bad input, apply the guards
      (freeze, maintenance window), route by action: preflight | to_permissive | to_remove
    preflight -> baseline -> inject -> wait_rollout -> after_rollout
      after_rollout: soak | rollback_after_rollout | not_started
      soak -> after_soak: strict_gate | rollback_after_soak | hold_permissive
      strict_gate -> after_strict_gate: flip_strict | stay_permissive
      flip_strict -> verify_strict -> after_strict: strict_done | back_to_permissive -> verify_recovery
      rollback_after_* | to_remove -> rollback_injection -> wait_rollback
      to_permissive -> back_to_permissive -> verify_recovery
      every end -> outcome (records the final state and why; red when rolled back, blocked or failed)

Waits are deferrable sensors (no worker slot while soaking); cluster changes read before they write.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import BaseHook, TaskGroup, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from meshwave import decisions, steps
from meshwave.changes import Change
from meshwave.connections import mesh_kube, prometheus_source
from meshwave.kube import KubeError
from meshwave.sensors import GateSensor, GateWatch, RolloutSensor, RolloutWatch
from meshwave.steps import ACTIONS, Service

BRANCHES = ("after_rollout", "after_soak", "after_strict_gate", "after_strict")
STEPS = ("admit", "preflight", "baseline", "inject", "wait_rollout", "soak", "strict_gate", "flip_strict",
         "verify_strict", "back_to_permissive", "verify_recovery", "rollback_injection", "wait_rollback")
NEVER = 10**9
TO_PERMISSIVE, TO_REMOVE = "to_permissive", "to_remove"
ROUTES = {"migrate": "preflight", "inject_only": "preflight", "strict_only": "preflight",
          "permissive": TO_PERMISSIVE, "remove_sidecar": TO_REMOVE}
Resolve = Callable[[dict[str, Any]], Service]
Guard = Callable[[Service, dict[str, Any]], None]
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=5)}
# Every task may be retried: a worker that dies or an API that times out must not decide a migration.
# A refusal (AirflowFailException) is never retried.
DEFAULT_ARGS = {"owner": "meshwave", **RETRIES}


def kube_for(svc: Service, context: dict[str, Any]) -> Any:
    connection = BaseHook.get_connection(svc.cluster.kubernetes_conn_id)
    return mesh_kube(connection, svc.plan.cluster, svc.cluster.root_namespace,
                     dry_run=bool(context["params"].get("dry_run")))


def prometheus_for(svc: Service) -> Any:
    return prometheus_source(BaseHook.get_connection(svc.cluster.prometheus_conn_id))


def logged(result: dict[str, Any]) -> dict[str, Any]:
    """Print every change of a step in its task log, with the exact request (what a dry run would send)."""
    for data in result.get("changes", []):
        change = Change.from_dict(data)
        print(change.summary())
        if change.request is not None and (change.applied or change.dry_run):
            print(f"    {change.request.describe()} {json.dumps(change.request.body, sort_keys=True)}")
    return result


@contextlib.contextmanager
def recording(context: dict[str, Any]) -> Iterator[None]:
    """Keep a failed step's error for the outcome; a Blocked service or a refused change is not retried."""
    try:
        yield
    except steps.Blocked as exc:
        context["ti"].xcom_push(key="error", value=f"blocked: {exc}")
        raise AirflowFailException(str(exc)) from None
    except (KubeError, ValueError) as exc:
        context["ti"].xcom_push(key="error", value=str(exc))
        if isinstance(exc, ValueError) or getattr(exc, "code", None) in (400, 403, 404, 409, 415, 422):
            raise AirflowFailException(str(exc)) from None
        raise
    except Exception as exc:
        context["ti"].xcom_push(key="error", value=f"{type(exc).__name__}: {exc}")
        raise


class GroupState:
    """What a group's tasks left behind, read by its branches and its outcome."""

    def __init__(self, context: dict[str, Any], prefix: str) -> None:
        ti = context["ti"]
        self.prefix = prefix
        self.results = {s: ti.xcom_pull(task_ids=f"{prefix}.{s}") for s in STEPS}
        self.errors = {s: e for s in STEPS if (e := ti.xcom_pull(task_ids=f"{prefix}.{s}", key="error"))}
        self.decisions: dict[str, str] = {}
        for b in BRANCHES:
            d = ti.xcom_pull(task_ids=f"{prefix}.{b}", key="decision")
            if d:
                self.decisions[b], self.decisions[f"{b}_to"] = d["why"], d["to"]
        found = ti.get_task_states(dag_id=ti.dag_id, task_group_id=prefix, run_ids=[ti.run_id]).get(ti.run_id, {})
        self.states = {tid.removeprefix(f"{prefix}."): st for tid, st in found.items()}
        admitted = ti.xcom_pull(task_ids=f"{prefix}.admit", key="service")
        self.service = Service.from_dict(admitted) if admitted else None


def _branch(name: str, prefix: str, decide: Callable[[GroupState], tuple[str, str]]):
    @task.branch(task_id=name, trigger_rule=TriggerRule.NONE_SKIPPED)
    def branch(**context: Any) -> str:
        to, why = decide(GroupState(context, prefix))
        context["ti"].xcom_push(key="decision", value={"to": to, "why": why})
        print(f"{name}: -> {to}: {why}")
        return f"{prefix}.{to}"

    return branch()


def _xcom(context: dict[str, Any], prefix: str, step: str) -> dict[str, Any]:
    return context["ti"].xcom_pull(task_ids=f"{prefix}.{step}") or {}




def _service(context: dict[str, Any], prefix: str) -> Service:
    """The service the group's `admit` task resolved (every later task runs on exactly that)."""
    data = context["ti"].xcom_pull(task_ids=f"{prefix}.admit", key="service")
    if not data:
        raise AirflowFailException(f"{prefix}: no admitted service (the admit task did not run or was refused)")
    return Service.from_dict(data)


def _admit(prefix: str, resolve: Resolve, guard: Guard | None):
    @task.branch(task_id="admit")
    def admit(**context: Any) -> str:
        """Resolve the service, refuse bad input, apply the guards, route by action. Changes nothing."""
        ti = context["ti"]
        try:
            svc = resolve(context)
        except ValueError as exc:
            ti.xcom_push(key="error", value=f"refused: {exc}")
            raise AirflowFailException(f"refused before any change: {exc}") from None
        if guard is not None:
            try:
                guard(svc, context)
            except AirflowSkipException as exc:
                ti.xcom_push(key="error", value=str(exc))
                print(f"{svc.plan.key}: not started: {exc}")
                raise
        ti.xcom_push(key="service", value=svc.to_dict())
        print(f"{svc.plan.key}: {ACTIONS[svc.action]}; settings: {svc.settings.model_dump_json()}")
        return f"{prefix}.{ROUTES[svc.action]}"

    return admit()


def _rollout_watch(prefix: str) -> Callable[[dict[str, Any]], RolloutWatch]:
    def watch(context: dict[str, Any]) -> RolloutWatch:
        svc = _service(context, prefix)
        return RolloutWatch(svc.cluster.kubernetes_conn_id, svc.plan.cluster, svc.plan.namespace, svc.plan.workload,
                            svc.settings.rollout_timeout_seconds, min(svc.settings.poke_interval_seconds, 3))

    return watch


def _gate_watch(prefix: str, stage: str) -> Callable[[dict[str, Any]], GateWatch]:
    """Each stage's parameters, policy and timing, from the admitted service and upstream XComs."""

    def watch(context: dict[str, Any]) -> GateWatch:
        svc = _service(context, prefix)
        s, p = svc.settings, svc.plan
        params: dict[str, Any] = {"namespace": p.namespace, "workload": p.workload, "window": svc.window,
                                  "thresholds": svc.thresholds()}
        policy, wait, minimum = svc.gate_policy(), float(s.verify_seconds), 0.0
        if stage == "soak":
            params["baseline"] = _xcom(context, prefix, "baseline")["baseline"]
            wait, minimum = s.soak_seconds + s.verify_seconds, s.soak_seconds
        elif stage == "strict_gate":  # plaintext callers may drain: they never "confirm" a failure
            policy, wait = {**policy, "breaches_to_fail": NEVER}, s.strict_gate_timeout_seconds
        else:  # verify_strict, verify_recovery: whom STRICT could hurt, as the gate saw them
            gate = _xcom(context, prefix, "strict_gate").get("extra", {})
            own = _xcom(context, prefix, "baseline").get("baseline", {}).get("success_rate")
            params.update(callers=gate.get("callers", []), inbound_before=gate.get("inbound_before"),
                          success_before={f"{p.namespace}/{p.workload}": own} if own is not None else None)
            if stage == "verify_strict":
                wait, minimum = 2 * s.verify_seconds, s.verify_seconds
            else:
                policy = {**policy, "breaches_to_fail": NEVER}
        return GateWatch(svc.cluster.prometheus_conn_id, params, policy, wait, s.poke_interval_seconds, minimum)

    return watch


def _step(name: str, prefix: str, run: Callable[[Service, dict[str, Any]], dict[str, Any]], **kwargs: Any):
    @task(task_id=name, **(kwargs or RETRIES))
    def step(**context: Any) -> dict[str, Any]:
        with recording(context):
            return run(_service(context, prefix), context)

    return step()


def _outcome(prefix: str, resolve: Resolve, wave_error_task: str | None):
    @task(task_id="outcome", trigger_rule=TriggerRule.ALL_DONE)
    def outcome(**context: Any) -> dict[str, Any]:
        state = GroupState(context, prefix)
        wave_error = context["ti"].xcom_pull(task_ids=wave_error_task, key="error") if wave_error_task else None
        if wave_error:
            state.errors["wave"] = wave_error
        svc = state.service
        if svc is None:  # refused or never admitted: name it as well as the input allows
            with contextlib.suppress(ValueError):
                svc = resolve(context)
        record = decisions.outcome(svc, state.results, state.states, state.errors, state.decisions,
                                   bool(context["params"].get("dry_run")))
        context["ti"].xcom_push(key="record", value=record)
        print(f"{record['service']}: {record['outcome']}: {record['reason']}")
        if record["outcome"] in decisions.RED:
            raise AirflowFailException(f"{record['service']}: {record['outcome']}: {record['reason']}")
        return record

    return outcome()


def service_group(group_id: str, resolve: Resolve, doc: str, *, guard: Guard | None = None,
                  wave_error_task: str | None = None) -> TaskGroup:
    """Build one service's group in the current DAG context.

    `resolve(context)` gives the service at run time (a ValueError refuses the run before any change);
    `guard(service, context)` may raise AirflowSkipException to keep it from starting (freeze, window).
    """
    with TaskGroup(group_id, tooltip=doc.split("\n")[0][:200], doc_md=doc) as group:
        prefix = group.group_id

        admit = _admit(prefix, resolve, guard)
        preflight = _step("preflight", prefix, lambda svc, c: logged(steps.preflight(svc, kube_for(svc, c),
                                                                                     prometheus_for(svc))))
        baseline = _step("baseline", prefix, lambda svc, c: steps.baseline(svc, prometheus_for(svc)))
        inject = _step("inject", prefix, lambda svc, c: logged(steps.inject(svc, kube_for(svc, c))))
        wait_rollout = RolloutSensor(task_id="wait_rollout", watch=_rollout_watch(prefix), expect_proxy=True,
                                     **RETRIES)
        soak = GateSensor(task_id="soak", stage="soak", watch=_gate_watch(prefix, "soak"), **RETRIES)
        strict_gate = GateSensor(task_id="strict_gate", stage="strict_gate", watch=_gate_watch(prefix, "strict_gate"),
                                 **RETRIES)
        flip = _step("flip_strict", prefix, lambda svc, c: logged(steps.set_mtls(svc, kube_for(svc, c), "STRICT")))
        verify_strict = GateSensor(task_id="verify_strict", stage="verify_strict",
                                   watch=_gate_watch(prefix, "verify_strict"), **RETRIES)
        undo = {"trigger_rule": TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS, "retries": 5,
                "retry_delay": timedelta(seconds=3)}
        back = _step("back_to_permissive", prefix,
                     lambda svc, c: logged(steps.set_mtls(svc, kube_for(svc, c), "PERMISSIVE")), **undo)
        verify_recovery = GateSensor(task_id="verify_recovery", stage="verify_recovery",
                                     watch=_gate_watch(prefix, "verify_recovery"), **RETRIES)
        rollback = _step("rollback_injection", prefix,
                         lambda svc, c: logged(steps.rollback_injection(svc, kube_for(svc, c))), **undo)
        wait_rollback = RolloutSensor(task_id="wait_rollback", watch=_rollout_watch(prefix), expect_proxy=False,
                                      **RETRIES)

        markers = {name: EmptyOperator(task_id=name) for name in (
            TO_PERMISSIVE, TO_REMOVE, decisions.NOT_STARTED, decisions.HOLD, decisions.STAY, decisions.STRICT_DONE,
            decisions.ROLLBACK_AFTER_ROLLOUT, decisions.ROLLBACK_AFTER_SOAK)}
        after_rollout = _branch("after_rollout", prefix,
                                lambda g: decisions.after_rollout(g.results, g.states, g.errors))
        after_soak = _branch("after_soak", prefix, lambda g: decisions.after_soak(g.service, g.results, g.states))
        after_gate = _branch("after_strict_gate", prefix, lambda g: decisions.after_strict_gate(g.results, g.states))
        after_strict = _branch("after_strict", prefix,
                               lambda g: decisions.after_strict(g.service, g.results, g.states))

        admit >> [preflight, markers[TO_PERMISSIVE], markers[TO_REMOVE]]
        preflight >> baseline >> inject >> wait_rollout >> after_rollout
        after_rollout >> [soak, markers[decisions.ROLLBACK_AFTER_ROLLOUT], markers[decisions.NOT_STARTED]]
        soak >> after_soak >> [strict_gate, markers[decisions.ROLLBACK_AFTER_SOAK], markers[decisions.HOLD]]
        strict_gate >> after_gate >> [flip, markers[decisions.STAY]]
        flip >> verify_strict >> after_strict >> [markers[decisions.STRICT_DONE], back]
        markers[TO_PERMISSIVE] >> back >> verify_recovery
        [markers[decisions.ROLLBACK_AFTER_ROLLOUT], markers[decisions.ROLLBACK_AFTER_SOAK], markers[TO_REMOVE]] \
            >> rollback >> wait_rollback
        ends = [markers[decisions.NOT_STARTED], markers[decisions.HOLD], markers[decisions.STAY],
                markers[decisions.STRICT_DONE], verify_recovery, wait_rollback]
        ends >> _outcome(prefix, resolve, wave_error_task)
    return group
