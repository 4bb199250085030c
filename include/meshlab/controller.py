"""The deployment controller, its ReplicaSets and the kubelet of a simulated cluster.

A changed pod template gets a ReplicaSet of its own, `<deployment>-<pod-template-hash>` (or takes back an old one
with an equal template, which then becomes the newest revision), and the deployment rolls with the real
rolling-update arithmetic (maxSurge 25%, maxUnavailable 25% unless the spec says otherwise): the new ReplicaSet
scales up, the old ones down to 0, and are kept up to revisionHistoryLimit (10). New pods go through the cluster's
admission (the store's: sidecar injection, digest pinning). A container whose memory is over its limit is OOMKilled
and goes to CrashLoopBackOff, so the rollout never completes; status and conditions are what `kubectl rollout
status` reads. A container that runs curl is run against the simulated mesh, the way curl would fare there.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import math
import secrets
import shlex
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshlab import resources as r
from meshlab.admission import Scheduler, sync_quota_status
from meshlab.errors import ApiError
from meshlab.injection import excluded_ports, image_digest, parse_quantity
from meshlab.mesh import effective_mode
from meshlab.selectors import matches_labels
from meshlab.store import Event, Store, now_rfc3339

MI = 2**20
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
MERGE = "application/merge-patch+json"
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
DESIRED_REPLICAS = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
# Deployment annotations the controller does not copy onto its ReplicaSets (deployment_util.go annotationsToSkip).
_NOT_COPIED = frozenset({REVISION, REVISION_HISTORY, DESIRED_REPLICAS, MAX_REPLICAS,
                         "kubectl.kubernetes.io/last-applied-configuration",
                         "deployment.kubernetes.io/error-selector-overlapping-with",
                         "deployment.kubernetes.io/selector-updated-at"})
DepKey = tuple[str, str]  # (namespace, deployment)
Key = tuple[str, str]  # (namespace, name)
QUICK_SECONDS = 0.1  # a curl run shorter than this ends in the tick it started in


@dataclass
class Behaviour:
    """How a workload's containers behave (from the topology and the fault knobs)."""

    app_memory_mi: float = 200
    sidecar_memory_mi: float = 60
    legacy: bool = False
    bypass_ports: frozenset[int] = frozenset()  # inbound ports that skip the sidecar
    gateway: bool = False  # an Envoy of its own: PeerAuthentication does not govern its listeners


@dataclass
class Timing:
    pod_start_seconds: float = 1.0
    crash_after_seconds: float = 1.0
    backoff_base_seconds: float = 2.0
    backoff_max_seconds: float = 10.0


@dataclass(frozen=True)
class CurlCommand:
    """What the kubelet needs of a curl command line."""

    url: str | None
    show_errors: bool = True  # not -s, or -s with -S: curl's error line goes to stderr
    fail: bool = False  # -f/--fail: an HTTP error answer is exit 22
    timeout: float = 300.0  # --max-time/--connect-timeout, else curl's 300 s connect timeout


@dataclass(frozen=True)
class CurlRun:
    """One run of a curl container: its outcome, decided from the cluster's state when it started."""

    code: int
    stderr: str
    started: str
    finish_at: float


@dataclass
class PodRuntime:
    """What the kubelet tracks for one pod between ticks."""

    start_at: float
    running_since: float | None = None
    restarts: dict[str, int] = field(default_factory=dict)
    last_reason: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    crashed_container: str | None = None
    doomed: bool = False
    curl: CurlCommand | None = None  # the first container runs curl: it ends, with curl's exit code
    run: CurlRun | None = None
    started_at: str | None = None  # when the pod's containers first started
    last_state: dict[str, Any] | None = None  # the curl container's previous termination (it was restarted)
    terminated: dict[str, Any] | None = None  # the curl container's final termination (it stays down)


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


def new_rs_replicas(replicas: int, surge: int, old_pods: int, new_pods: int) -> int:
    """The new ReplicaSet's size: as many as maxSurge leaves room for next to the old pods, at most `replicas`
    (never below the pods it has: the rolling arithmetic deletes surplus pods itself)."""
    return max(new_pods, min(replicas, max(0, replicas + surge - old_pods)))


def owner_name(pod: dict[str, Any]) -> str | None:
    refs = pod["metadata"].get("ownerReferences") or []
    return refs[0]["name"] if refs else None


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    """A controller reference to `obj`, as the deployment and ReplicaSet controllers write them."""
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def controller_uid(obj: dict[str, Any]) -> str | None:
    return next((ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or [] if ref.get("controller")),
                None)


def revision_of(obj: dict[str, Any]) -> int:
    value = (obj["metadata"].get("annotations") or {}).get(REVISION, "0")
    return int(value) if value.isdigit() else 0


def is_ready(pod: dict[str, Any]) -> bool:
    for c in pod.get("status", {}).get("conditions", ()):  # a plain loop: called for every pod, several times a tick
        if c["type"] == "Ready":
            return c["status"] == "True"
    return False


def has_proxy(pod: dict[str, Any]) -> bool:
    return any(c.get("name") == "istio-proxy" for c in pod["spec"].get("containers", []))


