"""meshwave.steps: preflight (the sidecar memory headroom), baseline, inject, set_mtls, rollback_injection.

Against a fake MeshKube (same signatures as the real one, records its calls, answers with `Change` records)
and a fake Prometheus source that answers the rendered queries.yaml templates (no network, no cluster).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

import pytest

from meshwave import prometheus as p
from meshwave import steps
from meshwave.changes import Change
from meshwave.kube import (
    EXCLUDE_INBOUND,
    EXCLUDE_OUTBOUND,
    INJECT_LABEL,
    SIDECAR_RESOURCES,
    MeshKube,
    PodState,
    WorkloadNotFound,
    WorkloadState,
    workload_state,
)
from meshwave.mtls import EffectiveMtls, effective_mtls
from meshwave.peer_auth import PeerAuthentications
from meshwave.plan import parse_plan
from meshwave.steps import Blocked, Service

MI = 2**20
NS, WL = "shop", "payment"
# What every preflight reads before it decides anything: the workload, its owner, the mTLS in force, and the
# headroom (the deployment, the injector's values, the namespace's limit ranges and quotas, the nodes and pods).
READS = ["workload", "deployment", "mtls.effective", "deployment", "injection_revision", "injector_values",
         "limit_ranges", "resource_quotas", "nodes", "all_pods"]
NODE = {"metadata": {"name": "node-a"}, "status": {"allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110"}}}


# ---- fakes ---------------------------------------------------------------------------------------------------
class FakeSource:
    """Answers the rendered queries it was given; any other query is an empty vector. Records what it was asked."""

    def __init__(self, cluster: str | None = None, window: str = "60s") -> None:
        self.cluster = cluster
        self.window = window
        self.answers: dict[str, float | list[p.Sample] | Exception] = {}
        self.seen: list[str] = []

    def query(self, name: str, cluster: str | None = None) -> str:
        return p.render(name, namespace=NS, workload=WL, window=self.window, cluster=cluster)

    def set(self, name: str, value: float | list[p.Sample] | Exception, cluster: str | None = None) -> FakeSource:
        self.answers[self.query(name, cluster)] = value
        return self

    def instant(self, query: str) -> list[p.Sample]:
        self.seen.append(query)
        value = self.answers.get(query)
        if isinstance(value, Exception):
            raise value
        if value is None:
            return []
        if isinstance(value, list):
            return value
        return [p.Sample({}, float(value), 1.0)]


def memory(*used_mi: float, containers: tuple[str, ...] = (WL,)) -> list[p.Sample]:
    """app_memory_bytes as Prometheus answers it: one sample per application container."""
    return [p.Sample({"container": c}, mi * MI, 1.0) for c, mi in zip(containers, used_mi, strict=True)]


def deployment_state(limit: str | None = "512Mi", containers: tuple[str, ...] = (WL,),
                     annotations: dict[str, str] | None = None) -> WorkloadState:
    """A WorkloadState parsed by the real parser from the API's deployment object."""
    spec_containers = []
    for i, name in enumerate(containers):
        resources: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "128Mi"}}
        if limit is not None and i == 0:
            resources["limits"] = {"memory": limit}
        spec_containers.append({"name": name, "image": f"registry.lab/{name}:1.4.2", "resources": resources})
    deployment = {
        "metadata": {"name": WL, "namespace": NS, "generation": 3, "resourceVersion": "81723"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": WL}},
                 "template": {"metadata": {"labels": {"app": WL}, "annotations": dict(annotations or {})},
                              "spec": {"containers": spec_containers}}},
        "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2,
                   "availableReplicas": 2},
    }
    return workload_state("lab", deployment, [])


