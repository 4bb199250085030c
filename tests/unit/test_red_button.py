"""Issue 14 items 2 and 3 as pure logic: stage 1's order and its per-policy errors, the freeze the emergency rollback
sets and every write reads again, and the `frozen` outcome."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from meshwave import decisions, guards
from meshwave import emergency as em
from meshwave.kube_errors import AccessDenied, ClusterUnreachable, Conflict, KubeError
from meshwave.outcomes import ServiceOutcome
from meshwave.record import FinalState
from meshwave.results import StepResults
from tests.unit.test_decisions import PREFLIGHT
from tests.unit.test_emergency import FakeKube, policy

IN_FORCE = {"mode": "PERMISSIVE", "ports": {}, "decided_by": None,
            "describe": "PERMISSIVE (no policy applies: Istio's default)"}

WEBHOOK = 'admission webhook "validation.gatekeeper.sh" denied the request: [keep-strict] must stay STRICT'


def refusing(kube: FakeKube, errors: dict[str, KubeError]) -> list[str]:
    """Make `kube.relax` raise `errors[ns/name]` for those policies; returns the order of every attempt."""
    tried: list[str] = []
    relax = kube.relax

    def attempt(ns: str, name: str, note: str, current: dict[str, Any] | None = None) -> Any:
        tried.append(f"{ns}/{name}")
        if f"{ns}/{name}" in errors:
            raise errors[f"{ns}/{name}"]
        return relax(ns, name, note, current)

    kube.relax = attempt  # type: ignore[method-assign]
    return tried


def fleet_policies() -> list[dict[str, Any]]:
    """As a cluster-wide LIST returns them: by namespace, so istio-system's mesh-wide policy is nearly last."""
    return [policy("billing", "default"), policy("billing", "api", selector={"app": "api"}),
            policy("edge", "meshwave-web", selector={"app": "web"}), policy("istio-system", "default"),
            policy("shop", "default"), policy("shop", "meshwave-cart", selector={"app": "cart"})]


def test_stage_1_relaxes_the_mesh_wide_policy_first_then_namespace_wide_then_workload() -> None:
    kube = FakeKube(fleet_policies())
    result = em.relax_cluster(kube, em.Scope(("c1",)), "run-1")  # type: ignore[arg-type]
    assert kube.written == ["istio-system/default", "billing/default", "shop/default", "billing/api",
                            "edge/meshwave-web", "shop/meshwave-cart"]
    assert [c["target"].split()[-1] for c in result["changes"]] == kube.written
    assert result["failed"] == [] and result["not_relaxed"] == []


def test_an_error_on_one_policy_is_recorded_and_every_other_policy_is_still_relaxed() -> None:
    kube = FakeKube(fleet_policies())
    tried = refusing(kube, {
        "billing/default": AccessDenied(WEBHOOK, code=403, api_message=WEBHOOK),
        "edge/meshwave-web": AccessDenied("forbidden: User cannot patch", code=403),
        "shop/default": Conflict("409 twice", code=409)})
    result = em.relax_cluster(kube, em.Scope(("c1",)), "run-1")  # type: ignore[arg-type]
    assert tried[0] == "istio-system/default" and len(tried) == 6, "every STRICT policy tried, the mesh-wide first"
    assert kube.written == ["istio-system/default", "billing/api", "shop/meshwave-cart"]
    assert {i["policy"]: i["why"] for i in result["not_relaxed"]} == {
        "billing/default": "webhook denial", "shop/default": "conflict", "edge/meshwave-web": "RBAC"}
    assert [i["scope"] for i in result["not_relaxed"]] == ["namespace-wide", "namespace-wide", "workload"]
    assert WEBHOOK in result["not_relaxed"][0]["message"]


def test_a_policy_put_back_strict_after_the_write_is_still_strict_and_says_so() -> None:
    kube = FakeKube([policy("istio-system", "default"), policy("shop", "default")])
    relax = kube.relax

    def fought(ns: str, name: str, note: str, current: dict[str, Any] | None = None) -> Any:
        change = relax(ns, name, note, current)
        if ns == "shop":
            kube.policies[1]["spec"] = {"mtls": {"mode": "STRICT"}}
        return change

    kube.relax = fought  # type: ignore[method-assign]
    result = em.relax_cluster(kube, em.Scope(("c1",)), "run-1")  # type: ignore[arg-type]
    left = [(i["policy"], i["why"]) for i in result["not_relaxed"]]
    assert left == [("shop/default", "STRICT again after the write")]


