"""Who may press which button: the operator DAGs' access control under FAB (and none elsewhere), and the
emergency form's connection ids limited to an allow-list of prefixes, refused before any change."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshwave import access
from meshwave import emergency as em
from meshwave.fleet import load_fleet

FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
SIMPLE = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


def test_fab_gets_the_operator_roles_grants_to_read_and_trigger() -> None:
    assert access.operator_access_control(FAB, {}) == {
        "meshwave-operator": {"DAGs": {"can_read", "can_edit"}, "DAG Runs": {"can_read", "can_create"}}}
    named = access.operator_access_control(FAB, {access.ROLE_ENV: " sre-oncall "})
    assert named is not None and list(named) == ["sre-oncall"]


def test_other_auth_managers_get_no_access_control_they_would_ignore() -> None:
    assert access.operator_access_control(SIMPLE, {access.ROLE_ENV: "sre-oncall"}) is None


@pytest.mark.parametrize("role", ["", "  "])
def test_an_empty_role_setting_is_the_default(role: str) -> None:
    assert access.operator_role({access.ROLE_ENV: role}) == "meshwave-operator"


def test_a_role_name_fab_could_not_hold_is_refused() -> None:
    with pytest.raises(access.AccessConfigError, match="MESHWAVE_OPERATOR_ROLE: '<script>'"):
        access.operator_role({access.ROLE_ENV: "<script>"})


def test_connection_prefixes_default_to_the_labs_and_an_empty_setting_never_allows_everything() -> None:
    assert access.connection_prefixes({}) == ("meshlab_",)
    assert access.connection_prefixes({access.PREFIXES_ENV: " , "}) == ("meshlab_",)
    assert access.connection_prefixes({access.PREFIXES_ENV: "k8s_prod_, prom_prod_,k8s_prod_"}) == \
        ("k8s_prod_", "prom_prod_")
    with pytest.raises(access.AccessConfigError, match="'a b'"):
        access.connection_prefixes({access.PREFIXES_ENV: "a b"})


def form(kube: str, prom: str) -> dict:
    return {"clusters": ["prod-x-1"],
            "cluster_connections": {"prod-x-1": {"kubernetes_conn_id": kube, "prometheus_conn_id": prom}}}


def test_the_emergency_form_refuses_a_connection_outside_the_allow_list_naming_it(tmp_path: Path) -> None:
    fleet = load_fleet(tmp_path)  # no plan: the form's connections are all there is
    with pytest.raises(em.ScopeError) as err:
        em.parse_request(form("meshlab_x", "airflow_db"), fleet)
    message = str(err.value)
    assert "nothing was changed" in message
    assert "cluster_connections.prod-x-1.prometheus_conn_id: connection 'airflow_db' is not allowed" in message
    assert "'meshlab_'" in message and "MESHWAVE_CONNECTION_PREFIXES" in message


def test_the_allow_list_comes_from_the_environment_at_run_time(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = load_fleet(tmp_path)
    monkeypatch.setenv(access.PREFIXES_ENV, "k8s_prod_,prom_prod_")
    request = em.parse_request(form("k8s_prod_x", "prom_prod_x"), fleet)
    assert request.targets == [em.Target("prod-x-1", "k8s_prod_x", "prom_prod_x", "istio-system")]
    with pytest.raises(em.ScopeError, match="kubernetes_conn_id: connection 'meshlab_x' is not allowed"):
        em.parse_request(form("meshlab_x", "prom_prod_x"), fleet)


def test_a_prefix_match_is_at_the_start_only(tmp_path: Path) -> None:
    with pytest.raises(em.ScopeError, match="connection 'evil_meshlab_x' is not allowed"):
        em.parse_request(form("evil_meshlab_x", "meshlab_p"), load_fleet(tmp_path))
