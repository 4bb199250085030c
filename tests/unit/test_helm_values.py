"""deploy/helm/values.yaml against what it must agree with and what can be read without the chart: the compose file's
settings for the workers, deploy/rbac/'s service accounts, the Dockerfile's image. The chart's own schema is not in
the repository; deploy/helm/README.md says which chart version the values were validated against."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "deploy" / "helm" / "values.yaml"


def _values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def _worker_env() -> dict[str, str]:
    """The airflow-worker service's environment, `${VAR:-default}` read as its default (what .env may override)."""
    env = _compose()["services"]["airflow-worker"]["environment"]
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def _service_account(kind: str) -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "deploy" / "rbac" / f"meshwave-{kind}.yaml").read_text())
    (account,) = [d for d in docs if d and d["kind"] == "ServiceAccount"]
    return account


def _config(values: dict[str, Any], variable: str) -> Any:
    """AIRFLOW__SECTION__KEY as the chart's `config:` (airflow.cfg) holds it; None when it does not."""
    section, key = variable.removeprefix("AIRFLOW__").lower().split("__", 1)
    return values.get("config", {}).get(section, {}).get(key)


def _env_names(values: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in values.get("env", [])}


def _secret_env_names(values: dict[str, Any]) -> set[str]:
    return {s["envName"] for s in values.get("secret", [])}


# Compose sets these for the workers; the chart sets them itself, from what these values give it.
CHART_PROVIDES: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "AIRFLOW__CORE__EXECUTOR": ("the chart's `executor` (checked below)", lambda v: bool(v.get("executor"))),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": ("from data.metadataSecretName",
                                            lambda v: bool(v["data"].get("metadataSecretName"))),
    "AIRFLOW__CELERY__RESULT_BACKEND": ("from data.resultBackendSecretName",
                                        lambda v: bool(v["data"].get("resultBackendSecretName"))),
    "AIRFLOW__CELERY__BROKER_URL": ("from data.brokerUrlSecretName",
                                    lambda v: bool(v["data"].get("brokerUrlSecretName"))),
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": ("the chart points it at its own API server unless config sets it",
                                                lambda v: "execution_api_server_url" not in v["config"]["core"]),
    "DUMB_INIT_SETSID": ("the chart's worker template sets it to 0", lambda v: True),
}


def test_the_values_parse_as_a_mapping() -> None:
    assert isinstance(_values(), dict) and _values()["executor"]


def test_the_executor_is_compose_s() -> None:
    assert _values()["executor"] == _worker_env()["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


@pytest.mark.parametrize("component, kind", [(("workers", "celery"), "worker"), (("triggerer",), "triggerer")])
def test_workers_and_triggerer_run_as_deploy_rbac_s_service_accounts(component: tuple[str, ...], kind: str) -> None:
    section: dict[str, Any] = _values()
    for key in component:
        section = section[key]
    account = _service_account(kind)
    # created by deploy/rbac (with its ClusterRole bindings), never by the chart under another name
    assert section["serviceAccount"]["create"] is False
    assert section["serviceAccount"]["name"] == account["metadata"]["name"]
    assert section["serviceAccount"]["automountServiceAccountToken"] is True  # in_cluster connections need it


def test_the_release_goes_into_the_service_accounts_namespace() -> None:
    # a pod can only use a service account of its own namespace: the install line names deploy/rbac's
    namespaces = {_service_account(kind)["metadata"]["namespace"] for kind in ("worker", "triggerer")}
    (namespace,) = namespaces
    install = next(line for line in VALUES.read_text().splitlines() if "helm install" in line)
    assert f"-n {namespace} " in install, install


@pytest.mark.parametrize("variable", sorted(_worker_env()))
def test_every_setting_compose_gives_the_workers_is_set_or_provided_by_the_chart(variable: str) -> None:
    values, expected = _values(), _worker_env()[variable]
    if variable in CHART_PROVIDES:
        why, holds = CHART_PROVIDES[variable]
        assert holds(values), f"{variable}: {why}, but the values do not give the chart what it needs"
    elif variable.startswith("AIRFLOW_CONN_"):
        assert variable in _secret_env_names(values), f"{variable}: not among the values' `secret` connections"
    elif variable.startswith("AIRFLOW__"):
        assert str(_config(values, variable)) == expected, f"{variable}: config has {_config(values, variable)!r}"
    else:  # meshwave's own settings
        assert _env_names(values).get(variable) == expected, f"{variable}: env has {_env_names(values).get(variable)!r}"


def test_the_values_set_no_connection_compose_does_not_have() -> None:
    assert _secret_env_names(_values()) == {k for k in _worker_env() if k.startswith("AIRFLOW_CONN_")}


def test_the_workers_get_none_of_the_secrets_compose_keeps_from_them() -> None:
    services = _compose()["services"]
    others = {k for name, s in services.items() if name.startswith("airflow-") and name != "airflow-worker"
              for k in s.get("environment", {})}
    kept_away = others - set(_worker_env())
    assert {"AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET"} <= kept_away
    values = _values()
    # the chart hands the Fernet key and the API secret key to every pod unless told not to
    assert values["enableBuiltInSecretEnvVars"] == {"AIRFLOW__CORE__FERNET_KEY": False,
                                                   "AIRFLOW__API__SECRET_KEY": False}
    worker_env = {e["name"] for e in values["workers"]["celery"].get("env", []) + values["workers"].get("env", [])}
    assert not worker_env & kept_away
    assert not (_secret_env_names(values) | set(_env_names(values))) & kept_away
    # and the components compose gives the Fernet key get it here too
    for component in ("scheduler", "triggerer", "dagProcessor", "apiServer"):
        assert "AIRFLOW__CORE__FERNET_KEY" in {e["name"] for e in values[component]["env"]}, component


def test_no_log_server_on_workers_or_triggerer_as_in_compose() -> None:
    values, services = _values(), _compose()["services"]
    assert "--skip-serve-logs" in services["airflow-worker"]["command"]
    assert "--skip-serve-logs" in services["airflow-triggerer"]["command"]
    assert "--skip-serve-logs" in values["workers"]["celery"]["args"][-1]
    assert "--skip-serve-logs" in values["triggerer"]["args"][-1]
    assert values["logs"]["persistence"]["enabled"]  # so the API server reads the logs from the shared volume


def test_the_image_and_its_folders_are_the_dockerfile_s() -> None:
    values, dockerfile = _values(), (ROOT / "Dockerfile").read_text()
    image = values["images"]["airflow"]
    assert f"{image['repository']}:{image['tag']}" == _compose()["x-airflow-common"]["image"]
    base = re.search(r"^FROM apache/airflow:([0-9.]+)-", dockerfile, re.M)
    assert base and values["airflowVersion"] == base.group(1)
    for variable in ("AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__PLUGINS_FOLDER"):
        found = re.search(rf"{variable}=(\S+)", dockerfile)
        assert found and _config(values, variable) == found.group(1), variable


def test_the_reports_directory_is_on_the_shared_volume() -> None:
    values = _values()
    mounts = {m["mountPath"] for m in values["volumeMounts"]}
    assert _env_names(values)["MESHWAVE_REPORT_DIR"] in mounts
