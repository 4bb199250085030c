"""The proposer's data: frozen pydantic models, so a stage cannot change what an earlier one found."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Criticality = Literal["critical", "high", "medium", "low"]
CRITICALITY_RANK: dict[str, int] = {"low": 0, "medium": 1, "high": 2, "critical": 3}


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProxyResources(Frozen):
    """The istio-proxy's requests and limits as the injector would write them (headroom.proxy_sizing)."""

    cpu_request_m: float = 0
    cpu_limit_m: float | None = None
    memory_request_mi: float = 0
    memory_limit_mi: float | None = None
    source: str = ""


class Workload(Frozen):
    """One Deployment as the proposer needs it."""

    cluster: str
    namespace: str
    name: str
    replicas: int
    criticality: Criticality = "medium"
    pods: int = 0
    pods_with_sidecar: int = 0
    app_memory_limit_mi: float | None = None  # the app containers' limits, per pod
    app_memory_working_set_mi: float | None = None  # the largest app working set of a pod over the lookback
    injection_labels: dict[str, str] = Field(default_factory=dict)  # namespace and pod labels that decide injection
    revision: str | None = None  # the revision its labels point at, if any
    gitops: str | None = None  # who would revert a change (meshwave.gitops)
    peer_authentications: list[str] = Field(default_factory=list)  # "ns/name (scope MODE)" that apply to it
    mtls: str = "PERMISSIVE"  # the mode its pods enforce now, from every policy
    proxy: ProxyResources = Field(default_factory=ProxyResources)
    cannot_mesh: str | None = None  # why it cannot get a sidecar (an owner's opt-out), None when it can
    gateway: bool = False  # an Envoy of its own (Istio's gateways): mTLS-capable, never planned

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"

    @property
    def meshed(self) -> bool:
        return self.gateway or (self.pods > 0 and self.pods_with_sidecar == self.pods)


class Inventory(Frozen):
    workloads: list[Workload]
    notes: list[str] = Field(default_factory=list)

    def by_key(self) -> dict[str, Workload]:
        return {w.key: w for w in self.workloads}


class Edge(Frozen):
    """Calls from `client` to `server` over the lookback. A client that is no Deployment of the inventory is named
    as the telemetry names it (`user`: traces with no parent span, a caller that is not traced)."""

    client: str  # an inventory key, or the telemetry's name for a caller outside it
    server: str  # an inventory key, or the name of a callee outside it
    rate: float  # requests (or TCP connections, or bytes for a long-lived one) per second
    failed_rate: float = 0.0
    protocol: Literal["http", "tcp"] = "http"
    sources: list[str] = Field(default_factory=list)  # "istio", "servicegraph"


class CallGraph(Frozen):
    edges: list[Edge]
    app_rates: dict[str, float] = Field(default_factory=dict)  # inventory key -> requests/s its own metrics saw
    lookback_seconds: float
    notes: list[str] = Field(default_factory=list)


class PlannedService(Frozen):
    key: str
    criticality: Criticality
    strict: bool
    reason: str = ""  # why not STRICT
    sidecar_memory_limit: str | None = None  # an override for an undersized proxy limit
    note: str = ""  # e.g. the proxy limit its team set and what it needs


class PlannedWave(Frozen):
    name: str
    services: list[PlannedService]
    description: str = ""


class Proposal(Frozen):
    waves: list[PlannedWave]
    excluded: dict[str, str] = Field(default_factory=dict)  # key -> why it is not planned
    unmeshable_callers: dict[str, list[str]] = Field(default_factory=dict)  # caller -> the services it calls
    idle: list[str] = Field(default_factory=list)
    undersized: dict[str, str] = Field(default_factory=dict)  # key -> what it needs
    notes: list[str] = Field(default_factory=list)
