"""The canary copy of a Deployment (its manifest is built by meshwave.canary): made and removed through the API.
Mixed into `MeshKube`.
"""

from __future__ import annotations

import functools

from meshwave import canary
from meshwave.changes import ApiRequest, Change
from meshwave.kube.state import _meta
from meshwave.kube.validation import validate_name
from meshwave.kube_errors import InjectionBlocked, NotFound


class Canaries:
    """Canary Deployments (part of MeshKube)."""

    def ensure_canary(self, ns: str, name: str, replicas: int, run: str) -> Change:
        """The canary copy of deployment ns/name (canary.py), with the sidecar by its own pod template label whatever
        the plan's injection mode (a namespace label would mesh every workload of the namespace). Reads before it
        writes: this workload's canary, already there, is kept (a retry); a Deployment of that name that is not its
        canary refuses (InjectionBlocked), and so does a namespace that disables injection."""
        validate_name(ns, "namespace")
        validate_name(name, "workload")
        ns_labels = self._injectable(ns, name)
        primary = self._deployment(ns, name)
        cname = canary.canary_name(name)
        target = f"deployment {ns}/{cname}"
        existing = self._deployment_or_none(ns, cname)
        if existing is not None:
            if canary.is_canary_of(existing, name):
                return self._noop("create-canary", target, {"replicas": (existing.get("spec") or {}).get("replicas")},
                                  f"the canary of {ns}/{name} is already there (made by "
                                  f"{(_meta(existing).get('annotations') or {}).get('meshwave.io/canary-run')})")
            raise InjectionBlocked(f"cluster {self.cluster}: {target} exists and is not meshwave's canary of "
                                   f"{ns}/{name} (no label {canary.CANARY_LABEL}={name}): no canary is made over it",
                                   cluster=self.cluster, verb="POST", target=target)
        tlabels = (((primary.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
        inject, _ = self._injection_labels(tlabels, ns_labels, target)
        body = canary.manifest(primary, replicas, inject, run)
        shown = ", ".join(f"{k}={v}" if v is not None else f"{k} removed" for k, v in inject.items())
        change = Change(self.cluster, "create-canary", target, None, {"replicas": replicas, **inject},
                        ApiRequest("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", "application/json", body),
                        reason=f"a canary of {ns}/{name}: {replicas} pod(s) of its template with {shown}, taking "
                               f"their share of the Service's traffic; {ns}/{name} itself is not changed")
        call = functools.partial(self._call, "POST", target, self.apps.create_namespaced_deployment, ns, body)
        return self._send(change, call)

    def remove_canary(self, ns: str, name: str) -> Change:
        """Delete the canary of deployment ns/name, its ReplicaSets and pods with it (background propagation, as
        kubectl). Nothing there, or a Deployment of that name that is not its canary: nothing is deleted."""
        cname = canary.canary_name(name)
        target = f"deployment {ns}/{cname}"
        existing = self._deployment_or_none(ns, cname)
        if existing is None:
            return self._noop("delete-canary", target, None, "no canary")
        if not canary.is_canary_of(existing, name):
            return self._noop("delete-canary", target, None, f"not meshwave's canary of {ns}/{name}: left alone")
        meta = _meta(existing)
        body = {"propagationPolicy": "Background", "preconditions": {"uid": meta.get("uid")}}
        before = {"replicas": (existing.get("spec") or {}).get("replicas")}
        request = ApiRequest("DELETE", f"/apis/apps/v1/namespaces/{ns}/deployments/{cname}", "application/json", body)
        change = Change(self.cluster, "delete-canary", target, before, None, request,
                        reason=f"the canary of {ns}/{name} removed; its pods go with it")
        call = functools.partial(self._call, "DELETE", target, self.apps.delete_namespaced_deployment, cname, ns,
                                 body=body)
        try:
            return self._send(change, call)
        except NotFound:
            return self._noop("delete-canary", target, None, "already deleted")