def replicaset_manifest(dep: dict[str, Any], pod_hash: str, revision: int, replicas: int) -> dict[str, Any]:
    """The ReplicaSet the deployment controller creates for its current pod template."""
    meta, spec = dep["metadata"], dep["spec"]
    template = copy.deepcopy(spec["template"])
    tmeta = template.setdefault("metadata", {})
    tmeta["labels"] = {**(tmeta.get("labels") or {}), "pod-template-hash": pod_hash}
    selector = copy.deepcopy(spec["selector"])
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), "pod-template-hash": pod_hash}
    surge, _ = rolling_limits(spec)
    want = spec.get("replicas", 1)
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in _NOT_COPIED}
    annotations.update({DESIRED_REPLICAS: str(want), MAX_REPLICAS: str(want + surge), REVISION: str(revision)})
    rs_spec: dict[str, Any] = {"replicas": replicas, "selector": selector, "template": template}
    if "minReadySeconds" in spec:
        rs_spec["minReadySeconds"] = spec["minReadySeconds"]
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{meta['name']}-{pod_hash}", "namespace": meta["namespace"],
                         "labels": dict(tmeta["labels"]), "annotations": annotations,
                         "ownerReferences": [owner_ref(dep)]},
            "spec": rs_spec}


class ReplicaSets:
    """The deployment controller's ReplicaSet side: one per pod template, revisions, scaling, status, clean-up,
    and the garbage collector's cascade (a deleted Deployment takes its ReplicaSets, a ReplicaSet its pods).

    Work per tick stays with the ReplicaSets that have pods or replicas: old ones at 0 are not looked at again."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._current: dict[DepKey, tuple[str, str]] = {}  # (deployment uid, pod-template-hash) last ensured
        self._active: dict[DepKey, set[str]] = {}  # ReplicaSets that had replicas or pods at the last sync
        self._cleanup: set[DepKey] = set()  # rolled deployments whose old ReplicaSets may exceed the history limit
        # ReplicaSet names by their controller's uid, from the store's events (whoever writes them): scanning a
        # namespace's ReplicaSets for each new template is quadratic at a fleet's start.
        self._by_owner: dict[str, set[Key]] = {}
        self._owner_of: dict[Key, str] = {}
        self.failed_create: dict[Key, str] = {}  # the controller's: refused pod creations by ReplicaSet
        for rs in store.items(r.REPLICA_SETS):
            self._index((rs["metadata"]["namespace"], rs["metadata"]["name"]), rs)
        store.on_change.append(self._on_event)

    def owned(self, namespace: str, uid: str) -> list[dict[str, Any]]:
        found = (self.store.peek(r.REPLICA_SETS, ns, name) for ns, name in self._by_owner.get(uid, ()))
        return [rs for rs in found if rs is not None and rs["metadata"]["namespace"] == namespace]

    def _index(self, key: Key, rs: dict[str, Any] | None) -> None:
        """Record (or, for None, forget) which deployment controls the ReplicaSet at `key`."""
        if (old := self._owner_of.pop(key, None)) is not None:
            self._by_owner.get(old, set()).discard(key)
        uid = controller_uid(rs) if rs is not None else None
        if uid:
            self._owner_of[key] = uid
            self._by_owner.setdefault(uid, set()).add(key)

    def _on_event(self, event: Event) -> None:
        if event.resource is r.REPLICA_SETS:
            meta = event.obj["metadata"]
            self._index((meta["namespace"], meta["name"]), None if event.type == "DELETED" else event.obj)
        self._collect_garbage(event)

    def ensure(self, dep: dict[str, Any], pod_hash: str, replicas: int) -> dict[str, Any]:
        """The ReplicaSet of the deployment's current template, created or taken back when the template changed."""
        meta = dep["metadata"]
        key = (meta["namespace"], meta["name"])
        name = f"{meta['name']}-{pod_hash}"
        rs = self.store.peek(r.REPLICA_SETS, key[0], name)
        if rs is not None and self._current.get(key) == (meta["uid"], pod_hash):
            return rs
        rs = self._create_or_adopt(dep, pod_hash, rs, replicas)
        self._current[key] = (meta["uid"], pod_hash)
        self._active.setdefault(key, set()).add(name)
        self._cleanup.add(key)
        revision = rs["metadata"]["annotations"][REVISION]
        if (meta.get("annotations") or {}).get(REVISION) != revision:
            self.store.patch(r.DEPLOYMENTS, key[0], key[1], MERGE, {"metadata": {"annotations": {REVISION: revision}}})
        return rs

    def _create_or_adopt(self, dep: dict[str, Any], pod_hash: str, rs: dict[str, Any] | None,
                         replicas: int) -> dict[str, Any]:
        ns, uid = dep["metadata"]["namespace"], dep["metadata"]["uid"]
        name = f"{dep['metadata']['name']}-{pod_hash}"
        revision = max((revision_of(o) for o in self.owned(ns, uid) if o["metadata"]["name"] != name), default=0) + 1
        if rs is None:
            return self.store.create(r.REPLICA_SETS, ns, replicaset_manifest(dep, pod_hash, revision, replicas))
        patch: dict[str, Any] = {"metadata": {}}
        if revision_of(rs) < revision:  # back to an older template: that ReplicaSet becomes the newest revision
            annotations = rs["metadata"].get("annotations") or {}
            patch["metadata"]["annotations"] = {REVISION: str(revision)}
            if old := annotations.get(REVISION):
                history = annotations.get(REVISION_HISTORY)
                patch["metadata"]["annotations"][REVISION_HISTORY] = f"{history},{old}" if history else old
        if controller_uid(rs) != uid:  # an orphan with this template: the controller adopts it
            patch["metadata"]["ownerReferences"] = [owner_ref(dep)]
        return self.store.patch(r.REPLICA_SETS, ns, name, MERGE, patch) if patch["metadata"] else rs

    def sync(self, dep: dict[str, Any], pods: list[dict[str, Any]], updated: int, updated_ready: int,
             surge: int) -> None:
        """Scale and report the deployment's ReplicaSets after a tick: the current one to the rollout's target,
        the old ones to the pods they still have. `updated`/`updated_ready`: the current template's pods, counted
        by the deployment's status already (a steady deployment costs no look at its pods here)."""
        meta = dep["metadata"]
        key = (meta["namespace"], meta["name"])
        current = self._current.get(key)
        if current is None or current[0] != meta["uid"]:
            return
        current_name = f"{meta['name']}-{current[1]}"
        replicas = dep["spec"].get("replicas", 1)
        if updated == len(pods) and self._active.get(key, set()) <= {current_name}:  # only the current one
            counts = {current_name: (updated, updated_ready)}
        else:
            counts = self._counts(pods, current_name, updated, updated_ready)
        old_pods = len(pods) - updated
        active = set()
        for name in counts.keys() | self._active.get(key, set()):
            rs = self.store.peek(r.REPLICA_SETS, key[0], name)
            if rs is None or controller_uid(rs) != meta["uid"]:
                continue
            have, ready = counts.get(name, (0, 0))
            want = new_rs_replicas(replicas, surge, old_pods, have) if name == current_name else have
            self._report(self._scale(rs, want, replicas, surge), have, ready)
            if want or have:
                active.add(name)
        self._active[key] = active
        if key in self._cleanup and not old_pods and updated == updated_ready == replicas:
            self._cleanup.discard(key)
            self._clean_history(dep, current_name)

    @staticmethod
    def _counts(pods: list[dict[str, Any]], current_name: str, updated: int,
                updated_ready: int) -> dict[str, tuple[int, int]]:
        """(pods, ready pods) by ReplicaSet, during a rollout."""
        counts = {current_name: (updated, updated_ready)}
        for pod in pods:
            name = owner_name(pod) or ""
            if name != current_name:
                have, ready = counts.get(name, (0, 0))
                counts[name] = (have + 1, ready + is_ready(pod))
        return counts

    def _scale(self, rs: dict[str, Any], want: int, replicas: int, surge: int) -> dict[str, Any]:
        """spec.replicas, and the desired/max annotations the controller writes whenever it scales a ReplicaSet."""
        if rs["spec"].get("replicas") == want:
            return rs
        marks = {DESIRED_REPLICAS: str(replicas), MAX_REPLICAS: str(replicas + surge)}
        return self.store.patch(r.REPLICA_SETS, rs["metadata"]["namespace"], rs["metadata"]["name"], MERGE,
                                {"metadata": {"annotations": marks}, "spec": {"replicas": want}})

    def _report(self, rs: dict[str, Any], have: int, ready: int) -> None:
        """ReplicaSet status as the API returns it: zero counts other than replicas are left out (omitempty)."""
        status: dict[str, Any] = {"replicas": have}
        if have:
            status["fullyLabeledReplicas"] = have
        if ready:
            status["readyReplicas"] = status["availableReplicas"] = ready
        status["observedGeneration"] = rs["metadata"].get("generation", 1)
        failure = self.failed_create.get((rs["metadata"]["namespace"], rs["metadata"]["name"]))
        if failure:
            old = {c["type"]: c for c in (rs.get("status") or {}).get("conditions", [])}.get("ReplicaFailure")
            status["conditions"] = [_condition(old, "ReplicaFailure", "True", "FailedCreate", failure)]
        self.store.set_status(r.REPLICA_SETS, rs["metadata"]["namespace"], rs["metadata"]["name"], status)

    def _clean_history(self, dep: dict[str, Any], current_name: str) -> None:
        """Delete the oldest scaled-down ReplicaSets past spec.revisionHistoryLimit, once a rollout is complete."""
        limit = dep["spec"].get("revisionHistoryLimit", 10)
        ns = dep["metadata"]["namespace"]
        old = [rs for rs in self.owned(ns, dep["metadata"]["uid"]) if rs["metadata"]["name"] != current_name
               and not rs["spec"].get("replicas") and not (rs.get("status") or {}).get("replicas")]
        for rs in sorted(old, key=revision_of)[: max(0, len(old) - limit)]:
            self.store.delete(r.REPLICA_SETS, ns, rs["metadata"]["name"])

    def _collect_garbage(self, event: Event) -> None:
        """Background cascading deletion, as the garbage collector does it through ownerReferences."""
        if event.type != "DELETED" or event.resource not in (r.DEPLOYMENTS, r.REPLICA_SETS):
            return
        meta = event.obj["metadata"]
        ns, uid = meta.get("namespace", ""), meta.get("uid", "")
        if event.resource is r.DEPLOYMENTS:
            self._current.pop((ns, meta["name"]), None)
            self._active.pop((ns, meta["name"]), None)
            self._cleanup.discard((ns, meta["name"]))
            for rs in self.owned(ns, uid):
                self._delete(r.REPLICA_SETS, ns, rs["metadata"]["name"])
            return
        for pod in self.store.pods_of(ns, meta["name"].rsplit("-", 1)[0]):
            if controller_uid(pod) == uid:
                self._delete(r.PODS, ns, pod["metadata"]["name"])

    def _delete(self, res: r.Resource, ns: str, name: str) -> None:
        if self.store.peek(res, ns, name) is not None:
            self.store.delete(res, ns, name)


