"""The proposal as a plan file that `meshwave plan validate` and the DAG factory accept, with the reasons as comments
(a reviewer reads why a service is not STRICT next to it)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import yaml

from meshwave.plan import parse_plan
from meshwave.propose.models import PlannedService, Proposal

DEFAULTS_NOTE = "# everything else (soak, thresholds, timeouts) as meshwave's defaults: review before the first run"


def render(migration: str, connections: Mapping[str, tuple[str, str]], proposal: Proposal, header: list[str],
           max_batch: int, expected_memory_mi: float) -> str:
    lines = [f"# {line}" if line else "#" for line in header]
    lines += [f"migration: {migration}", "clusters:"]
    for cluster, (kube_conn, prom_conn) in sorted(connections.items()):
        lines.append(f"  {cluster}: {{kubernetes_conn_id: {kube_conn}, prometheus_conn_id: {prom_conn}}}")
    lines += ["defaults:", DEFAULTS_NOTE.replace("#", "  #", 1), f"  batch_size: {max_batch}",
              f"  sidecar: {{expected_memory_mi: {expected_memory_mi:g}}}", "waves:"]
    previous = None
    for wave in proposal.waves:
        lines.append(f"  - name: {wave.name}")
        if wave.description:
            lines.append(f"    description: {_quoted(wave.description)}")
        if previous:
            lines.append(f"    after: {previous}")
        lines.append("    services:")
        for service in wave.services:
            lines += _service(service)
        previous = wave.name
    text = "\n".join(lines) + "\n"
    parse_plan(yaml.safe_load(text), "<proposed plan>")  # never write a plan that would not load
    return text


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


def _quoted(text: str) -> str:
    return yaml.safe_dump(text, width=math.inf).strip().removesuffix("...").strip()  # type: ignore[arg-type]
