"""Deferrable waits: the rollout of a workload, and Prometheus gates polled until they decide.

A wait ends its task in the triggerer (TaskSuccessEvent): no worker starts again to read what the trigger saw. The
event's XComs are the wait's result, under the step's name (`result_key`), and, for a wait that decides what
follows it (`decide`), the decision (decisions.py) under "decision".

Triggers run in the triggerer's event loop: blocking calls (the kubernetes client, prometheus-api-client)
go through `asyncio.to_thread`, connections are fetched with the async API, and nothing here writes
anything (a trigger may run twice). Every kwarg is JSON-safe so the trigger serializes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from airflow.sdk import BaseHook
from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from meshwave import decisions, stages
from meshwave.checks import BreachTracker, GatePolicy, GateStatus, Verdict
from meshwave.kube_errors import KubeError
from meshwave.prometheus import BatchingSource, bucket_seconds
from meshwave.results import GateEvent, GateExtra, RolloutResult, RolloutStatus

# A rollout that is already done fires the trigger within a second or two of the deferral. The scheduler may then
# re-queue the task before it has read the worker's exit from that deferral, and take that stale exit for a task
# changed externally: it fails the try (apache/airflow#67287, #72716; seen on a loaded 2-core machine, 58 times in
# one 50-service wave, 2 to 9 s after the deferral). Holding such an early event back closes most of that window.
EARLIEST_EVENT_SECONDS = 5.0
NEVER = 10**9  # "passes_to_pass" while a soak has not ended: a gate may fail early, never pass early
HISTORY_KEPT = 200  # polls' verdicts carried in the event, for the report (the newest)


def ended(result_key: str, event: RolloutResult | GateEvent, decide: dict[str, Any] | None) -> TaskSuccessEvent:
    """The event that ends the task with the wait's result (plain JSON, as a worker's push), and the decision after
    it when the wait makes one: `decide` names the step decided after ("wait_rollout", "soak", "strict_gate") with
    the facts it needs."""
    xcoms: dict[str, Any] = {result_key: event.model_dump(mode="json")}
    if decide is not None:
        after = decide["after"]
        if after == "wait_rollout" and isinstance(event, RolloutResult):
            to, why = decisions.rollout_decision(event)
        elif after == "soak" and isinstance(event, GateEvent):
            to, why = decisions.soak_decision(event, decisions.SoakFacts(
                strict=decide["strict"], action=decide["action"], on_no_data=decide["on_no_data"]))
        elif after == "wait_canary" and isinstance(event, RolloutResult):
            to, why = decisions.canary_rollout_decision(event)
        elif after == "canary_soak" and isinstance(event, GateEvent):
            to, why = decisions.canary_decision(event, decide["on_no_data"])
        elif after == "strict_gate" and isinstance(event, GateEvent):
            to, why = decisions.gate_decision(event)
        else:
            raise ValueError(f"no decision is made after {after!r} on a {type(event).__name__}")
        xcoms["decision"] = decisions.Decision(to=to, why=why).model_dump()
        if decide.get("candidate"):  # for the batch's approval: the service, its evidence and the gate's decision
            seen = [v.get("reason", "") for v in ((getattr(event, "result", None) or {}).get("verdicts") or [])]
            xcoms["candidate"] = {**decide["candidate"], "to": to, "why": "; ".join(seen) or why,
                                  "gate_ended": event.ended}
    return TaskSuccessEvent(xcoms=xcoms)


def poll_line(stage: str, elapsed: float, min_seconds: float, tracker: BreachTracker,
              verdicts: Sequence[Verdict]) -> str:
    """One poll as the task log shows it while the gate is deferred: where the wait is, each check's verdict and why,
    and the breaches counting towards a failure (so a soak's log is not empty until it decides)."""
    phase = f"{elapsed:.0f} of {min_seconds:.0f} s soaked" if elapsed < min_seconds else f"{elapsed:.0f} s"
    checks = "; ".join(f"{v.check} {v.outcome.value}: {v.reason}" for v in verdicts) or "no checks"
    needed = tracker.policy.breaches_to_fail
    counting = ", ".join(f"{check} {n}/{needed}" for check, n in sorted(tracker.breaches.items()))
    return f"{stage} poll {tracker.polls} ({phase}): {checks}" + (f" | breaches in a row: {counting}"
                                                                   if counting else "")


class RolloutTrigger(BaseTrigger):
    """Polls a deployment until its rollout is done or failed (OOMKilled, CrashLoopBackOff...) or the deadline."""

    def __init__(self, kubernetes_conn_id: str, cluster: str, namespace: str, workload: str, expect_proxy: bool,
                 poke_interval: float, deadline: float, result_key: str = "wait_rollout",
                 decide: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.result_key = result_key
        self.decide = decide
        self.kubernetes_conn_id = kubernetes_conn_id
        self.cluster = cluster
        self.namespace = namespace
        self.workload = workload
        self.expect_proxy = expect_proxy
        self.poke_interval = poke_interval
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("meshwave.triggers.RolloutTrigger", {
            "kubernetes_conn_id": self.kubernetes_conn_id, "cluster": self.cluster, "namespace": self.namespace,
            "workload": self.workload, "expect_proxy": self.expect_proxy, "poke_interval": self.poke_interval,
            "deadline": self.deadline, "result_key": self.result_key, "decide": self.decide})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from meshwave.connections import mesh_kube  # the kubernetes client: in the triggerer, not at parse time

        started = time.time()
        connection = await BaseHook.aget_connection(self.kubernetes_conn_id)
        kube = await asyncio.to_thread(mesh_kube, connection, self.cluster)
        last_error, last = "", ""
        while True:
            try:
                state = await asyncio.to_thread(kube.rollout, self.namespace, self.workload, self.expect_proxy)
                if state.status != "progressing":
                    done = time.time()
                    await asyncio.sleep(max(0.0, started + EARLIEST_EVENT_SECONDS - done))
                    yield self._end(RolloutResult(status=RolloutStatus(state.status), message=state.message,
                                                  state=state.to_dict(), started=started, ended=done))
                    return
                if state.message != last:  # each new state of the rollout, once: the log says where it is
                    self.log.info("%s: %s", self.result_key, state.message)
                last = state.message
            except KubeError as exc:  # transient: keep polling until the deadline
                last_error = str(exc)
                last = f"error: {exc}"
            if time.time() >= self.deadline:
                yield self._end(RolloutResult(
                    status=RolloutStatus.TIMEOUT if not last_error else RolloutStatus.ERROR,
                    message=f"rollout not finished by the deadline: {last}", started=started, ended=time.time()))
                return
            await asyncio.sleep(self.poke_interval)

    def _end(self, event: RolloutResult) -> TriggerEvent:
        self.log.info("%s: %s: %s", self.result_key, event.status.value, event.message)
        return ended(self.result_key, event, self.decide)


class GateTrigger(BaseTrigger):
    """Evaluates one stage's Prometheus checks every poke until the gate decides.

    - fails as soon as a breach is confirmed (N consecutive polls; one poll for a restart or an OOMKill, counted
      over the soak so far), even during the soak;
    - passes only after `min_seconds` (the soak) and K consecutive all-pass polls;
    - at `deadline` ends no_data / error / inconclusive, keeping those apart.
    """

    def __init__(self, prometheus_conn_id: str, stage: str, params: dict[str, Any], policy: dict[str, Any],
                 poke_interval: float, started: float, min_seconds: float, passes_to_pass: int = 1,
                 tracker: dict[str, Any] | None = None, decide: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.decide = decide
        self.prometheus_conn_id = prometheus_conn_id
        self.stage = stage
        self.params = params
        self.policy = policy
        self.poke_interval = poke_interval
        self.started = started
        self.min_seconds = min_seconds
        self.passes_to_pass = passes_to_pass
        self.tracker = tracker

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("meshwave.triggers.GateTrigger", {
            "prometheus_conn_id": self.prometheus_conn_id, "stage": self.stage, "params": self.params,
            "policy": self.policy, "poke_interval": self.poke_interval, "started": self.started,
            "min_seconds": self.min_seconds, "passes_to_pass": self.passes_to_pass, "tracker": self.tracker,
            "decide": self.decide})

    def _tracker(self, state: dict[str, Any] | None, soaking: bool) -> BreachTracker:
        policy = {**self.policy, "passes_to_pass": NEVER if soaking else self.passes_to_pass}
        if state is None:
            return BreachTracker(GatePolicy.from_dict(policy))
        return BreachTracker.from_dict({**state, "policy": policy})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from meshwave.connections import prometheus_source

        connection = await BaseHook.aget_connection(self.prometheus_conn_id)
        # Every gate of this triggerer shares one batched query per check and bucket (see BatchingSource).
        source = BatchingSource(await asyncio.to_thread(prometheus_source, connection),
                                bucket_seconds(self.poke_interval))
        state = self.tracker
        while True:
            now = time.time()
            tracker = self._tracker(state, soaking=now < self.started + self.min_seconds)
            params = stages.poll_params(self.stage, self.params, now - self.started)
            poll = await asyncio.to_thread(stages.evaluate, self.stage, source, params)
            result = tracker.feed(poll.verdicts, now)
            state = tracker.to_dict()
            self.log.info("%s", poll_line(self.stage, now - self.started, self.min_seconds, tracker, poll.verdicts))
            if result.decided:
                extra = {}
                if result.status is GateStatus.PASS:
                    extra = await asyncio.to_thread(stages.on_pass, self.stage, source, self.params)
                self.log.info("%s: %s: %s", self.stage, result.status.value, result.reason)
                yield ended(self.stage, GateEvent(
                    stage=self.stage, status=result.status, reason=result.reason, polls=result.polls,
                    result=result.to_dict(), extra=GateExtra.model_validate({**poll.extra, **extra}),
                    history=state["history"][-HISTORY_KEPT:], started=self.started, ended=time.time()),
                    self.decide)
                return
            await asyncio.sleep(self.poke_interval)
