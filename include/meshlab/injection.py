"""Pod admission as a real cluster does it: Istio's sidecar injector, metrics merging, image digest pinning.

The injector is driven by the MutatingWebhookConfigurations Istio installs (istio/istio
manifests/charts/istio-control/istio-discovery/templates/mutatingwebhook.yaml and revision-tags-mwc.yaml):
the API server calls the first webhook whose namespaceSelector and objectSelector match, in the order of the
configurations' names, and the injector then decides from the pod's own label (pkg/kube/inject/inject.go
injectRequired). So:

- the default injector (an unrevisioned install, or the revision the `default` tag points to) handles
  `istio-injection=enabled` namespaces, `istio.io/rev=default` namespaces and pods, and `sidecar.istio.io/inject=true`
  pods without `istio.io/rev` in namespaces with neither label;
- revision `<rev>` handles `istio.io/rev=<rev>` namespaces (without `istio-injection`) and `istio.io/rev=<rev>`
  pods in namespaces with neither label;
- a revision-only install (no default revision, no `default` tag) injects nothing for `sidecar.istio.io/inject=true`
  alone or for `istio-injection=enabled`;
- `sidecar.istio.io/inject=false` (label, or the deprecated annotation when no label) always wins.

Since Istio 1.11 the injector no longer labels pods `istio.io/rev` (istio/istio#33447, a tag would be overwritten);
it records the revision in the `sidecar.istio.io/status` annotation and, since 1.18 (#44161), in an `istio.io/rev`
annotation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PROXY_IMAGE = "docker.io/istio/proxyv2:1.24.0"
# Istio's install default, values.global.proxy.resources (manifests/charts/istio-control/istio-discovery/values.yaml).
PROXY_DEFAULTS = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2000m", "memory": "1024Mi"}}
DEFAULT_REVISION = "default"
REV_LABEL = "istio.io/rev"
INJECT_LABEL = "sidecar.istio.io/inject"
NS_INJECT_LABEL = "istio-injection"
STATUS_ANNOTATION = "sidecar.istio.io/status"
STATUS_PORT = "15020"  # the agent's port that serves merged metrics
# Namespaces the injector never touches (pkg/kube/inject IgnoredNamespaces).
IGNORED_NAMESPACES = frozenset({"kube-system", "kube-public"})
# What `istioctl tag set default` puts on the unrevisioned install's webhooks to switch them off without deleting them.
NEVER_MATCH = {"matchLabels": {"istio.io/deactivated": "never-match"}}
_PROMETHEUS_KEYS = ("prometheus.io/scrape", "prometheus.io/path", "prometheus.io/port")

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


# ---- the webhook configurations Istio installs ------------------------------------------------------
def _expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    expr: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        expr["values"] = list(values)
    return expr


def _webhook(prefix: str, revision: str, root_namespace: str, namespace_selector: dict[str, Any],
             object_selector: dict[str, Any]) -> dict[str, Any]:
    """One webhook entry, with the fields the API server defaults (matchPolicy, timeoutSeconds, scope)."""
    service = "istiod" if revision == DEFAULT_REVISION else f"istiod-{revision}"
    return {
        "name": f"{prefix}sidecar-injector.istio.io",
        "clientConfig": {"service": {"name": service, "namespace": root_namespace, "path": "/inject", "port": 443}},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                   "scope": "*"}],
        "failurePolicy": "Fail", "matchPolicy": "Equivalent", "sideEffects": "None", "timeoutSeconds": 10,
        "reinvocationPolicy": "Never", "admissionReviewVersions": ["v1"],
        "namespaceSelector": namespace_selector, "objectSelector": object_selector,
    }


def _revision_webhooks(tag: str, revision: str, root: str) -> list[dict[str, Any]]:
    """rev.namespace. and rev.object.: namespaces and pods labelled istio.io/rev=<tag>."""
    not_disabled = _expr(INJECT_LABEL, "NotIn", "false")
    return [
        _webhook("rev.namespace.", revision, root,
                 {"matchExpressions": [_expr(REV_LABEL, "In", tag), _expr(NS_INJECT_LABEL, "DoesNotExist")]},
                 {"matchExpressions": [not_disabled]}),
        _webhook("rev.object.", revision, root,
                 {"matchExpressions": [_expr(REV_LABEL, "DoesNotExist"), _expr(NS_INJECT_LABEL, "DoesNotExist")]},
                 {"matchExpressions": [not_disabled, _expr(REV_LABEL, "In", tag)]}),
    ]


def _default_webhooks(revision: str, root: str) -> list[dict[str, Any]]:
    """namespace. and object.: istio-injection=enabled namespaces, sidecar.istio.io/inject=true pods."""
    return [
        _webhook("namespace.", revision, root, {"matchExpressions": [_expr(NS_INJECT_LABEL, "In", "enabled")]},
                 {"matchExpressions": [_expr(INJECT_LABEL, "NotIn", "false")]}),
        _webhook("object.", revision, root,
                 {"matchExpressions": [_expr(NS_INJECT_LABEL, "DoesNotExist"), _expr(REV_LABEL, "DoesNotExist")]},
                 {"matchExpressions": [_expr(INJECT_LABEL, "In", "true"), _expr(REV_LABEL, "DoesNotExist")]}),
    ]


def _configuration(name: str, labels: dict[str, str], webhooks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name, "labels": {**labels, "operator.istio.io/component": "Pilot",
                                                  "release": "istio"}},
            "webhooks": webhooks}


def webhook_configurations(revisions: Iterable[str], default_revision: str | None,
                           root_namespace: str = "istio-system") -> list[dict[str, Any]]:
    """The MutatingWebhookConfigurations of an install with these revisions and this `default` tag."""
    result = []
    for rev in revisions:
        labels = {"app": "sidecar-injector", REV_LABEL: rev}
        if rev != DEFAULT_REVISION:
            result.append(_configuration(f"istio-sidecar-injector-{rev}", labels,
                                         _revision_webhooks(rev, rev, root_namespace)))
            continue
        webhooks = _revision_webhooks(rev, rev, root_namespace) + _default_webhooks(rev, root_namespace)
        if default_revision != DEFAULT_REVISION:  # the default tag moved away: istioctl neuters these webhooks
            webhooks = [{**w, "namespaceSelector": copy.deepcopy(NEVER_MATCH),
                         "objectSelector": copy.deepcopy(NEVER_MATCH)} for w in webhooks]
        result.append(_configuration("istio-sidecar-injector", labels, webhooks))
    if default_revision is not None and default_revision != DEFAULT_REVISION:
        labels = {"app": "sidecar-injector", REV_LABEL: default_revision, "istio.io/tag": DEFAULT_REVISION}
        webhooks = (_revision_webhooks(DEFAULT_REVISION, default_revision, root_namespace)
                    + _default_webhooks(default_revision, root_namespace))
        result.append(_configuration("istio-revision-tag-default", labels, webhooks))
    return result


def default_revision_for(revisions: Iterable[str]) -> str | None:
    """The `default` tag when none is given: the unrevisioned install if there is one, else none."""
    return DEFAULT_REVISION if DEFAULT_REVISION in revisions else None


# ---- the API server's side: which webhook is called -----------------------------------------------
def _requirement_holds(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or []
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    return False


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics: matchLabels and matchExpressions all hold; an empty selector matches all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(_requirement_holds(e, labels) for e in selector.get("matchExpressions") or [])


def called_revision(configurations: Iterable[Mapping[str, Any]], ns_labels: Mapping[str, str],
                    pod_labels: Mapping[str, str]) -> str | None:
    """The revision whose injector the API server calls first for a new pod (configurations in name order)."""
    for mwc in sorted(configurations, key=lambda c: c["metadata"]["name"]):
        if (mwc["metadata"].get("labels") or {}).get("app") != "sidecar-injector":
            continue
        for hook in mwc.get("webhooks") or []:
            if selector_matches(hook.get("namespaceSelector"), ns_labels) and \
                    selector_matches(hook.get("objectSelector"), pod_labels):
                return (mwc["metadata"].get("labels") or {}).get(REV_LABEL, DEFAULT_REVISION)
    return None


def injector_agrees(namespace: str, pod_labels: Mapping[str, str], pod_annotations: Mapping[str, str],
                    host_network: bool = False) -> bool:
    """Istio's injectRequired once called: the label (else the deprecated annotation) 'false' refuses."""
    if host_network or namespace in IGNORED_NAMESPACES or STATUS_ANNOTATION in pod_annotations:
        return False
    flag = pod_labels.get(INJECT_LABEL, pod_annotations.get(INJECT_LABEL, ""))
    return flag != "false"


