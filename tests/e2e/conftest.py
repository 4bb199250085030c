"""The end-to-end stack: the lab, a real Prometheus and `airflow standalone`, started once per session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client, config

from meshlab.process import AirflowProcess, LabProcess, PrometheusProcess

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
# Scenarios that spend minutes waiting (soaks, outages) and touch only their own namespaces: triggered as soon as the
# stack is up, so they run beside the other modules' runs; their test waits for the run (`Stack.early_run`).
# DAG id -> conf.
EARLY: dict[str, dict] = {}


def dags_folder(work: Path) -> Path:
    """The e2e wave DAGs (tests/e2e/dags) beside the project's own operator DAGs (dags/mesh_*.py)."""
    folder = work / "dags"
    folder.mkdir()
    for path in [*sorted((HERE / "dags").glob("*.py")), *sorted((ROOT / "dags").glob("mesh_*.py"))]:
        (folder / path.name).symlink_to(path)
    return folder


@dataclass
class Stack:
    lab: LabProcess
    prometheus: PrometheusProcess
    airflow: AirflowProcess
    plans: Path  # a writable copy of tests/e2e/plans (MESHWAVE_PLANS_DIR)
    dags: Path  # the DAG folder: tests may add a plan and its thin DAG file at run time
    early: dict[str, str] = field(default_factory=dict)  # DAG id -> the run triggered at start (EARLY)

    def start_early(self) -> None:
        for dag_id, conf in EARLY.items():
            self.airflow.wait_for_dag(dag_id)
            self.early[dag_id] = self.airflow.trigger(dag_id, conf)

    def early_run(self, dag_id: str, timeout: float = 900) -> tuple[str, str]:
        """The run of an EARLY DAG triggered at start, once it has ended: (run id, state)."""
        run_id = self.early[dag_id]
        return run_id, self.airflow.wait_for_run(dag_id, run_id, timeout)

    def add_wave_dags(self, name: str, plan_yaml: str) -> None:
        """A new plan and its DAG file; the dag-processor picks them up within its refresh interval."""
        (self.plans / f"{name}.yaml").write_text(plan_yaml)
        (self.dags / f"e2e_{name.replace('-', '_')}.py").write_text(
            f'"""airflow dag: waves of {name}.yaml"""\nfrom meshwave.wave import wave_dags\n\n'
            f'globals().update(wave_dags("{name}.yaml"))\n')

    def k8s(self, cluster: str = "lab") -> tuple[client.CoreV1Api, client.AppsV1Api, client.CustomObjectsApi]:
        api = config.new_client_from_config(config_file=self.lab.kubeconfig(cluster))
        return client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)

    def run(self, dag_id: str, conf: dict | None = None, timeout: float = 900) -> tuple[str, str]:
        self.airflow.wait_for_dag(dag_id)
        run_id = self.airflow.trigger(dag_id, conf)
        return run_id, self.airflow.wait_for_run(dag_id, run_id, timeout)

    def records(self, dag_id: str, run_id: str) -> dict[str, dict]:
        """The outcome record of every service, by workload."""
        found = {}
        for ti in self.airflow.task_instances(dag_id, run_id).values():
            if ti["task_id"].endswith(".outcome"):
                record = self.airflow.ti_xcom(ti, key="record")
                found[record["workload"]] = record
        return found


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("e2e")
    with LabProcess(HERE / "topology.yaml", work / "lab") as lab, \
            PrometheusProcess([lab.metrics_target], work / "prometheus") as prom:
        connections = {
            "meshlab_lab": {"conn_type": "kubernetes", "extra": {"kube_config_path": lab.kubeconfig("lab")}},
            "meshlab_prometheus": {"conn_type": "http", "host": prom.url, "extra": {"cluster": "lab"}},
        }
        for cluster in ("rev", "beta"):  # tests/e2e/plans/clusters.yaml
            connections[f"meshlab_{cluster}"] = {"conn_type": "kubernetes",
                                                 "extra": {"kube_config_path": lab.kubeconfig(cluster)}}
            connections[f"meshlab_prometheus_{cluster}"] = {"conn_type": "http", "host": prom.url,
                                                            "extra": {"cluster": cluster}}
        plans, dags = work / "plans", dags_folder(work)
        shutil.copytree(HERE / "plans", plans)
        env = {"MESHWAVE_PLANS_DIR": str(plans), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
               "MESHWAVE_REPORT_DIR": str(work / "reports")}
        airflow = AirflowProcess(work / "airflow", connections, env)
        try:
            airflow.start(timeout=360)  # a busy 2-core machine can take minutes to start all components
            stack = Stack(lab, prom, airflow, plans, dags)
            stack.start_early()
            yield stack
        finally:
            airflow.stop()
