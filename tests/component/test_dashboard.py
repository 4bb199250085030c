"""The Grafana dashboard's panels and the alert rules (deploy/) against a real Prometheus scraping the small lab.

Every panel target, its Grafana variables filled in, is asked of Prometheus: it must parse, and return data where
the lab has it. Before any sidecar, for the uninjected `user`: the application's metrics, its memory and restarts,
the primary's side of the canary panels. Then `auth` and `user` (one of its callers) get sidecars, `auth` a canary
and two TCP callers (api-gateway without a sidecar, user with one); `payment` is injected (its istio-proxy is over
its own limit: OOMKilled, the rollout stuck half-way) and gets a canary that is OOMKilled too. Then every target must
answer for `auth`, the OOMKilled ones for `payment`. Every alert expression must parse; those the lab can show must
find what they are about: the OOMKills, the half-injected payment, the canaries, then api-gateway's calls refused by
a STRICT auth, and a proxy that fails a third of user's requests. (`for:` is promtool's to test: the lab runs
minutes, not hours.)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client

from meshstack.process import ROOT, LabProcess, PrometheusProcess
from meshwave.kube import MeshKube, RolloutState
from tests.component.kubes import api_client
from tests.conftest import eventually

pytestmark = pytest.mark.component

DASHBOARD = ROOT / "deploy" / "grafana" / "meshwave-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "meshwave-alerts.rules.yaml"
NS = "shop"
VALUES = {"cluster": "lab", "namespace": NS, "__rate_interval": "30s"}
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# Targets whose metrics exist before any sidecar (the canary panels' primary side included).
BEFORE_INJECTION = {"app_success_rate", "app_request_rate", "app_latency_p50_ms", "app_latency_p99_ms",
                    "app_memory_bytes", "container_restarts", "deployment_app_success_rate",
                    "deployment_app_latency_p99_ms"}
TCP_CALL = {"service": "auth", "protocol": "tcp", "port": 5432, "bytes_per_second": 1000}


def concrete(expr: str, values: Mapping[str, str]) -> str:
    """A target's expression with its Grafana variables replaced; `$1` (label_replace) stays."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return match.group(0) if name.isdigit() else values[name]
    return VARIABLE.sub(value, expr)


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t) for p in panels if p["type"] != "row" for t in p["targets"]]


def label(title: str, target: dict[str, Any]) -> str:
    canary = " (canary)" if "$workload-canary" in target["expr"] else ""
    return f"{title} / {target['refId']}{canary}"


