"""The ad-hoc DAG's input: what the trigger form (or REST conf) may ask, and what is refused before any change."""

from __future__ import annotations

from typing import Any

import pytest

from meshwave.adhoc import form, resolve_service
from meshwave.fleet import Fleet
from meshwave.plan import parse_plan

PLAN = {
    "migration": "shop",
    "clusters": {"lab": {"kubernetes_conn_id": "k8s_lab", "prometheus_conn_id": "prom_lab"}},
    "defaults": {"soak_seconds": 120, "sidecar": {"expected_memory_mi": 64}},
    "waves": [{"name": "wave-1", "services": [
        {"cluster": "lab", "namespace": "shop", "workload": "payment", "criticality": "critical", "strict": False,
         "sidecar": {"memory_limit": "256Mi"}},
    ]}],
}


def fleet() -> Fleet:
    f = Fleet()
    f.add(parse_plan(PLAN), "shop.yaml")
    return f


def params(**given: Any) -> dict[str, Any]:
    return {"cluster": "lab", "namespace": "shop", "service": "cart", "action": "migrate", "soak_seconds": None,
            "dry_run": False, **given}


def test_a_planned_service_runs_with_its_planned_settings() -> None:
    svc = resolve_service(params(service="payment"), fleet())
    assert svc.plan.key == "lab/shop/payment" and svc.plan.criticality == "critical"
    assert svc.settings.sidecar.memory_limit == "256Mi" and svc.settings.soak_seconds == 120
    assert svc.strict is False, "migrate follows the plan: payment stays PERMISSIVE"
    assert svc.cluster.kubernetes_conn_id == "k8s_lab" and svc.action == "migrate"


def test_an_unplanned_service_gets_the_defaults_of_the_plan_naming_its_cluster_and_the_form_s_soak() -> None:
    svc = resolve_service(params(soak_seconds=90, action="strict_only"), fleet())
    assert (svc.plan.key, svc.settings.soak_seconds, svc.settings.sidecar.expected_memory_mi) == \
        ("lab/shop/cart", 90, 64)
    assert svc.strict is True


@pytest.mark.parametrize(("given", "message"), [
    ({"service": 'x"} or vector(1)'}, "service: 'x\"} or vector(1)' is not a valid RFC 1123 label"),
    ({"namespace": "../etc"}, "namespace: '../etc' is not a valid RFC 1123 label"),
    ({"namespace": "Shop"}, "namespace: 'Shop' is not a valid RFC 1123 label"),
    ({"service": "a" * 64}, "service: 'aaaa"),
    ({"service": None}, "service: None is not a valid RFC 1123 label"),
    ({"cluster": "prod-mars-1"}, "cluster: 'prod-mars-1' is not a cluster of the plans (known: lab)"),
    ({"action": "delete_everything"}, "action: 'delete_everything' is not one of migrate, inject_only"),
    ({"soak_seconds": 5}, "soak_seconds: 5 is not a number of seconds in 10..86400"),
    ({"soak_seconds": "60"}, "soak_seconds: '60' is not a number of seconds"),
    ({"soak_seconds": 30}, "soak_seconds: 30 is shorter than query_window_seconds 60: its judgement would rest "
                           "mostly on data from before the change (the form's soak_seconds over the plan's settings)"),
])
def test_bad_input_is_refused_naming_the_field(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        resolve_service(params(**given), fleet())
    assert message in str(exc.value)


def test_with_no_readable_plan_every_cluster_is_refused_and_says_so() -> None:
    with pytest.raises(ValueError, match="known: none: no plan file could be read"):
        resolve_service(params(), Fleet())


def test_the_form_offers_the_plans_clusters_and_validates_names_like_the_run_does() -> None:
    f = form(fleet())
    assert f["cluster"].value == "lab" and f["cluster"].schema["enum"] == ["lab"]
    assert set(f["action"].schema["enum"]) == {"migrate", "inject_only", "strict_only", "permissive",
                                               "remove_sidecar", "clear_emergency"}
    for bad in ('x"} or vector(1)', "../etc", ""):
        with pytest.raises(Exception, match="does not match|should be non-empty|is too short"):
            f["namespace"].resolve(bad)
    assert f["namespace"].resolve("shop") == "shop"
    assert f["dry_run"].value is False
    with pytest.raises(Exception, match="less than the minimum"):
        f["soak_seconds"].resolve(5)
