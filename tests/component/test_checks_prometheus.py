"""meshwave.checks against a real Prometheus scraping the lab (small fleet), and the client's failure modes."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kubernetes import client, config

from meshstack.process import LabProcess, PrometheusProcess
from meshwave import checks as c
from meshwave import prometheus as p
from meshwave.prometheus import PrometheusQueryError, PrometheusSource, PrometheusUnavailable
from tests.conftest import SMALL, eventually

pytestmark = pytest.mark.component

WINDOW = "10s"
NS = "shop"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabProcess, PrometheusProcess]]:
    workdir: Path = tmp_path_factory.mktemp("checks-stack")
    with LabProcess(SMALL, workdir / "lab") as lab, PrometheusProcess([lab.metrics_target], workdir / "prom") as prom:
        yield lab, prom


@pytest.fixture(scope="module")
def source(stack) -> Iterator[PrometheusSource]:
    with PrometheusSource(stack[1].url, timeout=5) as src:
        yield src


@pytest.fixture(scope="module")
def k8s(stack) -> tuple[client.CoreV1Api, client.AppsV1Api, client.CustomObjectsApi]:
    api = config.new_client_from_config(config_file=stack[0].kubeconfig())
    return client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)


def restart(k8s, *names: str) -> None:
    """Label the namespace for injection and `kubectl rollout restart` the deployments."""
    core, apps, _ = k8s
    core.patch_namespace(NS, {"metadata": {"labels": {"istio-injection": "enabled"}}})
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for name in names:
        apps.patch_namespaced_deployment(name, NS, {"spec": {"template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": stamp}}}}})


def strict(k8s, workload: str) -> None:
    body = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": workload, "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": workload}}, "mtls": {"mode": "STRICT"}}}
    k8s[2].create_namespaced_custom_object("security.istio.io", "v1", NS, "peerauthentications", body)


def outcomes(verdicts: list[c.Verdict]) -> dict[str, c.Outcome]:
    return {v.check: v.outcome for v in verdicts}


def test_the_migration_of_auth_through_the_checks(stack, source: PrometheusSource, k8s) -> None:
    lab, prom = stack
    full_window = f'min(count_over_time(http_requests_total{{namespace="{NS}", app="auth"}}[{WINDOW}]))'
    eventually(lambda: prom.query(full_window) and float(prom.query(full_window)[0]["value"][1]) >= 5, timeout=40,
               what="a full query window of samples")

    # Before injection: the application's own metrics give the baseline; Istio proves nothing yet.
    base = c.measure_baseline(source, NS, "auth", WINDOW)
    assert base.complete, [n.reason for n in base.notes]
    assert base.success_rate == 1.0
    assert base.request_rate == pytest.approx(40, rel=0.1)
    assert base.request_count is not None and base.request_count > 300
    assert base.p50_ms is not None and base.p99_ms is not None and 3 < base.p50_ms < base.p99_ms < 50
    gate, _ = c.strict_gate(source, NS, "auth", WINDOW)
    assert gate.outcome is c.Outcome.NO_DATA, gate.reason

    # auth and user get sidecars; api-gateway has none: its calls into auth are plaintext from "unknown".
    restart(k8s, "auth", "user")

    def gate_names_the_plaintext_caller() -> tuple[c.Verdict, list[c.Caller]] | None:
        verdict, callers = c.strict_gate(source, NS, "auth", WINDOW)
        mtls = {x.workload: x.rate for x in c.mtls_callers(source, NS, "auth", WINDOW)}
        ok = (verdict.outcome is c.Outcome.FAIL and [x.workload for x in callers] == ["unknown"]
              and abs(callers[0].rate - 20) < 2 and abs(mtls.get("user", 0) - 20) < 2)
        return (verdict, callers) if ok else None

    verdict, callers = eventually(gate_names_the_plaintext_caller, timeout=45, interval=1,
                                  what="STRICT gate failing on api-gateway's plaintext")  # type: ignore[misc]
    assert not callers[0].has_sidecar and callers[0].protocol == "http"
    assert "unknown (a caller without sidecar) http" in verdict.reason

    # After injection, auth is still healthy against its baseline.
    after = eventually(lambda: (vs := c.verify_after_injection(source, base, NS, "auth", WINDOW, c.Thresholds()))
                       and all(v.outcome is c.Outcome.PASS for v in vs) and vs, timeout=20, interval=1,
                       what="auth passing its after-injection checks")
    memory = {v.check: v for v in after}["sidecar_memory"]  # type: ignore[union-attr]
    assert memory.values["working_set_mi"] == pytest.approx(80)

    # api-gateway gets its sidecar: once the plaintext window drains, the gate has positive proof.
    restart(k8s, "api-gateway")
    gate = eventually(lambda: (g := c.strict_gate(source, NS, "auth", WINDOW))[0].outcome is c.Outcome.PASS and g,
                      timeout=45, interval=1, what="STRICT gate passing once every caller has a sidecar")
    assert gate[1] == []  # type: ignore[index]
    watch = c.mtls_callers(source, NS, "auth", WINDOW)
    assert {x.key for x in watch} == {"shop/api-gateway", "shop/user"}
    inbound_before = c.inbound_rate(source, NS, "auth", WINDOW)
    assert inbound_before == pytest.approx(40, rel=0.1)

    # STRICT on auth: every caller speaks mTLS, nothing collapses.
    strict(k8s, "auth")
    time.sleep(2)
    verdicts = c.verify_after_strict(source, NS, "auth", watch, inbound_before, WINDOW, c.Thresholds())
    assert set(outcomes(verdicts).values()) == {c.Outcome.PASS}, [v.reason for v in verdicts]

    # A fault in auth: its success rate breaks the after-injection check, confirmed after 3 polls.
    lab.admin("PATCH", "/services/lab/shop/auth", {"error_rate": 0.5})
    try:
        failing = eventually(
            lambda: (vs := c.verify_after_injection(source, base, NS, "auth", WINDOW, c.Thresholds()))
            and outcomes(vs)["app_success_rate"] is c.Outcome.FAIL and vs, timeout=30, interval=1,
            what="app_success_rate failing under error_rate 0.5")
        reason = {v.check: v for v in failing}["app_success_rate"].reason  # type: ignore[union-attr]
        assert reason.startswith("success rate 0.") and reason.endswith("< baseline 1.00 - 0.02")
        tracker = c.BreachTracker(c.GatePolicy(breaches_to_fail=3))
        statuses = []
        for _ in range(3):
            result = tracker.feed(c.verify_after_injection(source, base, NS, "auth", WINDOW, c.Thresholds()))
            tracker = c.BreachTracker.from_dict(tracker.to_dict())
            statuses.append(result.status)
            time.sleep(1)
        assert statuses == [c.GateStatus.PENDING, c.GateStatus.PENDING, c.GateStatus.FAIL]
        assert result.failed == ["app_success_rate", "istio_success_rate"], "the app's own 500s pass its proxy too"
        # After STRICT the same fault shows at auth's proxy and at its callers' own success rates.
        strict_checks = outcomes(c.verify_after_strict(source, NS, "auth", watch, inbound_before, WINDOW))
        assert strict_checks["istio_success_rate"] is c.Outcome.FAIL
        assert strict_checks["caller_success_rate[shop/user]"] is c.Outcome.FAIL
        assert strict_checks["inbound_rate"] is c.Outcome.PASS
    finally:
        lab.admin("PATCH", "/services/lab/shop/auth", {"error_rate": 0.0})


def test_an_undersized_pod_fails_on_restarts_and_oomkilled(stack, source: PrometheusSource, k8s) -> None:
    base = c.Baseline(NS, "payment", WINDOW, success_rate=1.0, request_count=100.0, p50_ms=12.0, p99_ms=30.0)
    restart(k8s, "payment")  # a 150 Mi sidecar over its own 128 Mi limit: OOMKilled, CrashLoopBackOff

    seen: list[dict[str, c.Verdict]] = []

    def breaking() -> dict[str, c.Verdict] | None:
        # both checks fail, each once its own series show it: the termination reason can reach Prometheus a scrape
        # before the restart count's increase does
        seen.append({v.check: v for v in c.verify_after_injection(source, base, NS, "payment", WINDOW)})
        failing = {check for check, v in seen[-1].items() if v.outcome is c.Outcome.FAIL}
        return seen[-1] if {"oom_killed", "restarts"} <= failing else None

    verdicts: dict[str, c.Verdict] = eventually(  # type: ignore[assignment]
        breaking, timeout=40, interval=1, what="payment OOMKilled and restarting",
        describe=lambda: {k: (v.outcome, v.reason) for k, v in seen[-1].items()} if seen else None)
    assert any(name.startswith("payment-") and name.endswith("/istio-proxy") for name in verdicts["oom_killed"].values[
        "oom_killed"]), verdicts["oom_killed"].values


def test_a_stopped_prometheus_gives_error_verdicts_quickly(tmp_path: Path) -> None:
    prom = PrometheusProcess([], tmp_path / "prom").start()
    url = prom.url
    prom.stop()
    source = PrometheusSource(url)
    started = time.monotonic()
    base = c.measure_baseline(source, NS, "auth", WINDOW)
    verdicts = c.verify_after_injection(source, base, NS, "auth", WINDOW)
    gate, callers = c.strict_gate(source, NS, "auth", WINDOW)
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"{elapsed:.1f}s"
    assert base.notes and {n.outcome for n in base.notes} == {c.Outcome.ERROR}
    assert {v.outcome for v in verdicts} == {c.Outcome.ERROR}
    assert gate.outcome is c.Outcome.ERROR and callers == []
    assert url in gate.reason and "cannot connect" in gate.reason
    tracker = c.BreachTracker(c.GatePolicy(deadline=time.time()))
    assert tracker.feed(verdicts).status is c.GateStatus.ERROR


def test_a_bad_query_names_the_query_and_nan_is_flagged(source: PrometheusSource) -> None:
    with pytest.raises(PrometheusQueryError, match=r"HTTP 400 bad_data.*query: sum\(rate\(up\[5m\)\)"):
        source.instant("sum(rate(up[5m))")
    [sample] = source.instant("vector(0) / vector(0)")
    assert not sample.finite and sample.to_dict()["value"] == "NaN"


class _Answer503(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        type(self).calls += 1
        body = b'{"status":"error","errorType":"unavailable","error":"shutting down"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_5xx_is_unavailable_at_once_without_retries() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = PrometheusSource(f"http://127.0.0.1:{server.server_address[1]}")
        started = time.monotonic()
        with pytest.raises(PrometheusUnavailable, match="answered HTTP 503: unavailable: shutting down"):
            source.instant("up")
        assert time.monotonic() - started < 1 and _Answer503.calls == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_prometheus_that_never_answers_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        source = PrometheusSource(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=1)
        started = time.monotonic()
        with pytest.raises(PrometheusUnavailable, match=r"no answer within 1s \(read timeout\)"):
            source.instant("up")
        assert time.monotonic() - started < 3


def test_a_prometheus_that_cannot_accept_fails_at_the_connect_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []  # fill the accept queue: further SYNs are dropped, as by a dead host
        try:
            for _ in range(3):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            time.sleep(0.2)
            source = PrometheusSource(f"http://127.0.0.1:{port}", timeout=30)
            started = time.monotonic()
            with pytest.raises(PrometheusUnavailable, match=r"no connection within 3s \(connect timeout\)"):
                source.instant("up")
            assert time.monotonic() - started < 5, "a dead Prometheus fails in seconds, not after the read timeout"
        finally:
            for filler in fillers:
                filler.close()


# ---- other controllers' pods named like the deployment's (finding 21) -------------------------------------------
# A StatefulSet `auth-db`, a Job `auth-migrate` and a CronJob `auth`'s Job: all matched the old `auth-*-*` pod rule.
LOOKALIKES = (("auth-db-0", "apps/v1", "StatefulSet", "auth-db"), ("auth-migrate-x7k2p", "batch/v1", "Job",
                                                                    "auth-migrate"),
              ("auth-28371234-x7k2p", "batch/v1", "Job", "auth-28371234"))
OLD_RULE = 'pod=~"auth-[a-z0-9]+-[a-z0-9]+"'


def lookalike(name: str, api_version: str, kind: str, owner: str) -> dict:
    """A pod of another controller, without a sidecar, whose 1 Mi limit gets it OOMKilled over and over."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"app": owner, "sidecar.istio.io/inject": "false"},
                         "ownerReferences": [{"apiVersion": api_version, "kind": kind, "name": owner,
                                              "uid": str(uuid.uuid4()), "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"containers": [{"name": "main", "image": "busybox:1.36",
                                     "resources": {"limits": {"memory": "1Mi"}}}]}}


