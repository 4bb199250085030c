"""The emergency rollback's cluster reads and writes against the lab (include/lab/small.yaml): PeerAuthentications
in scope relaxed (port-level too) and annotated, a stale read re-read, the lab's effective mode back to PERMISSIVE,
and stage 2's candidates read with two requests per namespace."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client, config

from meshstack.process import LabProcess
from meshwave import emergency as em
from meshwave.kube import MeshKube
from meshwave.peer_auth import PA_GROUP, PA_PLURAL, PREVIOUS_MTLS_ANNOTATION
from tests.conftest import eventually

PA_VERSION = "v1"  # what the small lab serves

pytestmark = pytest.mark.component


def pa(ns: str, name: str, mode: str, selector: dict | None = None, ports: dict | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = ports
    return {"apiVersion": f"{PA_GROUP}/{PA_VERSION}", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def mtls(lab: LabProcess, workload: str) -> str:
    """The mode the lab's mesh applies to the workload's port (Istio's precedence rules)."""
    return lab.admin("GET", f"/services/lab/shop/{workload}")["mtls_mode"]


def test_stage_1_on_the_lab_relaxes_namespace_and_port_policies_and_rereads_a_stale_one(small_lab: LabProcess) -> None:
    api = config.new_client_from_config(config_file=small_lab.kubeconfig())
    custom = client.CustomObjectsApi(api)
    for body in (pa("shop", "default", "STRICT"),
                 pa("shop", "auth-ports", "PERMISSIVE", {"app": "auth"}, {"8080": {"mode": "STRICT"}}),
                 pa("shop", "user-strict", "STRICT", {"app": "user"}),
                 pa("istio-system", "default", "STRICT")):
        custom.create_namespaced_custom_object(PA_GROUP, PA_VERSION, body["metadata"]["namespace"], PA_PLURAL, body)
    kube = MeshKube(api, "lab")
    assert (mtls(small_lab, "auth"), mtls(small_lab, "user"), mtls(small_lab, "ledger")) == ("STRICT",) * 3

    # a stale listing (someone edited the mesh-wide policy since): 409, re-read, then patched
    stale = kube.mtls.list("istio-system")[0]
    custom.patch_namespaced_custom_object(PA_GROUP, PA_VERSION, "istio-system", PA_PLURAL, "default",
                                          {"metadata": {"labels": {"edited": "yes"}}})
    change = kube.mtls.relax("istio-system", "default", "test", current=stale)
    assert change.applied and change.before == {"mtls": "STRICT"}

    dry = em.relax_cluster(MeshKube(api, "lab", dry_run=True), em.Scope(("lab",), services=("shop/auth",)), "dry")
    assert sorted(c["target"] for c in dry["changes"]) == ["peerauthentication shop/auth-ports",
                                                           "peerauthentication shop/default"]
    assert all(c["dry_run"] and not c["applied"] for c in dry["changes"]), "user-strict selects another workload"

    result = em.relax_cluster(kube, em.Scope(("lab",), namespace="shop"), "mesh_emergency_rollback run-1")
    assert sorted(c["target"] for c in result["changes"]) == [
        "peerauthentication shop/auth-ports", "peerauthentication shop/default", "peerauthentication shop/user-strict"]
    ports = custom.get_namespaced_custom_object(PA_GROUP, PA_VERSION, "shop", PA_PLURAL, "auth-ports")
    assert ports["spec"]["portLevelMtls"]["8080"]["mode"] == "PERMISSIVE"
    assert ports["spec"]["selector"] == {"matchLabels": {"app": "auth"}}
    assert json.loads(ports["metadata"]["annotations"][PREVIOUS_MTLS_ANNOTATION]) == {"port 8080": "STRICT"}
    assert em.relax_cluster(kube, em.Scope(("lab",)), "again")["changes"] == [], "idempotent"
    assert (mtls(small_lab, "auth"), mtls(small_lab, "user"), mtls(small_lab, "ledger")) == ("PERMISSIVE",) * 3


def test_stage_2_candidates_are_the_workloads_with_a_sidecar(small_lab: LabProcess) -> None:
    api = config.new_client_from_config(config_file=small_lab.kubeconfig())
    apps = client.AppsV1Api(api)
    for name in ("auth", "ledger"):
        apps.patch_namespaced_deployment(name, "shop", {"spec": {"template": {"metadata": {
            "labels": {"sidecar.istio.io/inject": "true"}}}}})
    kube = MeshKube(api, "lab")
    eventually(lambda: kube.rollout("shop", "ledger").done and kube.workload("shop", "auth").pods_with_proxy,
               timeout=30, what="ledger and auth with sidecars")
    found = em.sidecar_workloads(kube, em.Scope(("lab",)))
    assert [w["workload"] for w in found] == ["auth", "ledger"]
    ordered = em.order_targets(found, {"lab/shop/ledger": "critical"})
    assert [w["workload"] for w in ordered] == ["ledger", "auth"]
    changes = kube.remove_injection("shop", "ledger")
    assert changes[0].applied
    eventually(lambda: kube.rollout("shop", "ledger", expect_proxy=False).done, timeout=30, what="ledger rolled")
    assert [w["workload"] for w in em.sidecar_workloads(kube, em.Scope(("lab",)))] == ["auth"]
