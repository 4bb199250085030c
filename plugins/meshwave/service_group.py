"""One service's task group: the same group in a wave DAG and in the ad-hoc DAG (one code path).

    preflight -> baseline -> inject -> wait_rollout -> after_rollout
      after_rollout: soak | rollback_after_rollout | not_started
      soak -> after_soak: strict_gate | rollback_after_soak | hold_permissive
      strict_gate -> after_strict_gate: flip_strict | stay_permissive
      flip_strict -> verify_strict -> after_strict: strict_done | back_to_permissive -> verify_recovery
      rollback_after_* -> rollback_injection -> wait_rollback
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
from airflow.sdk.exceptions import AirflowFailException

from meshwave import decisions, steps
from meshwave.changes import Change
from meshwave.connections import mesh_kube, prometheus_source
from meshwave.kube import KubeError
from meshwave.sensors import GateSensor, RolloutSensor
from meshwave.steps import Service

BRANCHES = ("after_rollout", "after_soak", "after_strict_gate", "after_strict")
STEPS = ("preflight", "baseline", "inject", "wait_rollout", "soak", "strict_gate", "flip_strict", "verify_strict",
         "back_to_permissive", "verify_recovery", "rollback_injection", "wait_rollback")
NEVER = 10**9
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=5)}


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


def service_group(svc: Service, group_id: str, wave_error_task: str | None = None) -> TaskGroup:
    """Build the group in the current DAG context; returns it (its first task is `preflight`)."""
    p, s = svc.plan, svc.settings
    poke = s.poke_interval_seconds
    doc = (f"**{p.key}** ({p.criticality}): inject ({s.injection} label), soak {s.soak_seconds}s, verify against "
           f"its baseline, then {'STRICT mTLS once no plaintext caller is left' if p.strict else 'stay PERMISSIVE'}"
           f"; rollback on {s.breaches_to_fail} breaches in a row; on no data: {s.on_no_data}.")
    with TaskGroup(group_id, tooltip=doc, doc_md=doc) as group:
        prefix = group.group_id

        @task(task_id="preflight", **RETRIES)
        def preflight(**context: Any) -> dict[str, Any]:
            with recording(context):
                return logged(steps.preflight(svc, kube_for(svc, context), prometheus_for(svc)))

        @task(task_id="baseline", **RETRIES)
        def baseline(**context: Any) -> dict[str, Any]:
            with recording(context):
                return steps.baseline(svc, prometheus_for(svc))

        @task(task_id="inject", **RETRIES)
        def inject(**context: Any) -> dict[str, Any]:
            with recording(context):
                return logged(steps.inject(svc, kube_for(svc, context)))

        wait_rollout = RolloutSensor(task_id="wait_rollout", kubernetes_conn_id=svc.cluster.kubernetes_conn_id,
                                     cluster=p.cluster, namespace=p.namespace, workload=p.workload,
                                     expect_proxy=True, wait_seconds=s.rollout_timeout_seconds,
                                     poke_interval=min(poke, 3), **RETRIES)

        def soak_params(context: dict[str, Any]) -> dict[str, Any]:
            return {"namespace": p.namespace, "workload": p.workload, "window": svc.window,
                    "thresholds": svc.thresholds(), "baseline": _xcom(context, prefix, "baseline")["baseline"]}

        soak = GateSensor(task_id="soak", prometheus_conn_id=svc.cluster.prometheus_conn_id, stage="soak",
                          build_params=soak_params, policy=svc.gate_policy(), min_seconds=s.soak_seconds,
                          wait_seconds=s.soak_seconds + s.verify_seconds, poke_interval=poke, **RETRIES)

        def gate_params(context: dict[str, Any]) -> dict[str, Any]:
            return {"namespace": p.namespace, "workload": p.workload, "window": svc.window,
                    "thresholds": svc.thresholds()}

        # Plaintext callers may drain: they never "confirm" a failure; the gate waits until its timeout.
        strict_gate = GateSensor(task_id="strict_gate", prometheus_conn_id=svc.cluster.prometheus_conn_id,
                                 stage="strict_gate", build_params=gate_params,
                                 policy={**svc.gate_policy(), "breaches_to_fail": NEVER},
                                 wait_seconds=s.strict_gate_timeout_seconds, poke_interval=poke, **RETRIES)

        @task(task_id="flip_strict", **RETRIES)
        def flip_strict(**context: Any) -> dict[str, Any]:
            with recording(context):
                return logged(steps.set_mtls(svc, kube_for(svc, context), "STRICT"))

        def verify_params(context: dict[str, Any]) -> dict[str, Any]:
            gate = _xcom(context, prefix, "strict_gate").get("extra", {})
            own = _xcom(context, prefix, "baseline").get("baseline", {}).get("success_rate")
            return {**gate_params(context), "callers": gate.get("callers", []),
                    "inbound_before": gate.get("inbound_before"),
                    "success_before": {f"{p.namespace}/{p.workload}": own} if own is not None else None}

        verify_strict = GateSensor(task_id="verify_strict", prometheus_conn_id=svc.cluster.prometheus_conn_id,
                                   stage="verify_strict", build_params=verify_params, policy=svc.gate_policy(),
                                   min_seconds=s.verify_seconds, wait_seconds=2 * s.verify_seconds,
                                   poke_interval=poke, **RETRIES)

        @task(task_id="back_to_permissive", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS, retries=5,
              retry_delay=timedelta(seconds=3))
        def back_to_permissive(**context: Any) -> dict[str, Any]:
            with recording(context):
                return logged(steps.set_mtls(svc, kube_for(svc, context), "PERMISSIVE"))

        verify_recovery = GateSensor(task_id="verify_recovery", prometheus_conn_id=svc.cluster.prometheus_conn_id,
                                     stage="verify_recovery", build_params=verify_params,
                                     policy={**svc.gate_policy(), "breaches_to_fail": NEVER},
                                     wait_seconds=s.verify_seconds, poke_interval=poke, **RETRIES)

        @task(task_id="rollback_injection", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS, retries=5,
              retry_delay=timedelta(seconds=3))
        def rollback_injection(**context: Any) -> dict[str, Any]:
            with recording(context):
                return logged(steps.rollback_injection(svc, kube_for(svc, context)))

        wait_rollback = RolloutSensor(task_id="wait_rollback", kubernetes_conn_id=svc.cluster.kubernetes_conn_id,
                                      cluster=p.cluster, namespace=p.namespace, workload=p.workload,
                                      expect_proxy=False, wait_seconds=s.rollout_timeout_seconds,
                                      poke_interval=min(poke, 3), **RETRIES)

        @task(task_id="outcome", trigger_rule=TriggerRule.ALL_DONE)
        def outcome(**context: Any) -> dict[str, Any]:
            state = GroupState(context, prefix)
            wave_error = context["ti"].xcom_pull(task_ids=wave_error_task, key="error") if wave_error_task else None
            if wave_error:
                state.errors["wave"] = wave_error
            record = decisions.outcome(svc, state.results, state.states, state.errors, state.decisions,
                                       bool(context["params"].get("dry_run")))
            context["ti"].xcom_push(key="record", value=record)
            print(f"{p.key}: {record['outcome']}: {record['reason']}")
            if record["outcome"] in ("rolled_back", "blocked", "failed"):
                raise AirflowFailException(f"{p.key}: {record['outcome']}: {record['reason']}")
            return record

        markers = {name: EmptyOperator(task_id=name) for name in (
            decisions.NOT_STARTED, decisions.HOLD, decisions.STAY, decisions.STRICT_DONE,
            decisions.ROLLBACK_AFTER_ROLLOUT, decisions.ROLLBACK_AFTER_SOAK)}

        after_rollout = _branch("after_rollout", prefix,
                                lambda g: decisions.after_rollout(g.results, g.states, g.errors))
        after_soak = _branch("after_soak", prefix, lambda g: decisions.after_soak(svc, g.results, g.states))
        after_gate = _branch("after_strict_gate", prefix, lambda g: decisions.after_strict_gate(g.results, g.states))
        after_strict = _branch("after_strict", prefix, lambda g: decisions.after_strict(svc, g.results, g.states))

        rollback = rollback_injection()
        back = back_to_permissive()
        flip = flip_strict()
        preflight() >> baseline() >> inject() >> wait_rollout >> after_rollout
        after_rollout >> [soak, markers[decisions.ROLLBACK_AFTER_ROLLOUT], markers[decisions.NOT_STARTED]]
        soak >> after_soak >> [strict_gate, markers[decisions.ROLLBACK_AFTER_SOAK], markers[decisions.HOLD]]
        strict_gate >> after_gate >> [flip, markers[decisions.STAY]]
        flip >> verify_strict >> after_strict >> [markers[decisions.STRICT_DONE], back]
        back >> verify_recovery
        [markers[decisions.ROLLBACK_AFTER_ROLLOUT], markers[decisions.ROLLBACK_AFTER_SOAK]] >> rollback
        rollback >> wait_rollback
        ends = [markers[decisions.NOT_STARTED], markers[decisions.HOLD], markers[decisions.STAY],
                markers[decisions.STRICT_DONE], verify_recovery, wait_rollback]
        ends >> outcome()
    return group
