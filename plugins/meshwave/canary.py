"""A sidecar tried on part of the replicas first: the canary copy of a Deployment.

With `canary: {replicas: 1, soak_seconds: 300}` in the plan, the forward path of a service starts with a copy of its
Deployment, `<name>-canary`: the same pod template with the sidecar (the workload's injection label) and the label
`meshwave.io/canary-of: <name>`, which is also in the copy's own selector. The copy's pods keep the primary's labels,
so the Service selects them too and they take their share of its traffic (one ready endpoint each). The primary's
selector matches them as well: Kubernetes allows that, and each Deployment's ReplicaSets count only the pods they own
(their pod-template-hash and ownerReference), so neither adopts the other's pods.

The canary is judged against the primary's live metrics over the same window (checks.judge_canary): its own proxy's
success rate and p99 (reporter="destination", destination_workload=<name>-canary: what the new proxy fails itself
never reaches the application) against the primary pods' application metrics, plus its restarts and OOMKills. Then
it is deleted (its pods go with it), pass or fail, and only a canary that passed lets the primary be injected. A
canary that failed leaves the primary as it was: never restarted.

The canary's judgement, like every gate's, fails closed: no traffic, no primary to compare with, or a Prometheus that
does not answer is not a pass (the service is `held`, not injected).
"""

from __future__ import annotations

import copy
from typing import Any

CANARY_LABEL = "meshwave.io/canary-of"
SUFFIX = "-canary"
# What the copy must not take over from the primary's metadata: the API server's fields and kubectl's bookkeeping.
_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "ownerReferences",
                  "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds", "finalizers")
_DROPPED_ANNOTATIONS = ("deployment.kubernetes.io/revision", "kubectl.kubernetes.io/last-applied-configuration",
                        "meshwave.io/pending", "meshwave.io/lease")


def canary_name(workload: str) -> str:
    """`<workload>-canary`, cut so that the name stays an RFC 1123 label (63 characters at most)."""
    head = workload[: 63 - len(SUFFIX)].rstrip("-")
    return f"{head}{SUFFIX}"


def is_canary_of(deployment: dict[str, Any], workload: str) -> bool:
    """Whether a Deployment is meshwave's canary of `workload` (its label says so)."""
    labels = (deployment.get("metadata") or {}).get("labels") or {}
    return labels.get(CANARY_LABEL) == workload


def manifest(primary: dict[str, Any], replicas: int, inject: dict[str, str | None], run: str) -> dict[str, Any]:
    """The canary Deployment for `primary` (the API's object): its spec with `replicas` pods, the injection labels
    (`inject`: a None value removes that label) and the canary label on the template and in the selector."""
    meta = primary.get("metadata") or {}
    name, ns = meta["name"], meta["namespace"]
    spec = copy.deepcopy(primary.get("spec") or {})
    spec.pop("paused", None)
    template = spec.setdefault("template", {})
    tmeta = template.setdefault("metadata", {})
    labels = {**(tmeta.get("labels") or {}), CANARY_LABEL: name}
    for key, value in inject.items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    tmeta["labels"] = labels
    selector = spec.setdefault("selector", {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), CANARY_LABEL: name}
    spec["replicas"] = replicas
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in _DROPPED_ANNOTATIONS}
    own = {k: v for k, v in meta.items() if k not in _SERVER_FIELDS and k not in ("name", "annotations", "labels")}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {**own, "name": canary_name(name), "namespace": ns,
                     "labels": {**(meta.get("labels") or {}), CANARY_LABEL: name},
                     "annotations": {**annotations, "meshwave.io/canary-run": run}},
        "spec": spec,
    }
