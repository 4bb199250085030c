"""Issue 13, items 1 and 3 (safety review findings 1 and 8): the soak sees what the new proxy fails itself, and the
STRICT gate counts plaintext since the sidecar came, so a caller that calls in bursts is never missed."""

from __future__ import annotations

import json
import re

import pytest

from meshwave import checks as c
from meshwave import prometheus as p
from meshwave import stages
from meshwave.checks import Outcome
from tests.unit.test_checks import NS, WIN, WL, FakeSource, baseline, by_check, healthy, plaintext


# ---- the soak: Istio's destination-side success rate -----------------------------------------------------------
def test_failures_the_new_proxy_generates_fail_the_soak_when_the_app_sees_nothing_wrong() -> None:
    """15 % failed by the new proxy (503 UF): the app's rate is within max_traffic_drop, its success rate 1.0."""
    src = healthy().set("app_request_rate", 34.0).set("istio_success_rate", 0.85)
    verdicts = by_check(c.verify_after_injection(src, baseline(), NS, WL, WIN))
    assert verdicts["app_request_rate"].outcome is Outcome.PASS
    assert verdicts["app_success_rate"].outcome is Outcome.PASS
    verdict = verdicts["istio_success_rate"]
    assert verdict.outcome is Outcome.FAIL
    assert verdict.reason == "success rate 0.85 < baseline 1.00 - 0.02"
    assert verdict.values["baseline"] == 1.0 and verdict.values["requests"] == 400.0  # 40/s x 10 s


@pytest.mark.parametrize("rate, count, why", [
    (None, 40.0, "success rate is none"),
    (1.0, None, "too little traffic to judge"),
    (1.0, 0.5, "too little traffic to judge: 5 requests in 10s"),
])
def test_the_soak_s_istio_success_rate_without_data_never_passes(rate: float | None, count: float | None,
                                                                 why: str) -> None:
    src = healthy().set("istio_success_rate", rate).set("istio_inbound_request_rate", count)
    verdict = by_check(c.verify_after_injection(src, baseline(), NS, WL, WIN))["istio_success_rate"]
    assert verdict.outcome is Outcome.NO_DATA and why in verdict.reason


def test_the_baseline_s_own_request_count_gates_the_comparison() -> None:
    verdict = by_check(c.verify_after_injection(healthy().set("istio_success_rate", 0.5),
                                                baseline(request_count=3.0), NS, WL, WIN))["istio_success_rate"]
    assert verdict.outcome is Outcome.NO_DATA and "the baseline saw only 3 requests" in verdict.reason


def test_one_definition_of_success_counts_5xx_code_0_and_every_response_flag_as_failure() -> None:
    template = p.load_queries()["istio_success_rate"]
    for promql in (template.promql, template.batch.promql):  # type: ignore[union-attr]
        good = re.findall(r'istio_requests_total\{[^}]*response_code!~"5\.\.\|0", response_flags="-"', promql)
        assert len(good) == 1, promql


# ---- the STRICT gate: a lookback since the sidecar --------------------------------------------------------------
LOOKBACK = "330s"


def test_the_gate_counts_plaintext_over_its_lookback_not_one_window() -> None:
    src = FakeSource().set("istio_inbound_request_rate", 40.0)
    src.set("plaintext_http_requests", plaintext(45.0), window=LOOKBACK)  # one burst, minutes ago
    assert c.strict_gate(src, NS, WL, WIN)[0].outcome is Outcome.PASS, "one window: nothing seen (the old gate)"
    verdict, callers = c.strict_gate(src, NS, WL, WIN, lookback=LOOKBACK)
    assert verdict.outcome is Outcome.FAIL
    assert verdict.reason == ("plaintext into shop/auth in the last 330s: unknown (a caller without sidecar) http 45 "
                              "requests in the last 330s")
    assert callers == [c.Caller("unknown", "unknown", "http", 45.0 / 330, 45.0, LOOKBACK)]
    assert 'offset 330s' in verdict.queries["plaintext_http_requests"]
    assert "[10s]" in verdict.queries["istio_inbound_request_rate"], "the proof of traffic is today's window"


def test_a_long_lived_plaintext_connection_is_seen_by_its_bytes() -> None:
    src = FakeSource().set("istio_inbound_tcp_rate", 0.5)
    src.set("plaintext_tcp_bytes", plaintext(66000.0, "etl", "jobs"), window=LOOKBACK)
    src.set("plaintext_tcp_connections", plaintext(0.0, "etl", "jobs"), window=LOOKBACK)  # opened long ago
    verdict, callers = c.strict_gate(src, NS, WL, WIN, lookback=LOOKBACK)
    assert verdict.outcome is Outcome.FAIL and [caller.protocol for caller in callers] == ["tcp_bytes"]
    assert "jobs/etl tcp 6.6e+04 bytes in the last 330s" in verdict.reason


