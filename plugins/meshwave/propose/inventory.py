"""What runs where: every Deployment of every cluster, read once per cluster (a handful of LISTs, not one request
per workload: the seed's 190 Deployments in well under a second), with the helpers meshwave's steps use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from meshwave import gitops
from meshwave.headroom import MI, injector_template, proxy_sizing
from meshwave.mtls import effective_mtls
from meshwave.propose.models import CRITICALITY_RANK, Inventory, ProxyResources, Workload

if TYPE_CHECKING:
    from meshwave.kube import MeshKube

INJECT_LABEL, NS_INJECT_LABEL, REV_LABEL = "sidecar.istio.io/inject", "istio-injection", "istio.io/rev"
CRITICALITY_LABELS = ("criticality", "meshwave.io/criticality", "tier")


def read_cluster(kube: MeshKube, criticality_labels: Iterable[str] = CRITICALITY_LABELS) -> list[Workload]:
    """Every Deployment of one cluster; the root namespace's gateways are kept as (never planned) callers."""
    namespaces = {_meta(n)["name"]: _meta(n).get("labels") or {} for n in
                  kube.call("LIST", "namespaces", kube.core.list_namespace).get("items", [])}
    deployments = kube.call("LIST", "deployments (all namespaces)",
                            kube.apps.list_deployment_for_all_namespaces).get("items", [])
    pods = kube.all_pods()
    policies = kube.mtls.list(None)
    template, source, _ = injector_template(kube)
    found = []
    for dep in deployments:
        meta = _meta(dep)
        ns = meta["namespace"]
        mine = [p for p in pods if _meta(p).get("namespace") == ns and _owner_deployment(p) == meta["name"]]
        found.append(_workload(kube, dep, mine, namespaces.get(ns, {}), policies, (template, source),
                               tuple(criticality_labels)))
    return found


def read_inventory(kubes: dict[str, MeshKube]) -> Inventory:
    workloads = []
    for cluster in sorted(kubes):
        workloads += read_cluster(kubes[cluster])
    return Inventory(workloads=sorted(workloads, key=lambda w: w.key))


class NotInInventory(Exception):
    """A workload named on the command line that the clusters read do not have (a typo must not pass silently)."""


def with_exclusions(inventory: Inventory, reasons: Mapping[str, str]) -> Inventory:
    """Workloads their teams know cannot take a sidecar (`--exclude`), marked as an owner's opt-out is: never planned,
    and as callers they keep their callees PERMISSIVE with the reason."""
    workloads = inventory.by_key()
    for key in sorted(reasons):
        if key not in workloads:
            raise NotInInventory(f"--exclude {key}: no such Deployment in the clusters read")
        if workloads[key].gateway:
            raise NotInInventory(f"--exclude {key}: an Istio gateway (an Envoy of its own), never planned")
    return inventory.model_copy(update={"workloads": [
        w.model_copy(update={"cannot_mesh": "; ".join(filter(None, [w.cannot_mesh, f"excluded: {reasons[w.key]}"]))})
        if w.key in reasons else w for w in inventory.workloads]})


def with_working_sets(inventory: Inventory, working_sets: dict[tuple[str, str, str], float]) -> Inventory:
    """The app containers' largest working set per pod (MiB), keyed (cluster, namespace, pod), folded in."""
    updated = []
    for w in inventory.workloads:
        prefix = f"{w.name}-"
        seen = [mi for (c, ns, pod), mi in working_sets.items() if c == w.cluster and ns == w.namespace
                and pod.startswith(prefix) and pod[len(prefix):].count("-") == 1]
        updated.append(w.model_copy(update={"app_memory_working_set_mi": max(seen)}) if seen else w)
    return inventory.model_copy(update={"workloads": updated})


