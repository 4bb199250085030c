"""Istio revisions per cluster: the injector webhook configurations served, and which revision injects a pod."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from meshlab import resources as r
from meshlab.errors import ApiError
from meshlab.injection import injection_applies
from meshlab.lab import Lab
from meshlab.topology import TopologyError, load_topology, parse_topology

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


def topology(cluster: dict | None = None, namespace_labels: dict | None = None, **mesh: object) -> dict:
    return {"mesh": mesh, "clusters": [{"name": "lab", **(cluster or {}),
                                        "namespaces": [{"name": "shop", "labels": namespace_labels or {}}]}],
            "services": [{"name": "web", "namespace": "shop", "replicas": 1}]}


def lab_of(cluster: dict | None = None, namespace_labels: dict | None = None, **mesh: object) -> Lab:
    return Lab(parse_topology(topology(cluster, namespace_labels, **mesh)))


def webhooks(lab: Lab) -> dict[str, dict]:
    store = lab.clusters["lab"].store
    return {m["metadata"]["name"]: m for m in store.list(r.MUTATING_WEBHOOK_CONFIGURATIONS, None,
                                                         "app=sidecar-injector")}


def web_pod(lab: Lab) -> dict:
    [pod] = lab.clusters["lab"].store.list(r.PODS, "shop", "app=web")
    return pod


def restarted_pod(lab: Lab, pod_labels: dict | None = None) -> dict:
    """web's pod after a restart (with these extra template labels), as the rollout leaves it."""
    store = lab.clusters["lab"].store
    patch: dict = {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-25T02:00:00Z"}}
    if pod_labels:
        patch["labels"] = pod_labels
    store.patch(r.DEPLOYMENTS, "shop", "web", STRATEGIC, {"spec": {"template": {"metadata": patch}}})
    now = time.monotonic()
    for _ in range(20):
        now += 0.5
        lab.tick(now)
    return web_pod(lab)


def injected_revision(pod: dict) -> str | None:
    if not any(c["name"] == "istio-proxy" for c in pod["spec"]["containers"]):
        return None
    return json.loads(pod["metadata"]["annotations"]["sidecar.istio.io/status"])["revision"]


# ---- the topology --------------------------------------------------------------------------------------------
def test_cluster_revisions_default_to_the_mesh_and_the_default_tag_to_an_unrevisioned_install() -> None:
    t = parse_topology({"mesh": {"revisions": ["default", "1-24"]},
                        "clusters": [{"name": "a"}, {"name": "b", "revisions": ["1-24"]},
                                     {"name": "c", "revisions": ["1-23", "1-24"], "default_revision": "1-24"}]})
    a, b, c = t.clusters
    assert (a.revisions, a.default_revision) == (["default", "1-24"], "default")
    assert (b.revisions, b.default_revision) == (["1-24"], None), "revision-only: no default tag"
    assert (c.revisions, c.default_revision) == (["1-23", "1-24"], "1-24")
    assert not a.metrics_merge and not a.image_digest


@pytest.mark.parametrize(("cluster", "message"), [
    ({"revisions": ["1-24"], "default_revision": "1-23"},
     "clusters[0].default_revision: '1-23' is not one of the cluster's revisions ['1-24']"),
    ({"revisions": ["1.24"]}, "'1.24' is not a valid RFC 1123 label"),
    ({"revisions": ["1-24", "1-24"]}, "duplicate revision"),
])
def test_bad_revisions_are_reported_with_the_field(tmp_path: Path, cluster: dict, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(topology(cluster)))
    with pytest.raises(TopologyError, match="t.yaml: ") as info:
        load_topology(path)
    assert message in str(info.value)


# ---- the webhook configurations --------------------------------------------------------------------------------
def test_an_unrevisioned_install_serves_istio_sidecar_injector() -> None:
    served = webhooks(lab_of())
    assert list(served) == ["istio-sidecar-injector"]
    mwc = served["istio-sidecar-injector"]
    assert mwc["apiVersion"] == "admissionregistration.k8s.io/v1" and mwc["kind"] == "MutatingWebhookConfiguration"
    assert {"app": "sidecar-injector", "istio.io/rev": "default"}.items() <= mwc["metadata"]["labels"].items()
    assert [w["name"] for w in mwc["webhooks"]] == [
        "rev.namespace.sidecar-injector.istio.io", "rev.object.sidecar-injector.istio.io",
        "namespace.sidecar-injector.istio.io", "object.sidecar-injector.istio.io"]
    hook = mwc["webhooks"][2]
    assert hook["namespaceSelector"] == {"matchExpressions": [{"key": "istio-injection", "operator": "In",
                                                               "values": ["enabled"]}]}
    assert hook["clientConfig"]["service"] == {"name": "istiod", "namespace": "istio-system", "path": "/inject",
                                               "port": 443}
    assert hook["rules"][0]["operations"] == ["CREATE"] and hook["rules"][0]["resources"] == ["pods"]


def test_a_revision_only_install_serves_its_revision_and_no_default_webhooks() -> None:
    lab = lab_of({"revisions": ["1-24"]})
    served = webhooks(lab)
    assert list(served) == ["istio-sidecar-injector-1-24"]
    mwc = served["istio-sidecar-injector-1-24"]
    assert {"app": "sidecar-injector", "istio.io/rev": "1-24"}.items() <= mwc["metadata"]["labels"].items()
    assert [w["name"] for w in mwc["webhooks"]] == ["rev.namespace.sidecar-injector.istio.io",
                                                    "rev.object.sidecar-injector.istio.io"]
    assert mwc["webhooks"][0]["clientConfig"]["service"]["name"] == "istiod-1-24"
    assert lab.clusters["lab"].store.peek(r.DEPLOYMENTS, "istio-system", "istiod-1-24") is not None


def test_a_default_tag_on_a_revision_is_istio_revision_tag_default() -> None:
    served = webhooks(lab_of({"revisions": ["1-24"], "default_revision": "1-24"}))
    assert sorted(served) == ["istio-revision-tag-default", "istio-sidecar-injector-1-24"]
    tag = served["istio-revision-tag-default"]
    assert {"app": "sidecar-injector", "istio.io/rev": "1-24", "istio.io/tag": "default"}.items() \
        <= tag["metadata"]["labels"].items()
    assert len(tag["webhooks"]) == 4 and tag["webhooks"][0]["clientConfig"]["service"]["name"] == "istiod-1-24"


def test_moving_the_default_tag_off_an_unrevisioned_install_deactivates_its_webhooks() -> None:
    served = webhooks(lab_of({"revisions": ["default", "1-24"], "default_revision": "1-24"}))
    assert sorted(served) == ["istio-revision-tag-default", "istio-sidecar-injector", "istio-sidecar-injector-1-24"]
    never = {"matchLabels": {"istio.io/deactivated": "never-match"}}
    assert all(w["namespaceSelector"] == never == w["objectSelector"]
               for w in served["istio-sidecar-injector"]["webhooks"])


def test_the_webhook_configurations_are_read_only() -> None:
    store = lab_of().clusters["lab"].store
    name = "istio-sidecar-injector"
    for call in (lambda: store.delete(r.MUTATING_WEBHOOK_CONFIGURATIONS, None, name),
                 lambda: store.patch(r.MUTATING_WEBHOOK_CONFIGURATIONS, None, name, MERGE, {"webhooks": []}),
                 lambda: store.create(r.MUTATING_WEBHOOK_CONFIGURATIONS, None, {"metadata": {"name": "x"}})):
        with pytest.raises(ApiError) as info:
            call()
        assert info.value.code == 405
    assert store.peek(r.MUTATING_WEBHOOK_CONFIGURATIONS, None, name)["webhooks"]


# ---- which revision injects ----------------------------------------------------------------------------------
DEFAULT = {}
REVISION_ONLY = {"revisions": ["1-24"]}
TAGGED = {"revisions": ["1-24"], "default_revision": "1-24"}
CANARY = {"revisions": ["default", "1-24"]}


@pytest.mark.parametrize(("cluster", "ns_labels", "pod_labels", "revision"), [
    (DEFAULT, {"istio-injection": "enabled"}, {}, "default"),
    (DEFAULT, {}, {"sidecar.istio.io/inject": "true"}, "default"),
    (DEFAULT, {"istio.io/rev": "default"}, {}, "default"),
    (DEFAULT, {"istio.io/rev": "1-24"}, {}, None),  # no such revision installed
    (REVISION_ONLY, {"istio-injection": "enabled"}, {}, None),
    (REVISION_ONLY, {}, {"sidecar.istio.io/inject": "true"}, None),
    (REVISION_ONLY, {"istio.io/rev": "1-24"}, {}, "1-24"),
    (REVISION_ONLY, {}, {"istio.io/rev": "1-24"}, "1-24"),
    (REVISION_ONLY, {"istio.io/rev": "1-24"}, {"sidecar.istio.io/inject": "false"}, None),
    (TAGGED, {"istio-injection": "enabled"}, {}, "1-24"),
    (TAGGED, {}, {"sidecar.istio.io/inject": "true"}, "1-24"),
    (TAGGED, {"istio.io/rev": "default"}, {}, "1-24"),
    (CANARY, {"istio.io/rev": "1-24"}, {}, "1-24"),
    (CANARY, {"istio.io/rev": "1-24", "istio-injection": "enabled"}, {}, "default"),  # istio-injection wins
    (CANARY, {"istio-injection": "disabled", "istio.io/rev": "1-24"}, {}, None),
    (CANARY, {}, {"istio.io/rev": "1-24", "sidecar.istio.io/inject": "true"}, "1-24"),  # the pod picks
    (CANARY, {"istio.io/rev": "default"}, {"istio.io/rev": "1-24"}, "default"),  # the namespace's wins
])
def test_the_revision_that_injects_a_new_pod(cluster: dict, ns_labels: dict, pod_labels: dict,
                                             revision: str | None) -> None:
    lab = lab_of(cluster, ns_labels)
    if not pod_labels:  # the namespace's labels are there from the start: so is the sidecar
        assert injected_revision(web_pod(lab)) == revision, "at the lab's start"
    pod = restarted_pod(lab, pod_labels)
    assert injected_revision(pod) == revision
    revisions = cluster.get("revisions", ["default"])
    tag = cluster.get("default_revision", "default")
    assert injection_applies(ns_labels, {**pod_labels, "app": "web"}, {}, revisions, tag) is (revision is not None)


def test_an_injected_pod_records_its_revision_in_annotations_not_in_a_label() -> None:
    pod = web_pod(lab_of(REVISION_ONLY, {"istio.io/rev": "1-24"}))
    status = json.loads(pod["metadata"]["annotations"]["sidecar.istio.io/status"])
    assert status == {"initContainers": ["istio-init"], "containers": ["istio-proxy"], "revision": "1-24"}
    assert pod["metadata"]["annotations"]["istio.io/rev"] == "1-24"
    # Istio stopped labelling injected pods istio.io/rev in 1.11 (istio/istio#33447): a tag would be overwritten.
    assert "istio.io/rev" not in pod["metadata"]["labels"]


def test_adding_istio_injection_to_a_revision_namespace_moves_its_pods_to_the_default_at_restart() -> None:
    lab = lab_of(CANARY, {"istio.io/rev": "1-24"})
    assert injected_revision(web_pod(lab)) == "1-24"
    lab.clusters["lab"].store.patch(r.NAMESPACES, None, "shop", MERGE,
                                    {"metadata": {"labels": {"istio-injection": "enabled"}}})
    assert injected_revision(restarted_pod(lab)) == "default"


def test_the_deprecated_annotation_still_refuses_injection() -> None:
    lab = lab_of(DEFAULT, {"istio-injection": "enabled"})
    lab.clusters["lab"].store.patch(r.DEPLOYMENTS, "shop", "web", STRATEGIC, {"spec": {"template": {"metadata": {
        "annotations": {"sidecar.istio.io/inject": "false"}}}}})
    assert injected_revision(restarted_pod(lab)) is None