class FakeMtls:
    """`MeshKube.mtls`: the effective mode computed by the real function over a list of policies; the writes are
    recorded (what they do to a cluster is tested against the lab: tests/component/test_peer_auth.py)."""

    def __init__(self, kube: FakeKube, policies: list[dict[str, Any]]) -> None:
        self.kube, self.policies = kube, policies

    def effective(self, ns: str, workload: str) -> EffectiveMtls:
        self.kube.calls.append(("mtls.effective", (ns, workload)))
        return effective_mtls(self.policies, "istio-system", ns, {"app": workload})

    def ensure_strict(self, ns: str, workload: str) -> tuple[Change, EffectiveMtls | None]:
        self.kube.calls.append(("mtls.ensure_strict", (ns, workload)))
        return self.kube._change("set-mtls", f"peerauthentication {ns}/meshwave-{workload}", None,
                                 {"mode": "STRICT"}, "create STRICT policy"), None

    def ensure_permissive(self, ns: str, workload: str, note: str, *,
                          exempt: bool = True) -> tuple[list[Change], EffectiveMtls | None]:
        self.kube.calls.append(("mtls.ensure_permissive", (ns, workload, exempt)))
        return [self.kube._change("delete-mtls", f"peerauthentication {ns}/meshwave-{workload}", {"mode": "STRICT"},
                                  None, "deleted")], None


class FakeKube:
    """MeshKube's surface used by the steps: reads answer from a WorkloadState, writes are recorded."""

    def __init__(self, state: WorkloadState | None = None, policies: list[dict[str, Any]] | None = None,
                 workload_error: Exception | None = None, metadata: dict[str, Any] | None = None,
                 spec: dict[str, Any] | None = None, injector: dict[str, Any] | None = None,
                 quotas: list[dict[str, Any]] | None = None, limit_ranges: list[dict[str, Any]] | None = None,
                 nodes: list[dict[str, Any]] | Exception | None = None, cluster: str = "lab") -> None:
        self.cluster = cluster
        self.state = state or deployment_state()
        self.mtls = FakeMtls(self, policies or [])
        self.workload_error = workload_error
        self.metadata = metadata or {}
        self.spec = spec or {}
        self.injector, self.quotas, self.ranges = injector, quotas or [], limit_ranges or []
        self.node_list = [NODE] if nodes is None else nodes
        self.root_namespace = "istio-system"
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _change(self, action: str, target: str, before: Any, after: Any, reason: str) -> Change:
        return Change(self.cluster, action, target, before, after, applied=True, reason=reason,
                      resource_version="81724")

    def workload(self, ns: str, name: str) -> WorkloadState:
        self.calls.append(("workload", (ns, name)))
        if self.workload_error:
            raise self.workload_error
        return self.state

    def deployment(self, ns: str, name: str) -> dict[str, Any]:
        self.calls.append(("deployment", (ns, name)))
        return {"metadata": {"name": name, "namespace": ns, **self.metadata}, "spec": self.spec}

    def injection_revision(self) -> str:
        self.calls.append(("injection_revision", ()))
        return "default"

    def injector_values(self, revision: str) -> dict[str, Any] | None:
        self.calls.append(("injector_values", (revision,)))
        return self.injector

    def limit_ranges(self, ns: str) -> list[dict[str, Any]]:
        self.calls.append(("limit_ranges", (ns,)))
        return self.ranges

    def resource_quotas(self, ns: str) -> list[dict[str, Any]]:
        self.calls.append(("resource_quotas", (ns,)))
        return self.quotas

    def nodes(self) -> list[dict[str, Any]]:
        self.calls.append(("nodes", ()))
        if isinstance(self.node_list, Exception):
            raise self.node_list
        return self.node_list

    def all_pods(self) -> list[dict[str, Any]]:
        self.calls.append(("all_pods", ()))
        return []

    def ensure_sidecar_resources(self, ns: str, name: str, cpu: str | None = None, memory: str | None = None,
                                 cpu_limit: str | None = None, memory_limit: str | None = None) -> Change:
        given = {"cpu": cpu, "memory": memory, "cpu_limit": cpu_limit, "memory_limit": memory_limit}
        self.calls.append(("ensure_sidecar_resources", (ns, name, given)))
        wanted = {SIDECAR_RESOURCES[k]: v for k, v in given.items() if v is not None}
        return self._change("set-sidecar-resources", f"deployment {ns}/{name}", {k: None for k in wanted}, wanted,
                            "sidecar resource annotations; the template change recreates the pods")

    def ensure_exclusions(self, ns: str, name: str, inbound_ports: Any = None, outbound_ports: Any = None) -> Change:
        self.calls.append(("ensure_exclusions", (ns, name, inbound_ports, outbound_ports)))
        wanted = {k: ",".join(map(str, v)) for k, v in ((EXCLUDE_INBOUND, inbound_ports),
                                                        (EXCLUDE_OUTBOUND, outbound_ports)) if v is not None}
        return self._change("set-exclusions", f"deployment {ns}/{name}", {k: None for k in wanted}, wanted,
                            "traffic exclusion annotations; the template change recreates the pods")

    def ensure_injected(self, ns: str, name: str, mode: str) -> list[Change]:
        self.calls.append(("ensure_injected", (ns, name, mode)))
        if mode == "namespace":
            return [self._change("label-namespace", f"namespace {ns}", {"istio-injection": None},
                                 {"istio-injection": "enabled"}, "namespace labelled"),
                    self._change("restart", f"deployment {ns}/{name}", None, {}, "restarting once")]
        return [self._change("label-workload", f"deployment {ns}/{name}", {INJECT_LABEL: None},
                             {INJECT_LABEL: "true"}, "pod template label; the template change rolls the pods")]

    def remove_injection(self, ns: str, name: str) -> list[Change]:
        self.calls.append(("remove_injection", (ns, name)))
        return [self._change("remove-injection", f"deployment {ns}/{name}", {INJECT_LABEL: "true"},
                             {INJECT_LABEL: "false"}, "pod template label false; the template change rolls the pods")]

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def service(defaults: dict[str, Any] | None = None, **own: Any) -> Service:
    plan = parse_plan({
        "migration": "shop-mesh",
        "clusters": {"lab": {"kubernetes_conn_id": "k8s_lab", "prometheus_conn_id": "prom_lab"}},
        "defaults": {"soak_seconds": 60, "batch_size": 2, "poke_interval_seconds": 5, **(defaults or {})},
        "waves": [{"name": "wave-1", "services": [
            {"cluster": "lab", "namespace": "shop", "workload": "auth"},
            {"cluster": "lab", "namespace": NS, "workload": WL, "criticality": "critical", **own},
        ]}],
    })
    svc = plan.waves[0].services[1]
    return Service(svc, svc.settings(plan.defaults), plan.clusters[svc.cluster], batch=1)


