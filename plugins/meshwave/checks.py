"""Verdicts and the Prometheus checks of a migration step, and the gate that turns polls into a decision.

Every check answers pass | fail | no_data | error, with the values it saw and the queries it ran.
- no_data is never a pass: low traffic (fewer than `min_requests` in the window), NaN, an empty vector
  where emptiness proves nothing. What to do about it is the Gate's per-check policy.
- error is a Prometheus that could not answer (down, timeout, bad query); the checks never raise for it.
- a bad namespace/workload/cluster/window raises ValueError before any query is sent.

No Airflow imports; synchronous; all results serialise to JSON through to_dict/from_dict.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from meshwave.prometheus import (
    PrometheusError,
    PrometheusUnavailable,
    Sample,
    Source,
    decode_float,
    encode_float,
    render,
    validate_label,
    validate_window,
    window_seconds,
)

MI = 2**20
EPSILON = 1e-9  # float noise: 0.98 computed as 0.97999999 must not fail a 0.98 floor
NO_SIDECAR = "unknown"  # Istio's source_workload for a caller without a proxy


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no_data"
    ERROR = "error"


def _now_iso(now: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if now is None else now, UTC).isoformat(timespec="milliseconds")


def _encode(value: Any) -> Any:
    if isinstance(value, float):
        return encode_float(value)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if value in ("NaN", "+Inf", "-Inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


# ---- the verdict model --------------------------------------------------------------------------------
@dataclass
class Verdict:
    """One evaluation of one check. `values` holds what was seen (JSON-safe after to_dict)."""

    check: str
    outcome: Outcome
    reason: str
    values: dict[str, Any] = field(default_factory=dict)
    expectation: str = ""
    queries: dict[str, str] = field(default_factory=dict)
    at: str = field(default_factory=_now_iso)

    def __post_init__(self) -> None:
        self.outcome = Outcome(self.outcome)

    @property
    def query(self) -> str:
        """The main query (the first one run), to paste into Prometheus."""
        return next(iter(self.queries.values()), "")

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "outcome": self.outcome.value, "reason": self.reason,
                "values": _encode(self.values), "expectation": self.expectation, "queries": dict(self.queries),
                "at": self.at}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(data["check"], Outcome(data["outcome"]), data["reason"], _decode(data.get("values") or {}),
                   data.get("expectation", ""), dict(data.get("queries") or {}), data.get("at") or _now_iso())


@dataclass(frozen=True)
class Thresholds:
    """Same names as the plan's thresholds; `min_requests` comes from the plan's settings."""

    max_success_drop: float = 0.02      # absolute fraction below the baseline success rate
    max_p99_increase_ms: float = 250    # p99 fails only if BOTH the increase ...
    max_p99_ratio: float = 2.0          # ... and the ratio to the baseline are exceeded
    max_restarts: int = 0               # per container, over the events window (the soak so far)
    sidecar_memory_limit_mi: float | None = None
    min_requests: float = 10            # per window; fewer is no_data for success and latency
    min_inbound_ratio: float = 0.5      # after STRICT, of the inbound rate before it
    max_traffic_drop: float = 0.2       # in the soak, fraction of the baseline request rate that may go missing

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool) or value < 0
                                      or not math.isfinite(value)):
                raise ValueError(f"thresholds.{f.name}: {value!r} must be a finite number >= 0")
        if self.max_success_drop > 1 or self.min_inbound_ratio > 1 or self.max_traffic_drop > 1:
            raise ValueError("thresholds: max_success_drop, min_inbound_ratio and max_traffic_drop are fractions "
                             "(<= 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Thresholds:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"thresholds: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Caller:
    """A workload calling the one under migration, as its proxy reported it."""

    namespace: str   # source_workload_namespace ("unknown" without a sidecar)
    workload: str    # source_workload ("unknown": a caller without a sidecar)
    protocol: str    # http (requests/s), tcp (connections opened/s) or tcp_bytes (bytes received/s)
    rate: float      # per second; over a lookback (the STRICT gate): its total divided by the lookback
    total: float | None = None  # requests, connections or bytes over `over` (the STRICT gate's lookback)
    over: str | None = None

    @property
    def has_sidecar(self) -> bool:
        return self.workload != NO_SIDECAR

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.workload}"

    def describe(self) -> str:
        protocol, unit, noun = _UNITS.get(self.protocol, (self.protocol, "/s", "events"))
        who = self.key if self.has_sidecar else "unknown (a caller without sidecar)"
        if self.total is None:
            return f"{who} {protocol} {self.rate:.3g} {unit}"
        return f"{who} {protocol} {_fmt(self.total)} {noun} in the last {self.over}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": encode_float(self.rate), "total": encode_float(self.total)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Caller:
        total = decode_float(data.get("total"))
        return cls(data["namespace"], data["workload"], data["protocol"], float(data["rate"]), total,
                   data.get("over"))


# protocol -> (what the report calls it, the unit of a rate, what a total counts)
_UNITS = {"http": ("http", "rps", "requests"), "tcp": ("tcp", "conn/s", "connections"),
          "tcp_bytes": ("tcp", "B/s", "bytes")}


# ---- reading Prometheus ------------------------------------------------------------------------------
@dataclass
class _Reading:
    name: str
    query: str
    samples: list[Sample] | None = None
    error: str | None = None

    @property
    def scalar(self) -> float | None:
        """The single value of a one-sample query; None for no series. NaN stays NaN."""
        return self.samples[0].value if self.samples else None


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class _Reader:
    """Runs named queries for one workload; after the first 'unavailable' the rest are not even tried."""

    def __init__(self, source: Source, namespace: str, workload: str, window: str | int,
                 cluster: str | None) -> None:
        self.source = source
        self.namespace = validate_label("namespace", namespace)
        self.workload = validate_label("workload", workload)
        self.window = validate_window(window)
        cluster = cluster if cluster is not None else getattr(source, "cluster", None)
        self.cluster = validate_label("cluster", cluster) if cluster is not None else None
        self.unavailable: str | None = None

    def read(self, name: str, *, namespace: str | None = None, workload: str | None = None,
             window: str | None = None, raise_errors: bool = False) -> _Reading:
        window = window or self.window
        query = render(name, namespace=namespace or self.namespace, workload=workload or self.workload,
                       window=window, cluster=self.cluster)
        if self.unavailable and not raise_errors:
            return _Reading(name, query, error=self.unavailable)
        batched = getattr(self.source, "workload_query", None)  # a BatchingSource: one query for many workloads
        try:
            if batched is not None:
                return _Reading(name, query, samples=batched(name, query, namespace=namespace or self.namespace,
                                                             workload=workload or self.workload,
                                                             window=window, cluster=self.cluster))
            return _Reading(name, query, samples=self.source.instant(query))
        except PrometheusError as exc:
            if raise_errors:
                raise
            if isinstance(exc, PrometheusUnavailable):
                self.unavailable = str(exc)
            return _Reading(name, query, error=str(exc))


def _queries(*readings: _Reading) -> dict[str, str]:
    return {r.name: r.query for r in readings}


def _error(check: str, expectation: str, *readings: _Reading) -> Verdict | None:
    """An error verdict if any of the readings failed, else None."""
    failed = [r for r in readings if r.error]
    if not failed:
        return None
    return Verdict(check, Outcome.ERROR, f"Prometheus could not answer {failed[0].name}: {failed[0].error}",
                   {"errors": {r.name: r.error for r in failed}}, expectation, _queries(*readings))


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "none"
    return f"{value:.{digits}g}" if math.isfinite(value) else str(encode_float(value))


# ---- baseline ------------------------------------------------------------------------------------------
@dataclass
class Baseline:
    """The workload's own metrics before its change. Values are finite or None; `notes` says why a None."""

    namespace: str
    workload: str
    window: str
    cluster: str | None = None
    success_rate: float | None = None
    request_rate: float | None = None
    request_count: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    app_memory_bytes: dict[str, float] = field(default_factory=dict)
    queries: dict[str, str] = field(default_factory=dict)
    notes: list[Verdict] = field(default_factory=list)
    at: str = field(default_factory=_now_iso)

    @property
    def complete(self) -> bool:
        return not self.notes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = [n.to_dict() for n in self.notes]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        data = dict(data)
        data["notes"] = [Verdict.from_dict(n) for n in data.get("notes") or []]
        return cls(**data)


