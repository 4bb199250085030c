"""`make demo` and `make stop`: the rehearsal stack on this machine, and wave 1 of the seed-fleet plan.

    .venv/bin/python include/demo/demo.py start   # lab (seed fleet) + Prometheus + airflow standalone, run wave 1
    .venv/bin/python include/demo/demo.py stop    # stop all of it

Everything listens on 127.0.0.1 only. The processes keep running after `start` so the Airflow UI can be
explored; their process groups are recorded in .demo/stack.json for `stop`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.parse

from meshstack.process import ROOT, AirflowProcess, LabProcess, PrometheusProcess, free_port
from meshwave import report
from meshwave.plan import load_plan
from meshwave.record import ServiceRecord

WORK = ROOT / ".demo"
STATE = WORK / "stack.json"
PLAN, WAVE_DAG, NEXT_DAG = "seed-fleet.yaml", "meshwave_seed_fleet_wave_1", "meshwave_seed_fleet_wave_2"
RECONCILE_DAG = "mesh_reconcile"
CLUSTERS = ("prod-eu-1", "prod-us-1", "prod-ap-1")


def connections(lab: LabProcess, prom: PrometheusProcess) -> dict[str, dict]:
    found = {}
    for cluster in CLUSTERS:
        suffix = cluster.replace("prod-", "").replace("-", "_")
        found[f"meshlab_prod_{suffix}"] = {"conn_type": "kubernetes",
                                           "extra": {"kube_config_path": lab.kubeconfig(cluster)}}
        found[f"meshlab_prometheus_{suffix}"] = {"conn_type": "meshwave_prometheus", "host": prom.url,
                                                 "extra": {"cluster": cluster}}
    return found


def start() -> int:
    if STATE.exists():
        print(f"a demo stack is already recorded in {STATE}: run `make stop` first", file=sys.stderr)
        return 1
    _fresh()
    print("starting meshlab with the seed fleet (3 clusters, 190 deployments, 800 pods)...", flush=True)
    lab = LabProcess(ROOT / "include" / "lab" / "seed.yaml", WORK / "lab").start()
    prom = PrometheusProcess([lab.metrics_target], WORK / "prometheus").start()
    port = 8080 if _free(8080) else free_port()
    airflow = AirflowProcess(WORK / "airflow", connections(lab, prom), port=port,
                             env={"MESHWAVE_REPORT_DIR": str(WORK / "reports")})
    _record({"lab": lab.proc.pid, "prometheus": prom.proc.pid})
    print(f"Prometheus {prom.url}; starting airflow standalone on {airflow.url} (about 30 s)...", flush=True)
    airflow.start(timeout=300)
    _record({"lab": lab.proc.pid, "prometheus": prom.proc.pid, "airflow": airflow.proc.pid})
    airflow.wait_for_dag(WAVE_DAG, timeout=180)
    # The demo runs now: were wave 1 given a maintenance window, the override param is what an operator would use.
    conf = {"outside_window": True} if load_plan(ROOT / "include" / "plans" / PLAN).waves[0].window else {}
    run_id = airflow.trigger(WAVE_DAG, conf)
    print(f"triggered {WAVE_DAG} ({run_id}){' with outside_window=true' if conf else ''}; following it "
          "(2 to 3 minutes)...", flush=True)
    state = _follow(airflow, run_id)
    records = [ServiceRecord.model_validate(airflow.ti_xcom(ti, key="record"))
               for ti in airflow.task_instances(WAVE_DAG, run_id).values() if ti["task_id"].endswith(".outcome")]
    records.sort(key=lambda r: (r.batch or 0, r.service))
    print(f"\n{WAVE_DAG}: run {state}\n")
    print(report.render(report.report_frame(records)))
    _chained(airflow, state)
    _reconcile(airflow)
    print(f"\nAirflow UI: {airflow.url}  (login: admin / {airflow.password})")
    print(f"Prometheus: {prom.url}   lab kubeconfigs: {WORK / 'lab' / 'kube'}")
    print("Everything keeps running until `make stop`.")
    return 0


def _fresh() -> None:
    """Every demo starts from nothing but the reports: a previous demo's Airflow database would resume its unfinished
    runs against this new lab (a wave-2 run that `make stop` left running holds max_active_runs, so this demo's
    wave 2 would wait behind it), and its Prometheus would hold a lab that no longer runs."""
    WORK.mkdir(exist_ok=True)
    for name in ("lab", "prometheus", "airflow"):
        shutil.rmtree(WORK / name, ignore_errors=True)


def _chained(airflow: AirflowProcess, state: str) -> None:
    """The next wave's run, which wave 1's Asset starts only when wave 1 ended within its failure budget (its run
    succeeded); the scheduler creates it a few seconds after the event."""
    deadline = time.monotonic() + (60 if state == "success" else 0)
    while True:
        runs = airflow.api("GET", f"/dags/{NEXT_DAG}/dagRuns?limit=5")["dag_runs"]
        if runs:
            print(f"\n{NEXT_DAG} was started by wave-1's Asset ({runs[0]['run_type']}); follow it in the UI.")
            return
        if time.monotonic() > deadline:
            why = "no run a minute after wave-1's Asset (the scheduler's log says why)" if state == "success" else \
                "wave-1 did not end within its failure budget"
            print(f"\n{NEXT_DAG} did not start: {why}.")
            return
        time.sleep(2)


def _reconcile(airflow: AirflowProcess) -> None:
    """mesh_reconcile runs every 10 minutes; once now, to show what a wave left pending (normally nothing)."""
    run_id = airflow.trigger(RECONCILE_DAG)
    state = airflow.wait_for_run(RECONCILE_DAG, run_id, timeout=600)
    due = airflow.xcom(RECONCILE_DAG, run_id, "find_due") or []
    print(f"\n{RECONCILE_DAG}: run {state}: {len(due)} pending undo(s) past their deadline"
          + (f" ({', '.join(due)})" if due else "") + "; it runs every 10 minutes.")


def _follow(airflow: AirflowProcess, run_id: str) -> str:
    seen: set[str] = set()
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        tis = airflow.task_instances(WAVE_DAG, run_id)
        for key, ti in sorted(tis.items()):
            if ti["task_id"].endswith(".outcome") and ti.get("state") in ("success", "failed") and key not in seen:
                seen.add(key)
                record = airflow.ti_xcom(ti, key="record")
                print(f"  {record['service']}: {record['outcome']}: {record['reason'][:140]}", flush=True)
        state = airflow.api("GET", f"/dags/{WAVE_DAG}/dagRuns/{_quote(run_id)}")["state"]
        if state in ("success", "failed"):
            return state
        time.sleep(5)
    return "still running"


def _quote(run_id: str) -> str:
    return urllib.parse.quote(run_id, safe="")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _record(pids: dict[str, int]) -> None:
    STATE.write_text(json.dumps(pids))


def stop() -> int:
    if not STATE.exists():
        print("no demo stack recorded")
        return 0
    for name, pid in json.loads(STATE.read_text()).items():
        try:
            os.killpg(pid, signal.SIGTERM)
            print(f"stopped {name}")
        except ProcessLookupError:
            print(f"{name} was not running")
    time.sleep(3)
    for pid in json.loads(STATE.read_text()).values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    STATE.unlink()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop"])
    return start() if parser.parse_args().command == "start" else stop()


if __name__ == "__main__":
    sys.exit(main())
