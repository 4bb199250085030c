"""The topology file: which clusters, namespaces and services the lab simulates.

A topology is YAML validated with pydantic, so a mistake is reported with the file, the field path
and the problem (``seed.yaml: services[3].calls[0].service: unknown service 'x'``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meshlab.quota import quantity

# RFC 1123 label (namespaces, services, clusters) as Kubernetes checks it.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class TopologyError(ValueError):
    """A topology that cannot be used; the message names the file, the field and the problem."""


def _dns_label(value: str) -> str:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid RFC 1123 label (lower case alphanumerics and '-', "
            "starting and ending alphanumeric, at most 63 characters)"
        )
    return value


DnsLabel = Annotated[str, Field(min_length=1)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Mesh(Strict):
    """Mesh-wide behaviour of the simulated Istio."""

    root_namespace: DnsLabel = "istio-system"
    sidecar_memory_mi: float = Field(60, ge=0, description="Memory an injected istio-proxy uses.")
    sidecar_latency_ms: float = Field(0.5, ge=0, description="Latency each proxy on a hop adds.")
    revisions: list[str] = Field(default_factory=lambda: ["default"])


class Call(Strict):
    """One outbound dependency: each request served makes `per_request` calls to `service`."""

    service: str = Field(description="'name', 'namespace/name' or 'cluster/namespace/name'.")
    per_request: float = Field(1.0, gt=0)
    port: Port = 8080
    protocol: Literal["http", "tcp"] = "http"
    # A caller that calls in bursts (a batch job, a blackbox probe): the same average rate, all of it within the
    # first `burst_seconds` of every `burst_every_seconds` of the lab's clock.
    burst_every_seconds: float | None = Field(None, gt=0, description="Calls only in bursts, one per period.")
    burst_seconds: float = Field(3, gt=0, description="How long each burst lasts.")
    # TCP: bytes flow while a connection is open, whether or not new ones are opened. With no request rate of its
    # own the caller keeps one long-lived connection open (opened once, never closed).
    bytes_per_second: float = Field(0, ge=0, description="TCP: bytes the caller sends the service per second.")
    response_bytes_per_second: float = Field(0, ge=0, description="TCP: bytes the service sends back per second.")
    # Real call graphs have cycles (a callback, two services that ask each other); the lab's rates flow down the
    # graph, so a cycle would call itself forever. A call marked `cycle` closes one: it carries its rate, but what
    # it delivers is not passed on again (the lab models no recursion). Any other cycle is refused.
    cycle: bool = Field(False, description="This call closes a cycle of calls (the lab does not recurse along it).")

    @model_validator(mode="after")
    def _check_burst(self) -> Call:
        if self.burst_every_seconds is not None and self.burst_seconds > self.burst_every_seconds:
            raise ValueError(f"burst_seconds {self.burst_seconds:g} is longer than burst_every_seconds "
                             f"{self.burst_every_seconds:g}")
        if (self.bytes_per_second or self.response_bytes_per_second) and self.protocol != "tcp":
            raise ValueError("bytes_per_second and response_bytes_per_second are for protocol tcp")
        return self

    def burst_factor(self, start: float, end: float) -> float:
        """How much of its average rate the call sends over [start, end] (seconds of the lab's clock): 1 without
        bursts; with them, period / burst_seconds times the share of the interval inside a burst."""
        every = self.burst_every_seconds
        if every is None:
            return 1.0
        peak = every / self.burst_seconds
        if end <= start:  # an instant: inside a burst or not
            return peak if start % every < self.burst_seconds else 0.0
        return peak * _inside_bursts(start, end, every, self.burst_seconds) / (end - start)


def _inside_bursts(start: float, end: float, every: float, length: float) -> float:
    """Seconds of [start, end] inside the bursts [k x every, k x every + length)."""
    def until(t: float) -> float:  # burst seconds in [0, t]
        whole, rest = divmod(t, every)
        return whole * length + min(rest, length)
    return until(end) - until(start)


# Prometheus label names (the data model's rule); the ones the app metrics already carry are refused.
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
APP_METRIC_LABELS = ("cluster", "namespace", "pod", "code", "le")


class Service(Strict):
    """A workload: a Deployment with a Service, or a caller outside Kubernetes (`external`)."""

    name: DnsLabel
    cluster: str | None = None
    namespace: DnsLabel = "default"
    kind: Literal["deployment", "external"] = "deployment"
    criticality: Literal["critical", "high", "medium", "low"] = "medium"
    replicas: int = Field(2, ge=0)
    port: Port = 8080
    # Resources of the application container.
    memory_limit_mi: float = Field(512, gt=0)
    memory_request_mi: float | None = Field(None, gt=0)
    app_memory_mi: float = Field(200, ge=0)
    cpu_limit_m: int = Field(500, gt=0)
    # Behaviour and fault knobs (also changeable at run time through the admin endpoint).
    ingress_rps: float = Field(0, ge=0, description="Plaintext requests per second from outside the mesh.")
    latency_ms: float = Field(5, ge=0)
    error_rate: float = Field(0, ge=0, le=1)
    proxy_drop: float = Field(0, ge=0, le=1, description="Fraction of inbound requests (and TCP connections) the "
                              "service's own sidecar fails (503, response flag UF): they never reach the app. Only "
                              "pods with a sidecar.")
    app_metrics_label: str = Field("app", description="The label the application's own metrics name it by (an app "
                                   "that exports `service` instead of `app`, say).")

    @field_validator("app_metrics_label")
    @classmethod
    def _check_label(cls, value: str) -> str:
        if not LABEL_NAME.match(value) or value.startswith("__") or value in APP_METRIC_LABELS:
            raise ValueError(f"{value!r} is not a Prometheus label name the app metrics can use for the app")
        return value

    sidecar_memory_mi: float | None = Field(None, ge=0, description="Overrides mesh.sidecar_memory_mi.")
    legacy: bool = Field(False, description="Cannot take a sidecar: with one, the app crash-loops.")
    gateway: bool = Field(False, description="An Envoy of its own (ingress gateway): always mTLS-capable.")
    bypass_ports: list[Port] = Field(default_factory=list, description="Inbound ports that skip the sidecar.")
    calls: list[Call] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict, description="Pod template annotations, such as "
                                        "sidecar.istio.io/proxyMemoryLimit (the istio-proxy's own limit).")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels of the Deployment object itself "
                                   "(not its pods): an owner's marks such as criticality or a GitOps tool's.")
    traced: bool | None = Field(None, description="Its spans reach the trace pipeline (an OpenTelemetry SDK): what "
                                "the service graph metrics see. None: every deployment and gateway is traced, a "
                                "legacy service or a caller outside Kubernetes is not.")

    @property
    def is_traced(self) -> bool:
        if self.traced is not None:
            return self.traced
        return not (self.legacy or (self.kind == "external" and not self.gateway))

    _check_name = field_validator("name", "namespace")(_dns_label)


ResourceList = dict[str, str]


class ResourceQuotaSpec(Strict):
    """A ResourceQuota of the namespace: `hard` as in the API (pods, requests.memory, limits.cpu, ...)."""

    name: DnsLabel = "compute"
    hard: ResourceList

    @field_validator("hard")
    @classmethod
    def _check_hard(cls, value: ResourceList) -> ResourceList:
        return _quantities(value)


class LimitRangeItem(Strict):
    """One `spec.limits[]` entry of type Container (the kind the lab enforces)."""

    type: Literal["Container"] = "Container"
    default: ResourceList = Field(default_factory=dict)
    defaultRequest: ResourceList = Field(default_factory=dict)  # noqa: N815 (the API's field name)
    max: ResourceList = Field(default_factory=dict)
    min: ResourceList = Field(default_factory=dict)

    @field_validator("default", "defaultRequest", "max", "min")
    @classmethod
    def _check(cls, value: ResourceList) -> ResourceList:
        return _quantities(value)


class LimitRangeSpec(Strict):
    name: DnsLabel = "limits"
    limits: list[LimitRangeItem] = Field(min_length=1)


class Namespace(Strict):
    name: DnsLabel
    labels: dict[str, str] = Field(default_factory=dict)
    resource_quotas: list[ResourceQuotaSpec] = Field(default_factory=list)
    limit_ranges: list[LimitRangeSpec] = Field(default_factory=list)

    _check_name = field_validator("name")(_dns_label)


class NodeSpec(Strict):
    """A node's allocatable resources (what the scheduler fits pods' requests into)."""

    name: DnsLabel
    cpu: str = "8"
    memory: str = "32Gi"
    pods: int = Field(110, ge=1)

    @field_validator("cpu", "memory")
    @classmethod
    def _check_quantity(cls, value: str) -> str:
        return _quantities({"value": value})["value"]


# Istio's install default for every injected proxy (istio-discovery values.yaml global.proxy.resources).
ISTIO_PROXY_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2000m", "memory": "1024Mi"}}


def _quantities(value: ResourceList) -> ResourceList:
    for key, text in value.items():
        if quantity(text) is None:
            raise ValueError(f"{key}: {text!r} is not a Kubernetes quantity")
    return value


class Cluster(Strict):
    name: DnsLabel
    namespaces: list[Namespace] = Field(default_factory=list)
    revisions: list[str] | None = Field(None, description="Istio control-plane revisions installed here (None: "
                                                         "mesh.revisions; 'default' is an unrevisioned install).")
    default_revision: str | None = Field(None, description="The revision the `default` tag points to (unset: "
                                                          "'default' when installed, else a revision-only install).")
    metrics_merge: bool = Field(False, description="Istio's metrics merging rewrites injected pods' prometheus.io "
                                                   "annotations to the agent's :15020.")
    image_digest: bool = Field(False, description="An admission webhook pins new pods' images to digests.")
    peer_authentication_versions: list[Literal["v1", "v1beta1"]] | None = Field(
        None, min_length=1, description="The security.istio.io versions served (None: v1 and v1beta1, Istio 1.22+; "
                                        "[v1beta1]: an older Istio, which answers 404 at v1).")
    proxy_resources: dict[Literal["requests", "limits"], ResourceList] = Field(
        default_factory=lambda: {k: dict(v) for k, v in ISTIO_PROXY_RESOURCES.items()},
        description="The injector's values.global.proxy.resources: every proxy's requests and limits unless a "
                    "sidecar.istio.io/proxy* annotation is set (Istio's default: 100m/128Mi, limits 2000m/1024Mi).")
    nodes: list[NodeSpec] | None = Field(None, description="Nodes and their allocatable resources (None: one node "
                                                           "too large to ever be full).")
    keep_strict: list[str] = Field(
        default_factory=list, description="PeerAuthentications ('namespace/name') a validating admission webhook "
        "(Gatekeeper, validation.gatekeeper.sh) keeps STRICT: a create or update leaving their mode or a port anything "
        "but STRICT is denied, 403, as a Gatekeeper constraint denies it.")

    _check_name = field_validator("name")(_dns_label)

    @field_validator("keep_strict")
    @classmethod
    def _check_keep_strict(cls, value: list[str]) -> list[str]:
        for ref in value:
            parts = ref.split("/")
            if len(parts) != 2:
                raise ValueError(f"keep_strict: {ref!r} is not namespace/name")
            for part in parts:
                _dns_label(part)
        return value

    @field_validator("revisions")
    @classmethod
    def _check_revisions(cls, value: list[str] | None) -> list[str] | None:
        for rev in value or []:
            _dns_label(rev)
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"duplicate revision in {value!r}")
        return value

    def resolve_revisions(self, mesh_revisions: list[str]) -> None:
        """Fill in the mesh's revisions and the usual `default` tag; a tag must name an installed revision."""
        if self.revisions is None:
            self.revisions = list(mesh_revisions)
        if "default_revision" not in self.model_fields_set:
            self.default_revision = "default" if "default" in self.revisions else None
        if self.default_revision is not None and self.default_revision not in self.revisions:
            raise ValueError(f"default_revision: {self.default_revision!r} is not one of the cluster's revisions "
                             f"{self.revisions!r}")


