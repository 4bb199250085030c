"""Issue 15: how many task processes at once the embedded SQLite stack (`airflow standalone`, LocalExecutor) holds
before its database locks, which bounds how wide a batch it can run at once.

    .venv/bin/python -m bench.sqlite_width [--parallelism 8,16,32,64] [--services 40] [--timeout 600]

A batch of N services is N map indexes of the service group; how many of their tasks run at once is Airflow's
[core] parallelism (the soak benchmark's 200-service batch runs at 8). So the width that matters is parallelism:
for each value, a new `airflow standalone` (a new SQLite database) runs the no-op DAG of --services map indexes x
5 tasks with that parallelism (and no per-DAG cap), and the figure says whether the run succeeded, its seconds per
task run, how often "database is locked" appears in Airflow's log, and whether the scheduler was still running at
the end. A run that does not end in --timeout seconds is reported as such.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.airflow_stack import (
    NOOP_DAG_ID,
    NOOP_STEPS,
    airflow_alone,
    retried,
    run_info,
    stamp,
    wait_loaded,
    write_noop_dag,
)
from bench.common import PY, Figure, emit, load_average, log
from meshstack.process import AirflowProcess

LOCKED = "database is locked"


def scheduler_running(airflow: AirflowProcess) -> bool:
    """Whether `airflow standalone` still has its scheduler process."""
    for child in psutil.Process(airflow.proc.pid).children(recursive=True):
        try:  # a scheduler that died is a zombie until standalone reaps it
            if child.status() != psutil.STATUS_ZOMBIE and "scheduler" in " ".join(child.cmdline()):
                return True
        except psutil.Error:  # gone meanwhile, or a zombie
            continue
    return False


def one_width(work: Path, parallelism: int, services: int, timeout: float) -> dict[str, Any]:
    env = {"AIRFLOW__CORE__PARALLELISM": str(parallelism), "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "1000",
           "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300"}
    with airflow_alone(work, env) as airflow:
        write_noop_dag(work / "dags", services)
        wait_loaded(airflow, NOOP_DAG_ID)
        run_id = retried(lambda: airflow.trigger(NOOP_DAG_ID), tries=1)
        state, api_errors = follow(airflow, run_id, timeout, lambda: scheduler_running(airflow))
        result: dict[str, Any] = {"state": state, "api_errors": api_errors, "task_instances": services * NOOP_STEPS}
        if state in ("success", "failed"):
            run = run_info(airflow, NOOP_DAG_ID, run_id)
            wall = stamp(run["end_date"]) - stamp(run["start_date"])
            result.update(wall_seconds=round(wall, 1), seconds_per_task_run=round(wall / (services * NOOP_STEPS), 3))
        result["scheduler_running_at_end"] = scheduler_running(airflow)
        result["database_locked_lines"] = airflow.log_path.read_text(errors="replace").count(LOCKED)
    return {"parallelism": parallelism, **result}


def follow(airflow: AirflowProcess, run_id: str, timeout: float,
           scheduling: Callable[[], bool]) -> tuple[str, list[str]]:
    """The run's final state, or the last one seen at the timeout or once the scheduler is gone (nothing moves the
    run on then); and every error the REST API answered meanwhile (a locked database is a 500, which says nothing
    of whether the run goes on: it is polled again)."""
    deadline, state, errors = time.monotonic() + timeout, "unknown", []
    while time.monotonic() < deadline:
        if not scheduling():
            return f"{state}, its scheduler gone", errors
        try:
            state = airflow.api("GET", f"/dags/{NOOP_DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}")["state"]
        except OSError as exc:  # urllib's HTTPError and URLError, a timeout
            errors.append(str(exc))
        if state in ("success", "failed"):
            return state, errors
        time.sleep(2)
    return f"{state} after {timeout:.0f} s", errors


def figures(rows: list[dict[str, Any]], services: int, command: str, load: list[float]) -> list[Figure]:
    figs = []
    for r in rows:
        ok = r["state"] == "success" and r["scheduler_running_at_end"]
        figs.append(Figure(
            "7 width", f"SQLite standalone at parallelism {r['parallelism']}: {services} x {NOOP_STEPS} no-op tasks",
            r.get("seconds_per_task_run"), "s/task run", "run succeeds, scheduler alive", ok, command, load,
            f"run {r['state']}; '{LOCKED}' {r['database_locked_lines']} times in Airflow's log; "
            f"{len(r['api_errors'])} REST API errors while polling ({'; '.join(sorted(set(r['api_errors'])))[:200]}); "
            f"scheduler {'running' if r['scheduler_running_at_end'] else 'GONE'} at the end"))
    return figs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallelism", default="8,16,32,64")
    parser.add_argument("--services", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    command = f"{PY} -m bench.sqlite_width --parallelism {args.parallelism} --services {args.services}"
    load, rows = load_average(), []
    for width in map(int, args.parallelism.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"bench-width-{width}-") as tmp:
            rows.append(one_width(Path(tmp), width, args.services, args.timeout))
            log(f"parallelism {width}: {rows[-1]}")
    emit(figures(rows, args.services, command, load), rows=rows)


if __name__ == "__main__":
    main()
