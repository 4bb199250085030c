"""Served API versions per cluster: a cluster older than Istio 1.22 serves security.istio.io at v1beta1 only."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshlab import resources as r
from meshlab.apiserver import ApiServer
from meshlab.errors import ApiError
from meshlab.store import Store

OLD = {"security.istio.io": ["v1beta1"]}
NOT_FOUND = "the server could not find the requested resource"
PA_V1 = "/apis/security.istio.io/v1/namespaces/shop/peerauthentications"
PA_V1BETA1 = "/apis/security.istio.io/v1beta1/namespaces/shop/peerauthentications"


def make_store(served: dict[str, list[str]] | None = None) -> Store:
    store = Store("test", served_versions=served)
    store.create(r.NAMESPACES, None, {"metadata": {"name": "shop"}})
    store.create(r.PEER_AUTHENTICATIONS, "shop", {"metadata": {"name": "auth"}, "spec": {"mtls": {"mode": "STRICT"}}})
    return store


async def _calls(store: Store, requests: list[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    """Each (method, path, JSON body or None) through one server: an aiohttp app serves one event loop only."""
    async with TestClient(TestServer(ApiServer(store).app)) as client:
        answers = []
        for method, path, body in requests:
            headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
            response = await client.request(method, path, json=body, headers=headers)
            answers.append((response.status, await response.json(content_type=None)))
        return answers


def call(store: Store, *requests: tuple[str, str, Any]) -> list[tuple[int, Any]]:
    return asyncio.run(_calls(store, list(requests)))


def get(store: Store, path: str) -> Any:
    [(code, body)] = call(store, ("GET", path, None))
    assert code == 200, body
    return body


def security_group(discovery: dict[str, Any]) -> dict[str, Any]:
    return next(g for g in discovery["groups"] if g["name"] == "security.istio.io")


def test_a_current_cluster_serves_v1_and_v1beta1_preferring_v1() -> None:
    group = security_group(get(make_store(), "/apis"))
    assert [v["version"] for v in group["versions"]] == ["v1", "v1beta1"]
    assert group["preferredVersion"] == {"groupVersion": "security.istio.io/v1", "version": "v1"}


def test_an_old_cluster_discovers_v1beta1_only() -> None:
    store = make_store(OLD)
    for group in (security_group(get(store, "/apis")), get(store, "/apis/security.istio.io")):
        assert group["versions"] == [{"groupVersion": "security.istio.io/v1beta1", "version": "v1beta1"}]
        assert group["preferredVersion"] == {"groupVersion": "security.istio.io/v1beta1", "version": "v1beta1"}
    names = [e["name"] for e in get(store, "/apis/security.istio.io/v1beta1")["resources"]]
    assert names == ["peerauthentications"]


def test_other_groups_keep_every_version_on_an_old_cluster() -> None:
    group = next(g for g in get(make_store(OLD), "/apis")["groups"] if g["name"] == "networking.istio.io")
    assert [v["version"] for v in group["versions"]] == ["v1", "v1beta1", "v1alpha3"]


def test_an_old_cluster_answers_404_at_v1_for_every_verb() -> None:
    store = make_store(OLD)
    body = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "x"},
            "spec": {}}
    answers = call(store, ("GET", "/apis/security.istio.io/v1", None), ("GET", PA_V1, None),
                   ("GET", PA_V1 + "/auth", None), ("GET", PA_V1 + "?watch=true&timeoutSeconds=1", None),
                   ("GET", "/apis/security.istio.io/v1/peerauthentications", None), ("POST", PA_V1, body),
                   ("PATCH", PA_V1 + "/auth", {"spec": {"mtls": {"mode": "DISABLE"}}}),
                   ("DELETE", PA_V1 + "/auth", None))
    for code, status in answers:
        assert code == 404
        assert (status["kind"], status["status"], status["reason"], status["message"]) == \
            ("Status", "Failure", "NotFound", NOT_FOUND)
    assert store.get(r.PEER_AUTHENTICATIONS, "shop", "auth")["spec"] == {"mtls": {"mode": "STRICT"}}


def test_an_object_is_the_same_at_every_served_version() -> None:
    store = make_store()
    v1, v1beta1 = (get(store, path + "/auth") for path in (PA_V1, PA_V1BETA1))
    assert (v1["apiVersion"], v1beta1["apiVersion"]) == ("security.istio.io/v1", "security.istio.io/v1beta1")
    assert {**v1, "apiVersion": ""} == {**v1beta1, "apiVersion": ""}


def test_an_old_cluster_stores_and_answers_v1beta1() -> None:
    store = make_store(OLD)
    assert store.get(r.PEER_AUTHENTICATIONS, "shop", "auth")["apiVersion"] == "security.istio.io/v1beta1"
    listing = get(store, PA_V1BETA1)
    assert listing["apiVersion"] == "security.istio.io/v1beta1"
    assert [o["apiVersion"] for o in listing["items"]] == ["security.istio.io/v1beta1"]
    body = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication", "metadata": {"name": "new"},
            "spec": {"mtls": {"mode": "PERMISSIVE"}}}
    [(code, created)] = call(store, ("POST", PA_V1BETA1, body))
    assert code == 201 and created["apiVersion"] == "security.istio.io/v1beta1"


def test_an_old_cluster_refuses_an_object_of_a_version_it_does_not_serve() -> None:
    store = make_store(OLD)
    with pytest.raises(ApiError) as err:
        store.create(r.PEER_AUTHENTICATIONS, "shop", {"apiVersion": "security.istio.io/v1",
                                                      "kind": "PeerAuthentication", "metadata": {"name": "x"}})
    assert err.value.code == 400
    [(code, _)] = call(store, ("POST", PA_V1BETA1, {"apiVersion": "security.istio.io/v1",
                                                    "kind": "PeerAuthentication", "metadata": {"name": "x"}}))
    assert code == 400


def test_openapi_follows_the_served_versions() -> None:
    store = make_store(OLD)
    paths = get(store, "/openapi/v3")["paths"]
    assert "apis/security.istio.io/v1beta1" in paths and "apis/security.istio.io/v1" not in paths
    [(code, _)] = call(store, ("GET", "/openapi/v3/apis/security.istio.io/v1", None))
    assert code == 404


@pytest.mark.parametrize(("served", "text"), [
    ({"security.istio.io": []}, "needs one or more of v1, v1beta1"),
    ({"security.istio.io": ["v2"]}, "needs one or more of v1, v1beta1"),
    ({"nope.io": ["v1"]}, "unknown API group 'nope.io'"),
    ({"": ["v1"]}, "unknown API group ''"),
])
def test_the_knob_is_checked(served: dict[str, list[str]], text: str) -> None:
    with pytest.raises(ValueError, match=text):
        Store("test", served_versions=served)


# ---- the clients meshwave uses, against a real socket --------------------------------------------------------
@contextmanager
def serving(store: Store) -> Iterator[str]:
    """The API server on a loopback port in a thread of its own; yields its URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(ApiServer(store).app, access_log=None)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def kubectl(url: str, tmp: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    config = tmp / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "old",
        "clusters": [{"name": "old", "cluster": {"server": url}}],
        "users": [{"name": "old", "user": {"token": "meshlab"}}],
        "contexts": [{"name": "old", "context": {"cluster": "old", "user": "old", "namespace": "shop"}}]}))
    env = {**os.environ, "KUBECONFIG": str(config), "KUBECACHEDIR": str(tmp / "cache")}
    return subprocess.run([str(Path(sys.executable).parent / "kubectl"), *args], env=env, capture_output=True,
                          text=True, input=stdin, timeout=60)


