"""After the flip to STRICT (stage `verify_strict`) and after going back to PERMISSIVE (stage
`verify_recovery`, without the inbound rate): `verify_after_strict`.

The workload's Istio success rate, each caller's own success rate against `caller_success_rates` measured
before the flip, and an inbound rate that did not collapse. Timing and policy from service_group._gate_watch;
decided by decisions.after_strict (verify_recovery's result is read by decisions.outcome).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from meshwave.checks.reader import _error, _queries, _Reader, _sum, _usable
from meshwave.checks.shared import _istio_success_verdict, _success_verdict
from meshwave.checks.verdict import EPSILON, NO_SIDECAR, Caller, Outcome, Thresholds, Verdict, _fmt
from meshwave.prometheus import Source, validate_label, window_seconds

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
