"""Resource admission as the API server does it for pods: LimitRange and ResourceQuota, and the quota controller.

The order is the API server's (AllOrderedPlugins): LimitRanger's defaults run in the mutating phase *before*
MutatingAdmissionWebhook, so a container Istio's injector adds (reinvocationPolicy Never) never gets a
LimitRange default; the API's defaulting then gives a container with limits but no requests requests equal to
its limits; in the validating phase LimitRanger checks min/max on every container, the injected ones included,
and ResourceQuota, last, refuses a pod that would take a namespace over its `hard`. Refusals are the real
403 Forbidden Status texts (plugin/pkg/admission/limitranger, plugin/pkg/admission/resourcequota,
pkg/quota/v1/evaluator/core/pods.go).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from fractions import Fraction
from typing import Any

from meshlab.errors import ApiError

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(e[+-]?[0-9]+|[a-zA-Z]*)$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1), "k": 10**3,
            "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
COMPUTE = ("cpu", "memory")
# Quota names a pod's usage counts against (pkg/quota/v1/evaluator/core/pods.go podResources).
POD_QUOTA_RESOURCES = ("pods", "count/pods", "cpu", "memory", "requests.cpu", "requests.memory", "limits.cpu",
                       "limits.memory")
# Quota resources that make every container name its request or limit (the evaluator's validationSet).
_MUST_SPECIFY = {"cpu": ("requests", "cpu"), "requests.cpu": ("requests", "cpu"), "memory": ("requests", "memory"),
                 "requests.memory": ("requests", "memory"), "limits.cpu": ("limits", "cpu"),
                 "limits.memory": ("limits", "memory")}


def quantity(value: Any) -> Fraction | None:
    """A Kubernetes quantity ('512Mi', '1Gi', '500m', '1e3', 2) as an exact number; None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return Fraction(value)
    m = _QUANTITY.match(str(value).strip())
    if not m:
        return None
    try:
        number = Fraction(m.group(1))
    except ValueError:
        return None
    suffix = m.group(2)
    if suffix.startswith("e"):
        return number * Fraction(10) ** int(suffix[1:])
    factor = _BINARY.get(suffix) or _DECIMAL.get(suffix)
    return None if factor is None else number * factor


def format_quantity(resource: str, value: Fraction) -> str:
    """Quantity.String() as Go prints a canonical value: memory in the largest binary suffix that keeps it whole,
    cpu in cores or millicores ('1Gi', '1152Mi', '2', '100m')."""
    if resource.endswith("memory") and value == int(value) and value:
        for suffix, factor in reversed(_BINARY.items()):
            if value % factor == 0:
                return f"{int(value // factor)}{suffix}"
        return str(int(value))
    if value == int(value):
        return str(int(value))
    millis = value * 1000
    return f"{int(millis) if millis == int(millis) else float(millis):g}m"


def forbidden(pod: Mapping[str, Any], message: str) -> ApiError:
    """admission.NewForbidden: the object's name, or its generateName when the name is not generated yet (a
    ReplicaSet's pod: `pods "payment-7c9d8f6b5d-" is forbidden: ...`)."""
    meta = pod.get("metadata") or {}
    name = meta.get("generateName") or meta.get("name") or "Unknown"
    return ApiError(403, f'pods "{name}" is forbidden: {message}', reason="Forbidden",
                    details={"name": name, "kind": "pods"})


def _containers(pod: Mapping[str, Any], field: str = "containers") -> list[dict[str, Any]]:
    return [c for c in ((pod.get("spec") or {}).get(field) or []) if isinstance(c, dict)]


def _resources(container: Mapping[str, Any], kind: str) -> dict[str, Any]:
    return dict(((container.get("resources") or {}).get(kind)) or {})


# ---- LimitRange ----------------------------------------------------------------------------------
def default_limit_range_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """The API's defaulting of a Container item (SetDefaults_LimitRangeItem): default limit = max, default
    request = default limit, else min."""
    item = {k: dict(v) if isinstance(v, dict) else v for k, v in item.items()}
    if item.get("type") != "Container":
        return item
    default, request = dict(item.get("default") or {}), dict(item.get("defaultRequest") or {})
    for key, value in (item.get("max") or {}).items():
        default.setdefault(key, value)
    for key, value in default.items():
        request.setdefault(key, value)
    for key, value in (item.get("min") or {}).items():
        request.setdefault(key, value)
    item["default"], item["defaultRequest"] = default, request
    return item


