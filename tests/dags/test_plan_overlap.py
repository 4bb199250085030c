"""A workload that two plan files name: each wave DAG file of either plan is an import error naming both files;
the other DAG files still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.dags.test_dag_integrity import SEED_PLAN, dagbag


@pytest.fixture(autouse=True)
def airflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


def test_a_workload_in_two_plans_is_an_import_error_of_both_files(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    plans, dags = tmp_path / "plans", tmp_path / "dags"
    plans.mkdir()
    dags.mkdir()
    seed = yaml.safe_load(SEED_PLAN.read_text())
    shared = seed["waves"][0]["services"][0]
    other = {**seed, "migration": "team-b", "waves": [{"name": "wave-1", "services": [shared]}]}
    apart = {**seed, "migration": "team-c", "waves": [{"name": "wave-1", "services": [
        {"cluster": shared["cluster"], "namespace": "elsewhere", "workload": "apart"}]}]}
    for name, data in (("seed", seed), ("team-b", other), ("team-c", apart)):
        (plans / f"{name}.yaml").write_text(yaml.safe_dump(data))
        (dags / f"{name.replace('-', '_')}.py").write_text(f'"""airflow dag factory"""\nfrom meshwave.wave import '
                                                           f'wave_dags\nglobals().update(wave_dags("{name}.yaml"))\n')
    monkeypatch.setenv("MESHWAVE_PLANS_DIR", str(plans))
    bag = dagbag(dags)
    key = f"{shared['cluster']}/{shared['namespace']}/{shared['workload']}"
    assert sorted(bag.import_errors) == [str(dags / "seed.py"), str(dags / "team_b.py")]
    assert f"{key} is planned in two plan files, seed.yaml and team-b.yaml" in bag.import_errors[str(dags / "seed.py")]
    assert f"{key} is planned in two plan files, team-b.yaml and seed.yaml" in \
        bag.import_errors[str(dags / "team_b.py")]
    assert "meshwave_team_c_wave_1" in bag.dags, "a plan that shares nothing still loads"
