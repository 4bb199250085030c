"""Before a sidecar goes: where the workload calls over mTLS, and what its removal would do to those calls.

Without its sidecar a workload's calls leave in plaintext (istio-facts.md, auto-mTLS); a destination whose proxy
enforces STRICT resets them, and the workload fails its own requests (safety review, finding 4). So every removal
(a wave's rollback, `mesh_service remove_sidecar`, emergency stage 2) first reads the destinations its proxy called
(`outbound_destinations`, reporter="source": Istio's source side carries no connection_security_policy, so every
destination is read and its mode decides) and the mode each one's pods enforce, computed from every policy.

The run's scope, kept simple and safe:
- a destination STRICT only by meshwave's own policy (`meshwave-<workload>`, which a wave wrote) is relaxed first,
  through `ensure_permissive` (deleted, or kept PERMISSIVE over a namespace-wide STRICT), and proven PERMISSIVE;
- a destination STRICT by anything else (a team's workload policy, a namespace- or mesh-wide policy), or whose mode
  cannot be read refuses the removal, naming it and the policy: meshwave does not loosen what it does not own on
  the side of a rollback. The workload keeps its sidecar and is made PERMISSIVE; the operator relaxes the
  destination (`mesh_service permissive` on it, or its owners) and removes again;
- a destination without a sidecar, or not STRICT on any port, needs nothing.

A destination in another cluster (Istio's `destination_cluster`, the mesh's cluster ID, differs from the caller's)
is read, and relaxed when meshwave owns its STRICT, through that cluster's own API (`peers`: the plan's other
clusters, by the same name as the mesh's cluster ID). A cluster the run has no connection for cannot be read: the
removal refuses. A cluster that does not answer fails the try (retried), as the workload's own would.

After the rollout, `after_removal` compares the workload's own success rate with its rate before the removal (else
its baseline): a removal that made things worse says so in the outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from meshwave.changes import Change
from meshwave.kube_errors import NotFound
from meshwave.mtls import EffectiveMtls, Mode
from meshwave.prometheus import PrometheusError, Source, render, window_seconds

if TYPE_CHECKING:
    from meshwave.kube import MeshKube

# Calls are looked for this far back: a caller that calls a STRICT destination once an hour would still be cut off.
LOOKBACK = "1h"
NO_WORKLOAD = "unknown"  # Istio's destination_workload for a destination outside the mesh (passthrough)
SCRAPE_SLACK_SECONDS = 4  # after the rollout, a window plus this long holds only samples of the pods without sidecar


class RemovalRefused(ValueError):
    """The sidecar is not removed: its removal would cut off calls to STRICT destinations outside the run's scope.
    A ValueError so the step fails at once (a refusal is never retried)."""


class PeerUnavailable(Exception):
    """A destination's cluster cannot be read: not one of the run's clusters, or no connection to it."""


# Another cluster's MeshKube by its name (the mesh's cluster ID); raises PeerUnavailable.
Peers = Callable[[str], "MeshKube"]
# Per cluster, the policies ("ns/name") relaxed before this removal whatever it finds (an emergency dry run: its
# stage 1 wrote nothing, but the real run's stage 1 relaxes them before stage 2 removes any sidecar).
RelaxedFirst = Callable[[str], frozenset[str]]


def no_peers(cluster: str) -> MeshKube:
    raise PeerUnavailable(f"cluster {cluster} is not one of this run's clusters: no connection to read it")


def none_relaxed(cluster: str) -> frozenset[str]:
    return frozenset()


class Verdict(StrEnum):
    FINE = "fine"      # removing the sidecar leaves the calls working
    RELAX = "relax"    # STRICT by meshwave's own policy: relaxed before the removal
    REFUSE = "refuse"  # STRICT by a policy meshwave does not own, or unreadable


class Destination(BaseModel):
    """One destination the workload's proxy reported calling in the lookback."""

    model_config = ConfigDict(frozen=True)

    cluster: str
    namespace: str
    workload: str
    same_cluster: bool
    rate: float

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.workload}"


