"""The summary next to the plan: a markdown page, and a picture of the call graph coloured by wave (networkx and
matplotlib, imported only when the picture is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshwave.propose.models import CallGraph, Inventory, Proposal

if TYPE_CHECKING:
    from meshwave.propose.cost import Cost, Resources
    from meshwave.propose.run import Options


def header_lines(proposal: Proposal, cost: Cost) -> list[str]:
    services = [s for w in proposal.waves for s in w.services]
    strict = sum(1 for s in services if s.strict)
    return ["", f"{len(proposal.waves)} waves, {len(services)} services: {strict} STRICT, "
            f"{len(services) - strict} PERMISSIVE (strict: false, the reason above each); "
            f"{len(proposal.excluded)} not planned (cannot take a sidecar), {len(proposal.idle)} idle (last wave).",
            f"Adds {cost.fleet.sidecars} sidecars: requests {cost.fleet.cpu_request_m:g}m cpu / "
            f"{cost.fleet.memory_request_mi:g}Mi, limits {cost.fleet.cpu_limit_m:g}m / "
            f"{cost.fleet.memory_limit_mi:g}Mi." + _chain_line(cost),
            *[f"Not planned: {key}: {why}" for key, why in proposal.excluded.items()], ""]


def _chain_line(cost: Cost) -> str:
    if not cost.chains:
        return ""
    c = cost.chains[0]
    return f" Longest chain: {c.hops} hops with a proxy, +{c.added_ms_low:g}-{c.added_ms_high:g} ms."


def markdown(inventory: Inventory, graph: CallGraph, proposal: Proposal, cost: Cost, options: Options) -> str:
    lines = [f"# Proposed migration `{options.migration}`", "",
             f"From {len(inventory.workloads)} Deployments in {len({w.cluster for w in inventory.workloads})} "
             f"clusters and {len(graph.edges)} observed call edges over the last {options.lookback} "
             f"(the tracing service graph where no sidecar runs, Istio's metrics where one does).", ""]
    lines += header_lines(proposal, cost)[1:3] + ["", "## Waves", "", "| wave | services | STRICT | what |",
                                                  "|---|---|---|---|"]
    for wave in proposal.waves:
        lines.append(f"| {wave.name} | {len(wave.services)} | {sum(1 for s in wave.services if s.strict)} | "
                     f"{wave.description} |")
    lines += ["", "## Not STRICT, and why", ""]
    lines += [f"- `{s.key}` ({w.name}): {s.reason}" for w in proposal.waves for s in w.services if not s.strict] or \
        ["- none"]
    lines += ["", "## Callers that can never be meshed", ""]
    lines += [f"- `{c}`: calls {', '.join(f'`{s}`' for s in servers)}" for c, servers in
              proposal.unmeshable_callers.items()] or ["- none"]
    lines += ["", "## Not planned (cannot take a sidecar)", ""]
    lines += [f"- `{k}`: {why}" for k, why in proposal.excluded.items()] or ["- none"]
    lines += ["", "## Undersized proxies", ""]
    lines += [f"- `{k}`: {why}" for k, why in proposal.undersized.items()] or ["- none"]
    lines += ["", "## Cost", "", "| cluster | services | sidecars | cpu requests | cpu limits | memory requests | "
              "memory limits |", "|---|---|---|---|---|---|---|"]
    for name, r in [*cost.clusters.items(), ("fleet", cost.fleet)]:
        lines.append(_cost_row(name, r))
    low, high = cost.per_hop_ms
    lines += ["", f"Latency added along the longest call chains, at {low:g}-{high:g} ms per hop that gains a proxy "
              "(the seed measured 35-50 ms per hop):", ""]
    lines += [f"- {c.hops} hops, +{c.added_ms_low:g}-{c.added_ms_high:g} ms: {' -> '.join(c.path)}"
              for c in cost.chains] or ["- no chain gains a proxy"]
    if proposal.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in proposal.notes]]
    return "\n".join(lines) + "\n"


def _cost_row(name: str, r: Resources) -> str:
    unlimited = f" (+{r.without_cpu_limit} unlimited)" if r.without_cpu_limit else ""
    return (f"| {name} | {r.services} | {r.sidecars} | {r.cpu_request_m:g}m | {r.cpu_limit_m:g}m{unlimited} | "
            f"{r.memory_request_mi:g}Mi | {r.memory_limit_mi:g}Mi |")


def picture(graph: CallGraph, proposal: Proposal, path: Path) -> None:
    """The call graph coloured by wave, as a PNG at `path`: one column per wave, left to right in the order they
    run, and the callers outside the plan in a first, grey column (a layout without scipy, linear in the services:
    networkx's force-directed one needs scipy from 500 nodes on)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    import networkx as nx
    from matplotlib.patches import Patch

    wave_of = {s.key: i + 1 for i, w in enumerate(proposal.waves) for s in w.services}
    g = nx.DiGraph()
    g.add_nodes_from(wave_of)  # a service nobody calls (an idle one) is planned too
    for e in graph.edges:
        g.add_edge(e.client, e.server)
    nx.set_node_attributes(g, {n: wave_of.get(n, 0) for n in g.nodes}, "wave")
    positions: Any = nx.multipartite_layout(g, subset_key="wave")
    colours = [_colour(plt, wave_of.get(n), len(proposal.waves)) for n in g.nodes]
    tallest = max(sum(1 for n in g.nodes if g.nodes[n]["wave"] == w) for w in {0, *wave_of.values()})
    fig = plt.figure(figsize=(max(12, 2.2 * (len(proposal.waves) + 1)), min(200, max(8, 0.18 * tallest))))
    nx.draw_networkx_nodes(g, positions, node_color=colours, node_size=60)
    nx.draw_networkx_edges(g, positions, arrowsize=5, width=0.3, node_size=60, alpha=0.5)
    beside = {n: (x + 0.01, y) for n, (x, y) in positions.items()}
    nx.draw_networkx_labels(g, beside, labels={n: n.rsplit("/", 1)[-1] for n in g.nodes}, font_size=5,
                            horizontalalignment="left")
    legend = [Patch(color=_colour(plt, i + 1, len(proposal.waves)), label=w.name) for i, w in
              enumerate(proposal.waves)] + [Patch(color=_colour(plt, None, 0), label="not planned")]
    plt.legend(handles=legend, loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    plt.title("call graph by wave (left to right: the order the waves run)")
    plt.axis("off")
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")  # path: a temp name without the suffix
    plt.close(fig)


def _colour(plt: Any, wave: int | None, waves: int) -> Any:
    if wave is None:
        return "lightgrey"
    return plt.get_cmap("viridis")((wave - 1) / max(waves - 1, 1))
