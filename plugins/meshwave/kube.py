"""The Kubernetes and Istio side of meshwave, on a kubernetes-client `ApiClient` (no Airflow imports).

Airflow tasks build it from `KubernetesHook(conn_id).api_client`, tests from
`kubernetes.config.new_client_from_config(config_file=...)`. Every write checks before it writes (a retried
or cleared task is safe), returns a `Change` for the ledger, and honours `dry_run`. Every API failure is a
`KubeError` naming the cluster, the verb, the object and the API's own Status message.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Literal

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity

from meshwave import canary
from meshwave.changes import ApiRequest, Change, utc_now
from meshwave.gitops import revert_note, reverted_by
from meshwave.kube_errors import (  # noqa: F401 (re-exported: callers catch them from here too)
    AccessDenied,
    ClusterUnreachable,
    Conflict,
    InjectionBlocked,
    KubeError,
    NotFound,
    Rejected,
    ServerError,
    WorkloadNotFound,
)
from meshwave.lease import Leases
from meshwave.names import rfc1123_label
from meshwave.peer_auth import PeerAuthentications
from meshwave.pending import PENDING_ANNOTATION, Pending

PROXY = "istio-proxy"
INJECT_LABEL = "sidecar.istio.io/inject"
NS_INJECT_LABEL = "istio-injection"
REV_LABEL = "istio.io/rev"
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
MERGE_PATCH = "application/merge-patch+json"
FAILING = ("OOMKilled", "Error", "CrashLoopBackOff")  # most specific first
STARTING = ("ContainerCreating", "PodInitializing")
# A rollout is followed as `kubectl rollout status` does: the ReplicaSet at the Deployment's revision, and its
# pods by hash. Comparing pods with the template fails on real clusters (metrics merging, digest-pinned images).
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
POD_TEMPLATE_HASH = "pod-template-hash"
# Istio's injection webhooks (one per revision, one per tag) and the labels that name them.
INJECTOR_SELECTOR = "app=sidecar-injector"
TAG_LABEL = "istio.io/tag"
DEACTIVATED = "istio.io/deactivated"
DEFAULT_REVISION = "default"
# Set with a namespace label meshwave adds: JSON of the labels it changed as they were before (null: absent).
LABEL_BEFORE_ANNOTATION = "meshwave.io/injection-label-before"

_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# ---- errors (kube_errors.py; the names are kept importable from here) -------------------------------
_BY_CODE: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 401: AccessDenied, 403: AccessDenied,
                                        400: Rejected, 415: Rejected, 422: Rejected}


def translate(exc: ApiException, cluster: str, verb: str, target: str, server: str = "") -> KubeError:
    """An ApiException as a KubeError, with the Status message and reason parsed from the body."""
    code = int(exc.status or 0)
    if code == 0:  # the client's own transport failures (SSL, bad parameters) come as status 0
        return ClusterUnreachable(f"cluster {cluster} ({server}): {verb} {target}: {exc.reason}",
                                  cluster=cluster, verb=verb, target=target, reason=str(exc.reason))
    status = _status_body(exc.body)
    reason = str(status.get("reason") or exc.reason or "")
    api_message = str(status.get("message") or exc.reason or "")
    kind = _BY_CODE.get(code, ServerError if code >= 500 else KubeError)
    if status.get("kind") != "Status" and code == 404:  # a proxy or a wrong URL, not "object not found"
        kind = ServerError
        api_message += f" (not a Kubernetes Status: is {server or 'the server'} an API server?)"
    return kind(f"cluster {cluster}: {verb} {target}: {code} {reason}: {api_message}", cluster=cluster, verb=verb,
                target=target, code=code, reason=reason, api_message=api_message)


def _status_body(body: Any) -> dict[str, Any]:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        return {"message": str(body)[:300]}
    return parsed if isinstance(parsed, dict) else {}


def unreachable_reason(exc: BaseException, timeout: tuple[float, float]) -> str:
    cause = getattr(exc, "reason", None) or exc  # MaxRetryError wraps the last attempt's error
    text = str(cause)
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2: test for refusal first
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(cause, urllib3.exceptions.NewConnectionError):
        return text.rsplit(": ", 1)[-1]
    if isinstance(cause, urllib3.exceptions.ConnectTimeoutError):
        return f"connect timed out after {timeout[0]:g}s"
    if isinstance(cause, urllib3.exceptions.ReadTimeoutError):
        return f"no answer within {timeout[1]:g}s"
    return text


# ---- validation -----------------------------------------------------------------------------------
def validate_name(value: Any, field_name: str) -> str:
    """An RFC 1123 label (namespace, workload), checked before any request is built."""
    return rfc1123_label(value, field_name)


def validate_labels(labels: Any, field_name: str) -> dict[str, str]:
    if not isinstance(labels, dict):
        raise ValueError(f"{field_name} must be a mapping of label names to values")
    for key, value in labels.items():
        prefix, _, name = str(key).rpartition("/") if "/" in str(key) else ("", "", str(key))
        key_ok = isinstance(key, str) and 0 < len(name) <= 63 and _LABEL_NAME.match(name) \
            and (not prefix or (len(prefix) <= 253 and _LABEL_PREFIX.match(prefix)))
        if not key_ok:
            raise ValueError(f"{field_name}: {key!r} is not a valid label name")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_NAME.match(value):
            raise ValueError(f"{field_name}: value {value!r} of {key} is not a valid label value")
    return dict(labels)


def _quantity(value: Any, field_name: str) -> Decimal:
    try:
        return parse_quantity(value)
    except (ValueError, TypeError):
        raise ValueError(f"{field_name} {value!r} is not a Kubernetes quantity (e.g. 100m, 128Mi)") from None


def _ports(ports: Iterable[int], field_name: str) -> str:
    values = sorted({int(p) for p in ports})
    bad = [p for p in values if not 0 < p < 65536]
    if bad:
        raise ValueError(f"{field_name}: ports out of range 1-65535: {bad}")
    return ",".join(str(p) for p in values)


# ---- observed state -------------------------------------------------------------------------------
@dataclass
class ContainerIssue:
    container: str
    reason: str  # OOMKilled / Error (last termination), CrashLoopBackOff, or another waiting reason
    restarts: int = 0
    waiting: str | None = None

    @property
    def failing(self) -> bool:
        return self.reason in FAILING

    def __str__(self) -> str:
        extra = [self.waiting] if self.waiting and self.waiting != self.reason else []
        extra += [f"{self.restarts} restarts"] if self.restarts else []
        return f"{self.container}: {self.reason}" + (f" ({', '.join(extra)})" if extra else "")


@dataclass
class PodState:
    name: str
    current: bool  # created from the deployment's current pod template
    ready: bool
    has_proxy: bool
    proxy_ready: bool
    phase: str = ""
    issues: list[ContainerIssue] = field(default_factory=list)

    def failure(self) -> ContainerIssue | None:
        failing = [i for i in self.issues if i.failing]
        return min(failing, key=lambda i: FAILING.index(i.reason)) if failing else None


@dataclass
class WorkloadState:
    cluster: str
    namespace: str
    name: str
    replicas: int
    generation: int = 0
    observed_generation: int = 0
    updated_replicas: int = 0
    ready_replicas: int = 0
    available_replicas: int = 0
    status_replicas: int = 0
    progressing_status: str | None = None
    progressing_reason: str | None = None
    template_labels: dict[str, str] = field(default_factory=dict)
    template_annotations: dict[str, str] = field(default_factory=dict)
    app_container: str | None = None
    memory_limit_bytes: int | None = None
    memory_request_bytes: int | None = None
    pods: list[PodState] = field(default_factory=list)
    resource_version: str | None = None
    replicaset: str | None = None  # the current ReplicaSet; None until the controller has created it
    reverted_by: str | None = None  # the GitOps tool that owns the Deployment (meshwave.gitops)

    @property
    def pods_total(self) -> int:
        return len(self.pods)

    @property
    def pods_ready(self) -> int:
        return sum(p.ready for p in self.pods)

    @property
    def pods_with_proxy(self) -> int:
        return sum(p.has_proxy for p in self.pods)

    @property
    def proxies_ready(self) -> int:
        return sum(p.proxy_ready for p in self.pods)

    @property
    def new_pods(self) -> list[PodState]:
        return [p for p in self.pods if p.current]

    @property
    def old_pods(self) -> list[PodState]:
        return [p for p in self.pods if not p.current]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pods_total": self.pods_total, "pods_ready": self.pods_ready,
                "pods_with_proxy": self.pods_with_proxy, "proxies_ready": self.proxies_ready}


@dataclass
class RolloutState:
    status: Literal["done", "failed", "progressing"]
    message: str
    replicas: int = 0
    updated: int = 0
    available: int = 0
    old_pods: int = 0
    with_proxy: int = 0
    proxies_ready: int = 0
    pod: str | None = None
    container: str | None = None
    reason: str | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        return cls(**data)


def assess_rollout(w: WorkloadState, expect_proxy: bool | None = True) -> RolloutState:
    """Done, failed (with the pod, container and reason) or progressing (with counts). Pure.

    The deployment is read as `kubectl rollout status` reads it; on top, a crashing pod of the current
    ReplicaSet or one with the wrong sidecar state fails the rollout at once.
    """
    counts = {"replicas": w.replicas, "updated": w.updated_replicas, "available": w.available_replicas,
              "old_pods": len(w.old_pods), "with_proxy": w.pods_with_proxy, "proxies_ready": w.proxies_ready}
    if w.observed_generation < w.generation:
        # Until the controller has seen the new template, the revision and ReplicaSet are the previous ones:
        # judging their pods would fail a rollback on the very crash it is undoing.
        return RolloutState("progressing", f"waiting for the deployment controller to observe generation "
                                           f"{w.generation} (observed {w.observed_generation})", **counts)
    if w.replicaset is None:
        return RolloutState("progressing", "waiting for the deployment controller to create the ReplicaSet of "
                                           "the current revision", **counts)
    failed = _new_pod_failure(w, expect_proxy, counts)
    if failed:
        return failed
    waiting = _waiting_for(w, expect_proxy)
    if waiting is None:
        return RolloutState("done", f"{w.replicas}/{w.replicas} pods updated and available"
                                    + (f", {w.proxies_ready} proxies ready" if expect_proxy else ""), **counts)
    return RolloutState("progressing", f"{waiting}: {w.updated_replicas}/{w.replicas} updated, "
                                       f"{w.available_replicas}/{w.replicas} available, {len(w.old_pods)} old pod(s) "
                                       f"left, {w.proxies_ready}/{w.pods_total} proxies ready", **counts)


def _new_pod_failure(w: WorkloadState, expect_proxy: bool | None, counts: dict[str, int]) -> RolloutState | None:
    """A crash of a current pod, the progress deadline, or a current pod with the wrong sidecar state."""
    for pod in w.new_pods:
        issue = pod.failure()
        if issue:
            return RolloutState("failed", f"pod {pod.name} of the new template: container {issue}", **counts,
                                pod=pod.name, container=issue.container, reason=issue.reason)
    if w.progressing_reason == "ProgressDeadlineExceeded":  # kubectl looks at the reason alone
        return RolloutState("failed", "the deployment exceeded its progress deadline (ProgressDeadlineExceeded)",
                            **counts, reason="ProgressDeadlineExceeded")
    if expect_proxy is not None:
        # Injection happens at pod creation: a new pod with the wrong sidecar state stays wrong.
        wrong = next((p for p in w.new_pods if p.has_proxy != expect_proxy), None)
        if wrong:
            what = "has no istio-proxy (injection did not apply)" if expect_proxy else "still has an istio-proxy"
            return RolloutState("failed", f"pod {wrong.name} of the new template {what}", **counts, pod=wrong.name,
                                container=PROXY, reason="ProxyMissing" if expect_proxy else "ProxyPresent")
    return None


def _waiting_for(w: WorkloadState, expect_proxy: bool | None) -> str | None:
    """What the rollout still waits for, in `kubectl rollout status` order, then for the pods themselves."""
    if w.updated_replicas < w.replicas:
        return f"{w.updated_replicas} out of {w.replicas} new replicas have been updated"
    if w.status_replicas > w.updated_replicas:
        return f"{w.status_replicas - w.updated_replicas} old replicas are pending termination"
    if w.available_replicas < w.updated_replicas:
        return f"{w.available_replicas} of {w.updated_replicas} updated replicas are available"
    if w.old_pods:
        # The status stops counting a terminating pod while it still serves, with its old sidecar state.
        return f"{len(w.old_pods)} old pod(s) still listed"
    if len(w.new_pods) != w.replicas:
        return f"{len(w.new_pods)} pod(s) of ReplicaSet {w.replicaset} listed, {w.replicas} wanted"
    if expect_proxy is True and w.proxies_ready < w.pods_total:
        return f"{w.proxies_ready}/{w.pods_total} proxies ready"
    return None


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def _bytes(value: Any) -> int | None:
    try:
        return int(parse_quantity(value)) if value is not None else None
    except (ValueError, TypeError):
        return None


def _container_issue(st: dict[str, Any]) -> ContainerIssue | None:
    state, last = st.get("state") or {}, st.get("lastState") or {}
    waiting = (state.get("waiting") or {}).get("reason")
    terminated = (state.get("terminated") or {}).get("reason") or (last.get("terminated") or {}).get("reason")
    restarts = int(st.get("restartCount") or 0)
    for reason in FAILING:
        if reason in (terminated, waiting):
            return ContainerIssue(st.get("name", "?"), reason, restarts, waiting)
    if waiting and waiting not in STARTING:
        return ContainerIssue(st.get("name", "?"), waiting, restarts, waiting)
    return None


def pod_state(pod: dict[str, Any], current: bool) -> PodState:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    statuses = (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or [])
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])  # native sidecars too
    issues = [i for i in map(_container_issue, statuses) if i]
    return PodState(
        name=_meta(pod).get("name", "?"), current=current,
        ready=any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []),
        has_proxy=any(c.get("name") == PROXY for c in containers),
        proxy_ready=any(s.get("name") == PROXY and s.get("ready") for s in statuses),
        phase=status.get("phase", ""), issues=issues)


def _controlled_by(obj: dict[str, Any], kind: str, uid: str | None) -> bool:
    """An ownerReference to this object: by uid, which a deleted and recreated owner of the same name lacks."""
    return bool(uid) and any(o.get("kind") == kind and o.get("uid") == uid
                             for o in _meta(obj).get("ownerReferences") or [])


def current_replicaset(deployment: dict[str, Any], replicasets: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Deployment's ReplicaSet at its `deployment.kubernetes.io/revision`, owned by it, as kubectl finds it.

    None until the controller has created it and recorded the revision on the Deployment.
    """
    meta = _meta(deployment)
    revision = (meta.get("annotations") or {}).get(REVISION_ANNOTATION)
    if revision is None:
        return None
    owned = [rs for rs in replicasets if _controlled_by(rs, "Deployment", meta.get("uid"))
             and (_meta(rs).get("annotations") or {}).get(REVISION_ANNOTATION) == revision]
    return max(owned, key=lambda rs: (_meta(rs).get("creationTimestamp") or "", _meta(rs).get("name", "")),
               default=None)


