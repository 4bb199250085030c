"""A real Prometheus scraping the lab answers the queries of istio-facts.md with the right values."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from meshstack.process import LabProcess, PrometheusProcess
from tests.component.test_checks_prometheus import lookalike
from tests.conftest import SMALL, below, eventually

pytestmark = pytest.mark.component

WINDOW = "10s"
PLAINTEXT_INTO = (
    'sum by (source_workload, source_workload_namespace) (rate(istio_requests_total{{reporter="destination", '
    'destination_workload="{w}", destination_workload_namespace="shop", '
    'connection_security_policy!="mutual_tls"}}[{win}]))'
)
MTLS_INTO = (
    'sum by (source_workload) (rate(istio_requests_total{{reporter="destination", destination_workload="{w}", '
    'destination_workload_namespace="shop", connection_security_policy="mutual_tls"}}[{win}]))'
)
APP_SUCCESS = (
    'sum(rate(http_requests_total{{namespace="shop", app="{w}", code!~"5.."}}[{win}])) / '
    'sum(rate(http_requests_total{{namespace="shop", app="{w}"}}[{win}]))'
)
ISTIO_SUCCESS = (
    'sum(rate(istio_requests_total{{reporter="destination", destination_workload_namespace="shop", '
    'destination_workload=~"{w}", response_code!~"5.*"}}[{win}])) / sum(rate(istio_requests_total{{'
    'reporter="destination", destination_workload_namespace="shop", destination_workload=~"{w}"}}[{win}])) * 100'
)
P99 = (
    'histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{{reporter="destination", '
    'destination_workload_namespace="shop", destination_workload=~"{w}"}}[{win}])) by (le))'
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabProcess, PrometheusProcess]]:
    workdir: Path = tmp_path_factory.mktemp("prom-stack")
    with LabProcess(SMALL, workdir / "lab") as lab, PrometheusProcess([lab.metrics_target], workdir / "prom") as prom:
        yield lab, prom


@pytest.fixture(scope="module")
def k8s(stack) -> tuple[client.CoreV1Api, client.AppsV1Api, client.CustomObjectsApi]:
    api = config.new_client_from_config(config_file=stack[0].kubeconfig())
    return client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)


def by_source(prom: PrometheusProcess, query: str) -> dict[str, float]:
    return {r["metric"].get("source_workload", ""): float(r["value"][1]) for r in prom.query(query)}


def scalar(prom: PrometheusProcess, query: str) -> float | None:
    result = prom.query(query)
    return float(result[0]["value"][1]) if result else None


def inject(k8s, *names: str) -> None:
    core, apps, _ = k8s
    core.patch_namespace("shop", {"metadata": {"labels": {"istio-injection": "enabled"}}})
    for name in names:
        apps.patch_namespaced_deployment(name, "shop", {"spec": {"template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": f"2026-11-25T02:00:0{len(names)}Z"}}}}})


def set_mode(k8s, workload: str, mode: str) -> None:
    custom = k8s[2]
    body = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": workload, "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": workload}}, "mtls": {"mode": mode}}}
    try:
        custom.patch_namespaced_custom_object("security.istio.io", "v1", "shop", "peerauthentications", workload,
                                              {"spec": body["spec"]})
    except client.ApiException as exc:
        assert exc.status == 404
        custom.create_namespaced_custom_object("security.istio.io", "v1", "shop", "peerauthentications", body)


def test_the_story_in_prometheus(stack, k8s) -> None:
    """One scenario, in order: before injection, after, STRICT with a plaintext caller, back to PERMISSIVE."""
    lab, prom = stack
    win = WINDOW
    eventually(lambda: scalar(prom, APP_SUCCESS.format(w="api-gateway", win=win)) == 1.0, timeout=30,
               what="application metrics scraped")
    # Before injection: the application's own metrics exist, Istio's do not.
    assert prom.query('istio_requests_total{destination_workload="auth"}') == []
    full_window = f'min(count_over_time(http_requests_total{{app="auth"}}[{win}]))'
    eventually(lambda: (scalar(prom, full_window) or 0) >= 5, timeout=30, what="a full query window of samples")
    assert scalar(prom, f'sum(rate(http_requests_total{{app="auth"}}[{win}]))') == pytest.approx(40, rel=0.1)

    # auth gets a sidecar: its callers have none, so everything arriving is plaintext from "unknown".
    inject(k8s, "auth")
    plaintext = eventually(lambda: by_source(prom, PLAINTEXT_INTO.format(w="auth", win=win)).get("unknown", 0) > 35
                           and by_source(prom, PLAINTEXT_INTO.format(w="auth", win=win)), timeout=40,
                           what="plaintext into auth from unknown callers")
    assert set(plaintext) == {"unknown"}

    # user gets a sidecar too: its calls to auth become mutual TLS and name the caller.
    inject(k8s, "auth", "user")
    # A new series needs a full window before its rate settles at the true 20 requests per second.
    eventually(lambda: abs(by_source(prom, MTLS_INTO.format(w="auth", win=win)).get("user", 0) - 20) < 2,
               timeout=40, what="mutual_tls into auth from user at 20 rps")
    assert scalar(prom, ISTIO_SUCCESS.format(w="auth", win=win)) == pytest.approx(100)
    p99 = scalar(prom, P99.format(w="auth", win=win))
    assert p99 is not None and 6 < p99 < 50

    # STRICT on auth while api-gateway (no sidecar) still calls it: api-gateway's own success rate collapses.
    set_mode(k8s, "auth", "STRICT")

    def lab_view() -> str:
        seen = {w: {k: d[k] for k in ("sidecar_fraction", "mtls_mode", "success_rate")}
                for w in ("api-gateway", "auth") for d in [lab.admin("GET", f"/services/lab/shop/{w}")]}
        series = prom.query(f'rate(http_requests_total{{app="api-gateway"}}[{win}])')
        return f"lab: {seen}; Prometheus: {[(r['metric'], r['value'][1]) for r in series]}"

    # `is not None`, not `or 1`: a success rate of exactly 0.0 is the point here, not "no data".
    eventually(lambda: below(scalar(prom, APP_SUCCESS.format(w="api-gateway", win=win)), 0.2), timeout=60,
               what="api-gateway success rate dropping under STRICT auth", describe=lab_view)
    assert by_source(prom, MTLS_INTO.format(w="auth", win=win)).get("user", 0) > 15, "mTLS callers unaffected"
    # Back to PERMISSIVE: it recovers.
    set_mode(k8s, "auth", "PERMISSIVE")
    eventually(lambda: scalar(prom, APP_SUCCESS.format(w="api-gateway", win=win)) == 1.0, timeout=30,
               what="api-gateway success rate recovering under PERMISSIVE")


def test_undersized_pod_with_a_sidecar_shows_oomkilled_restarts(stack, k8s) -> None:
    _, prom = stack
    inject(k8s, "payment")
    # The sidecar (150Mi) is over its own limit (128Mi, the pod's proxyMemoryLimit): its container is OOMKilled.
    oom = ('kube_pod_container_status_last_terminated_reason{namespace="shop", pod=~"payment-.*", '
           'container="istio-proxy", reason="OOMKilled"}')
    eventually(lambda: prom.query(oom), timeout=40, what="OOMKilled istio-proxy container of payment")
    restarts = ('sum(increase(kube_pod_container_status_restarts_total{namespace="shop", pod=~"payment-.*", '
                'container="istio-proxy"}[30s]))')
    eventually(lambda: (scalar(prom, restarts) or 0) > 0, timeout=30, what="payment's proxy restarts increasing")
    # The crash-looping proxy has no working set while it waits (cAdvisor reports running containers); the app
    # container next to it runs on, under its own limit.
    app_memory = scalar(prom, 'max(container_memory_working_set_bytes{namespace="shop", pod=~"payment-.*", '
                              'container="payment"})')
    assert app_memory == pytest.approx(400 * 2**20), "the app's working set is exposed, under its own 512Mi"


def test_owner_series_as_kube_state_metrics_exposes_them(stack, k8s) -> None:
    """kube_pod_owner and kube_replicaset_owner, from the objects' ownerReferences: what the pod queries join on."""
    _, prom = stack
    core, apps, _ = k8s
    core.create_namespaced_pod("shop", lookalike("auth-db-0", "apps/v1", "StatefulSet", "auth-db"))
    core.create_namespaced_pod("shop", {"apiVersion": "v1", "kind": "Pod",
                                        "metadata": {"name": "debug-shell", "namespace": "shop"},
                                        "spec": {"containers": [{"name": "sh", "image": "busybox:1.36"}]}})

    def owner_series() -> dict[str, dict[str, str]] | None:
        found = {r["metric"]["pod"]: r["metric"]
                 for r in prom.query('kube_pod_owner{namespace="shop", pod=~"auth-.*|debug-shell"}')}
        return found if {"auth-db-0", "debug-shell"} <= found.keys() else None

    try:
        owners = eventually(owner_series, timeout=30, what="the look-alike and the bare pod's owner series")
        assert isinstance(owners, dict)
        db, bare = owners.pop("auth-db-0"), owners.pop("debug-shell")
        assert (db["owner_kind"], db["owner_name"], db["owner_is_controller"]) == ("StatefulSet", "auth-db", "true")
        assert db["uid"] == core.read_namespaced_pod("auth-db-0", "shop").metadata.uid
        assert (bare["owner_kind"], bare["owner_name"], bare["owner_is_controller"]) == ("<none>",) * 3
        pods = {pod.metadata.name: pod for pod in core.list_namespaced_pod("shop", label_selector="app=auth").items}
        assert set(owners) == set(pods), "every pod of the deployment, and only those, besides the two"
        for name, series in owners.items():
            ref = pods[name].metadata.owner_references[0]
            assert (series["owner_kind"], series["owner_name"], series["owner_is_controller"]) == \
                ("ReplicaSet", ref.name, "true")
            [rs] = prom.query(f'kube_replicaset_owner{{namespace="shop", replicaset="{ref.name}"}}')
            assert (rs["metric"]["owner_kind"], rs["metric"]["owner_name"]) == ("Deployment", "auth")
            assert apps.read_namespaced_replica_set(ref.name, "shop").metadata.owner_references[0].name == "auth"
    finally:
        core.delete_namespaced_pod("auth-db-0", "shop")
        core.delete_namespaced_pod("debug-shell", "shop")
