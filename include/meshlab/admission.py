"""A cluster's resource side: LimitRange and ResourceQuota admission around the injector, the quota controller's
status, the nodes and the scheduler that fits pods' requests into their allocatable resources.

The rules are in `quota.py`; this module applies them to a store in the API server's order and keeps the
scheduler's per-node totals up to date from the store's events.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from meshlab import quota as q
from meshlab import resources as r
from meshlab.store import Event, Store
from meshlab.topology import Cluster, Namespace, NodeSpec

# A cluster without declared nodes gets one that never fills: scheduling is then never what stops a pod.
UNBOUNDED_NODE = NodeSpec(name="meshlab-node", cpu="1000", memory="4Ti", pods=100_000)


# ---- admission ------------------------------------------------------------------------------------
def mutate_before_webhooks(store: Store, namespace: str, body: Any) -> Any:
    """LimitRanger's mutating phase: defaults for the containers the client sent (before any webhook adds one)."""
    limit_ranges = list(store.items(r.LIMIT_RANGES, namespace))
    if not limit_ranges or not _is_pod(body):
        return body
    pod = copy.deepcopy(body)
    q.apply_limit_range_defaults(pod, limit_ranges)
    return pod


def validate_after_webhooks(store: Store, namespace: str, body: Any) -> Any:
    """The API's defaulting of the webhook-patched pod, then LimitRanger's and ResourceQuota's validation:
    403 Forbidden with the plugins' own messages."""
    if not _is_pod(body):
        return body
    pod = copy.deepcopy(body)
    q.default_requests_from_limits(pod)
    if errors := q.limit_range_refusals(pod, store.items(r.LIMIT_RANGES, namespace)):
        raise q.forbidden(pod, q.aggregate(errors))
    quotas = list(store.items(r.RESOURCE_QUOTAS, namespace))
    if quotas and (refusal := q.quota_refusal(pod, quotas, list(store.items(r.PODS, namespace)))):
        raise q.forbidden(pod, refusal)
    return pod


def _is_pod(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("spec"), dict) and \
        isinstance(body["spec"].get("containers"), list)


def sync_quota_status(store: Store) -> None:
    """The quota controller: status.hard is spec.hard, status.used what the namespace's pods charge."""
    for rq in list(store.items(r.RESOURCE_QUOTAS)):
        meta = rq["metadata"]
        hard = dict(((rq.get("spec") or {}).get("hard")) or {})
        status = {"hard": hard, "used": q.quota_used(hard, store.items(r.PODS, meta["namespace"]))}
        store.set_status(r.RESOURCE_QUOTAS, meta["namespace"], meta["name"], status)


# ---- the topology's objects -----------------------------------------------------------------------
def create_namespace_limits(store: Store, ns: Namespace) -> None:
    for quota in ns.resource_quotas:
        store.create(r.RESOURCE_QUOTAS, ns.name, {"metadata": {"name": quota.name}, "spec": {"hard": dict(quota.hard)}})
    for lr in ns.limit_ranges:
        limits = [item.model_dump(exclude_defaults=True) | {"type": item.type} for item in lr.limits]
        store.create(r.LIMIT_RANGES, ns.name, {"metadata": {"name": lr.name}, "spec": {"limits": limits}})
    sync_quota_status(store)


def node_manifest(node: NodeSpec) -> dict[str, Any]:
    resources = {"cpu": node.cpu, "memory": node.memory, "pods": str(node.pods)}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                                                       "kubernetes.io/arch": "amd64"}},
            "status": {"capacity": dict(resources), "allocatable": dict(resources),
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "message": "kubelet is posting ready status"}],
                       "nodeInfo": {"kubeletVersion": "v1.32.0", "containerRuntimeVersion": "containerd://1.7.24",
                                    "operatingSystem": "linux", "architecture": "amd64"}}}


def create_nodes(store: Store, cluster: Cluster) -> None:
    for node in cluster.nodes if cluster.nodes is not None else [UNBOUNDED_NODE]:
        manifest = node_manifest(node)
        store.create(r.NODES, None, {"metadata": manifest["metadata"]})
        store.set_status(r.NODES, None, node.name, manifest["status"])


# ---- the scheduler --------------------------------------------------------------------------------
@dataclass
class _NodeUse:
    cpu: Fraction = Fraction(0)
    memory: Fraction = Fraction(0)
    pods: int = 0


@dataclass
class Scheduler:
    """Fits a pod's requests (cpu, memory, one pod) into a node's allocatable minus what the pods bound to it request,
    as the default scheduler's NodeResourcesFit and pod-count filters do; the first node that fits, by name."""

    store: Store
    _use: dict[str, _NodeUse] = field(default_factory=dict)
    _charged: dict[str, tuple[str, Fraction, Fraction]] = field(default_factory=dict)  # pod uid -> (node, cpu, mem)

    def __post_init__(self) -> None:
        for pod in self.store.items(r.PODS):
            self._account(pod, deleted=False)
        self.store.on_change.append(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.resource is r.PODS:
            self._account(event.obj, deleted=event.type == "DELETED")

    def _account(self, pod: Mapping[str, Any], deleted: bool) -> None:
        uid = pod["metadata"].get("uid", "")
        node = (pod.get("spec") or {}).get("nodeName")
        live = node and not deleted and not q.terminal(pod)
        charged = self._charged.get(uid)
        if charged is not None and live and charged[0] == node:
            return  # a pod's requests never change: nothing to do for its status updates
        if charged is not None:
            use = self._use.setdefault(charged[0], _NodeUse())
            use.cpu, use.memory, use.pods = use.cpu - charged[1], use.memory - charged[2], use.pods - 1
            del self._charged[uid]
        if live:
            requests = q.pod_requests(pod)
            cpu, memory = requests.get("cpu", Fraction(0)), requests.get("memory", Fraction(0))
            use = self._use.setdefault(str(node), _NodeUse())
            use.cpu, use.memory, use.pods = use.cpu + cpu, use.memory + memory, use.pods + 1
            self._charged[uid] = (str(node), cpu, memory)

    def schedule(self, pod: Mapping[str, Any]) -> tuple[str | None, str]:
        """(node, "") for the first node the pod fits, or (None, the scheduler's FailedScheduling message)."""
        requests = q.pod_requests(pod)
        cpu, memory = requests.get("cpu", Fraction(0)), requests.get("memory", Fraction(0))
        nodes = sorted(self.store.items(r.NODES), key=lambda n: n["metadata"]["name"])
        reasons: dict[str, int] = {}
        for node in nodes:
            why = self._misfit(node, cpu, memory)
            if not why:
                return node["metadata"]["name"], ""
            for reason in why:
                reasons[reason] = reasons.get(reason, 0) + 1
        n = len(nodes)
        counted = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        return None, (f"0/{n} nodes are available: {counted + '. ' if counted else ''}preemption: 0/{n} nodes are "
                      f"available: {n} No preemption victims found for incoming pod.")

    def _misfit(self, node: Mapping[str, Any], cpu: Fraction, memory: Fraction) -> list[str]:
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        use = self._use.get(node["metadata"]["name"], _NodeUse())
        why = []
        if use.pods + 1 > int(q.quantity(allocatable.get("pods", "110")) or 0):
            why.append("Too many pods")
        if cpu and use.cpu + cpu > (q.quantity(allocatable.get("cpu")) or 0):
            why.append("Insufficient cpu")
        if memory and use.memory + memory > (q.quantity(allocatable.get("memory")) or 0):
            why.append("Insufficient memory")
        return why