def replicaset_pods(replicaset: dict[str, Any], pods: list[dict[str, Any]]) -> set[str]:
    """Names of a ReplicaSet's pods: its pod-template-hash label, and an ownerReference to it."""
    meta = _meta(replicaset)
    selector = ((replicaset.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    pod_hash = (meta.get("labels") or {}).get(POD_TEMPLATE_HASH) or selector.get(POD_TEMPLATE_HASH)
    if not pod_hash:
        return set()
    return {_meta(p).get("name", "") for p in pods
            if (_meta(p).get("labels") or {}).get(POD_TEMPLATE_HASH) == pod_hash
            and _controlled_by(p, "ReplicaSet", meta.get("uid"))}


def workload_state(cluster: str, deployment: dict[str, Any], pods: list[dict[str, Any]],
                   replicasets: list[dict[str, Any]] | None = None) -> WorkloadState:
    """A WorkloadState from the API's deployment, pod and ReplicaSet objects (JSON dicts). Pure.

    Without the ReplicaSets no pod is current, and a rollout judged on the state is never done.
    """
    meta, spec, status = _meta(deployment), deployment.get("spec") or {}, deployment.get("status") or {}
    template = spec.get("template") or {}
    tmeta = template.get("metadata") or {}
    app = next((c for c in (template.get("spec") or {}).get("containers") or [] if c.get("name") != PROXY), {})
    resources = app.get("resources") or {}
    progressing = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {})
    replicaset = current_replicaset(deployment, replicasets or [])
    current = replicaset_pods(replicaset, pods) if replicaset else set()
    return WorkloadState(
        cluster=cluster, namespace=meta.get("namespace", ""), name=meta.get("name", ""),
        replicas=int(spec.get("replicas", 1)), generation=int(meta.get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        updated_replicas=int(status.get("updatedReplicas") or 0), ready_replicas=int(status.get("readyReplicas") or 0),
        available_replicas=int(status.get("availableReplicas") or 0), status_replicas=int(status.get("replicas") or 0),
        progressing_status=progressing.get("status"), progressing_reason=progressing.get("reason"),
        template_labels=dict(tmeta.get("labels") or {}), template_annotations=dict(tmeta.get("annotations") or {}),
        app_container=app.get("name"), memory_limit_bytes=_bytes((resources.get("limits") or {}).get("memory")),
        memory_request_bytes=_bytes((resources.get("requests") or {}).get("memory")),
        pods=[pod_state(p, _meta(p).get("name") in current) for p in pods],
        resource_version=meta.get("resourceVersion"),
        replicaset=_meta(replicaset).get("name") if replicaset else None, reverted_by=reverted_by(deployment))


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


def label_selector(selector: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], ",".join(expr.get("values") or [])
        parts.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key,
                      "DoesNotExist": f"!{key}"}[op])
    return ",".join(parts)


