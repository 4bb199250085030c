"""Distributed: the same wave DAGs on CeleryExecutor (Postgres, Redis, two workers, every component its own
process) reach the outcomes they reach on `airflow standalone`, even when a worker is killed mid-task."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.conftest import eventually
from tests.distributed.processes import CeleryAirflow
from tests.e2e.conftest import Stack
from tests.e2e.test_wave import pa_mode, proxies

pytestmark = pytest.mark.distributed

DAG_ID = "meshwave_dist_shop_main"
EXPECTED = {"frontend": "strict", "cart": "strict", "payment": "rolled_back", "ledger": "permissive"}
FINAL = ("strict", "permissive", "rolled_back")
# frontend (map index 0) calls cart: killed before its sidecar is in, it reaches it minutes after cart's, and cart's
# STRICT gate must still tell its late plaintext from a caller outside the mesh (it waits for its batch-mates).
KILLED = (0, ("batch_1.admit", "batch_1.inject"))


def running_on_a_worker(airflow: CeleryAirflow, run_id: str) -> tuple[tuple[str, int], str, int] | None:
    """frontend's task instance (task id, map index) running before its rollout right now, and its worker."""
    index, tasks = KILLED
    for ti in airflow.task_instances(DAG_ID, run_id).values():
        if ti["task_id"] in tasks and ti["map_index"] == index and ti["state"] == "running" and ti.get("pid"):
            worker = airflow.worker_of(ti["pid"])
            if worker:
                return (ti["task_id"], ti["map_index"]), worker, ti["try_number"]
    return None


def kill_a_worker_mid_task(airflow: CeleryAirflow, run_id: str) -> tuple[tuple[str, int], str, int]:
    found: Any = eventually(lambda: running_on_a_worker(airflow, run_id), timeout=240, interval=0.3,
                            what="frontend's task running on a Celery worker before its rollout")
    task_id, worker, try_number = found
    airflow.kill_worker(worker)
    print(f"killed {worker} (SIGKILL, whole process group) while it ran {task_id} try {try_number}")
    return task_id, worker, try_number


def test_a_wave_on_celery_survives_a_killed_worker(celery_stack: Stack) -> None:
    airflow = celery_stack.airflow
    assert isinstance(airflow, CeleryAirflow)
    airflow.wait_for_dag(DAG_ID)
    started = time.monotonic()
    run_id = airflow.trigger(DAG_ID)
    task_id, killed, try_number = kill_a_worker_mid_task(airflow, run_id)
    survivor = next(name for name in airflow.worker_names if name != killed)
    assert airflow.procs[survivor].poll() is None, "the other worker still runs"

    state = airflow.wait_for_run(DAG_ID, run_id, timeout=480)
    assert celery_stack.lab.proc and celery_stack.lab.proc.poll() is None, f"the lab exited: {celery_stack.lab.proc}"
    print(f"wave on CeleryExecutor: {state} in {time.monotonic() - started:.0f}s")
    records = celery_stack.records(DAG_ID, run_id)
    summary = {w: (r["outcome"], r["mtls"], r["reason"]) for w, r in records.items()}
    print(summary)

    # The lost try failed on its missing heartbeat and ran again on the surviving worker.
    retried = next(ti for ti in airflow.task_instances(DAG_ID, run_id).values()
                   if (ti["task_id"], ti["map_index"]) == task_id)
    assert retried["try_number"] > try_number and retried["state"] in ("success", "skipped"), retried

    # The same outcomes as on standalone (tests/e2e/test_wave.py).
    assert {w: r["outcome"] for w, r in records.items()} == EXPECTED, summary
    assert state == "success", "one rollback stays within max_failures 3"
    for workload in ("frontend", "cart"):
        assert pa_mode(celery_stack, "shop", workload) == "STRICT" and all(proxies(celery_stack, "shop", workload))
    assert "OOMKilled" in records["payment"]["reason"]
    assert any("unknown" in c for c in records["ledger"]["plaintext_callers"]), records["ledger"]

    # Nothing half-changed: every service final, with a reason, and the lab agrees with its record.
    for workload, record in records.items():
        assert record["outcome"] in FINAL and record["reason"], record
        sidecars = proxies(celery_stack, "shop", workload)
        assert sidecars == [record["outcome"] != "rolled_back"] * len(sidecars), (workload, sidecars)
        assert (pa_mode(celery_stack, "shop", workload) == "STRICT") == (record["mtls"] == "STRICT"), record


def test_both_workers_took_tasks(celery_stack: Stack) -> None:
    airflow = celery_stack.airflow
    assert isinstance(airflow, CeleryAirflow)
    for name in airflow.worker_names:
        log = airflow.log_of(name).read_text(errors="replace")
        assert re.search(r"Task execute_workload\[[\w-]+\] received", log), f"{name} received no task"