def test_plaintext_callers_round_trip_with_their_totals() -> None:
    caller = c.Caller("unknown", "unknown", "tcp", 0.01, 3.0, LOOKBACK)
    assert c.Caller.from_dict(caller.to_dict()) == caller
    assert c.Caller.from_dict({"namespace": "a", "workload": "b", "protocol": "http", "rate": 2.0}) == \
        c.Caller("a", "b", "http", 2.0), "records written before the lookback still read"


@pytest.mark.parametrize("sidecar, elapsed, expected", [
    (0.0, 0.0, "15s"),          # never less than the query window
    (95.0, 0.0, "95s"),         # the soak before the gate
    (97.0, 201.0, "300s"),      # and the gate so far, rounded up to a 5 s step
])
def test_the_lookback_reaches_back_to_the_sidecar(sidecar: float, elapsed: float, expected: str) -> None:
    params = {"namespace": NS, "workload": WL, "window": "15s", "sidecar_seconds": sidecar}
    assert stages.poll_params("strict_gate", params, elapsed)["lookback"] == expected
    assert "lookback" not in stages.poll_params("verify_strict", params, elapsed)


def test_the_sidecar_s_age_comes_from_the_soak_then_the_rollout_then_the_plan() -> None:
    """From when every pod had its sidecar: plaintext from a caller's pods while they rolled beside it is not
    counted (a caller and its callee migrated in one batch)."""
    now = 10_000.0
    assert stages.sidecar_seconds(now - 100, now - 105, 60, now) == 100
    assert stages.sidecar_seconds(None, now - 105, 60, now) == 105
    assert stages.sidecar_seconds(None, None, 60, now) == 60
    assert stages.sidecar_seconds(now + 5, None, 60, now) == 60, "a clock from the future is not trusted"


class Bursts:
    """A Prometheus where one caller without a sidecar sends 45 plaintext requests in a 3 s burst every 90 s (at
    0, 90, 180 ... s): each plaintext query answers with what its own range holds at the poll's time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pattern = re.compile(r"offset (\d+)s\)|\[(\d+)s\]\)\)$")

    def instant(self, query: str) -> list[p.Sample]:
        if query.startswith("sum(rate("):
            return [p.Sample({}, 40.0)]  # the inbound rates: steady mTLS traffic, the gate's positive proof
        if "connection_security_policy!=" not in query or "istio_requests_total" not in query:
            return []
        seconds = float(next(g for g in self.pattern.search(query).groups() if g))  # type: ignore[union-attr]
        bursts = sum(1 for start in range(0, 100_000, 90) if self.now - seconds < start + 1.5 <= self.now)
        return plaintext(45.0 * bursts)


def test_a_caller_that_calls_every_90_s_keeps_the_gate_failing_at_every_poll() -> None:
    """Finding 8's reproduction (window 60 s, poke 30 s): the old gate passed at its third poll, in a gap."""
    prom, window, soak = Bursts(), "60s", 300.0
    one_window, lookback = [], []
    for poll in range(8):
        prom.now = soak + 10 + 30 * poll  # the gate starts 10 s after the last burst of the soak
        one_window.append(c.strict_gate(prom, NS, WL, window)[0].outcome)
        params = stages.poll_params("strict_gate", {"namespace": NS, "workload": WL, "window": window,
                                                    "sidecar_seconds": soak}, 30.0 * poll)
        lookback.append(c.strict_gate(prom, NS, WL, window, lookback=params["lookback"])[0].outcome)
    assert Outcome.PASS in one_window, "one query window misses the caller between its bursts"
    assert set(lookback) == {Outcome.FAIL}


# ---- a late batch-mate (a killed worker delayed its rollout) ----------------------------------------------------
def test_a_batch_mate_that_rolled_out_later_moves_the_count_s_start_past_its_plaintext() -> None:
    """cart soaked from now - 100; frontend, its caller in the same batch, was delayed by a killed worker and had its
    sidecar only 40 s ago: its plaintext until then is left out (plus the margin), and the gate may not pass before
    it has counted a soak's length (60 s) from there."""
    now = 10_000.0
    sidecar = stages.sidecar_seconds(now - 100, None, 60, now, batch_ended=now - 40)
    assert sidecar == 40 - stages.BATCH_MARGIN_SECONDS
    assert stages.strict_gate_hold(sidecar, 60) == 60 - sidecar
    # a batch-mate done before this service's soak changes nothing but the margin
    early = stages.sidecar_seconds(now - 100, None, 60, now, batch_ended=now - 200)
    assert early == 100 and stages.strict_gate_hold(early, 60) == 0
    assert stages.sidecar_seconds(now - 100, None, 60, now, batch_ended=now + 5) == 100, "future clock"