def _pending_of(deployment: dict[str, Any], cluster: str) -> Pending | None:
    meta = _meta(deployment)
    text = (meta.get("annotations") or {}).get(PENDING_ANNOTATION)
    if text is None:
        return None
    return Pending.from_annotation(text, f"cluster {cluster}: deployment {meta.get('namespace')}/{meta.get('name')}")


# The kubernetes client's urllib3 pool retries a GET, PUT or DELETE three more times after a read timeout, unseen:
# four read timeouts per call (a minute at 15 s) before the step hears of it. One quick retry is kept (a pooled
# connection the server just closed, a refused connect); waiting out an outage is Airflow's job, with backoff, and
# every step reads before it writes. No sleeping on a Retry-After: a 429 or 503 is the step's error, retried the same.
CLIENT_RETRIES = urllib3.util.Retry(total=1, redirect=0, status=0, respect_retry_after_header=False,
                                    raise_on_status=False)


def bound_retries(api_client: client.ApiClient) -> None:
    """Make the client's connection pools (those created from now on) retry as CLIENT_RETRIES says."""
    pools = getattr(getattr(api_client, "rest_client", None), "pool_manager", None)
    if pools is not None:
        pools.connection_pool_kw["retries"] = CLIENT_RETRIES


# ---- the cluster ----------------------------------------------------------------------------------
class MeshKube:
    """One cluster, through a kubernetes-client ApiClient."""

    def __init__(self, api_client: client.ApiClient, cluster: str, root_namespace: str = "istio-system",
                 dry_run: bool = False, *, connect_timeout: float = 3.0, read_timeout: float = 15.0,
                 revision: str | None = None) -> None:
        self.cluster = cluster
        # The plan's injection revision (clusters.<name>.revision); None: found from the injection webhooks.
        self.revision = None if revision is None else validate_name(revision, "revision")
        self.root_namespace = validate_name(root_namespace, "root_namespace")
        self.dry_run = dry_run
        self.server = getattr(api_client.configuration, "host", "")
        self.timeout = (connect_timeout, read_timeout)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.admission = client.AdmissionregistrationV1Api(api_client)
        self.api_client = api_client
        bound_retries(api_client)

    # ---- transport ---------------------------------------------------------------------------------
    def _call(self, verb: str, target: str, fn: Callable[..., Any], *args: Any,
              timeout: tuple[float, float] | None = None, **kwargs: Any) -> dict[str, Any]:
        timeout = timeout or self.timeout
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
            data = resp.data
        except ApiException as exc:
            raise translate(exc, self.cluster, verb, target, self.server) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ClusterUnreachable(f"cluster {self.cluster} ({self.server}): {unreachable_reason(exc, timeout)}",
                                     cluster=self.cluster, verb=verb, target=target) from None
        try:
            return json.loads(data) if data else {}
        except ValueError:
            raise ServerError(f"cluster {self.cluster}: {verb} {target}: the answer is not JSON: {data[:200]!r}",
                              cluster=self.cluster, verb=verb, target=target) from None

    def _send(self, change: Change, call: Callable[[], dict[str, Any]]) -> Change:
        """Perform the change's request, or in dry run describe it and write nothing."""
        assert change.request is not None
        if self.dry_run:
            change.dry_run = True
            change.reason = f"dry run: would {change.request.describe()}; {change.reason}"
            return change
        obj = call()
        change.applied = True
        change.resource_version = _meta(obj).get("resourceVersion")
        change.timestamp = utc_now()
        return change

    def _noop(self, action: str, target: str, state: Any, reason: str) -> Change:
        return Change(self.cluster, action, target, before=state, after=state, reason=reason,
                      dry_run=self.dry_run)

    # The resource modules (peer_auth, probe) write through the same transport, errors and dry run.
    call, send, noop = _call, _send, _noop

    @functools.cached_property
    def mtls(self) -> PeerAuthentications:
        """This cluster's PeerAuthentications: every mTLS read and write goes through it."""
        return PeerAuthentications(self)

    def api_group(self, group: str) -> dict[str, Any]:
        """The API discovery document of one group (`/apis/<group>`): its served versions."""
        return self._call("GET", f"/apis/{group}", self.api_client.call_api, f"/apis/{group}", "GET",
                          auth_settings=["BearerToken"], header_params={"Accept": "application/json"},
                          _return_http_data_only=True)

    def deployment(self, ns: str, name: str) -> dict[str, Any]:
        """The Deployment object (WorkloadNotFound when there is none)."""
        return self._deployment(ns, name)

    def template_labels(self, ns: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
        """(pod template labels, spec.selector.matchLabels) of a deployment: what a policy selects."""
        spec = self._deployment(ns, name).get("spec") or {}
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        return dict(labels), dict((spec.get("selector") or {}).get("matchLabels") or {})

    # ---- reads -------------------------------------------------------------------------------------
    def ping(self) -> str:
        """The server's version; fails fast with ClusterUnreachable."""
        # kubectl's path; VersionApi.get_code asks for "/version/", which the lab does not serve
        info = self._call("GET", "/version", self.api_client.call_api, "/version", "GET", auth_settings=["BearerToken"],
                          header_params={"Accept": "application/json"}, _return_http_data_only=True,
                          timeout=(self.timeout[0], 5.0))
        return str(info.get("gitVersion") or "unknown")

    def namespace(self, ns: str) -> dict[str, Any]:
        validate_name(ns, "namespace")
        return self._call("GET", f"namespace {ns}", self.core.read_namespace, ns)

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

    # ---- one writer per workload (lease.py) -------------------------------------------------------
    @functools.cached_property
    def leases(self) -> Leases:
        """The meshwave.io/lease annotations of this cluster's Deployments, written conditionally."""
        return Leases(self)

    # ---- what meshwave expects next (pending.py) ---------------------------------------------------
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

    # ---- injection ---------------------------------------------------------------------------------
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

    def _deployment_or_none(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return self._deployment(ns, name)
        except WorkloadNotFound:
            return None

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

    # ---- emergency rollback (meshwave.emergency) ---------------------------------------------------
    def namespace_names(self) -> list[str]:
        items = self._call("LIST", "namespaces", self.core.list_namespace).get("items", [])
        return sorted(_meta(n).get("name", "") for n in items)

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

    # ---- resource reads for the headroom preflight (meshwave.headroom) --------------------------------------
    def resource_quotas(self, ns: str) -> list[dict[str, Any]]:
        """The namespace's ResourceQuotas (spec.hard, status.used as the quota controller keeps it)."""
        ns = validate_name(ns, "namespace")
        return self._call("LIST", f"resourcequotas in {ns}", self.core.list_namespaced_resource_quota,
                          ns).get("items", [])

    def limit_ranges(self, ns: str) -> list[dict[str, Any]]:
        """The namespace's LimitRanges (as the API stores them: defaults filled in from max and min)."""
        ns = validate_name(ns, "namespace")
        return self._call("LIST", f"limitranges in {ns}", self.core.list_namespaced_limit_range, ns).get("items", [])

    def nodes(self) -> list[dict[str, Any]]:
        """Every Node (status.allocatable is what the scheduler fits pods' requests into)."""
        return self._call("LIST", "nodes", self.core.list_node).get("items", [])

    def all_pods(self) -> list[dict[str, Any]]:
        """Every pod of the cluster (what the nodes already hold: their spec.nodeName and requests)."""
        return self._call("LIST", "pods (all namespaces)", self.core.list_pod_for_all_namespaces).get("items", [])

    def injector_values(self, revision: str) -> dict[str, Any] | None:
        """The install's values the injector renders its template with (ConfigMap istio-sidecar-injector[-<rev>]
        in the root namespace, key `values`, JSON); None when there is no such ConfigMap."""
        name = "istio-sidecar-injector" if revision == DEFAULT_REVISION else \
            f"istio-sidecar-injector-{validate_name(revision, 'revision')}"
        try:
            cm = self._call("GET", f"configmap {self.root_namespace}/{name}", self.core.read_namespaced_config_map,
                            name, self.root_namespace)
        except NotFound:
            return None
        try:
            values = json.loads((cm.get("data") or {}).get("values") or "{}")
        except ValueError:
            raise ServerError(f"cluster {self.cluster}: configmap {self.root_namespace}/{name}: `values` is not "
                              "JSON", cluster=self.cluster, verb="GET", target=name) from None
        return values if isinstance(values, dict) else None

    def injection_revision(self) -> str:
        """The revision whose injector would size new sidecars here (the plan's, else the webhooks' default)."""
        revision, _ = self._revision_for("the headroom preflight")
        return revision

def _owned_by(pod: dict[str, Any], deployment: str) -> bool:
    """The selector may match other deployments' pods: keep those whose ReplicaSet is this deployment's."""
    owners = [o for o in _meta(pod).get("ownerReferences") or [] if o.get("kind") == "ReplicaSet"]
    pod_hash = (_meta(pod).get("labels") or {}).get("pod-template-hash")
    if not owners or not pod_hash:
        return True
    return any(o.get("name") == f"{deployment}-{pod_hash}" for o in owners)


def _selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())