def down() -> p.PrometheusUnavailable:
    return p.PrometheusUnavailable("Prometheus at http://prometheus.lab:9090: cannot connect: "
                                   "[Errno 111] Connection refused")


def test_the_fake_kube_has_the_real_signatures() -> None:
    for name in ("workload", "deployment", "ensure_sidecar_resources", "ensure_exclusions", "ensure_injected",
                 "remove_injection", "injection_revision", "injector_values", "limit_ranges", "resource_quotas",
                 "nodes", "all_pods"):
        real = list(inspect.signature(getattr(MeshKube, name)).parameters)
        fake = list(inspect.signature(getattr(FakeKube, name)).parameters)
        assert fake == real, name
    for name in ("effective", "ensure_strict", "ensure_permissive"):
        real = list(inspect.signature(getattr(PeerAuthentications, name)).parameters)
        fake = list(inspect.signature(getattr(FakeMtls, name)).parameters)
        assert fake == real, name


# ---- preflight: the headroom (the proxy's own limit, quotas, limit ranges, nodes; tests/unit/test_headroom.py) ----
TEMPLATE = {"template": {"metadata": {"annotations": {}}, "spec": {"containers": [
    {"name": WL, "resources": {"requests": {"cpu": "250m", "memory": "256Mi"},
                               "limits": {"cpu": "500m", "memory": "512Mi"}}}]}}, "replicas": 2}


