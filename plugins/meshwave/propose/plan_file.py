"""The proposal as a plan file that `meshwave plan validate` and the DAG factory accept, with the reasons as comments
(a reviewer reads why a service is not STRICT next to it)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from meshwave.plan import PlanError, load_plan, parse_plan
from meshwave.propose.models import PlannedService, Proposal

DEFAULTS_NOTE = "# everything else (soak, thresholds, timeouts) as meshwave's defaults: review before the first run"


def carried_defaults(path: Path) -> dict[str, Any]:
    """The `defaults:` a plan sets (only what it sets, checked by the plan's schema), to carry into a proposal: the
    soaks, thresholds and timeouts a team reviewed survive the plan being proposed again."""
    try:
        return load_plan(path).defaults.model_dump(exclude_unset=True)
    except PlanError as exc:
        raise ValueError(f"--defaults-from: {exc}") from None


def render(migration: str, connections: Mapping[str, tuple[str, str]], proposal: Proposal, header: list[str],
           max_batch: int, expected_memory_mi: float, carried: Mapping[str, Any] | None = None,
           carried_from: str = "") -> str:
    lines = [f"# {line}" if line else "#" for line in header]
    lines += [f"migration: {migration}", "clusters:"]
    for cluster, (kube_conn, prom_conn) in sorted(connections.items()):
        lines.append(f"  {cluster}: {{kubernetes_conn_id: {kube_conn}, prometheus_conn_id: {prom_conn}}}")
    lines += ["defaults:", *_defaults(max_batch, expected_memory_mi, carried, carried_from), "waves:"]
    previous = None
    for wave in proposal.waves:
        lines.append(f"  - name: {wave.name}")
        if wave.description:
            lines.append(f"    description: {_flow(wave.description)}")
        if previous:
            lines.append(f"    after: {previous}")
        lines.append("    services:")
        for service in wave.services:
            lines += _service(service)
        previous = wave.name
    text = "\n".join(lines) + "\n"
    parse_plan(yaml.safe_load(text), "<proposed plan>")  # never write a plan that would not load
    return text


def _defaults(max_batch: int, expected_memory_mi: float, carried: Mapping[str, Any] | None,
              carried_from: str) -> list[str]:
    if carried is None:
        return [DEFAULTS_NOTE.replace("#", "  #", 1), f"  batch_size: {max_batch}",
                f"  sidecar: {{expected_memory_mi: {expected_memory_mi:g}}}"]
    values = {**carried, "batch_size": max_batch,  # the proposal's own: its pilot and sizing used them
              "sidecar": {**(carried.get("sidecar") or {}), "expected_memory_mi": expected_memory_mi}}
    note = f"  # carried from {carried_from} (--defaults-from); meshwave's defaults for anything it does not set"
    return [note, *[f"  {key}: {_flow(value)}" for key, value in values.items()]]


def _flow(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False,
                          width=math.inf)  # type: ignore[arg-type]
    return text.strip().removesuffix("...").strip()  # a bare scalar is dumped as a document: "x\n...\n"


def _plain(value: Any) -> Any:
    """Whole floats as integers (the schema's floats dump as 250.0 where the reviewer wrote 250)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _service(s: PlannedService) -> list[str]:
    cluster, namespace, workload = s.key.split("/")
    fields = [f"cluster: {cluster}", f"namespace: {namespace}", f"workload: {workload}",
              f"criticality: {s.criticality}"]
    if not s.strict:
        fields.append("strict: false")
    if s.sidecar_memory_limit:
        fields.append(f"sidecar: {{memory_limit: {s.sidecar_memory_limit}}}")
    comments = [f"      # strict: false: {s.reason}"] if not s.strict else []
    if s.note:
        comments.append(f"      # {s.note}")
    return comments + [f"      - {{{', '.join(fields)}}}"]

