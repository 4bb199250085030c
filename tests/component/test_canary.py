"""meshwave.kube's canary copy against the lab (include/lab/small.yaml): made through the API with the sidecar and
the Service's labels, its pods counted apart from the primary's, kept on a retry, refused over someone else's
Deployment, and deleted with its pods, the primary never touched."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshstack.process import LabProcess
from meshwave.canary import CANARY_LABEL
from meshwave.kube import InjectionBlocked, MeshKube
from tests.conftest import eventually

pytestmark = pytest.mark.component


def _raw(kube: MeshKube, ns: str, name: str) -> dict[str, Any]:
    return json.loads(kube.apps.read_namespaced_deployment(name, ns, _preload_content=False).data)


def _pods(kube: MeshKube, ns: str, selector: str) -> list[dict[str, Any]]:
    return json.loads(kube.core.list_namespaced_pod(ns, label_selector=selector, _preload_content=False).data)["items"]


def test_a_canary_takes_the_services_labels_with_a_sidecar_and_goes_without_touching_the_primary(
        kube: MeshKube) -> None:
    primary = _raw(kube, "shop", "user")
    before = {p["metadata"]["uid"] for p in _pods(kube, "shop", "app=user")}
    change = kube.ensure_canary("shop", "user", 1, "meshwave_w1/manual__1")
    assert change.applied and change.action == "create-canary" and change.target == "deployment shop/user-canary"
    assert change.request is not None and (change.request.verb, change.request.path) == (
        "POST", "/apis/apps/v1/namespaces/shop/deployments")
    made = _raw(kube, "shop", "user-canary")
    labels = made["spec"]["template"]["metadata"]["labels"]
    assert labels == {"app": "user", "version": "v1", "sidecar.istio.io/inject": "true", CANARY_LABEL: "user"}
    assert made["spec"]["selector"]["matchLabels"] == {"app": "user", CANARY_LABEL: "user"}
    assert made["spec"]["replicas"] == 1 and made["metadata"]["annotations"]["meshwave.io/canary-run"] == \
        "meshwave_w1/manual__1"

    def ready() -> bool:
        canary = kube.workload("shop", "user-canary")
        return canary.pods_ready == 1 and canary.pods_with_proxy == 1 or None  # type: ignore[return-value]

    eventually(ready, timeout=30, interval=0.25, what="the canary's pod ready with its sidecar")
    # Each Deployment counts only the pods it owns, though the primary's selector matches the canary's pod too.
    user = kube.workload("shop", "user")
    assert (user.pods_total, user.pods_with_proxy) == (2, 0)
    assert len(_pods(kube, "shop", "app=user")) == 3  # the Service's selector: all three

    again = kube.ensure_canary("shop", "user", 1, "meshwave_w1/manual__1")
    assert not again.applied and "already there" in again.reason

    removed = kube.remove_canary("shop", "user")
    assert removed.applied and removed.action == "delete-canary"
    eventually(lambda: not _pods(kube, "shop", f"{CANARY_LABEL}=user") or None, timeout=30, interval=0.25,
               what="the canary's pods gone with it")
    assert not kube.remove_canary("shop", "user").applied
    after = _raw(kube, "shop", "user")
    assert after["metadata"]["generation"] == primary["metadata"]["generation"]
    assert {p["metadata"]["uid"] for p in _pods(kube, "shop", "app=user")} == before  # never restarted


def test_a_deployment_of_the_canarys_name_that_is_not_a_canary_is_left_alone(lab: LabProcess,
                                                                               kube: MeshKube) -> None:
    body = _raw(kube, "shop", "auth")
    foreign = {"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "auth-canary", "namespace": "shop", "labels": {"team": "auth"}},
               "spec": {**body["spec"], "replicas": 0}}
    kube.apps.create_namespaced_deployment("shop", foreign, _preload_content=False)
    with pytest.raises(InjectionBlocked, match="auth-canary exists and is not meshwave's canary of shop/auth"):
        kube.ensure_canary("shop", "auth", 1, "run")
    kept = kube.remove_canary("shop", "auth")
    assert not kept.applied and "left alone" in kept.reason
    assert _raw(kube, "shop", "auth-canary")["metadata"]["labels"] == {"team": "auth"}
