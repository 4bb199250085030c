"""meshwave.mtls: the effective mode, over the very cases the lab's own implementation runs (tests/mtls_cases.py).

Two implementations of Istio's rule, written apart (meshwave's decides, the lab's enforces), agreeing on every
case: a test that runs only one of them would let a shared mistake through.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshwave.mtls import Mode, Scope, effective_mtls
from tests.mtls_cases import CASES, ROOT_NAMESPACE, manifests


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_effective_mode_matches_the_case(case: dict[str, Any]) -> None:
    state = effective_mtls(manifests(case), ROOT_NAMESPACE, case["namespace"], case["labels"])
    got = state.mode if case["port"] is None else state.for_port(case["port"])
    assert got == case["expected"]


def pa(ns: str, name: str, mode: str | None, selector: dict[str, str] | None = None,
       created: str = "2026-01-01T00:00:00Z", ports: dict[Any, Any] | None = None,
       meshwave: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if mode:
        spec["mtls"] = {"mode": mode}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = ports
    labels = {"app.kubernetes.io/managed-by": "meshwave"} if meshwave else {}
    return {"metadata": {"namespace": ns, "name": name, "creationTimestamp": created, "labels": labels}, "spec": spec}


def test_the_policy_that_decides_is_named_and_an_older_team_policy_is_foreign() -> None:
    team = pa("shop", "team-auth", "PERMISSIVE", {"app": "auth"}, "2025-01-01T00:00:00Z")
    ours = pa("shop", "meshwave-auth", "STRICT", {"app": "auth"}, "2026-11-28T00:00:00Z", meshwave=True)
    state = effective_mtls([ours, team, pa("shop", "default", "STRICT")], ROOT_NAMESPACE, "shop", {"app": "auth"})
    assert state.mode == Mode.PERMISSIVE  # the team's older policy wins: meshwave's STRICT would be a false report
    assert state.decided_by is not None and state.decided_by.name == "team-auth"
    assert [p.name for p in state.shadowed] == ["meshwave-auth"]
    assert [p.name for p in state.foreign_workload_policies] == ["team-auth"]
    assert state.namespace_policy is not None and state.namespace_policy.scope == Scope.NAMESPACE
    assert not state.strict_anywhere


def test_a_strict_port_is_strict_somewhere_but_not_everywhere() -> None:
    policy = pa("shop", "meshwave-auth", "PERMISSIVE", {"app": "auth"}, ports={"9090": {"mode": "STRICT"}},
                meshwave=True)
    state = effective_mtls([policy], ROOT_NAMESPACE, "shop", {"app": "auth"})
    assert state.strict_anywhere and not state.strict_everywhere
    assert state.for_port(9090) == Mode.STRICT and state.for_port(8080) == Mode.PERMISSIVE
    assert state.strict_sources() == ["port 9090: peerauthentication shop/meshwave-auth (workload, PERMISSIVE, port "
                                      "9090 STRICT; meshwave's)"]
    assert state.summary()["ports"] == {"9090": "STRICT"}


def test_policies_of_other_namespaces_and_root_selector_policies_are_ignored() -> None:
    policies = [pa("other", "default", "STRICT"), pa(ROOT_NAMESPACE, "sel", "STRICT", {"app": "auth"})]
    state = effective_mtls(policies, ROOT_NAMESPACE, "shop", {"app": "auth"})
    assert (state.mode, state.decided_by) == (Mode.PERMISSIVE, None)
    assert state.describe() == "PERMISSIVE (no policy applies: Istio's default)"
