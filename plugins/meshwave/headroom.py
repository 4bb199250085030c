"""Will the cluster admit, schedule and keep running the workload's pods once they carry a sidecar?

Kubernetes gives every container its own cgroup limit: the injected istio-proxy gets its own requests and limits
from the injection template (Istio's `define "resources"`): the pod's sidecar.istio.io/proxyCPU, proxyMemory,
proxyCPULimit, proxyMemoryLimit annotations, and only those when any is set (a request without its limit has no
limit); none set, the install's values.global.proxy.resources (ConfigMap istio-sidecar-injector[-<rev>], key
`values`), and Istio's defaults when the cluster does not show it (requests 100m / 128Mi, limits 2000m / 1024Mi).
A limit without a request makes the request equal to it (the API's defaulting after the webhook).

A LimitRange default never reaches the proxy: LimitRanger defaults containers in the mutating phase, before
MutatingAdmissionWebhook, and Istio's webhook is not reinvoked (reinvocationPolicy Never). Its min and max are
checked on every container in the validating phase, the proxy included, and its max with no limit refuses the pod.

Checks, each blocking before any change:
  (a) the sidecar's expected memory fits under the proxy's own memory limit (else it is OOMKilled);
  (b) each ResourceQuota of the namespace (hard minus used) admits the proxies of every replica plus the pods the
      rollout surges (else the ReplicaSet's pods are refused, 403 "exceeded quota", and the rollout stalls);
  (c) no LimitRange min/max refuses the proxy container (403 Forbidden from LimitRanger);
  (d) the nodes' allocatable memory and cpu, minus what their pods request, hold the extra requests (else the new
      pods stay Pending, Unschedulable).
Quotas and limit ranges are read in the workload's namespace: a 403 there blocks (the namespace's admission
cannot be checked). Nodes are cluster-scoped and often not readable by a namespace's tenant: a 403 there is a
note, the node check is skipped and says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from meshwave.kube_errors import AccessDenied

if TYPE_CHECKING:
    from meshwave.kube import MeshKube


def _quantity(value: Any) -> Any:
    """A Kubernetes quantity ("87Mi", "250m"), parsed as the kubernetes client does (loaded on first use)."""
    from kubernetes.utils import parse_quantity

    return parse_quantity(value)


MI = 2**20
COMPUTE = ("cpu", "memory")
# Istio's install default (manifests/charts/istio-control/istio-discovery/values.yaml global.proxy.resources).
ISTIO_DEFAULT_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"},
                           "limits": {"cpu": "2000m", "memory": "1024Mi"}}
PROXY_ANNOTATIONS = {"sidecar.istio.io/proxyCPU": ("requests", "cpu"),
                     "sidecar.istio.io/proxyMemory": ("requests", "memory"),
                     "sidecar.istio.io/proxyCPULimit": ("limits", "cpu"),
                     "sidecar.istio.io/proxyMemoryLimit": ("limits", "memory")}


class HeadroomBlocked(Exception):
    """The pods would not run with a sidecar; the message names the object and the numbers."""


Resources = dict[str, dict[str, Decimal]]  # {"requests": {"cpu": cores, "memory": bytes}, "limits": {...}}


@dataclass(frozen=True)
class ProxySizing:
    """The istio-proxy container's requests and limits as the injector will write them, and where they come from."""

    resources: Resources
    source: str

    def get(self, kind: str, name: str) -> Decimal | None:
        return self.resources.get(kind, {}).get(name)


