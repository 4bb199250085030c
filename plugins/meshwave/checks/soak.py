"""The soak's gate (stage `soak`, after injection): `verify_after_injection`.

The application's request rate, success rate and p99 against its baseline, the Istio destination-side success
rate (what the new proxy failed itself never reaches the app), restarts and OOMKills over the soak so far,
and the sidecar's memory. Polled with stages.poll_params (`events_window`); timing and policy from
service_group._gate_watch; decided by decisions.soak_decision.
"""

from __future__ import annotations

from typing import Any

from meshwave.checks.baseline import Baseline
from meshwave.checks.reader import _error, _queries, _Reader, _Reading, _usable
from meshwave.checks.shared import (
    _istio_success_verdict,
    _low_traffic,
    _oom_verdict,
    _p99_against,
    _restarts_verdict,
    _success_verdict,
)
from meshwave.checks.verdict import EPSILON, MI, Outcome, Thresholds, Verdict, _fmt
from meshwave.prometheus import Source, validate_window, window_seconds


def verify_after_injection(source: Source, baseline: Baseline, namespace: str, workload: str, window: str | int,
                           thresholds: Thresholds | None = None, cluster: str | None = None,
                           events_window: str | int | None = None) -> list[Verdict]:
    """App request rate, app success rate and p99 against the baseline, the Istio destination-side success rate
    (proxy-generated failures included) against the baseline success rate, restarts, OOMKilled, sidecar memory.

    Restarts and OOMKills are events, counted over `events_window` (the soak so far plus one query window, see
    stages.events_window; default: `window`): an event seen once stays in every later poll of the soak.
    """
    th = thresholds or Thresholds()
    reader = _Reader(source, namespace, workload, window, cluster)
    events = validate_window(events_window, "events_window") if events_window is not None else reader.window
    count = reader.read("app_request_count")
    success, p50, p99 = reader.read("app_success_rate"), reader.read("app_latency_p50_ms"), \
        reader.read("app_latency_p99_ms")
    restarts, oom = reader.read("container_restarts", window=events), reader.read("oom_killed", window=events)
    sidecar, limit = reader.read("sidecar_memory_bytes"), reader.read("sidecar_memory_limit_bytes")
    return [
        _traffic_verdict(reader.read("app_request_rate"), baseline.request_rate, th),
        _success_verdict("app_success_rate", success, count, baseline.success_rate, baseline.request_count, th,
                         reader.window),
        # What the new proxy failed itself (response flags) never reaches the app: only its own reports show it.
        _istio_success_verdict(reader, baseline.success_rate, th, window_seconds(reader.window),
                               baseline.request_count, "baseline"),
        _p99_verdict(p99, p50, count, baseline, th, reader.window),
        _restarts_verdict(restarts, th, events),
        _oom_verdict(oom, restarts, events),
        _sidecar_memory_verdict(sidecar, limit, th),
    ]


def _traffic_verdict(rate: _Reading, before: float | None, th: Thresholds) -> Verdict:
    """Requests refused by the new proxy never reach the application: its success rate stays 1.0 while its
    request rate falls. The rate is compared with the baseline's (safety review finding 1)."""
    check = "app_request_rate"
    floor = None if not _usable(before) else before * (1 - th.max_traffic_drop)  # type: ignore[operator]
    expectation = f"request rate >= (1 - {th.max_traffic_drop:g}) x baseline {_fmt(before)}/s"
    if err := _error(check, expectation, rate):
        return err
    current = rate.scalar
    values = {"request_rate": current, "baseline": before, "floor": floor}
    if floor is None or not before:
        return Verdict(check, Outcome.NO_DATA, f"no request rate before injection to compare with ({_fmt(before)})",
                       values, expectation, _queries(rate))
    if not _usable(current):
        return Verdict(check, Outcome.NO_DATA, f"no request rate in the window ({_fmt(current)})", values,
                       expectation, _queries(rate))
    lost = current + EPSILON < floor  # type: ignore[operator]
    reason = (f"request rate {current:.3g}/s {'<' if lost else '>='} {1 - th.max_traffic_drop:g} x baseline "
              f"{before:.3g}/s" + (": requests are lost before they reach the application" if lost else ""))
    return Verdict(check, Outcome.FAIL if lost else Outcome.PASS, reason, values, expectation, _queries(rate))


def _p99_verdict(p99: _Reading, p50: _Reading, count: _Reading, baseline: Baseline, th: Thresholds,
                 window: str) -> Verdict:
    check = "app_latency_p99"
    base = baseline.p99_ms
    expectation = (f"p99 not both > baseline + {th.max_p99_increase_ms:g} ms and > {th.max_p99_ratio:g} x baseline "
                   f"(baseline {_fmt(base)} ms)")
    if err := _error(check, expectation, p99, p50, count):
        return err
    current = p99.scalar
    values: dict[str, Any] = {"p99_ms": current, "p50_ms": p50.scalar, "requests": count.scalar,
                              "baseline_p99_ms": base, "baseline_p50_ms": baseline.p50_ms}
    queries = _queries(p99, p50, count)

    def verdict(outcome: Outcome, reason: str) -> Verdict:
        return Verdict(check, outcome, reason, values, expectation, queries)

    if low := _low_traffic(count.scalar, th, window):
        return verdict(Outcome.NO_DATA, f"too little traffic to judge: {low}")
    if base is None:
        return verdict(Outcome.NO_DATA, "no baseline p99 to compare with")
    if not _usable(current):
        return verdict(Outcome.NO_DATA, f"p99 is {_fmt(current)}")
    return verdict(*_p99_against(current, base, values, th, "p99", "baseline"))


def _sidecar_memory_verdict(sidecar: _Reading, limit: _Reading, th: Thresholds) -> Verdict:
    check = "sidecar_memory"
    ceiling_mi = th.sidecar_memory_limit_mi
    expectation = (f"istio-proxy working set <= {ceiling_mi:g} Mi" if ceiling_mi is not None
                   else "istio-proxy working set recorded (no sidecar_memory_limit_mi set)")
    if err := _error(check, expectation, sidecar):
        return err
    used = sidecar.scalar
    used_mi = used / MI if _usable(used) else None
    limit_mi = limit.scalar / MI if _usable(limit.scalar) else None
    values = {"working_set_mi": used_mi, "container_limit_mi": limit_mi, "ceiling_mi": ceiling_mi}
    queries = _queries(sidecar, limit)
    if used_mi is None:
        return Verdict(check, Outcome.NO_DATA, f"no running istio-proxy container (working set {_fmt(used)})",
                       values, expectation, queries)
    of_limit = f" of limit {limit_mi:.0f} Mi" if limit_mi is not None else ""
    if ceiling_mi is None:
        return Verdict(check, Outcome.PASS, f"istio-proxy working set {used_mi:.0f} Mi{of_limit} (recorded only)",
                       values, expectation, queries)
    outcome = Outcome.FAIL if used_mi > ceiling_mi else Outcome.PASS
    relation = ">" if outcome is Outcome.FAIL else "<="
    return Verdict(check, outcome, f"istio-proxy working set {used_mi:.0f} Mi{of_limit} {relation} {ceiling_mi:g} Mi",
                   values, expectation, queries)
