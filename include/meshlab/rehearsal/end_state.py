"""Where a rehearsal left the fleet, read from the clusters (not from the records), each record checked against it.

Per Deployment of the plan's clusters: its sidecars and the mTLS mode its policies make (the proposer's inventory
read, `meshwave.propose.inventory`), then one end state with its reason:

- strict / permissive: every pod has a sidecar and the policies make it STRICT / not STRICT;
- rolled back, blocked, failed, held, skipped: what the service's record says, for a service without sidecars;
- not run: planned in a wave that never started;
- excluded: in the cluster but not in the plan, whatever it runs (an owner's opt-out is named); gateways are
  not listed.

A record the data plane contradicts (a "strict" record on a workload that is not STRICT, a sidecar the record says
was removed, ...) is a mismatch: the rehearsal fails on it, whatever else went well.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from meshwave.outcomes import ServiceOutcome
from meshwave.plan import Plan
from meshwave.propose.inventory import read_cluster
from meshwave.propose.models import Workload
from meshwave.record import ServiceRecord

if TYPE_CHECKING:
    from meshwave.kube import MeshKube


class End(StrEnum):
    STRICT = "strict"
    PERMISSIVE = "permissive"
    ROLLED_BACK = "rolled back"
    BLOCKED = "blocked"
    FAILED = "failed"
    HELD = "held"
    SKIPPED = "skipped"
    NOT_RUN = "not run"
    EXCLUDED = "excluded"
    PARTIAL = "partial"  # some pods with a sidecar, some without


class ServiceEnd(BaseModel):
    model_config = ConfigDict(frozen=True)

    cluster: str
    namespace: str
    workload: str
    wave: str | None  # None: not planned
    end: End
    data_plane: str  # what the cluster shows, e.g. "3/3 pods with a sidecar, STRICT"
    reason: str
    mismatch: str = ""  # how the record and the data plane disagree ("" when they agree)

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.workload}"


_BY_OUTCOME = {ServiceOutcome.ROLLED_BACK: End.ROLLED_BACK, ServiceOutcome.BLOCKED: End.BLOCKED,
               ServiceOutcome.FAILED: End.FAILED, ServiceOutcome.HELD: End.HELD, ServiceOutcome.SKIPPED: End.SKIPPED,
               ServiceOutcome.FROZEN: End.SKIPPED, ServiceOutcome.REMOVED: End.ROLLED_BACK}


def read_end_state(kubes: dict[str, MeshKube], plan: Plan, records: Iterable[ServiceRecord]) -> list[ServiceEnd]:
    workloads = [w for cluster in sorted(kubes) for w in read_cluster(kubes[cluster])]
    return end_state(workloads, plan, records)


def end_state(workloads: list[Workload], plan: Plan, records: Iterable[ServiceRecord]) -> list[ServiceEnd]:
    waves = {s.key: w.name for w in plan.waves for s in w.services}
    by_key = {r.service: r for r in records}
    found = [_one(w, waves.get(w.key), by_key.get(w.key)) for w in workloads if not w.gateway]
    missing = sorted(set(waves) - {w.key for w in workloads})
    for key in missing:  # planned but not in the cluster: the plan is wrong, loudly
        cluster, namespace, name = key.split("/")
        found.append(ServiceEnd(cluster=cluster, namespace=namespace, workload=name, wave=waves[key], end=End.FAILED,
                                data_plane="no such Deployment", reason="planned, but the cluster has no such "
                                "Deployment", mismatch="" if key not in by_key else "a record for a Deployment "
                                "the cluster does not have"))
    return sorted(found, key=lambda e: (e.cluster, e.namespace, e.workload))


def _one(w: Workload, wave: str | None, record: ServiceRecord | None) -> ServiceEnd:
    seen = _data_plane(w)
    common = {"cluster": w.cluster, "namespace": w.namespace, "workload": w.name, "wave": wave, "data_plane": seen}
    if wave is None:  # the data plane column still says what it runs
        why = f"not in the plan; {w.cannot_mesh}" if w.cannot_mesh else "not in the plan"
        return ServiceEnd(**common, end=End.EXCLUDED, reason=why)
    if record is None:
        end = _observed(w) or End.NOT_RUN
        return ServiceEnd(**common, end=end, reason=f"no record: wave {wave} did not run it",
                          mismatch="" if end is End.NOT_RUN else "changed without a record")
    end = _observed(w) or _BY_OUTCOME.get(record.outcome, End.FAILED)
    return ServiceEnd(**common, end=end, reason=f"{record.outcome}: {record.reason}", mismatch=_mismatch(w, record))


def _observed(w: Workload) -> End | None:
    """The end state the data plane alone decides: None for a workload without sidecars (its record says why)."""
    if w.pods_with_sidecar == 0:
        return None
    if w.pods_with_sidecar < w.pods:
        return End.PARTIAL
    return End.STRICT if w.mtls == "STRICT" else End.PERMISSIVE


def _data_plane(w: Workload) -> str:
    return f"{w.pods_with_sidecar}/{w.pods} pods with a sidecar, {w.mtls}"


def _mismatch(w: Workload, record: ServiceRecord) -> str:
    """What the record claims (its sidecar, its mode, and STRICT for a "strict" outcome) that the cluster does not
    show; "" when they agree. A record that does not know ("STRICT?", None) claims nothing."""
    wrong = []
    if record.sidecar is True and w.pods_with_sidecar < w.pods or record.sidecar is False and w.pods_with_sidecar:
        wrong.append(f"sidecar {record.sidecar}")
    mode = (record.mtls or "").split(",")[0].strip()
    if mode in ("STRICT", "PERMISSIVE", "DISABLE") and mode != w.mtls:
        wrong.append(f"mTLS {record.mtls}")
    if record.outcome is ServiceOutcome.STRICT and w.mtls != "STRICT" and not wrong:
        wrong.append("outcome strict")
    return f"the record says {', '.join(wrong)}; the cluster shows {_data_plane(w)}" if wrong else ""
