"""The emergency rollback: what the `mesh_emergency_rollback` DAG does, without Airflow imports.

- scope: the trigger form's values, validated before anything is changed (every bad field named);
- stage 1: every PeerAuthentication in scope that is STRICT (mode or any port) goes to PERMISSIVE, the
  mesh-wide one in the root namespace always; the object is kept, its previous modes annotated; no restart;
- stage 2: the workloads in scope that have a sidecar, ordered critical first (from the plans), in chunks;
- stage 3: the application's own success rate per workload, one query per cluster, judged against a floor.

Independent of the wave DAGs: only the plans' cluster list and criticality are read (local files), and a
broken plan file hides only its own clusters (`cluster_connections` names any cluster explicitly).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from string import Template
from typing import TYPE_CHECKING, Any

from meshwave.access import check_connection_id, connection_prefixes
from meshwave.changes import Change
from meshwave.fleet import Fleet
from meshwave.gitops import revert_note, reverted_by
from meshwave.kube_errors import AccessDenied, ClusterUnreachable, Conflict, KubeError, WorkloadNotFound
from meshwave.mtls import effective_mtls, match_labels
from meshwave.names import rfc1123_label
from meshwave.peer_auth import strict_parts
from meshwave.plan import CONN_ID
from meshwave.prometheus import PrometheusError, Source, load_queries, validate_label, validate_window

if TYPE_CHECKING:  # the kubernetes client loads where a cluster is called, not at DAG parse
    from meshwave.kube import MeshKube, WorkloadState

ALL = "all"
CRITICALITY = ("critical", "high", "medium", "low")  # then: unknown (not in any plan)
HEALTH_QUERY = "app_success_rate_by_workload"
EPSILON = 1e-9
GATEWAY_LABEL = "istio"  # istio: ingressgateway / egressgateway: a gateway IS a proxy, never "un-injected"
LIMITS = {"max_parallel": (1, 50), "rollout_timeout_seconds": (10, 3600), "health_timeout_seconds": (0, 7200),
          "confirm_timeout_seconds": (10, 24 * 3600)}


class ScopeError(ValueError):
    """The form's values cannot be used; one line per bad field, each naming it."""