class Controller:
    def __init__(self, store: Store, behaviour: Callable[[str, str], Behaviour], timing: Timing | None = None,
                 root_namespace: str = "istio-system") -> None:
        self.store = store
        self.behaviour = behaviour
        self.timing = timing or Timing()
        self.root_namespace = root_namespace
        self.runtime: dict[str, PodRuntime] = {}
        self.replicasets = ReplicaSets(store)
        self.scheduler = Scheduler(store)
        # The last refusal of a ReplicaSet's pod creation (quota, limit range), by (namespace, ReplicaSet): the
        # ReplicaSet and its Deployment show it as a ReplicaFailure condition, and the rollout stalls on it.
        self.failed_create: dict[Key, str] = {}
        self.replicasets.failed_create = self.failed_create
        self._progress: dict[tuple[str, str], tuple[float, tuple[str, int, int]]] = {}
        self._hashes: dict[Any, tuple[int | None, tuple[str, int, int]]] = {}
        self._settling = False

    # ---- deployments ---------------------------------------------------------------------------
    def _spec_facts(self, dep: dict[str, Any]) -> tuple[str, int, int]:
        """(template_hash, maxSurge, maxUnavailable) of the deployment's spec, computed again only when its
        generation moved: hashing every template twice a tick was most of a 2,000-service tick."""
        meta = dep["metadata"]
        key, generation = meta.get("uid") or (meta.get("namespace"), meta["name"]), meta.get("generation")
        cached = self._hashes.get(key)
        if cached is None or generation is None or cached[0] != generation:
            cached = (generation, (template_hash(dep["spec"]["template"]), *rolling_limits(dep["spec"])))
            self._hashes[key] = cached
        return cached[1]

    def _template_hash(self, dep: dict[str, Any]) -> str:
        return self._spec_facts(dep)[0]

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
            pods = self.pods_of(dep)
            updated, updated_ready = self._deployment_status(dep, pods, now)
            if not self._settling:
                self.replicasets.sync(dep, pods, updated, updated_ready, self._spec_facts(dep)[1])
        live = {p["metadata"]["uid"] for p in self.store.items(r.PODS)}
        for uid in set(self.runtime) - live:
            del self.runtime[uid]
        sync_quota_status(self.store)

    def settle(self, now: float) -> None:
        """Bring every deployment to its steady state at once (the lab's start, not a rollout). Nobody watches yet:
        the ReplicaSets are scaled and reported once, at the end, not at every step."""
        self._settling = True
        try:
            self._settle(now)
        finally:
            self._settling = False
        self.reconcile(now)

    def _settle(self, now: float) -> None:
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
        current, surge, unavailable = self._spec_facts(dep)
        pods = self.pods_of(dep)
        new = [p for p in pods if p["metadata"]["labels"]["pod-template-hash"] == current]
        old = [p for p in pods if p["metadata"]["labels"]["pod-template-hash"] != current]
        rs = self.replicasets.ensure(dep, current, new_rs_replicas(replicas, surge, len(old), len(new)))
        if len(new) < replicas and len(new) + len(old) < replicas + surge:
            self._create_pod(rs, now)
        ready = sum(1 for p in pods if is_ready(p))
        for pod in sorted(old, key=is_ready):  # not-ready old pods go first: they cost no availability
            if not is_ready(pod):
                self._delete(pod)
            elif ready - 1 >= replicas - unavailable:
                self._delete(pod)
                ready -= 1
        for pod in sorted(new, key=is_ready)[: max(0, len(new) - replicas)]:
            self._delete(pod)

    def _create_pod(self, rs: dict[str, Any], now: float) -> None:
        """A pod from the ReplicaSet's template; the store's admission injects a sidecar, pins images."""
        ns, rs_name = rs["metadata"]["namespace"], rs["metadata"]["name"]
        template = rs["spec"]["template"]  # not copied: admission copies before it mutates, and so does the store
        meta = template.get("metadata") or {}
        pod = {
            "metadata": {
                "name": f"{rs_name}-{''.join(secrets.choice(_HASH_ALPHABET) for _ in range(5))}",
                "generateName": f"{rs_name}-",
                "namespace": ns,
                "labels": dict(meta.get("labels") or {}),
                "annotations": dict(meta.get("annotations") or {}),
                "ownerReferences": [owner_ref(rs)],
            },
            "spec": template.get("spec", {}),
        }
        try:
            created = self.store.create(r.PODS, ns, pod)
        except ApiError as exc:  # quota or limit range: the ReplicaSet controller retries, the rollout stalls
            if exc.code != 403:
                raise
            self.failed_create[(ns, rs_name)] = f"Error creating: {exc.message}"
            return
        self.failed_create.pop((ns, rs_name), None)
        self.runtime[created["metadata"]["uid"]] = PodRuntime(start_at=now + self.timing.pod_start_seconds,
                                                              curl=curl_command(created))
        self._kubelet(self.store.peek(r.PODS, ns, created["metadata"]["name"]), now)

    def _delete(self, pod: dict[str, Any]) -> None:
        self.store.delete(r.PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])

    @staticmethod
    def _ready(pod: dict[str, Any]) -> bool:
        return is_ready(pod)

    def _deployment_status(self, dep: dict[str, Any], pods: list[dict[str, Any]], now: float) -> tuple[int, int]:
        """Write the deployment's status; returns (updated pods, updated ready pods)."""
        spec, meta = dep["spec"], dep["metadata"]
        replicas = spec.get("replicas", 1)
        current, _, unavailable = self._spec_facts(dep)
        updated = [p for p in pods if p["metadata"]["labels"]["pod-template-hash"] == current]
        updated_ready = sum(1 for p in updated if is_ready(p))
        ready = updated_ready + sum(1 for p in pods if p["metadata"]["labels"]["pod-template-hash"] != current
                                    and is_ready(p))
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
        failure = self.failed_create.get((meta["namespace"], f"{meta['name']}-{current}"))
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
        if failure:  # the deployment controller copies its new ReplicaSet's ReplicaFailure condition
            status["conditions"].append(_condition(conditions.get("ReplicaFailure"), "ReplicaFailure", "True",
                                                   "FailedCreate", failure))
        if not ready:
            status.pop("readyReplicas")
            status.pop("availableReplicas")
        self.store.set_status(r.DEPLOYMENTS, meta["namespace"], meta["name"], status)
        return len(updated), updated_ready

    # ---- kubelet -------------------------------------------------------------------------------
    def _kubelet(self, pod: dict[str, Any] | None, now: float) -> None:
        if pod is None:
            return
        meta = pod["metadata"]
        rt = self.runtime.get(meta["uid"])
        if rt is None:  # a pod created through the API: it starts after the usual delay
            rt = self.runtime[meta["uid"]] = PodRuntime(start_at=now + self.timing.pod_start_seconds,
                                                        curl=curl_command(pod))
        if not pod["spec"].get("nodeName"):
            node, why = self.scheduler.schedule(pod)
            if node is None:  # stays Pending until a node has room; the kubelet does not start it
                self.store.set_status(r.PODS, meta["namespace"], meta["name"], _unschedulable(pod, why))
                rt.start_at = now + self.timing.pod_start_seconds
                return
            pod = self.store.bind(meta["namespace"], meta["name"], node) or pod
        status = self._curl_pod(pod, rt, now) if rt.curl is not None else self._service_pod(pod, rt, now)
        self.store.set_status(r.PODS, meta["namespace"], meta["name"], status)

    def _behaviour_of(self, pod: dict[str, Any]) -> Behaviour:
        owner = owner_name(pod)  # <deployment>-<hash>; a bare pod is nobody's workload
        return self.behaviour(pod["metadata"]["namespace"], owner.rsplit("-", 1)[0] if owner else "")

    def _service_pod(self, pod: dict[str, Any], rt: PodRuntime, now: float) -> dict[str, Any]:
        """A long-running workload: it runs, or crash-loops when a container cannot."""
        behaviour = self._behaviour_of(pod)
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
                rt.start_at = now + self._backoff(rt.restarts[name])
        return self._pod_status(pod, rt, now, pod["spec"].get("containers", []))

    def _backoff(self, restarts: int) -> float:
        return min(self.timing.backoff_base_seconds * 2 ** (restarts - 1), self.timing.backoff_max_seconds)

    def _failing_container(self, pod: dict[str, Any], b: Behaviour) -> tuple[str, str, int] | None:
        """The container that cannot run: a legacy app next to a proxy, or a container whose own working set is over
        its own memory limit (each container is a cgroup of its own: the kernel OOM-kills it, nothing else)."""
        containers = pod["spec"].get("containers", [])
        app = containers[0]
        proxy = next((c for c in containers if c["name"] == "istio-proxy"), None)
        if proxy is not None and b.legacy:
            return app["name"], "Error", 1
        for container, used_mi in ((app, b.app_memory_mi), (proxy, b.sidecar_memory_mi)):
            if container is None:
                continue
            limit = parse_quantity(((container.get("resources") or {}).get("limits") or {}).get("memory"))
            if limit is not None and used_mi * MI > limit:
                return container["name"], "OOMKilled", 137
        return None

    def _pod_status(self, pod: dict[str, Any], rt: PodRuntime, now: float,
                    containers: list[dict[str, Any]]) -> dict[str, Any]:
        old = pod.get("status") or {}
        running = rt.running_since is not None
        statuses = []
        for c in containers:
            st = _container_status(pod, c, rt.restarts.get(c["name"], 0))
            st["started"] = running
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
        return _pod_status_body(pod, "Running" if running or rt.crashed_container else "Pending", ready, statuses)

    # ---- kubelet: a container that runs curl -------------------------------------------------------
    def _curl_pod(self, pod: dict[str, Any], rt: PodRuntime, now: float) -> dict[str, Any]:
        """curl starts, its outcome is decided from the cluster as it is at that moment, and it ends when its run
        takes (a quick answer: at once, after a Running status a watch sees; a timeout: that much later); the
        restart policy says whether it runs again."""
        assert rt.curl is not None
        if rt.run is None and rt.terminated is None and now >= rt.start_at:
            code, stderr, seconds = curl_outcome(self.store, self.root_namespace, pod, rt.curl, self.behaviour)
            rt.started_at = rt.started_at or now_rfc3339()
            rt.crashed_container = None
            rt.run = CurlRun(code, stderr, now_rfc3339(), now + seconds)
            if seconds < QUICK_SECONDS:
                meta = pod["metadata"]
                self.store.set_status(r.PODS, meta["namespace"], meta["name"], self._curl_pod_status(pod, rt))
        if rt.run is not None and now + QUICK_SECONDS > rt.run.finish_at:
            self._curl_ended(pod, rt, now)
        return self._curl_pod_status(pod, rt)

    def _curl_ended(self, pod: dict[str, Any], rt: PodRuntime, now: float) -> None:
        run, container = rt.run, pod["spec"]["containers"][0]
        assert run is not None
        rt.run = None
        state: dict[str, Any] = {"exitCode": run.code, "reason": "Completed" if run.code == 0 else "Error",
                                 "startedAt": run.started, "finishedAt": now_rfc3339(),
                                 "containerID": _container_id(pod, container)}
        # The termination message is what the container wrote to /dev/termination-log (curl writes nothing there);
        # only FallbackToLogsOnError puts the end of its log there, and only when it failed.
        if run.code and run.stderr and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            state["message"] = run.stderr + "\n"
        policy = pod["spec"].get("restartPolicy", "Always")
        if policy == "Never" or (policy == "OnFailure" and run.code == 0):
            rt.terminated = state
            return
        name = container["name"]
        rt.restarts[name] = rt.restarts.get(name, 0) + 1
        rt.last_state = state
        rt.crashed_container = name
        rt.start_at = now + self._backoff(rt.restarts[name])

    def _curl_pod_status(self, pod: dict[str, Any], rt: PodRuntime) -> dict[str, Any]:
        containers = pod["spec"].get("containers", [])
        first = containers[0]
        st = _container_status(pod, first, rt.restarts.get(first["name"], 0))
        if rt.run is not None:
            st.update(state={"running": {"startedAt": rt.run.started}}, ready=True, started=True)
        elif rt.terminated is not None:
            st.update(state={"terminated": rt.terminated}, ready=False, started=False)
        else:
            reason = "CrashLoopBackOff" if rt.crashed_container else "ContainerCreating"
            st.update(state={"waiting": {"reason": reason}}, ready=False, started=False)
        if rt.last_state is not None:
            st["lastState"] = {"terminated": rt.last_state}
        statuses = [st]
        for c in containers[1:]:  # a sidecar runs on: a pod with one never completes (istio/istio#11045)
            other = _container_status(pod, c, 0)
            started = rt.started_at is not None
            other.update(state={"running": {"startedAt": rt.started_at}} if started else
                         {"waiting": {"reason": "ContainerCreating"}}, ready=started, started=started)
            statuses.append(other)
        if rt.terminated is not None and len(containers) == 1:
            phase = "Succeeded" if rt.terminated["exitCode"] == 0 else "Failed"
        else:
            phase = "Running" if rt.started_at is not None else "Pending"
        ready = "True" if all(s["ready"] for s in statuses) else "False"
        return _pod_status_body(pod, phase, ready, statuses)


