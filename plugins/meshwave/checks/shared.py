"""The verdicts several stages judge the same way: a success rate against a reference, a p99 against a reference,
restarts and OOMKills (events over the soak so far), and the success rate a workload's own proxy reports.
"""

from __future__ import annotations

import math
from typing import Any

from meshwave.checks.reader import _error, _queries, _Reader, _Reading, _usable
from meshwave.checks.verdict import EPSILON, Outcome, Thresholds, Verdict, _fmt
from meshwave.prometheus import Sample


def _low_traffic(count: float | None, th: Thresholds, window: str) -> str | None:
    """Why there is too little traffic to judge, or None."""
    if not _usable(count) or count + EPSILON < th.min_requests:
        return f"{_fmt(count or 0.0)} requests in {window} (< min_requests {th.min_requests:g})"
    return None


def _success_verdict(check: str, success: _Reading, count: _Reading, reference: float | None,
                     reference_count: float | None, th: Thresholds, window: str,
                     reference_name: str = "baseline") -> Verdict:
    floor = None if reference is None else reference - th.max_success_drop
    expectation = (f"success rate >= {reference_name} {_fmt(reference)} - {th.max_success_drop:g}, "
                   f"with >= {th.min_requests:g} requests in {window}")
    if err := _error(check, expectation, success, count):
        return err
    current, n = success.scalar, count.scalar
    values = {"success_rate": current, "requests": n, reference_name: reference, "floor": floor}
    queries = _queries(success, count)

    def verdict(outcome: Outcome, reason: str) -> Verdict:
        return Verdict(check, outcome, reason, values, expectation, queries)

    if low := _low_traffic(n, th, window):
        return verdict(Outcome.NO_DATA, f"too little traffic to judge: {low}")
    if reference is None or floor is None:
        return verdict(Outcome.NO_DATA, f"no {reference_name} success rate to compare with")
    if reference_count is not None and reference_count + EPSILON < th.min_requests:
        return verdict(Outcome.NO_DATA, f"the {reference_name} saw only {_fmt(reference_count)} requests "
                                        f"(< min_requests {th.min_requests:g})")
    if not _usable(current):
        return verdict(Outcome.NO_DATA, f"success rate is {_fmt(current)}")
    relation = "<" if current + EPSILON < floor else ">="
    reason = f"success rate {current:.2f} {relation} {reference_name} {reference:.2f} - {th.max_success_drop:g}"
    return verdict(Outcome.FAIL if relation == "<" else Outcome.PASS, reason)


def _p99_against(current: float, base: float, values: dict[str, Any], th: Thresholds, what: str,
                 reference: str) -> tuple[Outcome, str]:
    """A p99 fails only when it is both more than `max_p99_increase_ms` and `max_p99_ratio` times above the
    reference's; the increase and the ratio go into `values`."""
    increase = current - base
    increase = 0.0 if abs(increase) < 1e-6 else increase  # no "-0.0 ms" in a report
    ratio = current / base if base > 0 else math.inf
    values.update(increase_ms=increase, ratio=ratio)
    over_ms, over_ratio = increase > th.max_p99_increase_ms, ratio > th.max_p99_ratio
    detail = (f"{what} {current:.1f} ms vs {reference} {base:.1f} ms: {increase:+.1f} ms "
              f"({'>' if over_ms else '<='} {th.max_p99_increase_ms:g}), x{_fmt(ratio)} "
              f"({'>' if over_ratio else '<='} {th.max_p99_ratio:g})")
    return Outcome.FAIL if over_ms and over_ratio else Outcome.PASS, detail


def _container(sample: Sample) -> str:
    return f"{sample.labels.get('pod', '?')}/{sample.labels.get('container', '?')}"


def _restarts_verdict(restarts: _Reading, th: Thresholds, window: str) -> Verdict:
    check = "restarts"
    expectation = f"no container restarts more than {th.max_restarts} time(s) in {window}"
    if err := _error(check, expectation, restarts):
        return err
    per_container = {_container(s): s.value for s in restarts.samples or []}
    values = {"restarts": per_container}
    queries = _queries(restarts)
    if not per_container:
        return Verdict(check, Outcome.NO_DATA, "kube-state-metrics reports no container for these pods", values,
                       expectation, queries)
    over = {name: n for name, n in per_container.items() if not math.isfinite(n) or n > th.max_restarts}
    if over:
        listed = ", ".join(f"{name} {_fmt(n)}x" for name, n in sorted(over.items()))
        return Verdict(check, Outcome.FAIL, f"restarted in {window}: {listed} (max {th.max_restarts})", values,
                       expectation, queries)
    return Verdict(check, Outcome.PASS, f"{len(per_container)} container(s), none restarted more than "
                                        f"{th.max_restarts} time(s) in {window}", values, expectation, queries)


def _oom_verdict(oom: _Reading, restarts: _Reading, window: str) -> Verdict:
    check = "oom_killed"
    expectation = f"no container OOMKilled and restarted in {window}"
    if err := _error(check, expectation, oom, restarts):
        return err
    killed = sorted(_container(s) for s in oom.samples or [])
    values = {"oom_killed": killed}
    queries = _queries(oom, restarts)
    if killed:
        return Verdict(check, Outcome.FAIL, f"OOMKilled and restarted in {window}: {', '.join(killed)}", values,
                       expectation, queries)
    if not restarts.samples:  # an empty OOM vector proves nothing if the pods are not seen at all
        return Verdict(check, Outcome.NO_DATA, "kube-state-metrics reports no container for these pods", values,
                       expectation, queries)
    return Verdict(check, Outcome.PASS, f"no OOMKilled restart in {window}", values, expectation, queries)


def _istio_success_verdict(reader: _Reader, reference: float | None, th: Thresholds, seconds: float,
                           reference_count: float | None = None, reference_name: str = "before",
                           check: str = "istio_success_rate") -> Verdict:
    """The workload's success rate as its own proxy reports it, 5xx, code 0 and response flags all failures."""
    success, rate = reader.read("istio_success_rate"), reader.read("istio_inbound_request_rate")
    # The request count is rate x window here: one query fewer, same min_requests meaning.
    count = _Reading(rate.name, rate.query, error=rate.error, samples=None if rate.samples is None else [
        Sample(s.labels, s.value * seconds, s.timestamp) for s in rate.samples])
    return _success_verdict(check, success, count, reference, reference_count, th, reader.window, reference_name)
