"""The lab, a real Prometheus (with its query log) and `airflow standalone` for one plan, for the benchmarks."""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bench.common import log
from bench.fleetgen import write
from meshlab.process import AirflowProcess, LabProcess, PrometheusProcess

DAG_FILE = ('"""airflow dag: the waves of {plan}"""\nfrom meshwave.wave import wave_dags\n\n'
            'globals().update(wave_dags("{plan}"))\n')

# On a shared 2-core machine the api-server may take more than the task runner's default 5 s to answer: a task
# would fail on its own heartbeat, then wait the default 300 s to retry. Neither is what is being measured.
LOADED_MACHINE = {"AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30", "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "10"}


@dataclass
class Stack:
    lab: LabProcess
    prometheus: PrometheusProcess
    airflow: AirflowProcess

    def run_info(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return retried(lambda: self.airflow.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"))

    def tis(self, dag_id: str, run_id: str, state: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Task instances of a run (one page of 100 when filtered by state) and the total count."""
        query = f"?limit=100{f'&state={state}' if state else ''}"
        page = self.airflow.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                                       f"/taskInstances{query}")
        return page["task_instances"], page["total_entries"]


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


@contextlib.contextmanager
def stack(work: Path, topology: Path | dict[str, Any], plan: dict[str, Any], cluster: str,
          airflow_env: dict[str, str] | None = None) -> Iterator[Stack]:
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
        log("starting airflow standalone")
        with AirflowProcess(work / "airflow", connections, env) as airflow:
            yield Stack(lab, prom, airflow)


def dag_ids(plan: dict[str, Any]) -> list[str]:
    return [f"meshwave_{plan['migration']}_{w['name']}".replace("-", "_") for w in plan["waves"]]


def wait_loaded(s: Stack, dag_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            s.airflow.wait_for_dag(dag_id, timeout=5)
            return
        time.sleep(2)
    raise RuntimeError(f"{dag_id} not loaded in {timeout}s")


def plan_yaml(plan: dict[str, Any]) -> str:
    return yaml.safe_dump(plan, sort_keys=False)