def _container_status(pod: dict[str, Any], c: dict[str, Any], restarts: int) -> dict[str, Any]:
    image = c.get("image", "")
    repo, _, pinned = image.partition("@sha256:")
    return {"name": c["name"], "image": image, "imageID": f"{repo}@sha256:{pinned or image_digest(image)}",
            "containerID": _container_id(pod, c), "restartCount": restarts}


def _container_id(pod: dict[str, Any], c: dict[str, Any]) -> str:
    return f"containerd://{_digest(pod['metadata']['uid'] + c['name'])}"


def _pod_status_body(pod: dict[str, Any], phase: str, ready: str,
                     statuses: list[dict[str, Any]]) -> dict[str, Any]:
    old = pod.get("status") or {}
    readiness: dict[str, Any] = {"status": ready}
    if phase in ("Succeeded", "Failed"):
        readiness["reason"] = "PodCompleted"
    return {
        "phase": phase,
        "podIP": old.get("podIP") or _pod_ip(pod["metadata"]["uid"]),
        "startTime": old.get("startTime") or now_rfc3339(),
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
                       {"type": "ContainersReady", **readiness}, {"type": "Ready", **readiness}],
        "containerStatuses": statuses,
    }


def _unschedulable(pod: dict[str, Any], message: str) -> dict[str, Any]:
    """A pod no node has room for: Pending, PodScheduled False (Unschedulable), no container status yet."""
    old = pod.get("status") or {}
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                 "lastProbeTime": None}
    previous = next((c for c in old.get("conditions", []) if c["type"] == "PodScheduled"), None)
    scheduled["lastTransitionTime"] = previous.get("lastTransitionTime") if previous and \
        previous.get("message") == message else now_rfc3339()
    return {"phase": "Pending", "conditions": [scheduled], "qosClass": old.get("qosClass", "Burstable")}


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


