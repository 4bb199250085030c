"""meshwave.peer_auth against the lab: the mode in force decides, meshwave's own policy is the only one it
creates or deletes, and every write is proven from every policy afterwards (safety review findings 2, 3, 17, 23).

Each test works on its own workload of include/lab/small.yaml (the module lab is shared) and compares meshwave's
view with the lab's data plane (`mtls_mode` of the lab's admin API: the mode the simulated proxy enforces).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import config

from meshstack.process import LabProcess
from meshwave.kube import MeshKube
from meshwave.kube_errors import MtlsRefused, NotFound, Rejected
from meshwave.mtls import Mode
from meshwave.peer_auth import PA_GROUP, PA_PLURAL, PREVIOUS_MTLS_ANNOTATION
from meshwave.probe import PROBE_FOR_LABEL, PlaintextProbe, ProbeVerdict
from tests.component.kubes import api_client
from tests.conftest import eventually

pytestmark = pytest.mark.component
NS = "shop"




def policy(ns: str, name: str, mode: str | None, selector: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}} if mode else {}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def create(kube: MeshKube, body: dict[str, Any]) -> None:
    kube.custom.create_namespaced_custom_object(PA_GROUP, "v1", body["metadata"]["namespace"], PA_PLURAL, body)


def delete(kube: MeshKube, ns: str, name: str) -> None:
    kube.custom.delete_namespaced_custom_object(PA_GROUP, "v1", ns, PA_PLURAL, name)


def names(kube: MeshKube, ns: str = NS) -> list[str]:
    return sorted(p["metadata"]["name"] for p in kube.mtls.list(ns))


def data_plane(lab: LabProcess, workload: str) -> str:
    return lab.admin("GET", f"/services/lab/{NS}/{workload}")["mtls_mode"]


def test_strict_is_created_proven_and_undone_by_deleting_it(lab: LabProcess, kube: MeshKube) -> None:
    assert kube.mtls.version == "v1"
    change, state = kube.mtls.ensure_strict(NS, "auth")
    assert change.applied and change.request is not None and change.request.verb == "POST" and change.before is None
    assert state is not None and state.mode == Mode.STRICT and state.decided_by is not None
    assert state.decided_by.name == "meshwave-auth" and data_plane(lab, "auth") == "STRICT"
    again, _ = kube.mtls.ensure_strict(NS, "auth")
    assert not again.applied and again.reason.startswith("already STRICT")
    [undo], after = kube.mtls.ensure_permissive(NS, "auth", "test")
    assert undo.action == "delete-mtls" and undo.applied  # none existed before: deleted, not left PERMISSIVE
    assert after is not None and after.mode == Mode.PERMISSIVE and "meshwave-auth" not in names(kube)
    assert data_plane(lab, "auth") == "PERMISSIVE"


def test_no_permissive_policy_is_created_where_the_workload_already_is_permissive(kube: MeshKube) -> None:
    before = names(kube)
    [change], state = kube.mtls.ensure_permissive(NS, "email-service", "test")
    assert not change.applied and change.request is None and change.reason.startswith("already PERMISSIVE")
    assert state is not None and state.mode == Mode.PERMISSIVE and names(kube) == before
    changes, _ = kube.mtls.ensure_permissive(NS, "email-service", "test", exempt=False)
    assert [c.applied for c in changes] == [False] and names(kube) == before


def test_an_older_team_policy_refuses_the_flip_and_a_strict_one_is_relaxed_in_place(lab: LabProcess,
                                                                                     kube: MeshKube) -> None:
    create(kube, policy(NS, "team-ledger", "PERMISSIVE", {"app": "ledger"}))
    try:
        with pytest.raises(MtlsRefused, match=r"shop/ledger is selected by peerauthentication shop/team-ledger "
                                              r"\(workload, PERMISSIVE; not meshwave's\)"):
            kube.mtls.ensure_strict(NS, "ledger")
        assert "meshwave-ledger" not in names(kube)  # refused before any write
        kube.custom.patch_namespaced_custom_object(PA_GROUP, "v1", NS, PA_PLURAL, "team-ledger",
                                                   {"spec": {"mtls": {"mode": "STRICT"}}})
        assert data_plane(lab, "ledger") == "STRICT"
        [relaxed], state = kube.mtls.ensure_permissive(NS, "ledger", "meshwave test run")
        assert relaxed.action == "relax-mtls" and relaxed.applied and "team-ledger" in relaxed.reason
        assert state is not None and state.mode == Mode.PERMISSIVE and data_plane(lab, "ledger") == "PERMISSIVE"
        team = kube.custom.get_namespaced_custom_object(PA_GROUP, "v1", NS, PA_PLURAL, "team-ledger")
        assert team["metadata"]["annotations"][PREVIOUS_MTLS_ANNOTATION] == '{"mtls": "STRICT"}'
        assert "meshwave-ledger" not in names(kube)
    finally:
        delete(kube, NS, "team-ledger")


def test_namespace_wide_strict_gets_an_exemption_that_goes_when_it_goes(lab: LabProcess, kube: MeshKube) -> None:
    kube.core.create_namespace({"metadata": {"name": "strictns"}})
    kube.apps.create_namespaced_deployment("strictns", {
        "metadata": {"name": "svc"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "svc"}}, "template": {
            "metadata": {"labels": {"app": "svc"}}, "spec": {"containers": [{"name": "svc", "image": "s:1"}]}}}})
    create(kube, policy("strictns", "default", "STRICT"))
    assert kube.mtls.namespace_wide("strictns") is not None
    assert kube.mtls.effective("strictns", "svc").mode == Mode.STRICT
    kept, _ = kube.mtls.ensure_permissive("strictns", "svc", "test", exempt=False)
    assert [c.applied for c in kept] == [False] and names(kube, "strictns") == ["default"]  # nothing created
    [exempt], state = kube.mtls.ensure_permissive("strictns", "svc", "test")
    assert exempt.applied and exempt.request is not None and exempt.request.verb == "POST"
    assert state is not None and state.mode == Mode.PERMISSIVE and state.decided_by is not None
    assert state.decided_by.name == "meshwave-svc"
    delete(kube, "strictns", "default")
    [gone], state = kube.mtls.ensure_permissive("strictns", "svc", "test")
    assert gone.action == "delete-mtls" and names(kube, "strictns") == []


def test_conflicts_are_re_read_and_retried_once(kube: MeshKube, monkeypatch: pytest.MonkeyPatch) -> None:
    kube.mtls.ensure_strict(NS, "user")
    stale = kube.mtls._get(NS, "meshwave-user")
    kube.custom.patch_namespaced_custom_object(PA_GROUP, "v1", NS, PA_PLURAL, "meshwave-user",
                                               {"metadata": {"annotations": {"touched": "by someone else"}}})
    real_list = kube.mtls.applying_to
    calls: list[int] = []

    def stale_once(ns: str) -> list[dict[str, Any]]:
        found = real_list(ns)
        calls.append(1)
        if len(calls) == 1:  # the first read sees the old resourceVersion: the PATCH gets a 409 and is re-planned
            return [copy.deepcopy(stale) if p["metadata"]["name"] == "meshwave-user" else p for p in found]
        return found

    create(kube, policy(NS, "default", "STRICT"))  # so meshwave's policy is needed, PERMISSIVE, not deleted
    try:
        monkeypatch.setattr(kube.mtls, "applying_to", stale_once)
        [patched], state = kube.mtls.ensure_permissive(NS, "user", "test")
        assert patched.applied and patched.request is not None and patched.request.verb == "PATCH"
        assert state is not None and state.mode == Mode.PERMISSIVE
    finally:
        monkeypatch.undo()
        delete(kube, NS, "default")
        kube.mtls.ensure_permissive(NS, "user", "test")
    assert "meshwave-user" not in names(kube)


def test_dry_run_plans_the_request_and_writes_nothing(lab: LabProcess, kube: MeshKube) -> None:
    before = names(kube)
    dry = MeshKube(api_client(lab), "lab", dry_run=True)
    change, state = dry.mtls.ensure_strict(NS, "payment")
    assert state is None and change.dry_run and not change.applied and change.request is not None
    assert change.reason.startswith("dry run: would POST /apis/security.istio.io/v1/namespaces/shop/")
    assert change.request.body["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "meshwave"}
    assert names(kube) == before


def test_the_mesh_wide_policy_in_force_is_the_oldest(kube: MeshKube) -> None:
    assert kube.mtls.mesh_wide() is None
    create(kube, policy("istio-system", "workload-only", "DISABLE", {"app": "istiod"}))
    create(kube, policy("istio-system", "zz-default", "STRICT"))
    time.sleep(1.1)  # creationTimestamp has second resolution
    create(kube, policy("istio-system", "aa-newer", "PERMISSIVE"))
    try:
        mesh = kube.mtls.mesh_wide()
        assert mesh is not None and (mesh.name, mesh.mode) == ("zz-default", Mode.STRICT)  # not the first by name
    finally:
        for name in ("workload-only", "zz-default", "aa-newer"):
            delete(kube, "istio-system", name)
    assert kube.mtls.mesh_wide() is None


def test_a_patch_type_the_api_refuses_is_a_kube_error(kube: MeshKube) -> None:
    create(kube, policy(NS, "x", "PERMISSIVE", {"app": "x"}))
    with pytest.raises(Rejected, match="415 UnsupportedMediaType: strategic merge patch format is not supported"):
        kube.call("PATCH", "peerauthentication shop/x", kube.custom.patch_namespaced_custom_object,
                  PA_GROUP, "v1", NS, PA_PLURAL, "x", {"spec": {}},
                  _content_type="application/strategic-merge-patch+json")
    delete(kube, NS, "x")


BETA_TOPOLOGY = """
name: beta
clusters:
  - name: beta
    peer_authentication_versions: [v1beta1]   # an Istio older than 1.22: security.istio.io/v1 answers 404
