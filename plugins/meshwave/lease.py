"""One writer per workload: a lease on the Deployment, across every DAG (findings 18 of the safety review).

Each wave DAG and `mesh_service` runs one at a time, but nothing kept a wave and `mesh_service` (or two plans)
from changing the same workload at once. The service group's `admit` now takes a lease, kept on the Deployment
as the annotation `meshwave.io/lease`:

    {"holder": "meshwave_shop_w1/manual__2026-11-28T21:00:00", "service": "prod/shop/auth",
     "taken": "...", "expires": "2026-11-28T21:42:00Z", "broken": null}

Every write of it is conditional: the patch carries the `metadata.resourceVersion` it was decided on, so the API
server answers 409 Conflict when the Deployment changed since the read; the writer reads again and decides again.
Two runs racing for the same lease cannot both win.

- `admit` takes it (refused, naming the holder, while another run's lease is live; an expired or broken one is
  taken over; the holder itself takes it again: a cleared task re-runs).
- The forward writes (`inject`, `flip_strict`) renew it first and are refused when this run no longer holds it.
  Their renewal sets the expiry to the deadline of the pending state the write is about to leave
  (service_group: `_trial_seconds`, `_unverified_seconds`), so the lease runs out no later than the pending state
  falls due: when `mesh_reconcile` comes for an overdue state, the run that left it no longer holds the workload.
  The long waits between writes (rollout, soak, gates) are deferrable sensors; they need no renewal because the
  expiry written before them covers them, as the pending deadline does.
- The undo steps (`back_to_permissive`, `rollback_injection`) renew it when this run holds it and go ahead when
  it does not: a lease keeps a second run from changing the workload, never an undo from making it safer.
- The outcome releases it.
- The emergency rollback never asks for it: it marks a lease it meets `broken`, so the holder's next forward
  write is refused, and anyone may take a broken lease afterwards.

The annotation sits in the Deployment's metadata, not its pod template: writing it restarts no pod.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from meshwave.annotations import WorkloadAnnotation, iso
from meshwave.changes import ApiRequest, Change
from meshwave.kube_errors import Conflict, WorkloadNotFound

if TYPE_CHECKING:
    from meshwave.kube import MeshKube

LEASE_ANNOTATION = "meshwave.io/lease"
SMP = "application/strategic-merge-patch+json"
# A Deployment's resourceVersion moves with every status update its controller writes: a conflict is usually
# not another meshwave run. Read and decide again, a few times, before the step fails (and Airflow retries it).
ATTEMPTS = 5


class LeaseRefused(ValueError):
    """Another run holds the workload (or this run lost it): refused before any change. A ValueError: the
    service group fails the step at once, it is not retried."""


class Lease(WorkloadAnnotation):
    ANNOTATION = LEASE_ANNOTATION

    holder: str  # "<dag id>/<run id>"
    service: str  # "cluster/namespace/workload"
    taken: datetime
    expires: datetime
    broken: str | None = None  # who overrode it and why (the emergency rollback)

    def live(self, now: datetime) -> bool:
        """Held: neither expired nor broken."""
        return self.broken is None and now < self.expires

    def describe(self) -> str:
        state = f"broken by {self.broken}" if self.broken else f"until {iso(self.expires)}"
        return f"held by {self.holder} since {iso(self.taken)}, {state}"


# ---- the decisions, pure: (the lease as read, now) -> the new value, or KEEP (nothing to write) --------------
KEEP = object()
Decision = Callable[[Lease | None, datetime], tuple[Any, str]]


def taking(holder: str, service: str, seconds: float) -> Decision:
    def decide(current: Lease | None, now: datetime) -> tuple[Any, str]:
        if current is not None and current.holder != holder and current.live(now):
            raise LeaseRefused(f"refused: {service} is being changed by {current.holder} (lease {LEASE_ANNOTATION} "
                               f"{current.describe()}); one run at a time per workload")
        lease = Lease(holder=holder, service=service, taken=now, expires=now + timedelta(seconds=seconds))
        if current is None:
            return lease, f"taken until {iso(lease.expires)}"
        if current.holder == holder and current.broken is None:
            return current.model_copy(update={"expires": lease.expires}), f"held again until {iso(lease.expires)}"
        return lease, f"taken over until {iso(lease.expires)} (was {current.describe()})"

    return decide


def renewing(holder: str, seconds: float) -> Decision:
    """Only while this run holds it (an expired lease nobody took is still this run's: no one else wrote)."""

    def decide(current: Lease | None, now: datetime) -> tuple[Any, str]:
        if current is None or current.holder != holder:
            who = f"now {current.describe()}" if current else "released or removed"
            raise LeaseRefused(f"this run ({holder}) no longer holds the workload's lease ({who}): nothing written")
        if current.broken is not None:
            raise LeaseRefused(f"this run's lease was broken by {current.broken}: nothing written")
        until = now + timedelta(seconds=seconds)
        return current.model_copy(update={"expires": until}), f"renewed until {iso(until)}"

    return decide


def releasing(holder: str, why: str) -> Decision:
    def decide(current: Lease | None, now: datetime) -> tuple[Any, str]:
        if current is None or current.holder != holder:
            return KEEP, "not this run's lease: left as it is"
        return None, f"released: {why}"

    return decide


def breaking(by: str) -> Decision:
    def decide(current: Lease | None, now: datetime) -> tuple[Any, str]:
        if current is None or not current.live(now):
            return KEEP, "no live lease"
        return current.model_copy(update={"broken": by}), f"broken by {by} (was {current.describe()})"

    return decide


# ---- the writes: conditional on the resourceVersion the decision was made on ---------------------------------
class Leases:
    """The leases of one cluster's Deployments, through its MeshKube (transport, errors, dry run)."""

    def __init__(self, kube: MeshKube) -> None:
        self.kube = kube

    def read(self, ns: str, name: str) -> Lease | None:
        return self._of(self.kube.deployment(ns, name))

    def take(self, ns: str, name: str, holder: str, service: str, seconds: float) -> Change:
        """A workload that does not exist has nothing to lease: the preflight blocks it, as before."""
        try:
            return self._swap(ns, name, "take-lease", taking(holder, service, seconds))
        except WorkloadNotFound as exc:
            return self.kube.noop("take-lease", f"deployment {ns}/{name}", None, f"nothing to lease: {exc}")

    def renew(self, ns: str, name: str, holder: str, seconds: float) -> Change:
        return self._swap(ns, name, "renew-lease", renewing(holder, seconds))

    def release(self, ns: str, name: str, holder: str, why: str) -> Change:
        return self._swap(ns, name, "release-lease", releasing(holder, why))

    def break_(self, ns: str, name: str, by: str) -> Change:
        return self._swap(ns, name, "break-lease", breaking(by))

    def _of(self, deployment: dict[str, Any]) -> Lease | None:
        meta = deployment.get("metadata") or {}
        text = (meta.get("annotations") or {}).get(LEASE_ANNOTATION)
        where = f"cluster {self.kube.cluster}: deployment {meta.get('namespace')}/{meta.get('name')}"
        return None if text is None else Lease.from_annotation(text, where)

    def _swap(self, ns: str, name: str, action: str, decide: Decision) -> Change:
        target = f"deployment {ns}/{name}"
        for _ in range(ATTEMPTS):
            deployment = self.kube.deployment(ns, name)
            current = self._of(deployment)
            value, reason = decide(current, datetime.now(UTC))
            if value is KEEP:
                return self.kube.noop(action, target, _text(current), reason)
            try:
                return self._write(ns, name, action, deployment, current, value, reason)
            except Conflict:
                continue  # the Deployment changed since the read: read it again and decide again
        raise Conflict(f"cluster {self.kube.cluster}: {action} on {target}: the object kept changing "
                       f"({ATTEMPTS} conflicts in a row)", cluster=self.kube.cluster, verb="PATCH", target=target,
                       code=409)

    def _write(self, ns: str, name: str, action: str, deployment: dict[str, Any], current: Lease | None,
               value: Lease | None, reason: str) -> Change:
        version = (deployment.get("metadata") or {}).get("resourceVersion")
        text = None if value is None else value.to_annotation()  # null deletes the annotation
        body = {"metadata": {"resourceVersion": version, "annotations": {LEASE_ANNOTATION: text}}}
        target = f"deployment {ns}/{name}"
        request = ApiRequest("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/{name}", SMP, body)
        change = Change(self.kube.cluster, action, target, _text(current), text, request, reason=reason)
        call = functools.partial(self.kube.call, "PATCH", target, self.kube.apps.patch_namespaced_deployment, name,
                                 ns, body, _content_type=SMP)
        return self.kube.send(change, call)


def _text(lease: Lease | None) -> str | None:
    return None if lease is None else lease.to_annotation()
