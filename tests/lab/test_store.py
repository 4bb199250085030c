"""The object store's API semantics: versions, conflicts, validation, selectors, patches, watch."""

from __future__ import annotations

import pytest

from meshlab import resources as r
from meshlab.errors import ApiError
from meshlab.store import Store


@pytest.fixture
def store() -> Store:
    s = Store("test")
    s.create(r.NAMESPACES, None, {"metadata": {"name": "shop", "labels": {"team": "a"}}})
    s.create(r.NAMESPACES, None, {"metadata": {"name": "ops"}})
    return s


def deployment(name: str = "web", labels: dict[str, str] | None = None) -> dict:
    labels = labels or {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": name, "image": "x:1",
                                                       "ports": [{"containerPort": 8080}]}]}}},
    }


def pa(name: str, mode: str, selector: dict[str, str] | None = None) -> dict:
    spec: dict = {"mtls": {"mode": mode}}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": name},
            "spec": spec}


def error_of(call) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def test_create_sets_identity_and_versions(store: Store) -> None:
    created = store.create(r.DEPLOYMENTS, "shop", deployment())
    meta = created["metadata"]
    assert meta["namespace"] == "shop" and meta["generation"] == 1
    assert meta["uid"] and meta["creationTimestamp"] and int(meta["resourceVersion"]) > 1
    assert store.get(r.DEPLOYMENTS, "shop", "web") == created


def test_create_twice_is_409_already_exists(store: Store) -> None:
    store.create(r.DEPLOYMENTS, "shop", deployment())
    err = error_of(lambda: store.create(r.DEPLOYMENTS, "shop", deployment()))
    assert (err.code, err.reason) == (409, "AlreadyExists")
    assert err.message == 'deployments.apps "web" already exists'


def test_missing_object_and_namespace_are_404(store: Store) -> None:
    err = error_of(lambda: store.get(r.DEPLOYMENTS, "shop", "nope"))
    assert (err.code, err.reason, err.message) == (404, "NotFound", 'deployments.apps "nope" not found')
    err = error_of(lambda: store.create(r.DEPLOYMENTS, "missing", deployment()))
    assert (err.code, err.message) == (404, 'namespaces "missing" not found')


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "a" * 254, ""])
def test_invalid_names_are_422(store: Store, name: str) -> None:
    body = deployment()
    body["metadata"]["name"] = name
    err = error_of(lambda: store.create(r.DEPLOYMENTS, "shop", body))
    assert err.code == 422 and err.reason == "Invalid"
    assert err.details["causes"][0]["field"] == "metadata.name"


def test_deployment_selector_must_match_template(store: Store) -> None:
    body = deployment()
    body["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
    err = error_of(lambda: store.create(r.DEPLOYMENTS, "shop", body))
    assert err.code == 422 and "spec.template.metadata.labels" in err.message


def test_wrong_kind_for_url_is_400(store: Store) -> None:
    body = deployment()
    body["kind"] = "Pod"
    assert error_of(lambda: store.create(r.DEPLOYMENTS, "shop", body)).code == 400


def test_peer_authentication_mode_is_validated(store: Store) -> None:
    err = error_of(lambda: store.create(r.PEER_AUTHENTICATIONS, "shop", pa("x", "STRICTLY")))
    assert err.code == 422 and 'Unsupported value: "STRICTLY"' in err.message
    body = pa("y", "STRICT")
    body["spec"]["portLevelMtls"] = {"8080": {"mode": "DISABLE"}}
    err = error_of(lambda: store.create(r.PEER_AUTHENTICATIONS, "shop", body))
    assert err.code == 422 and 'spec: Invalid value: "object": portLevelMtls requires selector' in err.message


def test_stale_resource_version_is_409_conflict(store: Store) -> None:
    created = store.create(r.DEPLOYMENTS, "shop", deployment())
    store.patch(r.DEPLOYMENTS, "shop", "web", "application/merge-patch+json", {"metadata": {"labels": {"x": "1"}}})
    stale = {**created, "spec": {**created["spec"], "replicas": 5}}
    err = error_of(lambda: store.replace(r.DEPLOYMENTS, "shop", "web", stale))
    assert err.code == 409 and "the object has been modified" in err.message
    err = error_of(lambda: store.patch(r.DEPLOYMENTS, "shop", "web", "application/merge-patch+json",
                                       {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}}))
    assert err.code == 409


def test_generation_moves_with_spec_only_and_status_is_kept(store: Store) -> None:
    store.create(r.DEPLOYMENTS, "shop", deployment())
    store.set_status(r.DEPLOYMENTS, "shop", "web", {"replicas": 2})
    labelled = store.patch(r.DEPLOYMENTS, "shop", "web", "application/merge-patch+json",
                           {"metadata": {"labels": {"x": "1"}}, "status": {"replicas": 99}})
    assert labelled["metadata"]["generation"] == 1 and labelled["status"] == {"replicas": 2}
    scaled = store.patch(r.DEPLOYMENTS, "shop", "web", "application/merge-patch+json", {"spec": {"replicas": 3}})
    assert scaled["metadata"]["generation"] == 2


