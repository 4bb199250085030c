"""The `/metrics` body in Prometheus' text format (0.0.4), fast enough for the seed fleet to render on each scrape.

Why not prometheus_client's `generate_latest` on the request path: on the seed (~30,700 samples) it took 0.6-0.8 s
a scrape, 0.2 s building a label dict per sample (the `Metric` families) and the rest validating, escaping and
sorting every label name of every sample again, although the series change far more rarely than their values.
Here a series' line prefix (`name{labels} `, escaped and sorted exactly as `generate_latest` writes it) is built
the first time the series is seen and kept while the series is exposed; a scrape formats only the values, with the
library's own `floatToGoString`. A series no longer exposed (a deleted pod's) loses its prefix at the next render.

The series come as `Family` descriptions, label values as tuples (the telemetry's own keys); `Family.metric()` turns
one into the prometheus_client metric family `generate_latest` renders, which the tests compare this body with.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics.exposition import UNDERSCORES, escape_label_name, escape_metric_name
from prometheus_client.utils import floatToGoString

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
Labels = tuple[str, ...]


class HistogramValue(Protocol):
    buckets: list[float]  # cumulative, one per bound (+Inf excluded: that is `count`)
    sum: float
    count: float


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: `series` yields (label values in `labels`' order, value), a value being a number or, for a
    histogram, a `HistogramValue` whose buckets are `bounds` (the `le` values, +Inf excluded)."""

    name: str  # without a counter's `_total`
    kind: str  # COUNTER, GAUGE or HISTOGRAM
    doc: str
    labels: Labels
    series: Iterable[tuple[Labels, Any]]
    bounds: Labels = ()

    def metric(self) -> Metric:
        """The same family as prometheus_client's metric family (the reference rendering, and what tests read)."""
        if self.kind == HISTOGRAM:
            histogram = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
            for values, h in self.series:
                buckets = [*zip(self.bounds, h.buckets, strict=True), ("+Inf", h.count)]
                histogram.add_metric(values, buckets, h.sum)
            return histogram
        family = (CounterMetricFamily if self.kind == COUNTER else GaugeMetricFamily)(self.name, self.doc,
                                                                                      labels=self.labels)
        for values, value in self.series:
            family.add_metric(values, value)
        return family


def _label_value(value: str) -> str:
    """A label value as the text format escapes it (and generate_latest does)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _prefix(name: str, pairs: Iterable[tuple[str, str]]) -> str:
    """`name{a="x",b="y"} `: labels sorted by name, as generate_latest writes a sample's (a label dict first, as
    add_metric makes one)."""
    labels = ",".join(f'{escape_label_name(k, UNDERSCORES)}="{_label_value(v)}"'
                      for k, v in sorted(dict(pairs).items()))
    name = escape_metric_name(name, UNDERSCORES)
    return f"{name}{{{labels}}} " if labels else f"{name} "


def _go_values(values: list[Any]) -> list[str]:
    """`floatToGoString` of each value, in one C-level pass: the repr of a list of floats is its floats' reprs, which
    is what floatToGoString returns for every finite value below 1e6 (above, Go writes an exponent; inf and NaN
    are spelt its way): only those few go through it one by one. Per value, floatToGoString was half the render."""
    if not values:
        return []
    floats = list(map(float, values))
    text = repr(floats)[1:-1].split(", ")
    for i in [i for i, v in enumerate(floats) if not -_INF < v < _GO_EXPONENT]:
        text[i] = floatToGoString(floats[i])
    return text


_INF = float("inf")
_GO_EXPONENT = 1e6  # from here on floatToGoString writes 1.234567e+06 where repr writes 1234567.0


class TextRenderer:
    """Renders families to the text format, keeping each series' line prefixes from one render to the next."""

    def __init__(self) -> None:
        # (family name, kind, label names, bounds) -> label values -> the series' line prefixes
        self._prefixes: dict[tuple[Any, ...], dict[Labels, tuple[str, ...]]] = {}

    def render(self, families: Iterable[Family]) -> bytes:
        lines: list[str] = []
        kept: dict[tuple[Any, ...], dict[Labels, tuple[str, ...]]] = {}
        for family in families:
            key = (family.name, family.kind, family.labels, family.bounds)
            seen = self._prefixes.get(key, {})
            kept[key] = current = {}
            exposed = family.name + "_total" if family.kind == COUNTER else family.name
            doc = family.doc.replace("\\", r"\\").replace("\n", r"\n")
            lines.append(f"# HELP {escape_metric_name(exposed)} {doc}")
            lines.append(f"# TYPE {escape_metric_name(exposed)} {family.kind}")
            read = self._histogram if family.kind == HISTOGRAM else self._plain
            prefixes, values = read(family, exposed, seen, current)
            lines.extend(map(operator.add, prefixes, _go_values(values)))
        self._prefixes = kept  # a series not exposed this time (a deleted pod's) loses its prefixes
        lines.append("")
        return "\n".join(lines).encode("utf-8")

    @staticmethod
    def _plain(family: Family, exposed: str, seen: dict[Labels, tuple[str, ...]],
               current: dict[Labels, tuple[str, ...]]) -> tuple[list[str], list[Any]]:
        """The family's line prefixes and values, in order."""
        names = family.labels
        prefixes, values = [], []
        for labels, value in family.series:
            prefix = seen.get(labels) or (_prefix(exposed, zip(names, labels, strict=False)),)
            current[labels] = prefix
            prefixes += prefix
            values.append(value)
        return prefixes, values

    @staticmethod
    def _histogram(family: Family, exposed: str, seen: dict[Labels, tuple[str, ...]],
                   current: dict[Labels, tuple[str, ...]]) -> tuple[list[str], list[Any]]:
        """Per series: a `_bucket` line per bound and +Inf, then `_count` and `_sum`, as HistogramMetricFamily
        orders them."""
        name, names, bounds = family.name, family.labels, family.bounds
        prefixes: list[str] = []
        values: list[Any] = []
        for labels, h in family.series:
            kept = seen.get(labels)
            if kept is None:
                pairs = list(zip(names, labels, strict=False))
                kept = (*(_prefix(f"{name}_bucket", [*pairs, ("le", le)]) for le in (*bounds, "+Inf")),
                        _prefix(f"{name}_count", pairs), _prefix(f"{name}_sum", pairs))
            if len(h.buckets) != len(bounds):  # its values would shift onto the next series' lines
                raise ValueError(f"{name}{labels}: {len(h.buckets)} buckets for {len(bounds)} bounds")
            current[labels] = kept
            prefixes += kept
            values += h.buckets
            values += (h.count, h.count, h.sum)
        return prefixes, values
