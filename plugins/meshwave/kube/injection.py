"""Sidecar injection: Istio's decision for a new pod (`injection_applies`), the injectors a cluster serves
(`Injectors`), and the label writes that inject and remove a sidecar (`ensure_injected`, `remove_injection`),
with the namespace label meshwave changed recorded for the rollback. The writes are mixed into `MeshKube`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from meshwave.changes import ApiRequest, Change
from meshwave.gitops import revert_note
from meshwave.kube.state import WorkloadState, _meta
from meshwave.kube.validation import validate_name
from meshwave.kube_errors import InjectionBlocked

INJECT_LABEL = "sidecar.istio.io/inject"
NS_INJECT_LABEL = "istio-injection"
REV_LABEL = "istio.io/rev"
MERGE_PATCH = "application/merge-patch+json"
# Istio's injection webhooks (one per revision, one per tag) and the labels that name them.
INJECTOR_SELECTOR = "app=sidecar-injector"
TAG_LABEL = "istio.io/tag"
DEACTIVATED = "istio.io/deactivated"
DEFAULT_REVISION = "default"
# Set with a namespace label meshwave adds: JSON of the labels it changed as they were before (null: absent).
LABEL_BEFORE_ANNOTATION = "meshwave.io/injection-label-before"


def injection_applies(ns_labels: dict[str, str], pod_labels: dict[str, str],
                      injectors: Collection[str] | None = None) -> bool:
    """Istio's decision for a new pod, as its webhooks' selectors make it.

    Either label saying no wins; `istio-injection=enabled` (the default injector) beats a namespace
    `istio.io/rev`, which beats the pod's labels; a pod `istio.io/rev` beats `sidecar.istio.io/inject=true`
    (the default injector skips pods with a revision). A revision injects only if the cluster serves it:
    `injectors` are the revisions and tags with a webhook ("default" for the default injector), None when
    unknown (every label is then taken to work).
    """
    pod_flag, ns_flag = pod_labels.get(INJECT_LABEL), ns_labels.get(NS_INJECT_LABEL)
    if pod_flag == "false" or ns_flag == "disabled":
        return False
    if ns_flag == "enabled":
        revision: str | None = DEFAULT_REVISION
    elif REV_LABEL in ns_labels:
        revision = ns_labels[REV_LABEL]
    elif REV_LABEL in pod_labels:
        revision = pod_labels[REV_LABEL]
    else:
        revision = DEFAULT_REVISION if pod_flag == "true" else None
    return revision is not None and (injectors is None or revision in injectors)


@dataclass(frozen=True)
class Injectors:
    """The sidecar injectors a cluster serves: Istio's mutating webhooks labelled app=sidecar-injector.

    `revisions` from their istio.io/rev labels ("default" for a default install, which older releases leave
    unlabelled), `tags` from istio.io/tag (a tag webhook points at a revision: `istio.io/rev=<tag>` works too).
    """

    revisions: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()

    @property
    def default(self) -> bool:
        """Whether `istio-injection=enabled` and `sidecar.istio.io/inject=true` inject anything."""
        return DEFAULT_REVISION in self.revisions | self.tags

    @property
    def names(self) -> frozenset[str]:
        """Every value of an `istio.io/rev` label that some webhook answers."""
        return self.revisions | self.tags

    @classmethod
    def from_webhooks(cls, webhooks: list[dict[str, Any]]) -> Injectors:
        revisions, tags = set(), set()
        for webhook in webhooks:
            labels = _meta(webhook).get("labels") or {}
            if _deactivated(webhook):
                continue
            if TAG_LABEL in labels:
                tags.add(labels[TAG_LABEL])
            else:
                revisions.add(labels.get(REV_LABEL) or DEFAULT_REVISION)
        return cls(frozenset(revisions), frozenset(tags))

    def choose(self, cluster: str, target: str) -> str:
        """The revision to inject with when the plan names none: the default, else the only revision."""
        if self.default:
            return DEFAULT_REVISION
        if len(self.revisions) == 1:
            return next(iter(self.revisions))
        found = (f"several revisions ({', '.join(sorted(self.revisions))}) and no default"
                 if self.revisions else f"no sidecar injector (no mutatingwebhookconfiguration {INJECTOR_SELECTOR})")
        raise InjectionBlocked(
            f"cluster {cluster}: {found}: meshwave cannot tell which revision should inject {target}. Set "
            f"clusters.{cluster}.revision in the plan to the revision (or tag) to inject with.",
            cluster=cluster, verb="PATCH", target=target)


def _deactivated(configuration: dict[str, Any]) -> bool:
    """Webhooks `istioctl tag set default` switched off (selectors that never match) without deleting them."""
    hooks = configuration.get("webhooks") or []
    return bool(hooks) and all(DEACTIVATED in ((h.get(s) or {}).get("matchLabels") or {})
                               for h in hooks for s in ("namespaceSelector", "objectSelector"))


def _recorded_labels(text: str | None) -> dict[str, str | None] | None:
    """The annotation LABEL_BEFORE_ANNOTATION as {label: value or None}, None when it is not that."""
    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    ok = isinstance(value, dict) and all(isinstance(v, str | None) for v in value.values())
    return value if ok else None


def _shown(labels: dict[str, str | None]) -> str:
    return ", ".join(f"{k}={v}" if v is not None else f"{k} absent" for k, v in sorted(labels.items()))


def _kept_reason(ns: str, now: dict[str, str | None], meshed: list[str], neighbours: list[WorkloadState]) -> str:
    """Why the namespace label stays, and who gets a sidecar from it at their next deploy."""
    pending = sorted(x.name for x in neighbours if not x.pods_with_proxy and x.template_labels.get(INJECT_LABEL)
                     != "false")
    return (f"namespace {ns} keeps {_shown(now)}: {', '.join(meshed)} still run sidecars; "
            + (f"{', '.join(pending)} will get a sidecar on their next deploy (no pod label "
               f"{INJECT_LABEL}=false)" if pending else "no other workload gets a sidecar from it"))


class Injection:
    """Sidecar injection on a cluster's workloads and namespaces (part of MeshKube)."""

    def _injectable(self, ns: str, name: str) -> dict[str, str]:
        """The namespace's labels, when they let a pod label inject (InjectionBlocked when they disable it)."""
        ns_labels = _meta(self.namespace(ns)).get("labels") or {}
        if ns_labels.get(NS_INJECT_LABEL) == "disabled":
            raise InjectionBlocked(
                f"cluster {self.cluster}: namespace {ns} is labelled {NS_INJECT_LABEL}=disabled, which beats the pod "
                f"label {INJECT_LABEL}=true: deployment {ns}/{name} would get no sidecar. Change the namespace label "
                f"first (it affects every workload in {ns}).",
                cluster=self.cluster, verb="PATCH", target=f"deployment {ns}/{name}")
        return ns_labels

    def ensure_injected(self, ns: str, name: str, mode: Literal["workload", "namespace"]) -> list[Change]:
        """Workload mode: a pod template label. Namespace mode: label the namespace, then restart.

        The label is `sidecar.istio.io/inject=true` (namespace `istio-injection=enabled`) when the default
        injector injects, else `istio.io/rev=<revision>`; a namespace with `istio.io/rev` keeps its revision.
        Writes nothing when every pod already has a proxy; restarts once when the labels are right but pods
        lack proxies and no rollout is in progress; raises InjectionBlocked if the namespace disables injection
        or the revision to inject with cannot be told.
        """
        if mode not in ("workload", "namespace"):
            raise ValueError(f"mode must be 'workload' or 'namespace', not {mode!r}")
        validate_name(ns, "namespace")
        validate_name(name, "workload")
        ns_labels = self._injectable(ns, name)
        w = self.workload(ns, name)
        if mode == "workload":
            return [self._inject_workload(w, ns_labels)]
        return self._inject_namespace(w, self.namespace(ns))

    def injectors(self) -> Injectors:
        """The revisions and tags Istio's injection webhooks serve on this cluster (one cluster-wide LIST)."""
        found = self._call("LIST", f"mutatingwebhookconfigurations ({INJECTOR_SELECTOR})",
                           self.admission.list_mutating_webhook_configuration, label_selector=INJECTOR_SELECTOR)
        return Injectors.from_webhooks(found.get("items", []))

    def _revision_for(self, target: str) -> tuple[str, frozenset[str] | None]:
        """(the revision new sidecars come from, the injectors found or None): the plan's revision wins, and
        then nothing is listed (no webhook read permission needed)."""
        if self.revision is not None:
            return self.revision, None
        found = self.injectors()
        return found.choose(self.cluster, target), found.names

    @staticmethod
    def _namespace_injects(ns_labels: dict[str, str]) -> bool:
        """The namespace picks the injector: the default one, or the revision in its istio.io/rev."""
        return ns_labels.get(NS_INJECT_LABEL) == "enabled" or REV_LABEL in ns_labels

    def _injection_labels(self, template_labels: dict[str, str], ns_labels: dict[str, str],
                          target: str) -> tuple[dict[str, str | None], frozenset[str] | None]:
        """(the pod template labels that inject a sidecar, a None value dropping that label; the injectors found, or
        None when none were listed)."""
        injectors: frozenset[str] | None = None
        wanted: dict[str, str | None] = {INJECT_LABEL: "true"}  # works with whichever injector the namespace picks
        if not self._namespace_injects(ns_labels):
            revision, injectors = self._revision_for(target)
            if revision != DEFAULT_REVISION:
                # The default injector skips a pod with istio.io/rev; inject=false would beat it: drop that.
                wanted = {REV_LABEL: revision, **({INJECT_LABEL: None} if template_labels.get(INJECT_LABEL) ==
                                                  "false" else {})}
        return wanted, injectors

    def _inject_workload(self, w: WorkloadState, ns_labels: dict[str, str]) -> Change:
        wanted, injectors = self._injection_labels(w.template_labels, ns_labels, f"deployment {w.namespace}/{w.name}")
        if all(w.template_labels.get(k) == v for k, v in wanted.items()):
            return self._restart_if_needed(w, True, "already injected")
        if w.pods_total == w.pods_with_proxy and injection_applies(ns_labels, w.template_labels, injectors):
            return self._noop("label-workload", f"deployment {w.namespace}/{w.name}",
                              {k: w.template_labels.get(k) for k in wanted},
                              "already injected (by the namespace or revision label)")
        shown = ", ".join(f"{k}={v}" if v is not None else f"{k} removed" for k, v in wanted.items())
        return self._patch_template(w, "label-workload", f"pod template label {shown}; the template change rolls "
                                    "the pods", labels=wanted)

    def _inject_namespace(self, w: WorkloadState, namespace: dict[str, Any]) -> list[Change]:
        ns, ns_labels = w.namespace, _meta(namespace).get("labels") or {}
        if ns_labels.get(NS_INJECT_LABEL) == "enabled":
            first = self._noop("label-namespace", f"namespace {ns}", {NS_INJECT_LABEL: "enabled"},
                               f"already labelled {NS_INJECT_LABEL}=enabled")
        elif REV_LABEL in ns_labels:
            # Adding istio-injection would win over the revision: every pod of the namespace would move to the
            # default injector at its next restart, or get no sidecar on a mesh without one.
            first = self._noop("label-namespace", f"namespace {ns}", {REV_LABEL: ns_labels[REV_LABEL]},
                               f"already injects with revision {ns_labels[REV_LABEL]} ({REV_LABEL}); "
                               f"{NS_INJECT_LABEL} not added")
        else:
            revision, _ = self._revision_for(f"namespace {ns}")
            label = {NS_INJECT_LABEL: "enabled"} if revision == DEFAULT_REVISION else {REV_LABEL: revision}
            first = self._label_namespace(namespace, label, [d for d in self._deployment_names(ns) if d != w.name])
        if w.template_labels.get(INJECT_LABEL) == "false":
            # The pod label "false" (e.g. an earlier rollback) beats the namespace label: drop it.
            return [first, self._patch_template(w, "label-workload", f"removed pod template label {INJECT_LABEL}="
                                                "false so the namespace label applies; the template change rolls "
                                                "the pods", labels={INJECT_LABEL: None})]
        return [first, self._restart_if_needed(w, True, "already injected")]

    def _label_namespace(self, namespace: dict[str, Any], label: dict[str, str], others: list[str]) -> Change:
        """The namespace label, and in the same patch what the label was (for remove_injection to put back)."""
        meta = _meta(namespace)
        ns, labels = meta["name"], meta.get("labels") or {}
        before = {k: labels.get(k) for k in label}
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion"), "labels": label,
                             "annotations": {LABEL_BEFORE_ANNOTATION: json.dumps(before, sort_keys=True)}}}
        shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
        [(key, value)] = label.items()
        reason = (f"namespace {ns} labelled {key}={value}: EVERY workload in it gets a sidecar on its next restart"
                  + (f" (also {shown})" if others else "") + f"; the label before is kept in annotation "
                  f"{LABEL_BEFORE_ANNOTATION} for the rollback")
        change = Change(self.cluster, "label-namespace", f"namespace {ns}", before, dict(label),
                        ApiRequest("PATCH", f"/api/v1/namespaces/{ns}", MERGE_PATCH, body), reason=reason)
        call = functools.partial(self._call, "PATCH", f"namespace {ns}", self.core.patch_namespace, ns, body,
                                 _content_type=MERGE_PATCH)
        return self._send(change, call)

    def remove_injection(self, ns: str, name: str) -> list[Change]:
        """Rollback: pod label sidecar.istio.io/inject=false (beats the namespace and revision labels) and new
        pods; then, if meshwave labelled the namespace, its label as it was unless another workload is meshed."""
        w = self.workload(ns, name)
        if w.template_labels.get(INJECT_LABEL) != "false":
            changes = [self._patch_template(w, "remove-injection", f"pod template label {INJECT_LABEL}=false (beats "
                                            "the namespace label); the template change rolls the pods"
                                            + revert_note(w.reverted_by), labels={INJECT_LABEL: "false"})]
        else:
            changes = [self._restart_if_needed(w, False, "injection already removed")]
        namespace = self.namespace(ns)
        if LABEL_BEFORE_ANNOTATION in (_meta(namespace).get("annotations") or {}):
            changes.append(self._restore_namespace(namespace, name))
        return changes

    def _restore_namespace(self, namespace: dict[str, Any], rolled_back: str) -> Change:
        """The namespace labels meshwave changed, back to their recorded values, and the record dropped; a no-op
        while another Deployment of the namespace runs an istio-proxy (meshwave meshed it: the label stays)."""
        meta = _meta(namespace)
        ns, target = meta["name"], f"namespace {meta['name']}"
        recorded = _recorded_labels((meta.get("annotations") or {}).get(LABEL_BEFORE_ANNOTATION))
        if recorded is None:
            return self._noop("restore-namespace-label", target, None, f"annotation {LABEL_BEFORE_ANNOTATION} is not "
                              "a JSON object of label values: restore the namespace label by hand")
        now = {k: (meta.get("labels") or {}).get(k) for k in recorded}
        neighbours = [x for x in self.workloads_in(ns) if x.name != rolled_back]
        meshed = sorted(x.name for x in neighbours if x.pods_with_proxy)
        if meshed:
            return self._noop("restore-namespace-label", target, now, _kept_reason(ns, now, meshed, neighbours))
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion"), "labels": recorded,
                             "annotations": {LABEL_BEFORE_ANNOTATION: None}}}  # merge patch: null deletes
        change = Change(self.cluster, "restore-namespace-label", target, now, recorded,
                        ApiRequest("PATCH", f"/api/v1/namespaces/{ns}", MERGE_PATCH, body),
                        reason=f"namespace {ns} labels back to {_shown(recorded)}, as before meshwave labelled it: no "
                               "other workload in it runs a sidecar")
        call = functools.partial(self._call, "PATCH", target, self.core.patch_namespace, ns, body,
                                 _content_type=MERGE_PATCH)
        return self._send(change, call)