# ---- scope --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One cluster in scope and the Airflow connections that reach it."""

    cluster: str
    kubernetes_conn_id: str
    prometheus_conn_id: str
    root_namespace: str = "istio-system"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Scope:
    clusters: tuple[str, ...]
    namespace: str | None = None
    services: tuple[str, ...] = ()  # "namespace/workload"

    @property
    def whole_clusters(self) -> bool:
        return self.namespace is None and not self.services

    def namespaces(self) -> list[str] | None:
        """The namespaces in scope; None: all of them."""
        if self.services:
            return sorted({s.split("/")[0] for s in self.services})
        return [self.namespace] if self.namespace else None

    def covers(self, namespace: str, workload: str) -> bool:
        if self.services:
            return f"{namespace}/{workload}" in self.services
        return self.namespace is None or namespace == self.namespace

    def describe(self) -> str:
        where = ", ".join(self.clusters)
        if self.services:
            return f"services {', '.join(self.services)} in {where}"
        return f"namespace {self.namespace} in {where}" if self.namespace else f"clusters {where} (every namespace)"

    def to_dict(self) -> dict[str, Any]:
        return {"clusters": list(self.clusters), "namespace": self.namespace, "services": list(self.services)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scope:
        return cls(tuple(data["clusters"]), data.get("namespace"), tuple(data.get("services") or ()))


@dataclass
class Request:
    """The validated form: what to touch, how, and how to judge health."""

    scope: Scope
    targets: list[Target]
    dry_run: bool = True
    remove_sidecars: bool = False
    max_parallel: int = 5
    rollout_timeout_seconds: int = 300
    min_success_rate: float = 0.99
    health_window: str = "1m"
    health_timeout_seconds: int = 300
    # one run: a dry run's plan of action, a person's confirmation, then the rollback (mesh_emergency_rollback's
    # `confirm` task); until confirmed the run is a dry run, whatever `dry_run` says
    confirm: bool = False
    confirm_timeout_seconds: int = 900
    notes: list[str] = field(default_factory=list)

    def applying(self) -> Request:
        """The same request, confirmed: the rollback is applied."""
        return replace(self, dry_run=False, confirm=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scope"] = self.scope.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Request:
        values = dict(data)
        values["scope"] = Scope.from_dict(values["scope"])
        values["targets"] = [Target(**t) for t in values["targets"]]
        return cls(**values)


def _as_list(value: Any) -> list[Any]:
    """A list from the form, or from REST/CLI conf given as one comma/space/newline-separated string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v for v in re.split(r"[\s,]+", value) if v]
    return list(value) if isinstance(value, list | tuple) else [value]


def _check(errors: list[str], field_name: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        errors.append(text if text.startswith(f"{field_name}") else f"{field_name}: {text}")
        return None


def _number(value: Any, field_name: str, low: float, high: float, kind: type = int) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
        raise ValueError(f"{field_name}: {value!r} is not {'an integer' if kind is int else 'a number'}")
    if not low <= value <= high:
        raise ValueError(f"{field_name}: {value!r} is out of range {low}-{high}")
    return kind(value)


def _service(value: Any) -> str:
    if not isinstance(value, str) or value.count("/") != 1:
        raise ValueError(f"services: {value!r} is not namespace/workload (e.g. payments/payment-service)")
    ns, workload = value.split("/")
    rfc1123_label(ns, f"services: {value}: namespace")
    rfc1123_label(workload, f"services: {value}: workload")
    return value


def _extra_targets(value: Any) -> dict[str, Target]:
    """`cluster_connections`: {cluster: {kubernetes_conn_id, prometheus_conn_id[, root_namespace]}}."""
    if value in (None, "", {}):
        return {}
    if not isinstance(value, dict):
        raise ValueError("cluster_connections: must be an object {cluster: {kubernetes_conn_id, prometheus_conn_id}}")
    found = {}
    for cluster, cfg in value.items():
        where = f"cluster_connections.{cluster}"
        rfc1123_label(cluster, f"{where}: cluster name")
        if not isinstance(cfg, dict) or set(cfg) - {"kubernetes_conn_id", "prometheus_conn_id", "root_namespace"}:
            raise ValueError(f"{where}: must be {{kubernetes_conn_id, prometheus_conn_id, root_namespace?}}")
        for key in ("kubernetes_conn_id", "prometheus_conn_id"):
            if not isinstance(cfg.get(key), str) or not CONN_ID.match(cfg[key]):
                raise ValueError(f"{where}.{key}: {cfg.get(key)!r} is not an Airflow connection id")
            # the form may name only connections of the allow-list, not any credentials Airflow holds
            check_connection_id(cfg[key], f"{where}.{key}", connection_prefixes())
        root = rfc1123_label(cfg.get("root_namespace", "istio-system"), f"{where}.root_namespace")
        found[cluster] = Target(cluster, cfg["kubernetes_conn_id"], cfg["prometheus_conn_id"], root)
    return found


def _targets(value: Any, fleet: Fleet, extra: dict[str, Target]) -> list[Target]:
    known = {name: Target(name, c.kubernetes_conn_id, c.prometheus_conn_id, c.root_namespace)
             for name, c in fleet.clusters.items()}
    known.update(extra)
    names = _as_list(value) or [ALL]
    if ALL in names:
        if len(names) > 1:
            raise ValueError(f"clusters: '{ALL}' cannot be combined with named clusters ({names})")
        if not known:
            raise ValueError("clusters: 'all', but no plan file names a cluster (see the plan errors below); name "
                             "the clusters and give their connections in cluster_connections")
        return [known[n] for n in sorted(known)]
    for name in names:
        rfc1123_label(name, "clusters")
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"clusters: {', '.join(unknown)} not in any plan (known: {', '.join(sorted(known)) or 'none'})"
                         "; give their connections in cluster_connections")
    return [known[n] for n in dict.fromkeys(names)]


def parse_request(params: dict[str, Any], fleet: Fleet) -> Request:
    """Every field of the form checked before any change; ScopeError lists each bad field by name."""
    errors: list[str] = []
    extra = _check(errors, "cluster_connections", _extra_targets, params.get("cluster_connections")) or {}
    targets = _check(errors, "clusters", _targets, params.get("clusters"), fleet, extra) or []
    namespace = params.get("namespace") or None
    if namespace is not None:
        _check(errors, "namespace", rfc1123_label, namespace, "namespace")
    services = tuple(dict.fromkeys(s for s in (_check(errors, "services", _service, v)
                                               for v in _as_list(params.get("services"))) if s))
    outside = [s for s in services if namespace and s.split("/")[0] != namespace]
    if outside:
        errors.append(f"services: {', '.join(outside)} not in namespace {namespace} (leave namespace empty, or "
                      "list only its services)")
    numbers = {name: _check(errors, name, _number, params.get(name, Request.__dataclass_fields__[name].default),
                            name, *LIMITS[name]) for name in LIMITS}
    rate = _check(errors, "min_success_rate", _number, params.get("min_success_rate", 0.99), "min_success_rate",
                  0, 1, float)
    window = _check(errors, "health_window", validate_window, params.get("health_window", "1m"), "health_window")
    flags = {}
    for name, default in (("dry_run", True), ("remove_sidecars", False), ("confirm", False)):
        flags[name] = params.get(name, default)
        if not isinstance(flags[name], bool):
            errors.append(f"{name}: {flags[name]!r} is not true or false")
    if errors:
        plan_errors = [f"  (plan file error: {e.splitlines()[0]})" for e in fleet.errors]
        raise ScopeError("the emergency rollback did not start, nothing was changed:\n  "
                         + "\n  ".join(errors) + ("\n" + "\n".join(plan_errors) if plan_errors else ""))
    scope = Scope(tuple(t.cluster for t in targets), namespace, services)
    notes = [f"plan file error (its clusters are unknown here unless in cluster_connections): {e.splitlines()[0]}"
             for e in fleet.errors]
    # to be confirmed, the run starts as a dry run (its plan of action is what the person confirms)
    dry_run = flags["dry_run"] or flags["confirm"]
    return Request(scope, targets, dry_run, flags["remove_sidecars"], notes=notes, min_success_rate=rate,
                   health_window=window, confirm=flags["confirm"], **numbers)


# ---- stage 1: PeerAuthentications back to PERMISSIVE ------------------------------------------------------
def policy_in_scope(policy: dict[str, Any], scope: Scope, root_namespace: str,
                    service_labels: dict[str, dict[str, str]]) -> str | None:
    """Why a policy is in scope ("mesh-wide", "namespace-wide", "workload"), or None when it is not.

    The mesh-wide policy (root namespace, no selector) always is; a selector policy in the root namespace
    is ignored by Istio and left alone. With a list of services: the namespace-wide policies of their
    namespaces and the workload policies selecting their pods (`service_labels`: pod template labels).
    """
    meta = policy.get("metadata") or {}
    ns = meta.get("namespace", "")
    selectorless = not match_labels(policy)
    if ns == root_namespace:
        return "mesh-wide" if selectorless else None
    kind = "namespace-wide" if selectorless else "workload"
    if scope.services:
        if ns not in (scope.namespaces() or []):
            return None
        if selectorless:
            return kind
        match = match_labels(policy)
        selected = any(all(labels.get(k) == v for k, v in match.items())
                       for key, labels in service_labels.items() if key.split("/")[0] == ns)
        return kind if selected else None
    return kind if scope.namespace in (None, ns) else None


def _service_labels(kube: MeshKube, scope: Scope) -> tuple[dict[str, dict[str, str]], list[str]]:
    labels, missing = {}, []
    for key in scope.services:
        ns, name = key.split("/")
        try:
            labels[key] = kube.workload(ns, name).template_labels
        except WorkloadNotFound:
            missing.append(key)
    return labels, missing


def _scope_policies(kube: MeshKube, scope: Scope) -> list[dict[str, Any]]:
    if scope.whole_clusters:
        return kube.mtls.list(None)
    found = kube.mtls.list(kube.root_namespace)
    for ns in scope.namespaces() or []:
        if ns != kube.root_namespace:
            found += kube.mtls.list(ns)
    return found


SCOPE_ORDER = ("mesh-wide", "namespace-wide", "workload")  # the widest first: it cuts off the most callers


def _in_order(policies: list[dict[str, Any]], scope: Scope, root: str, labels: dict[str, dict[str, str]]
              ) -> list[tuple[str, dict[str, Any]]]:
    """(why in scope, policy) for every policy in scope, mesh-wide first, then namespace-wide, then workload
    (a cluster-wide LIST is sorted by namespace, which would put istio-system/default nearly last)."""
    found = [(why, p) for p in policies if (why := policy_in_scope(p, scope, root, labels)) is not None]
    return sorted(found, key=lambda wp: (SCOPE_ORDER.index(wp[0]), _ref(wp[1])))


def _ref(policy: dict[str, Any]) -> str:
    meta = policy.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def refusal(exc: KubeError) -> str:
    """Why a write was refused, in an SRE's words: webhook denial, RBAC, conflict, or the API's code."""
    text = f"{exc.api_message or exc}"
    if "admission webhook" in text:
        return "webhook denial"
    if isinstance(exc, AccessDenied):
        return "RBAC"
    if isinstance(exc, Conflict):
        return "conflict"
    return f"error {exc.code}" if exc.code else "error"


def would_relax(kube: MeshKube, scope: Scope) -> frozenset[str]:
    """The policies ("ns/name") stage 1 relaxes on this cluster: what a dry run's stage 2 counts as relaxed, since the
    dry run's stage 1 wrote nothing (the real run's stage 2 finds them relaxed)."""
    labels, _ = _service_labels(kube, scope) if scope.services else ({}, [])
    return frozenset(_ref(p) for _, p in _in_order(_scope_policies(kube, scope), scope, kube.root_namespace, labels)
                     if strict_parts(p))


def relax_cluster(kube: MeshKube, scope: Scope, note: str) -> dict[str, Any]:
    """Stage 1 on one cluster: every STRICT policy in scope to PERMISSIVE, the widest first. No restart; idempotent.

    A policy that cannot be written (a webhook, RBAC on its namespace, someone else writing it) is recorded in
    `failed` and the others are still tried; `not_relaxed` is what is still STRICT after the writes and why. An
    API server that stops answering ends the cluster's attempt (the task is retried; relaxed policies stay so)."""
    started = time.time()
    labels, missing = _service_labels(kube, scope) if scope.services else ({}, [])
    changes: list[Change] = []
    seen, failed = [], {}
    for why, policy in _in_order(_scope_policies(kube, scope), scope, kube.root_namespace, labels):
        meta, owner = policy.get("metadata") or {}, reverted_by(policy)
        seen.append({"policy": _ref(policy), "scope": why, "strict": strict_parts(policy), "reverted_by": owner})
        if not strict_parts(policy):
            continue
        try:
            change = kube.mtls.relax(meta["namespace"], meta["name"], note, current=policy)
        except ClusterUnreachable:
            raise
        except KubeError as exc:  # recorded; the next policy is still tried
            failed[_ref(policy)] = {"policy": _ref(policy), "scope": why, "why": refusal(exc), "code": exc.code,
                                    "message": str(exc)}
            continue
        if change.request is not None:  # Argo CD or Flux self-heal puts STRICT back: say so with the change
            change.reason += revert_note(owner)
        changes.append(change)
    return {"cluster": kube.cluster, "started": started, "ended": time.time(), "policies": seen,
            "changes": [c.to_dict() for c in changes], "missing_services": missing, "dry_run": kube.dry_run,
            "failed": list(failed.values()), "not_relaxed": _not_relaxed(kube, scope, labels, failed),
            "still_strict": _still_strict(kube, scope, labels)}


def _not_relaxed(kube: MeshKube, scope: Scope, labels: dict[str, dict[str, str]],
                 failed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The policies in scope still STRICT after the writes (read again: a controller may have put one back), each
    with why: the write's refusal, or that it is STRICT again. A dry run changed nothing: its refusals only."""
    if kube.dry_run:
        return list(failed.values())
    left = []
    for why, policy in _in_order(_scope_policies(kube, scope), scope, kube.root_namespace, labels):
        if strict_parts(policy):
            ref = _ref(policy)
            left.append(failed.get(ref) or {"policy": ref, "scope": why, "why": "STRICT again after the write",
                                            "code": None, "message": f"STRICT again{revert_note(reverted_by(policy))}"})
    return left


def _still_strict(kube: MeshKube, scope: Scope, labels: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """The services in scope whose pods Istio still makes STRICT somewhere, computed from every policy after the
    writes (a policy out of scope, one that could not be written): the data plane, not the changes, decides."""
    if kube.dry_run or not scope.services:
        return {}
    found = {}
    for key, pod_labels in labels.items():
        ns = key.split("/")[0]
        state = effective_mtls(kube.mtls.applying_to(ns), kube.root_namespace, ns, pod_labels)
        if state.strict_anywhere:
            found[key] = state.strict_sources()
    return found


# ---- stage 2: sidecars out, critical first ------------------------------------------------------------------
def criticality_of(fleet: Fleet) -> dict[str, str]:
    """"cluster/namespace/workload" -> criticality, from every plan that loads."""
    return {key: planned.service.criticality for key, planned in fleet.services.items()}


def rank(criticality: str | None) -> int:
    return CRITICALITY.index(criticality) if criticality in CRITICALITY else len(CRITICALITY)


def with_sidecar(workloads: Iterable[WorkloadState], scope: Scope, root_namespace: str) -> list[WorkloadState]:
    """The workloads in scope that have a sidecar in at least one pod (never the root namespace or a gateway)."""
    return [w for w in workloads if w.pods_with_proxy and w.namespace != root_namespace
            and GATEWAY_LABEL not in w.template_labels and scope.covers(w.namespace, w.name)]


def order_targets(items: Sequence[dict[str, Any]], criticality: dict[str, str]) -> list[dict[str, Any]]:
    """Critical first, then high, medium, low, and services no plan knows last; by name within a rank."""
    def key(item: dict[str, Any]) -> tuple[int, str]:
        name = f"{item['cluster']}/{item['namespace']}/{item['workload']}"
        return rank(criticality.get(name)), name

    return [{**i, "criticality": criticality.get(f"{i['cluster']}/{i['namespace']}/{i['workload']}", "unknown")}
            for i in sorted(items, key=key)]


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    if size < 1:
        raise ValueError(f"max_parallel: must be at least 1, got {size}")
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def sidecar_workloads(kube: MeshKube, scope: Scope) -> list[dict[str, Any]]:
    """Stage 2's candidates on one cluster: two list requests per namespace in scope."""
    namespaces = scope.namespaces() or kube.namespace_names()
    found = []
    for ns in namespaces:
        for w in with_sidecar(kube.workloads_in(ns), scope, kube.root_namespace):
            found.append({"cluster": kube.cluster, "namespace": w.namespace, "workload": w.name,
                          "pods": w.pods_total, "with_proxy": w.pods_with_proxy, "reverted_by": w.reverted_by})
    return found


# ---- stage 3: health from Prometheus --------------------------------------------------------------------
def health_query(window: str, cluster: str | None) -> str:
    """The per-workload application success rate of one cluster, from queries.yaml (validated values)."""
    template = load_queries()[HEALTH_QUERY]
    values = {"window": validate_window(window),
              "cluster": f', cluster="{validate_label("cluster", cluster)}"' if cluster is not None else ""}
    return Template(template.promql).substitute(values)


def judge(cluster: str, samples: Iterable[Any], scope: Scope, floor: float) -> list[dict[str, Any]]:
    """One row per workload in scope: healthy, unhealthy (below the floor) or no traffic (NaN: 0/0)."""
    rows = {}
    for s in samples:
        ns, app = s.labels.get("namespace", ""), s.labels.get("app", "")
        if not scope.covers(ns, app):
            continue
        value = s.value if math.isfinite(s.value) else None
        status = "no traffic" if value is None else ("healthy" if value >= floor - EPSILON else "unhealthy")
        rows[f"{ns}/{app}"] = {"cluster": cluster, "service": f"{ns}/{app}", "success_rate": value, "status": status}
    for key in scope.services:
        rows.setdefault(key, {"cluster": cluster, "service": key, "success_rate": None, "status": "no data"})
    return [rows[k] for k in sorted(rows)]


def check_health(sources: dict[str, Source], scope: Scope, floor: float, window: str) -> dict[str, Any]:
    """One poll: one query per cluster. `healthy` only when no cluster erred and no service is below the floor."""
    rows: list[dict[str, Any]] = []
    errors = {}
    for cluster, source in sources.items():
        try:
            samples = source.instant(health_query(window, source.cluster))
        except PrometheusError as exc:
            errors[cluster] = str(exc)
            continue
        rows += judge(cluster, samples, scope, floor)
    unhealthy = [r for r in rows if r["status"] == "unhealthy"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("healthy", "unhealthy", "no traffic", "no data")}
    return {"at": time.time(), "healthy": not unhealthy and not errors and bool(rows), "rows": rows,
            "unhealthy": unhealthy, "errors": errors, "counts": counts}


def last_unhealthy_query(window: str, cluster: str | None, floor: float, seconds: int) -> str:
    """Per workload, the last time (1 s steps, over the past `seconds`) its success rate was below the floor."""
    floor = _number(floor, "min_success_rate", 0, 1, float)
    return f"max_over_time(timestamp(({health_query(window, cluster)}) < {floor!r})[{int(seconds)}s:1s])"


def recovered_at(sources: dict[str, Source], scope: Scope, floor: float, window: str, since: float,
                 now: float) -> float | None:
    """When every service in scope got back above the floor for good, from Prometheus' own history: one second
    after the last sample below it since `since` (stage-1 start), or `since` if none was. None if a query fails.

    Independent of when stage 3 happened to look (scheduler and triggerer latency)."""
    last = since
    seconds = max(1, math.ceil(now - since))
    for source in sources.values():
        try:
            samples = source.instant(last_unhealthy_query(window, source.cluster, floor, seconds))
        except PrometheusError:
            return None
        for s in samples:
            if scope.covers(s.labels.get("namespace", ""), s.labels.get("app", "")) and math.isfinite(s.value):
                last = max(last, s.value + 1)
    return min(last, now)


# ---- report ---------------------------------------------------------------------------------------------
def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width table for task logs."""
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def stage1_window(results: Iterable[dict[str, Any] | None]) -> tuple[float | None, float | None]:
    done = [r for r in results if r]
    if not done:
        return None, None
    return min(r["started"] for r in done), max(r["ended"] for r in done)
