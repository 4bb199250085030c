"""Effective mTLS mode cases, as plain data, for every implementation of Istio's rule to run over.

The rule is pilot's ComposePeerAuthentication (istio/istio pilot/pkg/security/authn): mesh-wide (selectorless in the
root namespace), then namespace-wide (selectorless in the workload's namespace), then the workload's policy (a
non-empty matchLabels selector in the workload's namespace that matches its labels) each set the mode unless theirs
is UNSET; the oldest policy of a level wins, in pilot's order: creationTimestamp, then name, then namespace.

Each case: `id`; `policies`, created in list order, each {namespace, name, created (seconds after BASE_TIME),
selector (matchLabels or None), mode (None: no `mtls` block), portLevelMtls (or None)}; optional `edits`, applied
after every create, each {namespace, name, labels} (a label-only edit: a new resourceVersion, the same spec); the
workload's `namespace` and `labels`; the `port` asked about (None: the workload's mode); the `expected` mode.
`manifests(case)` gives the objects as an API server would hold them after the creates and edits.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

ROOT_NAMESPACE = "istio-system"
BASE_TIME = datetime(2026, 11, 25, 2, 0, 0, tzinfo=UTC)
AUTH = {"app": "auth", "version": "v1"}


def _pa(namespace: str, name: str, created: int, mode: str | None, selector: dict[str, str] | None = None,
        port_level: dict[Any, Any] | None = None) -> dict[str, Any]:
    return {"namespace": namespace, "name": name, "created": created, "selector": selector, "mode": mode,
            "portLevelMtls": port_level}


CASES: list[dict[str, Any]] = [
    {"id": "no-policy", "policies": [], "namespace": "shop", "labels": AUTH, "port": None,
     "expected": "PERMISSIVE"},
    {"id": "mesh-strict", "policies": [_pa(ROOT_NAMESPACE, "default", 0, "STRICT")],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "STRICT"},
    {"id": "mesh-without-mode-is-permissive", "policies": [_pa(ROOT_NAMESPACE, "default", 0, None)],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "PERMISSIVE"},
    {"id": "namespace-overrides-mesh",
     "policies": [_pa(ROOT_NAMESPACE, "default", 0, "STRICT"), _pa("shop", "default", 1, "PERMISSIVE")],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "PERMISSIVE"},
    {"id": "unset-inherits",
     "policies": [_pa(ROOT_NAMESPACE, "default", 0, "STRICT"), _pa("shop", "default", 1, "UNSET"),
                  _pa("shop", "auth", 2, "UNSET", {"app": "auth"})],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "STRICT"},
    {"id": "workload-beats-namespace",
     "policies": [_pa("shop", "default", 0, "STRICT"), _pa("shop", "auth", 1, "PERMISSIVE", {"app": "auth"})],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "PERMISSIVE"},
    {"id": "two-workload-policies-oldest-wins",
     "policies": [_pa("shop", "z-old", 0, "STRICT", {"app": "auth"}),
                  _pa("shop", "a-new", 5, "PERMISSIVE", {"version": "v1"})],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "STRICT"},
    {"id": "same-timestamp-name-decides",  # zeta is created first (lower resourceVersion), alpha wins by name
     "policies": [_pa("shop", "zeta", 0, "STRICT", {"app": "auth"}),
                  _pa("shop", "alpha", 0, "PERMISSIVE", {"app": "auth"})],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "PERMISSIVE"},
    {"id": "same-timestamp-mesh-wide-name-decides",
     "policies": [_pa(ROOT_NAMESPACE, "default", 0, "PERMISSIVE"), _pa(ROOT_NAMESPACE, "aaa-strict", 0, "STRICT")],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "STRICT"},
    {"id": "label-only-edit-of-the-winner-changes-nothing",
     "policies": [_pa("shop", "alpha", 0, "STRICT", {"app": "auth"}),
                  _pa("shop", "zeta", 0, "PERMISSIVE", {"app": "auth"})],
     "edits": [{"namespace": "shop", "name": "alpha", "labels": {"owner": "someone-else"}}],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "STRICT"},
    {"id": "selector-policy-in-root-namespace-is-ignored",
     "policies": [_pa(ROOT_NAMESPACE, "default", 0, "STRICT"), _pa(ROOT_NAMESPACE, "auth", 1, "DISABLE",
                                                                   {"app": "auth"})],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "STRICT"},
    {"id": "workload-in-root-namespace-gets-the-mesh-policy",
     "policies": [_pa(ROOT_NAMESPACE, "default", 0, "STRICT"), _pa(ROOT_NAMESPACE, "auth", 1, "DISABLE",
                                                                   {"app": "auth"})],
     "namespace": ROOT_NAMESPACE, "labels": AUTH, "port": None, "expected": "STRICT"},
    {"id": "workload-policy-in-another-namespace-does-not-apply",
     "policies": [_pa("ops", "auth", 0, "STRICT", {"app": "auth"})],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "PERMISSIVE"},
    {"id": "workload-policy-selecting-other-labels-does-not-apply",
     "policies": [_pa("shop", "default", 0, "STRICT"), _pa("shop", "ledger", 1, "DISABLE", {"app": "ledger"})],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "STRICT"},
    {"id": "empty-match-labels-is-namespace-wide",
     "policies": [_pa(ROOT_NAMESPACE, "default", 0, "PERMISSIVE"), _pa("shop", "everyone", 1, "STRICT", {})],
     "namespace": "shop", "labels": AUTH, "port": None, "expected": "STRICT"},
    {"id": "port-level-disable-on-strict-workload-policy",
     "policies": [_pa("shop", "auth", 0, "STRICT", {"app": "auth"}, {"8080": {"mode": "DISABLE"}})],
     "namespace": "shop", "labels": AUTH, "port": 8080, "expected": "DISABLE"},
    {"id": "port-not-listed-gets-the-workload-mode",
     "policies": [_pa("shop", "auth", 0, "STRICT", {"app": "auth"}, {"8080": {"mode": "DISABLE"}})],
     "namespace": "shop", "labels": AUTH, "port": 9090, "expected": "STRICT"},
    {"id": "port-level-key-given-as-int",
     "policies": [_pa("shop", "auth", 0, "STRICT", {"app": "auth"}, {8080: {"mode": "PERMISSIVE"}})],
     "namespace": "shop", "labels": AUTH, "port": 8080, "expected": "PERMISSIVE"},
    {"id": "port-level-unset-inherits-the-workload-mode",
     "policies": [_pa("shop", "default", 0, "STRICT"),
                  _pa("shop", "auth", 1, "PERMISSIVE", {"app": "auth"}, {"8080": {"mode": "UNSET"}})],
     "namespace": "shop", "labels": AUTH, "port": 8080, "expected": "PERMISSIVE"},
    {"id": "port-level-unset-on-unset-workload-policy-inherits-namespace-strict",
     "policies": [_pa("shop", "default", 0, "STRICT"),
                  _pa("shop", "auth", 1, "UNSET", {"app": "auth"}, {"8080": {"mode": "UNSET"}})],
     "namespace": "shop", "labels": AUTH, "port": 8080, "expected": "STRICT"},
    {"id": "port-level-of-a-losing-workload-policy-does-not-apply",
     "policies": [_pa("shop", "auth", 0, "STRICT", {"app": "auth"}),
                  _pa("shop", "auth-ports", 1, "STRICT", {"app": "auth"}, {"8080": {"mode": "DISABLE"}})],
     "namespace": "shop", "labels": AUTH, "port": 8080, "expected": "STRICT"},
]


def _timestamp(offset: int) -> str:
    return (BASE_TIME + timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%SZ")


def spec(policy: dict[str, Any]) -> dict[str, Any]:
    """The PeerAuthentication spec of one policy of a case."""
    result: dict[str, Any] = {}
    if policy["selector"] is not None:
        result["selector"] = {"matchLabels": dict(policy["selector"])}
    if policy["mode"] is not None:
        result["mtls"] = {"mode": policy["mode"]}
    if policy["portLevelMtls"] is not None:
        result["portLevelMtls"] = {k: dict(v) for k, v in policy["portLevelMtls"].items()}
    return result


def manifests(case: dict[str, Any]) -> list[dict[str, Any]]:
    """The case's policies as an API server holds them after the creates and edits, resourceVersions included."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    version = 100
    for policy in case["policies"]:
        version += 1
        objects[(policy["namespace"], policy["name"])] = {
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": policy["name"], "namespace": policy["namespace"],
                         "creationTimestamp": _timestamp(policy["created"]), "resourceVersion": str(version)},
            "spec": spec(policy)}
    for edit in case.get("edits", []):
        version += 1
        meta = objects[(edit["namespace"], edit["name"])]["metadata"]
        meta["labels"] = {**meta.get("labels", {}), **edit["labels"]}
        meta["resourceVersion"] = str(version)
    return list(objects.values())