_BASELINE_METRICS = (("success_rate", "app_success_rate"), ("request_rate", "app_request_rate"),
                     ("request_count", "app_request_count"), ("p50_ms", "app_latency_p50_ms"),
                     ("p99_ms", "app_latency_p99_ms"))


def measure_baseline(source: Source, namespace: str, workload: str, window: str | int,
                     cluster: str | None = None) -> Baseline:
    """The application's own request metrics (they exist before injection) and memory, with notes."""
    reader = _Reader(source, namespace, workload, window, cluster)
    base = Baseline(reader.namespace, reader.workload, reader.window, reader.cluster)
    for attr, name in _BASELINE_METRICS:
        reading = reader.read(name)
        base.queries[name] = reading.query
        value = reading.scalar
        if _usable(value):
            setattr(base, attr, value)
        else:
            base.notes.append(_baseline_note(name, reading))
    memory = reader.read("app_memory_bytes")
    base.queries[memory.name] = memory.query
    if memory.samples:
        base.app_memory_bytes = {s.labels.get("container", ""): s.value for s in memory.samples if s.finite}
    else:
        base.notes.append(_baseline_note(memory.name, memory))
    return base


def _baseline_note(name: str, reading: _Reading) -> Verdict:
    check = f"baseline.{name}"
    if reading.error:
        return Verdict(check, Outcome.ERROR, f"Prometheus could not answer: {reading.error}", {},
                       "a value", _queries(reading))
    why = "no series" if reading.scalar is None else f"{_fmt(reading.scalar)} (no requests in the window)"
    return Verdict(check, Outcome.NO_DATA, f"{name}: {why}", {"value": reading.scalar}, "a value", _queries(reading))