class At(PrometheusSource):
    """Every query evaluated at one instant, to compare two queries on the same data."""

    at: float | None = None

    def instant(self, query: str, at: float | None = None) -> list:
        return super().instant(query, at=self.at)


def test_restarts_of_other_controllers_pods_named_like_the_deployment_do_not_count(stack, k8s) -> None:
    _, prom = stack
    core = k8s[0]
    names = {name for name, *_ in LOOKALIKES}
    for spec in LOOKALIKES:
        core.create_namespaced_pod(NS, lookalike(*spec))
    try:
        series = f'kube_pod_container_status_restarts_total{{namespace="{NS}", {OLD_RULE}}}[{WINDOW}]'
        restarted = f"max_over_time({series}) - min_over_time({series}) > 0"

        raw = PrometheusSource(prom.url, timeout=5)

        def all_restarting() -> float | None:  # an instant at which the old rule counts every look-alike
            at = time.time() - 1
            return at if {s.labels["pod"] for s in raw.instant(restarted, at=at)} >= names else None

        at = eventually(all_restarting, timeout=90, interval=1, what="the look-alike pods restarting, OOMKilled")
        raw.close()
        base = c.Baseline(NS, "auth", WINDOW, success_rate=1.0, request_count=100.0, p50_ms=5.0, p99_ms=20.0)
        with At(prom.url, timeout=5) as source:
            source.at = at  # type: ignore[assignment]
            verdicts = {v.check: v for v in c.verify_after_injection(source, base, NS, "auth", WINDOW)}
            with p.BatchingSource(source, bucket=3600, shared=p.SharedBatches()) as batched:
                batched_verdicts = {v.check: v for v in c.verify_after_injection(batched, base, NS, "auth", WINDOW)}
        for seen in (verdicts, batched_verdicts):
            counted = set(seen["restarts"].values["restarts"])
            assert counted and all(pod.split("/")[0] not in names for pod in counted), counted
            assert seen["restarts"].outcome is c.Outcome.PASS, seen["restarts"].reason
            assert seen["oom_killed"].outcome is c.Outcome.PASS, seen["oom_killed"].reason
    finally:
        for name in names:
            core.delete_namespaced_pod(name, NS)
