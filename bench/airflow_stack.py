"""The lab, a real Prometheus (with its query log) and `airflow standalone` for one plan, for the benchmarks; or
`airflow standalone` alone, and a DAG of no-op tasks that measures Airflow's own cost per task run."""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bench.common import log
from bench.fleetgen import write
from meshstack.process import AirflowProcess, LabProcess, PrometheusProcess

DAG_FILE = ('"""airflow dag: the waves of {plan}"""\nfrom meshwave.wave import wave_dags\n\n'
            'globals().update(wave_dags("{plan}"))\n')

# On a shared 2-core machine the api-server may take more than the task runner's default 5 s to answer: a task
# would fail on its own heartbeat, then wait the default 300 s to retry. Neither is what is being measured.
LOADED_MACHINE = {"AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30", "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "10"}

# Airflow's own cost per task run: a mapped task group of {n} map indexes, NOOP_STEPS no-op tasks each, in a chain.
NOOP_DAG_ID, NOOP_STEPS = "airflow_floor", 5
NOOP_DAG = f'''"""airflow dag: {NOOP_DAG_ID}, Airflow's own cost per task run (bench.soak, bench.floor)"""
import pendulum
from airflow.sdk import dag, task, task_group


@task
def step(key: str) -> str:
    return key


@dag(dag_id="{NOOP_DAG_ID}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False)
def floor():
    @task_group
    def service(key: str):
        out = key
        for i in range({NOOP_STEPS}):
            out = step.override(task_id=f"step_{{i}}")(out)
        return out

    service.expand(key=[f"s{{i}}" for i in range({{n}})])


floor()
'''


@dataclass
class Stack:
    lab: LabProcess
    prometheus: PrometheusProcess
    airflow: AirflowProcess

    def run_info(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return run_info(self.airflow, dag_id, run_id)

    def tis(self, dag_id: str, run_id: str, state: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Task instances of a run (one page of 100 when filtered by state) and the total count."""
        query = f"?limit=100{f'&state={state}' if state else ''}"
        page = self.airflow.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                                       f"/taskInstances{query}")
        return page["task_instances"], page["total_entries"]


def run_info(airflow: AirflowProcess, dag_id: str, run_id: str) -> dict[str, Any]:
    return retried(lambda: airflow.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"))


def retried(call: Any, tries: int = 5) -> Any:
    """The api-server of a loaded 2-core machine may not answer within the client's 30 s: try again."""
    for attempt in range(tries):
        try:
            return call()
        except (TimeoutError, OSError) as exc:
            if attempt == tries - 1:
                raise
            log(f"api-server: {exc}; trying again")
            time.sleep(5)
    return None


def stamp(text: str | None) -> float | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None


# Starts an Airflow (home, connections, environment) and stops it on exit: `airflow standalone` by default.
StartAirflow = Callable[[Path, dict[str, Any], dict[str, str]], contextlib.AbstractContextManager[AirflowProcess]]


@contextlib.contextmanager
def stack(work: Path, topology: Path | dict[str, Any], plan: dict[str, Any], cluster: str,
          airflow_env: dict[str, str] | None = None, start_airflow: StartAirflow = AirflowProcess) -> Iterator[Stack]:
    """Start the three for one plan (one DAG file in a temp dags folder); stop them whatever happens."""
    if isinstance(topology, dict):
        topology = write(topology, work / "topology.yaml")
    plans, dags = work / "plans", work / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    name = plan["migration"]
    write(plan, plans / f"{name}.yaml")
    (dags / f"{name.replace('-', '_')}.py").write_text(DAG_FILE.format(plan=f"{name}.yaml"))
    kube_conns = {c["kubernetes_conn_id"] for c in plan["clusters"].values()}
    prom_conns = {c["prometheus_conn_id"] for c in plan["clusters"].values()}
    log(f"starting the lab ({topology.name}) and Prometheus")
    with LabProcess(topology, work / "lab") as lab, \
            PrometheusProcess([lab.metrics_target], work / "prometheus", query_log=True) as prom:
        connections = {
            **{k: {"conn_type": "kubernetes", "extra": {"kube_config_path": lab.kubeconfig(cluster)}}
               for k in kube_conns},
            **{p: {"conn_type": "http", "host": prom.url, "extra": {"cluster": cluster}} for p in prom_conns},
        }
        env = {"MESHWAVE_PLANS_DIR": str(plans), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
               "MESHWAVE_REPORT_DIR": str(work / "reports"), **LOADED_MACHINE, **(airflow_env or {})}
        log("starting airflow")
        with start_airflow(work / "airflow", connections, env) as airflow:
            yield Stack(lab, prom, airflow)


@contextlib.contextmanager
def airflow_alone(work: Path, airflow_env: dict[str, str] | None = None) -> Iterator[AirflowProcess]:
    """`airflow standalone` without the lab or Prometheus: its home `work`/airflow, its dags folder `work`/dags (a
    DAG file written there before it starts is parsed as it starts); stop it whatever happens."""
    dags = work / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    env = {"AIRFLOW__CORE__DAGS_FOLDER": str(dags), **LOADED_MACHINE, **(airflow_env or {})}
    log("starting airflow standalone")
    with AirflowProcess(work / "airflow", {}, env) as airflow:
        yield airflow


def dag_ids(plan: dict[str, Any]) -> list[str]:
    return [f"meshwave_{plan['migration']}_{w['name']}".replace("-", "_") for w in plan["waves"]]


def wait_loaded(s: Stack | AirflowProcess, dag_id: str, timeout: float = 300) -> None:
    airflow = s.airflow if isinstance(s, Stack) else s
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            airflow.wait_for_dag(dag_id, timeout=5)
            return
        time.sleep(2)
    raise RuntimeError(f"{dag_id} not loaded in {timeout}s")


def write_noop_dag(dags: Path, n: int) -> None:
    """The no-op DAG with `n` map indexes (n x NOOP_STEPS task instances) in a dags folder (left alone if it is
    there already: a new mtime would have the dag processor parse it again)."""
    path, text = dags / f"{NOOP_DAG_ID}.py", NOOP_DAG.replace("{n}", str(n))
    dags.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def run_noop(airflow: AirflowProcess, dags: Path, n: int, timeout: float = 1800) -> dict[str, Any]:
    """Airflow's own seconds per task run: one run of n x NOOP_STEPS no-op task instances, from the run's start to
    its end (scheduling, a task process that parses its DAG file, the Execution API calls)."""
    write_noop_dag(dags, n)
    wait_loaded(airflow, NOOP_DAG_ID)
    log(f"triggering {NOOP_DAG_ID}: {n} x {NOOP_STEPS} no-op tasks")
    run_id = retried(lambda: airflow.trigger(NOOP_DAG_ID), tries=1)
    state = airflow.wait_for_run(NOOP_DAG_ID, run_id, timeout=timeout)
    run = run_info(airflow, NOOP_DAG_ID, run_id)
    wall = stamp(run["end_date"]) - stamp(run["start_date"])
    return {"state": state, "task_instances": n * NOOP_STEPS, "wall_seconds": round(wall, 1),
            "seconds_per_task_run": round(wall / (n * NOOP_STEPS), 3)}


def plan_yaml(plan: dict[str, Any]) -> str:
    return yaml.safe_dump(plan, sort_keys=False)
