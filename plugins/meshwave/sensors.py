"""Deferrable sensors: they hold no worker slot while they wait, and they return the outcome (as XCom)
instead of failing, so the branch after them decides what happens (continue, hold, roll back)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowException

from meshwave.triggers import GateTrigger, RolloutTrigger

MARGIN = 120  # seconds the task timeout leaves the trigger to report its own deadline


class _DeferringSensor(BaseSensorOperator):
    ui_color = "#e8f4fd"

    def __init__(self, *, wait_seconds: float, **kwargs: Any) -> None:
        super().__init__(timeout=wait_seconds + MARGIN, **kwargs)
        self.wait_seconds = wait_seconds

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not event:
            raise AirflowException(f"{self.task_id}: the trigger ended without an event")
        self.log.info("%s: %s: %s", self.task_id, event.get("status"), event.get("message") or event.get("reason"))
        return event


class RolloutSensor(_DeferringSensor):
    """Waits for a deployment's rollout: done, failed (fast, on OOMKilled or CrashLoopBackOff) or timeout."""

    template_fields = ("namespace", "workload")

    def __init__(self, *, kubernetes_conn_id: str, cluster: str, namespace: str, workload: str, expect_proxy: bool,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kubernetes_conn_id = kubernetes_conn_id
        self.cluster = cluster
        self.namespace = namespace
        self.workload = workload
        self.expect_proxy = expect_proxy

    def execute(self, context: Any) -> dict[str, Any] | None:
        if context["params"].get("dry_run"):
            return {"status": "done", "message": "dry run: nothing changed, nothing to wait for", "dry_run": True}
        self.defer(trigger=RolloutTrigger(self.kubernetes_conn_id, self.cluster, self.namespace, self.workload,
                                          self.expect_proxy, float(self.poke_interval),
                                          time.time() + self.wait_seconds),
                   method_name="execute_complete", timeout=timedelta(seconds=self.wait_seconds + MARGIN))
        return None


class GateSensor(_DeferringSensor):
    """Polls one stage's Prometheus checks until the gate passes, fails (N breaches in a row) or times out.

    `build_params(context)` gives the stage's parameters (baseline, callers...) from upstream XComs.
    """

    def __init__(self, *, prometheus_conn_id: str, stage: str, build_params: Callable[[Any], dict[str, Any]],
                 policy: dict[str, Any], min_seconds: float = 0, passes_to_pass: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prometheus_conn_id = prometheus_conn_id
        self.stage = stage
        self.build_params = build_params
        self.policy = policy
        self.min_seconds = min_seconds
        self.passes_to_pass = passes_to_pass

    def execute(self, context: Any) -> dict[str, Any] | None:
        if context["params"].get("dry_run"):
            return {"stage": self.stage, "status": "pass", "reason": "dry run: not checked", "dry_run": True}
        started = time.time()
        policy = {**self.policy, "deadline": started + self.wait_seconds}
        self.defer(trigger=GateTrigger(self.prometheus_conn_id, self.stage, self.build_params(context), policy,
                                       float(self.poke_interval), started, self.min_seconds, self.passes_to_pass),
                   method_name="execute_complete", timeout=timedelta(seconds=self.wait_seconds + MARGIN))
        return None