def test_headroom_is_the_proxy_s_own_limit_not_what_the_app_leaves_of_its_own() -> None:
    # The app uses 500Mi of its 512Mi: the old check blocked this; the proxy has a limit of its own (1024Mi).
    kube, source = FakeKube(spec=TEMPLATE), FakeSource().set("app_memory_bytes", memory(500))
    result = steps.preflight(service(), kube, source)  # type: ignore[arg-type]
    assert result.headroom.startswith("the istio-proxy limit 1024Mi (Istio's defaults) holds the sidecar's "
                                         "expected 128Mi; 0 ResourceQuota(s) and 0 LimitRange(s) in shop admit a "
                                         "proxy for each of 2 replicas plus 1 surge pod(s) of the rollout; ")
    assert "NOTE: no ConfigMap istio-system/istio-sidecar-injector: Istio's default proxy resources assumed" \
        in result.headroom
    assert result.changes == [] and kube.names() == READS
    assert source.seen == [], "Prometheus is not asked: the app's usage does not decide the proxy's room"


def test_a_proxy_limit_under_the_expected_memory_blocks_before_any_change() -> None:
    kube = FakeKube(spec=TEMPLATE, injector={"global": {"proxy": {"resources": {"limits": {"memory": "128Mi"}}}}})
    with pytest.raises(Blocked) as info:
        steps.preflight(service(sidecar={"expected_memory_mi": 150}, exclude_inbound_ports=[8081]), kube,  # type: ignore[arg-type]
                        FakeSource())
    assert str(info.value).startswith(
        "the istio-proxy container's own memory limit 128Mi (the injector's values.global.proxy.resources "
        "(istio-system/istio-sidecar-injector)) < the sidecar's expected 150Mi: the sidecar would be OOMKilled.")
    assert kube.names() == READS[:6], "blocked at the first check: nothing more read, nothing written"


def test_the_plan_s_sidecar_limit_is_what_is_checked_and_then_applied() -> None:
    kube = FakeKube(spec=TEMPLATE)
    svc = service(sidecar={"memory": "96Mi", "memory_limit": "192Mi", "cpu": "50m", "expected_memory_mi": 150})
    result = steps.preflight(svc, kube, FakeSource())  # type: ignore[arg-type]
    assert result.headroom.startswith("the istio-proxy limit 192Mi (the sidecar.istio.io/proxy* annotations) "
                                         "holds the sidecar's expected 150Mi")
    assert kube.calls[len(READS)] == ("ensure_sidecar_resources",
                             (NS, WL, {"cpu": "50m", "memory": "96Mi", "cpu_limit": None, "memory_limit": "192Mi"}))
    [change] = result.changes
    assert change["action"] == "set-sidecar-resources" and change["applied"] is True
    assert Change.from_dict(change).target == "deployment shop/payment"  # JSON-safe ledger record
    with pytest.raises(Blocked, match=r"own memory limit 192Mi \(the sidecar.istio.io/proxy\* annotations\) < "
                                      r"the sidecar's expected 200Mi"):
        steps.preflight(service(sidecar={"memory_limit": "192Mi", "expected_memory_mi": 200}),  # type: ignore[arg-type]
                        FakeKube(spec=TEMPLATE), FakeSource())


def test_a_template_annotation_sizes_the_proxy_when_the_plan_does_not() -> None:
    spec = {**TEMPLATE, "template": {**TEMPLATE["template"], "metadata": {"annotations": {
        "sidecar.istio.io/proxyMemoryLimit": "87Mi"}}}}
    with pytest.raises(Blocked, match=r"^the istio-proxy container's own memory limit 87Mi \(the sidecar.istio.io"):
        steps.preflight(service(sidecar={"expected_memory_mi": 150}), FakeKube(spec=spec), FakeSource())  # type: ignore[arg-type]


def test_a_full_quota_blocks_naming_it_and_its_numbers() -> None:
    quota = {"metadata": {"name": "compute", "namespace": NS}, "spec": {"hard": {"limits.memory": "4Gi"}},
             "status": {"hard": {"limits.memory": "4Gi"}, "used": {"limits.memory": "1Gi"}}}
    kube = FakeKube(spec=TEMPLATE, quotas=[quota])
    with pytest.raises(Blocked) as info:
        steps.preflight(service(), kube, FakeSource())  # type: ignore[arg-type]
    # 2 x 1024Mi + 1 surge pod x (512Mi + 1024Mi) = 3584Mi > 3Gi free.
    assert str(info.value) == ("ResourceQuota shop/compute: limits.memory hard 4096Mi, used 1024Mi, free 3072Mi < "
                               "3584Mi needed (a proxy for each of 2 replicas plus 1 surge pod(s) of the rollout): "
                               "the new pods would be refused (403 Forbidden) and the rollout would stall")
    assert "ensure_sidecar_resources" not in kube.names()


