"""Which GitOps tool owns a Kubernetes object, read from its labels and annotations. Pure, no client.

Argo CD and Flux re-apply what is in Git (self-heal), and a later `helm upgrade` re-renders its chart: a
patch meshwave makes to an object they own is reverted. The emergency rollback and the preflight name
the tool so that an SRE pauses it (or changes Git) instead of watching STRICT come back.
"""

from __future__ import annotations

from typing import Any

ARGOCD_PREFIX = "argocd.argoproj.io/"
ARGOCD_TRACKING = "argocd.argoproj.io/tracking-id"  # annotation tracking (the default since Argo CD 3)
ARGOCD_INSTANCE = "argocd.argoproj.io/instance"  # a common custom instanceLabelKey
INSTANCE_LABEL = "app.kubernetes.io/instance"  # Argo CD's label tracking, but also set by most Helm charts
FLUX_KUSTOMIZE = "kustomize.toolkit.fluxcd.io"
FLUX_HELM = "helm.toolkit.fluxcd.io"
HELM_MANAGED_BY = "app.kubernetes.io/managed-by"
HELM_RELEASE = "meta.helm.sh/release-name"
HELM_RELEASE_NS = "meta.helm.sh/release-namespace"


def reverted_by(obj: dict[str, Any]) -> str | None:
    """The tool that will put a patched object back, with the label or annotation that says so, or None.

    e.g. "Argo CD (argocd.argoproj.io/tracking-id: shop:apps/Deployment:shop/payment)", "Flux
    (kustomize.toolkit.fluxcd.io/name: apps, kustomize.toolkit.fluxcd.io/namespace: flux-system)", "Helm
    (app.kubernetes.io/managed-by: Helm, release payment in shop)". Argo CD and Flux come before Helm: both
    render Helm charts and then self-heal, so their objects often carry Helm's labels too.
    """
    meta = obj.get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    return _argocd(labels, annotations) or _flux(labels) or _helm(labels, annotations)


def _argocd(labels: dict[str, str], annotations: dict[str, str]) -> str | None:
    if ARGOCD_TRACKING in annotations:
        return f"Argo CD ({ARGOCD_TRACKING}: {annotations[ARGOCD_TRACKING]})"
    if ARGOCD_INSTANCE in labels:
        return f"Argo CD ({ARGOCD_INSTANCE}: {labels[ARGOCD_INSTANCE]})"
    hints = sorted(k for k in (*labels, *annotations) if k.startswith(ARGOCD_PREFIX))
    if not hints:
        # app.kubernetes.io/instance alone is what nearly every Helm chart sets: not evidence of Argo CD
        return None
    if INSTANCE_LABEL in labels:
        return f"Argo CD ({INSTANCE_LABEL}: {labels[INSTANCE_LABEL]}, with {hints[0]})"
    return f"Argo CD ({hints[0]})"


def _flux(labels: dict[str, str]) -> str | None:
    for group in (FLUX_KUSTOMIZE, FLUX_HELM):
        name = labels.get(f"{group}/name")
        if name is not None:
            ns = labels.get(f"{group}/namespace")
            return f"Flux ({group}/name: {name}" + (f", {group}/namespace: {ns}" if ns else "") + ")"
    return None


def _helm(labels: dict[str, str], annotations: dict[str, str]) -> str | None:
    managed = labels.get(HELM_MANAGED_BY, "")
    release = annotations.get(HELM_RELEASE)
    if managed.lower() != "helm" and release is None:
        return None
    parts = [f"{HELM_MANAGED_BY}: {managed}"] if managed.lower() == "helm" else []
    if release is not None:
        where = annotations.get(HELM_RELEASE_NS)
        parts.append(f"release {release}" + (f" in {where}" if where else ""))
    return f"Helm ({', '.join(parts)})"


def revert_note(tool: str | None) -> str:
    """"; will be reverted by <tool>: ..." to append to a change's reason; "" when no tool owns the object."""
    if tool is None:
        return ""
    return (f"; will be reverted by {tool}: pause its sync or self-heal, or change the source, or this change "
            "is undone at its next reconcile")
