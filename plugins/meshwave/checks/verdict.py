"""What every check answers: a `Verdict` (pass | fail | no_data | error) with the values it saw and the
queries it ran; the `Thresholds` it judges with, and a `Caller` of the workload as its proxy reports it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from meshwave.prometheus import decode_float, encode_float

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


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "none"
    return f"{value:.{digits}g}" if math.isfinite(value) else str(encode_float(value))