# ---- curl, run against the simulated cluster ------------------------------------------------------
_SHELLS = frozenset({"sh", "bash", "ash", "dash"})
_LONG_WITH_VALUE = frozenset({
    "--output", "--max-time", "--connect-timeout", "--write-out", "--header", "--request", "--data", "--data-raw",
    "--data-binary", "--data-urlencode", "--user", "--user-agent", "--referer", "--retry", "--retry-delay",
    "--retry-max-time", "--resolve", "--connect-to", "--proxy", "--cacert", "--cert", "--key", "--upload-file",
    "--cookie", "--cookie-jar", "--url", "--form", "--interface", "--limit-rate", "--range", "--config",
    "--dump-header", "--output-dir", "--stderr", "--trace", "--trace-ascii", "--max-filesize", "--noproxy",
    "--unix-socket", "--dns-servers", "--expect100-timeout", "--proxy-user",
})
_SHORT_WITH_VALUE = frozenset("oHXdumAerxETbcFKYyzCwDUQt")
CurlOutcome = tuple[int, str, float]  # (exit code, curl's error line, seconds it takes)


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _argv(container: dict[str, Any]) -> list[str]:
    """The container's command line: command + args, the image's curl entrypoint, or `sh -c "curl ..."`."""
    command, args = list(container.get("command") or []), list(container.get("args") or [])
    if command:
        argv = command + args
    elif args and _basename(args[0]) == "curl":
        argv = args
    elif args and "curl" in _basename(str(container.get("image", ""))):
        argv = ["curl", *args]  # curlimages/curl's entrypoint is curl
    else:
        return []
    if len(argv) >= 3 and _basename(argv[0]) in _SHELLS and argv[1] == "-c":
        script = argv[2]
        if any(ch in script for ch in ";|&`$<>()\n"):
            return []  # a script, not a single curl: not ours to simulate
        try:
            argv = shlex.split(script)
        except ValueError:
            return []
        argv = argv[1:] if argv[:1] == ["exec"] else argv
    return [str(a) for a in argv]


