"""The steps of one service's migration, as plain functions of (service, clients) -> a typed result (results.py).

The Airflow wiring is in `service_group.py`; everything a step does and decides is here, so it reads,
and tests, without Airflow. Every cluster change goes through `MeshKube`, which reads before it writes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshwave import headroom, outbound
from meshwave.checks import Thresholds, measure_baseline
from meshwave.gitops import reverted_by
from meshwave.kube_errors import InjectionBlocked, MtlsRefused, NotInForce
from meshwave.mtls import EffectiveMtls, Mode
from meshwave.probe import PlaintextProbe, ProbeVerdict
from meshwave.results import (
    BackToPermissiveResult,
    BaselineResult,
    ClearEmergencyResult,
    FlipResult,
    InjectResult,
    MeasuredBaseline,
    MtlsInForce,
    PreflightResult,
    RollbackResult,
)

if TYPE_CHECKING:  # the client is imported by whoever builds a MeshKube (at run time, not at parse time)
    from meshwave.kube import MeshKube
from meshwave.plan import ClusterConfig, ServicePlan, Settings
from meshwave.prometheus import PrometheusError, PrometheusSource, Source, render

# Airflow sends a task's stdlib logging to its task log, each line with its level and this module's name
log = logging.getLogger(__name__)

MI = 2**20


class Blocked(Exception):
    """The service must not be migrated now; nothing was changed. The message says why, with numbers."""


ACTIONS = {
    "migrate": "Migrate: inject, soak, verify, then STRICT (if the plan wants it for this service)",
    "inject_only": "Inject only: sidecar + soak + verify, stay PERMISSIVE",
    "strict_only": "STRICT only: the sidecar is already there; gate, flip to STRICT, verify",
    "permissive": "Back to PERMISSIVE: undo STRICT for this service, keep the sidecar",
    "remove_sidecar": "Remove the sidecar: back to PERMISSIVE, no injection, restart",
    "remove_canary": "Remove the canary copy of the workload a run left behind (mesh_reconcile's undo of a canary on "
                     "trial); the workload itself is not touched",
    "clear_emergency": "Clear the emergency mark: the emergency rollback's annotations off the workload's policies, "
                       "modes unchanged (meshwave may make them STRICT again)",
}


@dataclass(frozen=True)
class Service:
    """One service of a run, with the settings it runs with: from the plan (a wave) or the trigger form (ad hoc)."""

    plan: ServicePlan
    settings: Settings
    cluster: ClusterConfig
    batch: int
    action: str = "migrate"
    # the plan's other clusters: a rollback reads (and may relax) a destination its workload calls in one of them
    peers: dict[str, ClusterConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action: {self.action!r} is not one of {', '.join(ACTIONS)}")

    @property
    def strict(self) -> bool:
        """Whether this run ends in STRICT when every check passes."""
        return self.action == "strict_only" or (self.action == "migrate" and self.plan.strict)

    @property
    def needs_approval(self) -> bool:
        """Whether a person must approve its STRICT (the plan's `approval`, for its criticality)."""
        return self.strict and self.settings.approval.required(self.plan.criticality)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.model_dump(mode="json"), "settings": self.settings.model_dump(mode="json"),
                "cluster": self.cluster.model_dump(mode="json"), "batch": self.batch, "action": self.action,
                "peers": {name: c.model_dump(mode="json") for name, c in self.peers.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Service:
        return cls(ServicePlan(**data["plan"]), Settings(**data["settings"]), ClusterConfig(**data["cluster"]),
                   data["batch"], data.get("action", "migrate"),
                   {name: ClusterConfig(**c) for name, c in (data.get("peers") or {}).items()})

    @property
    def window(self) -> str:
        return f"{self.settings.query_window_seconds}s"

    def thresholds(self) -> dict[str, Any]:
        own = self.settings.thresholds.model_dump()
        return Thresholds(**own, min_requests=self.settings.min_requests).to_dict()

    def gate_policy(self, on_no_data: str = "wait") -> dict[str, Any]:
        """N breaches in a row confirm a failure; no data and errors wait for the deadline, then count."""
        return {"breaches_to_fail": self.settings.breaches_to_fail,
                "default": {"on_no_data": on_no_data, "on_error": "wait"}}


def peers_of(clusters: dict[str, ClusterConfig], own: str) -> dict[str, ClusterConfig]:
    """Every cluster of the plan (or fleet) but the service's own: where its rollback may read a destination."""
    return {name: config for name, config in clusters.items() if name != own}


def took(started: float) -> float:
    """A step's `seconds`: from its start to now."""
    return round(time.time() - started, 2)


def preflight(svc: Service, kube: MeshKube, source: PrometheusSource) -> PreflightResult:
    """The workload exists, has room for its sidecar (or the plan gives the sidecar a budget of its own), and no
    caller without a sidecar would be cut off by a STRICT that applies to it once injected."""
    started = time.time()
    p = svc.plan
    w = kube.workload(p.namespace, p.workload)
    sidecar = svc.settings.sidecar
    notes, changes, found = _ownership_notes(svc, kube), [], {}
    mtls = kube.mtls.effective(p.namespace, p.workload)  # what the pods enforce once injected (now, if they are)
    injected = w.pods_total > 0 and w.pods_with_proxy == w.pods_total
    if mtls.strict_anywhere and svc.action != "strict_only" and not injected:
        found["plaintext_before_injection"] = _no_plaintext_into_strict(svc, mtls, source)
    if svc.strict and mtls.foreign_workload_policies:
        notes.append(f"STRICT will not be flipped: {mtls.foreign_workload_policies[0]} selects the pods and decides "
                     "their mode")
    room = _headroom(svc, kube, injected)
    if sidecar.annotations:
        changes.append(kube.ensure_sidecar_resources(p.namespace, p.workload, **_sidecar_kwargs(svc)).to_dict())
    if p.exclude_inbound_ports or p.exclude_outbound_ports:
        changes.append(kube.ensure_exclusions(p.namespace, p.workload, p.exclude_inbound_ports or None,
                                              p.exclude_outbound_ports or None).to_dict())
    for note in notes:
        log.warning(f"NOTE: {note}")
    # plaintext_before_injection only when it was asked: a key the step did not write stays out of its JSON
    return PreflightResult(replicas=w.replicas, app_container=w.app_container, changes=changes, notes=notes,
                           mtls_in_force=MtlsInForce.model_validate(mtls.summary()), **found, headroom=room,
                           seconds=took(started))


def _ownership_notes(svc: Service, kube: MeshKube) -> list[str]:
    """Who will revert meshwave's changes: a GitOps controller or Helm owning the deployment."""
    p = svc.plan
    owner = reverted_by(kube.deployment(p.namespace, p.workload))
    return [f"deployment {p.namespace}/{p.workload} is managed by {owner}: its pod template changes (the sidecar "
            f"label, resources) will be reverted by {owner.split(' (')[0]} unless they are made in Git too"] \
        if owner else []


def _no_plaintext_into_strict(svc: Service, mtls: EffectiveMtls, source: PrometheusSource) -> str:
    """Once injected the pods enforce STRICT: every caller must already have a sidecar (it then speaks mTLS).

    Before injection every request reaches the app in plaintext; the meshed callers' own proxies report what
    they send it (reporter="source"). The app's own request rate minus that is what callers without a sidecar
    send: more than 1 % (and 0.01 rps) of it, or no way to tell, blocks the service before any change.
    """
    p, cluster = svc.plan, getattr(source, "cluster", None)
    strict_by = "; ".join(mtls.strict_sources())
    rates = {}
    for name in ("app_request_rate", "meshed_request_rate"):
        query = render(name, namespace=p.namespace, workload=p.workload, window=svc.window, cluster=cluster)
        try:
            values = [s.value for s in source.instant(query) if s.finite]
        except PrometheusError as exc:
            raise Blocked(f"once injected the pods enforce STRICT ({strict_by}), and meshwave cannot tell whether "
                          f"callers without a sidecar remain: {query}: {exc}") from None
        if not values and name == "app_request_rate":
            raise Blocked(f"once injected the pods enforce STRICT ({strict_by}), and meshwave cannot tell whether "
                          f"callers without a sidecar remain: no request data: {query}")
        rates[name] = sum(values)
    total, meshed = rates["app_request_rate"], rates["meshed_request_rate"]
    plaintext = max(0.0, total - meshed)
    numbers = f"{plaintext:.3g} of {total:.3g} rps come from callers without a sidecar"
    if plaintext > max(0.01 * total, 0.01):
        raise Blocked(f"once injected the pods enforce STRICT ({strict_by}) and {numbers}: injection would cut them "
                      "off. Give those callers a sidecar first, or make this workload PERMISSIVE")
    return f"STRICT once injected ({strict_by}); {numbers}: every caller already speaks mTLS"


def _sidecar_kwargs(svc: Service) -> dict[str, str]:
    s = svc.settings.sidecar
    return {k: v for k, v in {"cpu": s.cpu, "memory": s.memory, "cpu_limit": s.cpu_limit,
                              "memory_limit": s.memory_limit}.items() if v}


def _headroom(svc: Service, kube: MeshKube, injected: bool) -> str:
    """The sidecar's own limit, the namespace's quotas and limit ranges, and the nodes (meshwave.headroom)."""
    p, sidecar = svc.plan, svc.settings.sidecar
    try:
        found = headroom.check(kube, p.namespace, p.workload, sidecar.annotations, sidecar.expected_memory_mi,
                               injected)
    except headroom.HeadroomBlocked as exc:
        raise Blocked(str(exc)) from None
    return found.summary()


# What the soak compares with: without them a service would be injected blind (safety review finding 7).
BASELINE_NEEDED = ("app_success_rate", "app_request_rate", "app_latency_p99_ms")


def baseline(svc: Service, source: PrometheusSource) -> BaselineResult:
    """The application's own metrics before any change; a service whose baseline could not be measured is
    blocked before injection ("no baseline: <query>: <why>"), never injected blind."""
    started = time.time()
    base = measure_baseline(source, svc.plan.namespace, svc.plan.workload, svc.window)
    missing = [n for n in base.notes if n.check.removeprefix("baseline.") in BASELINE_NEEDED]
    if missing:
        raise Blocked("no baseline: " + "; ".join(f"{next(iter(n.queries.values()), n.check)}: {n.reason}"
                                                  for n in missing))
    return BaselineResult(baseline=MeasuredBaseline.model_validate(base.to_dict()), seconds=took(started))


def inject(svc: Service, kube: MeshKube) -> InjectResult:
    started = time.time()
    if svc.action == "strict_only":
        return InjectResult(changes=[], sidecars=_require_sidecars(svc, kube), seconds=took(started))
    try:
        changes = kube.ensure_injected(svc.plan.namespace, svc.plan.workload, svc.settings.injection)
    except InjectionBlocked as exc:  # refused before any write: nothing to roll back
        raise Blocked(str(exc)) from None
    return InjectResult(changes=[c.to_dict() for c in changes], seconds=took(started))


def _require_sidecars(svc: Service, kube: MeshKube) -> str:
    """STRICT only: every pod must already run its sidecar, or STRICT would cut this workload's callers off."""
    p = svc.plan
    w = kube.workload(p.namespace, p.workload)
    if w.pods_total == 0 or w.pods_with_proxy < w.pods_total:
        raise Blocked(f"{p.namespace}/{p.workload}: {w.pods_with_proxy} of {w.pods_total} pods run an istio-proxy "
                      "sidecar: STRICT only needs every pod injected (run the action migrate or inject_only first)")
    return f"{w.pods_with_proxy} of {w.pods_total} pods run their sidecar"


def flip_strict(svc: Service, kube: MeshKube) -> FlipResult:
    """STRICT, proven: the mode recomputed from every policy, then a plaintext request from outside the mesh
    refused by the workload's proxy. Anything less raises NotInForce (and the service goes back to PERMISSIVE).
    A workload whose mode another team's policy decides is not flipped: `refused` says which policy."""
    started = time.time()
    p = svc.plan
    try:
        change, state = kube.mtls.ensure_strict(p.namespace, p.workload)
    except MtlsRefused as exc:
        log.warning(f"not flipped: {exc}")
        in_force = kube.mtls.effective(p.namespace, p.workload).summary()
        return FlipResult(changes=[], refused=str(exc), mtls_in_force=MtlsInForce.model_validate(in_force),
                          seconds=took(started))
    if state is None:  # a dry run: nothing was written, nothing to prove
        return FlipResult(changes=[change.to_dict()], mode=Mode.STRICT, seconds=took(started))
    probe = PlaintextProbe(kube, svc.settings.probe.image, svc.settings.probe.timeout_seconds).run(p.namespace,
                                                                                                  p.workload)
    log.log(logging.INFO if probe.verdict == ProbeVerdict.REFUSED else logging.WARNING,
            f"plaintext probe {probe.url}: {probe.verdict}: {probe.message}")
    if probe.verdict != ProbeVerdict.REFUSED:
        raise NotInForce(f"cluster {p.cluster}: {p.namespace}/{p.workload}: the policies say {state.describe()}, but "
                         f"a plaintext request from a pod without a sidecar was not refused ({probe.verdict}: "
                         f"{probe.message}): STRICT is not proven in force", cluster=p.cluster, verb="GET",
                         target=f"deployment {p.namespace}/{p.workload}")
    return FlipResult(changes=[change.to_dict()], mode=Mode.STRICT,
                      mtls_in_force=MtlsInForce.model_validate(state.summary()), probe=probe, seconds=took(started))


def back_to_permissive(svc: Service, kube: MeshKube, note: str) -> BackToPermissiveResult:
    """Nothing STRICT on the workload's pods, proven from every policy after the write (see peer_auth)."""
    started = time.time()
    p = svc.plan
    changes, state = kube.mtls.ensure_permissive(p.namespace, p.workload, note)
    # a dry run computes no mode: mtls_in_force stays out of the result
    in_force = {} if state is None else {"mtls_in_force": MtlsInForce.model_validate(state.summary())}
    return BackToPermissiveResult(changes=[c.to_dict() for c in changes], mode=Mode.PERMISSIVE, **in_force,
                                  seconds=took(started))


def rollback_injection(svc: Service, kube: MeshKube, source: Source, note: str = "meshwave rollback",
                       peers: outbound.Peers = outbound.no_peers) -> RollbackResult:
    """Back to where it started: the STRICT destinations it calls relaxed (meshwave's own) or the removal refused
    (outbound.py), meshwave's own policy on it deleted (or relaxed), then no sidecar.

    Refused: the sidecar stays and the workload is made PERMISSIVE (a proxy still enforces its mode), and the
    RemovalRefused says what is left. A Prometheus that does not answer fails the try (retried): never removed blind.
    """
    started = time.time()
    p = svc.plan
    before = outbound.success_rate(source, p.namespace, p.workload, svc.window)  # what after_removal compares with
    try:
        relaxed, check = outbound.prepare_removal(kube, source, p.namespace, p.workload, note, peers=peers)
    except outbound.RemovalRefused as exc:
        kept, state = kube.mtls.ensure_permissive(p.namespace, p.workload, note)
        for change in kept:
            log.info(change.summary())
        mode = state.describe() if state is not None else "PERMISSIVE once applied (dry run)"
        raise outbound.RemovalRefused(f"{exc}. LEFT: the sidecar stays, mTLS {mode}") from None
    changes, _ = kube.mtls.ensure_permissive(p.namespace, p.workload, note, exempt=False)
    changes += kube.remove_injection(p.namespace, p.workload)
    return RollbackResult(changes=[c.to_dict() for c in relaxed + changes], outbound=check.summary(),
                          success_before=before, seconds=took(started))


def clear_emergency(svc: Service, kube: MeshKube) -> ClearEmergencyResult:
    """The operator's all-clear after an emergency rollback: the mark off the workload's own policies, so that a
    later run may make them STRICT again. No mode changes."""
    started = time.time()
    p = svc.plan
    changes = kube.mtls.clear_emergency(p.namespace, p.workload)
    state = None if kube.dry_run else MtlsInForce.model_validate(kube.mtls.effective(p.namespace, p.workload).summary())
    return ClearEmergencyResult(changes=[c.to_dict() for c in changes], mtls_in_force=state, seconds=took(started))