def test_unreadable_nodes_are_a_note_not_a_block() -> None:
    from meshwave.kube_errors import AccessDenied
    denied = AccessDenied('cluster lab: LIST nodes: 403 Forbidden: nodes is forbidden: User "system:serviceaccount:'
                          'airflow:meshwave" cannot list resource "nodes"', code=403)
    result = steps.preflight(service(), FakeKube(spec=TEMPLATE, nodes=denied), FakeSource())  # type: ignore[arg-type]
    assert "NOTE: node capacity not checked: the nodes or pods are not readable (cluster lab: LIST nodes: 403" \
        in result.headroom


@pytest.mark.parametrize(("own", "inbound", "outbound"), [
    ({"exclude_inbound_ports": [8081, 9090]}, [8081, 9090], None),
    ({"exclude_outbound_ports": [5432]}, None, [5432]),
    ({"exclude_inbound_ports": [8081], "exclude_outbound_ports": [5432, 6379]}, [8081], [5432, 6379]),
])
def test_exclusions_are_applied_one_direction_left_alone_when_not_planned(own: dict[str, Any], inbound: Any,
                                                                          outbound: Any) -> None:
    kube = FakeKube(deployment_state("512Mi"))
    result = steps.preflight(service(**own), kube, FakeSource())  # type: ignore[arg-type]
    assert kube.calls[len(READS):] == [("ensure_exclusions", (NS, WL, inbound, outbound))]
    assert [c["action"] for c in result.changes] == ["set-exclusions"]


def test_sidecar_resources_then_exclusions_both_recorded() -> None:
    kube = FakeKube(deployment_state("512Mi"))
    svc = service(sidecar={"memory_limit": "256Mi"}, exclude_outbound_ports=[5432])
    result = steps.preflight(svc, kube, FakeSource())  # type: ignore[arg-type]
    assert kube.names() == [*READS, "ensure_sidecar_resources", "ensure_exclusions"]
    assert [c["action"] for c in result.changes] == ["set-sidecar-resources", "set-exclusions"]


def test_a_missing_workload_is_an_error_not_a_block_and_nothing_is_queried() -> None:
    source = FakeSource().set("app_memory_bytes", memory(200))
    kube = FakeKube(workload_error=WorkloadNotFound("cluster lab: GET deployment shop/payment: 404 NotFound",
                                                    code=404))
    with pytest.raises(WorkloadNotFound):
        steps.preflight(service(), kube, source)  # type: ignore[arg-type]
    assert source.seen == []


