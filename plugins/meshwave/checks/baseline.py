"""The baseline step: the application's own metrics before its change (what the soak compares with).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from meshwave.checks.reader import _queries, _Reader, _Reading, _usable
from meshwave.checks.verdict import Outcome, Verdict, _fmt, _now_iso
from meshwave.prometheus import Source


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