def curl_command(pod: dict[str, Any]) -> CurlCommand | None:
    """The curl command the pod's first container runs, or None when it runs something else."""
    containers = (pod.get("spec") or {}).get("containers") or []
    argv = _argv(containers[0]) if containers else []
    if not argv or _basename(argv[0]) != "curl":
        return None
    url, silent, show, fail = None, False, False, False
    times: dict[str, float] = {}
    tokens = iter(argv[1:])
    for token in tokens:
        if token.startswith("--"):
            value = next(tokens, None) if token in _LONG_WITH_VALUE else None
            silent, show = silent or token == "--silent", show or token == "--show-error"
            fail = fail or token in ("--fail", "--fail-with-body")
            if token == "--url":
                url = url or value
            elif token in ("--max-time", "--connect-timeout") and value:
                times[token] = _seconds(value)
        elif token.startswith("-") and len(token) > 1:
            for i, ch in enumerate(token[1:], start=1):
                if ch in _SHORT_WITH_VALUE:
                    value = token[i + 1:] or next(tokens, None)
                    if ch == "m" and value:
                        times["--max-time"] = _seconds(value)
                    break
                silent, show, fail = silent or ch == "s", show or ch == "S", fail or ch == "f"
        else:
            url = url or token
    timeout = min([t for t in times.values() if t > 0] or [300.0])
    return CurlCommand(url=url, show_errors=show or not silent, fail=fail, timeout=timeout)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class _Call:
    """One curl invocation as the network sees it."""

    client: dict[str, Any]
    cmd: CurlCommand
    host: str
    port: int

    def error(self, code: int, line: str, seconds: float = 0.02) -> CurlOutcome:
        return code, (f"curl: ({code}) {line}" if self.cmd.show_errors else ""), seconds

    def http(self, status: int) -> CurlOutcome:
        if status >= 400 and self.cmd.fail:
            return self.error(22, f"The requested URL returned error: {status}")
        return 0, "", 0.02

    def refused(self) -> CurlOutcome:
        return self.error(7, f"Failed to connect to {self.host} port {self.port} after 0 ms: "
                             "Couldn't connect to server")

    def timed_out(self) -> CurlOutcome:
        return self.error(28, f"Connection timed out after {int(self.cmd.timeout * 1000) + 1} milliseconds",
                          self.cmd.timeout)

    @property
    def client_proxied(self) -> bool:
        """The caller's own sidecar captures this request (it has one, and the port is not excluded)."""
        return has_proxy(self.client) and \
            self.port not in excluded_ports(self.client["metadata"].get("annotations") or {}, "Outbound")


