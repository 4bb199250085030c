"""Observed state, pure: a Deployment, its current ReplicaSet and pods as `WorkloadState`, and the rollout's
verdict (`assess_rollout`), read as `kubectl rollout status` reads it. No API calls here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kubernetes.utils import parse_quantity

from meshwave.gitops import reverted_by

PROXY = "istio-proxy"
FAILING = ("OOMKilled", "Error", "CrashLoopBackOff")  # most specific first
STARTING = ("ContainerCreating", "PodInitializing")
# A rollout is followed as `kubectl rollout status` does: the ReplicaSet at the Deployment's revision, and its
# pods by hash. Comparing pods with the template fails on real clusters (metrics merging, digest-pinned images).
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
POD_TEMPLATE_HASH = "pod-template-hash"


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
