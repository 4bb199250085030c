"""What each gated stage of a service checks in Prometheus, on plain JSON params (trigger kwargs).

- canary_soak:      the canary copy's own proxy's success rate and p99 against the primary's pods' live application
                    metrics, and the canary's restarts and OOMKills over its soak so far (canary.py);
- soak:             the application's own metrics against its baseline, the Istio destination-side success rate
                    (what the new proxy failed itself never reaches the app), sidecar memory, and restarts and
                    OOMKills counted over the whole soak so far (`events_window`);
- strict_gate:      no plaintext HTTP request, TCP connection or TCP byte into the workload since it got its sidecar
                    (`strict_lookback`), and Istio-reported traffic as positive proof (not an empty vector);
- verify_strict:    after the flip: the workload's Istio success rate, each caller's own success rate,
                    and an inbound rate that did not collapse;
- verify_recovery:  after going back to PERMISSIVE: the callers' success rates are back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from meshwave.checks import (
    Baseline,
    Caller,
    Thresholds,
    Verdict,
    caller_success_rates,
    inbound_rate,
    judge_canary,
    mtls_callers,
    strict_gate,
    verify_after_injection,
    verify_after_strict,
)
from meshwave.prometheus import PrometheusError, Source, validate_window, window_seconds

STAGES = ("canary_soak", "soak", "strict_gate", "verify_strict", "verify_recovery")
# The events window is rounded up to this step so the gates of one wave whose soaks started within the same step
# share one batched query; rounding up only looks further back, it never misses an event.
EVENTS_STEP_SECONDS = 30
LOOKBACK_STEP_SECONDS = 5  # the STRICT gate's lookback: a poke at the plan defaults' fastest
# A late batch-mate's plaintext is left out from this long after its rollout ended: the lookback's rounding up and a
# scrape that lands after the last plaintext request. Too short errs towards PERMISSIVE (plaintext seen), not STRICT.
BATCH_MARGIN_SECONDS = 2 * LOOKBACK_STEP_SECONDS


@dataclass
class Poll:
    verdicts: list[Verdict]
    extra: dict[str, Any] = field(default_factory=dict)


def _common(params: dict[str, Any]) -> dict[str, Any]:
    return {"namespace": params["namespace"], "workload": params["workload"], "window": params["window"]}


def _callers(params: dict[str, Any]) -> list[Caller]:
    return [Caller.from_dict(c) for c in params.get("callers") or []]


def events_window(window: str, elapsed: float) -> str:
    """The range restarts and OOMKills are counted over: the soak so far plus one query window.

    The extra window reaches back before the soak's start, so an event between the soak's start and the first
    scrape after it is still an increase inside the range (max - min over samples on both sides of it).
    """
    seconds = max(0.0, elapsed) + window_seconds(validate_window(window))
    return f"{math.ceil(seconds / EVENTS_STEP_SECONDS) * EVENTS_STEP_SECONDS}s"


def strict_lookback(window: str, sidecar_seconds: float, elapsed: float) -> str:
    """The range the STRICT gate counts plaintext over: since the service's pods all had their sidecar
    (`sidecar_seconds` before the gate started: the soak) plus the gate so far, never less than one query window.
    A caller that calls in bursts is in it whenever it last called since then (safety review, finding 8).

    It starts when the rollout was done, not when it began: while the service's and its callers' pods roll (a batch
    migrates a caller and its callee at once), plaintext from a caller's pods that had no sidecar yet is transient.
    Rounded up to LOOKBACK_STEP_SECONDS, so that gates whose soaks started within one step share a batched query,
    without reaching far back into a rollout."""
    seconds = max(0.0, sidecar_seconds) + max(0.0, elapsed)
    seconds = max(math.ceil(seconds / LOOKBACK_STEP_SECONDS) * LOOKBACK_STEP_SECONDS,
                  math.ceil(window_seconds(validate_window(window))))
    return f"{seconds}s"


def sidecar_seconds(soak_started: float | None, rollout_ended: float | None, soak_seconds: float,
                    now: float | None = None, batch_ended: float | None = None) -> float:
    """How long the service's pods, and its batch's, have all had their sidecar when the STRICT gate starts.

    Its own: since its soak began (the soak's `started`: the rollout done), else since the rollout wait ended, else
    the plan's soak (a run that recorded neither: a dry run's waits). A batch-mate whose rollout ended later
    (`batch_ended`: a killed worker delayed it) may call this service, in plaintext until its own pods had their
    sidecar: the count starts BATCH_MARGIN_SECONDS after it, and the gate then waits until that is a soak's length
    (`strict_gate_hold`)."""
    now = time.time() if now is None else now
    own = float(soak_seconds)
    for started in (soak_started, rollout_ended):
        if started is not None and 0 < started <= now:
            own = now - float(started)
            break
    if isinstance(batch_ended, int | float) and 0 < batch_ended <= now:
        return min(own, max(0.0, now - float(batch_ended) - BATCH_MARGIN_SECONDS))
    return own


def strict_gate_hold(sidecar: float, soak_seconds: float) -> float:
    """How long the STRICT gate may not pass: until plaintext has been counted over at least a soak's length (a
    late batch-mate moved the count's start past the soak's; see sidecar_seconds)."""
    return max(0.0, float(soak_seconds) - sidecar)


def poll_params(stage: str, params: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """The params of one poll, `elapsed` seconds after the stage started: the soak counts events since then, the
    STRICT gate plaintext since the sidecar."""
    if "window" not in params:  # params evaluate() will refuse anyway
        return params
    if stage in ("soak", "canary_soak"):
        return {**params, "events_window": events_window(params["window"], elapsed)}
    if stage == "strict_gate" and "sidecar_seconds" in params:
        return {**params, "lookback": strict_lookback(params["window"], float(params["sidecar_seconds"]), elapsed)}
    return params


def evaluate(stage: str, source: Source, params: dict[str, Any]) -> Poll:
    thresholds = Thresholds.from_dict(params["thresholds"])
    if stage == "canary_soak":
        return Poll(judge_canary(source, canary=params["canary"], thresholds=thresholds,
                                 events_window=params.get("events_window"), **_common(params)))
    if stage == "soak":
        return Poll(verify_after_injection(source, Baseline.from_dict(params["baseline"]), thresholds=thresholds,
                                           events_window=params.get("events_window"), **_common(params)))
    if stage == "strict_gate":
        verdict, plaintext = strict_gate(source, lookback=params.get("lookback"), **_common(params))
        return Poll([verdict], {"plaintext_callers": [c.describe() for c in plaintext]})
    if stage in ("verify_strict", "verify_recovery"):
        inbound = params.get("inbound_before") if stage == "verify_strict" else None
        verdicts = verify_after_strict(source, callers=_callers(params), inbound_before=inbound,
                                       thresholds=thresholds, success_before=params.get("success_before"),
                                       **_common(params))
        if stage == "verify_recovery":  # the inbound rate has nothing to compare with here
            verdicts = [v for v in verdicts if v.check != "inbound_rate"]
        return Poll(verdicts)
    raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")


def on_pass(stage: str, source: Source, params: dict[str, Any]) -> dict[str, Any]:
    """What a passing stage hands to the next one: the strict gate names whom to watch after the flip."""
    if stage != "strict_gate":
        return {}
    try:
        callers = mtls_callers(source, **_common(params))
        inbound = inbound_rate(source, **_common(params))
    except PrometheusError as exc:
        return {"callers": [], "inbound_before": None, "callers_error": str(exc)}
    success = caller_success_rates(source, callers=callers, **_common(params))
    return {"callers": [c.to_dict() for c in callers], "inbound_before": inbound, "callers_success_before": success}
