"""A service's outcome in a run, and what each one means for the run, the wave and the next wave: one place, so that
the outcome task, the report, the failure budget, `publish` and `mesh_reconcile` cannot disagree."""

from __future__ import annotations

from enum import StrEnum


class ServiceOutcome(StrEnum):
    """Listed in the report's order. A record carries the value (a str: XCom and the report stay plain JSON)."""

    STRICT = "strict"  # STRICT in force, verified with the service and its callers
    PERMISSIVE = "permissive"  # a sidecar, PERMISSIVE: a plaintext caller or an inconclusive gate kept it there
    REMOVED = "removed"  # its sidecar removed on request (mesh_service remove_sidecar)
    HELD = "held"  # injected, but the soak could not judge it (no data, Prometheus down); or its canary could not be
    # judged, and then it was not injected
    ROLLED_BACK = "rolled_back"  # its sidecar removed again after a failed rollout or soak; or its canary failed
    BLOCKED = "blocked"  # refused before any change (preflight, a policy of a team's, a lease)
    FAILED = "failed"  # a step broke: the state is what the record's LEFT says
    FROZEN = "frozen"  # the freeze stopped it before a write that would make it stricter
    CLEARED = "cleared"  # the emergency's mark removed (mesh_service clear_emergency)
    SKIPPED = "skipped"  # not started (outside its window, the breaker, settled meanwhile)
    PLANNED = "planned"  # a dry run: what it would do

    @property
    def red(self) -> bool:
        """Fails the group's outcome task (red in the UI), and an ad-hoc run. `frozen` is not red: the service stays
        as it was, PERMISSIVE: safe, and what the freeze asked for."""
        return self in (ServiceOutcome.ROLLED_BACK, ServiceOutcome.BLOCKED, ServiceOutcome.FAILED, ServiceOutcome.HELD)

    @property
    def against_budget(self) -> bool:
        """Counts against the wave's failure budget (`max_failures`). `held` does: it was judged blind."""
        return self in (ServiceOutcome.ROLLED_BACK, ServiceOutcome.FAILED, ServiceOutcome.HELD)

    @property
    def fails_wave(self) -> bool:
        """Fails the wave's report on its own, whatever the budget: a state not known, or not judged."""
        return self in (ServiceOutcome.FAILED, ServiceOutcome.HELD)

    @property
    def attempted(self) -> bool:
        """The run tried the service: `publish` starts the next wave only when every service was attempted."""
        return self not in (ServiceOutcome.SKIPPED, ServiceOutcome.PLANNED, ServiceOutcome.FROZEN)

    @property
    def settled(self) -> bool:
        """The run's own decision stands: what it left pending on the workload is confirmed, or was never changed.
        `failed` and `planned` are not: a failed run's undo is made due for mesh_reconcile."""
        return self not in (ServiceOutcome.FAILED, ServiceOutcome.PLANNED)

    @property
    def changed_nothing(self) -> bool:
        """The run left the service exactly as it found it: refused, frozen, not started, or a dry run."""
        return self in (ServiceOutcome.BLOCKED, ServiceOutcome.FROZEN, ServiceOutcome.SKIPPED, ServiceOutcome.PLANNED)

    @property
    def undone(self) -> bool:
        """A mesh_reconcile undo that ended here is done (`skipped`: settled meanwhile, read again before acting)."""
        return self in (ServiceOutcome.PERMISSIVE, ServiceOutcome.REMOVED, ServiceOutcome.SKIPPED)
