"""The operator DAGs carry DAG-level access control for the operator role when the auth manager is FAB's (the
compose shape), and none under the SimpleAuthManager (the tests, `make demo`), which would ignore it. FAB itself
is not installed here: what FAB does with the mapping is read from its source (docs/operations.md,
"Configuration: who may press which button"); this checks what the DAG processor would hand it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from meshwave.wave import ROOT

from .test_dag_integrity import OPERATOR_DAGS, dagbag

DAGS = ROOT / "dags"
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
BUTTONS = {"mesh_service", "mesh_emergency_rollback"}
GRANTS = {"DAGs": {"can_read", "can_edit"}, "DAG Runs": {"can_read", "can_create"}}


@pytest.fixture(autouse=True)
def airflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


def test_under_fab_only_the_buttons_are_limited_to_the_operator_role(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", FAB)
    monkeypatch.setenv("MESHWAVE_OPERATOR_ROLE", "sre-oncall")
    bag = dagbag(DAGS)
    assert bag.import_errors == {}
    for dag_id, dag in bag.dags.items():
        expected = {"sre-oncall": GRANTS} if dag_id in BUTTONS else None
        assert dag.access_control == expected, dag_id
    assert BUTTONS < OPERATOR_DAGS


def test_under_the_simple_auth_manager_no_dag_sets_access_control(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                       "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # access_control would warn (RemovedInAirflow4Warning)
        bag = dagbag(DAGS)
    assert bag.import_errors == {}
    assert all(dag.access_control is None for dag in bag.dags.values())
    assert not any("access_control" in w or "security.permissions" in w
                   for ws in bag.captured_warnings.values() for w in ws)