# ---- after injection ------------------------------------------------------------------------------------
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


# ---- the canary (canary.py) -----------------------------------------------------------------------------
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


# ---- the STRICT gate ------------------------------------------------------------------------------------
def _callers(reading: _Reading, protocol: str) -> list[Caller]:
    return [Caller(s.labels.get("source_workload_namespace", NO_SIDECAR), s.labels.get("source_workload", NO_SIDECAR),
                   protocol, s.value) for s in reading.samples or []]


def _sum(*readings: _Reading) -> float | None:
    """Sum of the one-sample readings that have a series; None if none has."""
    values = [r.scalar for r in readings if r.scalar is not None]
    return sum(values) if values else None


# The STRICT gate's plaintext queries (amounts over its lookback) and the protocol each names a caller with.
PLAINTEXT_QUERIES = (("plaintext_http_requests", "http"), ("plaintext_tcp_connections", "tcp"),
                     ("plaintext_tcp_bytes", "tcp_bytes"))


def _plaintext_callers(reading: _Reading, protocol: str, lookback: str) -> list[Caller]:
    seconds = window_seconds(lookback)
    return [Caller(s.labels.get("source_workload_namespace", NO_SIDECAR), s.labels.get("source_workload", NO_SIDECAR),
                   protocol, s.value / seconds, s.value, lookback) for s in reading.samples or []]