def defaulted_limit_range(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec")
    if isinstance(spec, dict) and isinstance(spec.get("limits"), list):
        spec["limits"] = [default_limit_range_item(i) if isinstance(i, dict) else i for i in spec["limits"]]
    return obj


def _container_items(limit_ranges: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [default_limit_range_item(i) for lr in limit_ranges for i in ((lr.get("spec") or {}).get("limits") or [])
            if isinstance(i, dict) and i.get("type") == "Container"]


def apply_limit_range_defaults(pod: dict[str, Any], limit_ranges: Iterable[Mapping[str, Any]]) -> None:
    """LimitRanger's mutating phase: each container present now gets the default limit and request it lacks."""
    items = _container_items(limit_ranges)
    if not items:
        return
    for field in ("initContainers", "containers"):
        for c in _containers(pod, field):
            limits, requests = _resources(c, "limits"), _resources(c, "requests")
            for item in items:
                for key, value in item["default"].items():
                    limits.setdefault(key, value)
                for key, value in item["defaultRequest"].items():
                    requests.setdefault(key, value)
            c["resources"] = {**(c.get("resources") or {}), **({"limits": limits} if limits else {}),
                              **({"requests": requests} if requests else {})}


def default_requests_from_limits(pod: dict[str, Any]) -> None:
    """The API's defaulting (SetDefaults_Pod), run again after the webhooks: a limit without its request makes
    the request equal to it."""
    for field in ("initContainers", "containers"):
        for c in _containers(pod, field):
            limits = _resources(c, "limits")
            if not limits:
                continue
            requests = _resources(c, "requests")
            for key, value in limits.items():
                requests.setdefault(key, value)
            c["resources"] = {**(c.get("resources") or {}), "requests": requests}


def limit_range_refusals(pod: Mapping[str, Any], limit_ranges: Iterable[Mapping[str, Any]]) -> list[str]:
    """LimitRanger's validating phase (minConstraint/maxConstraint), for every container, injected ones too."""
    errors = []
    for item in _container_items(limit_ranges):
        for c in _containers(pod, "initContainers") + _containers(pod):
            requests, limits = _resources(c, "requests"), _resources(c, "limits")
            for key, enforced in (item.get("min") or {}).items():
                errors += _min_constraint(key, enforced, requests, limits)
            for key, enforced in (item.get("max") or {}).items():
                errors += _max_constraint(key, enforced, requests, limits)
    return errors


def _shown(key: str, value: Any) -> str:
    parsed = quantity(value)
    return format_quantity(key, parsed) if parsed is not None else str(value)


def _min_constraint(key: str, enforced: Any, requests: dict[str, Any], limits: dict[str, Any]) -> list[str]:
    floor = quantity(enforced) or Fraction(0)
    head = f"minimum {key} usage per Container is {_shown(key, enforced)}"
    if key not in requests:
        return [f"{head}.  No request is specified."]
    if (quantity(requests[key]) or 0) < floor:
        return [f"{head}, but request is {_shown(key, requests[key])}."]
    if key in limits and (quantity(limits[key]) or 0) < floor:
        return [f"{head}, but limit is {_shown(key, limits[key])}."]
    return []


def _max_constraint(key: str, enforced: Any, requests: dict[str, Any], limits: dict[str, Any]) -> list[str]:
    ceiling = quantity(enforced) or Fraction(0)
    head = f"maximum {key} usage per Container is {_shown(key, enforced)}"
    if key not in limits:
        return [f"{head}.  No limit is specified."]
    if (quantity(limits[key]) or 0) > ceiling:
        return [f"{head}, but limit is {_shown(key, limits[key])}."]
    if key in requests and (quantity(requests[key]) or 0) > ceiling:
        return [f"{head}, but request is {_shown(key, requests[key])}."]
    return []


def aggregate(errors: list[str]) -> str:
    """utilerrors.NewAggregate(...).Error(): one message as it is, several in brackets."""
    return errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"


# ---- ResourceQuota ---------------------------------------------------------------------------------
def pod_requests(pod: Mapping[str, Any], kind: str = "requests") -> dict[str, Fraction]:
    """The pod's effective requests (or limits) per compute resource: the larger of its containers' sum and its
    largest init container (resourcehelper.PodRequests)."""
    total: dict[str, Fraction] = {}
    for c in _containers(pod):
        for key in COMPUTE:
            value = quantity(_resources(c, kind).get(key))
            if value is not None:
                total[key] = total.get(key, Fraction(0)) + value
    for c in _containers(pod, "initContainers"):
        for key in COMPUTE:
            value = quantity(_resources(c, kind).get(key))
            if value is not None and value > total.get(key, Fraction(0)):
                total[key] = value
    return total


def terminal(pod: Mapping[str, Any]) -> bool:
    """The quota evaluator stops charging a pod that Succeeded or Failed."""
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def pod_usage(pod: Mapping[str, Any]) -> dict[str, Fraction]:
    """What one pod charges against a quota (the pod evaluator's Usage)."""
    if terminal(pod):
        return {}
    requests, limits = pod_requests(pod, "requests"), pod_requests(pod, "limits")
    usage: dict[str, Fraction] = {"pods": Fraction(1), "count/pods": Fraction(1)}
    for key in COMPUTE:
        if key in requests:
            usage[key] = usage[f"requests.{key}"] = requests[key]
        if key in limits:
            usage[f"limits.{key}"] = limits[key]
    return usage


def quota_used(hard: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """status.used as the quota controller computes it: each `hard` resource a pod counts toward, summed over the
    namespace's pods that are not terminal (0 when none)."""
    tracked = [k for k in hard if k in POD_QUOTA_RESOURCES]
    used = {k: Fraction(0) for k in tracked}
    for pod in pods:
        for key, value in pod_usage(pod).items():
            if key in used:
                used[key] += value
    return {k: format_quantity(k, v) for k, v in used.items()}


def _missing(pod: Mapping[str, Any], tracked: Iterable[str]) -> str | None:
    """failed quota: must specify ...: a quota on cpu or memory needs every container to name it."""
    missing: dict[str, list[str]] = {}
    for resource in sorted(set(tracked) & _MUST_SPECIFY.keys()):
        kind, key = _MUST_SPECIFY[resource]
        for c in _containers(pod, "initContainers") + _containers(pod):
            if key not in _resources(c, kind):
                missing.setdefault(resource, []).append(str(c.get("name", "")))
    if not missing:
        return None
    return "must specify " + "; ".join(f"{r} for: {','.join(sorted(set(names)))}" for r, names in missing.items())


def quota_refusal(pod: Mapping[str, Any], quotas: Iterable[Mapping[str, Any]],
                  pods: list[dict[str, Any]]) -> str | None:
    """ResourceQuota's admission for a new pod: the first quota it would exceed, worded as the plugin words it."""
    delta = pod_usage(pod)
    for rq in sorted(quotas, key=lambda q: q["metadata"]["name"]):
        name = rq["metadata"]["name"]
        hard = {k: quantity(v) for k, v in ((rq.get("spec") or {}).get("hard") or {}).items()}
        tracked = [k for k in hard if k in POD_QUOTA_RESOURCES]
        if not tracked:
            continue
        if missing := _missing(pod, tracked):
            return f"failed quota: {name}: {missing}"
        used = {k: quantity(v) or Fraction(0) for k, v in quota_used({k: 0 for k in tracked}, pods).items()}
        requested = {k: delta[k] for k in tracked if delta.get(k)}
        exceeded = sorted(k for k, v in requested.items() if used.get(k, 0) + v > (hard[k] or 0))
        if exceeded:
            return (f"exceeded quota: {name}, requested: {_listed(requested, exceeded)}, used: "
                    f"{_listed(used, exceeded)}, limited: {_listed(hard, exceeded)}")
    return None


def _listed(values: Mapping[str, Fraction | None], keys: list[str]) -> str:
    """The plugin's prettyPrint: `key=quantity` sorted by key, joined by commas."""
    return ",".join(f"{k}={format_quantity(k, values.get(k) or Fraction(0))}" for k in keys)
