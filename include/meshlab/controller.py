"""The deployment controller and the kubelet of a simulated cluster.

A changed pod template rolls the deployment with the real rolling-update arithmetic (maxSurge 25%,
maxUnavailable 25% unless the spec says otherwise); new pods get a sidecar when injection applies;
a container whose memory is over its limit is OOMKilled and goes to CrashLoopBackOff, so the rollout
never completes; status and conditions are what `kubectl rollout status` reads.
"""

from __future__ import annotations

import copy
import hashlib
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshlab import resources as r
from meshlab.injection import inject, injection_applies, parse_quantity
from meshlab.store import Store, now_rfc3339

MI = 2**20
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@dataclass
class Behaviour:
    """How a workload's containers behave (from the topology and the fault knobs)."""

    app_memory_mi: float = 200
    sidecar_memory_mi: float = 60
    legacy: bool = False


@dataclass
class Timing:
    pod_start_seconds: float = 1.0
    crash_after_seconds: float = 1.0
    backoff_base_seconds: float = 2.0
    backoff_max_seconds: float = 10.0


@dataclass
class PodRuntime:
    """What the kubelet tracks for one pod between ticks."""

    start_at: float
    running_since: float | None = None
    restarts: dict[str, int] = field(default_factory=dict)
    last_reason: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    crashed_container: str | None = None
    doomed: bool = False


def template_hash(template: dict[str, Any]) -> str:
    digest = hashlib.sha256(repr(_canonical(template)).encode()).digest()
    return "".join(_HASH_ALPHABET[b % len(_HASH_ALPHABET)] for b in digest[:10])


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_canonical(v) for v in value)
    return value


def _int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        fraction = total * float(value[:-1]) / 100
        return math.ceil(fraction) if round_up else math.floor(fraction)
    return int(value)