def strict_gate(source: Source, namespace: str, workload: str, window: str | int,
                cluster: str | None = None, lookback: str | int | None = None) -> tuple[Verdict, list[Caller]]:
    """Pass only with positive proof: zero plaintext over the lookback AND Istio-reported inbound traffic now.

    Plaintext is counted over `lookback` (default: `window`), which the gate keeps as long as the sidecar has been
    there (stages.strict_lookback): HTTP requests, TCP connections opened and TCP bytes received (a long-lived
    connection opens nothing new). One query window would miss a caller that calls in bursts (safety review,
    finding 8). Returns the verdict and the plaintext callers seen in the lookback, for the report.
    """
    check = "strict_plaintext"
    reader = _Reader(source, namespace, workload, window, cluster)
    over = validate_window(lookback, "lookback") if lookback is not None else reader.window
    plain = [(reader.read(name, window=over), protocol) for name, protocol in PLAINTEXT_QUERIES]
    inbound_http, inbound_tcp = reader.read("istio_inbound_request_rate"), reader.read("istio_inbound_tcp_rate")
    readings = [r for r, _ in plain] + [inbound_http, inbound_tcp]
    target = f"{reader.namespace}/{reader.workload}"
    expectation = (f"no plaintext HTTP request, TCP connection or TCP byte into {target} in the last {over}, and "
                   f"Istio-reported inbound traffic in {reader.window} to prove it")
    if err := _error(check, expectation, *readings):
        return err, []
    seen = [c for reading, protocol in plain for c in _plaintext_callers(reading, protocol, over)]
    plaintext = [c for c in seen if not c.rate <= 0]  # a NaN proves no zero: it counts
    plaintext.sort(key=lambda c: -c.rate if math.isfinite(c.rate) else 0.0)
    inbound = _sum(inbound_http, inbound_tcp)
    values = {"plaintext_callers": [c.to_dict() for c in plaintext],
              "drained_callers": [c.to_dict() for c in seen if c.rate <= 0], "lookback": over,
              "inbound_request_rate": inbound_http.scalar, "inbound_tcp_rate": inbound_tcp.scalar}
    queries = _queries(*readings)
    if plaintext:
        listed = "; ".join(c.describe() for c in plaintext)
        return Verdict(check, Outcome.FAIL, f"plaintext into {target} in the last {over}: {listed}", values,
                       expectation, queries), plaintext
    if not _usable(inbound) or inbound <= 0:
        return Verdict(check, Outcome.NO_DATA, f"no Istio-reported traffic into {target} in {reader.window} "
                       f"(inbound {_fmt(inbound)}): zero plaintext proves nothing", values, expectation,
                       queries), []
    return Verdict(check, Outcome.PASS, f"all {_fmt(inbound)}/s inbound is mutual TLS, no plaintext caller in the "
                   f"last {over}", values, expectation, queries), []


def mtls_callers(source: Source, namespace: str, workload: str, window: str | int,
                 cluster: str | None = None) -> list[Caller]:
    """Callers seen over mutual TLS in the window (whom to watch after STRICT); raises PrometheusError."""
    reader = _Reader(source, namespace, workload, window, cluster)
    readings = [reader.read("mtls_http_callers", raise_errors=True), reader.read("mtls_tcp_callers", raise_errors=True)]
    return [c for c in _callers(readings[0], "http") + _callers(readings[1], "tcp") if c.rate > 0]


def inbound_rate(source: Source, namespace: str, workload: str, window: str | int,
                 cluster: str | None = None) -> float | None:
    """Istio-reported inbound requests/s plus TCP connections/s (None: no series); raises PrometheusError."""
    reader = _Reader(source, namespace, workload, window, cluster)
    readings = (reader.read("istio_inbound_request_rate", raise_errors=True),
                reader.read("istio_inbound_tcp_rate", raise_errors=True))
    total = _sum(*readings)
    return total if _usable(total) else None


# ---- after STRICT ---------------------------------------------------------------------------------------
CallerRef = tuple[str, str] | Caller


def caller_success_rates(source: Source, namespace: str, workload: str, callers: Sequence[CallerRef],
                         window: str | int, cluster: str | None = None) -> dict[str, float]:
    """Each named caller's own success rate now ("namespace/workload": ratio), before STRICT: what it is compared
    with after the flip, so a caller already failing some requests does not undo a good STRICT. A caller without
    application metrics (a gateway) is read through its proxy; one with no usable value is left out (compared
    with 1.0 then)."""
    reader = _Reader(source, namespace, workload, window, cluster)
    found = {}
    for ns, wl in _caller_keys(callers):
        success = reader.read("app_success_rate", namespace=ns, workload=wl)
        if not success.error and not success.samples:
            success = reader.read("caller_outbound_success_rate", namespace=ns, workload=wl)
        if _usable(success.scalar):
            found[f"{ns}/{wl}"] = float(success.scalar)  # type: ignore[arg-type]
    return found


