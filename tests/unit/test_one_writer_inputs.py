"""The inputs side of one writer per workload: a workload in two plan files is an error naming both, and
mesh_service refuses Istio's root namespace and its gateways before any change (findings 18 and 22)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshwave.adhoc import gateway_reason, resolve_service
from meshwave.fleet import check_unique, load_fleet
from meshwave.plan import PlanError, load_plan

CLUSTERS = {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p", "root_namespace": "mesh-root"}}


def plan(migration: str, *workloads: str) -> dict[str, Any]:
    return {"migration": migration, "clusters": CLUSTERS,
            "waves": [{"name": "wave-1", "services": [{"cluster": "lab", "namespace": "shop", "workload": w}
                                                      for w in workloads]}]}


@pytest.fixture
def plans(tmp_path: Path) -> Path:
    (tmp_path / "team-a.yaml").write_text(yaml.safe_dump(plan("team-a", "auth", "cart")))
    (tmp_path / "team-b.yaml").write_text(yaml.safe_dump(plan("team-b", "auth")))
    (tmp_path / "team-c.yaml").write_text(yaml.safe_dump(plan("team-c", "pricing")))
    return tmp_path


def test_a_workload_in_two_plans_is_a_fleet_error_naming_both_files(plans: Path) -> None:
    fleet = load_fleet(plans)
    assert fleet.errors == ["lab/shop/auth is planned in two plan files, team-a.yaml and team-b.yaml: a workload "
                            "belongs to one plan; team-a.yaml's is used"]
    assert fleet.services["lab/shop/auth"].source == "team-a.yaml"


def test_each_plan_naming_it_fails_to_load_as_a_wave_naming_both_files(plans: Path) -> None:
    for mine, other in (("team-a.yaml", "team-b.yaml"), ("team-b.yaml", "team-a.yaml")):
        with pytest.raises(PlanError, match=f"lab/shop/auth is planned in two plan files, {mine} and {other}"):
            check_unique(load_plan(plans / mine), plans / mine, plans)
    check_unique(load_plan(plans / "team-c.yaml"), plans / "team-c.yaml", plans)  # nothing shared: loads


def test_a_plan_file_that_does_not_load_claims_no_workload(plans: Path) -> None:
    (plans / "team-b.yaml").write_text(yaml.safe_dump({**plan("team-b", "auth"), "migration": "Team B"}))
    check_unique(load_plan(plans / "team-a.yaml"), plans / "team-a.yaml", plans)


def params(**given: Any) -> dict[str, Any]:
    return {"cluster": "lab", "namespace": "shop", "service": "cart", "action": "migrate", "soak_seconds": None,
            "dry_run": False, **given}


def test_mesh_service_refuses_the_cluster_s_root_namespace(plans: Path) -> None:
    fleet = load_fleet(plans)
    with pytest.raises(ValueError, match="namespace: mesh-root is cluster lab's Istio root namespace"):
        resolve_service(params(namespace="mesh-root", service="istiod", action="remove_sidecar"), fleet)
    assert resolve_service(params(namespace="istio-system"), fleet).plan.namespace == "istio-system", \
        "the root namespace is the plan's, not a fixed name"


def deployment(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
               image: str = "registry/app:1") -> dict[str, Any]:
    return {"spec": {"template": {"metadata": {"labels": {"app": "x", **(labels or {})},
                                               "annotations": annotations or {}},
                                  "spec": {"containers": [{"name": "istio-proxy", "image": image}]}}}}


@pytest.mark.parametrize(("given", "why"), [
    (deployment(labels={"istio": "ingressgateway"}), "gateway label istio=ingressgateway"),
    (deployment(annotations={"inject.istio.io/templates": "gateway"}), "Istio's gateway template"),
    (deployment(image="auto"), "container istio-proxy has image `auto`"),
    (deployment(), None),
    (deployment(annotations={"inject.istio.io/templates": "sidecar"}), None),
])
def test_gateways_are_recognised_as_istio_s_charts_make_them(given: dict[str, Any], why: str | None) -> None:
    found = gateway_reason(given)
    assert (found is None) if why is None else (why in (found or ""))
