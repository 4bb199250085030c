"""The canary's gate (stage `canary_soak`, canary.py): `judge_canary`.

The canary copy's own proxy's success rate and p99 against the primary's pods' live application metrics, and
the canary's restarts and OOMKills over its soak so far. Polled with stages.poll_params (`events_window`);
timing and policy from service_group._gate_watch; decided by decisions.canary_decision.
"""

from __future__ import annotations

from typing import Any

from meshwave.checks.reader import _error, _queries, _Reader, _Reading, _usable
from meshwave.checks.shared import _istio_success_verdict, _low_traffic, _oom_verdict, _p99_against, _restarts_verdict
from meshwave.checks.verdict import Outcome, Thresholds, Verdict, _fmt
from meshwave.prometheus import Source, validate_window, window_seconds


def judge_canary(source: Source, namespace: str, workload: str, canary: str, window: str | int,
                 thresholds: Thresholds | None = None, cluster: str | None = None,
                 events_window: str | int | None = None) -> list[Verdict]:
    """The canary against its primary, live, over the same window: the canary's success rate and p99 as its own
    proxy reports them (what the proxy fails itself never reaches the application) against those of the primary's
    pods (their application's metrics); the canary's restarts and OOMKills over its soak so far (`events_window`).
    The primary is judged on its own pods only: the canary's carry the same `app` label."""
    th = thresholds or Thresholds()
    primary = _Reader(source, namespace, workload, window, cluster)
    own = _Reader(source, namespace, canary, window, cluster)
    events = validate_window(events_window, "events_window") if events_window is not None else own.window
    count = primary.read("deployment_app_request_count")
    restarts = own.read("container_restarts", window=events)
    return [_canary_success(own, primary, count, th), _canary_p99(own, primary, count, th),
            _restarts_verdict(restarts, th, events), _oom_verdict(own.read("oom_killed", window=events), restarts,
                                                                  events)]


def _canary_success(own: _Reader, primary: _Reader, count: _Reading, th: Thresholds) -> Verdict:
    reference = primary.read("deployment_app_success_rate")
    check = "canary_success_rate"
    if err := _error(check, "the primary's success rate readable", reference, count):
        return err
    # no count is a primary that served nothing here: too few requests to compare with, never a pass
    served = count.scalar if _usable(count.scalar) else 0.0
    return _istio_success_verdict(own, reference.scalar if _usable(reference.scalar) else None, th,
                                  window_seconds(own.window), served, "primary", check)


def _canary_p99(own: _Reader, primary: _Reader, count: _Reading, th: Thresholds) -> Verdict:
    check = "canary_latency_p99"
    p99, reference = own.read("istio_latency_p99_ms"), primary.read("deployment_app_latency_p99_ms")
    canary_count = own.read("istio_inbound_request_rate")
    expectation = (f"canary p99 not both > primary + {th.max_p99_increase_ms:g} ms and > {th.max_p99_ratio:g} x "
                   "primary")
    if err := _error(check, expectation, p99, reference, count, canary_count):
        return err
    current, base = p99.scalar, reference.scalar
    values: dict[str, Any] = {"p99_ms": current, "primary_p99_ms": base, "primary_requests": count.scalar}
    queries = _queries(p99, reference, count, canary_count)

    def verdict(outcome: Outcome, reason: str) -> Verdict:
        return Verdict(check, outcome, reason, values, expectation, queries)

    seen = canary_count.scalar * window_seconds(own.window) if _usable(canary_count.scalar) else None
    for who, n in (("the primary", count.scalar), ("the canary", seen)):
        if low := _low_traffic(n, th, own.window):
            return verdict(Outcome.NO_DATA, f"too little traffic to judge {who}: {low}")
    if not _usable(current) or not _usable(base):
        return verdict(Outcome.NO_DATA, f"p99 canary {_fmt(current)} ms, primary {_fmt(base)} ms")
    return verdict(*_p99_against(current, base, values, th, "canary p99", "primary"))