def injection_applies(ns_labels: dict[str, str], pod_labels: dict[str, str], pod_annotations: dict[str, str],
                      revisions: list[str], default_revision: str | None = DEFAULT_REVISION) -> bool:
    """Whether an install with these revisions and this `default` tag injects a new pod ("default" when "default"
    is not among the revisions is no tag at all: a revision-only install)."""
    configurations = webhook_configurations(revisions, default_revision)
    return called_revision(configurations, ns_labels, pod_labels) is not None and \
        injector_agrees("", pod_labels, pod_annotations)


# ---- what the injector and the other admission webhooks do to the pod -------------------------------
def excluded_ports(annotations: dict[str, str], direction: str) -> set[int]:
    """Ports in traffic.sidecar.istio.io/exclude{Inbound,Outbound}Ports."""
    raw = annotations.get(f"traffic.sidecar.istio.io/exclude{direction}Ports", "")
    return {int(p) for p in raw.replace(" ", "").split(",") if p.isdigit()}


PROXY_ANNOTATIONS = {"sidecar.istio.io/proxyCPU": ("requests", "cpu"),
                     "sidecar.istio.io/proxyMemory": ("requests", "memory"),
                     "sidecar.istio.io/proxyCPULimit": ("limits", "cpu"),
                     "sidecar.istio.io/proxyMemoryLimit": ("limits", "memory")}