def test_the_batch_mates_are_the_other_map_indexes_of_the_injection() -> None:
    from meshwave.service_group import batch_mates, unfinished

    states = {"batch_1.inject_0": "up_for_retry", "batch_1.inject_1": None,
              "batch_1.inject_2": "success", "batch_1.inject_3": "upstream_failed",
              "batch_1.inject_10": "deferred", "batch_1.soak_0": "running", "batch_10.inject_4": None}
    mates = batch_mates(states, "batch_1.inject", own_map_index=1)
    assert mates == {0: "up_for_retry", 2: "success", 3: "upstream_failed", 10: "deferred"}
    assert unfinished(mates) == [0, 10]


def rolled_out(at: float) -> dict[str, object]:
    return {"status": "done", "message": "rolled out", "ended": at}


class _RolloutEnds:
    """A task instance whose injections' rollout waits ended at `ended` (map index -> time; None: still waiting), read
    as Airflow 3.3 does: a pull without map indexes is one request for all of them, and a lone value comes bare;
    what a trigger pushed comes JSON-encoded (see group_state.decoded)."""

    def __init__(self, own: int, ended: dict[int, float | None]) -> None:
        self.map_index, self.ended, self.requests = own, ended, 0

    def xcom_pull(self, task_ids: str, key: str, **kwargs: object) -> object:
        self.requests += 1
        assert task_ids == "batch_1.inject" and key == "wait_rollout"
        if "map_indexes" in kwargs:  # this service's own
            at = self.ended[kwargs["map_indexes"]]
            return None if at is None else json.dumps(rolled_out(at))
        values = [json.dumps(rolled_out(at)) for at in self.ended.values() if at is not None]
        return values[0] if len(values) == 1 else values or None


def test_the_last_batch_mate_s_rollout_end_is_read_in_one_request_and_leaves_this_service_s_own_out() -> None:
    from meshwave.service_group import _batch_ended

    late = _RolloutEnds(own=0, ended={0: 500.0, 1: 400.0, 2: 450.0, 3: None})
    assert _batch_ended({"ti": late}, "batch_1") == 450.0 and late.requests == 2, "own 500 is not a batch-mate's"
    twin = _RolloutEnds(own=1, ended={0: 400.0, 1: 400.0})  # a mate that ended at the same instant still counts
    assert _batch_ended({"ti": twin}, "batch_1") == 400.0
    alone = _RolloutEnds(own=0, ended={0: 500.0, 1: None})  # the lone value, bare: only this service's own
    assert _batch_ended({"ti": alone}, "batch_1") is None
    nothing = _RolloutEnds(own=0, ended={0: None, 1: None})
    assert _batch_ended({"ti": nothing}, "batch_1") is None


def test_the_strict_gate_waits_for_late_batch_mates_then_starts_without_them() -> None:
    """While a batch-mate rolls out, the gate defers on a timer and looks again; past the wait it starts anyway (the
    late caller's plaintext then keeps the service PERMISSIVE: fail closed)."""
    import time

    from airflow.providers.standard.triggers.temporal import DateTimeTrigger
    from airflow.sdk.exceptions import TaskDeferred

    from meshwave.sensors import BatchWait, GateSensor, GateWatch
    from meshwave.triggers import GateTrigger

    looks: list[int] = []

    def batch(context: object) -> BatchWait:
        looks.append(1)
        return BatchWait("map index 0 (up_for_retry)", 300.0, 15.0)

    watch = GateWatch("prom", {"namespace": NS}, {"breaches_to_fail": 2}, 60.0, 5.0)
    decide, on_path = (lambda c: {"after": "strict_gate"}), (lambda c: None)
    sensor = GateSensor(task_id="strict_gate", stage="strict_gate", watch=lambda c: watch, batch=batch, decide=decide,
                        on_path=on_path)
    context = {"params": {}}
    with pytest.raises(TaskDeferred) as waiting:
        sensor.execute(context)
    assert isinstance(waiting.value.trigger, DateTimeTrigger) and waiting.value.method_name == "execute"
    since = waiting.value.kwargs["waiting_since"]
    with pytest.raises(TaskDeferred) as still:
        sensor.execute(context, event=None, waiting_since=since)
    assert isinstance(still.value.trigger, DateTimeTrigger) and still.value.kwargs == {"waiting_since": since}
    with pytest.raises(TaskDeferred) as gate:
        sensor.execute(context, event=None, waiting_since=time.time() - 301)
    assert isinstance(gate.value.trigger, GateTrigger) and gate.value.trigger.decide == {"after": "strict_gate"}
    assert len(looks) == 3
    none_late = GateSensor(task_id="strict_gate", stage="strict_gate", watch=lambda c: watch, batch=lambda c: None,
                           decide=decide, on_path=on_path)
    with pytest.raises(TaskDeferred) as at_once:
        none_late.execute(context)
    assert isinstance(at_once.value.trigger, GateTrigger)
