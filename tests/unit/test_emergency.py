"""The emergency rollback's logic: the form's validation, what is in scope, the patches, the order, the verdicts."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshwave import emergency as em
from meshwave.emergency_tasks import log_changes  # here: Airflow's first import resets caplog's handler
from meshwave.fleet import Fleet, load_fleet
from meshwave.kube import WorkloadState
from meshwave.peer_auth import PREVIOUS_MTLS_ANNOTATION, plan_relax, strict_parts
from meshwave.prometheus import PrometheusUnavailable, Sample

ROOT = Path(__file__).resolve().parents[2]
SEED_PLAN = ROOT / "include" / "plans" / "seed-fleet.yaml"
SEED_CLUSTERS = ["prod-ap-1", "prod-eu-1", "prod-us-1"]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    (tmp_path / "seed.yaml").write_text(SEED_PLAN.read_text())
    return load_fleet(tmp_path)


def policy(ns: str, name: str, mode: str | None = "STRICT", selector: dict | None = None,
           ports: dict | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}} if mode else {}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = ports
    return {"metadata": {"namespace": ns, "name": name, "resourceVersion": "7"}, "spec": spec}


# ---- the form -------------------------------------------------------------------------------------------
def test_defaults_are_a_dry_run_on_every_planned_cluster(fleet: Fleet) -> None:
    request = em.parse_request({}, fleet)
    assert request.dry_run is True and request.remove_sidecars is False
    assert [t.cluster for t in request.targets] == SEED_CLUSTERS
    assert request.targets[1].kubernetes_conn_id == "meshlab_prod_eu_1"
    assert request.scope.whole_clusters and request.scope.namespaces() is None


def test_a_run_to_be_confirmed_is_a_dry_run_until_confirmed(fleet: Fleet) -> None:
    """Issue 18 item 2: dry run, confirmation and rollback in one run. Whatever `dry_run` says, a request that asks
    for a confirmation changes nothing until the confirm task applies it."""
    for dry_run in (True, False):
        request = em.parse_request({"confirm": True, "dry_run": dry_run, "confirm_timeout_seconds": 60}, fleet)
        assert (request.dry_run, request.confirm, request.confirm_timeout_seconds) == (True, True, 60)
        applying = request.applying()
        assert (applying.dry_run, applying.confirm, applying.scope) == (False, False, request.scope)
        assert em.Request.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    with pytest.raises(em.ScopeError, match=r"confirm: 'yes' is not true or false"):
        em.parse_request({"confirm": "yes"}, fleet)
    with pytest.raises(em.ScopeError, match="confirm_timeout_seconds"):
        em.parse_request({"confirm": True, "confirm_timeout_seconds": 5}, fleet)


def test_a_scope_of_services_in_named_clusters(fleet: Fleet) -> None:
    request = em.parse_request({"clusters": ["prod-eu-1"], "services": ["payments/payment-service", "edge/cdn"],
                                "dry_run": False, "max_parallel": 2, "health_window": "30s"}, fleet)
    assert request.scope.clusters == ("prod-eu-1",) and request.dry_run is False
    assert request.scope.namespaces() == ["edge", "payments"]
    assert request.scope.covers("edge", "cdn") and not request.scope.covers("edge", "admin-portal")
    assert em.Request.from_dict(json.loads(json.dumps(request.to_dict()))) == request


def test_services_may_come_as_one_string_from_the_cli(fleet: Fleet) -> None:
    request = em.parse_request({"services": "payments/payment-service, edge/cdn\nedge/cdn"}, fleet)
    assert request.scope.services == ("payments/payment-service", "edge/cdn")


def test_every_bad_field_is_named_before_anything_changes(fleet: Fleet) -> None:
    with pytest.raises(em.ScopeError) as err:
        em.parse_request({"clusters": ["prod-xx-9"], "namespace": "Payments", "services": ["payments", "a/B_c"],
                          "max_parallel": 0, "min_success_rate": 1.5, "health_window": "soon",
                          "dry_run": "no"}, fleet)
    text = str(err.value)
    assert "nothing was changed" in text
    for expected in ("clusters: prod-xx-9 not in any plan", "namespace: 'Payments' is not a valid RFC 1123 label",
                     "services: 'payments' is not namespace/workload", "services: a/B_c: workload: 'B_c'",
                     "max_parallel: 0 is out of range 1-50", "min_success_rate: 1.5 is out of range",
                     "health_window: 'soon' is not a positive Prometheus duration", "dry_run: 'no' is not true or"):
        assert expected in text, text


def test_services_outside_the_namespace_are_refused(fleet: Fleet) -> None:
    with pytest.raises(em.ScopeError, match="services: edge/cdn not in namespace payments"):
        em.parse_request({"namespace": "payments", "services": ["edge/cdn"]}, fleet)


def test_all_cannot_be_mixed_with_named_clusters(fleet: Fleet) -> None:
    with pytest.raises(em.ScopeError, match="clusters: 'all' cannot be combined"):
        em.parse_request({"clusters": ["all", "prod-eu-1"]}, fleet)


def test_without_any_plan_the_clusters_come_from_cluster_connections(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("migration: Broken\n")
    fleet = load_fleet(tmp_path)
    with pytest.raises(em.ScopeError) as err:
        em.parse_request({}, fleet)
    assert "no plan file names a cluster" in str(err.value) and "broken.yaml" in str(err.value)
    conns = {"prod-x-1": {"kubernetes_conn_id": "meshlab_x", "prometheus_conn_id": "meshlab_prom_x"}}
    request = em.parse_request({"clusters": ["prod-x-1"], "cluster_connections": conns}, fleet)
    assert request.targets == [em.Target("prod-x-1", "meshlab_x", "meshlab_prom_x", "istio-system")]
    assert any("broken.yaml" in n for n in request.notes)
    with pytest.raises(em.ScopeError, match="cluster_connections.prod-x-1.prometheus_conn_id: 'a b'"):
        em.parse_request({"cluster_connections": {"prod-x-1": {"kubernetes_conn_id": "meshlab_k",
                                                               "prometheus_conn_id": "a b"}}}, fleet)


def test_the_seed_plan_gives_stage_2_the_criticality_of_every_seed_service_it_plans(fleet: Fleet) -> None:
    """Stage 2 removes sidecars critical first, by the plans' criticality: the seed plan carries the seed's own for
    all but the three services it does not plan (a service no plan names would go last, as unknown)."""
    topology = yaml.safe_load((ROOT / "include" / "lab" / "seed.yaml").read_text())
    seed = {f"{s['cluster']}/{s['namespace']}/{s['name']}": s["criticality"] for s in topology["services"]
            if s.get("kind") != "external" and not s.get("gateway")}
    planned = em.criticality_of(fleet)
    assert planned == {k: c for k, c in seed.items() if k in planned}
    assert sorted(set(seed) - set(planned)) == ["prod-eu-1/data/legacy-reporting",
                                                "prod-eu-1/monitoring/blackbox-exporter",
                                                "prod-eu-1/platform/email-service"]


def test_a_broken_plan_hides_only_its_own_clusters(tmp_path: Path) -> None:
    (tmp_path / "a-broken.yaml").write_text("migration: x\nclusters: {}\nwaves: []\n")
    (tmp_path / "seed.yaml").write_text(SEED_PLAN.read_text())
    request = em.parse_request({"clusters": ["all"]}, load_fleet(tmp_path))
    assert [t.cluster for t in request.targets] == SEED_CLUSTERS
    assert len(request.notes) == 1 and "a-broken.yaml" in request.notes[0]


# ---- stage 1 ----------------------------------------------------------------------------------------------
def test_strict_parts_reads_the_mode_and_every_port() -> None:
    assert strict_parts(policy("a", "p")) == {"mtls": "STRICT"}
    assert strict_parts(policy("a", "p", "PERMISSIVE", {"app": "x"}, {8080: {"mode": "STRICT"},
                                                                      9090: {"mode": "DISABLE"}})) == {
        "port 8080": "STRICT"}
    assert strict_parts(policy("a", "p", None)) == {}


def test_plan_relax_patches_strict_to_permissive_and_annotates_the_previous_mode() -> None:
    change = plan_relax("c1", "shop", "p", policy("shop", "p", "STRICT", {"app": "x"}, {"8080": {"mode": "STRICT"}}),
                        "mesh_emergency_rollback run-1")
    assert change.request is not None and change.request.verb == "PATCH"
    assert change.request.path == "/apis/security.istio.io/v1/namespaces/shop/peerauthentications/p"
    assert change.request.content_type == "application/merge-patch+json"
    body = change.request.body
    assert body["spec"] == {"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}
    assert body["metadata"]["resourceVersion"] == "7", "optimistic lock: a concurrent edit is a 409, re-read"
    assert json.loads(body["metadata"]["annotations"][PREVIOUS_MTLS_ANNOTATION]) == {
        "mtls": "STRICT", "port 8080": "STRICT"}
    assert "selector" not in body["spec"], "the selector is untouched"


def test_plan_relax_leaves_a_policy_without_strict_alone() -> None:
    for current in (policy("shop", "p", "PERMISSIVE"), policy("shop", "p", "DISABLE"), None):
        assert plan_relax("c1", "shop", "p", current, "x").request is None


def test_the_mesh_wide_policy_is_always_in_scope_a_root_selector_policy_never() -> None:
    scope = em.Scope(("c1",), services=("shop/cart",))
    assert em.policy_in_scope(policy("istio-system", "default"), scope, "istio-system", {}) == "mesh-wide"
    assert em.policy_in_scope(policy("istio-system", "x", selector={"app": "cart"}), scope, "istio-system",
                              {"shop/cart": {"app": "cart"}}) is None


def test_namespace_and_workload_policies_follow_the_scope() -> None:
    labels = {"shop/cart": {"app": "cart", "version": "v1"}}
    services = em.Scope(("c1",), services=("shop/cart",))
    namespace = em.Scope(("c1",), namespace="shop")
    cases = [
        (policy("shop", "default"), services, "namespace-wide"),
        (policy("shop", "meshwave-cart", selector={"app": "cart"}), services, "workload"),
        (policy("shop", "meshwave-pricing", selector={"app": "pricing"}), services, None),
        (policy("other", "default"), services, None),
        (policy("shop", "meshwave-pricing", selector={"app": "pricing"}), namespace, "workload"),
        (policy("other", "default"), namespace, None),
        (policy("other", "default"), em.Scope(("c1",)), "namespace-wide"),
    ]
    for p, scope, expected in cases:
        assert em.policy_in_scope(p, scope, "istio-system", labels) == expected, (p, scope)


class FakeKube:
    """The reads and the one write stage 1 uses, recording what was written."""

    cluster, root_namespace, dry_run = "c1", "istio-system", False

    def __init__(self, policies: list[dict[str, Any]]) -> None:
        self.policies = policies
        self.written: list[str] = []

    @property
    def mtls(self) -> FakeKube:  # the PeerAuthentications of the cluster: list and relax
        return self

    def list(self, ns: str | None = None) -> list[dict[str, Any]]:
        return [p for p in self.policies if ns in (None, p["metadata"]["namespace"])]

    def applying_to(self, ns: str) -> list[dict[str, Any]]:
        return self.list(ns) + self.list(self.root_namespace)

    def workload(self, ns: str, name: str) -> WorkloadState:
        return WorkloadState("c1", ns, name, 1, template_labels={"app": name})

    def relax(self, ns: str, name: str, note: str, current: dict[str, Any] | None = None):
        change = plan_relax(self.cluster, ns, name, current, note)
        change.applied, change.dry_run = not self.dry_run, self.dry_run
        self.written.append(f"{ns}/{name}")
        for p in self.policies:
            if p["metadata"]["name"] == name and p["metadata"]["namespace"] == ns:
                p["spec"] = {"mtls": {"mode": "PERMISSIVE"}}
        return change


def test_stage_1_relaxes_only_what_is_strict_and_in_scope_and_a_second_run_changes_nothing() -> None:
    kube = FakeKube([policy("istio-system", "default"), policy("shop", "default", "PERMISSIVE"),
                     policy("shop", "meshwave-cart", selector={"app": "cart"}),
                     policy("shop", "meshwave-pricing", selector={"app": "pricing"}), policy("data", "default")])
    scope = em.Scope(("c1",), services=("shop/cart",))
    result = em.relax_cluster(kube, scope, "run-1")  # type: ignore[arg-type]
    assert kube.written == ["istio-system/default", "shop/meshwave-cart"]
    assert [p["scope"] for p in result["policies"]] == ["mesh-wide", "namespace-wide", "workload"]
    assert result["ended"] >= result["started"]
    assert em.relax_cluster(kube, scope, "run-2")["changes"] == []  # type: ignore[arg-type]
    assert kube.written == ["istio-system/default", "shop/meshwave-cart"]


def test_stage_1_reports_what_istio_still_makes_strict_after_its_writes() -> None:
    """The data plane decides, not the changes: a policy put back at once (a controller fighting the write)."""
    kube = FakeKube([policy("shop", "meshwave-cart", selector={"app": "cart"}),
                     policy("shop", "meshwave-pricing", selector={"app": "pricing"})])
    scope = em.Scope(("c1",), services=("shop/cart", "shop/pricing"))
    relax = kube.relax

    def put_back_cart(ns: str, name: str, note: str, current: dict[str, Any] | None = None):
        change = relax(ns, name, note, current)
        if name == "meshwave-cart":
            kube.policies[0]["spec"] = {"selector": {"matchLabels": {"app": "cart"}}, "mtls": {"mode": "STRICT"}}
        return change

    kube.relax = put_back_cart  # type: ignore[method-assign]
    result = em.relax_cluster(kube, scope, "run-1")  # type: ignore[arg-type]
    assert result["still_strict"] == {"shop/cart": ["all ports: peerauthentication shop/meshwave-cart (workload, "
                                                    "STRICT; not meshwave's)"]}


def test_stage_1_names_the_gitops_tool_that_will_put_strict_back(caplog: pytest.LogCaptureFixture) -> None:
    tracking = "mesh:security.istio.io/PeerAuthentication:istio-system/default"
    owned = policy("istio-system", "default")
    owned["metadata"]["annotations"] = {"argocd.argoproj.io/tracking-id": tracking}
    kube = FakeKube([owned, policy("shop", "default")])
    kube.dry_run = True  # the plan of action an SRE reads before applying
    result = em.relax_cluster(kube, em.Scope(("c1",)), "run-1")  # type: ignore[arg-type]
    reasons = {c["target"]: c["reason"] for c in result["changes"]}
    warning = f"will be reverted by Argo CD (argocd.argoproj.io/tracking-id: {tracking})"
    assert warning in reasons["peerauthentication istio-system/default"]
    assert "reverted" not in reasons["peerauthentication shop/default"]
    assert [p["reverted_by"] for p in result["policies"]] == [f"Argo CD (argocd.argoproj.io/tracking-id: {tracking})",
                                                              None]
    with caplog.at_level(logging.INFO, logger="meshwave.emergency_tasks"):
        log_changes(result["changes"])
    [line] = [r.getMessage() for r in caplog.records if "istio-system/default" in r.getMessage() and
              "dry run" in r.getMessage()]
    assert warning in line


# ---- stage 2 ----------------------------------------------------------------------------------------------
def test_critical_first_unknown_last_then_by_name() -> None:
    items = [{"cluster": "c1", "namespace": "a", "workload": w} for w in ("zeta", "low", "crit", "unplanned", "hi")]
    criticality = {"c1/a/crit": "critical", "c1/a/hi": "high", "c1/a/low": "low", "c1/a/zeta": "critical"}
    ordered = em.order_targets(items, criticality)
    assert [i["workload"] for i in ordered] == ["crit", "zeta", "hi", "low", "unplanned"]
    assert ordered[-1]["criticality"] == "unknown"


def test_chunks_bound_the_restarts_at_a_time() -> None:
    assert em.chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert em.chunks([], 3) == []
    with pytest.raises(ValueError, match="max_parallel"):
        em.chunks([1], 0)


def test_only_workloads_with_a_sidecar_in_scope_never_a_gateway_or_the_root_namespace() -> None:
    from meshwave.kube import PodState

    def w(ns: str, name: str, proxy: bool, labels: dict | None = None) -> WorkloadState:
        return WorkloadState("c1", ns, name, 1, template_labels=labels or {"app": name},
                             pods=[PodState(f"{name}-1", True, True, proxy, proxy)])

    found = em.with_sidecar([w("shop", "cart", True), w("shop", "pricing", False), w("other", "x", True),
                             w("istio-system", "istiod", True), w("shop", "gw", True, {"istio": "ingressgateway"})],
                            em.Scope(("c1",), namespace="shop"), "istio-system")
    assert [x.name for x in found] == ["cart"]


# ---- stage 3 ----------------------------------------------------------------------------------------------
class FakeSource:
    def __init__(self, cluster: str | None, samples: list[Sample] | Exception) -> None:
        self.cluster, self.samples, self.queries = cluster, samples, []

    def instant(self, query: str) -> list[Sample]:
        self.queries.append(query)
        if isinstance(self.samples, Exception):
            raise self.samples
        return self.samples


def sample(ns: str, app: str, value: float) -> Sample:
    return Sample({"namespace": ns, "app": app}, value)


def test_one_query_per_cluster_split_by_workload() -> None:
    query = em.health_query("10s", "prod-eu-1")
    assert query.count('cluster="prod-eu-1"}') == 3 and "sum by (namespace, app)" in query and "[10s]" in query
    with pytest.raises(ValueError, match="cluster"):
        em.health_query("10s", 'x"} or vector(1)')


def test_judge_healthy_unhealthy_no_traffic_and_no_data() -> None:
    scope = em.Scope(("c1",), services=("shop/a", "shop/b", "shop/c", "shop/gone"))
    rows = em.judge("c1", [sample("shop", "a", 1.0), sample("shop", "b", 0.4), sample("shop", "c", math.nan),
                           sample("other", "z", 0.0)], scope, 0.99)
    assert {r["service"]: r["status"] for r in rows} == {
        "shop/a": "healthy", "shop/b": "unhealthy", "shop/c": "no traffic", "shop/gone": "no data"}
    assert em.judge("c1", [sample("shop", "a", 0.99 - 1e-12)], em.Scope(("c1",)), 0.99)[0]["status"] == "healthy"


def test_check_health_needs_every_cluster_to_answer() -> None:
    scope = em.Scope(("c1", "c2"))
    ok = FakeSource("c1", [sample("shop", "a", 1.0)])
    poll = em.check_health({"c1": ok, "c2": FakeSource("c2", [sample("shop", "a", 0.2)])}, scope, 0.99, "10s")
    assert not poll["healthy"] and [r["cluster"] for r in poll["unhealthy"]] == ["c2"]
    assert poll["counts"] == {"healthy": 1, "unhealthy": 1, "no traffic": 0, "no data": 0}
    down = em.check_health({"c1": ok, "c2": FakeSource("c2", PrometheusUnavailable("refused"))}, scope, 0.99, "10s")
    assert not down["healthy"] and down["errors"] == {"c2": "refused"}
    assert em.check_health({"c1": ok}, scope, 0.99, "10s")["healthy"]
    assert ok.queries[0] == em.health_query("10s", "c1")


def test_recovery_time_comes_from_prometheus_history() -> None:
    query = em.last_unhealthy_query("10s", "c1", 0.99, 42)
    assert query.startswith("max_over_time(timestamp((") and query.endswith(") < 0.99)[42s:1s])")
    scope = em.Scope(("c1", "c2"), namespace="shop")
    c1 = FakeSource("c1", [sample("shop", "a", 1010.0), sample("other", "z", 1050.0)])
    c2 = FakeSource("c2", [sample("shop", "b", 1004.0)])
    assert em.recovered_at({"c1": c1, "c2": c2}, scope, 0.99, "10s", 1000.0, 1030.0) == 1011.0
    assert "[30s:1s]" in c1.queries[0]
    assert em.recovered_at({"c1": FakeSource("c1", [])}, scope, 0.99, "10s", 1000.0, 1030.0) == 1000.0
    down = FakeSource("c1", PrometheusUnavailable("refused"))
    assert em.recovered_at({"c1": down}, scope, 0.99, "10s", 1000.0, 1030.0) is None


def test_stage_1_window_spans_every_cluster() -> None:
    assert em.stage1_window([{"started": 5.0, "ended": 6.0}, None, {"started": 4.0, "ended": 9.5}]) == (4.0, 9.5)
    assert em.stage1_window([]) == (None, None)


def test_table_renders_missing_values_and_floats() -> None:
    text = em.table([{"service": "shop/a", "success_rate": 0.5}, {"service": "shop/bb", "success_rate": None}],
                    ["service", "success_rate"])
    assert text.splitlines() == ["service  success_rate", "shop/a   0.500       ", "shop/bb  -           "]


# ---- the DAG file -----------------------------------------------------------------------------------------
def test_the_dag_parses_with_a_broken_plan_and_with_no_plan_at_all(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "broken.yaml").write_text(yaml.safe_dump({"migration": "Broken"}))
    (plans / "seed.yaml").write_text(SEED_PLAN.read_text())
    monkeypatch.setenv("MESHWAVE_PLANS_DIR", str(plans))
    bag = DagBag(dag_folder=str(ROOT / "dags" / "mesh_emergency_rollback.py"))
    assert bag.import_errors == {}
    dag = bag.dags["mesh_emergency_rollback"]
    assert dag.params["dry_run"] is True and dag.params["remove_sidecars"] is False
    assert dag.params.get_param("clusters").schema["examples"] == ["all", *SEED_CLUSTERS]
    assert "broken.yaml" in dag.doc_md
    assert {t.task_id for t in dag.tasks} == {"validate", "confirm", "stage_1.to_permissive", "stage_1.stage_1_done",
                                              "stage_2.remove_sidecars", "stage_3.verify_health", "report"}
    assert dag.get_task("stage_1.to_permissive").upstream_task_ids == {"validate", "confirm"}, \
        "nothing is relaxed before the confirmation has ended"
    assert dag.params["confirm"] is False
    for path in plans.iterdir():
        path.unlink()
    empty = DagBag(dag_folder=str(ROOT / "dags" / "mesh_emergency_rollback.py"))
    assert empty.import_errors == {}
    assert empty.dags["mesh_emergency_rollback"].params.get_param("clusters").schema["examples"] == ["all"]


# ---- the deferrable loops -----------------------------------------------------------------------------------
class FakeTI:
    def __init__(self, request: em.Request) -> None:
        self.request = request

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.request.to_dict() if (task_ids, key) == ("validate", "request") else None


class InjectedKube:
    """Sidecar removals and lease breaks, in the order they happen."""

    def __init__(self) -> None:
        self.removed: list[str] = []
        self.events: list[str] = []
        self.leases = self

    def break_(self, ns: str, name: str, by: str) -> object:
        from meshwave.changes import Change

        self.events.append(f"break {ns}/{name}")
        return Change("c1", "break-lease", f"deployment {ns}/{name}", applied=True, reason=f"broken by {by}")

    def remove_injection(self, ns: str, name: str) -> list:
        from meshwave.changes import Change

        self.removed.append(f"{ns}/{name}")
        self.events.append(f"remove {ns}/{name}")
        return [Change("c1", "remove-injection", f"deployment {ns}/{name}", applied=True)]


def test_stage_2_defers_once_per_chunk_and_never_starts_the_next_chunk_early(fleet: Fleet) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    from meshwave.emergency_tasks import RemoveSidecarsOperator

    request = em.parse_request({"clusters": ["prod-eu-1"], "remove_sidecars": True, "max_parallel": 2,
                                "dry_run": False}, fleet)
    context = {"ti": FakeTI(request)}
    kube = InjectedKube()
    op = RemoveSidecarsOperator(task_id="remove_sidecars")
    op._kubes["prod-eu-1"] = kube  # type: ignore[assignment]
    op._sources["prod-eu-1"] = FakeSource("prod-eu-1", [])  # no outbound call reported: nothing to relax
    items = [{"cluster": "prod-eu-1", "namespace": "a", "workload": w, "criticality": "medium",
              "kubernetes_conn_id": "k"} for w in ("w1", "w2", "w3")]
    plan = em.chunks(items, 2)
    with pytest.raises(TaskDeferred) as first:
        op._next(context, request, plan, 0, {})
    assert kube.removed == ["a/w1", "a/w2"], "the second chunk waits for the first"
    # the red button overrides leases: each workload's lease is broken before its sidecar goes
    assert kube.events == ["break a/w1", "remove a/w1", "break a/w2", "remove a/w2"]
    assert [i["workload"] for i in first.value.trigger.items] == ["w1", "w2"]
    done = {"results": {f"prod-eu-1/a/{w}": {"status": "done", "message": "ok", "ended": 1.0} for w in ("w1", "w2")}}
    with pytest.raises(TaskDeferred) as second:
        op.chunk_done(context, done, **first.value.kwargs)
    assert kube.removed == ["a/w1", "a/w2", "a/w3"] and second.value.kwargs["index"] == 1
    last = {"results": {"prod-eu-1/a/w3": {"status": "timeout", "message": "not finished", "ended": 2.0}}}
    summary = op.chunk_done(context, last, **second.value.kwargs)
    assert summary["order"] == ["prod-eu-1/a/w1", "prod-eu-1/a/w2", "prod-eu-1/a/w3"] and summary["chunks"] == 2
    assert summary["failed"] == ["prod-eu-1/a/w3"]


def test_the_stage_3_event_keeps_only_what_is_not_healthy() -> None:
    from meshwave.emergency_tasks import event

    rows = [{"service": "a/x", "status": "healthy"}, {"service": "a/y", "status": "unhealthy"}]
    poll = {"at": 1.0, "healthy": False, "rows": rows, "unhealthy": rows[1:], "errors": {}, "counts": {}}
    assert event(poll, 3, None)["rows"] == rows[1:] and event(poll, 3, None)["status"] == "unhealthy"
    assert event({**poll, "unhealthy": [], "rows": []}, 1, None)["status"] == "no data"
    assert event({**poll, "unhealthy": [], "errors": {"c1": "down"}}, 1, None)["status"] == "error"
    assert event({**poll, "healthy": True, "unhealthy": []}, 1, 5.0)["recovered_at"] == 5.0


def test_the_dag_does_not_import_the_wave_machinery(tmp_path: Path) -> None:
    """A broken wave, service group or step module must not take the big red button down with it."""
    code = ("import json, runpy, sys; runpy.run_path(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('meshwave.'))))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags" / "mesh_emergency_rollback.py")],
                         capture_output=True, text=True, env={**os.environ, "AIRFLOW_HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert loaded.isdisjoint({"meshwave.wave", "meshwave.service_group", "meshwave.steps", "meshwave.decisions",
                              "meshwave.sensors", "meshwave.triggers", "meshwave.stages"}), loaded