class Checked(BaseModel):
    destination: Destination
    verdict: Verdict
    why: str

    def describe(self) -> str:
        return f"{self.destination.key}: {self.why}"


class RemovalCheck(BaseModel):
    """What removing the workload's sidecar would do to its outbound calls, destination by destination."""

    workload: str
    query: str
    checked: list[Checked]

    def of(self, verdict: Verdict) -> list[Checked]:
        return [c for c in self.checked if c.verdict == verdict]

    def summary(self) -> dict[str, Any]:
        return {"query": self.query, "destinations": [c.model_dump(mode="json") for c in self.checked]}


def destinations(source: Source, namespace: str, workload: str, cluster: str | None = None,
                 lookback: str = LOOKBACK) -> tuple[list[Destination], str]:
    """The destinations the workload's proxy called in `lookback` (no series: it called none through its proxy).
    A PrometheusError propagates: an undo retries rather than remove a sidecar blind."""
    cluster = cluster if cluster is not None else getattr(source, "cluster", None)
    query = render("outbound_destinations", namespace=namespace, workload=workload, window=lookback, cluster=cluster)
    found = []
    for s in source.instant(query):
        labels = s.labels
        dest = (labels.get("destination_workload_namespace", ""), labels.get("destination_workload", ""))
        if not dest[1] or dest[1] == NO_WORKLOAD or dest == (namespace, workload) or not s.value > 0:
            continue
        found.append(Destination(cluster=labels.get("destination_cluster", "?"), namespace=dest[0], workload=dest[1],
                                 same_cluster=labels.get("destination_cluster") == labels.get("source_cluster"),
                                 rate=float(s.value)))
    return sorted(found, key=lambda d: d.key), query


def judge(dest: Destination, state: EffectiveMtls | None, proxied: bool, unreadable: str | None = None,
          relaxed_first: frozenset[str] = frozenset()) -> Checked:
    """Pure: what a destination needs before the caller's sidecar goes. `relaxed_first`: the policies ("ns/name")
    that are relaxed before this removal whatever it finds (an emergency dry run: stage 1 would have)."""
    if unreadable is not None or state is None:
        return Checked(destination=dest, verdict=Verdict.REFUSE, why=f"its mode cannot be read: {unreadable}")
    if not proxied:
        return Checked(destination=dest, verdict=Verdict.FINE, why="no sidecar: nothing enforces mTLS there")
    if not state.strict_anywhere:
        return Checked(destination=dest, verdict=Verdict.FINE, why=f"not STRICT: {state.describe()}")
    strict_mode = state.mode == Mode.STRICT
    strict_port = Mode.STRICT in state.ports.values()
    ours = (not strict_mode or (state.decided_by is not None and state.decided_by.meshwave)) and \
        (not strict_port or (state.workload_policy is not None and state.workload_policy.meshwave))
    sources = "; ".join(state.strict_sources())
    deciding = ([state.decided_by] if strict_mode else []) + ([state.workload_policy] if strict_port else [])
    if all(ref is not None and f"{ref.namespace}/{ref.name}" in relaxed_first for ref in deciding):
        return Checked(destination=dest, verdict=Verdict.FINE, why=f"STRICT by {sources}, relaxed before this removal")
    if ours:
        return Checked(destination=dest, verdict=Verdict.RELAX, why=f"STRICT by meshwave's own policy ({sources})")
    return Checked(destination=dest, verdict=Verdict.REFUSE,
                   why=f"STRICT by a policy meshwave does not own ({sources})")


def check_removal(kube: MeshKube, source: Source, namespace: str, workload: str,
                  relaxed_first: RelaxedFirst = none_relaxed, peers: Peers = no_peers) -> RemovalCheck:
    """Every destination the workload calls, judged from its effective mode and its sidecars, each read in its own
    cluster."""
    found, query = destinations(source, namespace, workload)
    checked = []
    for dest in found:
        try:
            at = _cluster_of(kube, dest, peers)
            state = at.mtls.effective(dest.namespace, dest.workload)
            proxied = at.workload(dest.namespace, dest.workload).pods_with_proxy > 0
        except PeerUnavailable as exc:
            checked.append(judge(dest, None, False, str(exc)))
            continue
        except NotFound as exc:  # not a Deployment meshwave can read (a StatefulSet, deleted): do not guess
            checked.append(judge(dest, None, False, str(exc)))
            continue
        checked.append(judge(dest, state, proxied, relaxed_first=relaxed_first(at.cluster)))
    return RemovalCheck(workload=f"{namespace}/{workload}", query=query, checked=checked)


