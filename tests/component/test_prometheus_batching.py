"""The batched queries against a real Prometheus scraping the lab: split per workload, every template gives the
same samples as its per-workload query at the same evaluation time, and N workloads cost a constant number of
HTTP queries."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kubernetes import client, config

from meshstack.process import LabProcess, PrometheusProcess
from meshwave import checks as c
from meshwave import prometheus as p
from tests.component.test_checks_prometheus import LOOKALIKES, lookalike
from tests.conftest import SMALL, eventually

pytestmark = pytest.mark.component

WINDOW, NS = "10s", "shop"
DEPLOYMENTS = ("api-gateway", "auth", "user", "payment", "ledger", "email-service")
# (namespace, workload) pairs asked of every template: the deployments, the gateway (a caller without app
# metrics), a name that is a prefix of no pod, and one that does not exist.
WORKLOADS = [(NS, w) for w in DEPLOYMENTS] + [("istio-system", "istio-ingressgateway"), (NS, "auth-cache"),
                                               ("nowhere", "nothing")]


class Counting(p.PrometheusSource):
    """A PrometheusSource that counts the HTTP queries it sends."""

    sent = 0

    def instant(self, query: str, at: float | None = None) -> list[p.Sample]:
        Counting.sent += 1
        return super().instant(query, at=at)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabProcess, PrometheusProcess]]:
    workdir: Path = tmp_path_factory.mktemp("batching")
    with LabProcess(SMALL, workdir / "lab") as lab, PrometheusProcess([lab.metrics_target], workdir / "prom") as prom:
        api = config.new_client_from_config(config_file=lab.kubeconfig())
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        # Everything in shop gets a sidecar (payment is OOMKilled, email-service crash-loops): every metric exists.
        core.patch_namespace(NS, {"metadata": {"labels": {"istio-injection": "enabled"}}})
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for name in DEPLOYMENTS:
            apps.patch_namespaced_deployment(name, NS, {"spec": {"template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": stamp}}}}})
        lab.admin("PATCH", "/services/lab/shop/user", {"error_rate": 0.2})
        # plaintext TCP bytes into ledger over a long-lived connection, beside batch-processor's HTTP calls
        lab.admin("PATCH", "/services/lab/external/batch-processor", {"calls": [
            {"service": "shop/ledger"}, {"service": "shop/ledger", "protocol": "tcp", "port": 5432,
                                         "bytes_per_second": 1000}]})
        for spec in LOOKALIKES:  # other controllers' pods named like auth's, OOMKilled: never counted as auth's
            core.create_namespaced_pod(NS, lookalike(*spec))
        seen = ('count(istio_requests_total{reporter="destination"}) and count('
                'kube_pod_container_status_last_terminated_reason{reason="OOMKilled"} == 1)')
        eventually(lambda: prom.query(seen), timeout=90, what="Istio metrics and an OOMKilled pod")
        time.sleep(12)  # a full window of both
        yield lab, prom


def same(a: list[p.Sample], b: list[p.Sample]) -> bool:
    def key(samples: list[p.Sample]) -> list[tuple[tuple[tuple[str, str], ...], float]]:
        return sorted((tuple(sorted(s.labels.items())), s.value) for s in samples)

    left, right = key(a), key(b)
    return [k for k, _ in left] == [k for k, _ in right] and all(
        (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-9, abs=1e-12)
        for (_, x), (_, y) in zip(left, right, strict=True))


# Every query with a batched form (a query that is already one per cluster has none: nothing to batch).
@pytest.mark.parametrize("name", sorted(n for n, t in p.load_queries().items() if t.batch is not None))
def test_the_split_batch_equals_the_per_workload_query(stack, name: str) -> None:
    _, prom = stack
    template = p.load_queries()[name]
    with p.PrometheusSource(prom.url, timeout=5, cluster="lab") as source:
        at = time.time() - 1
        split = template.batch.split(source.instant(template.batch.render(window=WINDOW, cluster="lab"), at=at))
        answered = 0
        for ns, workload in WORKLOADS:
            plain = source.instant(template.render(namespace=ns, workload=workload, window=WINDOW, cluster="lab"),
                                   at=at)
            assert same(split.get((ns, workload), []), plain), (name, ns, workload, split.get((ns, workload)), plain)
            answered += bool(plain)
    if name not in ("oom_killed", "sidecar_memory_limit_bytes", "plaintext_tcp_connections", "plaintext_tcp_bytes",
                    "mtls_tcp_callers", "istio_inbound_tcp_rate", "caller_outbound_success_rate",
                    "caller_outbound_request_count"):
        assert answered >= 2, f"{name}: the comparison saw data"


class At(p.PrometheusSource):
    """Every query evaluated at one time (the batch's bucket start), to compare like with like."""

    at = 0.0

    def instant(self, query: str, at: float | None = None) -> list[p.Sample]:
        return super().instant(query, at=At.at)


def test_gates_of_many_workloads_share_one_query_per_template(stack) -> None:
    _, prom = stack
    shared, bucket = p.SharedBatches(), 10.0
    pairs = [(ns, w) for ns, w in WORKLOADS if ns == NS]
    eventually(lambda: 1 < time.time() % bucket < 3, timeout=15, interval=0.2, what="early in a bucket")
    At.at = math.floor(time.time() / bucket) * bucket

    Counting.sent = 0
    batched = {}
    for ns, w in pairs:  # one source per gate, as one trigger per service has
        with p.BatchingSource(Counting(prom.url, timeout=5, cluster="lab"), bucket=bucket, shared=shared) as src:
            batched[w] = c.strict_gate(src, ns, w, WINDOW)[0].outcome
    assert Counting.sent == 5, "5 templates, whatever the number of workloads"
    assert shared.queries == 5
    with At(prom.url, timeout=5, cluster="lab") as plain:
        direct = {w: c.strict_gate(plain, ns, w, WINDOW)[0].outcome for ns, w in pairs}
    assert batched == direct
    assert batched["auth"] is c.Outcome.PASS and batched["auth-cache"] is c.Outcome.NO_DATA


def test_the_batch_maps_pods_to_their_deployment_by_owner_not_by_name(stack) -> None:
    _, prom = stack
    names = {name for name, *_ in LOOKALIKES}
    eventually(lambda: {r["metric"]["pod"] for r in prom.query(
        'kube_pod_container_status_restarts_total{namespace="shop"} > 0')} >= names, timeout=60,
        what="the look-alike pods restarting")
    template = p.load_queries()["container_restarts"]
    with p.PrometheusSource(prom.url, timeout=5, cluster="lab") as source:
        split = template.batch.split(source.instant(template.batch.render(window="1m", cluster="lab")))
    pods = {key: {s.labels["pod"] for s in samples} for key, samples in split.items()}
    assert pods[(NS, "auth")] and all(pod.startswith("auth-") for pod in pods[(NS, "auth")])
    assert not names & set().union(*pods.values()), "another controller's pod is nobody's deployment pod"
