"""The plan schema: defaults, overrides, and errors that name the file, the field and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshwave.plan import Defaults, NotifyEvent, PlanError, Settings, load_plan, parse_plan, timing_problems

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "migration": "shop-mesh",
    "clusters": {"lab": {"kubernetes_conn_id": "k8s_lab", "prometheus_conn_id": "prom_lab"}},
    "defaults": {"soak_seconds": 30, "poke_interval_seconds": 5, "query_window_seconds": 15, "batch_size": 2},
    "waves": [{"name": "wave-1", "services": [
        {"cluster": "lab", "namespace": "shop", "workload": "auth", "criticality": "critical"},
        {"cluster": "lab", "namespace": "shop", "workload": "user", "soak_seconds": 20,
         "thresholds": {"max_success_drop": 0.1}},
    ]}],
}


def variant(path: str, value: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    target = data
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return data


def test_effective_settings_inherit_and_override() -> None:
    plan = parse_plan(BASE)
    auth, user = plan.waves[0].services
    assert auth.settings(plan.defaults).soak_seconds == 30
    assert user.settings(plan.defaults).soak_seconds == 20
    assert user.settings(plan.defaults).thresholds.max_success_drop == 0.1
    assert auth.settings(plan.defaults).thresholds.max_success_drop == 0.02
    assert plan.dag_id(plan.waves[0]) == "meshwave_shop_mesh_wave_1"


@pytest.mark.parametrize(("path", "value", "message"), [
    ("waves.0.services.0.namespace", "Shop", "waves[0].services[0].namespace: 'Shop' is not a valid RFC 1123 label"),
    ("waves.0.services.0.workload", 'x"} or vector(1)', "waves[0].services[0].workload: 'x\"} or vector(1)' is not"),
    ("waves.0.services.0.workload", "../etc", "waves[0].services[0].workload: '../etc' is not a valid RFC 1123"),
    ("waves.0.services.0.cluster", "prod", "waves[0].services[0].cluster: unknown cluster 'prod'"),
    ("waves.0.services.1.workload", "auth", "waves[0].services[1]: lab/shop/auth is already planned"),
    ("defaults.batch_size", 0, "defaults.batch_size: Input should be greater than or equal to 1"),
    ("defaults.schedule", "every night", "defaults.schedule: 'every night' is not a valid cron expression"),
    ("defaults.on_no_data", "ignore", "defaults.on_no_data: Input should be 'hold' or 'rollback'"),
    ("waves.0.services.0.colour", "red", "waves[0].services[0].colour: Extra inputs are not permitted"),
    ("clusters.lab.kubernetes_conn_id", "http://x", "clusters.lab.kubernetes_conn_id: 'http://x' is not a valid"),
    ("waves", [], "waves: List should have at least 1 item"),
    ("defaults.notify", [{"channel": "email", "conn_id": "smtp"}],
     "defaults.notify[0]: an email target needs `to` (one or more addresses)"),
    ("defaults.notify", [{"channel": "webhook", "conn_id": "chat", "events": ["rollback"]}],
     "defaults.notify[0].events[0]: Input should be 'rolled_back', 'held', 'failed'"),
    ("defaults.notify", [{"channel": "pager", "conn_id": "p"}], "defaults.notify[0].channel: Input should be"),
    ("waves.0.services.0.notify", [{"channel": "webhook", "conn_id": "a b"}],
     "waves[0].services[0].notify[0].conn_id: 'a b' is not a valid Airflow connection id"),
])
def test_bad_plans_name_the_field_and_problem(path: str, value: object, message: str) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(variant(path, value), "plans/x.yaml")
    assert str(info.value).startswith("plans/x.yaml: ")
    assert message in str(info.value)


def test_cli_validate(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(BASE))
    bad.write_text(yaml.safe_dump(variant("waves.0.services.0.namespace", "Shop")))
    ok = subprocess.run([sys.executable, "-m", "meshwave.cli", "plan", "validate", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok: migration shop-mesh, 1 waves, 2 services" in ok.stdout
    result = subprocess.run([sys.executable, "-m", "meshwave.cli", "plan", "validate", str(good), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{bad}: waves[0].services[0].namespace: 'Shop' is not a valid RFC 1123 label " \
        "(lower case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "missing.yaml")


def test_a_plan_reads_the_same_with_libyaml_and_errors_keep_the_python_loaders_message(tmp_path: Path) -> None:
    from meshwave import plan as plan_module

    text = yaml.safe_dump(BASE)
    assert plan_module._load_yaml(text) == yaml.safe_load(text)
    bad = tmp_path / "bad.yaml"
    bad.write_text("migration: x\nwaves: [1,\n")
    with pytest.raises(PlanError) as info:
        load_plan(bad)
    try:
        yaml.safe_load(bad.read_text())
    except yaml.YAMLError as exc:
        assert str(info.value) == f"{bad}: not valid YAML: {exc}"


# ---- timing across fields (findings 11 and 19) ------------------------------------------------------------------
@pytest.mark.parametrize(("path", "value", "message"), [
    # the old model defaults: window 60 s, poke 30 s, 3 breaches: an event is seen by 2 polls, 3 confirm it
    ("defaults", {"poke_interval_seconds": 30, "query_window_seconds": 60, "breaches_to_fail": 3},
     "defaults.query_window_seconds: 60 is shorter than breaches_to_fail 3 x poke_interval_seconds 30 = 90"),
    ("defaults", {"soak_seconds": 10, "query_window_seconds": 15},
     "defaults.soak_seconds: 10 is shorter than query_window_seconds 15"),
    ("defaults", {"verify_seconds": 30, "query_window_seconds": 120, "soak_seconds": 300},
     "defaults.verify_seconds: 30 is shorter than query_window_seconds 120"),
    ("waves.0.services.1", {"soak_seconds": 10},
     "waves[0].services[1].soak_seconds: 10 is shorter than query_window_seconds 15"),
    ("waves.0.services.1", {"verify_seconds": 10},
     "waves[0].services[1].verify_seconds: 10 is shorter than query_window_seconds 15"),
    ("waves.0.services.0", {"poke_interval_seconds": 10},
     "waves[0].services[0].query_window_seconds: 15 is shorter than breaches_to_fail 3 x poke_interval_seconds 10 "
     "= 30"),
    ("waves.0.services.0", {"query_window_seconds": 40},  # longer than the defaults' soak of 30 s
     "waves[0].services[0].soak_seconds: 30 is shorter than query_window_seconds 40"),
])
def test_timing_across_fields_is_validated_for_the_defaults_and_every_service(path: str, value: dict[str, Any],
                                                                               message: str) -> None:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    target = data
    for key in path.split("."):
        target = target[int(key)] if key.isdigit() else target[key]
    target.update(value)
    with pytest.raises(PlanError) as info:
        parse_plan(data, "plans/x.yaml")
    assert str(info.value).startswith(f"plans/x.yaml: {message}")


def test_the_model_defaults_are_sound_and_the_reviewed_defaults_were_not() -> None:
    assert timing_problems(Settings()) == [] and timing_problems(Defaults()) == []
    reviewed = Settings(soak_seconds=300, poke_interval_seconds=30, query_window_seconds=60, breaches_to_fail=3,
                        verify_seconds=120)
    assert [p.split(":")[0] for p in timing_problems(reviewed)] == ["query_window_seconds"]


def test_a_window_equal_to_the_polls_and_to_the_stages_is_enough() -> None:
    plan = parse_plan({**BASE, "defaults": {"soak_seconds": 15, "verify_seconds": 15, "query_window_seconds": 15,
                                            "poke_interval_seconds": 5, "breaches_to_fail": 3}})
    assert timing_problems(plan.waves[0].services[1].settings(plan.defaults)) == []


PLANS = sorted([*ROOT.glob("include/plans/*.yaml"), *ROOT.glob("tests/e2e/plans/*.yaml"),
                *ROOT.glob("tests/distributed/plans/*.yaml")])


@pytest.mark.parametrize("path", PLANS, ids=[str(p.relative_to(ROOT)) for p in PLANS])
def test_the_repository_s_own_plans_load(path: Path) -> None:
    assert load_plan(path).waves


def test_the_benchmarks_generated_plans_load() -> None:
    sys.path.insert(0, str(ROOT))
    from bench import soak
    from bench.fleetgen import seed_plan, synthetic_plan

    for name, data in (("seed", seed_plan()), ("synthetic", synthetic_plan(200)), ("soak", soak.plan_for(50, 60)[1])):
        assert parse_plan(data, name).waves, name


def test_a_service_s_own_notify_replaces_the_defaults_and_events_default_to_all() -> None:
    team = {"channel": "webhook", "conn_id": "payments_chat"}
    data = variant("defaults.notify", [{"channel": "email", "conn_id": "smtp", "to": ["sre@example.test"],
                                        "events": ["wave_failed", "undo_gave_up"]}])
    data["waves"][0]["services"][0]["notify"] = [team]
    plan = parse_plan(data)
    auth, user = plan.waves[0].services
    [own] = auth.settings(plan.defaults).notify
    assert own.conn_id == "payments_chat" and own.events == list(NotifyEvent), "all events when none are named"
    assert [t.conn_id for t in user.settings(plan.defaults).notify] == ["smtp"]
