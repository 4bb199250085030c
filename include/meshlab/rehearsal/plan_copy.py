"""The rehearsal's copy of a plan: the same waves, services and thresholds, shorter waits and no windows.

A rehearsal runs now: a wave's maintenance window or schedule is dropped (the first waves are triggered, the
chained ones still start on their predecessor's Asset). Soaks and verifications last `soak_seconds`; the query
window and the poll interval shrink with them so the plan's own timing rules still hold (plan.timing_problems).
Everything a decision reads (thresholds, breaches, min_requests, strict flags, sidecar sizes) stays as written.
Approvals before STRICT are dropped: nobody is there to answer, and a rehearsal that waited out every timeout would
end PERMISSIVE where the plan means STRICT. The copy flips what the gates pass, as the plan does once approved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from meshwave.plan import Plan, PlanError, load_plan

TIMING = ("soak_seconds", "verify_seconds", "query_window_seconds", "poke_interval_seconds")
MIN_WINDOW = 10  # the plan schema's least query window


class RehearsalError(Exception):
    """A rehearsal that cannot start or cannot be judged: the message says what and where."""


def rehearsal_plan(source: Path, soak_seconds: int) -> tuple[Plan, str]:
    """The plan at `source` with the rehearsal's timing, and its YAML; a RehearsalError when either is refused."""
    try:
        plan = load_plan(source)
    except PlanError as exc:
        raise RehearsalError(f"plan {source}: {exc}") from None
    if soak_seconds < MIN_WINDOW:
        raise RehearsalError(f"--soak-seconds {soak_seconds}: at least {MIN_WINDOW} (the least query window)")
    data = plan.model_dump(mode="json", exclude_unset=True)
    data["defaults"] = {**data.get("defaults", {}), **_timing(plan, soak_seconds)}
    data["defaults"].pop("approval", None)
    for wave in data["waves"]:
        wave.pop("window", None)
        wave.pop("schedule", None)
        wave.pop("approval", None)
        for service in wave["services"]:
            for name in TIMING:
                service.pop(name, None)
    data["defaults"].pop("schedule", None)
    text = yaml.safe_dump(data, sort_keys=False, width=120)
    try:
        return Plan.model_validate(yaml.safe_load(text)), text
    except ValueError as exc:
        raise RehearsalError(f"plan {source} with soaks of {soak_seconds} s does not validate: {exc}") from None


def _timing(plan: Plan, soak: int) -> dict[str, Any]:
    d = plan.defaults
    window = max(MIN_WINDOW, min(d.query_window_seconds, soak))
    poke = max(1, min(d.poke_interval_seconds, window // d.breaches_to_fail))
    return {"soak_seconds": soak, "verify_seconds": soak, "query_window_seconds": window,
            "poke_interval_seconds": poke}


def first_waves(plan: Plan) -> list[str]:
    """The waves a rehearsal triggers itself: those no other wave starts."""
    return [w.name for w in plan.waves if w.after is None]