def proxy_resources(annotations: Mapping[str, str], template: Mapping[str, Mapping[str, str]] | None = None
                    ) -> dict[str, dict[str, str]]:
    """The injection template's `resources` (injection-template.yaml, define "resources"): any of the four
    sidecar.istio.io/proxy* annotations and only what they say (a request without its limit has no limit);
    none, and values.global.proxy.resources as a whole."""
    if any(key in annotations for key in PROXY_ANNOTATIONS):
        resources: dict[str, dict[str, str]] = {}
        for key, (kind, name) in PROXY_ANNOTATIONS.items():
            if key in annotations:
                resources.setdefault(kind, {})[name] = annotations[key]
        return resources
    template = PROXY_DEFAULTS if template is None else template
    return {kind: dict(values) for kind, values in template.items() if values}


def proxy_container(annotations: dict[str, str], template: Mapping[str, Mapping[str, str]] | None = None
                    ) -> dict[str, Any]:
    """The istio-proxy container, sized as the injection template sizes it."""
    container: dict[str, Any] = {
        "name": "istio-proxy",
        "image": PROXY_IMAGE,
        "args": ["proxy", "sidecar"],
        "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
    }
    resources = proxy_resources(annotations, template)
    if resources:
        container["resources"] = resources
    return container


def inject(pod: dict[str, Any], revision: str = DEFAULT_REVISION, metrics_merge: bool = False,
           template: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Mutate a pod as the injection webhook does: init container, proxy container, labels, annotations. Both
    containers get the template's resources (istio-init too: `{{ template "resources" . }}`)."""
    meta, spec = pod["metadata"], pod["spec"]
    annotations = meta.setdefault("annotations", {})
    init: dict[str, Any] = {"name": "istio-init", "image": PROXY_IMAGE, "args": ["istio-iptables"]}
    if resources := proxy_resources(annotations, template):
        init["resources"] = resources
    spec["initContainers"] = [*spec.get("initContainers", []), init]
    spec["containers"] = [*spec["containers"], proxy_container(annotations, template)]
    labels = meta.setdefault("labels", {})
    labels.setdefault("security.istio.io/tlsMode", "istio")
    labels.setdefault("service.istio.io/canonical-name", labels.get("app", meta.get("name", "")))
    labels.setdefault("service.istio.io/canonical-revision", labels.get("version", "latest"))
    annotations[REV_LABEL] = revision
    annotations[STATUS_ANNOTATION] = json.dumps(
        {"initContainers": ["istio-init"], "containers": ["istio-proxy"], "revision": revision})
    if metrics_merge:
        merge_metrics(pod)


def merge_metrics(pod: dict[str, Any]) -> None:
    """Istio's metrics merging (applyPrometheusMerge): the pod's prometheus.io annotations move into the proxy's
    ISTIO_PROMETHEUS_ANNOTATIONS and now point at the agent, which serves app and Envoy metrics on :15020."""
    annotations = pod["metadata"].setdefault("annotations", {})
    if annotations.get("prometheus.io/scrape", "true").lower() in ("false", "0", "f") or \
            annotations.get("prometheus.istio.io/merge-metrics", "true").lower() in ("false", "0", "f"):
        return
    if annotations.get("prometheus.io/port") == STATUS_PORT:  # merged already (or the user points at the agent)
        return
    scrape = {"scrape": annotations.get("prometheus.io/scrape", ""), "path": annotations.get("prometheus.io/path", ""),
              "port": annotations.get("prometheus.io/port", "")}
    proxy = next((c for c in pod["spec"]["containers"] if c.get("name") == "istio-proxy"), None)
    if proxy is not None and any(scrape.values()):  # Go's json.Marshal: no spaces, field order scrape/path/port
        proxy.setdefault("env", []).append({"name": "ISTIO_PROMETHEUS_ANNOTATIONS",
                                            "value": json.dumps(scrape, separators=(",", ":"))})
    for key in _PROMETHEUS_KEYS:
        annotations.pop(key, None)
    annotations.update({"prometheus.io/port": STATUS_PORT, "prometheus.io/path": "/stats/prometheus",
                        "prometheus.io/scrape": "true"})


def injector_config_map(revision: str, root_namespace: str,
                        proxy_resources: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """The injector's ConfigMap as istiod reads it: `values` is the install's values as JSON (global.proxy.resources
    among them), `config` the templates (here only the policy line: the lab injects in code)."""
    name = "istio-sidecar-injector" if revision == DEFAULT_REVISION else f"istio-sidecar-injector-{revision}"
    values = {"global": {"proxy": {"resources": proxy_resources if proxy_resources is not None else PROXY_DEFAULTS}},
              "revision": "" if revision == DEFAULT_REVISION else revision}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": root_namespace,
                         "labels": {"app": "sidecar-injector", "istio.io/rev": revision, "release": "istio"}},
            "data": {"values": json.dumps(values, indent=2),
                     "config": "defaultTemplates: [sidecar]\npolicy: enabled\n"}}


