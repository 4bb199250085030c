"""Waves from the call graph. Pure: graphs in, waves out (tests/unit/test_propose_order.py builds them by hand).

- Strongly connected services (a cycle of calls) are one unit: they go in the same wave, or none of them could be
  STRICT before the others have a sidecar.
- Callers first: a unit is placed once every caller that can be planned is placed (in an earlier wave, or earlier in
  this one: a wave's batches run in order, so a caller is never in a later batch than its callee). The call graph
  condensed to units has no cycle, so some unit is always ready.
- Among the ready units, the least risky first: lowest criticality, then fewest callers (fan-in), then by name. The
  first wave is the pilot: one batch, of low and medium services when any is ready.
- STRICT only when every caller is meshed in the same or an earlier wave (or is an Envoy already: a gateway, a
  workload whose pods all run a sidecar). A caller that cannot be meshed keeps it PERMISSIVE (`strict: false`)
  with the callers as its reason.
- Services with no observed traffic go last, `strict: false` (nothing proves who would call them), unless asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshwave.propose.models import CRITICALITY_RANK, PlannedService


@dataclass(frozen=True)
class OrderInput:
    services: Mapping[str, str]  # plannable key -> criticality
    callers: Mapping[str, Mapping[str, float]]  # server key -> {caller: requests/s}
    meshed: frozenset[str] = frozenset()  # callers that speak mTLS already (gateways, fully injected)
    unmeshable: Mapping[str, str] = field(default_factory=dict)  # caller -> why it can never get a sidecar
    idle: frozenset[str] = frozenset()  # plannable services with no observed traffic
    max_wave: int = 20
    max_batch: int = 3
    idle_last: bool = True


def order(data: OrderInput) -> list[list[PlannedService]]:
    last = data.idle if data.idle_last else frozenset()
    planned = [k for k in data.services if k not in last]
    units = components(planned, {s: [c for c in data.callers.get(s, {}) if c in planned] for s in planned})
    waves = _place(units, data, planned)
    where = {s.key: i for i, wave in enumerate(waves) for s in wave}
    idle = sorted(last)
    for start in range(0, len(idle), data.max_wave):
        chunk = idle[start:start + data.max_wave]
        waves.append([PlannedService(key=k, criticality=data.services[k], strict=False,  # type: ignore[arg-type]
                                     reason="no observed traffic in the lookback: nothing shows who calls it")
                      for k in chunk])
        where |= {k: len(waves) - 1 for k in chunk}
    return [[_strict(s, i, where, data) if s.key not in last else s for s in wave] for i, wave in enumerate(waves)]


def components(nodes: Iterable[str], callers: Mapping[str, Iterable[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components (Tarjan, iterative: call chains may be deep), each sorted by name."""
    nodes = sorted(nodes)
    callees: dict[str, list[str]] = {n: [] for n in nodes}
    for server, found in callers.items():
        for caller in found:
            if caller in callees and server in callees:
                callees[caller].append(server)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[tuple[str, ...]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(callees[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(callees[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                unit = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    unit.append(member)
                    if member == node:
                        break
                result.append(tuple(sorted(unit)))
    return result


def _place(units: list[tuple[str, ...]], data: OrderInput, planned: list[str]) -> list[list[PlannedService]]:
    unit_of = {k: u for u in units for k in u}
    outside_callers = {u: {c for k in u for c in data.callers.get(k, {}) if c in unit_of and unit_of[c] != u}
                       for u in units}
    placed: set[tuple[str, ...]] = set()
    waves: list[list[PlannedService]] = []
    while len(placed) < len(units):
        pilot = not waves
        cap = data.max_batch if pilot else data.max_wave
        wave: list[PlannedService] = []
        while True:
            ready = [u for u in units if u not in placed and all(unit_of[c] in placed for c in outside_callers[u])]
            calm = [u for u in ready if _rank(u, data) <= CRITICALITY_RANK["medium"]]
            if pilot and (calm or wave):  # the pilot takes high and critical services only when nothing else can go
                ready = calm
            fits = [u for u in sorted(ready, key=lambda u: _priority(u, data)) if len(wave) + len(u) <= cap]
            if not fits and not wave and ready:  # a cycle larger than a wave: alone, whole
                fits = [min(ready, key=lambda u: _priority(u, data))]
            if not fits:
                break
            unit = fits[0]
            placed.add(unit)
            wave += [PlannedService(key=k, criticality=data.services[k], strict=True)  # type: ignore[arg-type]
                     for k in unit]
        waves.append(wave)
    return waves


def _rank(unit: tuple[str, ...], data: OrderInput) -> int:
    return max(CRITICALITY_RANK.get(data.services[k], 1) for k in unit)


def _priority(unit: tuple[str, ...], data: OrderInput) -> tuple[int, int, str]:
    fan_in = len({c for k in unit for c in data.callers.get(k, {}) if c not in unit})
    return _rank(unit, data), fan_in, unit[0]


def _strict(service: PlannedService, wave: int, where: Mapping[str, int], data: OrderInput) -> PlannedService:
    problems = []
    for caller, rate in sorted(data.callers.get(service.key, {}).items()):
        if caller == service.key or caller in data.meshed:
            continue
        if caller in where:
            if where[caller] > wave:
                problems.append(f"{caller} is planned later (wave {where[caller] + 1}), {rate:.3g}/s")
            continue
        why = data.unmeshable.get(caller, "not a workload that can be planned")
        problems.append(f"{caller} ({why}), {rate:.3g}/s")
    if not problems:
        return service
    return service.model_copy(update={"strict": False,
                                      "reason": "callers that stay without a sidecar: " + "; ".join(problems)})