class PolicySpec(Strict):
    """A PeerAuthentication to create at start (the seed's mesh-wide STRICT, for instance)."""

    cluster: str | None = None
    namespace: DnsLabel
    name: DnsLabel
    mode: Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"] = "PERMISSIVE"
    selector: dict[str, str] | None = None
    labels: dict[str, str] = Field(default_factory=dict)  # e.g. app.kubernetes.io/managed-by: meshwave (as it writes)


class Topology(Strict):
    name: str = "meshlab"
    mesh: Mesh = Field(default_factory=Mesh)
    clusters: list[Cluster] = Field(min_length=1)
    services: list[Service] = Field(default_factory=list)
    peer_authentications: list[PolicySpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> Topology:
        cluster_names = [c.name for c in self.clusters]
        _no_duplicates(cluster_names, "clusters", "cluster")
        for i, cluster in enumerate(self.clusters):
            try:
                cluster.resolve_revisions(self.mesh.revisions)
            except ValueError as exc:
                raise ValueError(f"clusters[{i}].{exc}") from None
        default_cluster = cluster_names[0]
        seen: set[tuple[str, str, str]] = set()
        for i, svc in enumerate(self.services):
            svc.cluster = svc.cluster or default_cluster
            if svc.cluster not in cluster_names:
                raise ValueError(f"services[{i}].cluster: unknown cluster {svc.cluster!r}")
            key = (svc.cluster, svc.namespace, svc.name)
            if key in seen:
                raise ValueError(f"services[{i}]: duplicate service {'/'.join(key)}")
            seen.add(key)
        for i, svc in enumerate(self.services):
            for j, call in enumerate(svc.calls):
                target = self.resolve(call.service, svc)
                if target is None:
                    raise ValueError(f"services[{i}].calls[{j}].service: unknown service {call.service!r}")
                call.service = "/".join(target)
        for i, pa in enumerate(self.peer_authentications):
            pa.cluster = pa.cluster or default_cluster
            if pa.cluster not in cluster_names:
                raise ValueError(f"peer_authentications[{i}].cluster: unknown cluster {pa.cluster!r}")
        cycle = _find_cycle(self.services)
        if cycle:
            raise ValueError(f"services: calls form a cycle: {' -> '.join(cycle)}")
        return self

    def resolve(self, ref: str, caller: Service) -> tuple[str, str, str] | None:
        """Resolve 'name', 'namespace/name' or 'cluster/namespace/name' relative to a caller."""
        parts = ref.split("/")
        if len(parts) == 1:
            key = (caller.cluster or "", caller.namespace, parts[0])
        elif len(parts) == 2:
            key = (caller.cluster or "", parts[0], parts[1])
        elif len(parts) == 3:
            key = (parts[0], parts[1], parts[2])
        else:
            return None
        known = {(s.cluster, s.namespace, s.name) for s in self.services}
        return key if key in known else None


def _no_duplicates(names: list[str], field: str, what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{field}: duplicate {what} {dupes[0]!r}")


def _find_cycle(services: list[Service]) -> list[str] | None:
    graph = {f"{s.cluster}/{s.namespace}/{s.name}": [c.service for c in s.calls if not c.cycle] for s in services}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc + ': ' if loc else ''}{msg}")
    return "\n".join(lines)


def parse_topology(data: object, source: str = "<topology>") -> Topology:
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: the topology must be a mapping, got {type(data).__name__}")
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        raise TopologyError(format_errors(source, exc)) from None


def load_topology(path: str | Path) -> Topology:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML: {exc}") from None
    return parse_topology(data, str(path))
