"""The plan schema: defaults, overrides, and errors that name the file, the field and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshwave.plan import PlanError, load_plan, parse_plan

BASE = {
    "migration": "shop-mesh",
    "clusters": {"lab": {"kubernetes_conn_id": "k8s_lab", "prometheus_conn_id": "prom_lab"}},
    "defaults": {"soak_seconds": 30, "batch_size": 2},
    "waves": [{"name": "wave-1", "services": [
        {"cluster": "lab", "namespace": "shop", "workload": "auth", "criticality": "critical"},
        {"cluster": "lab", "namespace": "shop", "workload": "user", "soak_seconds": 10,
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
    assert user.settings(plan.defaults).soak_seconds == 10
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
