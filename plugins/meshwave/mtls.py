"""The effective mTLS mode of a workload's pods, computed the way Istio computes it (pure, no I/O).

Istio never asks "what does meshwave's policy say": its control plane composes every PeerAuthentication
that applies to a pod (pilot `ComposePeerAuthentication`):

- the mesh-wide policy: a policy without a selector in the root namespace (the oldest, if several);
- the namespace-wide policy: a policy without a selector in the pod's namespace (the oldest);
- the workload policy: the oldest policy of the pod's namespace whose `selector.matchLabels` is not empty
  and matches the pod's labels (selector policies in the root namespace are ignored).

The result starts PERMISSIVE; the mesh policy's mode, then the namespace policy's, then the workload
policy's replace it, each only when it is not UNSET. The workload policy's `portLevelMtls` then sets a mode
per port; a port whose mode is UNSET inherits the mode computed so far. "Oldest" is Istio's order:
creationTimestamp, then name, then namespace (timestamps have one-second resolution: ties are common).

Every step of meshwave that reads or writes mTLS (preflight, the STRICT flip, back to PERMISSIVE, the
verification, the report, the emergency rollback) reads the mode through `effective_mtls`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MESHWAVE_LABEL = ("app.kubernetes.io/managed-by", "meshwave")


class Mode(StrEnum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


class Scope(StrEnum):
    MESH = "mesh-wide"
    NAMESPACE = "namespace-wide"
    WORKLOAD = "workload"


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def _mode(value: Any) -> Mode:
    try:
        return Mode(str(value or "UNSET").upper())
    except ValueError:  # Istio's validation refuses other modes; an unknown one decides nothing
        return Mode.UNSET


def match_labels(policy: dict[str, Any]) -> dict[str, str]:
    """The policy's selector; empty (no selector, or an empty matchLabels) is namespace- or mesh-wide."""
    return dict(((policy.get("spec") or {}).get("selector") or {}).get("matchLabels") or {})


def own_mode(policy: dict[str, Any]) -> Mode:
    return _mode(((policy.get("spec") or {}).get("mtls") or {}).get("mode"))


def port_modes(policy: dict[str, Any]) -> dict[int, Mode]:
    """`portLevelMtls` as {container port: mode}; the key may come as a string or a number in JSON."""
    found: dict[int, Mode] = {}
    for port, cfg in ((policy.get("spec") or {}).get("portLevelMtls") or {}).items():
        try:
            found[int(port)] = _mode((cfg or {}).get("mode"))
        except (TypeError, ValueError):
            continue
    return found


def is_meshwave_policy(policy: dict[str, Any]) -> bool:
    """A policy meshwave created: its own label (a policy it did not create never carries it)."""
    key, value = MESHWAVE_LABEL
    return (_meta(policy).get("labels") or {}).get(key) == value


def oldest(policies: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Istio's order (pilot's sortConfigByCreationTime): creationTimestamp, then name, then namespace."""
    return min(policies, key=lambda p: (_meta(p).get("creationTimestamp") or "", _meta(p).get("name", ""),
                                        _meta(p).get("namespace", "")), default=None)


class PolicyRef(BaseModel):
    """One PeerAuthentication as a decision sees it."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    name: str
    scope: Scope
    mode: Mode
    ports: dict[int, Mode] = Field(default_factory=dict)
    meshwave: bool = False
    created: str = ""

    @classmethod
    def of(cls, policy: dict[str, Any], scope: Scope) -> PolicyRef:
        meta = _meta(policy)
        return cls(namespace=meta.get("namespace", ""), name=meta.get("name", ""), scope=scope,
                   mode=own_mode(policy), ports=port_modes(policy), meshwave=is_meshwave_policy(policy),
                   created=meta.get("creationTimestamp") or "")

    def __str__(self) -> str:
        ports = "".join(f", port {p} {m}" for p, m in sorted(self.ports.items()))
        owner = "meshwave's" if self.meshwave else "not meshwave's"
        return f"peerauthentication {self.namespace}/{self.name} ({self.scope}, {self.mode}{ports}; {owner})"


