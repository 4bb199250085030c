"""What may stop changes from starting: the migration-wide freeze and the maintenance window.

Both are checked at run time, before a change: by the wave preflight (the whole run) and by each
service's `admit` task (a service that has not started yet). The freeze is also read again immediately
before each write that makes the mesh stricter (inject, flip to STRICT): a service in flight when the
freeze comes stops where it is safe (PERMISSIVE), its outcome `frozen` with the freeze's reason. Undo
steps (back to PERMISSIVE, remove a sidecar) never look at it: they make the mesh safer. The emergency
rollback sets the freeze (when not a dry run) before it relaxes anything.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import Variable

from meshwave.plan import Window

FREEZE_VARIABLE = "meshwave_freeze"
OFF = ("", "false", "off", "no", "0")


def frozen(plan_freeze: bool | str = False) -> str | None:
    """Why changes are frozen now, or None: the plan's `freeze` flag, then the Airflow Variable."""
    if plan_freeze:
        return "the plan says freeze" + (f": {plan_freeze}" if isinstance(plan_freeze, str) else "")
    value = Variable.get(FREEZE_VARIABLE, default=None)
    if value is None or str(value).strip().lower() in OFF:
        return None
    return f"the Airflow Variable {FREEZE_VARIABLE} is set: {str(value).strip()}"


def frozen_now(service_key: str) -> str | None:
    """The freeze read again immediately before a write (inject, flip to STRICT): the Variable first (what the
    emergency rollback sets), then the service's plan file as it is now."""
    if reason := frozen():
        return reason
    from meshwave.fleet import load_fleet  # the plan files, only when the Variable says nothing

    planned = load_fleet().services.get(service_key)
    return frozen(planned.plan.freeze) if planned else None


def freeze_for_emergency(why: str) -> str:
    """Set the freeze for an emergency rollback, before it changes anything; a freeze already set stays as it is (an
    operator's reason is not overwritten). Returns the reason in force. Lifted only by an operator (delete the
    Variable): the incident is over when a person says so, not when the rollback's run ends."""
    current = frozen()
    if current is not None:
        return current
    Variable.set(FREEZE_VARIABLE, why, description="set by mesh_emergency_rollback: delete it when the incident is "
                 "over (airflow variables delete meshwave_freeze)")
    return frozen() or f"the Airflow Variable {FREEZE_VARIABLE} is set: {why}"


class OutsideWindow(ValueError):
    """A run started while its maintenance window is closed, without the override."""


def now() -> datetime:
    return datetime.now(UTC)


def window_at_start(window: Window | None, override: bool, at: datetime) -> dict[str, Any]:
    """The window a run works in: {"closes": iso} when open, {"override": True, ...} when forced outside it.

    Raises OutsideWindow (with when it opens next) for a run outside its window without the override.
    """
    if window is None:
        return {"window": None}
    occurrence = window.open_at(at)
    if occurrence is not None:
        return {"window": window.describe(), "opened": occurrence[0].isoformat(), "closes": occurrence[1].isoformat()}
    upcoming = window.next_open(at)
    when = f"; it opens next at {upcoming.isoformat()}" if upcoming else "; no window date is left"
    if not override:
        raise OutsideWindow(f"outside the maintenance window ({window.describe()}){when}. To run now anyway, "
                            "trigger with the param outside_window = true (the log records it)")
    return {"window": window.describe(), "override": True, "closes": None,
            "note": f"OVERRIDE: running outside the maintenance window ({window.describe()}){when}"}


def window_closed(state: dict[str, Any] | None, at: datetime) -> str | None:
    """Why a service may no longer start in this run (its window closed), or None."""
    closes = (state or {}).get("closes")
    if closes and at >= datetime.fromisoformat(closes):
        return f"the maintenance window closed at {closes}"
    return None
