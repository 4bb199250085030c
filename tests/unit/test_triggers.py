"""The triggers: the sensors' constructor and serialize() are unchanged, a gate polls through a BatchingSource,
and a rollout found done at once is reported no sooner than the earliest event time."""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

import pytest

from meshwave import checks as c
from meshwave import connections, stages, triggers
from meshwave import prometheus as p
from meshwave.checks import Verdict
from meshwave.plan import Settings
from meshwave.stages import Poll


def test_the_trigger_signatures_and_serialize_are_what_the_sensors_use() -> None:
    gate = triggers.GateTrigger("prom", "soak", {"namespace": "shop"}, {"breaches_to_fail": 2}, 5.0, 100.0, 60, 3)
    path, kwargs = gate.serialize()
    assert path == "meshwave.triggers.GateTrigger"
    assert kwargs == {"prometheus_conn_id": "prom", "stage": "soak", "params": {"namespace": "shop"},
                      "policy": {"breaches_to_fail": 2}, "poke_interval": 5.0, "started": 100.0, "min_seconds": 60,
                      "passes_to_pass": 3, "tracker": None, "decide": None}
    rollout = triggers.RolloutTrigger("kube", "lab", "shop", "auth", True, 3.0, 200.0, "wait_rollout",
                                      {"after": "wait_rollout"})
    assert rollout.serialize()[1]["deadline"] == 200.0 and rollout.serialize()[1]["decide"] == {"after": "wait_rollout"}


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
    decide = {"after": "soak", "strict": True, "action": "migrate", "on_no_data": "hold"}
    gate = triggers.GateTrigger("prom", "soak", {}, {"breaches_to_fail": 2}, 1.0, 0.0, 0, 1, decide=decide)

    async def first_event() -> Any:
        async for event in gate.run():
            return event

    event = asyncio.run(first_event())
    # the trigger ends the task: its result and the decision after it, as XComs (no worker resumes it)
    assert isinstance(event, triggers.TaskSuccessEvent) and event.xcoms["soak"]["status"] == "pass"
    assert event.xcoms["decision"]["to"] == "strict_gate"
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

    ended, yielded = asyncio.run(first_event())
    event = ended.xcoms["wait_rollout"]
    assert "decision" not in ended.xcoms, "no decision asked for"
    assert event["status"] == "done" and event["message"] == "1/1 updated, 1 ready"
    assert yielded - event["started"] >= 0.5, "held back until the earliest event time"
    assert event["ended"] - event["started"] < 0.5, "the record keeps when the rollout was seen done"


# ---- the soak's gate on a simulated clock, against a stand-in Prometheus (finding 11) ---------------------------
T0 = 1_000_020.0  # the soak's start: a whole number of scrape intervals and of 2 s buckets
SCRAPE = 15.0     # kube-state-metrics scraped every 15 s
POD = "payment-5d8f7-x7k2p"
SENTINEL = "987654s"