@dataclass
class Headroom:
    """What the preflight found: the proxy's sizing, the checks that passed, and what could not be checked."""

    proxy: ProxySizing
    passed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "; ".join(self.passed + [f"NOTE: {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["proxy"]["resources"] = {k: {n: str(v) for n, v in vs.items()} for k, vs in self.proxy.resources.items()}
        return data


# ---- arithmetic --------------------------------------------------------------------------------------
def mi(value: Decimal | float) -> str:
    number = float(value) / MI
    return f"{number:.0f}Mi" if abs(number - round(number)) < 0.05 else f"{number:.1f}Mi"


def shown(name: str, value: Decimal) -> str:
    if name.endswith("memory") or name == "memory":
        return mi(value)
    if name.endswith("cpu"):
        return f"{value * 1000:.0f}m"
    return f"{value:g}"


def _parsed(values: Mapping[str, Any]) -> dict[str, Decimal]:
    return {k: Decimal(_quantity(v)) for k, v in values.items() if k in COMPUTE and v is not None}


def proxy_sizing(annotations: Mapping[str, str], template: Mapping[str, Mapping[str, Any]] | None,
                 template_source: str) -> ProxySizing:
    """The injection template's `resources` for istio-proxy (and istio-init), with the API's defaulting."""
    if any(key in annotations for key in PROXY_ANNOTATIONS):
        raw: dict[str, dict[str, Any]] = {}
        for key, (kind, name) in PROXY_ANNOTATIONS.items():
            if key in annotations:
                raw.setdefault(kind, {})[name] = annotations[key]
        source = "the sidecar.istio.io/proxy* annotations"
    else:
        raw = {k: dict(v) for k, v in (template or {}).items() if k in ("requests", "limits") and v}
        source = template_source
    resources: Resources = {kind: _parsed(raw.get(kind) or {}) for kind in ("requests", "limits")}
    for name, limit in resources["limits"].items():  # a limit without a request: the request is the limit
        resources["requests"].setdefault(name, limit)
    return ProxySizing(resources, source)


def check_expected_memory(proxy: ProxySizing, expected_mi: float) -> str:
    """(a) Envoy's expected working set under the proxy's own limit."""
    limit = proxy.get("limits", "memory")
    if limit is None:
        return (f"the istio-proxy container has no memory limit ({proxy.source}): the sidecar's expected "
                f"{expected_mi:g}Mi cannot get it OOMKilled")
    if Decimal(expected_mi) * MI > limit:
        raise HeadroomBlocked(
            f"the istio-proxy container's own memory limit {mi(limit)} ({proxy.source}) < the sidecar's expected "
            f"{expected_mi:g}Mi: the sidecar would be OOMKilled. Give it a larger limit in the plan "
            "(sidecar.memory_limit, written as sidecar.istio.io/proxyMemoryLimit), or lower expected_memory_mi "
            "if it is wrong")
    return f"the istio-proxy limit {mi(limit)} ({proxy.source}) holds the sidecar's expected {expected_mi:g}Mi"


def limit_range_refusals(proxy: ProxySizing, limit_ranges: Iterable[Mapping[str, Any]]) -> list[str]:
    """(c) What LimitRanger's validation says of the proxy container (the API's own messages)."""
    refusals = []
    for lr in limit_ranges:
        name = f"{lr['metadata'].get('namespace')}/{lr['metadata']['name']}"
        for item in (lr.get("spec") or {}).get("limits") or []:
            if item.get("type") != "Container":
                continue
            for key, value in (item.get("min") or {}).items():
                refusals += [f"LimitRange {name}: {m}" for m in _min(key, Decimal(_quantity(value)), proxy)]
            for key, value in (item.get("max") or {}).items():
                refusals += [f"LimitRange {name}: {m}" for m in _max(key, Decimal(_quantity(value)), proxy)]
    return refusals


def _min(key: str, floor: Decimal, proxy: ProxySizing) -> list[str]:
    request, limit = proxy.get("requests", key), proxy.get("limits", key)
    head = f"minimum {key} usage per Container is {shown(key, floor)}"
    if request is None:
        return [f"{head}.  No request is specified."]
    if request < floor:
        return [f"{head}, but request is {shown(key, request)}."]
    if limit is not None and limit < floor:
        return [f"{head}, but limit is {shown(key, limit)}."]
    return []


def _max(key: str, ceiling: Decimal, proxy: ProxySizing) -> list[str]:
    request, limit = proxy.get("requests", key), proxy.get("limits", key)
    head = f"maximum {key} usage per Container is {shown(key, ceiling)}"
    if limit is None:
        return [f"{head}.  No limit is specified."]
    if limit > ceiling:
        return [f"{head}, but limit is {shown(key, limit)}."]
    if request is not None and request > ceiling:
        return [f"{head}, but request is {shown(key, request)}."]
    return []


def pod_resources(containers: Iterable[Mapping[str, Any]]) -> Resources:
    """The sum of the containers' requests and limits (what one pod of the template charges now)."""
    total: Resources = {"requests": {}, "limits": {}}
    for c in containers:
        res = c.get("resources") or {}
        limits = _parsed(res.get("limits") or {})
        requests = {**limits, **_parsed(res.get("requests") or {})}
        for kind, values in (("requests", requests), ("limits", limits)):
            for name, value in values.items():
                total[kind][name] = total[kind].get(name, Decimal(0)) + value
    return total


@dataclass(frozen=True)
class Rollout:
    """What the injection rollout adds: a proxy on every replica, and `surge` whole new pods at its peak."""

    replicas: int
    surge: int
    pod: Resources  # one pod of the template as it is now, without a proxy

    def extra(self, proxy: ProxySizing) -> dict[str, Decimal]:
        """Quota resource name -> what the namespace must have room for (conservative: the surge pods counted
        with their proxy on top of every replica's)."""
        need: dict[str, Decimal] = {"pods": Decimal(self.surge), "count/pods": Decimal(self.surge)}
        for kind in ("requests", "limits"):
            for name in COMPUTE:
                per_proxy = proxy.get(kind, name) or Decimal(0)
                per_pod = self.pod[kind].get(name, Decimal(0)) + per_proxy
                need[f"{kind}.{name}"] = self.replicas * per_proxy + self.surge * per_pod
        for name in COMPUTE:
            need[name] = need[f"requests.{name}"]
        return need


def surge_of(spec: Mapping[str, Any]) -> int:
    """maxSurge as the deployment controller resolves it (25% of replicas, rounded up, by default)."""
    replicas = int(spec.get("replicas", 1))
    strategy = spec.get("strategy") or {}
    if strategy.get("type") == "Recreate":
        return 0
    value = (strategy.get("rollingUpdate") or {}).get("maxSurge", "25%")
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(replicas * float(value[:-1]) / 100)
    return int(value)


def quota_refusals(quotas: Iterable[Mapping[str, Any]], proxy: ProxySizing, rollout: Rollout) -> list[str]:
    """(b) Each quota's hard minus used against what the rollout adds; a quota on cpu or memory also needs the proxy
    to name that request or limit (the quota evaluator's "must specify")."""
    need = rollout.extra(proxy)
    refusals = []
    for rq in quotas:
        name = f"{rq['metadata'].get('namespace')}/{rq['metadata']['name']}"
        hard = _quota_values((rq.get("status") or {}).get("hard") or (rq.get("spec") or {}).get("hard") or {})
        used = _quota_values((rq.get("status") or {}).get("used") or {})
        missing = [k for k in hard if k in need and _unnamed(k, proxy)]
        if missing:
            refusals.append(f"ResourceQuota {name} tracks {', '.join(sorted(missing))} and the istio-proxy container "
                            f"sets none ({proxy.source}): every new pod would be refused (must specify ...)")
            continue
        for key in sorted(hard):
            if key in need and need[key] and used.get(key, Decimal(0)) + need[key] > hard[key]:
                free = hard[key] - used.get(key, Decimal(0))
                refusals.append(f"ResourceQuota {name}: {key} hard {shown(key, hard[key])}, used "
                                f"{shown(key, used.get(key, Decimal(0)))}, free {shown(key, free)} < "
                                f"{shown(key, need[key])} needed ({_needed_text(rollout)})")
    return refusals


def _needed_text(rollout: Rollout) -> str:
    return f"a proxy for each of {rollout.replicas} replicas plus {rollout.surge} surge pod(s) of the rollout"


def _unnamed(key: str, proxy: ProxySizing) -> bool:
    kind, _, name = key.rpartition(".")
    if name not in COMPUTE:
        return False
    return proxy.get(kind or "requests", name) is None


def _quota_values(values: Mapping[str, Any]) -> dict[str, Decimal]:
    return {k: Decimal(_quantity(v)) for k, v in values.items()}


def node_room(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> dict[str, Decimal]:
    """Allocatable minus what the pods bound to each schedulable node request, summed over the nodes."""
    schedulable = {n["metadata"]["name"]: n for n in nodes if not (n.get("spec") or {}).get("unschedulable")}
    room = {name: Decimal(0) for name in COMPUTE}
    for node in schedulable.values():
        allocatable = _parsed((node.get("status") or {}).get("allocatable") or {})
        for name in COMPUTE:
            room[name] += allocatable.get(name, Decimal(0))
    for pod in pods:
        if (pod.get("spec") or {}).get("nodeName") not in schedulable or \
                (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        requests = pod_resources((pod.get("spec") or {}).get("containers") or [])["requests"]
        for name in COMPUTE:
            room[name] -= requests.get(name, Decimal(0))
    return room


def node_refusals(room: Mapping[str, Decimal], proxy: ProxySizing, rollout: Rollout, nodes: int) -> list[str]:
    """(d) The nodes' free allocatable against the extra requests (one pool: a pod that fits the sum may still not
    fit one node, which the scheduler then says; this check catches a cluster that is full)."""
    need = rollout.extra(proxy)
    refusals = []
    for name in COMPUTE:
        want = need[f"requests.{name}"]
        if want > room[name]:
            refusals.append(f"the {nodes} node(s) have {shown(name, room[name])} of allocatable {name} not yet "
                            f"requested < {shown(name, want)} requested by {_needed_text(rollout)}: the new pods "
                            "would stay Pending (Unschedulable)")
    return refusals


# ---- reading the cluster ---------------------------------------------------------------------------------
def injector_template(kube: MeshKube) -> tuple[dict[str, Any] | None, str, str | None]:
    """(values.global.proxy.resources, where it came from, a note when the cluster did not show it)."""
    try:
        revision = kube.injection_revision()
        values = kube.injector_values(revision)
    except AccessDenied as exc:
        return ISTIO_DEFAULT_RESOURCES, "Istio's defaults", f"the injector's ConfigMap is not readable ({exc}): " \
            "Istio's default proxy resources assumed"
    name = "istio-sidecar-injector" + ("" if revision == "default" else f"-{revision}")
    if values is None:
        return ISTIO_DEFAULT_RESOURCES, "Istio's defaults", f"no ConfigMap {kube.root_namespace}/{name}: Istio's " \
            "default proxy resources assumed"
    resources = ((values.get("global") or {}).get("proxy") or {}).get("resources")
    return resources or {}, f"the injector's values.global.proxy.resources ({kube.root_namespace}/{name})", None


def check(kube: MeshKube, namespace: str, workload: str, plan_annotations: Mapping[str, str], expected_mi: float,
          injected: bool) -> Headroom:
    """Every check above, against the cluster as it is now; HeadroomBlocked names the first failure's object."""
    deployment = kube.deployment(namespace, workload)
    spec = deployment.get("spec") or {}
    template = spec.get("template") or {}
    annotations = {**((template.get("metadata") or {}).get("annotations") or {}), **plan_annotations}
    values, source, note = injector_template(kube)
    proxy = proxy_sizing(annotations, values, source)
    result = Headroom(proxy, notes=[note] if note else [])
    result.passed.append(check_expected_memory(proxy, expected_mi))
    if injected:  # the proxies run already: nothing more to admit or schedule
        return result
    containers = [c for c in (template.get("spec") or {}).get("containers") or [] if c.get("name") != "istio-proxy"]
    rollout = Rollout(int(spec.get("replicas", 1)), surge_of(spec), pod_resources(containers))
    try:
        limit_ranges, quotas = kube.limit_ranges(namespace), kube.resource_quotas(namespace)
    except AccessDenied as exc:
        raise HeadroomBlocked(f"cannot read the ResourceQuotas and LimitRanges of namespace {namespace} ({exc}): "
                              "whether its admission takes the sidecars cannot be checked. Grant list on "
                              "resourcequotas and limitranges") from None
    if refusals := limit_range_refusals(proxy, limit_ranges) + quota_refusals(quotas, proxy, rollout):
        raise HeadroomBlocked("; ".join(refusals) + ": the new pods would be refused (403 Forbidden) and the "
                              "rollout would stall")
    result.passed.append(f"{len(quotas)} ResourceQuota(s) and {len(limit_ranges)} LimitRange(s) in {namespace} "
                         f"admit {_needed_text(rollout)}")
    _check_nodes(kube, proxy, rollout, result)
    return result


def _check_nodes(kube: MeshKube, proxy: ProxySizing, rollout: Rollout, result: Headroom) -> None:
    try:
        nodes, pods = kube.nodes(), kube.all_pods()
    except AccessDenied as exc:
        result.notes.append(f"node capacity not checked: the nodes or pods are not readable ({exc})")
        return
    room = node_room(nodes, pods)
    if refusals := node_refusals(room, proxy, rollout, len(nodes)):
        raise HeadroomBlocked("; ".join(refusals))
    result.passed.append(f"the nodes have {shown('memory', room['memory'])} memory and {shown('cpu', room['cpu'])} "
                         "cpu of allocatable not yet requested: room for the extra requests")
