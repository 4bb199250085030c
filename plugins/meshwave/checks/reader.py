"""Reading Prometheus for one workload: named queries (include/promql/queries.yaml), rendered and run; after the
first 'unavailable' the rest are not even tried, and an error becomes an `error` verdict, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshwave.checks.verdict import Outcome, Verdict
from meshwave.prometheus import (
    PrometheusError,
    PrometheusUnavailable,
    Sample,
    Source,
    render,
    validate_label,
    validate_window,
)


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


def _sum(*readings: _Reading) -> float | None:
    """Sum of the one-sample readings that have a series; None if none has."""
    values = [r.scalar for r in readings if r.scalar is not None]
    return sum(values) if values else None