class StandIn:
    """A Prometheus with a healthy payment whose app container is OOMKilled at `ooms` (seconds into the soak).

    Restart counters are scraped every SCRAPE seconds and each range query sees the samples inside its own range,
    as Prometheus does: the per-workload and batched forms of queries.yaml are recognised with their window."""

    def __init__(self, clock: list[float], ooms: tuple[float, ...]) -> None:
        self.clock, self.ooms = clock, [T0 + t for t in ooms]
        self.cluster, self.timeout, self.identity = None, 5.0, ("stand-in", str(id(self)))
        self.forms = self._forms()
        self.queries: list[str] = []

    @staticmethod
    def _forms() -> list[tuple[re.Pattern[str], str, p.BatchSpec | None]]:
        forms = []
        for name, t in p.load_queries().items():
            plain = t.render(namespace="shop", workload="payment", window=SENTINEL)
            forms.append((re.compile(re.escape(plain).replace(SENTINEL, r"(\d+)s")), name, None))
            if t.batch is not None:
                batch = t.batch.render(window=SENTINEL)
                forms.append((re.compile(re.escape(batch).replace(SENTINEL, r"(\d+)s")), name, t.batch))
        return forms

    def instant(self, query: str, at: float | None = None) -> list[p.Sample]:
        self.queries.append(query)
        now = self.clock[0] if at is None else at
        for pattern, name, batch in self.forms:
            if match := pattern.fullmatch(query):
                window = match.groups()  # an instant query (memory) has none
                samples = self._answer(name, now, float(window[0]) if window else 0.0)
                if batch is not None:
                    extra = {batch.namespace_label: "shop", batch.workload_label: "payment"}
                    samples = [p.Sample({**s.labels, **extra}, s.value, s.timestamp) for s in samples]
                return samples
        return []

    def _restarts(self, now: float, seconds: float) -> float:
        """max - min of the counter over the scrapes inside (now - seconds, now]."""
        first = math.floor((now - seconds) / SCRAPE + 1) * SCRAPE
        scrapes = [first + i * SCRAPE for i in range(int((now - first) // SCRAPE) + 1)]
        counts = [sum(1 for t in self.ooms if t <= s) for s in scrapes]
        return max(counts) - min(counts) if counts else 0.0

    def _answer(self, name: str, now: float, seconds: float) -> list[p.Sample]:
        labels = {"namespace": "shop", "pod": POD}
        healthy = {"app_success_rate": 1.0, "app_request_rate": 40.0, "app_request_count": 40.0 * seconds,
                   "app_latency_p50_ms": 6.0, "app_latency_p99_ms": 14.0, "sidecar_memory_bytes": 80.0 * 2**20,
                   "sidecar_memory_limit_bytes": 1024.0 * 2**20, "istio_success_rate": 1.0,
                   "istio_inbound_request_rate": 40.0}
        if name in healthy:
            return [p.Sample({}, healthy[name], now)]
        restarts = {"payment": self._restarts(now, seconds), "istio-proxy": 0.0}
        if name == "container_restarts":
            return [p.Sample({**labels, "container": c}, n, now) for c, n in restarts.items()]
        if name == "oom_killed" and any(t <= now for t in self.ooms) and restarts["payment"] > 0:
            return [p.Sample({**labels, "container": "payment"}, 1.0, now)]
        return []


def soak(monkeypatch: pytest.MonkeyPatch, settings: Settings, ooms: tuple[float, ...]) -> dict[str, Any]:
    """The soak's GateTrigger.run as the GateSensor defers it for these settings, on a simulated clock."""
    clock = [T0]
    standin = StandIn(clock, ooms)
    real_sleep = asyncio.sleep

    async def connection(conn_id: str) -> str:
        return conn_id

    async def sleep(seconds: float, result: Any = None) -> Any:
        clock[0] += seconds
        await real_sleep(0)
        return result

    monkeypatch.setattr(triggers.BaseHook, "aget_connection", connection)
    monkeypatch.setattr(connections, "prometheus_source", lambda conn: standin)  # imported by run()
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr(asyncio, "sleep", sleep)
    window = f"{settings.query_window_seconds}s"
    params = {"namespace": "shop", "workload": "payment", "window": window,
              "thresholds": c.Thresholds(**settings.thresholds.model_dump(), min_requests=settings.min_requests)
              .to_dict(),
              "baseline": c.Baseline("shop", "payment", window, success_rate=1.0, request_rate=40.0,
                                     request_count=40.0 * settings.query_window_seconds, p50_ms=6.0,
                                     p99_ms=14.0).to_dict()}
    policy = {"breaches_to_fail": settings.breaches_to_fail, "default": {"on_no_data": "wait", "on_error": "wait"},
              "deadline": T0 + settings.soak_seconds + settings.verify_seconds}
    gate = triggers.GateTrigger("prom", "soak", params, policy, float(settings.poke_interval_seconds), T0,
                                settings.soak_seconds)

    async def first_event() -> Any:
        async for event in gate.run():
            return event

    payload = asyncio.run(first_event()).xcoms["soak"]
    payload["seconds"] = clock[0] - T0
    return payload


REVIEWED = Settings(soak_seconds=300, poke_interval_seconds=30, query_window_seconds=60, breaches_to_fail=3)


@pytest.mark.parametrize("settings", [pytest.param(REVIEWED, id="review-300-30-60-3"),
                                      pytest.param(Settings(), id="plan-defaults")])
def test_two_oomkills_during_a_soak_fail_it(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    event = soak(monkeypatch, settings, ooms=(100.0, 220.0))
    assert event["status"] == "fail", event["reason"]
    assert event["seconds"] < 100 + 2 * SCRAPE + settings.poke_interval_seconds, "at the first poll that sees it"
    assert set(event["result"]["failed"]) == {"restarts", "oom_killed"}
    assert "an event: confirmed at once" in event["reason"] and "OOMKilled and restarted in" in event["reason"]


@pytest.mark.parametrize("settings", [pytest.param(REVIEWED, id="review-300-30-60-3"),
                                      pytest.param(Settings(), id="plan-defaults")])
def test_a_soak_without_events_passes_after_the_whole_soak(monkeypatch: pytest.MonkeyPatch,
                                                            settings: Settings) -> None:
    event = soak(monkeypatch, settings, ooms=())
    assert event["status"] == "pass", event["reason"]
    assert settings.soak_seconds <= event["seconds"] < settings.soak_seconds + settings.poke_interval_seconds


def test_an_oomkill_just_after_the_last_poll_of_a_window_is_still_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """An event older than one query window at every poll after it (the gap between polls is longer than the
    window) is found by the range over the whole soak."""
    settings = Settings(soak_seconds=300, poke_interval_seconds=120, query_window_seconds=30, breaches_to_fail=1)
    event = soak(monkeypatch, settings, ooms=(10.0,))
    assert event["status"] == "fail", event["reason"]
    assert event["seconds"] == 120


def test_the_events_window_covers_the_soak_so_far_plus_one_query_window() -> None:
    assert stages.events_window("60s", 0) == "60s"
    assert stages.events_window("60s", 95.5) == "180s"
    assert stages.events_window("15s", 3) == "30s"
    assert stages.poll_params("soak", {"window": "60s"}, 300) == {"window": "60s", "events_window": "360s"}
    assert stages.poll_params("strict_gate", {"window": "60s"}, 300) == {"window": "60s"}


def test_each_poll_of_a_soak_is_in_the_log_with_its_verdicts_and_the_breaches_counting(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The log of a deferred soak is not empty until it decides: every poll says where the soak is and what each
    check saw (the trigger's logger is Airflow's structlog, which writes the lines out; the triggerer puts them in
    the task's log)."""
    settings = Settings(soak_seconds=300, poke_interval_seconds=30, query_window_seconds=60, breaches_to_fail=3)
    event = soak(monkeypatch, settings, ooms=())
    lines = re.findall(r"soak poll \d+ .*", capsys.readouterr().out)
    assert event["status"] == "pass" and len(lines) == event["polls"] == 11, (len(lines), event["polls"])
    assert lines[0].startswith("soak poll 1 (0 of 300 s soaked): app_request_rate pass: "), lines[0]
    assert lines[-1].startswith("soak poll 11 (300 s): "), lines[-1]
    assert all("app_success_rate pass: success rate 1.00 >= baseline 1.00 - 0.02" in line and
               "app_latency_p99 pass: p99 14.0 ms" in line for line in lines), lines[0]
    assert not any("breaches in a row" in line for line in lines)


def test_a_poll_line_counts_the_breaches_towards_the_failure() -> None:
    tracker = c.BreachTracker(c.GatePolicy(breaches_to_fail=3))
    verdicts = [Verdict("success_rate", "fail", "0.900 < 0.980"), Verdict("p99_latency", "pass", "14 ms")]
    tracker.feed(verdicts, 10.0)
    tracker.feed(verdicts, 40.0)
    line = triggers.poll_line("strict_gate", 40.0, 0.0, tracker, verdicts)
    assert line == ("strict_gate poll 2 (40 s): success_rate fail: 0.900 < 0.980; p99_latency pass: 14 ms"
                    " | breaches in a row: success_rate 2/3")