def _cluster_of(kube: MeshKube, dest: Destination, peers: Peers) -> MeshKube:
    return kube if dest.same_cluster else peers(dest.cluster)


def prepare_removal(kube: MeshKube, source: Source, namespace: str, workload: str, note: str,
                    relaxed_first: RelaxedFirst = none_relaxed,
                    peers: Peers = no_peers) -> tuple[list[Change], RemovalCheck]:
    """Relax the STRICT destinations meshwave owns (in whichever cluster), or refuse (RemovalRefused) before any of
    them is touched."""
    check = check_removal(kube, source, namespace, workload, relaxed_first, peers)
    refused = check.of(Verdict.REFUSE)
    if refused:
        raise RemovalRefused(
            f"sidecar of {namespace}/{workload} NOT removed: without it, its calls to "
            f"{'; '.join(c.describe() for c in refused)} would go out in plaintext and be reset. Relax "
            f"{'it' if len(refused) == 1 else 'them'} first (mesh_service permissive on each, or its owners), then "
            "remove the sidecar again")
    changes: list[Change] = []
    for c in check.of(Verdict.RELAX):
        at = _cluster_of(kube, c.destination, peers)
        relaxed, _ = at.mtls.ensure_permissive(c.destination.namespace, c.destination.workload,
                                               f"{note}: {kube.cluster}/{namespace}/{workload} loses its sidecar "
                                               "and calls it")
        changes += relaxed
    return changes, check


def success_rate(source: Source, namespace: str, workload: str, window: str) -> float | None:
    """The application's own success rate over `window`; None when Prometheus has no usable value."""
    try:
        samples = source.instant(render("app_success_rate", namespace=namespace, workload=workload, window=window,
                                        cluster=getattr(source, "cluster", None)))
    except PrometheusError:
        return None
    value = samples[0].value if samples else None
    return float(value) if value is not None and value == value else None  # NaN: no data


class AfterRemoval(BaseModel):
    """The workload's own success rate once its pods run without a sidecar, against before."""

    status: str  # better_or_same | worse | no_data
    before: float | None
    after: float | None
    reason: str


def after_removal(source: Source, namespace: str, workload: str, window: str, before: float | None,
                  max_drop: float, rollout_ended: float | None, now: float | None = None) -> AfterRemoval:
    """Read one window that starts after the rollout (waiting for it, at most a window and a scrape)."""
    seconds = window_seconds(window)
    if rollout_ended is not None:
        time.sleep(max(0.0, rollout_ended + seconds + SCRAPE_SLACK_SECONDS - (now or time.time())))
    after = success_rate(source, namespace, workload, window)
    return compare(before, after, max_drop, window)


def compare(before: float | None, after: float | None, max_drop: float, window: str) -> AfterRemoval:
    """Pure: worse when the rate after the removal is more than `max_drop` below the rate before it."""
    if after is None:
        return AfterRemoval(status="no_data", before=before, after=None,
                            reason=f"no success rate of its own over {window} after the removal: not checked")
    if before is None:
        return AfterRemoval(status="no_data", before=None, after=after,
                            reason=f"success rate {after:.3f} after the removal; none before it to compare with")
    if after < before - max_drop:
        return AfterRemoval(status="worse", before=before, after=after,
                            reason=f"the removal made things WORSE: its own success rate {after:.3f} over {window} "
                                   f"after the rollout, {before:.3f} before")
    return AfterRemoval(status="better_or_same", before=before, after=after,
                        reason=f"its own success rate {after:.3f} after the removal ({before:.3f} before)")
