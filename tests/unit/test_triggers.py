"""The triggers: the sensors' constructor and serialize() are unchanged, a gate polls through a BatchingSource,
and a rollout found done at once is reported no sooner than the earliest event time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from meshwave import connections, triggers
from meshwave import prometheus as p
from meshwave.checks import Verdict
from meshwave.stages import Poll


def test_the_trigger_signatures_and_serialize_are_what_the_sensors_use() -> None:
    gate = triggers.GateTrigger("prom", "soak", {"namespace": "shop"}, {"breaches_to_fail": 2}, 5.0, 100.0, 60, 3)
    path, kwargs = gate.serialize()
    assert path == "meshwave.triggers.GateTrigger"
    assert kwargs == {"prometheus_conn_id": "prom", "stage": "soak", "params": {"namespace": "shop"},
                      "policy": {"breaches_to_fail": 2}, "poke_interval": 5.0, "started": 100.0, "min_seconds": 60,
                      "passes_to_pass": 3, "tracker": None}
    rollout = triggers.RolloutTrigger("kube", "lab", "shop", "auth", True, 3.0, 200.0)
    assert rollout.serialize()[1]["deadline"] == 200.0


def test_a_gate_polls_through_a_batching_source(monkeypatch: pytest.MonkeyPatch) -> None:
    inner = p.PrometheusSource("http://127.0.0.1:1", cluster="lab")
    seen: list[Any] = []

    async def connection(conn_id: str) -> str:
        return conn_id

    def evaluate(stage: str, source: Any, params: dict[str, Any]) -> Poll:
        seen.append(source)
        return Poll([Verdict("x", "pass", "ok")])

    monkeypatch.setattr(triggers.BaseHook, "aget_connection", connection)
    monkeypatch.setattr(connections, "prometheus_source", lambda conn: inner)  # imported by run()
    monkeypatch.setattr(triggers.stages, "evaluate", evaluate)
    gate = triggers.GateTrigger("prom", "soak", {}, {"breaches_to_fail": 2}, 1.0, 0.0, 0, 1)

    async def first_event() -> Any:
        async for event in gate.run():
            return event

    event = asyncio.run(first_event())
    assert event.payload["status"] == "pass"
    [source] = seen
    assert isinstance(source, p.BatchingSource) and source.inner is inner and source.cluster == "lab"
    assert source.bucket == 1.0, "never wider than the poke interval"


def test_a_rollout_done_at_once_is_reported_no_sooner_than_the_earliest_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler must have read the deferring worker's exit before the task comes back (apache/airflow#67287):
    an event found at the first poll waits until EARLIEST_EVENT_SECONDS after the trigger started."""

    class Done:
        status, message = "done", "1/1 updated, 1 ready"

        def to_dict(self) -> dict[str, Any]:
            return {"status": self.status}

    class Kube:
        def rollout(self, namespace: str, workload: str, expect_proxy: bool) -> Done:
            return Done()

    async def connection(conn_id: str) -> str:
        return conn_id

    monkeypatch.setattr(triggers.BaseHook, "aget_connection", connection)
    monkeypatch.setattr(connections, "mesh_kube", lambda conn, cluster: Kube())  # imported by run()
    monkeypatch.setattr(triggers, "EARLIEST_EVENT_SECONDS", 0.5)
    rollout = triggers.RolloutTrigger("kube", "lab", "shop", "auth", True, 3.0, time.time() + 60)

    async def first_event() -> tuple[Any, float]:
        async for event in rollout.run():
            return event, time.time()

    event, yielded = asyncio.run(first_event())
    assert event.payload["status"] == "done" and event.payload["message"] == "1/1 updated, 1 ready"
    assert yielded - event.payload["started"] >= 0.5, "held back until the earliest event time"
    assert event.payload["ended"] - event.payload["started"] < 0.5, "the record keeps when the rollout was seen done"