def test_strategic_merge_patch_merges_containers_by_name(store: Store) -> None:
    store.create(r.DEPLOYMENTS, "shop", deployment())
    patch = {"spec": {"template": {
        "metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-25T00:00:00Z"}},
        "spec": {"$setElementOrder/containers": [{"name": "web"}],
                 "containers": [{"name": "web", "resources": {"limits": {"memory": "1Gi"}}}]}}}}
    out = store.patch(r.DEPLOYMENTS, "shop", "web", "application/strategic-merge-patch+json", patch)
    containers = out["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1 and containers[0]["image"] == "x:1"
    assert containers[0]["resources"]["limits"]["memory"] == "1Gi"
    assert out["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]


def test_merge_patch_replaces_lists_and_null_deletes(store: Store) -> None:
    store.create(r.DEPLOYMENTS, "shop", deployment(labels={"app": "web", "tier": "front"}))
    out = store.patch(r.DEPLOYMENTS, "shop", "web", "application/merge-patch+json",
                      {"metadata": {"labels": {"tier": None}}})
    assert out["metadata"]["labels"] == {"app": "web"}


def test_json_patch_and_its_errors(store: Store) -> None:
    store.create(r.NAMESPACES, None, {"metadata": {"name": "extra"}})
    out = store.patch(r.NAMESPACES, None, "extra", "application/json-patch+json",
                      [{"op": "add", "path": "/metadata/labels/istio-injection", "value": "enabled"}])
    assert out["metadata"]["labels"]["istio-injection"] == "enabled"
    err = error_of(lambda: store.patch(r.NAMESPACES, None, "extra", "application/json-patch+json",
                                       [{"op": "test", "path": "/metadata/name", "value": "other"}]))
    assert err.code == 422
    err = error_of(lambda: store.patch(r.NAMESPACES, None, "extra", "application/json-patch+json", {"op": "x"}))
    assert err.code == 400


def test_custom_resources_refuse_strategic_merge_patch(store: Store) -> None:
    store.create(r.PEER_AUTHENTICATIONS, "shop", pa("web", "STRICT", {"app": "web"}))
    err = error_of(lambda: store.patch(r.PEER_AUTHENTICATIONS, "shop", "web",
                                       "application/strategic-merge-patch+json", {"spec": {}}))
    assert err.code == 415


def test_label_and_field_selectors(store: Store) -> None:
    for name, labels in (("a", {"app": "a", "tier": "front"}), ("b", {"app": "b", "tier": "back"}),
                         ("c", {"app": "c"})):
        store.create(r.DEPLOYMENTS, "shop", deployment(name, labels))
    names = lambda sel: [o["metadata"]["name"] for o in store.list(r.DEPLOYMENTS, "shop", sel)]  # noqa: E731
    assert names("tier=front") == ["a"]
    assert names("tier!=front") == ["b", "c"]
    assert names("tier in (front,back)") == ["a", "b"]
    assert names("tier notin (front)") == ["b", "c"]
    assert names("tier") == ["a", "b"]
    assert names("!tier") == ["c"]
    assert names("app=a,tier=front") == ["a"]
    by_field = store.list(r.DEPLOYMENTS, None, field_selector="metadata.name=b")
    assert [o["metadata"]["name"] for o in by_field] == ["b"]
    assert error_of(lambda: store.list(r.DEPLOYMENTS, "shop", "tier in front")).code == 400
    assert error_of(lambda: store.list(r.DEPLOYMENTS, "shop", field_selector="spec.x=1")).code == 400


def test_deleting_a_namespace_deletes_its_objects(store: Store) -> None:
    store.create(r.DEPLOYMENTS, "shop", deployment())
    store.delete(r.NAMESPACES, None, "shop")
    assert store.list(r.DEPLOYMENTS) == []


def test_dry_run_changes_nothing(store: Store) -> None:
    rv = store.resource_version
    store.create(r.DEPLOYMENTS, "shop", deployment(), dry_run=True)
    assert store.list(r.DEPLOYMENTS) == [] and store.resource_version == rv


def test_watch_replays_from_a_resource_version_and_rejects_a_too_old_one(store: Store) -> None:
    store.create(r.DEPLOYMENTS, "shop", deployment("a"))
    since = store.resource_version
    store.create(r.DEPLOYMENTS, "shop", deployment("b"))
    store.create(r.DEPLOYMENTS, "ops", deployment("c"))
    watcher, first = store.watch(r.DEPLOYMENTS, "shop", None, None, since)
    assert [(e.type, e.obj["metadata"]["name"]) for e in first] == [("ADDED", "b")]
    store.delete(r.DEPLOYMENTS, "shop", "a")
    assert watcher.queue.get_nowait().type == "DELETED"
    _, initial = store.watch(r.DEPLOYMENTS, None, None, "metadata.name=c", None)
    assert [e.obj["metadata"]["name"] for e in initial] == ["c"]
    assert error_of(lambda: store.watch(r.DEPLOYMENTS, None, None, None, "abc")).code == 400