def _caller_keys(callers: Iterable[CallerRef]) -> list[tuple[str, str]]:
    """(namespace, workload) pairs, validated, de-duplicated; callers without sidecar cannot be named."""
    keys: list[tuple[str, str]] = []
    for c in callers:
        ns, wl = (c.namespace, c.workload) if isinstance(c, Caller) else c
        if wl == NO_SIDECAR:
            continue
        key = (validate_label("caller namespace", ns), validate_label("caller workload", wl))
        if key not in keys:
            keys.append(key)
    return keys


def verify_after_strict(source: Source, namespace: str, workload: str, callers: Sequence[CallerRef],
                        inbound_before: float | None, window: str | int, thresholds: Thresholds | None = None,
                        cluster: str | None = None,
                        success_before: dict[str, float] | None = None) -> list[Verdict]:
    """After the flip: the workload's Istio success rate, each caller's OWN app success rate, inbound rate.

    `success_before` maps "namespace/workload" (the workload and its callers) to success rates measured
    before STRICT; a missing entry is compared with 1.0 (a caller that already failed some requests before
    should have its rate passed in). Callers without sidecar ("unknown") cannot be named and are skipped:
    their loss shows in the inbound rate.
    """
    th = thresholds or Thresholds()
    reader = _Reader(source, namespace, workload, window, cluster)
    keys = _caller_keys(callers)
    before = success_before or {}
    seconds = window_seconds(reader.window)
    own = f"{reader.namespace}/{reader.workload}"
    verdicts = [_istio_success_verdict(reader, before.get(own, 1.0), th, seconds)]
    for ns, wl in keys:
        success = reader.read("app_success_rate", namespace=ns, workload=wl)
        count = reader.read("app_request_count", namespace=ns, workload=wl)
        if not count.error and not count.samples:  # no application metrics (a gateway): its proxy's view
            success = reader.read("caller_outbound_success_rate", namespace=ns, workload=wl)
            count = reader.read("caller_outbound_request_count", namespace=ns, workload=wl)
        verdicts.append(_success_verdict(f"caller_success_rate[{ns}/{wl}]", success, count,
                                         before.get(f"{ns}/{wl}", 1.0), None, th, reader.window, "before"))
    verdicts.append(_inbound_verdict(reader, inbound_before, th))
    return verdicts


def _istio_success_verdict(reader: _Reader, reference: float | None, th: Thresholds, seconds: float,
                           reference_count: float | None = None, reference_name: str = "before",
                           check: str = "istio_success_rate") -> Verdict:
    """The workload's success rate as its own proxy reports it, 5xx, code 0 and response flags all failures."""
    success, rate = reader.read("istio_success_rate"), reader.read("istio_inbound_request_rate")
    # The request count is rate x window here: one query fewer, same min_requests meaning.
    count = _Reading(rate.name, rate.query, error=rate.error, samples=None if rate.samples is None else [
        Sample(s.labels, s.value * seconds, s.timestamp) for s in rate.samples])
    return _success_verdict(check, success, count, reference, reference_count, th, reader.window, reference_name)


