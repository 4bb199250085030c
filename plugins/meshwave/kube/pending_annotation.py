"""What meshwave expects next of a workload (meshwave.pending), kept in a Deployment annotation: read, listed,
written and cleared. Mixed into `MeshKube`.
"""

from __future__ import annotations

import functools
from typing import Any

from meshwave.changes import ApiRequest, Change
from meshwave.kube.deployments import SMP
from meshwave.kube.state import _meta
from meshwave.pending import PENDING_ANNOTATION, Pending


def _pending_of(deployment: dict[str, Any], cluster: str) -> Pending | None:
    meta = _meta(deployment)
    text = (meta.get("annotations") or {}).get(PENDING_ANNOTATION)
    if text is None:
        return None
    return Pending.from_annotation(text, f"cluster {cluster}: deployment {meta.get('namespace')}/{meta.get('name')}")


class PendingAnnotations:
    """The pending annotation of a cluster's Deployments (part of MeshKube)."""

    def pending(self, ns: str, name: str) -> Pending | None:
        """The workload's pending state, None when meshwave expects nothing of it."""
        return _pending_of(self._deployment(ns, name), self.cluster)

    def list_pending(self) -> tuple[list[tuple[str, str, Pending]], list[str]]:
        """(namespace, workload, pending) of every Deployment of the cluster that carries a pending state, and the
        annotations meshwave cannot read (each named: one of them must not hide the others)."""
        items = self._call("LIST", "deployments (all namespaces)",
                           self.apps.list_deployment_for_all_namespaces).get("items", [])
        found, problems = [], []
        for d in items:
            try:
                pending = _pending_of(d, self.cluster)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if pending is not None:
                found.append((_meta(d).get("namespace", ""), _meta(d).get("name", ""), pending))
        return sorted(found, key=lambda t: t[:2]), problems

    def set_pending(self, ns: str, name: str, pending: Pending) -> Change:
        """Write what meshwave expects next, before the change it covers (a metadata annotation: no pod restarts)."""
        return self._annotate(ns, name, "set-pending", pending.to_annotation(),
                              f"expected next: {pending.describe()}")

    def clear_pending(self, ns: str, name: str, why: str) -> Change:
        """The pending state is settled (confirmed or undone): the annotation goes."""
        target = f"deployment {ns}/{name}"
        current = self.pending(ns, name)
        if current is None:
            return self._noop("clear-pending", target, None, "nothing pending")
        return self._annotate(ns, name, "clear-pending", None, f"settled: {why} (was: {current.describe()})")

    def _annotate(self, ns: str, name: str, action: str, value: str | None, reason: str) -> Change:
        body = {"metadata": {"annotations": {PENDING_ANNOTATION: value}}}  # null deletes
        target = f"deployment {ns}/{name}"
        request = ApiRequest("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/{name}", SMP, body)
        change = Change(self.cluster, action, target, None, value, request, reason=reason)
        call = functools.partial(self._call, "PATCH", target, self.apps.patch_namespaced_deployment, name, ns, body,
                                 _content_type=SMP)
        return self._send(change, call)