def _workload(kube: MeshKube, dep: dict[str, Any], pods: list[dict[str, Any]], ns_labels: dict[str, str],
              policies: list[dict[str, Any]], injector: tuple[Any, str],
              criticality_labels: tuple[str, ...]) -> Workload:
    meta, spec = _meta(dep), dep.get("spec") or {}
    tmeta = (spec.get("template") or {}).get("metadata") or {}
    pod_labels, annotations = tmeta.get("labels") or {}, tmeta.get("annotations") or {}
    ns = meta["namespace"]
    containers = [c for c in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
                  if c.get("name") != "istio-proxy"]
    effective = effective_mtls(policies, kube.root_namespace, ns, pod_labels)
    gateway = ns == kube.root_namespace or "istio" in pod_labels
    return Workload(
        cluster=kube.cluster, namespace=ns, name=meta["name"], replicas=int(spec.get("replicas", 1)),
        criticality=_criticality(meta.get("labels") or {}, pod_labels, criticality_labels),
        pods=len(pods), pods_with_sidecar=sum(1 for p in pods if _has_proxy(p)),
        app_memory_limit_mi=_memory_limit_mi(containers),
        injection_labels=_injection_labels(ns_labels, pod_labels, annotations),
        revision=pod_labels.get(REV_LABEL) or ns_labels.get(REV_LABEL),
        gitops=gitops.reverted_by(dep),
        peer_authentications=[str(ref) for ref in
                              (effective.mesh_policy, effective.namespace_policy, effective.workload_policy)
                              if ref is not None],
        mtls=str(effective.mode),
        proxy=_proxy(annotations, injector),
        cannot_mesh=None if gateway else _cannot_mesh(ns, ns_labels, pod_labels, annotations),
        gateway=gateway,
    )


def _criticality(labels: dict[str, str], pod_labels: dict[str, str], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = (labels.get(key) or pod_labels.get(key) or "").lower()
        if value in CRITICALITY_RANK:
            return value
    return "medium"


def _cannot_mesh(ns: str, ns_labels: dict[str, str], pod_labels: dict[str, str],
                 annotations: dict[str, str]) -> str | None:
    """An owner's opt-out that meshwave must not override: the namespace or the pods say no sidecar."""
    if ns_labels.get(NS_INJECT_LABEL) == "disabled":
        return f"namespace {ns} has {NS_INJECT_LABEL}=disabled"
    if pod_labels.get(INJECT_LABEL) == "false":
        return f"its pods have the label {INJECT_LABEL}=false"
    if annotations.get(INJECT_LABEL) == "false":  # the deprecated annotation form, still honoured by Istio
        return f"its pods have the annotation {INJECT_LABEL}=false"
    return None


def _injection_labels(ns_labels: dict[str, str], pod_labels: dict[str, str],
                      annotations: dict[str, str]) -> dict[str, str]:
    found = {f"namespace {k}": v for k, v in ns_labels.items() if k in (NS_INJECT_LABEL, REV_LABEL)}
    found |= {f"pod {k}": v for k, v in pod_labels.items() if k in (INJECT_LABEL, REV_LABEL)}
    if INJECT_LABEL in annotations:
        found[f"pod annotation {INJECT_LABEL}"] = annotations[INJECT_LABEL]
    return found


def _proxy(annotations: dict[str, str], injector: tuple[Any, str]) -> ProxyResources:
    sizing = proxy_sizing(annotations, injector[0], injector[1])
    cpu_limit, mem_limit = sizing.get("limits", "cpu"), sizing.get("limits", "memory")
    return ProxyResources(
        cpu_request_m=float(sizing.get("requests", "cpu") or 0) * 1000,
        cpu_limit_m=None if cpu_limit is None else float(cpu_limit) * 1000,
        memory_request_mi=float(sizing.get("requests", "memory") or 0) / MI,
        memory_limit_mi=None if mem_limit is None else float(mem_limit) / MI,
        source=sizing.source)


def _memory_limit_mi(containers: list[dict[str, Any]]) -> float | None:
    from kubernetes.utils import parse_quantity

    limits = [((c.get("resources") or {}).get("limits") or {}).get("memory") for c in containers]
    if not limits or any(v is None for v in limits):
        return None
    return float(sum(parse_quantity(v) for v in limits)) / MI


def _owner_deployment(pod: dict[str, Any]) -> str | None:
    """The Deployment behind a pod: its ReplicaSet is `<deployment>-<pod-template-hash>`."""
    pod_hash = (_meta(pod).get("labels") or {}).get("pod-template-hash")
    for ref in _meta(pod).get("ownerReferences") or []:
        if ref.get("kind") == "ReplicaSet" and pod_hash and ref.get("name", "").endswith(f"-{pod_hash}"):
            return ref["name"][: -len(pod_hash) - 1]
    return None


def _has_proxy(pod: dict[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    return any(c.get("name") == "istio-proxy" for c in (spec.get("containers") or []) + (spec.get("initContainers")
                                                                                         or []))


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}