def rolling_limits(spec: dict[str, Any]) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) as the deployment controller resolves them."""
    replicas = spec.get("replicas", 1)
    rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    surge = _int_or_percent(rolling.get("maxSurge", "25%"), replicas, round_up=True)
    unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


def owner_name(pod: dict[str, Any]) -> str | None:
    refs = pod["metadata"].get("ownerReferences") or []
    return refs[0]["name"] if refs else None


class Controller:
    def __init__(self, store: Store, behaviour: Callable[[str, str], Behaviour], revisions: list[str],
                 timing: Timing | None = None) -> None:
        self.store = store
        self.behaviour = behaviour
        self.revisions = revisions
        self.timing = timing or Timing()
        self.runtime: dict[str, PodRuntime] = {}
        self._progress: dict[tuple[str, str], tuple[float, tuple[str, int, int]]] = {}
        self._hashes: dict[Any, tuple[int | None, str]] = {}

    # ---- deployments ---------------------------------------------------------------------------
    def _template_hash(self, dep: dict[str, Any]) -> str:
        """template_hash of the deployment's pod template, computed again only when its generation moved (the
        template is part of the spec): hashing every template twice a tick was most of a 2,000-service tick."""
        meta = dep["metadata"]
        key, generation = meta.get("uid") or (meta.get("namespace"), meta["name"]), meta.get("generation")
        cached = self._hashes.get(key)
        if cached is None or generation is None or cached[0] != generation:
            cached = (generation, template_hash(dep["spec"]["template"]))
            self._hashes[key] = cached
        return cached[1]

    def pods_of(self, dep: dict[str, Any]) -> list[dict[str, Any]]:
        """The deployment's pods, from the store's index (kept up to date on every write)."""
        return self.store.pods_of(dep["metadata"]["namespace"], dep["metadata"]["name"])

    def reconcile(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for dep in list(self.store.items(r.DEPLOYMENTS)):
            self._roll(dep, now)
        for pod in list(self.store.items(r.PODS)):
            self._kubelet(pod, now)
        for dep in list(self.store.items(r.DEPLOYMENTS)):
            self._deployment_status(dep, now)
        live = {p["metadata"]["uid"] for p in self.store.items(r.PODS)}
        for uid in set(self.runtime) - live:
            del self.runtime[uid]

    def settle(self, now: float) -> None:
        """Bring every deployment to its steady state at once (the lab's start, not a rollout)."""
        for _ in range(100):
            before = len(self.runtime)
            for rt in self.runtime.values():
                if rt.running_since is None and rt.crashed_container is None:
                    rt.start_at = now
            self.reconcile(now)
            for rt in self.runtime.values():
                if rt.running_since is None and rt.crashed_container is None:
                    rt.start_at = now
            self.reconcile(now)
            if len(self.runtime) == before and all(rt.running_since is not None for rt in self.runtime.values()):
                return

    def _roll(self, dep: dict[str, Any], now: float) -> None:
        spec = dep["spec"]
        replicas = spec.get("replicas", 1)
        current = self._template_hash(dep)
        pods = self.pods_of(dep)
        new = [p for p in pods if p["metadata"]["labels"]["pod-template-hash"] == current]
        old = [p for p in pods if p["metadata"]["labels"]["pod-template-hash"] != current]
        surge, unavailable = rolling_limits(spec)
        if len(new) < replicas and len(new) + len(old) < replicas + surge:
            self._create_pod(dep, current, now)
        ready = sum(1 for p in pods if self._ready(p))
        for pod in sorted(old, key=self._ready):  # not-ready old pods go first: they cost no availability
            if not self._ready(pod):
                self._delete(pod)
            elif ready - 1 >= replicas - unavailable:
                self._delete(pod)
                ready -= 1
        for pod in sorted(new, key=self._ready)[: max(0, len(new) - replicas)]:
            self._delete(pod)

    def _create_pod(self, dep: dict[str, Any], pod_hash: str, now: float) -> None:
        ns, dep_name = dep["metadata"]["namespace"], dep["metadata"]["name"]
        template = copy.deepcopy(dep["spec"]["template"])
        meta = template.setdefault("metadata", {})
        labels = {**meta.get("labels", {}), "pod-template-hash": pod_hash}
        annotations = dict(meta.get("annotations") or {})
        pod = {
            "metadata": {
                "name": f"{dep_name}-{pod_hash}-{''.join(secrets.choice(_HASH_ALPHABET) for _ in range(5))}",
                "namespace": ns,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{dep_name}-{pod_hash}",
                                     "uid": dep["metadata"]["uid"], "controller": True}],
            },
            "spec": template.get("spec", {}),
        }
        ns_obj = self.store.peek(r.NAMESPACES, None, ns) or {"metadata": {}}
        if injection_applies(ns_obj["metadata"].get("labels") or {}, labels, annotations, self.revisions):
            inject(pod)
        created = self.store.create(r.PODS, ns, pod)
        self.runtime[created["metadata"]["uid"]] = PodRuntime(start_at=now + self.timing.pod_start_seconds)
        self._kubelet(self.store.peek(r.PODS, ns, created["metadata"]["name"]), now)

    def _delete(self, pod: dict[str, Any]) -> None:
        self.store.delete(r.PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])

    def _ready(self, pod: dict[str, Any]) -> bool:
        return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))

    def _deployment_status(self, dep: dict[str, Any], now: float) -> None:
        spec, meta = dep["spec"], dep["metadata"]
        replicas = spec.get("replicas", 1)
        current = self._template_hash(dep)
        pods = self.pods_of(dep)
        updated = [p for p in pods if p["metadata"]["labels"]["pod-template-hash"] == current]
        ready = sum(1 for p in pods if self._ready(p))
        updated_ready = sum(1 for p in updated if self._ready(p))
        _, unavailable = rolling_limits(spec)
        key = (meta["namespace"], meta["name"])
        mark = (current, len(updated), updated_ready)
        if key not in self._progress or self._progress[key][1] != mark:
            self._progress[key] = (now, mark)
        last_time = self._progress[key][0]
        complete = len(updated) == replicas and len(pods) == replicas and updated_ready == replicas
        deadline = spec.get("progressDeadlineSeconds", 600)
        old_status = dep.get("status", {})
        conditions = {c["type"]: c for c in old_status.get("conditions", [])}
        if complete:
            progressing = ("True", "NewReplicaSetAvailable",
                           f'ReplicaSet "{meta["name"]}-{current}" has successfully progressed.')
        elif now - last_time > deadline:
            progressing = ("False", "ProgressDeadlineExceeded",
                           f'ReplicaSet "{meta["name"]}-{current}" has timed out progressing.')
        else:
            progressing = ("True", "ReplicaSetUpdated", f'ReplicaSet "{meta["name"]}-{current}" is progressing.')
        available = ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.") \
            if ready >= replicas - unavailable else \
            ("False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
        status = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": len(pods),
            "updatedReplicas": len(updated),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, len(pods) - ready),
            "conditions": [_condition(conditions.get("Available"), "Available", *available),
                           _condition(conditions.get("Progressing"), "Progressing", *progressing)],
        }
        if not ready:
            status.pop("readyReplicas")
            status.pop("availableReplicas")
        self.store.set_status(r.DEPLOYMENTS, meta["namespace"], meta["name"], status)

    # ---- kubelet -------------------------------------------------------------------------------
    def _kubelet(self, pod: dict[str, Any] | None, now: float) -> None:
        if pod is None:
            return
        meta = pod["metadata"]
        rt = self.runtime.get(meta["uid"])
        if rt is None:  # a pod someone created by hand: it just runs
            rt = self.runtime[meta["uid"]] = PodRuntime(start_at=now)
        dep_name = (owner_name(pod) or meta["name"]).rsplit("-", 1)[0]
        behaviour = self.behaviour(meta["namespace"], dep_name)
        containers = pod["spec"].get("containers", [])
        if now >= rt.start_at:
            failing = self._failing_container(pod, behaviour)
            rt.doomed = failing is not None  # a container that cannot run never passes its readiness probe
            if rt.running_since is None:
                rt.running_since = now
                rt.crashed_container = None
            elif now - rt.running_since >= self.timing.crash_after_seconds and failing:
                name, reason, code = failing
                rt.restarts[name] = rt.restarts.get(name, 0) + 1
                rt.last_reason[name] = (reason, code, now_rfc3339())
                rt.crashed_container = name
                rt.running_since = None
                backoff = self.timing.backoff_base_seconds * 2 ** (rt.restarts[name] - 1)
                rt.start_at = now + min(backoff, self.timing.backoff_max_seconds)
        self.store.set_status(r.PODS, meta["namespace"], meta["name"], self._pod_status(pod, rt, now, containers))

    def _failing_container(self, pod: dict[str, Any], b: Behaviour) -> tuple[str, str, int] | None:
        containers = pod["spec"].get("containers", [])
        app = containers[0]
        proxy = next((c for c in containers if c["name"] == "istio-proxy"), None)
        if proxy is not None and b.legacy:
            return app["name"], "Error", 1
        app_limit = parse_quantity(((app.get("resources") or {}).get("limits") or {}).get("memory"))
        proxy_limit = parse_quantity(((proxy or {}).get("resources", {}).get("limits") or {}).get("memory"))
        app_bytes = b.app_memory_mi * MI
        proxy_bytes = b.sidecar_memory_mi * MI if proxy is not None else 0.0
        if proxy is not None and proxy_limit is not None:
            if proxy_bytes > proxy_limit:
                return "istio-proxy", "OOMKilled", 137
            proxy_bytes = 0.0  # the sidecar has a budget of its own
        if app_limit is not None and app_bytes + proxy_bytes > app_limit:
            return app["name"], "OOMKilled", 137
        return None

    def _pod_status(self, pod: dict[str, Any], rt: PodRuntime, now: float,
                    containers: list[dict[str, Any]]) -> dict[str, Any]:
        old = pod.get("status") or {}
        running = rt.running_since is not None
        statuses = []
        for c in containers:
            image = c.get("image", "")
            st: dict[str, Any] = {
                "name": c["name"], "image": image, "started": running,
                "imageID": f"{image}@sha256:{_digest(image)}",
                "containerID": f"containerd://{_digest(pod['metadata']['uid'] + c['name'])}",
                "restartCount": rt.restarts.get(c["name"], 0),
            }
            if running:
                st["state"] = {"running": {"startedAt": _started_at(old, c["name"])}}
            elif rt.crashed_container:
                reason = "CrashLoopBackOff" if c["name"] == rt.crashed_container else None
                st["state"] = {"waiting": {"reason": reason}} if reason else {"running": {"startedAt": now_rfc3339()}}
            else:
                st["state"] = {"waiting": {"reason": "ContainerCreating"}}
            if c["name"] in rt.last_reason:
                reason, code, at = rt.last_reason[c["name"]]
                st["lastState"] = {"terminated": {"reason": reason, "exitCode": code, "finishedAt": at}}
            st["ready"] = running and not rt.doomed
            statuses.append(st)
        ready = "True" if running and not rt.doomed else "False"
        return {
            "phase": "Running" if running or rt.crashed_container else "Pending",
            "podIP": old.get("podIP") or _pod_ip(pod["metadata"]["uid"]),
            "startTime": old.get("startTime") or now_rfc3339(),
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
                           {"type": "ContainersReady", "status": ready}, {"type": "Ready", "status": ready}],
            "containerStatuses": statuses,
        }


def _condition(old: dict[str, Any] | None, kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    if old and old["status"] == status and old["reason"] == reason:
        return old
    stamp = now_rfc3339()
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastUpdateTime": stamp,
            "lastTransitionTime": stamp}


def _started_at(old_status: dict[str, Any], name: str) -> str:
    for st in old_status.get("containerStatuses", []):
        running = st.get("state", {}).get("running")
        if st["name"] == name and running:
            return running["startedAt"]
    return now_rfc3339()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _pod_ip(uid: str) -> str:
    n = int(uid.replace("-", "")[:6], 16)
    return f"10.{(n >> 16) % 256}.{(n >> 8) % 256}.{n % 256}"