class EffectiveMtls(BaseModel):
    """What a workload's proxy enforces: a mode for the whole workload, and per container port."""

    model_config = ConfigDict(frozen=True)

    mode: Mode
    ports: dict[int, Mode] = Field(default_factory=dict)
    decided_by: PolicyRef | None = None  # the policy whose mode decided `mode`; None: Istio's default
    workload_policy: PolicyRef | None = None  # the workload policy in force
    shadowed: list[PolicyRef] = Field(default_factory=list)  # workload policies that match but are newer
    namespace_policy: PolicyRef | None = None
    mesh_policy: PolicyRef | None = None

    def for_port(self, port: int) -> Mode:
        return self.ports.get(port, self.mode)

    @property
    def strict_anywhere(self) -> bool:
        return self.mode == Mode.STRICT or Mode.STRICT in self.ports.values()

    @property
    def strict_everywhere(self) -> bool:
        return self.mode == Mode.STRICT and all(m == Mode.STRICT for m in self.ports.values())

    @property
    def foreign_workload_policies(self) -> list[PolicyRef]:
        """Workload policies that select these pods and that meshwave did not create, in force or not."""
        every = ([self.workload_policy] if self.workload_policy else []) + list(self.shadowed)
        return [p for p in every if not p.meshwave]

    def strict_sources(self) -> list[str]:
        """What makes the workload STRICT, by policy: empty when nothing is STRICT."""
        found = []
        if self.mode == Mode.STRICT:
            found.append(f"all ports: {self.decided_by or 'Istio default'}")
        found += [f"port {p}: {self.workload_policy}" for p, m in sorted(self.ports.items()) if m == Mode.STRICT]
        return found

    def describe(self) -> str:
        ports = "".join(f", port {p} {m}" for p, m in sorted(self.ports.items()))
        by = f"by {self.decided_by}" if self.decided_by else "(no policy applies: Istio's default)"
        return f"{self.mode}{ports} {by}"

    def summary(self) -> dict[str, Any]:
        """The JSON-safe form kept in a step's result (and so in the ledger and the report)."""
        return {"mode": str(self.mode), "ports": {str(p): str(m) for p, m in sorted(self.ports.items())},
                "decided_by": str(self.decided_by) if self.decided_by else None, "describe": self.describe()}


def _selects(policy: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    selector = match_labels(policy)
    return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())


def effective_mtls(policies: list[dict[str, Any]], root_namespace: str, namespace: str,
                   pod_labels: dict[str, str]) -> EffectiveMtls:
    """The mode Istio enforces on pods with `pod_labels` in `namespace`, from every policy given (those of
    the pod's namespace and of the root namespace; others are ignored, as Istio ignores them)."""
    in_ns = [p for p in policies if _meta(p).get("namespace") == namespace]
    in_root = [p for p in policies if _meta(p).get("namespace") == root_namespace]
    mesh = oldest([p for p in in_root if not match_labels(p)])
    ns_wide = oldest([p for p in in_ns if not match_labels(p)])
    selecting = [] if namespace == root_namespace else [p for p in in_ns if _selects(p, pod_labels)]
    workload = oldest(selecting)
    refs = {
        Scope.MESH: PolicyRef.of(mesh, Scope.MESH) if mesh else None,
        Scope.NAMESPACE: PolicyRef.of(ns_wide, Scope.NAMESPACE) if ns_wide else None,
        Scope.WORKLOAD: PolicyRef.of(workload, Scope.WORKLOAD) if workload else None,
    }
    mode, decided_by = Mode.PERMISSIVE, None
    for ref in refs.values():
        if ref is not None and ref.mode != Mode.UNSET:
            mode, decided_by = ref.mode, ref
    ports: dict[int, Mode] = {}
    if refs[Scope.WORKLOAD] is not None:
        ports = {p: (mode if m == Mode.UNSET else m) for p, m in refs[Scope.WORKLOAD].ports.items()}
    shadowed = [PolicyRef.of(p, Scope.WORKLOAD) for p in selecting if p is not workload]
    return EffectiveMtls(mode=mode, ports=ports, decided_by=decided_by, workload_policy=refs[Scope.WORKLOAD],
                         shadowed=sorted(shadowed, key=lambda r: (r.created, r.name)),
                         namespace_policy=refs[Scope.NAMESPACE], mesh_policy=refs[Scope.MESH])


def without(policies: list[dict[str, Any]], namespace: str, name: str) -> list[dict[str, Any]]:
    """The policies as they would be once `namespace/name` is deleted."""
    return [p for p in policies if (_meta(p).get("namespace"), _meta(p).get("name")) != (namespace, name)]
