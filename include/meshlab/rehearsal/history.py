"""Did any caller lose traffic at any moment of the rehearsal? From Prometheus' history, not from the end state.

The tracing service graph (`traces_service_graph_request_total`, the OpenTelemetry Collector's servicegraph
connector) counts every call between traced services, sidecar or not, and a caller that is not traced as `user`.
Per edge (client -> server, each with its namespace and cluster) the rehearsal compares the rate of requests that
succeeded with the edge's own rate before the first wave: a caller cut off by STRICT, a pod that crash-loops, a
rollout that drops requests all push that ratio down. An untraced caller's refused requests never reach a server
span, so only this ratio (delivered against before) can show them.

Each edge's floor is 1 - max_success_drop of the server's planned thresholds (the plan's defaults for an edge whose
server is not planned). An edge with less than `MIN_RPS` before is too thin to judge and is listed as such; no edge
at all (no service graph in this Prometheus) is a RehearsalError: the rehearsal cannot say that nobody lost traffic.
"""

from __future__ import annotations

import bisect
import statistics
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from meshlab.rehearsal.plan_copy import RehearsalError
from meshwave.plan import Plan
from meshwave.prometheus import Series

EDGE_LABELS = ("client", "client_service_namespace", "client_k8s_cluster_name", "server", "server_service_namespace",
               "server_k8s_cluster_name")
OK = 'traces_service_graph_request_total{failed="false"}'
OK_COUNT = f"sum by ({', '.join(EDGE_LABELS)}) ({OK})"
OK_SAMPLED_AT = f"max by ({', '.join(EDGE_LABELS)}) (timestamp({OK}))"
SAMPLE_STEP = 2.0  # seconds between the raw reads: at most the scrape interval, so that every sample is seen
# One range query per 10 minutes of history: the seed's 78 minutes in one query (340 edges, a point every 2 s) ran
# past Prometheus' query timeout on this loaded machine (HTTP 503, 2026-11-29), and the caller check was lost.
CHUNK_SECONDS = 600
MIN_RPS = 0.2
MIN_RUN = 2  # evaluations below the floor in a row that make a loss (see _runs_below)


class RangeSource(Protocol):
    def range(self, query: str, start: float, end: float, step: float) -> list[Series]: ...


class Edge(BaseModel):
    model_config = ConfigDict(frozen=True)

    client: str  # "user": a caller that is not traced
    client_namespace: str = ""
    client_cluster: str = ""
    server: str
    server_namespace: str = ""
    server_cluster: str = ""

    def __str__(self) -> str:
        def side(name: str, ns: str, cluster: str) -> str:
            return "/".join(p for p in (cluster, ns, name) if p)
        return (f"{side(self.client, self.client_namespace, self.client_cluster)} -> "
                f"{side(self.server, self.server_namespace, self.server_cluster)}")


class EdgeCheck(BaseModel):
    model_config = ConfigDict(frozen=True)

    edge: Edge
    before_rps: float
    floor: float  # the least share of `before_rps` that must stay delivered
    lowest: float  # the least share seen
    lowest_at: float  # epoch seconds
    seconds_below: float

    @property
    def lost_traffic(self) -> bool:
        return self.seconds_below > 0


class History(BaseModel):
    model_config = ConfigDict(frozen=True)

    start: float
    end: float
    step: float
    checks: list[EdgeCheck]
    too_thin: list[str] = []  # edges with less than MIN_RPS before: not judged
    lowest_by_time: list[tuple[float, float]] = []  # the least share of any judged edge, per step (for the chart)

    @property
    def lost(self) -> list[EdgeCheck]:
        return [c for c in self.checks if c.lost_traffic]