def curl_outcome(store: Store, root_namespace: str, pod: dict[str, Any], cmd: CurlCommand,
                 behaviour: Callable[[str, str], Behaviour]) -> CurlOutcome:
    """What curl gets from the cluster as it is now: DNS, kube-proxy, the caller's and the server's sidecars, and
    the server's effective mTLS mode (plaintext into a proxy enforcing STRICT is reset: exit 56)."""
    if not cmd.url:
        return 2, "curl: no URL specified!" if cmd.show_errors else "", 0.0
    try:
        parts = urllib.parse.urlsplit(cmd.url if "://" in cmd.url else f"http://{cmd.url}")
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return 3, "curl: (3) URL rejected: Malformed input to a URL function" if cmd.show_errors else "", 0.0
    call = _Call(pod, cmd, host, port)
    if parts.scheme not in ("http", "https"):
        return call.error(1, f'Protocol "{parts.scheme}" not supported')
    if _is_ip(host):
        return _to_ip(store, root_namespace, call, behaviour)
    svc = _dns_service(store, pod["metadata"]["namespace"], host)
    if svc is None:
        return call.error(6, f"Could not resolve host: {host}")
    return _to_service(store, root_namespace, call, svc, behaviour)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _dns_service(store: Store, namespace: str, host: str) -> dict[str, Any] | None:
    """The Service a name resolves to through the pod's search path (<ns>.svc.cluster.local, svc.cluster.local)."""
    labels = host.rstrip(".").lower().split(".")
    if len(labels) == 1:
        name, ns = labels[0], namespace
    elif len(labels) == 2 or (len(labels) == 3 and labels[2] == "svc") or labels[2:] == ["svc", "cluster", "local"]:
        name, ns = labels[0], labels[1]
    else:
        return None
    return store.peek(r.SERVICES, ns, name)


