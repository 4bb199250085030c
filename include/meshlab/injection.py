"""Istio's sidecar injection decision and the istio-proxy container it adds (istio-facts.md)."""

from __future__ import annotations

import json
import re
from typing import Any

PROXY_IMAGE = "docker.io/istio/proxyv2:1.24.0"
PROXY_DEFAULTS = {"cpu": "100m", "memory": "128Mi"}

_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_FACTORS = {
    "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "m": 1e-3,
}


def parse_quantity(value: str | int | float | None) -> float | None:
    """A Kubernetes quantity ('512Mi', '1Gi', '500m', '1e3') as a number (bytes or cores)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    m = _QUANTITY.match(str(value).strip())
    if not m or m.group(2) not in _FACTORS:
        return None
    try:
        return float(m.group(1)) * _FACTORS[m.group(2)]
    except ValueError:
        return None


def injection_applies(ns_labels: dict[str, str], pod_labels: dict[str, str], pod_annotations: dict[str, str],
                      revisions: list[str]) -> bool:
    """Whether the injector adds a sidecar to a new pod.

    Either label saying "disabled"/"false" wins; `istio-injection` beats `istio.io/rev` on a namespace;
    a pod label `sidecar.istio.io/inject=true` (or a pod revision label) injects in an unlabelled namespace.
    """
    pod_flag = pod_labels.get("sidecar.istio.io/inject", pod_annotations.get("sidecar.istio.io/inject"))
    if pod_flag == "false":
        return False
    ns_flag = ns_labels.get("istio-injection")
    if ns_flag == "disabled":
        return False
    if ns_flag == "enabled":
        return True
    if ns_labels.get("istio.io/rev") in revisions:
        return True
    if pod_flag == "true":
        return True
    return pod_labels.get("istio.io/rev") in revisions


def excluded_ports(annotations: dict[str, str], direction: str) -> set[int]:
    """Ports in traffic.sidecar.istio.io/exclude{Inbound,Outbound}Ports."""
    raw = annotations.get(f"traffic.sidecar.istio.io/exclude{direction}Ports", "")
    return {int(p) for p in raw.replace(" ", "").split(",") if p.isdigit()}


def proxy_container(annotations: dict[str, str]) -> dict[str, Any]:
    """The istio-proxy container, sized from the sidecar.istio.io/proxy* annotations."""
    requests = {
        "cpu": annotations.get("sidecar.istio.io/proxyCPU", PROXY_DEFAULTS["cpu"]),
        "memory": annotations.get("sidecar.istio.io/proxyMemory", PROXY_DEFAULTS["memory"]),
    }
    limits = {}
    if "sidecar.istio.io/proxyCPULimit" in annotations:
        limits["cpu"] = annotations["sidecar.istio.io/proxyCPULimit"]
    if "sidecar.istio.io/proxyMemoryLimit" in annotations:
        limits["memory"] = annotations["sidecar.istio.io/proxyMemoryLimit"]
    resources: dict[str, Any] = {"requests": requests}
    if limits:
        resources["limits"] = limits
    return {
        "name": "istio-proxy",
        "image": PROXY_IMAGE,
        "args": ["proxy", "sidecar"],
        "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
        "resources": resources,
    }


def inject(pod: dict[str, Any]) -> None:
    """Mutate a pod as the injection webhook does: init container, proxy container, labels, status."""
    meta, spec = pod["metadata"], pod["spec"]
    annotations = meta.setdefault("annotations", {})
    spec["initContainers"] = [*spec.get("initContainers", []),
                              {"name": "istio-init", "image": PROXY_IMAGE, "args": ["istio-iptables"]}]
    spec["containers"] = [*spec["containers"], proxy_container(annotations)]
    labels = meta.setdefault("labels", {})
    labels.setdefault("security.istio.io/tlsMode", "istio")
    labels.setdefault("service.istio.io/canonical-name", labels.get("app", meta.get("name", "")))
    annotations["sidecar.istio.io/status"] = json.dumps(
        {"initContainers": ["istio-init"], "containers": ["istio-proxy"], "revision": "default"})
