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

from meshlab.process import ROOT, free_port
from tests.conftest import eventually
from tests.distributed.processes import SHARED_SETTINGS, TEST_ONLY_SETTINGS

COMPOSE = ROOT / "docker-compose.yaml"
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-init")
# name:MAJOR.MINOR.PATCH[-variant]; PostgreSQL's own versions are MAJOR.MINOR (16.4). Never latest or 7.2.
PINNED = re.compile(r"^(postgres:\d+\.\d+|[\w./-]+:v?\d+\.\d+\.\d+)(-[a-z0-9.]+)?$")


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
    assert compose["services"]["airflow-worker"]["command"] == "celery worker"
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
    assert "-r requirements.txt -c constraints.txt" in dockerfile, "the project's pins"
    instructions = "\n".join(line for line in dockerfile.splitlines() if not line.startswith("#"))
    assert not re.search(r"(?i)(fernet|jwt|password|secret|AIRFLOW_CONN_)", instructions), "no secrets in the image"


def test_the_same_settings_as_the_native_distributed_test(compose: dict[str, Any]) -> None:
    env = env_of(compose, "airflow-scheduler")
    for name, value in SHARED_SETTINGS.items():
        assert env.get(name, "").lower() == value.lower(), f"{name}: {env.get(name)!r} != native {value!r}"
    for name in TEST_ONLY_SETTINGS:
        assert int(env[name]) >= int(TEST_ONLY_SETTINGS[name]), f"{name}: production waits at least as long"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == f"db+{env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']}"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:${REDIS_PASSWORD") and "@redis:6379/" in \
        env["AIRFLOW__CELERY__BROKER_URL"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]
    for service in AIRFLOW_SERVICES:  # every component, the same settings (the workers add one of their own)
        assert {k: v for k, v in env_of(compose, service).items() if k in env} == env, service


def test_auth_on_secrets_from_the_environment_ports_on_loopback(compose: dict[str, Any]) -> None:
    env = env_of(compose, "airflow-apiserver")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False", "no open admin"
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