MANIFEST = """apiVersion: security.istio.io/{version}
kind: PeerAuthentication
metadata:
  name: from-kubectl
  namespace: shop
spec:
  mtls:
    mode: PERMISSIVE
"""


def test_kubectl_on_an_old_cluster_sees_v1beta1_only(tmp_path: Path) -> None:
    store = make_store(OLD)
    with serving(store) as url:
        versions = kubectl(url, tmp_path, "api-versions").stdout.split()
        assert "security.istio.io/v1beta1" in versions and "security.istio.io/v1" not in versions
        listed = kubectl(url, tmp_path, "get", "pa", "-o", "jsonpath={.items[*].apiVersion}")
        assert (listed.returncode, listed.stdout) == (0, "security.istio.io/v1beta1")
        v1 = kubectl(url, tmp_path, "apply", "-f", "-", stdin=MANIFEST.format(version="v1"))
        assert v1.returncode == 1
        assert 'no matches for kind "PeerAuthentication" in version "security.istio.io/v1"' in v1.stderr
        v1beta1 = kubectl(url, tmp_path, "apply", "-f", "-", stdin=MANIFEST.format(version="v1beta1"))
        assert v1beta1.returncode == 0, v1beta1.stderr
    assert store.get(r.PEER_AUTHENTICATIONS, "shop", "from-kubectl")["spec"] == {"mtls": {"mode": "PERMISSIVE"}}


def test_the_kubernetes_client_on_an_old_cluster_gets_404_at_v1(tmp_path: Path) -> None:
    with serving(make_store(OLD)) as url:
        config = kubernetes.client.Configuration()
        config.host = url
        with kubernetes.client.ApiClient(config) as client:
            api = kubernetes.client.CustomObjectsApi(client)
            with pytest.raises(kubernetes.client.ApiException) as err:
                api.get_namespaced_custom_object("security.istio.io", "v1", "shop", "peerauthentications", "auth")
            assert err.value.status == 404
            got = api.get_namespaced_custom_object("security.istio.io", "v1beta1", "shop", "peerauthentications",
                                                   "auth")
            assert got["apiVersion"] == "security.istio.io/v1beta1"
