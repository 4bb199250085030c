"""meshwave.gitops: which GitOps tool will put back a patched object, from its labels and annotations."""

from __future__ import annotations

from typing import Any

import pytest

from meshwave.gitops import revert_note, reverted_by


def obj(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "payment", "namespace": "shop", "labels": labels or {},
                         "annotations": annotations or {}}}


TRACKING = "shop:apps/Deployment:shop/payment"


@pytest.mark.parametrize(("labels", "annotations", "expected"), [
    ({}, {"argocd.argoproj.io/tracking-id": TRACKING}, f"Argo CD (argocd.argoproj.io/tracking-id: {TRACKING})"),
    ({"argocd.argoproj.io/instance": "shop"}, {}, "Argo CD (argocd.argoproj.io/instance: shop)"),
    ({"app.kubernetes.io/instance": "shop"}, {"argocd.argoproj.io/sync-options": "Prune=false"},
     "Argo CD (app.kubernetes.io/instance: shop, with argocd.argoproj.io/sync-options)"),
    ({"kustomize.toolkit.fluxcd.io/name": "apps", "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}, {},
     "Flux (kustomize.toolkit.fluxcd.io/name: apps, kustomize.toolkit.fluxcd.io/namespace: flux-system)"),
    ({"helm.toolkit.fluxcd.io/name": "payment", "app.kubernetes.io/managed-by": "Helm"},
     {"meta.helm.sh/release-name": "payment"}, "Flux (helm.toolkit.fluxcd.io/name: payment)"),
    ({"app.kubernetes.io/managed-by": "Helm"}, {"meta.helm.sh/release-name": "payment",
                                               "meta.helm.sh/release-namespace": "shop"},
     "Helm (app.kubernetes.io/managed-by: Helm, release payment in shop)"),
    ({}, {"meta.helm.sh/release-name": "payment"}, "Helm (release payment)"),
    ({"app.kubernetes.io/managed-by": "Helm"}, {}, "Helm (app.kubernetes.io/managed-by: Helm)"),
    # Argo CD renders Helm charts: the chart's labels come along, Argo CD's self-heal is what reverts
    ({"app.kubernetes.io/managed-by": "Helm"}, {"argocd.argoproj.io/tracking-id": TRACKING},
     f"Argo CD (argocd.argoproj.io/tracking-id: {TRACKING})"),
])
def test_the_owner_is_named_with_the_label_that_says_so(labels: dict[str, str], annotations: dict[str, str],
                                                        expected: str) -> None:
    assert reverted_by(obj(labels, annotations)) == expected


@pytest.mark.parametrize(("labels", "annotations"), [
    ({}, {}),
    # nearly every Helm chart sets app.kubernetes.io/instance: alone it is no sign of Argo CD
    ({"app.kubernetes.io/instance": "payment", "app.kubernetes.io/name": "payment"}, {}),
    ({"app.kubernetes.io/managed-by": "meshwave"}, {}),
    ({}, {"kubectl.kubernetes.io/last-applied-configuration": "{}"}),
])
def test_objects_no_tool_owns(labels: dict[str, str], annotations: dict[str, str]) -> None:
    assert reverted_by(obj(labels, annotations)) is None


def test_missing_metadata_is_no_owner() -> None:
    assert reverted_by({}) is None
    assert reverted_by({"metadata": {"labels": None, "annotations": None}}) is None


def test_revert_note() -> None:
    assert revert_note(None) == ""
    note = revert_note("Flux (kustomize.toolkit.fluxcd.io/name: apps)")
    assert note.startswith("; will be reverted by Flux (kustomize.toolkit.fluxcd.io/name: apps): pause its sync")
