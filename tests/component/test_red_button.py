"""Emergency stage 1 against the lab with a Gatekeeper constraint keeping one PeerAuthentication STRICT
(clusters[].keep_strict): every other policy relaxed, the mesh-wide one first, the denied one named with why; the
relaxed meshwave policy is never made STRICT again until `clear_emergency`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from meshstack.process import LabProcess
from meshwave import emergency as em
from meshwave.kube import MeshKube
from meshwave.kube_errors import MtlsRefused
from meshwave.mtls import MESHWAVE_LABEL
from meshwave.peer_auth import PA_GROUP, PA_PLURAL, RELAXED_BY_ANNOTATION

pytestmark = pytest.mark.component

TOPOLOGY = {
    "name": "red-button",
    "clusters": [{"name": "lab", "namespaces": [{"name": "shop"}, {"name": "billing"}],
                  "keep_strict": ["billing/default"]}],
    "services": [{"name": "auth", "namespace": "shop"}, {"name": "ledger", "namespace": "billing"}],
    "peer_authentications": [
        {"namespace": "billing", "name": "default", "mode": "STRICT"},
        {"namespace": "istio-system", "name": "default", "mode": "STRICT"},
    ],
}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabProcess]:
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(TOPOLOGY))
    with LabProcess(path, tmp_path / "lab") as running:
        yield running


def test_a_webhook_denying_one_policy_leaves_every_other_relaxed_the_mesh_wide_first(lab: LabProcess) -> None:
    api = config.new_client_from_config(config_file=lab.kubeconfig())
    kube = MeshKube(api, "lab")
    custom = client.CustomObjectsApi(api)
    key, value = MESHWAVE_LABEL  # meshwave's own policy, as a wave's flip_strict left it
    custom.create_namespaced_custom_object(PA_GROUP, "v1", "shop", PA_PLURAL, {
        "apiVersion": f"{PA_GROUP}/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "meshwave-auth", "namespace": "shop", "labels": {key: value}},
        "spec": {"selector": {"matchLabels": {"app": "auth"}}, "mtls": {"mode": "STRICT"}}})
    result = em.relax_cluster(kube, em.Scope(("lab",)), "mesh_emergency_rollback run-1")
    assert [p["policy"] for p in result["policies"]] == ["istio-system/default", "billing/default",
                                                         "shop/meshwave-auth"], "mesh-wide, namespace-wide, workload"
    assert [c["target"] for c in result["changes"]] == ["peerauthentication istio-system/default",
                                                        "peerauthentication shop/meshwave-auth"]
    assert all(c["applied"] for c in result["changes"])
    [left] = result["not_relaxed"]
    assert (left["policy"], left["scope"], left["why"], left["code"]) == ("billing/default", "namespace-wide",
                                                                          "webhook denial", 403)
    assert 'admission webhook "validation.gatekeeper.sh" denied the request: [meshlab-keep-strict]' in left["message"]
    modes = {(ns, name): custom.get_namespaced_custom_object(PA_GROUP, "v1", ns, PA_PLURAL, name)["spec"]["mtls"]
             ["mode"] for ns, name in (("istio-system", "default"), ("billing", "default"), ("shop", "meshwave-auth"))}
    assert modes == {("istio-system", "default"): "PERMISSIVE", ("billing", "default"): "STRICT",
                     ("shop", "meshwave-auth"): "PERMISSIVE"}

    # the relaxed meshwave policy carries the mark: no STRICT again until an operator clears it
    with pytest.raises(MtlsRefused, match="emergency rollback .*clear_emergency"):
        kube.mtls.ensure_strict("shop", "auth")
    [cleared] = kube.mtls.clear_emergency("shop", "auth")
    assert cleared.applied and cleared.target == "peerauthentication shop/meshwave-auth"
    policy = custom.get_namespaced_custom_object(PA_GROUP, "v1", "shop", PA_PLURAL, "meshwave-auth")
    assert RELAXED_BY_ANNOTATION not in (policy["metadata"].get("annotations") or {})
    assert policy["spec"]["mtls"]["mode"] == "PERMISSIVE", "clearing the mark changes no mode"
    change, _ = kube.mtls.ensure_strict("shop", "auth")
    assert change.applied and change.after["mode"] == "STRICT"