def test_an_api_server_that_stops_answering_ends_the_clusters_attempt() -> None:
    kube = FakeKube(fleet_policies())
    refusing(kube, {"istio-system/default": ClusterUnreachable("connection refused")})
    with pytest.raises(ClusterUnreachable):
        em.relax_cluster(kube, em.Scope(("c1",)), "run-1")  # type: ignore[arg-type]


@pytest.mark.parametrize(("error", "why"), [
    (KubeError(WEBHOOK, code=400, api_message=WEBHOOK), "webhook denial"),
    (AccessDenied(WEBHOOK, code=403, api_message=WEBHOOK), "webhook denial"),
    (AccessDenied("peerauthentications is forbidden", code=403), "RBAC"),
    (Conflict("the object has been modified", code=409), "conflict"),
    (KubeError("internal error", code=500), "error 500"),
])
def test_why_a_write_was_refused(error: KubeError, why: str) -> None:
    assert em.refusal(error) == why


# ---- the freeze -------------------------------------------------------------------------------------------
class Variables:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: str, description: str | None = None) -> None:
        self.values[key] = value


@pytest.fixture
def variables(monkeypatch: pytest.MonkeyPatch) -> Variables:
    store = Variables()
    monkeypatch.setattr(guards, "Variable", store)
    return store


def test_the_emergency_rollback_sets_the_freeze_and_keeps_an_operators_reason(variables: Variables) -> None:
    assert guards.freeze_for_emergency("mesh_emergency_rollback run-1") == \
        "the Airflow Variable meshwave_freeze is set: mesh_emergency_rollback run-1"
    variables.values[guards.FREEZE_VARIABLE] = "INC-4711"
    assert guards.freeze_for_emergency("run-2") == "the Airflow Variable meshwave_freeze is set: INC-4711"
    assert variables.values[guards.FREEZE_VARIABLE] == "INC-4711"


def test_a_write_reads_the_freeze_again(variables: Variables, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("meshwave.fleet.load_fleet", lambda: type("F", (), {"services": {}})())
    assert guards.frozen_now("lab/shop/cart") is None
    variables.values[guards.FREEZE_VARIABLE] = "mesh_emergency_rollback run-1"
    assert guards.frozen_now("lab/shop/cart") == \
        "the Airflow Variable meshwave_freeze is set: mesh_emergency_rollback run-1"


# ---- the outcome -------------------------------------------------------------------------------------------
def test_a_service_frozen_before_its_flip_ends_frozen_with_the_reason_not_strict() -> None:
    states = {"admit": "success", "preflight": "success", "baseline": "success", "inject": "success",
              "wait_rollout": "success", "soak": "success", "strict_gate": "success", "flip_strict": "skipped"}
    errors = {"flip_strict": "frozen: the Airflow Variable meshwave_freeze is set: mesh_emergency_rollback run-1"}
    results = StepResults.model_validate({"preflight": {**PREFLIGHT, "mtls_in_force": IN_FORCE}})
    final = decisions._migration_state(svc(), results, states, errors, {"after_strict_gate_to": decisions.FLIP},
                                       False)
    assert final == FinalState(outcome=ServiceOutcome.FROZEN, mtls="PERMISSIVE", sidecar=True,
                               reason=f"sidecar kept, not STRICT: {errors['flip_strict']}")
    assert not ServiceOutcome.FROZEN.red, "safe and asked for: not a failure of the service"


def test_a_service_frozen_before_its_injection_ends_frozen_without_a_sidecar() -> None:
    states = {"admit": "success", "preflight": "success", "baseline": "success", "inject": "skipped"}
    final = decisions._migration_state(svc(), StepResults(), states, {"inject": "frozen: INC-4711"}, {}, False)
    assert (final.outcome, final.sidecar, final.reason) == ("frozen", False, "not injected: frozen: INC-4711")


def svc() -> Any:
    """What `_migration_state` reads of the service before a freeze matters: its action only."""
    return SimpleNamespace(action="migrate")
