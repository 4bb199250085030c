"""Build deploy/grafana/meshwave-dashboard.json from the gates' own PromQL (include/promql/queries.yaml).

Every panel target is a queries.yaml template rendered with Grafana variables instead of a workload's values, so
the dashboard shows exactly what the gates read: change a gate's query, run this script, and the panel follows.
tests/unit/test_monitoring.py fails while the committed JSON differs from what this script builds.

    .venv/bin/python deploy/grafana/build_dashboard.py          # rewrite the JSON
    .venv/bin/python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is out of date

A target's refId is the name of its query in queries.yaml (unique within a panel), so a reader, and the tests, can
tell which template each expression comes from. The thresholds in the descriptions are the plan's defaults
(meshwave.plan.Settings); a plan may set its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from meshwave.plan import Canary, Settings
from meshwave.prometheus import QUERIES_PATH, QueryTemplate, load_queries

OUTPUT = Path(__file__).resolve().parent / "meshwave-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# queries.yaml's placeholders as Grafana variables. $cluster is a whole matcher in the templates (", cluster=..."),
# so the variable goes inside it; $__rate_interval is Grafana's safe rate() window (at least 4 scrape intervals).
GRAFANA_VALUES = {"namespace": "$namespace", "workload": "$workload", "window": "$__rate_interval",
                  "cluster": ', cluster="$cluster"'}
# A subquery's range ([$window:step]) must not shrink to $__rate_interval's few scrapes: it gets a fixed range.
SUBQUERY_RANGE = "5m"
CANARY = "$workload-canary"  # canary.canary_name: the canary Deployment of the primary $workload
# The variables every panel depends on; `workload` lists Deployments that are not themselves canaries.
VARIABLE_METRIC = "kube_deployment_spec_replicas"


@dataclass(frozen=True)
class Target:
    query: str                 # a name in queries.yaml
    legend: str
    workload: str = "$workload"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    gate: str                  # which gate reads it, and the plan's threshold
    targets: tuple[Target, ...]
    max: float | None = None
    bars: bool = False         # events and amounts per interval, not levels


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def render(template: QueryTemplate, workload: str = "$workload") -> str:
    """The template with Grafana variables; `$$1` (a label_replace group) comes out as `$1`, which Grafana leaves
    alone (no variable of that name)."""
    promql = template.promql.replace("[$window:", f"[{SUBQUERY_RANGE}:")
    return Template(promql).substitute({**GRAFANA_VALUES, "workload": workload})


def rows(s: Settings) -> tuple[Row, ...]:
    t = s.thresholds
    judged = (f"with at least min_requests {s.min_requests} requests in the query window "
              f"({s.query_window_seconds} s), {s.breaches_to_fail} breaches in a row")
    p99 = (f"fails only if it is BOTH more than max_p99_increase_ms {t.max_p99_increase_ms:g} ms above and more than "
           f"max_p99_ratio {t.max_p99_ratio:g} x")
    memory = ("not set by default: recorded only" if t.sidecar_memory_limit_mi is None
              else f"default {t.sidecar_memory_limit_mi:g} Mi")
    caller = "{{source_workload_namespace}}/{{source_workload}}"
    container = "{{pod}}/{{container}}"
    return (
        Row("The application's own metrics (before and after the sidecar)", (
            Panel("Success rate (application)", "percentunit",
                  f"Baseline (before injection), then the soak after injection: fails below the baseline minus "
                  f"max_success_drop {t.max_success_drop:g}, {judged}. After STRICT the same query, rendered for "
                  f"each mTLS caller, is that caller's own success rate (same threshold against its rate before).",
                  (Target("app_success_rate", "non-5xx share"),), max=1),
            Panel("Request rate", "reqps",
                  f"Baseline, then the soak: fails below (1 - max_traffic_drop {t.max_traffic_drop:g}) x the baseline "
                  "(requests a new proxy refuses never reach the application). In a namespace that already enforces "
                  "STRICT, the preflight blocks injection while more than 1 % (and 0.01/s) of the served rate comes "
                  "from callers without a sidecar (served minus meshed).",
                  (Target("app_request_rate", "served (all callers)"),
                   Target("meshed_request_rate", "sent by callers with a sidecar"))),
            Panel("Latency p50 / p99 (application)", "ms",
                  f"Baseline, then the soak: the p99 {p99} the baseline p99, {judged}. The p50 is recorded for the "
                  "report.",
                  (Target("app_latency_p50_ms", "p50"), Target("app_latency_p99_ms", "p99"))),
            Panel("Memory of the application's containers", "bytes",
                  "Recorded in the baseline and the report; no threshold. The sidecar comes on top of it: the "
                  f"headroom preflight checks its expected memory (sidecar.expected_memory_mi "
                  f"{s.sidecar.expected_memory_mi:g} Mi by default) against the pod's limits and the namespace's "
                  "quota.",
                  (Target("app_memory_bytes", "{{container}}"),)),
        )),
        Row("Istio, destination side (the workload's own proxy)", (
            Panel("Success rate (Istio, destination)", "percentunit",
                  f"The soak (against the baseline application success rate) and after STRICT (against the rate "
                  f"before): fails below it minus max_success_drop {t.max_success_drop:g}, {judged}. 5xx, code 0 and "
                  "every Envoy response flag count as failures: what the proxy fails itself never reaches the "
                  "application. Plaintext callers refused under STRICT never show here: watch the callers' own "
                  "success rate and the inbound rate.",
                  (Target("istio_success_rate", "success (destination proxy)"),), max=1),
            Panel("Inbound rate (Istio, destination)", "reqps",
                  "The STRICT gate's positive proof: zero plaintext counts only with Istio-reported traffic into the "
                  f"workload in the window. After STRICT: fails below min_inbound_ratio {t.min_inbound_ratio:g} x the "
                  "inbound rate before STRICT.",
                  (Target("istio_inbound_request_rate", "HTTP requests/s"),
                   Target("istio_inbound_tcp_rate", "TCP connections opened/s"))),
        )),
        Row("The sidecar: memory, restarts, OOMKills", (
            Panel("istio-proxy memory against its limit", "bytes",
                  f"The soak: fails above thresholds.sidecar_memory_limit_mi ({memory}). The limit is the "
                  "container's own (sidecar.istio.io/proxyMemoryLimit or the injector's default): over it the kernel "
                  "OOM-kills the proxy, which the OOMKilled panel shows.",
                  (Target("sidecar_memory_bytes", "working set (largest pod)"),
                   Target("sidecar_memory_limit_bytes", "limit (smallest pod)"))),
            Panel("Container restarts", "short",
                  f"The soak and the canary's judgement: fails when a container of the workload's pods restarts more "
                  f"than max_restarts {t.max_restarts} time(s) over the soak so far (one poll is enough: restarts are "
                  "events). The gate counts over the soak so far, the panel per interval.",
                  (Target("container_restarts", container),), bars=True),
            Panel("OOMKilled containers", "short",
                  "The soak and the canary's judgement: any container OOMKilled and restarted fails at once. Empty "
                  "means no OOMKill only while the restarts panel has data.",
                  (Target("oom_killed", container),), bars=True),
        )),
        Row("STRICT gate: plaintext into the workload (what keeps it PERMISSIVE)", (
            Panel("Plaintext HTTP requests by caller", "short",
                  "The STRICT gate passes only with zero plaintext over its lookback (since the sidecar: the soak "
                  f"plus the gate so far, at most strict_gate_timeout_seconds {s.strict_gate_timeout_seconds} s of "
                  "gate) and Istio-reported inbound traffic; any caller here keeps the service PERMISSIVE. "
                  "unknown/unknown is a caller without a sidecar. The gate sums its lookback, the panel counts per "
                  "interval.",
                  (Target("plaintext_http_requests", caller),), bars=True),
            Panel("Plaintext TCP connections by caller", "short",
                  "The STRICT gate, as for HTTP: any plaintext TCP connection opened in its lookback keeps the "
                  "service PERMISSIVE. A long-lived connection opened earlier shows in the bytes panel.",
                  (Target("plaintext_tcp_connections", caller),), bars=True),
            Panel("Plaintext TCP bytes by caller", "bytes",
                  "The STRICT gate, as for HTTP: any plaintext byte received in its lookback (a long-lived "
                  "connection opens nothing new but keeps sending) keeps the service PERMISSIVE.",
                  (Target("plaintext_tcp_bytes", caller),), bars=True),
        )),
        Row("mTLS callers (watched after STRICT)", (
            Panel("mTLS HTTP callers", "reqps",
                  "Listed when the STRICT gate passes; after STRICT each caller's own success rate (its application "
                  "metrics, or its proxy's outbound success rate) must stay above its rate before minus "
                  f"max_success_drop {t.max_success_drop:g}.",
                  (Target("mtls_http_callers", caller),)),
            Panel("mTLS TCP callers", "short",
                  "Connections opened per second over mutual TLS, listed with the HTTP callers when the STRICT gate "
                  "passes.",
                  (Target("mtls_tcp_callers", caller),)),
        )),
        Row("Canary ($workload-canary) against its primary ($workload)", (
            Panel("Success rate: canary against primary", "percentunit",
                  f"The canary's judgement after canary.soak_seconds ({Canary().soak_seconds} s by default): fails "
                  f"when the canary's success rate (its own proxy) is below the primary's (its pods' application "
                  f"metrics) minus max_success_drop {t.max_success_drop:g}, with at least min_requests "
                  f"{s.min_requests} primary requests in the window.",
                  (Target("istio_success_rate", "canary (its proxy)", CANARY),
                   Target("deployment_app_success_rate", "primary (application)")), max=1),
            Panel("p99: canary against primary", "ms",
                  f"The canary's judgement: the canary's p99 (its proxy: application plus proxy time) {p99} the "
                  "primary pods' application p99.",
                  (Target("istio_latency_p99_ms", "canary p99 (its proxy)", CANARY),
                   Target("deployment_app_latency_p99_ms", "primary p99 (application)"))),
            Panel("Canary restarts and OOMKills", "short",
                  f"The canary's judgement: more than max_restarts {t.max_restarts} restart(s), or any OOMKill, of the "
                  "canary's containers over its soak fails it (the primary is then left untouched).",
                  (Target("container_restarts", f"restarts {container}", CANARY),
                   Target("oom_killed", f"OOMKilled {container}", CANARY)), bars=True),
        )),
    )


def description(panel: Panel, queries: dict[str, QueryTemplate]) -> str:
    """The gate and its threshold, then what an empty answer of each query means (never a pass)."""
    empty = "\n".join(f"- `{t.query}` ({queries[t.query].unit}): {queries[t.query].no_series}" for t in panel.targets)
    return f"{panel.gate}\n\nQueries (include/promql/queries.yaml), and what no data means:\n{empty}"


def target(t: Target, queries: dict[str, QueryTemplate]) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "editorMode": "code", "expr": render(queries[t.query], t.workload),
            "legendFormat": t.legend, "range": True, "refId": t.query}


def panel_json(panel: Panel, queries: dict[str, QueryTemplate], panel_id: int, x: int, y: int) -> dict[str, Any]:
    custom = {"drawStyle": "bars" if panel.bars else "line", "fillOpacity": 30 if panel.bars else 10,
              "lineWidth": 1, "showPoints": "never", "spanNulls": False}
    defaults: dict[str, Any] = {"color": {"mode": "palette-classic"}, "custom": custom, "min": 0, "unit": panel.unit}
    if panel.max is not None:
        defaults["max"] = panel.max
    return {
        "datasource": DATASOURCE, "description": description(panel, queries),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y}, "id": panel_id,
        "options": {"legend": {"calcs": ["lastNotNull", "max"], "displayMode": "table", "placement": "bottom",
                               "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [target(t, queries) for t in panel.targets], "title": panel.title, "type": "timeseries",
    }


def variable(name: str, label: str, selector: str, label_name: str, regex: str = "") -> dict[str, Any]:
    query = f"label_values({VARIABLE_METRIC}{selector}, {label_name})"
    return {"current": {}, "datasource": DATASOURCE, "definition": query, "hide": 0, "includeAll": False,
            "label": label, "multi": False, "name": name, "options": [],
            "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2, "regex": regex, "skipUrlSync": False, "sort": 1, "type": "query"}


def templating() -> dict[str, Any]:
    datasource = {"current": {}, "hide": 0, "includeAll": False, "label": "Prometheus", "multi": False,
                  "name": "datasource", "options": [], "query": "prometheus", "refresh": 1, "regex": "",
                  "skipUrlSync": False, "type": "datasource"}
    return {"list": [
        datasource,
        variable("cluster", "cluster", "", "cluster"),
        variable("namespace", "namespace", '{cluster="$cluster"}', "namespace"),
        # a canary is shown beside its primary, never chosen as the workload itself
        variable("workload", "workload (Deployment)", '{cluster="$cluster", namespace="$namespace"}', "deployment",
                 regex="/^(?!.*-canary$)(.+)$/"),
    ]}


def layout(queries: dict[str, QueryTemplate], settings: Settings) -> list[dict[str, Any]]:
    """Rows (never collapsed: their panels stay at the top level), two panels of half the width per line."""
    panels: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for row in rows(settings):
        panels.append({"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "id": next_id,
                       "panels": [], "title": row.title, "type": "row"})
        y, next_id = y + 1, next_id + 1
        for index, panel in enumerate(row.panels):
            panels.append(panel_json(panel, queries, next_id, 12 * (index % 2), y + 8 * (index // 2)))
            next_id += 1
        y += 8 * ((len(row.panels) + 1) // 2)
    return panels


def build(queries_path: Path = QUERIES_PATH) -> dict[str, Any]:
    queries = load_queries(queries_path)
    return {
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "What meshwave's gates read, per workload: the PromQL of include/promql/queries.yaml. "
                       "Generated by deploy/grafana/build_dashboard.py; see docs/monitoring.md.",
        "editable": True, "graphTooltip": 1, "links": [], "panels": layout(queries, Settings()), "refresh": "30s",
        "schemaVersion": 39, "tags": ["meshwave", "istio"], "templating": templating(),
        "time": {"from": "now-3h", "to": "now"}, "timepicker": {}, "timezone": "",
        "title": "meshwave: migration gates", "uid": "meshwave-gates", "version": 1,
    }


def dump(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is out of date")
    args = parser.parse_args(argv)
    text = dump(build())
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
