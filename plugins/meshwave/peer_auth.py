"""PeerAuthentications on one cluster: read every policy that applies, write meshwave's own, prove the result.

meshwave writes one kind of policy: a workload-selector PeerAuthentication `meshwave-<workload>` carrying
the label `app.kubernetes.io/managed-by=meshwave` (never a namespace- or mesh-wide one). Every decision
reads the mode Istio enforces, computed from all policies of the workload's namespace and of the root
namespace (`meshwave.mtls.effective_mtls`), and every write is followed by the same computation: a write
whose result is not what was asked raises `NotInForce`.

- STRICT (`ensure_strict`): refused (`MtlsRefused`, naming the policy) when a workload policy meshwave did
  not create selects the pods, because that policy, not meshwave's, decides (the oldest one wins).
- Back to PERMISSIVE (`ensure_permissive`): meshwave's own policy is deleted when the workload is
  PERMISSIVE without it (it created the object: none existed before); it is kept, PERMISSIVE, when a
  namespace- or mesh-wide STRICT would apply without it; a STRICT workload policy of someone else's is
  relaxed in place (its previous modes kept in an annotation); a PERMISSIVE policy is never created where
  the workload is already PERMISSIVE.

The API version is discovered per cluster: `security.istio.io/v1` where served (Istio 1.22 and later),
else `v1beta1`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshwave.changes import ApiRequest, Change
from meshwave.kube_errors import Conflict, MtlsRefused, NotFound, NotInForce
from meshwave.mtls import (
    MESHWAVE_LABEL,
    EffectiveMtls,
    Mode,
    PolicyRef,
    Scope,
    effective_mtls,
    match_labels,
    oldest,
    own_mode,
    port_modes,
    without,
)
from meshwave.names import rfc1123_label

if TYPE_CHECKING:
    from meshwave.kube import MeshKube

PA_GROUP, PA_PLURAL = "security.istio.io", "peerauthentications"
PA_VERSIONS = ("v1", "v1beta1")  # preferred first
MERGE_PATCH = "application/merge-patch+json"
PREVIOUS_MTLS_ANNOTATION = "meshwave.io/emergency-previous-mtls"
RELAXED_BY_ANNOTATION = "meshwave.io/emergency-rollback"


def policy_name(workload: str) -> str:
    return f"meshwave-{workload}"


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def strict_parts(policy: dict[str, Any]) -> dict[str, str]:
    """What is STRICT in a policy: {"mtls": "STRICT"} and/or {"port 8080": "STRICT"}; empty when nothing is."""
    found = {"mtls": "STRICT"} if own_mode(policy) == Mode.STRICT else {}
    for port, mode in sorted(port_modes(policy).items()):
        if mode == Mode.STRICT:
            found[f"port {port}"] = "STRICT"
    return found


def plan_relax(cluster: str, ns: str, name: str, policy: dict[str, Any] | None, note: str,
               version: str = PA_VERSIONS[0]) -> Change:
    """The merge patch that turns every STRICT of a policy into PERMISSIVE, or a no-op Change. Pure."""
    target = f"peerauthentication {ns}/{name}"
    if policy is None:
        return Change(cluster, "relax-mtls", target, reason="not found (deleted meanwhile): nothing to relax")
    strict = strict_parts(policy)
    if not strict:
        state = {"mtls": str(own_mode(policy))}
        return Change(cluster, "relax-mtls", target, state, state, reason=f"nothing STRICT ({own_mode(policy)})")
    spec: dict[str, Any] = {}
    if "mtls" in strict:
        spec["mtls"] = {"mode": "PERMISSIVE"}
    ports = {k.removeprefix("port "): {"mode": "PERMISSIVE"} for k in strict if k.startswith("port ")}
    if ports:
        spec["portLevelMtls"] = ports
    annotations = {PREVIOUS_MTLS_ANNOTATION: json.dumps(strict, sort_keys=True), RELAXED_BY_ANNOTATION: note}
    body = {"metadata": {"resourceVersion": _meta(policy).get("resourceVersion"), "annotations": annotations},
            "spec": spec}
    request = ApiRequest("PATCH", _path(version, ns, name), MERGE_PATCH, body)
    after = {k: "PERMISSIVE" for k in strict}
    return Change(cluster, "relax-mtls", target, strict, after, request,
                  reason=", ".join(f"{k} STRICT -> PERMISSIVE" for k in strict) + " (object kept; previous modes in "
                  f"annotation {PREVIOUS_MTLS_ANNOTATION})")


def _path(version: str, ns: str, name: str | None = None) -> str:
    return f"/apis/{PA_GROUP}/{version}/namespaces/{ns}/{PA_PLURAL}" + (f"/{name}" if name else "")


class PeerAuthentications:
    """The PeerAuthentications of one cluster, through a MeshKube's transport (its errors, timeouts, dry run)."""

    def __init__(self, kube: MeshKube) -> None:
        self.kube = kube
        self.cluster = kube.cluster
        self.root = kube.root_namespace

    # ---- reads -------------------------------------------------------------------------------------
    @functools.cached_property
    def version(self) -> str:
        """The version this cluster serves PeerAuthentication at: v1 (Istio 1.22+), else v1beta1."""
        group = self.kube.api_group(PA_GROUP)
        served = [v.get("version") for v in group.get("versions") or []]
        found = next((v for v in PA_VERSIONS if v in served), None)
        if found is None:
            raise NotFound(f"cluster {self.cluster}: {PA_GROUP} serves {served or 'no version'}, none of "
                           f"{', '.join(PA_VERSIONS)}: is Istio installed?", cluster=self.cluster, verb="GET",
                           target=f"/apis/{PA_GROUP}", code=404)
        return found

    def list(self, ns: str | None) -> list[dict[str, Any]]:
        """The policies of one namespace, or of every namespace (None) in one request."""
        custom = self.kube.custom
        if ns is not None:
            rfc1123_label(ns, "namespace")
        if ns is None:
            return self.kube.call("LIST", "peerauthentications (all namespaces)", custom.list_cluster_custom_object,
                                  PA_GROUP, self.version, PA_PLURAL).get("items", [])
        return self.kube.call("LIST", f"peerauthentications {ns}", custom.list_namespaced_custom_object,
                              PA_GROUP, self.version, ns, PA_PLURAL).get("items", [])

    def applying_to(self, ns: str) -> list[dict[str, Any]]:
        """Every policy Istio reads for a pod of `ns`: those of `ns` and of the root namespace."""
        found = self.list(ns)
        return found if ns == self.root else found + self.list(self.root)

    def effective(self, ns: str, workload: str) -> EffectiveMtls:
        """The mode Istio enforces on the workload's pods (its pod template's labels), from every policy."""
        labels, _ = self.kube.template_labels(ns, workload)
        return effective_mtls(self.applying_to(ns), self.root, ns, labels)

    def mesh_wide(self) -> PolicyRef | None:
        """The mesh-wide policy in force (root namespace, no selector, the oldest)."""
        policy = oldest([p for p in self.list(self.root) if not match_labels(p)])
        return PolicyRef.of(policy, Scope.MESH) if policy else None

    def namespace_wide(self, ns: str) -> PolicyRef | None:
        """The namespace-wide policy in force in `ns` (no selector, the oldest)."""
        policy = oldest([p for p in self.list(ns) if not match_labels(p)])
        return PolicyRef.of(policy, Scope.NAMESPACE) if policy else None

    # ---- STRICT ------------------------------------------------------------------------------------
    def ensure_strict(self, ns: str, workload: str) -> tuple[Change, EffectiveMtls | None]:
        """meshwave's policy STRICT, then the mode recomputed from every policy (None in a dry run)."""
        labels, selector = self.kube.template_labels(ns, workload)
        self._check_writable(ns, selector)
        policies = self.applying_to(ns)
        state = effective_mtls(policies, self.root, ns, labels)
        foreign = state.foreign_workload_policies
        if foreign:
            raise MtlsRefused(
                f"cluster {self.cluster}: {ns}/{workload} is selected by {foreign[0]}: that policy, not meshwave's, "
                "decides the workload's mode (Istio applies the oldest workload policy), so meshwave does not flip "
                "it. Its owners can make it STRICT, or delete it and let meshwave manage the workload",
                cluster=self.cluster, verb="PATCH", target=f"peerauthentication {ns}/{foreign[0].name}")
        own = _find(policies, ns, policy_name(workload))
        if own is not None and RELAXED_BY_ANNOTATION in (_meta(own).get("annotations") or {}):
            raise MtlsRefused(
                f"cluster {self.cluster}: peerauthentication {ns}/{own['metadata']['name']} was relaxed by the "
                f"emergency rollback ({_meta(own)['annotations'][RELAXED_BY_ANNOTATION]}): meshwave does not make it "
                "STRICT again until an operator clears the mark (mesh_service, action clear_emergency)",
                cluster=self.cluster, verb="PATCH", target=f"peerauthentication {ns}/{own['metadata']['name']}")
        if state.strict_everywhere and (own is None or own_mode(own) == Mode.STRICT):
            return self.kube.noop("set-mtls", f"peerauthentication {ns}/{policy_name(workload)}",
                                  state.summary(), f"already STRICT: {state.describe()}"), state
        change = self._write(ns, workload, selector, Mode.STRICT, own)
        return change, self._proven(ns, labels, lambda s: s.strict_everywhere, "STRICT", change)

    # ---- PERMISSIVE --------------------------------------------------------------------------------
    def ensure_permissive(self, ns: str, workload: str, note: str, *,
                          exempt: bool = True) -> tuple[list[Change], EffectiveMtls | None]:
        """Nothing STRICT on the workload's pods, with as little policy as that takes (see the module doc), and
        the mode recomputed after the write (None in a dry run).

        `exempt=False` (the sidecar is being removed, so no proxy will enforce anything): only meshwave's own
        policy is deleted or relaxed; nothing is created and nobody else's policy is touched.
        """
        labels, selector = self.kube.template_labels(ns, workload)
        policies = self.applying_to(ns)
        state = effective_mtls(policies, self.root, ns, labels)
        name = policy_name(workload)
        own = _find(policies, ns, name)
        target = f"peerauthentication {ns}/{name}"
        if own is not None and not effective_mtls(without(policies, ns, name), self.root, ns, labels).strict_anywhere:
            change = self._delete(ns, name, own)
        elif not state.strict_anywhere:
            return [self.kube.noop("set-mtls", target, state.summary(),
                                   f"already PERMISSIVE: {state.describe()}")], state
        elif state.workload_policy is not None and not state.workload_policy.meshwave:
            if not exempt:
                return [self.kube.noop("set-mtls", target, state.summary(), f"left as it is: {state.describe()}; "
                                       "the sidecar is being removed, so no proxy will enforce it")], state
            change = self._relax_foreign(ns, _find(policies, ns, state.workload_policy.name), state, note)
        elif own is None and not exempt:
            return [self.kube.noop("set-mtls", target, state.summary(), f"no policy created: {state.describe()}; "
                                   "the sidecar is being removed, so no proxy will enforce it")], state
        else:  # meshwave's own policy in force, or a namespace-/mesh-wide STRICT: a PERMISSIVE policy of its own
            self._check_writable(ns, selector)
            change = self._write(ns, workload, selector, Mode.PERMISSIVE, own)
        if not exempt:
            return [change], None if self.kube.dry_run else effective_mtls(self.applying_to(ns), self.root, ns, labels)
        return [change], self._proven(ns, labels, lambda s: not s.strict_anywhere, "PERMISSIVE", change)

    # ---- emergency ---------------------------------------------------------------------------------
    def relax(self, ns: str, name: str, note: str, current: dict[str, Any] | None = None) -> Change:
        """STRICT -> PERMISSIVE in one policy (its mode and every portLevelMtls entry), keeping the object; the
        previous modes go into `PREVIOUS_MTLS_ANNOTATION`. `current` is the object as just listed (saves a GET);
        a stale resourceVersion (409) is re-read and re-planned once."""
        retried = False
        while True:
            policy = current if current is not None else self._get(ns, name)
            change = plan_relax(self.cluster, ns, name, policy, note, self.version)
            if change.request is None:
                change.dry_run = self.kube.dry_run
                return change
            try:
                return self._patch(ns, name, change)
            except Conflict:
                if retried:
                    raise
                retried, current = True, None

    def clear_emergency(self, ns: str, workload: str) -> list[Change]:
        """The operator's all-clear for one workload: the emergency rollback's mark (both annotations) removed from
        every workload policy selecting its pods, meshwave's own included; modes are left as they are. Namespace-
        and mesh-wide policies are not the workload's and keep theirs."""
        labels, _ = self.kube.template_labels(ns, workload)
        changes = []
        for policy in self.list(ns):
            match = match_labels(policy)
            marked = {k: v for k, v in (_meta(policy).get("annotations") or {}).items()
                      if k in (RELAXED_BY_ANNOTATION, PREVIOUS_MTLS_ANNOTATION)}
            if match and marked and all(labels.get(k) == v for k, v in match.items()):
                changes.append(self._patch(ns, _meta(policy)["name"], self._plan_clear(ns, policy, marked)))
        if not changes:
            return [self.kube.noop("clear-emergency", f"workload policies of {ns}/{workload}", None,
                                   "no policy selecting the workload carries the emergency rollback's mark")]
        return changes

    def _plan_clear(self, ns: str, policy: dict[str, Any], marked: dict[str, str]) -> Change:
        name = _meta(policy)["name"]
        body = {"metadata": {"resourceVersion": _meta(policy).get("resourceVersion"),
                             "annotations": dict.fromkeys(marked)}}  # merge patch: null deletes
        return Change(self.cluster, "clear-emergency", f"peerauthentication {ns}/{name}", marked, None,
                      ApiRequest("PATCH", _path(self.version, ns, name), MERGE_PATCH, body),
                      reason=f"emergency mark cleared by an operator (mode left {own_mode(policy)}): meshwave may "
                             "make it STRICT again")

    # ---- writes ------------------------------------------------------------------------------------
    def _check_writable(self, ns: str, selector: dict[str, str]) -> None:
        if not selector:
            raise ValueError(f"{ns}: the deployment has no selector.matchLabels: a policy without a selector is "
                             "namespace- or mesh-wide, which meshwave never writes")
        if ns == self.root:
            raise ValueError(f"Istio ignores selector policies in the root namespace {ns}")

    def _write(self, ns: str, workload: str, selector: dict[str, str], mode: Mode,
               own: dict[str, Any] | None) -> Change:
        """Create or patch meshwave's policy; a 409 (someone wrote it meanwhile) is re-read and re-planned once."""
        name = policy_name(workload)
        retried: set[str] = set()
        while True:
            change = self._plan_write(ns, name, own, selector, mode)
            if change.request is None:
                return change
            try:
                if change.request.verb == "POST":
                    return self.kube.send(change, functools.partial(
                        self.kube.call, "POST", change.target, self.kube.custom.create_namespaced_custom_object,
                        PA_GROUP, self.version, ns, PA_PLURAL, change.request.body))
                return self._patch(ns, name, change)
            except Conflict:
                if change.request.verb in retried:  # someone else keeps writing it: give up, loudly
                    raise
                retried.add(change.request.verb)
                own = self._get(ns, name)

    def _plan_write(self, ns: str, name: str, current: dict[str, Any] | None, selector: dict[str, str],
                    mode: Mode) -> Change:
        target = f"peerauthentication {ns}/{name}"
        after = {"mode": str(mode), "selector": selector}
        key, value = MESHWAVE_LABEL
        if current is None:
            body = {"apiVersion": f"{PA_GROUP}/{self.version}", "kind": "PeerAuthentication",
                    "metadata": {"name": name, "namespace": ns, "labels": {key: value}},
                    "spec": {"selector": {"matchLabels": selector}, "mtls": {"mode": str(mode)}}}
            request = ApiRequest("POST", _path(self.version, ns), "application/json", body)
            return Change(self.cluster, "set-mtls", target, None, after, request,
                          reason=f"create {mode} policy (none existed: undoing it deletes it)")
        old_selector = match_labels(current)
        before = {"mode": str(own_mode(current)), "selector": old_selector}
        if before == after:
            return self.kube.noop("set-mtls", target, before, f"already {mode}")
        match = {**selector, **{k: None for k in old_selector if k not in selector}}  # merge patch: null deletes
        body = {"metadata": {"resourceVersion": _meta(current).get("resourceVersion"), "labels": {key: value}},
                "spec": {"selector": {"matchLabels": match}, "mtls": {"mode": str(mode)}}}
        request = ApiRequest("PATCH", _path(self.version, ns, name), MERGE_PATCH, body)
        return Change(self.cluster, "set-mtls", target, before, after, request, reason=f"{before['mode']} -> {mode}")

    def _relax_foreign(self, ns: str, policy: dict[str, Any] | None, state: EffectiveMtls, note: str) -> Change:
        """Someone else's workload policy makes the pods STRICT: relax it in place (never delete it)."""
        change = self.relax(ns, _meta(policy or {}).get("name", ""), note, current=policy)
        change.reason = f"{state.workload_policy} is in force, not meshwave's: {change.reason}"
        return change

    def _delete(self, ns: str, name: str, current: dict[str, Any]) -> Change:
        target = f"peerauthentication {ns}/{name}"
        body = {"preconditions": {"resourceVersion": _meta(current).get("resourceVersion")}}
        change = Change(self.cluster, "delete-mtls", target, {"mode": str(own_mode(current))}, None,
                        ApiRequest("DELETE", _path(self.version, ns, name), "application/json", body),
                        reason="meshwave created this policy (none existed before it) and the workload is "
                               "PERMISSIVE without it: deleted, not left to exempt the workload from a later STRICT")
        try:
            return self.kube.send(change, functools.partial(
                self.kube.call, "DELETE", target, self.kube.custom.delete_namespaced_custom_object, PA_GROUP,
                self.version, ns, PA_PLURAL, name, body=body))
        except NotFound:
            return self.kube.noop("delete-mtls", target, None, "already deleted")

    def _patch(self, ns: str, name: str, change: Change) -> Change:
        assert change.request is not None
        return self.kube.send(change, functools.partial(
            self.kube.call, "PATCH", change.target, self.kube.custom.patch_namespaced_custom_object, PA_GROUP,
            self.version, ns, PA_PLURAL, name, change.request.body, _content_type=MERGE_PATCH))

    def _get(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return self.kube.call("GET", f"peerauthentication {ns}/{name}",
                                  self.kube.custom.get_namespaced_custom_object, PA_GROUP, self.version, ns,
                                  PA_PLURAL, name)
        except NotFound:
            return None

    def _proven(self, ns: str, labels: dict[str, str], holds: Callable[[EffectiveMtls], bool], wanted: str,
                change: Change) -> EffectiveMtls | None:
        """The mode recomputed from every policy after the write; NotInForce unless it is `wanted`."""
        if self.kube.dry_run:
            return None
        state = effective_mtls(self.applying_to(ns), self.root, ns, labels)
        if not holds(state):
            raise NotInForce(f"cluster {self.cluster}: after {change.summary()}, the mode Istio computes for "
                             f"{ns} pods {labels} is {state.describe()}, not {wanted}"
                             + (f"; STRICT by: {'; '.join(state.strict_sources())}" if state.strict_anywhere else ""),
                             cluster=self.cluster, verb=change.request.verb if change.request else "GET",
                             target=change.target)
        return state


def _find(policies: list[dict[str, Any]], ns: str, name: str) -> dict[str, Any] | None:
    return next((p for p in policies if (_meta(p).get("namespace"), _meta(p).get("name")) == (ns, name)), None)
