"""What may stop changes from starting: the migration-wide freeze and the maintenance window.

Both are checked at run time, before a change: by the wave preflight (the whole run) and by each
service's `admit` task (a service that has not started yet). A service already in flight is never
stopped half-way by them: it finishes or rolls back.
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


def now() -> datetime:
    return datetime.now(UTC)


def window_at_start(window: Window | None, override: bool, at: datetime) -> dict[str, Any]:
    """The window a run works in: {"closes": iso} when open, {"override": True, ...} when forced outside it.

    Raises ValueError (with when it opens next) for a run outside its window without the override.
    """
    if window is None:
        return {"window": None}
    occurrence = window.open_at(at)
    if occurrence is not None:
        return {"window": window.describe(), "opened": occurrence[0].isoformat(), "closes": occurrence[1].isoformat()}
    upcoming = window.next_open(at)
    when = f"; it opens next at {upcoming.isoformat()}" if upcoming else "; no window date is left"
    if not override:
        raise ValueError(f"outside the maintenance window ({window.describe()}){when}. To run now anyway, trigger "
                         "with the param outside_window = true (the log records it)")
    return {"window": window.describe(), "override": True, "closes": None,
            "note": f"OVERRIDE: running outside the maintenance window ({window.describe()}){when}"}


def window_closed(state: dict[str, Any] | None, at: datetime) -> str | None:
    """Why a service may no longer start in this run (its window closed), or None."""
    closes = (state or {}).get("closes")
    if closes and at >= datetime.fromisoformat(closes):
        return f"the maintenance window closed at {closes}"
    return None
