"""The lab: clusters built from a topology, ticked forward in real time.

Each tick: every cluster's controller reconciles deployments and pods, the mesh computes the request
flow from what is running and which policies apply, and the telemetry counters advance. Each cluster's store
admits new pods as its API server would: Istio's injector (driven by the MutatingWebhookConfigurations the
cluster's revisions install), metrics merging and image digest pinning where the topology turns them on.
A topology service's traffic goes to the ready pods of every Deployment its Service selects (a canary copy too), and
a Deployment that is no topology service runs the app of the topology service whose Service selects its pods.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from meshlab import admission as resource_admission
from meshlab import resources as r
from meshlab.controller import MI, Behaviour, Controller, Timing, has_proxy, is_ready, owner_name
from meshlab.errors import ApiError, gatekeeper_denied
from meshlab.injection import DEFAULT_REVISION, Admission, excluded_ports, injector_config_map, webhook_configurations
from meshlab.mesh import Endpoint, Flows, Workload, WorkloadKey, compute_flows, effective_mode
from meshlab.selectors import matches_labels
from meshlab.store import Event, Store
from meshlab.telemetry import Telemetry
from meshlab.topology import Cluster, Service, Topology, TopologyError, format_errors

# Fault knobs the admin endpoint may change at run time.
KNOBS = ("replicas", "ingress_rps", "latency_ms", "error_rate", "app_memory_mi", "sidecar_memory_mi", "legacy",
         "bypass_ports", "calls", "proxy_drop", "app_metrics_label")


class ClusterStore(Store):
    """A cluster's store behind its admission chain: new pods are mutated as the cluster's webhooks would. The
    webhook configurations are the install's, generated at start: read-only through the API."""

    def __init__(self, cluster: str, admission: Admission, *args: Any, keep_strict: Iterable[str] = (),
                 **kwargs: Any) -> None:
        super().__init__(cluster, *args, **kwargs)
        self.admission = admission
        self.sealed = False
        self.keep_strict = frozenset(keep_strict)  # "namespace/name": a Gatekeeper constraint keeps them STRICT

    def create(self, res: r.Resource, namespace: str | None, body: Any, **kwargs: Any) -> dict[str, Any]:
        self._writable(res)
        if res is r.PODS:
            body = self._admit(namespace, body)
            if isinstance(body, dict):  # the API server ignores a status sent on create: a new pod is Pending
                body = {**body, "status": {"phase": "Pending", "qosClass": qos_class(body.get("spec"))}}
        return super().create(res, namespace, body, **kwargs)

    def replace(self, res: r.Resource, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._writable(res)
        return super().replace(res, *args, **kwargs)

    def patch(self, res: r.Resource, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._writable(res)
        return super().patch(res, *args, **kwargs)

    def delete(self, res: r.Resource, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._writable(res)
        return super().delete(res, *args, **kwargs)

    def _validate(self, res: r.Resource, obj: dict[str, Any]) -> None:
        """The API server's own checks and Istio's webhook, then Gatekeeper's (validating webhooks run after the
        schema, on create and update, dry runs included)."""
        super()._validate(res, obj)
        if res is not r.PEER_AUTHENTICATIONS or not self.keep_strict:
            return
        meta = obj["metadata"]
        ref = f"{meta.get('namespace', '')}/{meta['name']}"
        spec = obj.get("spec") or {}
        modes = [(spec.get("mtls") or {}).get("mode"), *((p or {}).get("mode") for p in
                                                          (spec.get("portLevelMtls") or {}).values())]
        if ref in self.keep_strict and any(m != "STRICT" for m in modes):
            raise gatekeeper_denied("meshlab-keep-strict", f"peerauthentication {ref} must stay STRICT "
                                    "(mtls.mode and every portLevelMtls mode)")

    def _writable(self, res: r.Resource) -> None:
        if self.sealed and res is r.MUTATING_WEBHOOK_CONFIGURATIONS:
            raise ApiError(405, "meshlab serves the injector's MutatingWebhookConfigurations read-only: they follow "
                                "the topology's clusters[].revisions and default_revision", reason="MethodNotAllowed")

    def _admit(self, namespace: str | None, body: Any) -> Any:
        meta = body.get("metadata") if isinstance(body, dict) else None
        ns = (meta.get("namespace") if isinstance(meta, dict) else None) or namespace or ""
        ns_obj = self.peek(r.NAMESPACES, None, ns) or {"metadata": {}}
        body = resource_admission.mutate_before_webhooks(self, ns, body)
        body = self.admission.admit(body, ns, ns_obj["metadata"].get("labels") or {},
                                    self.items(r.MUTATING_WEBHOOK_CONFIGURATIONS))
        return resource_admission.validate_after_webhooks(self, ns, body)


def qos_class(spec: Any) -> str:
    """The pod's QoS class as the API server computes it: Guaranteed (every container's cpu and memory limits equal
    its requests), BestEffort (no requests or limits at all) or Burstable."""
    containers = (spec.get("containers") or []) if isinstance(spec, dict) else []
    resources = [c.get("resources") or {} for c in containers if isinstance(c, dict)]
    if not any(res.get("requests") or res.get("limits") for res in resources):
        return "BestEffort"
    for res in resources:
        limits = res.get("limits") or {}
        requests = res.get("requests") or limits  # requests default to the limits
        if any(limits.get(k) is None or requests.get(k, limits[k]) != limits[k] for k in ("cpu", "memory")):
            return "Burstable"
    return "Guaranteed"


class Selection:
    """Which Deployments a Service selects (by their pod template labels), and which Service selects a Deployment,
    kept from the store's events: a tick asks a dict per Service, never every Deployment of its namespace."""

    def __init__(self, store: Store) -> None:
        self._labels: dict[tuple[r.Resource, str], dict[str, dict[str, str]]] = {}  # (kind, ns) -> name -> labels
        self._version: dict[str, int] = {}  # namespace -> changes to its templates' labels or Services' selectors
        self._cache: dict[tuple[str, str, str], tuple[int, Any]] = {}
        for res in (r.DEPLOYMENTS, r.SERVICES):
            for obj in store.items(res):
                self._note(res, obj["metadata"]["namespace"], obj["metadata"]["name"], self._labels_of(res, obj))
        store.on_change.append(self._on_event)

    @staticmethod
    def _labels_of(res: r.Resource, obj: dict[str, Any]) -> dict[str, str]:
        spec = obj.get("spec") or {}
        if res is r.SERVICES:
            return dict(spec.get("selector") or {})
        return dict(((spec.get("template") or {}).get("metadata") or {}).get("labels") or {})

    def _on_event(self, event: Event) -> None:
        if event.resource is not r.DEPLOYMENTS and event.resource is not r.SERVICES:
            return
        meta = event.obj["metadata"]
        labels = None if event.type == "DELETED" else self._labels_of(event.resource, event.obj)
        self._note(event.resource, meta["namespace"], meta["name"], labels)

    def _note(self, res: r.Resource, namespace: str, name: str, labels: dict[str, str] | None) -> None:
        """Record labels (None: deleted); only a change makes the namespace's cached answers stale (status writes,
        which are most Deployment events, change none)."""
        table = self._labels.setdefault((res, namespace), {})
        if table.get(name) == labels:
            return
        if labels is None:
            table.pop(name, None)
        else:
            table[name] = labels
        self._version[namespace] = self._version.get(namespace, 0) + 1

    def deployments(self, namespace: str, service: str) -> list[str] | None:
        """The Deployments whose pod template the Service's selector matches; None without that Service. A
        Service without a selector selects nothing (its endpoints are not managed)."""
        def find() -> list[str] | None:
            selector = self._labels.get((r.SERVICES, namespace), {}).get(service)
            if selector is None:
                return None
            templates = self._labels.get((r.DEPLOYMENTS, namespace), {})
            return sorted(n for n, labels in templates.items() if selector and matches_labels(selector, labels))
        return self._cached((namespace, "service", service), find)

    def service_of(self, namespace: str, deployment: str, candidates: Iterable[str]) -> str | None:
        """The first of `candidates` (Services, in order) that selects the Deployment's pods."""
        def find() -> str | None:
            labels = self._labels.get((r.DEPLOYMENTS, namespace), {}).get(deployment)
            selectors = self._labels.get((r.SERVICES, namespace), {})
            if labels is None:
                return None
            return next((s for s in candidates if selectors.get(s) and matches_labels(selectors[s], labels)), None)
        return self._cached((namespace, "deployment", deployment), find)

    def _cached(self, key: tuple[str, str, str], find: Callable[[], Any]) -> Any:
        version = self._version.get(key[0], 0)
        cached = self._cache.get(key)
        if cached is None or cached[0] != version:
            cached = self._cache[key] = (version, find())
        return cached[1]


@dataclass
class ClusterSim:
    name: str
    store: ClusterStore
    controller: Controller
    selection: Selection


def deployment_manifest(svc: Service) -> dict[str, Any]:
    request = svc.memory_request_mi or svc.memory_limit_mi / 2
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": svc.name, "namespace": svc.namespace, "labels": {**svc.labels, "app": svc.name}},
        "spec": {
            "replicas": svc.replicas,
            "selector": {"matchLabels": {"app": svc.name}},
            "template": {
                # The application's own metrics (what metrics merging rewrites when a sidecar is injected).
                "metadata": {"labels": {"app": svc.name, "version": "v1"},
                             "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(svc.port),
                                             "prometheus.io/path": "/metrics", **svc.annotations}},
                "spec": {"containers": [{
                    "name": svc.name,
                    "image": f"registry.meshlab.local/{svc.name}:1.0",
                    "ports": [{"containerPort": svc.port, "name": "http", "protocol": "TCP"}],
                    "resources": {
                        "requests": {"cpu": f"{max(svc.cpu_limit_m // 2, 1)}m", "memory": f"{int(request)}Mi"},
                        "limits": {"cpu": f"{svc.cpu_limit_m}m", "memory": f"{int(svc.memory_limit_mi)}Mi"},
                    },
                }]},
            },
        },
    }


def service_manifest(svc: Service, index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": svc.name, "namespace": svc.namespace, "labels": {"app": svc.name}},
        "spec": {"selector": {"app": svc.name}, "type": "ClusterIP",
                 "clusterIP": f"10.96.{index // 250}.{index % 250 + 1}",
                 "ports": [{"name": "http", "port": svc.port, "targetPort": svc.port, "protocol": "TCP"}]},
    }


class Lab:
    def __init__(self, topology: Topology, timing: Timing | None = None) -> None:
        self.topology = topology
        self.timing = timing or Timing()
        self.knobs: dict[WorkloadKey, Service] = {
            (s.cluster or "", s.namespace, s.name): s.model_copy(deep=True) for s in topology.services
        }
        self.clusters: dict[str, ClusterSim] = {}
        for cluster in topology.clusters:
            served = {"security.istio.io": cluster.peer_authentication_versions} \
                if cluster.peer_authentication_versions else None
            store = ClusterStore(cluster.name, Admission(cluster.metrics_merge, cluster.image_digest,
                                                         cluster.proxy_resources), served_versions=served,
                                 keep_strict=cluster.keep_strict)
            controller = Controller(store, self._behaviour_lookup(cluster.name), self.timing,
                                    topology.mesh.root_namespace)
            self.clusters[cluster.name] = ClusterSim(cluster.name, store, controller, Selection(store))
            store.on_change.append(self._forget_deleted_pods(cluster.name))
        # A Deployment that is no topology service takes its app from these, in topology order.
        self._services_in: dict[tuple[str, str], list[str]] = {}
        for c, ns, name in self.knobs:
            self._services_in.setdefault((c, ns), []).append(name)
        self.telemetry = Telemetry()
        self.flows = Flows({}, [])
        self._last_tick: float | None = None
        self._epoch: float | None = None  # the lab's first tick: callers' bursts are timed from it
        self._bootstrap()

    # ---- set-up --------------------------------------------------------------------------------
    def _bootstrap(self) -> None:
        root = self.topology.mesh.root_namespace
        for cluster in self.topology.clusters:
            store = self.clusters[cluster.name].store
            wanted = {root: {}, "default": {}}
            for ns in cluster.namespaces:
                wanted[ns.name] = ns.labels
            for svc in self.topology.services:
                if svc.cluster == cluster.name and svc.kind == "deployment":
                    wanted.setdefault(svc.namespace, {})
            for ns, labels in wanted.items():
                store.create(r.NAMESPACES, None, {"metadata": {"name": ns, "labels": dict(labels)}})
            resource_admission.create_nodes(store, cluster)
            for ns_spec in cluster.namespaces:
                resource_admission.create_namespace_limits(store, ns_spec)
            self._install_istio(cluster, store)
        for i, svc in enumerate(self.topology.services):
            if svc.kind == "deployment":
                store = self.clusters[svc.cluster or ""].store
                store.create(r.DEPLOYMENTS, svc.namespace, deployment_manifest(svc))
                store.create(r.SERVICES, svc.namespace, service_manifest(svc, i))
        for pa in self.topology.peer_authentications:
            spec: dict[str, Any] = {"mtls": {"mode": pa.mode}}
            if pa.selector:
                spec["selector"] = {"matchLabels": pa.selector}
            meta: dict[str, Any] = {"name": pa.name, "namespace": pa.namespace}
            if pa.labels:
                meta["labels"] = dict(pa.labels)
            pa_store = self.clusters[pa.cluster or ""].store
            pa_store.create(r.PEER_AUTHENTICATIONS, pa.namespace, {
                "apiVersion": pa_store.api_version(r.PEER_AUTHENTICATIONS), "kind": "PeerAuthentication",
                "metadata": meta, "spec": spec})
        now = time.monotonic()
        for sim in self.clusters.values():
            sim.controller.settle(now)
        self.tick(now)

    def _install_istio(self, cluster: Cluster, store: ClusterStore) -> None:
        """One istiod per revision and the injector's webhook configurations, as `istioctl install` leaves them."""
        root = self.topology.mesh.root_namespace
        for rev in cluster.revisions or []:
            name = "istiod" if rev == DEFAULT_REVISION else f"istiod-{rev}"
            istiod = Service(name=name, namespace=root, replicas=1, memory_limit_mi=2048, app_memory_mi=300)
            store.create(r.DEPLOYMENTS, root, deployment_manifest(istiod))
        for mwc in webhook_configurations(cluster.revisions or [], cluster.default_revision, root):
            store.create(r.MUTATING_WEBHOOK_CONFIGURATIONS, None, mwc)
        for rev in cluster.revisions or []:
            store.create(r.CONFIG_MAPS, root, injector_config_map(rev, root, cluster.proxy_resources))
        store.sealed = True

    def _behaviour_lookup(self, cluster: str):
        def lookup(namespace: str, deployment: str) -> Behaviour:
            svc = self.knobs.get((cluster, namespace, deployment)) or self._copied_from(cluster, namespace, deployment)
            if svc is None:
                return Behaviour(sidecar_memory_mi=self.topology.mesh.sidecar_memory_mi)
            return Behaviour(app_memory_mi=svc.app_memory_mi, sidecar_memory_mi=self._sidecar_memory(svc),
                             legacy=svc.legacy, bypass_ports=frozenset(svc.bypass_ports), gateway=svc.gateway)
        return lookup

    def _copied_from(self, cluster: str, namespace: str, deployment: str) -> Service | None:
        """The topology service whose Service selects a Deployment that is none itself (a copy such as a canary):
        the copy runs its app, so it behaves as it does."""
        if not deployment:  # a bare pod
            return None
        selection = self.clusters[cluster].selection
        name = selection.service_of(namespace, deployment, self._services_in.get((cluster, namespace), ()))
        return None if name is None else self.knobs[(cluster, namespace, name)]

    def _forget_deleted_pods(self, cluster: str) -> Callable[[Event], None]:
        """A deleted pod is no longer scraped: its application series go (Prometheus marks them stale)."""
        def on_event(event: Event) -> None:
            if event.resource is r.PODS and event.type == "DELETED":
                meta = event.obj["metadata"]
                self.telemetry.forget_pod(cluster, meta["namespace"], meta["name"])
        return on_event

    def _sidecar_memory(self, svc: Service) -> float:
        return self.topology.mesh.sidecar_memory_mi if svc.sidecar_memory_mi is None else svc.sidecar_memory_mi

    # ---- time ----------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last_tick is not None and now < self._last_tick:  # a scrape's tick behind a simulated clock's
            return
        dt = 0.0 if self._last_tick is None else now - self._last_tick
        start = now - dt
        self._last_tick = now
        epoch = self._epoch = now if self._epoch is None else self._epoch
        for sim in self.clusters.values():
            sim.controller.reconcile(now)
        # The counters advance by this tick's flows over [start, now]: a bursty call sends what its bursts in that
        # interval hold, so a burst is counted whole whatever the tick length.
        self.flows = compute_flows({key: self.workload(key) for key in self.knobs},
                                   lambda call: call.burst_factor(start - epoch, now - epoch))
        if dt:
            self.telemetry.advance(self.flows, dt)

    # ---- the mesh's view of a workload -----------------------------------------------------------
    def workload(self, key: WorkloadKey) -> Workload:
        svc = self.knobs[key]
        cluster, ns, name = key
        latency = self.topology.mesh.sidecar_latency_ms
        if svc.kind == "external":
            return Workload(key, svc, True, 1.0 if svc.gateway else 0.0, lambda port: "PERMISSIVE",
                            sidecar_latency_ms=latency)
        sim = self.clusters[cluster]
        endpoints, sample = self._endpoints(sim, ns, name, svc.gateway)
        proxied = sum(1 for e in endpoints if e.proxied)
        dep = sim.store.peek(r.DEPLOYMENTS, ns, name) if sample is None else None
        labels = (sample["metadata"].get("labels") or {}) if sample else \
            ((dep or {}).get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {})
        annotations = (sample["metadata"].get("annotations") or {}) if sample else {}
        root = self.topology.mesh.root_namespace
        modes: dict[int, str] = {}

        def mode_for_port(port: int) -> str:
            if svc.gateway:  # PeerAuthentication does not govern a gateway's own listeners
                return "PERMISSIVE"
            if port not in modes:
                modes[port] = effective_mode(sim.store, root, ns, labels, port)
            return modes[port]

        return Workload(
            key, svc, bool(endpoints), proxied / len(endpoints) if endpoints else 0.0, mode_for_port,
            inbound_bypass=set(svc.bypass_ports) | excluded_ports(annotations, "Inbound"),
            outbound_excluded=excluded_ports(annotations, "Outbound"),
            sidecar_latency_ms=latency, proxy_drop=svc.proxy_drop, endpoints=endpoints,
        )

    @staticmethod
    def _endpoints(sim: ClusterSim, ns: str, name: str,
                   gateway: bool) -> tuple[tuple[Endpoint, ...], dict[str, Any] | None]:
        """The ready pods of every Deployment the Service `name` selects (Deployment `name` alone without that
        Service), and the pod whose labels and annotations stand for them all: a proxied one if any, since only a
        proxy enforces a mode or excludes ports (a canary whose template differs from its primary's is approximated
        by whichever pod comes first)."""
        deployments = sim.selection.deployments(ns, name)
        endpoints: list[Endpoint] = []
        sample = first = None
        for deployment in [name] if deployments is None else deployments:
            for pod in sim.store.pods_of(ns, deployment):
                if not is_ready(pod):
                    continue
                proxied = gateway or has_proxy(pod)
                endpoints.append(Endpoint(pod["metadata"]["name"], deployment, proxied))
                if proxied and sample is None:
                    sample = pod
                first = first or pod
        return tuple(endpoints), sample or first

    def memory_of(self, cluster: str):
        lookup = self._behaviour_lookup(cluster)

        def usage(pod: dict[str, Any]) -> dict[str, float]:
            owner = owner_name(pod)  # <deployment>-<hash>; a bare pod is nobody's workload
            b = lookup(pod["metadata"]["namespace"], owner.rsplit("-", 1)[0] if owner else "")
            result = {}
            for c in pod["spec"].get("containers", []):
                result[c["name"]] = (b.sidecar_memory_mi if c["name"] == "istio-proxy" else b.app_memory_mi) * MI
            return result
        return usage

    def metric_sources(self):
        return [(name, sim.store, self.memory_of(name)) for name, sim in self.clusters.items()]

    # ---- admin ---------------------------------------------------------------------------------
    def set_knobs(self, key: WorkloadKey, changes: dict[str, Any]) -> Service:
        """Change fault knobs of one service; validated like the topology, all or nothing."""
        if key not in self.knobs:
            raise KeyError("/".join(key))
        unknown = sorted(set(changes) - set(KNOBS))
        if unknown:
            raise TopologyError(f"admin: {'/'.join(key)}: cannot change {', '.join(unknown)} "
                                f"(changeable: {', '.join(KNOBS)})")
        current = self.knobs[key]
        data = {**current.model_dump(), **changes}
        try:
            updated = Service.model_validate(data)
        except ValidationError as exc:
            raise TopologyError(format_errors(f"admin: {'/'.join(key)}", exc)) from None
        for i, call in enumerate(updated.calls):
            target = self.topology.resolve(call.service, updated)
            if target is None:
                raise TopologyError(f"admin: {'/'.join(key)}: calls[{i}].service: unknown service {call.service!r}")
            call.service = "/".join(target)
        self.knobs[key] = updated
        if "replicas" in changes and updated.kind == "deployment":  # as `kubectl scale` would
            store = self.clusters[key[0]].store
            if store.peek(r.DEPLOYMENTS, key[1], key[2]) is not None:
                store.patch(r.DEPLOYMENTS, key[1], key[2], "application/merge-patch+json",
                            {"spec": {"replicas": updated.replicas}})
        return updated

    def describe(self, key: WorkloadKey) -> dict[str, Any]:
        w = self.workload(key)
        f = self.flows.workloads.get(key)
        svc = self.knobs[key]
        return {
            "cluster": key[0], "namespace": key[1], "name": key[2], "kind": svc.kind,
            "available": w.available, "sidecar_fraction": round(w.sidecar_fraction, 3),
            "mtls_mode": w.mode_for_port(svc.port) if svc.kind == "deployment" else None,
            "requests_per_second": round(f.reached, 3) if f else 0.0,
            "success_rate": round(f.ok, 4) if f else None,
            "latency_ms": round(f.latency_ms, 2) if f else None,
            "knobs": {k: getattr(svc, k) if k != "calls" else [c.model_dump() for c in svc.calls] for k in KNOBS},
        }