services:
  - {name: web, namespace: shop, replicas: 1}
peer_authentications:
  - {namespace: shop, name: default, mode: STRICT}
"""


def test_a_cluster_serving_only_v1beta1_is_read_and_written_at_v1beta1(tmp_path: Path) -> None:
    """Safety review finding 23: security.istio.io/v1 hard-coded made every PeerAuthentication call fail there."""
    (tmp_path / "beta.yaml").write_text(BETA_TOPOLOGY)
    with LabProcess(tmp_path / "beta.yaml", tmp_path / "lab") as beta:
        kube = MeshKube(config.new_client_from_config(config_file=beta.kubeconfig("beta")), "beta")
        with pytest.raises(NotFound):  # what the old hard-coded version met
            kube.call("LIST", "peerauthentications", kube.custom.list_namespaced_custom_object, PA_GROUP, "v1", NS,
                      PA_PLURAL)
        assert kube.mtls.version == "v1beta1"
        assert kube.mtls.effective(NS, "web").mode == Mode.STRICT  # the namespace-wide policy, read at v1beta1
        [exempt], state = kube.mtls.ensure_permissive(NS, "web", "test")
        assert exempt.applied and exempt.request is not None
        assert exempt.request.path == "/apis/security.istio.io/v1beta1/namespaces/shop/peerauthentications"
        assert state is not None and state.mode == Mode.PERMISSIVE
        relaxed = kube.mtls.relax(NS, "default", "emergency test")  # what the emergency rollback's stage 1 sends
        assert relaxed.applied and kube.mtls.namespace_wide(NS) is not None
        assert kube.mtls.namespace_wide(NS).mode == Mode.PERMISSIVE  # type: ignore[union-attr]


def test_the_plaintext_probe_tells_strict_in_force_from_strict_on_paper(lab: LabProcess, kube: MeshKube) -> None:
    """Safety review finding 3: the share of mTLS requests proves nothing; a plaintext request refused does."""
    kube.ensure_injected(NS, "ledger", "workload")
    eventually(lambda: kube.rollout(NS, "ledger").done, timeout=60, what="ledger injected")
    probe = PlaintextProbe(kube, "curlimages/curl:8.11.1", timeout_seconds=30, poll_seconds=0.25)
    reached = probe.run(NS, "ledger")
    assert (reached.verdict, reached.exit_code) == (ProbeVerdict.REACHED, 0), reached
    assert reached.url == "http://ledger.shop.svc.cluster.local:8080/"
    change, state = kube.mtls.ensure_strict(NS, "ledger")
    try:
        refused = probe.run(NS, "ledger")
        assert (refused.verdict, refused.exit_code) == (ProbeVerdict.REFUSED, 56), refused
        assert "Connection reset by peer" in refused.message
        left = kube.core.list_namespaced_pod(NS, label_selector=f"{PROBE_FOR_LABEL}=ledger").items
        assert left == [], "the probe pods are deleted"
    finally:
        kube.mtls.ensure_permissive(NS, "ledger", "test")
        kube.remove_injection(NS, "ledger")
    no_service = probe.run("istio-system", "istiod")
    assert no_service.verdict == ProbeVerdict.INCONCLUSIVE and "no Service" in no_service.message
