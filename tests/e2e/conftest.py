"""The end-to-end stack: the lab, a real Prometheus and `airflow standalone`, started once per session."""

from __future__ import annotations

import shutil
import time
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from meshstack.process import AirflowProcess, LabProcess, PostgresProcess, PrometheusProcess, wave_dag_file
from tests.notify_sink import NotifySink

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
# Scenarios that spend minutes waiting (soaks, outages) and touch only their own namespaces: triggered as soon as the
# stack is up, so they run beside the other modules' runs; their test waits for the run (`Stack.early_run`).
# Name -> conf (the name is the DAG id), or -> Early (a DAG that several runs share, a fault started first).
EARLY: dict[str, dict | Early] = {
    "meshwave_e2e_gates_gates": {},  # test_gates.py: a 100 s soak and a 60 s STRICT gate
}


@dataclass(frozen=True)
class Early:
    """An early run of `dag_id` with `conf`; `before(stack)`, when given, runs just before the trigger."""

    dag_id: str
    conf: dict[str, Any]
    before: Callable[[Stack], object] | None = None
    # Triggered after every other entry: a DAG's runs queue in trigger order (mesh_service runs one at a time), so
    # an entry that can wait must not delay one racing a timed fault (test_undo's outage).
    last: bool = False
    # What a person does while the run goes on (test_wave_approval's approver): `during(stack, run_id)` in a thread
    # of its own, from the trigger on; its result (or its error) is `Stack.during[name]`.
    during: Callable[[Stack, str], object] | None = None


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
    # what the plans' `notify` targets were sent (the distributed stack runs none: an empty, unstarted sink)
    notified: NotifySink = field(default_factory=NotifySink)
    early: dict[str, tuple[str, str]] = field(default_factory=dict)  # EARLY name -> (DAG id, run id)
    during: dict[str, Future] = field(default_factory=dict)  # EARLY name -> what its `during` did
    threads: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="during"))

    def start_early(self) -> None:
        entries = {name: entry if isinstance(entry, Early) else Early(name, entry) for name, entry in EARLY.items()}
        for name, early in sorted(entries.items(), key=lambda item: item[1].last):  # stable: else in EARLY's order
            self.airflow.wait_for_dag(early.dag_id)
            if early.before is not None:
                early.before(self)
            self.early[name] = (early.dag_id, self.airflow.trigger(early.dag_id, early.conf))
            if early.during is not None:
                self.during[name] = self.threads.submit(early.during, self, self.early[name][1])

    def settle_early(self, timeout: float = 900) -> None:
        """Wait for every EARLY run to end. A test about to set the freeze (a real emergency rollback, or the
        Variable itself) calls this first: the freeze is global by design, and a wave still running beside it would
        end `frozen` where its own test expects STRICT (seen: the canary wave, frozen by test_clusters' rollback)."""
        deadline = time.monotonic() + timeout
        for dag_id, run_id in self.early.values():
            self.airflow.wait_for_run(dag_id, run_id, timeout=max(1.0, deadline - time.monotonic()))

    def wait_for_details(self, dag_id: str, timeout: float = 120) -> None:
        """A DAG file just written: its DAG is listed before its serialized form is stored, and a trigger in between
        fails with a 500; the details endpoint answers only once that form is there."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.airflow.api("GET", f"/dags/{dag_id}/details")
                return
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def early_run(self, name: str, timeout: float = 900) -> tuple[str, str]:
        """The EARLY run triggered at start, once it has ended: (run id, state)."""
        dag_id, run_id = self.early[name]
        return run_id, self.airflow.wait_for_run(dag_id, run_id, timeout)

    def add_wave_dags(self, name: str, plan_yaml: str) -> None:
        """A new plan and its DAG file; the dag-processor picks them up within its refresh interval."""
        (self.plans / f"{name}.yaml").write_text(plan_yaml)
        (self.dags / f"e2e_{name.replace('-', '_')}.py").write_text(wave_dag_file(f"{name}.yaml",
                                                                                  f"waves of {name}.yaml"))

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
            PrometheusProcess([lab.metrics_target], work / "prometheus") as prom, NotifySink() as sink, \
            PostgresProcess() as postgres:
        connections = {
            # plans/breaker.yaml notifies both: the SMTP server and the chat webhook this session runs on loopback
            **sink.connections("e2e_smtp", "e2e_chat"),
            "meshlab_lab": {"conn_type": "kubernetes", "extra": {"kube_config_path": lab.kubeconfig("lab")}},
            "meshlab_prometheus": {"conn_type": "meshwave_prometheus", "host": prom.url, "extra": {"cluster": "lab"}},
        }
        # rev, beta, down: tests/e2e/plans/clusters.yaml; red, gk: tests/e2e/test_red_button.py. Their Prometheus
        # connections keep the `http` type that connections made before meshwave_prometheus existed have.
        for cluster in ("rev", "beta", "down", "red", "gk"):
            connections[f"meshlab_{cluster}"] = {"conn_type": "kubernetes",
                                                 "extra": {"kube_config_path": lab.kubeconfig(cluster)}}
            connections[f"meshlab_prometheus_{cluster}"] = {"conn_type": "http", "host": prom.url,
                                                            "extra": {"cluster": cluster}}
        plans, dags = work / "plans", dags_folder(work)
        shutil.copytree(HERE / "plans", plans)
        env = {"MESHWAVE_PLANS_DIR": str(plans), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
               "MESHWAVE_REPORT_DIR": str(work / "reports"),
               "MESHWAVE_RECONCILE_SCHEDULE": "none"}  # tests trigger mesh_reconcile when they need it
        # On Postgres, as in production: the stack starts a dozen runs at once, and on SQLite its scheduler once died
        # on "database is locked" as they started.
        airflow = AirflowProcess(work / "airflow", connections, env, database=postgres.url)
        stack = None
        try:
            airflow.start(timeout=360)  # a busy 2-core machine can take minutes to start all components
            stack = Stack(lab, prom, airflow, plans, dags, sink)
            stack.start_early()
            yield stack
        finally:
            if stack is not None:
                stack.threads.shutdown(wait=False, cancel_futures=True)
            airflow.stop()
