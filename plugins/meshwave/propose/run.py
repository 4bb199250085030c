"""The proposer end to end: inventory, call graph, waves, cost, the plan text and its summary."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshwave.propose import summary
from meshwave.propose.callgraph import USER, Source, read_graph, working_sets
from meshwave.propose.cost import Cost, project
from meshwave.propose.inventory import read_inventory, with_exclusions, with_working_sets
from meshwave.propose.models import CallGraph, Inventory, PlannedService, PlannedWave, Proposal, Workload
from meshwave.propose.order import OrderInput, order
from meshwave.propose.plan_file import render

if TYPE_CHECKING:
    from meshwave.kube import MeshKube

WHY = {USER: "not traced: its calls start new traces (a caller outside Kubernetes, a legacy app, or one without "
             "tracing)",
       "unknown": "a caller without a sidecar that no trace names"}
UNSEEN = "unseen callers"
UNSEEN_WHY = ("requests its own metrics count that no trace and no proxy attribute to a caller: an untraced caller "
              "of a service that is not traced itself")
OUTSIDE = "not a Deployment of the clusters read (outside Kubernetes, a Job or CronJob, or a cluster not given)"


@dataclass(frozen=True)
class Options:
    migration: str
    lookback: str
    lookback_seconds: float
    max_wave: int = 20
    max_batch: int = 3
    expected_memory_mi: float = 150
    per_hop_ms: tuple[float, float] = (35, 50)
    idle_last: bool = True
    excluded: Mapping[str, str] = field(default_factory=dict)  # inventory key -> why its team cannot mesh it
    defaults: Mapping[str, Any] | None = None  # a plan's own defaults to carry (--defaults-from), None: meshwave's
    defaults_from: str = ""


@dataclass(frozen=True)
class Result:
    inventory: Inventory
    graph: CallGraph
    proposal: Proposal
    cost: Cost
    plan: str
    summary: str


def propose(kubes: Mapping[str, MeshKube], sources: Mapping[str, Source], connections: Mapping[str, tuple[str, str]],
            options: Options, header: list[str]) -> Result:
    inventory = with_exclusions(read_inventory(dict(kubes)), options.excluded)
    inventory = with_working_sets(inventory, working_sets(dict(sources), options.lookback))
    graph = read_graph(dict(sources), inventory, options.lookback, options.lookback_seconds)
    proposal = plan_waves(inventory, graph, options)
    cost = project(inventory, graph, proposal, options.per_hop_ms)
    text = render(options.migration, connections, proposal, header + summary.header_lines(proposal, cost),
                  options.max_batch, options.expected_memory_mi, options.defaults, options.defaults_from)
    return Result(inventory, graph, proposal, cost, text, summary.markdown(inventory, graph, proposal, cost, options))


def plan_waves(inventory: Inventory, graph: CallGraph, options: Options) -> Proposal:
    workloads = inventory.by_key()
    plannable = {k: w for k, w in workloads.items() if not w.gateway and w.cannot_mesh is None}
    callers: dict[str, dict[str, float]] = defaultdict(dict)
    for e in graph.edges:
        if e.server in plannable:
            callers[e.server][e.client] = callers[e.server].get(e.client, 0.0) + e.rate
    _add_unseen(callers, graph, plannable)
    meshed = frozenset(k for k, w in workloads.items() if w.meshed)
    unmeshable = _unmeshable(callers, plannable, meshed, workloads)
    idle = frozenset(k for k in plannable if not callers.get(k) and graph.app_rates.get(k, 0.0) <= 0)
    waves = order(OrderInput(services={k: w.criticality for k, w in plannable.items()}, callers=callers,
                             meshed=meshed, unmeshable=unmeshable, idle=idle, max_wave=options.max_wave,
                             max_batch=options.max_batch, idle_last=options.idle_last))
    undersized = {k: _needs(w, options.expected_memory_mi) for k, w in plannable.items()
                  if _needs(w, options.expected_memory_mi)}
    planned = [PlannedWave(name=f"wave-{i + 1}", description=_describe(i, wave, idle),
                           services=[_sized(s, plannable[s.key], options.expected_memory_mi) for s in wave])
               for i, wave in enumerate(waves) if wave]
    used_by: dict[str, list[str]] = defaultdict(list)
    for server, found in callers.items():
        for caller in found:
            if caller in unmeshable:
                used_by[caller].append(server)
    return Proposal(waves=planned, idle=sorted(idle), undersized=dict(sorted(undersized.items())),
                    excluded={k: w.cannot_mesh for k, w in sorted(workloads.items())
                              if w.cannot_mesh and not w.gateway},
                    unmeshable_callers={c: sorted(s) for c, s in sorted(used_by.items())},
                    notes=list(graph.notes))


def _add_unseen(callers: dict[str, dict[str, float]], graph: CallGraph, plannable: Mapping[str, Workload]) -> None:
    """A service whose own request count is well above what its known callers send has callers nobody sees (neither
    side traced, no proxy yet): they count as one caller that cannot be meshed, so it is not planned STRICT."""
    seen: dict[str, float] = defaultdict(float)
    for e in graph.edges:
        if e.protocol == "http":
            seen[e.server] += e.rate
    for key in plannable:
        served = graph.app_rates.get(key, 0.0)
        unseen = served - seen.get(key, 0.0)
        if unseen > max(0.01 * served, 0.01):  # 1 %: the counts are of the same scrapes (callgraph._query_all)
            callers[key][UNSEEN] = round(unseen, 6)


def _unmeshable(callers: Mapping[str, Mapping[str, float]], plannable: Mapping[str, Workload],
                meshed: frozenset[str], workloads: Mapping[str, Workload]) -> dict[str, str]:
    found = {}
    for found_callers in callers.values():
        for caller in found_callers:
            if caller in plannable or caller in meshed:
                continue
            w = workloads.get(caller)
            found[caller] = w.cannot_mesh if w is not None and w.cannot_mesh else \
                WHY.get(caller, UNSEEN_WHY if caller == UNSEEN else OUTSIDE)
    return found


def _needs(w: Workload, expected_mi: float) -> str:
    """What an undersized proxy needs: its own memory limit is under the sidecar's expected working set (the preflight
    would block it, the proxy would be OOMKilled)."""
    limit = w.proxy.memory_limit_mi
    if limit is None or limit >= expected_mi:
        return ""
    needed = math.ceil(expected_mi * 1.25 / 16) * 16  # a quarter over the expected working set, in 16Mi steps
    pod = f"; the pod then needs {w.app_memory_limit_mi + needed:g}Mi (app {w.app_memory_limit_mi:g}Mi)" \
        if w.app_memory_limit_mi else ""
    return (f"istio-proxy memory limit {limit:g}Mi ({w.proxy.source}) < the sidecar's expected {expected_mi:g}Mi: "
            f"needs {needed}Mi{pod}")


def _sized(s: PlannedService, w: Workload, expected_mi: float) -> PlannedService:
    needs = _needs(w, expected_mi)
    if not needs:
        return s
    needed = needs.split("needs ", 1)[1].split("Mi", 1)[0]
    return s.model_copy(update={"sidecar_memory_limit": f"{needed}Mi",
                                "note": f"undersized: {needs}; this plan raises the proxy's limit: agree it with "
                                        "the team that set it"})


def _describe(index: int, wave: list[PlannedService], idle: frozenset[str]) -> str:
    strict = sum(1 for s in wave if s.strict)
    if wave and all(s.key in idle for s in wave):
        what = "services with no observed traffic, PERMISSIVE only"
    elif index == 0:
        what = "pilot: low-criticality, low fan-in services whose callers are meshed or outside the plan"
    else:
        what = "callers before their callees"
    return f"{what}; {len(wave)} service{'s' if len(wave) != 1 else ''}, {strict} planned STRICT"
