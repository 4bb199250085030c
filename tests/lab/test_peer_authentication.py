"""PeerAuthentication in the lab: the effective mode as pilot composes it, and Istio's validation of the object."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshlab import resources as r
from meshlab import store as store_module
from meshlab.apiserver import ApiServer
from meshlab.errors import ApiError
from meshlab.mesh import effective_mode
from meshlab.store import Store
from tests.mtls_cases import BASE_TIME, CASES, ROOT_NAMESPACE, spec

MERGE = "application/merge-patch+json"
EMPTY = "port level mTLS, if defined, must have at least one element"
DENIED = 'admission webhook "validation.istio.io" denied the request: configuration is invalid: '


def _at(offset: int) -> str:
    return (BASE_TIME + timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%SZ")


def store_for(case: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store holding the case's policies, each created at its own second, in list order, then the edits."""
    store = Store("cases")
    namespaces = {ROOT_NAMESPACE, case["namespace"]} | {p["namespace"] for p in case["policies"]}
    for ns in sorted(namespaces):
        store.create(r.NAMESPACES, None, {"metadata": {"name": ns}})
    for policy in case["policies"]:
        monkeypatch.setattr(store_module, "now_rfc3339", lambda offset=policy["created"]: _at(offset))
        store.create(r.PEER_AUTHENTICATIONS, policy["namespace"], {
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": policy["name"]}, "spec": spec(policy)})
    monkeypatch.undo()
    for edit in case.get("edits", []):
        store.patch(r.PEER_AUTHENTICATIONS, edit["namespace"], edit["name"], MERGE,
                    {"metadata": {"labels": edit["labels"]}})
    return store


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_effective_mode(case: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_for(case, monkeypatch)
    got = effective_mode(store, ROOT_NAMESPACE, case["namespace"], case["labels"], case["port"])
    assert got == case["expected"]


def test_a_label_only_edit_of_the_winner_keeps_its_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two workload policies created in the same second: the name decides, whatever their resourceVersions.
    case = next(c for c in CASES if c["id"] == "label-only-edit-of-the-winner-changes-nothing")
    store = store_for({**case, "edits": []}, monkeypatch)
    mode = lambda: effective_mode(store, ROOT_NAMESPACE, "shop", case["labels"])  # noqa: E731
    assert mode() == "STRICT"
    store.patch(r.PEER_AUTHENTICATIONS, "shop", "alpha", MERGE, {"metadata": {"labels": {"team": "b"}}})
    alpha, zeta = (store.get(r.PEER_AUTHENTICATIONS, "shop", n)["metadata"] for n in ("alpha", "zeta"))
    assert int(alpha["resourceVersion"]) > int(zeta["resourceVersion"])
    assert alpha["creationTimestamp"] == zeta["creationTimestamp"]
    assert mode() == "STRICT"


def test_cases_cover_what_the_rule_needs() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "case ids are unique"
    assert {c["expected"] for c in CASES} == {"STRICT", "PERMISSIVE", "DISABLE"}


# ---- validation: what Istio's validating webhook (validation.istio.io) refuses ---------------------------------
@pytest.fixture
def store() -> Store:
    s = Store("test")
    for ns in ("istio-system", "shop"):
        s.create(r.NAMESPACES, None, {"metadata": {"name": ns}})
    return s


def pa(name: str, spec_: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": name},
            "spec": spec_}


WORKLOAD = {"selector": {"matchLabels": {"app": "auth"}}, "mtls": {"mode": "STRICT"}}


SELECTOR = 'spec: Invalid value: "object": portLevelMtls requires selector'
PORTS = 'spec.portLevelMtls: Invalid value: "object": port must be between 1-65535'


@pytest.mark.parametrize(("spec_", "message"), [
    ({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}, SELECTOR),
    ({"selector": {"matchLabels": {}}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}, SELECTOR),
    ({"selector": {}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}, SELECTOR),
    ({**WORKLOAD, "portLevelMtls": {"0": {"mode": "DISABLE"}}}, PORTS),
    ({**WORKLOAD, "portLevelMtls": {"65536": {"mode": "DISABLE"}}}, PORTS),
    ({**WORKLOAD, "portLevelMtls": {"http": {"mode": "DISABLE"}}}, PORTS),
    ({**WORKLOAD, "portLevelMtls": {70000: {"mode": "DISABLE"}}}, PORTS),
], ids=["no-selector", "empty-match-labels", "selector-without-match-labels", "port-0", "port-65536",
        "port-not-a-number", "int-port-70000"])
def test_the_crd_rules_refuse_invalid_policies_with_422(store: Store, spec_: dict[str, Any], message: str) -> None:
    # Istio 1.22+ CRDs carry these as CEL rules (x-kubernetes-validations): the API server answers 422 Invalid,
    # `The PeerAuthentication "bad" is invalid: spec: Invalid value: "object": portLevelMtls requires selector`.
    for dry_run in (True, False):
        with pytest.raises(ApiError) as err:
            store.create(r.PEER_AUTHENTICATIONS, "shop", pa("bad", spec_), dry_run=dry_run)
        assert (err.value.code, err.value.message) == (422, f'PeerAuthentication "bad" is invalid: {message}')
    assert store.list(r.PEER_AUTHENTICATIONS, "shop") == []


def test_the_webhook_denies_an_empty_port_map_with_400(store: Store) -> None:
    for dry_run in (True, False):
        with pytest.raises(ApiError) as err:
            store.create(r.PEER_AUTHENTICATIONS, "shop", pa("bad", {**WORKLOAD, "portLevelMtls": {}}), dry_run=dry_run)
        assert (err.value.code, err.value.message) == (400, DENIED + EMPTY)
        assert "reason" not in err.value.status(), "Istio's webhook gives no reason; kubectl prints none"
    assert store.list(r.PEER_AUTHENTICATIONS, "shop") == []


def test_modes_outside_the_enum_are_refused_by_the_schema_before_the_webhook(store: Store) -> None:
    # The CRD's OpenAPI schema has the mode enum; the API server checks it before calling admission webhooks.
    for bad in ({"mtls": {"mode": "STRICTLY"}}, {**WORKLOAD, "portLevelMtls": {"8080": {"mode": "strict"}}}):
        with pytest.raises(ApiError) as err:
            store.create(r.PEER_AUTHENTICATIONS, "shop", pa("bad", bad))
        assert err.value.code == 422 and "Unsupported value" in err.value.message


def test_valid_policies_pass(store: Store) -> None:
    store.create(r.PEER_AUTHENTICATIONS, "istio-system", pa("default", {"mtls": {"mode": "STRICT"}}))
    store.create(r.PEER_AUTHENTICATIONS, "shop", pa("default", {}))
    store.create(r.PEER_AUTHENTICATIONS, "shop", pa("auth", {**WORKLOAD, "portLevelMtls": {
        "1": {"mode": "DISABLE"}, 65535: {"mode": "UNSET"}, "9090": {}}}))
    assert len(store.list(r.PEER_AUTHENTICATIONS)) == 3


def test_patch_and_update_are_validated_too(store: Store) -> None:
    ports = {"portLevelMtls": {"8080": {"mode": "DISABLE"}}}
    store.create(r.PEER_AUTHENTICATIONS, "shop", pa("auth", {**WORKLOAD, **ports}))
    before = store.get(r.PEER_AUTHENTICATIONS, "shop", "auth")
    for dry_run in (True, False):
        with pytest.raises(ApiError) as err:
            store.patch(r.PEER_AUTHENTICATIONS, "shop", "auth", MERGE, {"spec": {"selector": None}}, dry_run=dry_run)
        assert (err.value.code, err.value.message) == (422, f'PeerAuthentication "auth" is invalid: {SELECTOR}')
        with pytest.raises(ApiError) as err:
            store.patch(r.PEER_AUTHENTICATIONS, "shop", "auth", "application/json-patch+json",
                        [{"op": "replace", "path": "/spec/portLevelMtls", "value": {}}], dry_run=dry_run)
        assert (err.value.code, err.value.message) == (400, DENIED + EMPTY)
        body = {**before, "spec": {"mtls": {"mode": "STRICT"}, **ports}}
        with pytest.raises(ApiError) as err:
            store.replace(r.PEER_AUTHENTICATIONS, "shop", "auth", body, dry_run=dry_run)
        assert err.value.code == 422
    assert store.get(r.PEER_AUTHENTICATIONS, "shop", "auth") == before


def test_other_kinds_are_not_sent_to_the_istio_webhook(store: Store) -> None:
    created = store.create(r.SERVICES, "shop", {"metadata": {"name": "web"}, "spec": {"portLevelMtls": {}}})
    assert created["metadata"]["name"] == "web"


def test_the_schema_and_rules_are_checked_before_the_webhook(store: Store) -> None:
    with pytest.raises(ApiError) as err:
        store.create(r.PEER_AUTHENTICATIONS, "shop", pa("bad", {"portLevelMtls": {}}))
    assert (err.value.code, err.value.message) == (422, f'PeerAuthentication "bad" is invalid: {SELECTOR}')


async def _post_each(app: web.Application, paths: list[str], body: dict[str, Any]) -> list[tuple[int, Any]]:
    """POST one body to each path through one server (an aiohttp app serves one event loop only)."""
    async with TestClient(TestServer(app)) as client:
        answers = []
        for path in paths:
            response = await client.post(path, json=body)
            answers.append((response.status, await response.json()))
        return answers


def test_the_api_answers_a_denial_as_a_400_status_dry_run_or_not(store: Store) -> None:
    bad = pa("bad", {**WORKLOAD, "portLevelMtls": {}})
    url = "/apis/security.istio.io/v1/namespaces/shop/peerauthentications"
    for code, status in asyncio.run(_post_each(ApiServer(store).app, [url + "?dryRun=All", url], bad)):
        assert code == 400
        assert status == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 400,
                          "message": DENIED + EMPTY}
    assert store.list(r.PEER_AUTHENTICATIONS) == []
