"""docker-compose.yaml and the Dockerfile, checked as far as possible without a Docker engine: the file parses,
it has the official compose file's services, pinned images, and the settings the native distributed test runs
with (tests/distributed/processes.py); the lab options it uses work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshstack.process import ROOT, free_port
from tests.conftest import eventually
from tests.distributed.processes import SHARED_SETTINGS, TEST_ONLY_SETTINGS

COMPOSE = ROOT / "docker-compose.yaml"
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-init")
# name:MAJOR.MINOR.PATCH[-variant]; PostgreSQL's own versions are MAJOR.MINOR (16.4). Never latest or 7.2.
PINNED = re.compile(r"^(postgres:\d+\.\d+|[\w./-]+:v?\d+\.\d+\.\d+)(-[a-z0-9.]+)?$")
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
# The compose shape runs FAB's auth manager (DAG-level access control); the native test the SimpleAuthManager
# (FAB is not in .venv: `make setup` does not install it).
AUTH_SETTINGS = ("AIRFLOW__CORE__AUTH_MANAGER", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS")
SECRET = {
    "AIRFLOW__API_AUTH__JWT_SECRET": "${AIRFLOW_JWT_SECRET:?",
    "AIRFLOW__CORE__FERNET_KEY": "${AIRFLOW_FERNET_KEY:?",
    "AIRFLOW__API__SECRET_KEY": "${AIRFLOW_API_SECRET_KEY:?",
    "AIRFLOW_ADMIN_PASSWORD": "${AIRFLOW_ADMIN_PASSWORD:?",
}
# Who needs which secret in Airflow 3.3 (docs/operations.md, "Configuration: who may press which button"): the
# api-server signs and checks
# every JWT, serves decrypted connections and signs UI sessions; the scheduler's executor signs task tokens; the
# DAG processor and the triggerer decrypt (their Execution API is in-process); the workers run DAG code: none.
NEEDS = {
    "airflow-apiserver": {"AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY"},
    "airflow-scheduler": {"AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY"},
    "airflow-dag-processor": {"AIRFLOW__CORE__FERNET_KEY"},
    "airflow-triggerer": {"AIRFLOW__CORE__FERNET_KEY"},
    "airflow-worker": set(),
    "airflow-init": {"AIRFLOW__CORE__FERNET_KEY", "AIRFLOW_ADMIN_PASSWORD"},
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(compose: dict[str, Any], service: str) -> dict[str, str]:
    return {k: str(v) for k, v in compose["services"][service].get("environment", {}).items()}


def test_the_services_of_the_official_shape_plus_prometheus_and_the_lab(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "redis", *AIRFLOW_SERVICES, "meshlab", "prometheus"}
    for name in AIRFLOW_SERVICES:
        service = compose["services"][name]
        assert service["image"] == compose["x-airflow-common"]["image"], name
        assert name == "airflow-init" or "healthcheck" in service, name
    assert compose["services"]["airflow-worker"]["command"].startswith("celery worker")
    assert compose["services"]["airflow-worker"]["deploy"]["replicas"] == 2, "two workers, as the native test"
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-worker"):
        assert compose["services"][name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert "airflow db migrate" in "\n".join(compose["services"]["airflow-init"]["command"])


def test_images_are_pinned_and_the_project_image_is_built_on_airflow_3_3_2(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert PINNED.match(service["image"]), f"{name}: {service['image']} is not pinned to an exact version"
    assert compose["x-airflow-common"]["image"].endswith(":3.3.2")
    assert compose["services"]["meshlab"]["image"] == compose["x-airflow-common"]["image"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM apache/airflow:3\.3\.2-python3\.11$", dockerfile, re.M), "the official image, exact tag"
    assert "-r requirements.txt -r requirements-compose.txt -c /tmp/constraints-compose.txt" in dockerfile, \
        "the project's pins, plus FAB's"
    assert "grep -v '^python-dateutil==' constraints.txt > /tmp/constraints-compose.txt" in dockerfile, \
        "only the pin FAB cannot take gives way"
    compose_pins = [line for line in (ROOT / "requirements-compose.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert compose_pins == ["apache-airflow-providers-fab==3.10.2", "python-dateutil==2.9.0.post0"]
    instructions = "\n".join(line for line in dockerfile.splitlines() if not line.startswith("#"))
    assert not re.search(r"(?i)(fernet|jwt|password|secret|AIRFLOW_CONN_)", instructions), "no secrets in the image"


def test_the_same_settings_as_the_native_distributed_test(compose: dict[str, Any]) -> None:
    env = env_of(compose, "airflow-scheduler")
    for name, value in SHARED_SETTINGS.items():
        if name in AUTH_SETTINGS:
            continue
        assert env.get(name, "").lower() == value.lower(), f"{name}: {env.get(name)!r} != native {value!r}"
    for name in TEST_ONLY_SETTINGS:
        assert int(env[name]) >= int(TEST_ONLY_SETTINGS[name]), f"{name}: production waits at least as long"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == f"db+{env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']}"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:${REDIS_PASSWORD") and "@redis:6379/" in \
        env["AIRFLOW__CELERY__BROKER_URL"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]
    common = {k: v for k, v in env.items() if k not in SECRET}
    for service in AIRFLOW_SERVICES:  # every component, the same settings (secrets: only where needed)
        assert {k: v for k, v in env_of(compose, service).items() if k in common} == common, service


def test_auth_on_secrets_from_the_environment_ports_on_loopback(compose: dict[str, Any]) -> None:
    env = env_of(compose, "airflow-apiserver")
    for name in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", env[name]), f"{name} must come from the environment"
    assert "${AIRFLOW_ADMIN_PASSWORD:?" in env_of(compose, "airflow-init")["AIRFLOW_ADMIN_PASSWORD"]
    assert "${POSTGRES_PASSWORD:?" in env_of(compose, "postgres")["POSTGRES_PASSWORD"]
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    example = (ROOT / ".env.example").read_text()
    for variable in set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text())):
        assert re.search(rf"^{variable}=$", example, re.M), f"{variable} documented, empty, in .env.example"


def test_connections_for_every_cluster_of_the_seed_plan(compose: dict[str, Any]) -> None:
    env = env_of(compose, "airflow-worker")
    plan = yaml.safe_load((ROOT / "include" / "plans" / "seed-fleet.yaml").read_text())
    for cluster, ids in plan["clusters"].items():
        kube = json.loads(env[f"AIRFLOW_CONN_{ids['kubernetes_conn_id'].upper()}"])
        assert kube["extra"]["kube_config_path"] == f"/opt/meshlab/kube/{cluster}.kubeconfig"
        prom = json.loads(env[f"AIRFLOW_CONN_{ids['prometheus_conn_id'].upper()}"])
        assert prom["host"] == "http://prometheus:9090" and prom["extra"]["cluster"] == cluster
    lab = " ".join(compose["services"]["meshlab"]["entrypoint"] + compose["services"]["meshlab"]["command"])
    assert lab.startswith("python -m meshlab serve --topology=/opt/meshwave/include/lab/seed.yaml")
    assert all(f"--api-port={cluster}=" in lab for cluster in plan["clusters"])


def test_prometheus_uses_the_projects_config_with_the_labs_service_name(compose: dict[str, Any]) -> None:
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./include/prometheus/prometheus-compose.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    base = yaml.safe_load((ROOT / "include" / "prometheus" / "prometheus.yml").read_text())
    ours = yaml.safe_load((ROOT / "include" / "prometheus" / "prometheus-compose.yml").read_text())
    assert ours["scrape_configs"][0]["static_configs"] == [{"targets": ["meshlab:9464"]}]
    ours["scrape_configs"][0]["static_configs"] = base["scrape_configs"][0]["static_configs"]
    assert ours == base, "nothing but the target differs from include/prometheus/prometheus.yml"


def test_the_labs_container_options_bind_and_advertise(tmp_path: Path) -> None:
    """What the compose file's meshlab service uses: a bind address, an advertised name, fixed API ports."""
    port, metrics = free_port(), free_port()
    cmd = [sys.executable, "-m", "meshlab", "serve", "--topology", str(ROOT / "tests" / "e2e" / "topology.yaml"),
           "--host=127.0.0.1", "--advertise-host=localhost", f"--api-port=lab={port}", f"--metrics-port={metrics}",
           f"--kubeconfig-dir={tmp_path}", f"--state-file={tmp_path / 'state.json'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        eventually(lambda: (tmp_path / "state.json").exists(), timeout=30, what="the lab's state file")
        config = yaml.safe_load((tmp_path / "lab.kubeconfig").read_text())
        assert config["clusters"][0]["cluster"]["server"] == f"http://localhost:{port}"
        assert json.loads((tmp_path / "state.json").read_text())["metrics_port"] == metrics
    finally:
        proc.terminate()
        proc.wait(10)


def test_each_secret_only_in_the_services_that_need_it(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    assert "passwords.json" not in text and "airflow-auth" not in text, "no password file: FAB keeps users"
    for name, service in compose["services"].items():
        env = env_of(compose, name)
        given = {k for k, v in env.items() if k in SECRET or any(v.startswith(ref) for ref in SECRET.values())}
        assert given == NEEDS.get(name, set()), f"{name}: {sorted(given)}"
        for key in given:
            assert env[key].startswith(SECRET[key]), f"{name}: {key} from the environment"
        for mount in service.get("volumes", []):
            assert "auth" not in str(mount), f"{name}: {mount}"
    worker, triggerer = compose["services"]["airflow-worker"], compose["services"]["airflow-triggerer"]
    # a log server would need [api] secret_key (FAB's UI session key): none on the components without it
    assert worker["command"] == "celery worker --skip-serve-logs"
    assert triggerer["command"] == "triggerer --skip-serve-logs"


def test_fab_limits_the_buttons_to_the_operator_role_created_before_the_dags_are_parsed(
        compose: dict[str, Any]) -> None:
    for name in AIRFLOW_SERVICES:
        env = env_of(compose, name)
        assert env["AIRFLOW__CORE__AUTH_MANAGER"] == FAB, name
        assert env["MESHWAVE_OPERATOR_ROLE"] == "${MESHWAVE_OPERATOR_ROLE:-meshwave-operator}", name
        assert env["MESHWAVE_CONNECTION_PREFIXES"] == "${MESHWAVE_CONNECTION_PREFIXES:-meshlab_}", name
        assert not any(k.startswith("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER") for k in env), name
    init = "\n".join(compose["services"]["airflow-init"]["command"])
    migrate = init.index("airflow db migrate")
    role = init.index('airflow roles create "$${MESHWAVE_OPERATOR_ROLE}"')
    admin = init.index("airflow users create --username admin --role Admin")
    assert migrate < role < admin, "the role after FAB's tables exist"
    assert '--password "$${AIRFLOW_ADMIN_PASSWORD}"' in init, "the shell's variable, not compose's interpolation"
    # FAB refuses to sync access_control naming a role that does not exist, and the DAG is broken: the DAG
    # processor starts only once airflow-init created the role
    assert compose["services"]["airflow-dag-processor"]["depends_on"]["airflow-init"]["condition"] == \
        "service_completed_successfully"


def test_the_lab_writes_kubeconfigs_as_the_uid_that_reads_them(compose: dict[str, Any]) -> None:
    """The kubeconfigs are 0600 (tests/lab/test_kubeconfig_mode.py): the lab runs as the Airflow components' uid."""
    assert compose["services"]["meshlab"]["user"] == compose["x-airflow-common"]["user"] == "${AIRFLOW_UID:-50000}:0"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "mkdir -p /opt/meshlab/kube && chown airflow:0 /opt/meshlab/kube" in dockerfile
