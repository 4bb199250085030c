"""Deferrable waits: they hold no worker slot while they wait, and their trigger ends the task with the wait's
result (and the decision after it) as XComs, instead of failing, so what follows reads what happened (continue,
hold, roll back). No worker starts again to resume the task.

What to watch is resolved at run time (`watch(context)`), from the service the group admitted: the same
wait serves a wave's planned service and an ad-hoc run's service from the trigger form. A step that writes and
then waits (inject, flip_strict, the undos) raises `rollout_deferral` / `gate_deferral` itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import TaskDeferred

from meshwave.checks import GateStatus
from meshwave.results import GateEvent, RolloutResult
from meshwave.triggers import GateTrigger, RolloutTrigger, ended

MARGIN = 120  # seconds the deferral timeout leaves the trigger to report its own deadline


@dataclass(frozen=True)
class RolloutWatch:
    kubernetes_conn_id: str
    cluster: str
    namespace: str
    workload: str
    wait_seconds: float
    poke_interval: float


@dataclass(frozen=True)
class GateWatch:
    prometheus_conn_id: str
    params: dict[str, Any]
    policy: dict[str, Any]
    wait_seconds: float
    poke_interval: float
    min_seconds: float = 0


@dataclass(frozen=True)
class BatchWait:
    """Batch-mates still rolling out (`pending`, a description), to wait for at most `wait_seconds`."""

    pending: str
    wait_seconds: float
    poke_interval: float


def rollout_deferral(w: RolloutWatch, expect_proxy: bool, result_key: str,
                     decide: dict[str, Any] | None = None) -> TaskDeferred:
    """Wait for the rollout in the triggerer, which ends the task (`method_name` is never called)."""
    return TaskDeferred(trigger=RolloutTrigger(w.kubernetes_conn_id, w.cluster, w.namespace, w.workload, expect_proxy,
                                               float(w.poke_interval), time.time() + w.wait_seconds, result_key,
                                               decide),
                        method_name="execute", timeout=timedelta(seconds=w.wait_seconds + MARGIN))


def gate_deferral(w: GateWatch, stage: str, passes_to_pass: int = 1,
                  decide: dict[str, Any] | None = None) -> TaskDeferred:
    """Poll one stage's Prometheus checks in the triggerer until the gate decides; the trigger ends the task."""
    started = time.time()
    policy = {**w.policy, "deadline": started + w.wait_seconds}
    return TaskDeferred(trigger=GateTrigger(w.prometheus_conn_id, stage, w.params, policy, float(w.poke_interval),
                                            started, w.min_seconds, passes_to_pass, decide=decide),
                        method_name="execute", timeout=timedelta(seconds=w.wait_seconds + MARGIN))


def push_ended(context: Any, result_key: str, event: RolloutResult | GateEvent, decide: dict[str, Any] | None) -> None:
    """What a trigger would have ended the task with, pushed by the worker (a dry run waits for nothing)."""
    for key, value in (ended(result_key, event, decide).xcoms or {}).items():
        context["ti"].xcom_push(key=key, value=value)


class GateSensor(BaseSensorOperator):
    """Polls one stage's Prometheus checks until the gate passes, fails (N breaches in a row) or times out.

    `on_path(context)`, when given, runs first: it raises AirflowSkipException when this service's path does not
    go through the gate (see service_group.py). `decide(context)` gives what the decision after the gate needs.
    `batch(context)`, when given, names the batch-mates to wait for first: the gate starts when their rollouts have
    finished (or their wait has run out), so that `watch` sees when the last of them ended."""

    ui_color = "#e8f4fd"

    def __init__(self, *, stage: str, watch: Callable[[Any], GateWatch],
                 decide: Callable[[Any], dict[str, Any]], on_path: Callable[[Any], None],
                 batch: Callable[[Any], BatchWait | None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        self.watch = watch
        self.decide = decide
        self.on_path = on_path
        self.batch = batch

    def execute(self, context: Any, event: Any = None, waiting_since: float | None = None) -> dict[str, Any] | None:
        self.on_path(context)
        if context["params"].get("dry_run"):
            return self.dry_run(context)
        if self.batch is not None and (b := self.batch(context)) is not None:
            since = float(waiting_since or time.time())
            if time.time() - since < b.wait_seconds:
                # The states are read here, in the worker, between timer deferrals: a late batch-mate is rare
                self.log.info("%s: waiting for the batch's other rollouts: %s", self.task_id, b.pending)
                self.defer(trigger=DateTimeTrigger(datetime.now(UTC) + timedelta(seconds=b.poke_interval)),
                           method_name="execute", kwargs={"waiting_since": since})
            self.log.warning("%s: starting after %.0fs while %s: their plaintext, if they call this service, keeps "
                             "it PERMISSIVE", self.task_id, time.time() - since, b.pending)
        raise gate_deferral(self.watch(context), self.stage, decide=self.decide(context))

    def dry_run(self, context: Any) -> None:
        """Nothing was changed, so nothing is checked: the gate passes and says so, and decides as after a pass."""
        push_ended(context, self.stage, dry_gate(self.stage), self.decide(context))


def dry_gate(stage: str) -> GateEvent:
    """A dry run's gate: it passes, unchecked, and says so (nothing was changed, so nothing is checked)."""
    return GateEvent(stage=stage, status=GateStatus.PASS, reason="dry run: not checked", dry_run=True)
