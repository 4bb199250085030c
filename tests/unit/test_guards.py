"""Maintenance windows, wave chaining and the freeze switch: the plan fields and the guards."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from meshwave import guards
from meshwave.plan import PlanError, Window, parse_plan

BERLIN_SATURDAY_2AM = {"cron": "0 2 * * 6", "duration_minutes": 240, "timezone": "Europe/Berlin"}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def plan(*waves: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"migration": "m", "clusters": {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}},
            "waves": list(waves), **top}


def wave(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "services": [{"cluster": "lab", "namespace": "shop", "workload": f"svc-{name}"}], **fields}


def test_a_cron_window_is_open_from_its_start_for_its_duration_in_its_time_zone() -> None:
    w = Window(**BERLIN_SATURDAY_2AM)
    # 2026-11-28 is a Saturday; 02:00 in Berlin (CET, +01:00) is 01:00 UTC.
    opened, closes = w.open_at(at("2026-11-28T01:00:00+00:00"))
    assert (opened.isoformat(), closes.isoformat()) == ("2026-11-28T02:00:00+01:00", "2026-11-28T06:00:00+01:00")
    assert w.open_at(at("2026-11-28T04:59:59+00:00")) is not None
    assert w.open_at(at("2026-11-28T05:00:00+00:00")) is None, "the end is not in the window"
    assert w.open_at(at("2026-11-28T00:59:59+00:00")) is None
    assert w.next_open(at("2026-11-28T05:00:00+00:00")).isoformat() == "2026-12-05T02:00:00+01:00"


def test_explicit_dates_naive_times_are_in_the_window_time_zone() -> None:
    w = Window(timezone="America/New_York", dates=[{"start": "2026-12-01T22:00:00", "end": "2026-12-02T01:00:00"},
                                                   {"start": "2026-12-08T22:00:00Z", "end": "2026-12-08T23:00:00Z"}])
    assert w.open_at(at("2026-12-02T03:30:00+00:00")) is not None  # 22:30 in New York
    assert w.open_at(at("2026-12-02T06:00:00+00:00")) is None
    assert w.next_open(at("2026-12-02T06:00:00+00:00")) == at("2026-12-08T22:00:00+00:00")
    assert w.next_open(at("2026-12-09T00:00:00+00:00")) is None


@pytest.mark.parametrize(("window", "message"), [
    ({"cron": "0 2 * * 6"}, "a cron window needs duration_minutes"),
    ({"cron": "0 2 * * 6", "duration_minutes": 60, "dates": [{"start": "2026-12-01T00:00:00",
                                                              "end": "2026-12-01T01:00:00"}]},
     "give either cron + duration_minutes, or dates"),
    ({}, "give either cron + duration_minutes, or dates"),
    ({"cron": "0 2 * * 8", "duration_minutes": 60}, "'0 2 * * 8' is not a valid cron expression"),
    ({"cron": "0 2 * * 6", "duration_minutes": 60, "timezone": "Mars/Olympus"}, "'Mars/Olympus' is not a known IANA"),
    ({"dates": [{"start": "2026-12-01T02:00:00", "end": "2026-12-01T01:00:00"}]}, "is not after start"),
    ({"cron": "0 2 * * 6", "duration_minutes": 0}, "duration_minutes"),
])
def test_a_bad_window_names_the_field(window: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=r"waves\[0\]\.window") as exc:
        parse_plan(plan(wave("wave-1", window=window)), "p.yaml")
    assert message in str(exc.value)


def test_chaining_names_an_earlier_wave_and_excludes_a_schedule() -> None:
    ok = parse_plan(plan(wave("wave-1", window=BERLIN_SATURDAY_2AM), wave("wave-2", after="wave-1")))
    assert ok.waves[1].after == "wave-1"
    with pytest.raises(PlanError, match=r"waves\[1\]\.after: 'wave-3' is not an earlier wave"):
        parse_plan(plan(wave("wave-1"), wave("wave-2", after="wave-3")))
    with pytest.raises(PlanError, match=r"waves\[0\]\.after: 'wave-1' is not an earlier wave"):
        parse_plan(plan(wave("wave-1", after="wave-1")))
    with pytest.raises(PlanError, match="drop `schedule`"):
        parse_plan(plan(wave("wave-1"), wave("wave-2", after="wave-1", schedule="0 3 * * *")))


def test_a_run_starts_inside_its_window_and_knows_when_it_closes() -> None:
    w = Window(**BERLIN_SATURDAY_2AM)
    state = guards.window_at_start(w, override=False, at=at("2026-11-28T01:30:00+00:00"))
    assert state["closes"] == "2026-11-28T06:00:00+01:00" and "override" not in state
    assert guards.window_closed(state, at("2026-11-28T04:59:00+00:00")) is None
    assert guards.window_closed(state, at("2026-11-28T05:00:00+00:00")) == \
        "the maintenance window closed at 2026-11-28T06:00:00+01:00"


def test_outside_the_window_a_run_is_refused_unless_overridden_and_the_override_is_recorded() -> None:
    w = Window(**BERLIN_SATURDAY_2AM)
    with pytest.raises(ValueError, match="outside the maintenance window .*opens next at 2026-12-05T02:00:00"
                                         r"\+01:00.*outside_window = true"):
        guards.window_at_start(w, override=False, at=at("2026-11-30T12:00:00+00:00"))
    state = guards.window_at_start(w, override=True, at=at("2026-11-30T12:00:00+00:00"))
    assert state["override"] is True and state["note"].startswith("OVERRIDE: running outside")
    assert guards.window_closed(state, at("2027-01-01T00:00:00+00:00")) is None, "an override has no closing time"
    assert guards.window_at_start(None, override=False, at=guards.now()) == {"window": None}


@pytest.mark.parametrize(("variable", "plan_freeze", "expected"), [
    (None, False, None),
    ("false", False, None),
    (" OFF ", False, None),
    ("", False, None),
    ("incident INC-4711", False, "the Airflow Variable meshwave_freeze is set: incident INC-4711"),
    ("true", False, "the Airflow Variable meshwave_freeze is set: true"),
    (None, True, "the plan says freeze"),
    (None, "change freeze until Monday", "the plan says freeze: change freeze until Monday"),
])
def test_the_freeze_switch(monkeypatch: pytest.MonkeyPatch, variable: str | None, plan_freeze: bool | str,
                           expected: str | None) -> None:
    asked = []

    def get(key: str, default: Any = None) -> Any:
        asked.append(key)
        return default if variable is None else variable

    monkeypatch.setattr(guards.Variable, "get", staticmethod(get))
    assert guards.frozen(plan_freeze) == expected
    if not plan_freeze:
        assert asked == ["meshwave_freeze"]


def test_now_is_aware() -> None:
    assert abs(guards.now() - datetime.now(UTC)) < timedelta(seconds=5)
