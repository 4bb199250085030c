"""The lab: clusters built from a topology, ticked forward in real time.

Each tick: every cluster's controller reconciles deployments and pods, the mesh computes the request
flow from what is running and which policies apply, and the telemetry counters advance. Each cluster's store
admits new pods as its API server would: Istio's injector (driven by the MutatingWebhookConfigurations the
cluster's revisions install), metrics merging and image digest pinning where the topology turns them on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from meshlab import admission as resource_admission
from meshlab import resources as r
from meshlab.controller import MI, Behaviour, Controller, Timing, owner_name
from meshlab.errors import ApiError, gatekeeper_denied
from meshlab.injection import DEFAULT_REVISION, Admission, excluded_ports, injector_config_map, webhook_configurations
from meshlab.mesh import Flows, Workload, WorkloadKey, compute_flows, effective_mode
from meshlab.store import Store
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


@dataclass
class ClusterSim:
    name: str
    store: ClusterStore
    controller: Controller


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
            self.clusters[cluster.name] = ClusterSim(cluster.name, store, controller)
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
            svc = self.knobs.get((cluster, namespace, deployment))
            if svc is None:
                return Behaviour(sidecar_memory_mi=self.topology.mesh.sidecar_memory_mi)
            return Behaviour(app_memory_mi=svc.app_memory_mi, sidecar_memory_mi=self._sidecar_memory(svc),
                             legacy=svc.legacy, bypass_ports=frozenset(svc.bypass_ports), gateway=svc.gateway)
        return lookup

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
        dep = sim.store.peek(r.DEPLOYMENTS, ns, name)
        pods = sim.controller.pods_of(dep) if dep else []
        ready = [p for p in pods if sim.controller._ready(p)]
        proxied = [p for p in ready if svc.gateway or _has_proxy(p)]
        sample = (proxied or ready or [None])[0]
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
            key, svc, bool(ready), len(proxied) / len(ready) if ready else 0.0, mode_for_port,
            inbound_bypass=set(svc.bypass_ports) | excluded_ports(annotations, "Inbound"),
            outbound_excluded=excluded_ports(annotations, "Outbound"),
            sidecar_latency_ms=latency, proxy_drop=svc.proxy_drop,
        )

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


def _has_proxy(pod: dict[str, Any]) -> bool:
    return any(c["name"] == "istio-proxy" for c in pod["spec"].get("containers", []))
