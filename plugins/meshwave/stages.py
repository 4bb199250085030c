"""What each gated stage of a service checks in Prometheus, on plain JSON params (trigger kwargs).

- soak:             the application's own metrics against its baseline, restarts, OOMKilled, sidecar memory;
- strict_gate:      no plaintext HTTP or TCP into the workload (positive proof, not an empty vector);
- verify_strict:    after the flip: the workload's Istio success rate, each caller's own success rate,
                    and an inbound rate that did not collapse;
- verify_recovery:  after going back to PERMISSIVE: the callers' success rates are back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshwave.checks import (
    Baseline,
    Caller,
    Thresholds,
    Verdict,
    inbound_rate,
    mtls_callers,
    strict_gate,
    verify_after_injection,
    verify_after_strict,
)
from meshwave.prometheus import PrometheusError, Source

STAGES = ("soak", "strict_gate", "verify_strict", "verify_recovery")


@dataclass
class Poll:
    verdicts: list[Verdict]
    extra: dict[str, Any] = field(default_factory=dict)


def _common(params: dict[str, Any]) -> dict[str, Any]:
    return {"namespace": params["namespace"], "workload": params["workload"], "window": params["window"]}


def _callers(params: dict[str, Any]) -> list[Caller]:
    return [Caller.from_dict(c) for c in params.get("callers") or []]


def evaluate(stage: str, source: Source, params: dict[str, Any]) -> Poll:
    thresholds = Thresholds.from_dict(params["thresholds"])
    if stage == "soak":
        return Poll(verify_after_injection(source, Baseline.from_dict(params["baseline"]), thresholds=thresholds,
                                           **_common(params)))
    if stage == "strict_gate":
        verdict, plaintext = strict_gate(source, **_common(params))
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
    return {"callers": [c.to_dict() for c in callers], "inbound_before": inbound}
