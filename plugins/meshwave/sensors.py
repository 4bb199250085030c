"""Deferrable sensors: they hold no worker slot while they wait, and they return the outcome (as XCom)
instead of failing, so the branch after them decides what happens (continue, hold, roll back).

What to watch is resolved at run time (`watch(context)`), from the service the group admitted: the same
sensor serves a wave's planned service and an ad-hoc run's service from the trigger form.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowException

from meshwave.triggers import GateTrigger, RolloutTrigger

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


class _DeferringSensor(BaseSensorOperator):
    """`on_path(context)`, when given, runs first: it raises AirflowSkipException when this service's path does
    not go through the sensor (see service_group.py)."""

    ui_color = "#e8f4fd"

    def __init__(self, *, on_path: Callable[[Any], None] | None = None, **kwargs: Any) -> None:
        super().__init__(poke_interval=kwargs.pop("poke_interval", 5), **kwargs)
        self.on_path = on_path

    def check_path(self, context: Any) -> None:
        if self.on_path is not None:
            self.on_path(context)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not event:
            raise AirflowException(f"{self.task_id}: the trigger ended without an event")
        self.log.info("%s: %s: %s", self.task_id, event.get("status"), event.get("message") or event.get("reason"))
        return event


class RolloutSensor(_DeferringSensor):
    """Waits for a deployment's rollout: done, failed (fast, on OOMKilled or CrashLoopBackOff) or timeout."""

    def __init__(self, *, watch: Callable[[Any], RolloutWatch], expect_proxy: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.watch = watch
        self.expect_proxy = expect_proxy

    def execute(self, context: Any) -> dict[str, Any] | None:
        self.check_path(context)
        if context["params"].get("dry_run"):
            return {"status": "done", "message": "dry run: nothing changed, nothing to wait for", "dry_run": True}
        w = self.watch(context)
        self.defer(trigger=RolloutTrigger(w.kubernetes_conn_id, w.cluster, w.namespace, w.workload, self.expect_proxy,
                                          float(w.poke_interval), time.time() + w.wait_seconds),
                   method_name="execute_complete", timeout=timedelta(seconds=w.wait_seconds + MARGIN))
        return None


class GateSensor(_DeferringSensor):
    """Polls one stage's Prometheus checks until the gate passes, fails (N breaches in a row) or times out.

    `batch(context)`, when given, names the batch-mates to wait for first: the gate starts when their rollouts have
    finished (or their wait has run out), so that `watch` sees when the last of them ended."""

    def __init__(self, *, stage: str, watch: Callable[[Any], GateWatch], passes_to_pass: int = 1,
                 batch: Callable[[Any], BatchWait | None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        self.watch = watch
        self.passes_to_pass = passes_to_pass
        self.batch = batch

    def execute(self, context: Any, event: Any = None, waiting_since: float | None = None) -> dict[str, Any] | None:
        self.check_path(context)
        if context["params"].get("dry_run"):
            return {"stage": self.stage, "status": "pass", "reason": "dry run: not checked", "dry_run": True}
        if self.batch is not None and (b := self.batch(context)) is not None:
            since = float(waiting_since or time.time())
            if time.time() - since < b.wait_seconds:
                # The states are read here, in the worker, between timer deferrals: a late batch-mate is rare
                self.log.info("%s: waiting for the batch's other rollouts: %s", self.task_id, b.pending)
                self.defer(trigger=DateTimeTrigger(datetime.now(UTC) + timedelta(seconds=b.poke_interval)),
                           method_name="execute", kwargs={"waiting_since": since})
            self.log.warning("%s: starting after %.0fs while %s: their plaintext, if they call this service, keeps "
                             "it PERMISSIVE", self.task_id, time.time() - since, b.pending)
        w = self.watch(context)
        started = time.time()
        policy = {**w.policy, "deadline": started + w.wait_seconds}
        self.defer(trigger=GateTrigger(w.prometheus_conn_id, self.stage, w.params, policy, float(w.poke_interval),
                                       started, w.min_seconds, self.passes_to_pass),
                   method_name="execute_complete", timeout=timedelta(seconds=w.wait_seconds + MARGIN))
        return None
