"""The STRICT gate (stage `strict_gate`): `strict_gate`, and what a passing gate hands to verify_strict.

No plaintext HTTP request, TCP connection or TCP byte into the workload since it got its sidecar (the lookback,
stages.strict_lookback), and Istio-reported traffic as positive proof. On a pass, `mtls_callers` and
`inbound_rate` name whom to watch after the flip (stages.on_pass). Timing and policy from
service_group._gate_watch (a failure is never confirmed: it waits out its time); decided by
decisions.gate_decision.
"""

from __future__ import annotations

import math

from meshwave.checks.reader import _error, _queries, _Reader, _Reading, _sum, _usable
from meshwave.checks.verdict import NO_SIDECAR, Caller, Outcome, Verdict, _fmt
from meshwave.prometheus import Source, validate_window, window_seconds


def _callers(reading: _Reading, protocol: str) -> list[Caller]:
    return [Caller(s.labels.get("source_workload_namespace", NO_SIDECAR), s.labels.get("source_workload", NO_SIDECAR),
                   protocol, s.value) for s in reading.samples or []]


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
