"""What meshwave expects next of a workload it changed, kept on the workload itself.

A wave that is paused, whose plan file breaks, or whose undo ran out of retries leaves the mesh in a state
nobody confirmed: a sidecar still on trial, a STRICT never verified. Each such state is written onto the
Deployment as the annotation `meshwave.io/pending` *before* the change it covers:

    {"state": "STRICT, not verified yet", "undo": "permissive", "until": "2026-11-28T21:40:00Z",
     "run": "meshwave_shop_w1/manual__2026-11-28T21:00:00", "service": {...the admitted service...}}

The run that made the change confirms it (removes the annotation) when its own decision keeps the state, or
carries out `undo` and removes it then. `mesh_reconcile` finds the annotations whose `until` has passed and carries
out their `undo` through the same service task group, with the same checks: the annotation holds everything it
needs (connections, settings, thresholds), so a broken plan file does not lose it.

The annotation sits in the Deployment's own metadata, not in its pod template: writing it restarts no pod.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from meshwave.annotations import WorkloadAnnotation, iso

PENDING_ANNOTATION = "meshwave.io/pending"


class Undo(StrEnum):
    """The ad-hoc action that undoes a pending state (steps.ACTIONS)."""

    PERMISSIVE = "permissive"
    REMOVE_SIDECAR = "remove_sidecar"
    REMOVE_CANARY = "remove_canary"


class Pending(WorkloadAnnotation):
    ANNOTATION = PENDING_ANNOTATION

    state: str
    undo: Undo
    until: datetime
    run: str  # "<dag id>/<run id>": the run that made the change
    service: dict[str, Any]  # steps.Service.to_dict() as the run admitted it

    def due(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.until

    def describe(self) -> str:
        return f"{self.state}; unless {self.run} confirms it by {iso(self.until)}: {self.undo}"


def expecting(state: str, undo: Undo, seconds: float, run: str, service: dict[str, Any]) -> Pending:
    """A pending state that is due `seconds` from now."""
    return Pending(state=state, undo=undo, until=datetime.now(UTC) + timedelta(seconds=seconds), run=run,
                   service=json.loads(json.dumps(service)))