def _inbound_verdict(reader: _Reader, inbound_before: float | None, th: Thresholds) -> Verdict:
    check = "inbound_rate"
    http, tcp = reader.read("istio_inbound_request_rate"), reader.read("istio_inbound_tcp_rate")
    floor = None if inbound_before is None else inbound_before * th.min_inbound_ratio
    expectation = f"inbound >= {th.min_inbound_ratio:g} x before ({_fmt(inbound_before)}/s)"
    if err := _error(check, expectation, http, tcp):
        return err
    current = _sum(http, tcp)
    values = {"inbound_rate": current, "before": inbound_before, "floor": floor}
    queries = _queries(http, tcp)
    if not _usable(inbound_before) or inbound_before <= 0 or floor is None:
        return Verdict(check, Outcome.NO_DATA, f"no inbound rate before STRICT to compare with "
                       f"({_fmt(inbound_before)})", values, expectation, queries)
    if not _usable(current):
        return Verdict(check, Outcome.NO_DATA, f"no Istio-reported inbound series ({_fmt(current)})", values,
                       expectation, queries)
    collapsed = current + EPSILON < floor
    reason = (f"inbound {current:.3g}/s {'<' if collapsed else '>='} {th.min_inbound_ratio:g} x "
              f"{inbound_before:.3g}/s before STRICT")
    return Verdict(check, Outcome.FAIL if collapsed else Outcome.PASS, reason, values, expectation, queries)


# ---- the gate: successive polls to a decision --------------------------------------------------------------
class OnMissing(StrEnum):
    """What a no_data or error verdict does in the gate."""

    FAIL = "fail"   # counts as a breach (N in a row confirm a FAIL)
    PASS = "pass"   # ignored: counts as a pass
    WAIT = "wait"   # pending until the deadline; then the gate ends NO_DATA (or ERROR)


# Restarts and OOMKills are events, not noisy measurements: one failing poll of these checks is a confirmed failure.
# At the plan defaults an event stays visible in a query window for fewer polls than `breaches_to_fail`
# (safety review, finding 11): waiting for N polls in a row let two OOMKills pass a soak.
EVENT_CHECKS = ("restarts", "oom_killed")


class GateStatus(StrEnum):
    PENDING = "pending"
    PASS = "pass"
    FAIL = "fail"              # a confirmed breach: N consecutive failing polls of one check
    NO_DATA = "no_data"        # deadline reached while waiting for data
    ERROR = "error"            # deadline reached while Prometheus kept failing
    INCONCLUSIVE = "inconclusive"  # deadline reached with breaches not (yet) confirmed


@dataclass(frozen=True)
class CheckPolicy:
    on_no_data: OnMissing = OnMissing.WAIT
    on_error: OnMissing = OnMissing.WAIT

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_no_data", OnMissing(self.on_no_data))
        object.__setattr__(self, "on_error", OnMissing(self.on_error))

    def to_dict(self) -> dict[str, str]:
        return {"on_no_data": self.on_no_data.value, "on_error": self.on_error.value}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> CheckPolicy:
        return cls(OnMissing(data.get("on_no_data", "wait")), OnMissing(data.get("on_error", "wait")))