def check_history(source: RangeSource, plan: Plan, start: float, end: float, *, before_seconds: float = 60,
                  window: int = 30, step: float = 10) -> History:
    """Every edge that touches a planned service, from `start - before_seconds` to `end`."""
    if window < MIN_RUN * step:
        raise ValueError(f"window {window} s: at least {MIN_RUN} steps of {step:g} s, so that a lost request lowers "
                         f"{MIN_RUN} evaluations in a row")
    # The counters as scraped, each value at the time its sample was taken, and the rates computed between real
    # samples: rate() extrapolates a window's last sample to the window's end, so a late scrape (a loaded lab, a slow
    # exporter) read as a drop on every edge at once, for as long as it was late.
    counts = range_in_chunks(source, OK_COUNT, start - before_seconds - window, end, SAMPLE_STEP)
    sampled_at = range_in_chunks(source, OK_SAMPLED_AT, start - before_seconds - window, end, SAMPLE_STEP)
    first = round(start - before_seconds)
    grid = [first + k * step for k in range(int((round(end) - first) // step) + 1)]
    series = _rates(counts, sampled_at, grid, window)
    planned = {(s.cluster, s.namespace, s.workload): s for w in plan.waves for s in w.services}
    edges = _edges(series, planned)
    if not edges:
        raise RehearsalError(f"Prometheus has no service graph series touching the plan's services between "
                             f"{start - before_seconds:.0f} and {end:.0f} ({OK_COUNT}): the rehearsal cannot tell "
                             "whether a caller lost traffic")
    times = [t for t in grid if t > start]  # a time with no rate for an edge: nothing was delivered on it
    checks, thin, shares_by_edge = [], [], {}
    for edge, points in sorted(edges.items(), key=lambda item: str(item[0])):
        # The median: a first window can reach back before the series began, and a mean would lower the floor.
        before = [v for t, v in points if t <= start]
        rate_before = statistics.median(before) if before else 0.0
        if rate_before < MIN_RPS:
            thin.append(str(edge))
            continue
        by_time = {round(t, 3): v for t, v in points}
        shares = [(t, by_time.get(round(t, 3), 0.0) / rate_before) for t in times]
        shares_by_edge[edge] = shares
        checks.append(_check(edge, shares, rate_before, 1 - _max_drop(plan, planned, edge), step, start))
    lowest = [(t, min(shares[i][1] for shares in shares_by_edge.values())) for i, t in enumerate(times)] \
        if shares_by_edge else []
    return History(start=start, end=end, step=step, checks=checks, too_thin=thin, lowest_by_time=lowest)


def range_in_chunks(source: RangeSource, query: str, start: float, end: float, step: float) -> list[Series]:
    """A range query over [start, end] as consecutive queries of at most CHUNK_SECONDS, on one grid of `step`, each
    label set's points joined in time order."""
    span = step * max(1, int(CHUNK_SECONDS // step))
    joined: dict[tuple[tuple[str, str], ...], Series] = {}
    at = start
    while at <= end:
        last = min(at + span, end)
        for series in source.range(query, at, last, step):
            key = tuple(sorted(series.labels.items()))
            if key in joined:
                joined[key].points.extend(series.points)
            else:
                joined[key] = Series(dict(series.labels), list(series.points))
        at = last + step
    return list(joined.values())


def _rates(counts: list[Series], sampled_at: list[Series], grid: list[float], window: float) -> list[Series]:
    """Per edge, its delivered rate at each grid time: the counter's increase between its first and last sample in
    the window before that time, over the time between them (no sample, or one: no rate)."""
    times = {tuple(sorted(s.labels.items())): dict(s.points) for s in sampled_at}
    found = []
    for s in counts:
        when = times.get(tuple(sorted(s.labels.items())), {})
        samples = sorted({when[t]: v for t, v in s.points if t in when}.items())  # one per scrape
        stamps = [ts for ts, _ in samples]
        points = []
        for t in grid:
            lo, hi = bisect.bisect_right(stamps, t - window), bisect.bisect_right(stamps, t) - 1
            if hi > lo and samples[hi][1] >= samples[lo][1]:  # two samples at least; a lower value: a reset
                points.append((t, (samples[hi][1] - samples[lo][1]) / (samples[hi][0] - samples[lo][0])))
        found.append(Series(s.labels, points))
    return found


def _edges(series: list[Series], planned: dict) -> dict[Edge, list[tuple[float, float]]]:
    found: dict[Edge, list[tuple[float, float]]] = {}
    for s in series:
        labels = [s.labels.get(name, "") for name in EDGE_LABELS]
        edge = Edge(client=labels[0], client_namespace=labels[1], client_cluster=labels[2], server=labels[3],
                    server_namespace=labels[4], server_cluster=labels[5])
        touches = ((edge.client_cluster, edge.client_namespace, edge.client) in planned
                   or (edge.server_cluster, edge.server_namespace, edge.server) in planned)
        if touches:
            found[edge] = s.points
    return found


def _max_drop(plan: Plan, planned: dict, edge: Edge) -> float:
    service = planned.get((edge.server_cluster, edge.server_namespace, edge.server))
    settings = service.settings(plan.defaults) if service is not None else plan.defaults
    return settings.thresholds.max_success_drop


def _check(edge: Edge, shares: list[tuple[float, float]], before: float, floor: float, step: float,
           start: float) -> EdgeCheck:
    lowest_at, lowest = min(shares, key=lambda p: p[1]) if shares else (start, 1.0)
    return EdgeCheck(edge=edge, before_rps=before, floor=floor, lowest=lowest, lowest_at=lowest_at,
                     seconds_below=step * sum(_runs_below(shares, floor)))


def _runs_below(shares: list[tuple[float, float]], floor: float) -> list[int]:
    """The lengths of the runs of evaluations below the floor that last at least MIN_RUN. A request lost at any
    moment lowers every evaluation whose window holds it: window / step of them (3), one after another; a lone low
    evaluation is no such loss."""
    runs, length = [], 0
    for _, share in [*shares, (0.0, float("inf"))]:
        if share < floor:
            length += 1
            continue
        if length >= MIN_RUN:
            runs.append(length)
        length = 0
    return runs