def image_digest(image: str) -> str:
    """The digest a registry would answer for an image reference (deterministic: the lab has no registry)."""
    return hashlib.sha256(image.encode()).hexdigest()


def pin_digests(pod: dict[str, Any]) -> None:
    """An image-pinning admission webhook: every container image becomes `repo:tag@sha256:<digest>`."""
    for field in ("initContainers", "containers"):
        for container in pod["spec"].get(field) or []:
            image = container.get("image")
            if isinstance(image, str) and image and "@sha256:" not in image:
                container["image"] = f"{image}@sha256:{image_digest(image)}"


@dataclass(frozen=True)
class Admission:
    """One cluster's mutating admission chain for new pods: Istio's injector, then an image pinner."""

    metrics_merge: bool = False
    image_digest: bool = False
    proxy_resources: Mapping[str, Mapping[str, str]] | None = None  # values.global.proxy.resources (None: Istio's)

    def admit(self, body: Any, namespace: str, ns_labels: Mapping[str, str],
              configurations: Iterable[Mapping[str, Any]]) -> Any:
        """The pod as the webhooks leave it; a body that is not a pod object is left for validation to refuse."""
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict) or \
                not isinstance(body.get("spec"), dict) or not isinstance(body["spec"].get("containers"), list):
            return body
        meta = body.get("metadata") or {}
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        if not isinstance(labels, dict) or not isinstance(annotations, dict):
            return body
        revision = called_revision(configurations, ns_labels, labels)
        if revision is not None and not injector_agrees(namespace, labels, annotations,
                                                        bool(body["spec"].get("hostNetwork"))):
            revision = None
        if revision is None and not self.image_digest:
            return body  # nothing to change: no copy (a fleet's start creates thousands of pods)
        pod = copy.deepcopy(body)
        pod.setdefault("metadata", {})
        if revision is not None:
            inject(pod, revision, self.metrics_merge, self.proxy_resources)
        if self.image_digest:
            pin_digests(pod)
        return pod