def ask(prom: PrometheusProcess, query: str) -> list[dict[str, Any]]:
    """An instant query that must parse and evaluate: HTTP 200 and status success."""
    response = requests.get(f"{prom.url}/api/v1/query", params={"query": query}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body.get("status") == "success", (query, response.status_code, body)
    return body["data"]["result"]


def settle(kube: MeshKube, name: str, expect_proxy: bool, timeout: float = 45) -> RolloutState:
    def finished() -> RolloutState | None:
        verdict = kube.rollout(NS, name, expect_proxy)
        return None if verdict.status == "progressing" else verdict
    return eventually(finished, timeout=timeout, interval=0.5, what=f"rollout of {NS}/{name}")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def stack(lab: LabProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusProcess]:
    workdir: Path = tmp_path_factory.mktemp("dashboard")
    with PrometheusProcess([lab.metrics_target], workdir / "prom") as prom:
        window = 'min(count_over_time(http_requests_total{namespace="shop", app="user"}[30s]))'
        eventually(lambda: (r := prom.query(window)) and float(r[0]["value"][1]) >= 12, timeout=60, interval=1,
                   what="a full 30 s window of the application's samples")
        yield prom


@pytest.fixture(scope="module")
def meshed(lab: LabProcess, stack: PrometheusProcess) -> PrometheusProcess:
    """auth and user with sidecars, auth's canary, TCP into auth, payment injected (OOMKilled) with a canary."""
    kube = MeshKube(api_client(lab), "lab")
    for name in ("auth", "user", "payment"):
        assert kube.ensure_injected(NS, name, "workload")[0].applied, name
    lab.admin("PATCH", f"/services/lab/{NS}/user", {"calls": [{"service": "auth"}, TCP_CALL]})
    lab.admin("PATCH", f"/services/lab/{NS}/api-gateway", {"calls": [
        {"service": "auth"}, {"service": "user"}, {"service": "payment", "per_request": 0.5}, TCP_CALL]})
    for name in ("auth", "user"):
        assert settle(kube, name, expect_proxy=True).done, name
    assert settle(kube, "payment", expect_proxy=True).failed
    for name in ("auth", "payment"):
        assert kube.ensure_canary(NS, name, 1, "test").applied, name
    eventually(lambda: (c := kube.workload(NS, "auth-canary")).pods_ready == 1 and c.pods_with_proxy == 1,
               timeout=45, interval=0.5, what="auth's canary ready with its sidecar")
    return stack


def answers(prom: PrometheusProcess, title: str, target: dict[str, Any], workload: str) -> list[dict[str, Any]]:
    query = concrete(target["expr"], {**VALUES, "workload": workload})
    return eventually(lambda: ask(prom, query), timeout=60, interval=2,
                      what=f"data for {label(title, target)} ({workload}): {query}")  # type: ignore[return-value]


# ---- the dashboard ---------------------------------------------------------------------------------------------
def test_every_target_parses_and_the_applications_own_panels_answer_before_injection(
        stack: PrometheusProcess) -> None:
    found = dashboard_targets()
    expected, with_data = [], []
    for title, target in found:
        result = ask(stack, concrete(target["expr"], {**VALUES, "workload": "user"}))
        if target["refId"] in BEFORE_INJECTION and "$workload-canary" not in target["expr"]:
            expected.append(label(title, target))
            result = answers(stack, title, target, "user")
        if result:
            with_data.append(label(title, target))
    print(f"\nbefore injection, user: {len(with_data)} of {len(found)} targets with data:", *with_data, sep="\n  ")
    # and nothing else: the others need a sidecar (user's, or its callers') or a canary
    assert with_data == expected


def test_with_sidecars_and_a_canary_every_target_answers(meshed: PrometheusProcess) -> None:
    found = dashboard_targets()
    for title, target in found:
        # auth's pods are healthy: OOMKills are payment's (and its canary's)
        workload = "payment" if target["refId"] == "oom_killed" else "auth"
        result = answers(meshed, title, target, workload)
        assert all(r["value"][1] != "NaN" for r in result) or target["refId"].endswith("_ms"), (title, result)
    panels = {title for title, _ in found}
    print(f"\nafter injection: all {len(found)} targets of {len(panels)} panels with data (auth; OOMKills payment)")


def test_the_panels_show_the_callers_and_the_canary(meshed: PrometheusProcess) -> None:
    titled = {(t["refId"], "$workload-canary" in t["expr"]): (title, t) for title, t in dashboard_targets()}

    def of(query: str, workload: str = "auth", canary: bool = False) -> list[dict[str, Any]]:
        return answers(meshed, *titled[(query, canary)], workload)

    callers = {r["metric"]["source_workload"] for r in of("plaintext_http_requests")}
    assert callers == {"unknown"}, "api-gateway has no sidecar: its plaintext is from `unknown`"
    assert {r["metric"]["source_workload"] for r in of("mtls_http_callers")} == {"user"}
    assert float(of("istio_success_rate", canary=True)[0]["value"][1]) == pytest.approx(1.0)
    killed = of("oom_killed", "payment", canary=True)
    assert {r["metric"]["container"] for r in killed} == {"istio-proxy"}
    assert all(r["metric"]["pod"].startswith("payment-canary-") for r in killed)


# ---- the alerts -------------------------------------------------------------------------------------------------
def alert_exprs() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def test_every_alert_expression_parses_and_finds_what_the_lab_shows(meshed: PrometheusProcess) -> None:
    exprs = alert_exprs()
    for expr in exprs.values():
        ask(meshed, expr)
    killed = eventually(lambda: ask(meshed, exprs["MeshwaveSidecarOOMKilled"]), timeout=60, interval=2,
                        what="payment's OOMKilled proxies")
    assert {r["metric"]["pod"].rsplit("-", 2)[0] for r in killed} <= {"payment", "payment-canary"}  # type: ignore[union-attr]
    partial = eventually(lambda: ask(meshed, exprs["MeshwavePartialInjection"]), timeout=60, interval=2,
                         what="payment half injected")
    assert [r["metric"]["workload"] for r in partial] == ["payment"]  # type: ignore[union-attr]
    canaries = {r["metric"]["deployment"] for r in ask(meshed, exprs["MeshwaveCanaryLeftBehind"])}
    assert canaries == {"auth-canary", "payment-canary"}  # the expression; `for: 2h` decides when it fires


def test_a_strict_auth_shows_as_its_unmeshed_callers_errors(lab: LabProcess, meshed: PrometheusProcess) -> None:
    expr = alert_exprs()["MeshwaveUnmeshedCallerErrors"]
    assert "api-gateway" not in {r["metric"]["app"] for r in ask(meshed, expr)}
    body = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "auth", "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "auth"}}, "mtls": {"mode": "STRICT"}}}
    client.CustomObjectsApi(api_client(lab)).create_namespaced_custom_object(
        "security.istio.io", "v1", NS, "peerauthentications", body)
    started = time.monotonic()
    found = eventually(lambda: [r for r in ask(meshed, expr) if r["metric"]["app"] == "api-gateway"], timeout=90,
                       interval=2, what="api-gateway's errors once auth refuses its plaintext")
    print(f"\nSTRICT on auth: api-gateway's error ratio {found[0]['value'][1]} after "  # type: ignore[index]
          f"{time.monotonic() - started:.0f} s")


def test_a_proxy_failing_requests_shows_as_a_low_istio_success_rate(lab: LabProcess,
                                                                   meshed: PrometheusProcess) -> None:
    expr = alert_exprs()["MeshwaveIstioSuccessRateLow"]
    assert "user" not in {r["metric"]["destination_workload"] for r in ask(meshed, expr)}
    # user's proxy fails a third of what it accepts (503 UF): the application never sees those requests
    lab.admin("PATCH", f"/services/lab/{NS}/user", {"proxy_drop": 0.3})
    found = eventually(lambda: [r for r in ask(meshed, expr) if r["metric"]["destination_workload"] == "user"],
                       timeout=90, interval=2, what="user's Istio success rate below 95 %")
    print(f"\nproxy_drop 0.3 on user: its Istio success rate {found[0]['value'][1]}")  # type: ignore[index]
