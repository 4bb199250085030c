"""The distributed stack: Postgres, Redis, the lab, a real Prometheus, and Airflow's components as separate
processes (CeleryExecutor, two workers), started once for the module that asks for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshstack.process import LabProcess, PostgresProcess, PrometheusProcess
from tests.distributed.processes import CeleryAirflow, RedisProcess
from tests.e2e.conftest import Stack

HERE = Path(__file__).parent
TOPOLOGY = HERE.parent / "e2e" / "topology.yaml"


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("distributed")
    with PostgresProcess() as postgres, RedisProcess() as redis, \
            LabProcess(TOPOLOGY, work / "lab") as lab, PrometheusProcess([lab.metrics_target], work / "prom") as prom:
        connections = {
            "meshlab_lab": {"conn_type": "kubernetes", "extra": {"kube_config_path": lab.kubeconfig("lab")}},
            "meshlab_prometheus": {"conn_type": "meshwave_prometheus", "host": prom.url, "extra": {"cluster": "lab"}},
        }
        env = {"MESHWAVE_PLANS_DIR": str(HERE / "plans"), "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "dags"),
               "MESHWAVE_REPORT_DIR": str(work / "reports")}
        with CeleryAirflow(work / "airflow", connections, postgres.url, redis.url, env) as airflow:
            yield Stack(lab, prom, airflow, plans=HERE / "plans", dags=HERE / "dags")