def _endpoints(store: Store, svc: dict[str, Any], service_port: dict[str, Any] | None,
               port: int) -> list[tuple[dict[str, Any], int]]:
    """Ready pods the Service selects, each with the container port the request reaches (named targetPorts
    resolve per pod; a pod without that port is no endpoint)."""
    selector = (svc.get("spec") or {}).get("selector") or {}
    if not selector:
        return []
    found = []
    for pod in store.items(r.PODS, svc["metadata"]["namespace"]):
        if is_ready(pod) and matches_labels(selector, pod["metadata"].get("labels") or {}):
            target = port if service_port is None else _target_port(service_port, pod)
            if target is not None:
                found.append((pod, target))
    return sorted(found, key=lambda e: e[0]["metadata"]["name"])


def _target_port(service_port: dict[str, Any], pod: dict[str, Any]) -> int | None:
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for c in pod["spec"].get("containers", []):
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


def _pick(call: _Call, endpoints: list[tuple[dict[str, Any], int]]) -> tuple[dict[str, Any], int]:
    """One endpoint, the same one for the same pod and URL: each endpoint is as likely as any other."""
    seed = int(_digest(f"{call.client['metadata'].get('uid', '')}/{call.host}:{call.port}"), 16)
    return endpoints[seed % len(endpoints)]


def _to_service(store: Store, root: str, call: _Call, svc: dict[str, Any],
                behaviour: Callable[[str, str], Behaviour]) -> CurlOutcome:
    spec = svc.get("spec") or {}
    if spec.get("clusterIP") == "None":  # headless: DNS answers the ready pods themselves, or nothing
        endpoints = _endpoints(store, svc, None, call.port)
        if not endpoints:
            return call.error(6, f"Could not resolve host: {call.host}")
        return _to_pod(store, root, call, *_pick(call, endpoints), behaviour)
    service_port = next((p for p in spec.get("ports") or [] if p.get("port") == call.port
                         and p.get("protocol", "TCP") == "TCP"), None)
    if service_port is None:  # kube-proxy has no rule for that port: the packets go nowhere
        return call.timed_out()
    endpoints = _endpoints(store, svc, service_port, call.port)
    if not endpoints:  # kube-proxy rejects; a caller's sidecar answers 503 "no healthy upstream" itself
        return call.http(503) if call.client_proxied else call.refused()
    return _to_pod(store, root, call, *_pick(call, endpoints), behaviour)


def _to_ip(store: Store, root: str, call: _Call, behaviour: Callable[[str, str], Behaviour]) -> CurlOutcome:
    svc = next((s for s in store.items(r.SERVICES) if (s.get("spec") or {}).get("clusterIP") == call.host), None)
    if svc is not None:
        return _to_service(store, root, call, svc, behaviour)
    pod = next((p for p in store.items(r.PODS) if (p.get("status") or {}).get("podIP") == call.host), None)
    if pod is None or not is_ready(pod):
        return call.timed_out()
    return _to_pod(store, root, call, pod, call.port, behaviour)


def _to_pod(store: Store, root: str, call: _Call, server: dict[str, Any], port: int,
            behaviour: Callable[[str, str], Behaviour]) -> CurlOutcome:
    """The connection reaches a pod: its proxy (unless the port bypasses it) applies its mTLS mode."""
    meta = server["metadata"]
    owner = owner_name(server)
    b = behaviour(meta["namespace"], owner.rsplit("-", 1)[0] if owner else "")
    bypass = set(b.bypass_ports) | excluded_ports(meta.get("annotations") or {}, "Inbound")
    server_proxied = has_proxy(server) and port not in bypass
    if call.client_proxied:
        if has_proxy(server) and not server_proxied:  # auto-mTLS sends TLS to a port no proxy terminates
            return call.http(503)
        return call.http(200)
    if server_proxied and not b.gateway and \
            effective_mode(store, root, meta["namespace"], meta.get("labels") or {}, port) == "STRICT":
        return call.error(56, "Recv failure: Connection reset by peer")
    return call.http(200)
