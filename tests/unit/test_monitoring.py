"""The monitoring an SRE team runs next to meshwave (deploy/): the Grafana dashboard is the gates' own PromQL and
cannot drift from include/promql/queries.yaml; the alert rules pass promtool's checks and unit tests, and the
PrometheusRule and the plain rule file hold the same groups."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from meshwave.prometheus import QUERIES_PATH, load_queries

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULE = PROMETHEUS / "meshwave-alerts.yaml"
RULES = PROMETHEUS / "meshwave-alerts.rules.yaml"
RULES_TEST = PROMETHEUS / "meshwave-alerts.test.yaml"
DOC = ROOT / "docs" / "monitoring.md"
# $name or ${name}; `$1` is label_replace's group reference, not a variable (Grafana leaves unknown names alone).
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
EXPR_VARIABLES = {"cluster", "namespace", "workload", "__rate_interval"}


def _script(path: Path) -> ModuleType:
    """A deploy/ script as a module (deploy/ is not a package); registered first, as dataclasses need."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


build_dashboard = _script(GRAFANA / "build_dashboard.py")
build_rules = _script(PROMETHEUS / "build_rules.py")


def variables(text: str) -> set[str]:
    return {m.group(1) or m.group(2) for m in VARIABLE.finditer(text)} - {str(n) for n in range(10)}


def targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if not found:
        pytest.skip("promtool is not installed (the Debian prometheus package `make setup` installs has it)")
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "meshwave-dashboard.json").read_text())


# ---- the dashboard ---------------------------------------------------------------------------------------------
def test_the_committed_dashboard_is_what_the_script_builds_from_queries_yaml() -> None:
    committed = (GRAFANA / "meshwave-dashboard.json").read_text()
    assert committed == build_dashboard.dump(build_dashboard.build()), \
        "deploy/grafana/meshwave-dashboard.json is out of date: run deploy/grafana/build_dashboard.py"


def test_every_target_is_a_gate_query_rendered_with_grafana_variables(dashboard: dict[str, Any]) -> None:
    queries = load_queries(QUERIES_PATH)
    found = targets(dashboard)
    assert len(found) >= 20
    for title, target in found:
        template = queries[target["refId"]]  # the refId names the query
        workload = "$workload-canary" if "$workload-canary" in target["expr"] else "$workload"
        assert target["expr"] == build_dashboard.render(template, workload), title
        assert "$window" not in target["expr"] and "$$" not in target["expr"], title


def test_a_changed_gate_query_changes_the_dashboard(tmp_path: Path) -> None:
    text = QUERIES_PATH.read_text().replace(
        'sum(rate(http_requests_total{namespace="$namespace", app="$workload"$cluster}[$window]))',
        'sum(rate(http_requests_total{namespace="$namespace", app="$workload", job="app"$cluster}[$window]))')
    assert text != QUERIES_PATH.read_text()
    changed = tmp_path / "queries.yaml"
    changed.write_text(text)
    rate = {t["refId"]: t["expr"] for _, t in targets(build_dashboard.build(changed))}["app_request_rate"]
    assert rate == 'sum(rate(http_requests_total{namespace="$namespace", app="$workload", job="app", ' \
                   'cluster="$cluster"}[$__rate_interval]))'


def test_expressions_use_only_the_dashboards_variables(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert defined == {"datasource", "cluster", "namespace", "workload"}
    for title, target in targets(dashboard):
        assert variables(target["expr"]) <= EXPR_VARIABLES, (title, variables(target["expr"]))
        assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            assert variables(v["query"]["query"]) <= {"cluster", "namespace"}, v["name"]
            assert v["query"]["query"].startswith("label_values(kube_deployment_spec_replicas")


def test_each_panel_says_which_gate_reads_it_and_its_threshold(dashboard: dict[str, Any]) -> None:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        description = panel["description"]
        assert all(f"`{t['refId']}`" in description for t in panel["targets"]), panel["title"]
        assert re.search(r"gate|soak|judgement|baseline|report", description, re.IGNORECASE), panel["title"]
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for expected in ("Success rate (application)", "Request rate", "p50 / p99", "Success rate (Istio",
                     "Inbound rate", "memory against its limit", "restarts", "OOMKilled", "Plaintext HTTP",
                     "Plaintext TCP", "mTLS HTTP callers", "canary against primary"):
        assert expected in titles, expected


def test_the_canary_panels_put_the_canary_beside_its_primary(dashboard: dict[str, Any]) -> None:
    canary = {t["refId"]: t["expr"] for title, t in targets(dashboard) if "canary against primary" in title}
    assert 'destination_workload="$workload-canary"' in canary["istio_success_rate"]
    assert 'destination_workload="$workload-canary"' in canary["istio_latency_p99_ms"]
    assert 'owner_name="$workload"' in canary["deployment_app_success_rate"]
    assert 'owner_name="$workload"' in canary["deployment_app_latency_p99_ms"]
    workload = next(v for v in dashboard["templating"]["list"] if v["name"] == "workload")
    assert "-canary" in workload["regex"]  # a canary is never chosen as the primary


# ---- the alerts -------------------------------------------------------------------------------------------------
def alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_prometheus_rule_and_the_plain_rule_file_hold_the_same_groups() -> None:
    rule = yaml.safe_load(RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert RULES.read_text() == build_rules.plain_rules(RULE.read_text()), "run deploy/prometheus/build_rules.py"


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run([promtool(), "test", "rules", RULES_TEST.name], capture_output=True, text=True,
                            timeout=120, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    assert {a["alert"]: cases.get(a["alert"]) for a in alerts()} == {a["alert"]: {True, False} for a in alerts()}


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_every_alert_has_a_severity_and_a_runbook_in_docs_monitoring() -> None:
    documented = anchors(DOC.read_text())
    for alert in alerts():
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], alert["alert"]
        url, _, anchor = notes["runbook_url"].partition("#")
        assert url.endswith("docs/monitoring.md") and anchor == alert["alert"].lower(), notes["runbook_url"]
        assert anchor in documented, f"docs/monitoring.md has no heading for {alert['alert']}"