# ---- preflight: a STRICT that applies once injected (safety review finding 2) ------------------------------
def pa(ns: str, name: str, mode: str, selector: dict[str, str] | None = None, created: str = "2026-01-01T00:00:00Z",
       meshwave: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    labels = {"app.kubernetes.io/managed-by": "meshwave"} if meshwave else {}
    return {"metadata": {"namespace": ns, "name": name, "creationTimestamp": created, "labels": labels}, "spec": spec}


def fits(source: FakeSource) -> FakeSource:
    return source.set("app_memory_bytes", memory(200))


def test_namespace_wide_strict_with_a_plaintext_caller_is_blocked_naming_the_policy() -> None:
    kube = FakeKube(policies=[pa(NS, "default", "STRICT")])
    source = fits(FakeSource()).set("app_request_rate", 12.0).set("meshed_request_rate", 10.0)
    with pytest.raises(Blocked) as info:
        steps.preflight(service(), kube, source)  # type: ignore[arg-type]
    message = str(info.value)
    assert "peerauthentication shop/default (namespace-wide, STRICT" in message
    assert "2 of 12 rps come from callers without a sidecar" in message
    assert kube.names() == READS[:3]  # blocked before the headroom: nothing more read, nothing written


def test_mesh_wide_strict_counts_too_and_unknown_traffic_is_blocked() -> None:
    kube = FakeKube(policies=[pa("istio-system", "default", "STRICT")])
    with pytest.raises(Blocked, match="cannot tell whether callers without a sidecar remain: no request data"):
        steps.preflight(service(), kube, fits(FakeSource()))  # type: ignore[arg-type]
    source = fits(FakeSource()).set("app_request_rate", 5.0).set("meshed_request_rate", down())
    with pytest.raises(Blocked, match="istio-system/default.*cannot tell.*Connection refused"):
        steps.preflight(service(), kube, source)  # type: ignore[arg-type]


def test_strict_once_injected_with_every_caller_meshed_goes_ahead_and_says_so() -> None:
    kube = FakeKube(policies=[pa(NS, "default", "STRICT")])
    source = fits(FakeSource()).set("app_request_rate", 12.0).set("meshed_request_rate", 12.0)
    result = steps.preflight(service(), kube, source)  # type: ignore[arg-type]
    assert result.plaintext_before_injection.endswith("0 of 12 rps come from callers without a sidecar: every "
                                                         "caller already speaks mTLS")
    assert result.mtls_in_force.mode == "STRICT"


def test_a_workload_policy_beats_the_namespace_strict_so_no_traffic_question_is_asked() -> None:
    kube = FakeKube(policies=[pa(NS, "default", "STRICT"), pa(NS, "team-payment", "PERMISSIVE", {"app": WL})])
    source = fits(FakeSource())
    result = steps.preflight(service(), kube, source)  # type: ignore[arg-type]
    assert result.mtls_in_force.mode == "PERMISSIVE"
    assert source.query("app_request_rate") not in source.seen
    assert result.notes == ["STRICT will not be flipped: peerauthentication shop/team-payment (workload, "
                               "PERMISSIVE; not meshwave's) selects the pods and decides their mode"]


def test_a_gitops_owned_deployment_is_named_in_preflight() -> None:
    kube = FakeKube(metadata={"labels": {"app.kubernetes.io/managed-by": "Helm"},
                              "annotations": {"meta.helm.sh/release-name": "payment"}})
    result = steps.preflight(service(), kube, fits(FakeSource()))  # type: ignore[arg-type]
    assert len(result.notes) == 1 and "will be reverted by Helm" in result.notes[0]


# ---- baseline, inject, set_mtls ------------------------------------------------------------------------------
def test_baseline_measures_the_app_over_the_plan_s_window() -> None:
    source = FakeSource(window="30s")
    for name, value in (("app_success_rate", 0.998), ("app_request_rate", 38.5), ("app_request_count", 1155.0),
                        ("app_latency_p50_ms", 6.0), ("app_latency_p99_ms", 14.2)):
        source.set(name, value)
    source.set("app_memory_bytes", memory(210))
    result = steps.baseline(service(query_window_seconds=30), source)  # type: ignore[arg-type]
    base = result.baseline
    assert (base.namespace, base.workload, base.window) == (NS, WL, "30s")
    assert (base.success_rate, base.request_rate, base.request_count, base.p50_ms, base.p99_ms) == \
        (0.998, 38.5, 1155.0, 6.0, 14.2)
    assert base.app_memory_bytes == {WL: 210.0 * MI}
    assert base.notes == []
    assert result.seconds >= 0


def test_a_baseline_that_could_not_be_measured_blocks_the_service_naming_the_query() -> None:
    """Safety review finding 7: an empty baseline let injection proceed, judged blind."""
    source = FakeSource()
    for name, value in (("app_success_rate", down()), ("app_request_rate", 38.5), ("app_latency_p99_ms", 14.2)):
        source.set(name, value)
    with pytest.raises(Blocked) as info:
        steps.baseline(service(), source)  # type: ignore[arg-type]
    assert str(info.value).startswith(f"no baseline: {source.query('app_success_rate')}: Prometheus could not "
                                      "answer: Prometheus at http://prometheus.lab:9090: cannot connect")
    no_traffic = FakeSource().set("app_success_rate", 0.99).set("app_latency_p99_ms", 14.2)
    with pytest.raises(Blocked) as info:
        steps.baseline(service(), no_traffic)  # type: ignore[arg-type]
    assert str(info.value) == f"no baseline: {no_traffic.query('app_request_rate')}: app_request_rate: no series"


@pytest.mark.parametrize(("own", "mode", "actions"), [
    ({}, "workload", ["label-workload"]),
    ({"injection": "namespace"}, "namespace", ["label-namespace", "restart"]),
])
def test_inject_uses_the_plan_s_injection_mode(own: dict[str, Any], mode: str, actions: list[str]) -> None:
    kube = FakeKube()
    result = steps.inject(service(**own), kube)  # type: ignore[arg-type]
    assert kube.calls == [("ensure_injected", (NS, WL, mode))]
    assert [c["action"] for c in result.changes] == actions
    assert result.seconds >= 0


def test_rollback_removes_meshwave_s_policy_without_creating_one_then_the_sidecar() -> None:
    kube = FakeKube()
    result = steps.rollback_injection(service(), kube, FakeSource())  # type: ignore[arg-type]
    assert kube.calls == [("mtls.ensure_permissive", (NS, WL, False)), ("remove_injection", (NS, WL))]
    assert [c["action"] for c in result.changes] == ["delete-mtls", "remove-injection"]
    assert result.changes[1]["after"] == {INJECT_LABEL: "false"}
    assert result.seconds >= 0


# ---- Service -------------------------------------------------------------------------------------------------
def test_service_settings_thresholds_and_gate_policy() -> None:
    svc = service(defaults={"min_requests": 25, "breaches_to_fail": 4}, query_window_seconds=45,
                  thresholds={"max_success_drop": 0.05, "sidecar_memory_limit_mi": 200})
    assert svc.window == "45s"
    assert svc.plan.key == "lab/shop/payment" and svc.cluster.prometheus_conn_id == "prom_lab" and svc.batch == 1
    assert svc.thresholds() == {"max_success_drop": 0.05, "max_p99_increase_ms": 250, "max_p99_ratio": 2.0,
                                "max_restarts": 0, "sidecar_memory_limit_mi": 200, "min_requests": 25,
                                "min_inbound_ratio": 0.5, "max_traffic_drop": 0.2}
    assert svc.gate_policy() == {"breaches_to_fail": 4, "default": {"on_no_data": "wait", "on_error": "wait"}}
    assert svc.gate_policy("fail")["default"]["on_no_data"] == "fail"


def pods(with_proxy: int, without: int) -> list[PodState]:
    return [PodState(f"{WL}-{i}", current=True, ready=True, has_proxy=i < with_proxy, proxy_ready=i < with_proxy)
            for i in range(with_proxy + without)]


def test_strict_only_needs_every_pod_injected_and_changes_nothing() -> None:
    svc = dataclasses.replace(service(), action="strict_only")
    kube = FakeKube(dataclasses.replace(deployment_state(), pods=pods(2, 0)))
    result = steps.inject(svc, kube)
    assert (result.changes, result.sidecars) == ([], "2 of 2 pods run their sidecar")
    assert kube.names() == ["workload"]
    half = FakeKube(dataclasses.replace(deployment_state(), pods=pods(1, 1)))
    with pytest.raises(steps.Blocked, match=f"{NS}/{WL}: 1 of 2 pods run an istio-proxy sidecar: STRICT only needs "
                                            "every pod injected"):
        steps.inject(svc, half)
    assert half.names() == ["workload"], "nothing written"


def test_a_service_travels_through_xcom_unchanged() -> None:
    svc = dataclasses.replace(service(sidecar={"memory_limit": "256Mi"}, strict=False), action="inject_only")
    data = json.loads(json.dumps(svc.to_dict()))
    assert Service.from_dict(data) == svc
    with pytest.raises(ValueError, match="action: 'explode' is not one of migrate"):
        dataclasses.replace(svc, action="explode")