@dataclass(frozen=True)
class GatePolicy:
    """N consecutive failing polls of one check confirm a FAIL; K consecutive all-pass polls confirm a PASS.

    `checks` overrides `default` by check name; "caller_success_rate" also covers "caller_success_rate[ns/x]".
    `deadline` (epoch seconds) ends the waiting; None waits as long as the caller keeps polling.
    A FAIL verdict of a check in `confirm_at_once` is confirmed by that one poll (no data or errors of it are not).
    """

    breaches_to_fail: int = 3
    passes_to_pass: int = 1
    deadline: float | None = None
    default: CheckPolicy = field(default_factory=CheckPolicy)
    checks: dict[str, CheckPolicy] = field(default_factory=dict)
    confirm_at_once: tuple[str, ...] = EVENT_CHECKS

    def __post_init__(self) -> None:
        if self.breaches_to_fail < 1 or self.passes_to_pass < 1:
            raise ValueError("gate policy: breaches_to_fail and passes_to_pass must be >= 1")

    def for_check(self, check: str) -> CheckPolicy:
        return self.checks.get(check) or self.checks.get(check.split("[", 1)[0]) or self.default

    def to_dict(self) -> dict[str, Any]:
        return {"breaches_to_fail": self.breaches_to_fail, "passes_to_pass": self.passes_to_pass,
                "deadline": self.deadline, "default": self.default.to_dict(),
                "checks": {k: v.to_dict() for k, v in self.checks.items()},
                "confirm_at_once": list(self.confirm_at_once)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatePolicy:
        return cls(int(data.get("breaches_to_fail", 3)), int(data.get("passes_to_pass", 1)), data.get("deadline"),
                   CheckPolicy.from_dict(data.get("default") or {}),
                   {k: CheckPolicy.from_dict(v) for k, v in (data.get("checks") or {}).items()},
                   tuple(data.get("confirm_at_once", EVENT_CHECKS)))


@dataclass
class GateResult:
    status: GateStatus
    reason: str
    polls: int
    failed: list[str] = field(default_factory=list)     # checks with a confirmed breach
    breaching: dict[str, int] = field(default_factory=dict)  # unconfirmed: check -> consecutive breaches
    no_data: list[str] = field(default_factory=list)    # checks whose latest verdict is no_data
    errors: list[str] = field(default_factory=list)     # checks whose latest verdict is error
    verdicts: list[Verdict] = field(default_factory=list)  # the latest poll

    @property
    def decided(self) -> bool:
        return self.status is not GateStatus.PENDING

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status.value, "reason": self.reason, "polls": self.polls, "failed": list(self.failed),
                "breaching": dict(self.breaching), "no_data": list(self.no_data), "errors": list(self.errors),
                "verdicts": [v.to_dict() for v in self.verdicts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateResult:
        return cls(GateStatus(data["status"]), data["reason"], int(data["polls"]), list(data.get("failed") or []),
                   dict(data.get("breaching") or {}), list(data.get("no_data") or []), list(data.get("errors") or []),
                   [Verdict.from_dict(v) for v in data.get("verdicts") or []])


@dataclass
class BreachTracker:
    """Feed it each poll's verdicts; it decides. Its whole state goes through to_dict/from_dict between polls.

    Every verdict seen is kept in `history` (without its queries, which every poll repeats), the oldest
    dropped beyond `max_history`. Once decided, the decision is sticky.
    """

    policy: GatePolicy = field(default_factory=GatePolicy)
    polls: int = 0
    breaches: dict[str, int] = field(default_factory=dict)
    passes: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0
    max_history: int = 2000
    result: GateResult | None = None

    def feed(self, verdicts: Sequence[Verdict], now: float | None = None) -> GateResult:
        if self.result is not None and self.result.decided:
            return self.result
        now = time.time() if now is None else now
        self.polls += 1
        self._record(verdicts)
        effective = {v.check: self._effective(v) for v in verdicts}
        self.breaches = {c: self.breaches.get(c, 0) + 1 for c, e in effective.items() if e == "breach"}
        all_pass = bool(effective) and all(e == "pass" for e in effective.values())
        self.passes = self.passes + 1 if all_pass else 0
        self.result = self._decide(list(verdicts), effective, now)
        return self.result

    def _effective(self, verdict: Verdict) -> str:
        """pass, breach or wait, after the check's policy for no_data and error."""
        if verdict.outcome is Outcome.PASS:
            return "pass"
        if verdict.outcome is Outcome.FAIL:
            return "breach"
        policy = self.policy.for_check(verdict.check)
        rule = policy.on_no_data if verdict.outcome is Outcome.NO_DATA else policy.on_error
        return {OnMissing.FAIL: "breach", OnMissing.PASS: "pass", OnMissing.WAIT: "wait"}[rule]

    def _events(self, verdicts: list[Verdict]) -> set[str]:
        """Event checks that failed in this poll: confirmed without waiting for more polls."""
        return {v.check for v in verdicts if v.outcome is Outcome.FAIL and v.check in self.policy.confirm_at_once}

    def _decide(self, verdicts: list[Verdict], effective: dict[str, str], now: float) -> GateResult:
        n = self.policy.breaches_to_fail
        events = self._events(verdicts)
        failed = sorted({c for c, count in self.breaches.items() if count >= n} | events)
        result = GateResult(GateStatus.PENDING, "", self.polls, failed,
                            {c: k for c, k in self.breaches.items() if k < n and c not in events},
                            sorted(v.check for v in verdicts if v.outcome is Outcome.NO_DATA),
                            sorted(v.check for v in verdicts if v.outcome is Outcome.ERROR), verdicts)
        by_check = {v.check: v for v in verdicts}
        if failed:
            result.status = GateStatus.FAIL
            result.reason = "; ".join(f"{c}: {by_check[c].reason} "
                                      f"({'an event: confirmed at once' if c in events else f'{n} polls in a row'})"
                                      for c in failed)
        elif self.passes >= self.policy.passes_to_pass:
            result.status = GateStatus.PASS
            result.reason = f"all {len(verdicts)} checks passed {self.passes} poll(s) in a row"
        elif not verdicts:
            result.reason = "no verdicts in this poll"
        else:
            result.reason = self._pending_reason(by_check, effective)
        if not result.decided and self.policy.deadline is not None and now >= self.policy.deadline:
            self._at_deadline(result)
        return result

    def _pending_reason(self, by_check: dict[str, Verdict], effective: dict[str, str]) -> str:
        open_checks = [c for c, e in effective.items() if e != "pass"]
        if not open_checks:
            return f"passing, {self.passes}/{self.policy.passes_to_pass} polls in a row"
        parts = []
        for c in open_checks:
            v = by_check[c]
            count = f" {self.breaches[c]}/{self.policy.breaches_to_fail}" if c in self.breaches else ""
            parts.append(f"{c}: {v.outcome.value}{count}: {v.reason}")
        return "pending: " + "; ".join(parts)

    def _at_deadline(self, result: GateResult) -> None:
        if result.breaching:
            result.status = GateStatus.INCONCLUSIVE
            listed = ", ".join(f"{c} failed {k}x in a row" for c, k in sorted(result.breaching.items()))
            result.reason = f"deadline reached with unconfirmed breaches ({listed}; {self.policy.breaches_to_fail} " \
                            "needed)"
        elif result.errors:
            result.status = GateStatus.ERROR
            result.reason = (f"deadline reached, Prometheus still failing for {', '.join(result.errors)}: "
                             f"{result.reason}")
        elif result.no_data or not result.verdicts:
            result.status = GateStatus.NO_DATA
            result.reason = f"deadline reached without data for {', '.join(result.no_data) or 'any check'}: " \
                            f"{result.reason}"
        else:  # all pass but fewer than K polls in a row
            result.status = GateStatus.INCONCLUSIVE
            result.reason = f"deadline reached before {self.policy.passes_to_pass} passing polls in a row " \
                            f"({self.passes})"

    def _record(self, verdicts: Sequence[Verdict]) -> None:
        for v in verdicts:
            self.history.append({"poll": self.polls, "at": v.at, "check": v.check, "outcome": v.outcome.value,
                                 "values": _encode(v.values), "reason": v.reason})
        excess = len(self.history) - self.max_history
        if excess > 0:
            del self.history[:excess]
            self.dropped += excess

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "polls": self.polls, "breaches": dict(self.breaches),
                "passes": self.passes, "history": list(self.history), "dropped": self.dropped,
                "max_history": self.max_history, "result": self.result.to_dict() if self.result else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BreachTracker:
        return cls(GatePolicy.from_dict(data.get("policy") or {}), int(data.get("polls", 0)),
                   {k: int(v) for k, v in (data.get("breaches") or {}).items()}, int(data.get("passes", 0)),
                   list(data.get("history") or []), int(data.get("dropped", 0)), int(data.get("max_history", 2000)),
                   GateResult.from_dict(data["result"]) if data.get("result") else None)


Gate = BreachTracker  # the name the design uses


def decode_values(values: dict[str, Any]) -> dict[str, Any]:
    """Values of a history entry back to floats ("NaN" -> nan)."""
    return _decode(values)


__all__ = [
    "Baseline", "BreachTracker", "Caller", "CheckPolicy", "Gate", "GatePolicy", "GateResult", "GateStatus",
    "OnMissing", "Outcome", "Thresholds", "Verdict", "decode_float", "decode_values", "inbound_rate",
    "measure_baseline", "mtls_callers", "strict_gate", "verify_after_injection", "verify_after_strict",
]
