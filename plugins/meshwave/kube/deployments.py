"""Deployments: reading a workload and its rollout, and writing its pod template (sidecar resources, traffic
exclusions, restarts). Mixed into `MeshKube` (client.py), whose transport (`_call`, `_send`, `_noop`) it uses.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from meshwave.changes import ApiRequest, Change, utc_now
from meshwave.kube.state import RolloutState, WorkloadState, _meta, assess_rollout, workload_state
from meshwave.kube.validation import _ports, _quantity, validate_name
from meshwave.kube_errors import NotFound, WorkloadNotFound

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
SIDECAR_RESOURCES = {
    "cpu": "sidecar.istio.io/proxyCPU",
    "memory": "sidecar.istio.io/proxyMemory",
    "cpu_limit": "sidecar.istio.io/proxyCPULimit",
    "memory_limit": "sidecar.istio.io/proxyMemoryLimit",
}
EXCLUDE_INBOUND = "traffic.sidecar.istio.io/excludeInboundPorts"
EXCLUDE_OUTBOUND = "traffic.sidecar.istio.io/excludeOutboundPorts"
SMP = "application/strategic-merge-patch+json"


def label_selector(selector: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], ",".join(expr.get("values") or [])
        parts.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key,
                      "DoesNotExist": f"!{key}"}[op])
    return ",".join(parts)


def _owned_by(pod: dict[str, Any], deployment: str) -> bool:
    """The selector may match other deployments' pods: keep those whose ReplicaSet is this deployment's."""
    owners = [o for o in _meta(pod).get("ownerReferences") or [] if o.get("kind") == "ReplicaSet"]
    pod_hash = (_meta(pod).get("labels") or {}).get("pod-template-hash")
    if not owners or not pod_hash:
        return True
    return any(o.get("name") == f"{deployment}-{pod_hash}" for o in owners)


def _selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


class Deployments:
    """A cluster's Deployments and their pod templates (part of MeshKube)."""

    def deployment(self, ns: str, name: str) -> dict[str, Any]:
        """The Deployment object (WorkloadNotFound when there is none)."""
        return self._deployment(ns, name)

    def template_labels(self, ns: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
        """(pod template labels, spec.selector.matchLabels) of a deployment: what a policy selects."""
        spec = self._deployment(ns, name).get("spec") or {}
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        return dict(labels), dict((spec.get("selector") or {}).get("matchLabels") or {})

    # ---- reads -------------------------------------------------------------------------------------
    def _deployment(self, ns: str, name: str) -> dict[str, Any]:
        validate_name(ns, "namespace")
        validate_name(name, "workload")
        try:
            return self._call("GET", f"deployment {ns}/{name}", self.apps.read_namespaced_deployment, name, ns)
        except NotFound as exc:
            raise WorkloadNotFound(f"cluster {self.cluster}: deployment {ns}/{name} not found ({exc.api_message})",
                                   cluster=self.cluster, verb="GET", target=f"deployment {ns}/{name}", code=404,
                                   reason=exc.reason, api_message=exc.api_message) from None

    def _pods_of(self, deployment: dict[str, Any]) -> list[dict[str, Any]]:
        meta = _meta(deployment)
        ns, name = meta["namespace"], meta["name"]
        selector = label_selector((deployment.get("spec") or {}).get("selector") or {})
        found = self._call("LIST", f"pods {ns} ({selector})", self.core.list_namespaced_pod, ns,
                           label_selector=selector).get("items", [])
        return [p for p in found if _owned_by(p, name)]

    def _replicasets_of(self, deployment: dict[str, Any]) -> list[dict[str, Any]]:
        """The ReplicaSets the deployment's selector matches (workload_state keeps the one it owns)."""
        ns = _meta(deployment)["namespace"]
        selector = label_selector((deployment.get("spec") or {}).get("selector") or {})
        return self._call("LIST", f"replicasets {ns} ({selector})", self.apps.list_namespaced_replica_set, ns,
                          label_selector=selector).get("items", [])

    def workload(self, ns: str, name: str) -> WorkloadState:
        deployment = self._deployment(ns, name)
        return workload_state(self.cluster, deployment, self._pods_of(deployment), self._replicasets_of(deployment))

    def rollout(self, ns: str, name: str, expect_proxy: bool | None = True) -> RolloutState:
        return assess_rollout(self.workload(ns, name), expect_proxy)

    def _deployment_names(self, ns: str) -> list[str]:
        items = self._call("LIST", f"deployments {ns}", self.apps.list_namespaced_deployment, ns).get("items", [])
        return sorted(_meta(d).get("name", "") for d in items)

    def _deployment_or_none(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return self._deployment(ns, name)
        except WorkloadNotFound:
            return None

    # ---- emergency rollback (meshwave.emergency) ---------------------------------------------------
    def workloads_in(self, ns: str) -> list[WorkloadState]:
        """Every deployment of a namespace with its pods: two requests, however many deployments."""
        validate_name(ns, "namespace")
        deployments = self._call("LIST", f"deployments {ns}", self.apps.list_namespaced_deployment, ns).get("items", [])
        pods = self._call("LIST", f"pods {ns}", self.core.list_namespaced_pod, ns).get("items", [])
        found = []
        for d in deployments:
            match = ((d.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            mine = [p for p in pods if _selects(match, _meta(p).get("labels") or {}) and _owned_by(p, _meta(d)["name"])]
            found.append(workload_state(self.cluster, d, mine))
        return found

    # ---- pod template writes -----------------------------------------------------------------------
    def _patch_template(self, w: WorkloadState, action: str, reason: str, *, labels: dict[str, Any] | None = None,
                        annotations: dict[str, Any] | None = None) -> Change:
        meta: dict[str, Any] = {}
        before: dict[str, Any] = {}
        if labels:
            meta["labels"] = labels
            before.update({k: w.template_labels.get(k) for k in labels})
        if annotations:
            meta["annotations"] = annotations
            before.update({k: w.template_annotations.get(k) for k in annotations})
        body = {"spec": {"template": {"metadata": meta}}}
        target = f"deployment {w.namespace}/{w.name}"
        request = ApiRequest("PATCH", f"/apis/apps/v1/namespaces/{w.namespace}/deployments/{w.name}", SMP, body)
        change = Change(self.cluster, action, target, before, {**(labels or {}), **(annotations or {})}, request,
                        reason=reason)
        call = functools.partial(self._call, "PATCH", target, self.apps.patch_namespaced_deployment, w.name,
                                 w.namespace, body, _content_type=SMP)
        return self._send(change, call)

    def _restart(self, w: WorkloadState, reason: str) -> Change:
        """What `kubectl rollout restart` sends: a strategic merge patch of the restartedAt annotation."""
        return self._patch_template(w, "restart", reason, annotations={RESTARTED_AT: utc_now()})

    def _restart_if_needed(self, w: WorkloadState, want_proxy: bool, done_reason: str) -> Change:
        target = f"deployment {w.namespace}/{w.name}"
        wrong = [p.name for p in w.pods if p.has_proxy != want_proxy]
        state = {"pods": w.pods_total, "with_proxy": w.pods_with_proxy}
        if not wrong:
            return self._noop("restart", target, state, done_reason)
        rollout = assess_rollout(w, expect_proxy=None)
        lacking = "lack an istio-proxy" if want_proxy else "still have an istio-proxy"
        if not rollout.done:
            return self._noop("restart", target, state, f"{len(wrong)} pod(s) {lacking} but the rollout is "
                                                        f"{rollout.status} ({rollout.message}): not restarting")
        return self._restart(w, f"{len(wrong)}/{w.pods_total} pod(s) {lacking} and no rollout is in progress: "
                                f"restarting once")

    def ensure_sidecar_resources(self, ns: str, name: str, cpu: str | None = None, memory: str | None = None,
                                 cpu_limit: str | None = None, memory_limit: str | None = None) -> Change:
        """Pod template annotations sizing the sidecar (take effect when pods are recreated)."""
        given = {"cpu": cpu, "memory": memory, "cpu_limit": cpu_limit, "memory_limit": memory_limit}
        wanted = {SIDECAR_RESOURCES[k]: str(v) for k, v in given.items() if v is not None}
        if not wanted:
            raise ValueError("ensure_sidecar_resources: give at least one of cpu, memory, cpu_limit, memory_limit")
        for key, value in given.items():
            if value is not None:
                _quantity(value, key)
        w = self.workload(ns, name)
        effective = {**w.template_annotations, **wanted}
        for request, limit in (("cpu", "cpu_limit"), ("memory", "memory_limit")):
            req, lim = effective.get(SIDECAR_RESOURCES[request]), effective.get(SIDECAR_RESOURCES[limit])
            if req is not None and lim is not None and _quantity(req, request) > _quantity(lim, limit):
                raise ValueError(f"sidecar {request} request {req} is above its limit {lim}: pods would be refused")
        if all(w.template_annotations.get(k) == v for k, v in wanted.items()):
            return self._noop("set-sidecar-resources", f"deployment {ns}/{name}", wanted, "already set")
        return self._patch_template(w, "set-sidecar-resources", "sidecar resource annotations; the template change "
                                    "recreates the pods", annotations=wanted)

    def ensure_exclusions(self, ns: str, name: str, inbound_ports: Iterable[int] | None = None,
                          outbound_ports: Iterable[int] | None = None) -> Change:
        """Ports whose traffic bypasses Envoy; None leaves a direction alone, an empty list clears it."""
        wanted: dict[str, str | None] = {}
        for key, ports in ((EXCLUDE_INBOUND, inbound_ports), (EXCLUDE_OUTBOUND, outbound_ports)):
            if ports is not None:
                wanted[key] = _ports(ports, key) or None
        if not wanted:
            raise ValueError("ensure_exclusions: give inbound_ports and/or outbound_ports")
        w = self.workload(ns, name)
        if all(w.template_annotations.get(k) == v for k, v in wanted.items()):
            return self._noop("set-exclusions", f"deployment {ns}/{name}", wanted, "already set")
        return self._patch_template(w, "set-exclusions", "traffic exclusion annotations; the template change "
                                    "recreates the pods", annotations=wanted)
