"""Item 1: what parsing the wave DAG files costs, by the dag-processor's own figure (`airflow dags report`).

    .venv/bin/python bench/parse_cost.py [--services 2000]

Plans: the committed seed plan (include/plans/seed-fleet.yaml, proposed by `meshwave plan propose`: 184 of the
187 seed services in 11 waves of up to 20, batches of 3), every seed deployment (187 services, waves of 25) and a
generated plan of --services services (waves of 100), each in a temp plans dir
(MESHWAVE_PLANS_DIR) with a one-plan DAG file in a temp dags folder. Each folder is parsed twice, in
subprocesses: `airflow dags report -o json` (DagBag's per-file duration, DAGs, tasks) with
dagbag_import_timeout raised to 600 s so a slow file is measured rather than cut, and a DagBag with
socket connect/create_connection/getaddrinfo patched to record and refuse any network call. A third DagBag
parses the file the way a task runner does before every task start: with Airflow's parsing context naming the
last wave's DAG, which is then the only one the file builds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.airflow_stack import dag_ids
from bench.common import PY, ROOT, Figure, emit, load_average, log
from bench.fleetgen import seed_plan, synthetic_plan, write

DEFAULT_IMPORT_TIMEOUT = 30  # Airflow's core.dagbag_import_timeout
DAG_FILE = ('"""airflow dag: the waves of {plan}"""\nfrom meshwave.wave import wave_dags\n\n'
            'globals().update(wave_dags("{plan}"))\n')

NO_NETWORK = r'''
import json, socket, sys
calls = []
def refuse(name):
    def call(*args, **kwargs):
        calls.append(f"{name}{args[1:] if name == 'connect' else args[:2]}")
        raise OSError(f"network call at parse time: {name}")
    return call
socket.socket.connect = refuse("connect")
socket.socket.connect_ex = refuse("connect_ex")
socket.create_connection = refuse("create_connection")
socket.getaddrinfo = refuse("getaddrinfo")
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"dags": len(bag.dags), "errors": {k: str(v)[:300] for k, v in bag.import_errors.items()},
                  "network_calls": calls}))
'''


TASK_START = r'''
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"dags": sorted(bag.dags), "seconds": sum(s.duration.total_seconds() for s in bag.dagbag_stats)}))
'''


def seconds(text: str) -> float:
    hours, minutes, secs = text.split(":")
    return timedelta(hours=int(hours), minutes=int(minutes), seconds=float(secs)).total_seconds()


def environment(home: Path, plans: Path, dags: Path) -> dict[str, str]:
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags), "MESHWAVE_PLANS_DIR": str(plans),
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "600", "PYTHONWARNINGS": "ignore"}


def airflow(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([str(Path(sys.executable).parent / "airflow"), *args], env=env, capture_output=True,
                            text=True, timeout=900, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def measure(name: str, plan: dict[str, Any] | Path, home: Path, work: Path) -> dict[str, Any]:
    plans, dags = work / name / "plans", work / name / "dags"
    dags.mkdir(parents=True)
    plans.mkdir(parents=True)
    if isinstance(plan, Path):
        shutil.copy(plan, plans / plan.name)
        file = plan.name
    else:
        file = write(plan, plans / f"{name}.yaml").name
    (dags / f"{name.replace('-', '_')}.py").write_text(DAG_FILE.format(plan=file))
    env = environment(home, plans, dags)
    log(f"parse {name}: airflow dags report")
    load = load_average()
    [report] = json.loads(airflow(env, "dags", "report", "-o", "json").strip().splitlines()[-1])
    log(f"parse {name}: no-network DagBag")
    checked = subprocess.run([sys.executable, "-c", NO_NETWORK, str(dags)], env=env, capture_output=True, text=True,
                             timeout=900, cwd=ROOT)
    probe = json.loads(checked.stdout.strip().splitlines()[-1]) if checked.returncode == 0 else {
        "dags": 0, "errors": {"probe": checked.stderr[-500:]}, "network_calls": ["probe failed"]}
    dag_num, task_num = int(report["dag_num"]), int(report["task_num"])
    content = plan if isinstance(plan, dict) else _yaml(plan)
    services = sum(len(w["services"]) for w in content["waves"])
    task_start = parse_for_task(content, dags, env)
    return {"task_start_parse_seconds": round(task_start["seconds"], 2), "task_start_dags": task_start["dags"],
            "plan": name, "services": services, "parse_seconds": round(seconds(report["duration"]), 2),
            "dags": dag_num, "tasks": task_num, "tasks_per_dag": round(task_num / dag_num) if dag_num else 0,
            "network_calls": len(probe["network_calls"]), "network_detail": probe["network_calls"][:5],
            "probe_dags": probe["dags"], "import_errors": probe["errors"], "load": load}


def parse_for_task(plan: dict[str, Any], dags: Path, env: dict[str, str]) -> dict[str, Any]:
    """Parse the folder as a task runner does before running a task of the plan's last wave."""
    last = dag_ids(plan)[-1]
    log(f"parse as a task start of {last}")
    done = subprocess.run([sys.executable, "-c", TASK_START, str(dags)], capture_output=True, text=True, timeout=900,
                          env={**env, "_AIRFLOW_PARSING_CONTEXT_DAG_ID": last, "_AIRFLOW_PARSING_CONTEXT_TASK_ID": "x"},
                          cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"parsing as a task start failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def figures(rows: list[dict[str, Any]], command: str) -> list[Figure]:
    targets = {"seed-fleet": None, "seed-full": 2.0, "synthetic": 10.0}
    found = []
    for row in rows:
        key = "synthetic" if row["plan"].startswith("synthetic") else row["plan"]
        limit = targets[key]
        label = f"{row['plan']} ({row['services']} services, {row['dags']} DAGs, {row['tasks_per_dag']} tasks/DAG)"
        notes = f"{row['tasks']} tasks in all"
        if row["parse_seconds"] > DEFAULT_IMPORT_TIMEOUT:
            notes += (f"; over Airflow's default dagbag_import_timeout ({DEFAULT_IMPORT_TIMEOUT} s): with the default"
                      " the file is an import timeout and none of its DAGs load")
        found.append(Figure("1 parse", f"parse seconds: {label}", row["parse_seconds"], "s",
                            f"< {limit:g} s" if limit else "", row["parse_seconds"] < limit if limit else None,
                            command, row["load"], notes))
        ok = row["network_calls"] == 0 and row["probe_dags"] == row["dags"] and not row["import_errors"]
        found.append(Figure("1 parse", f"network calls while parsing: {row['plan']}", row["network_calls"], "calls",
                            "0, every DAG loaded", ok, command, row["load"],
                            f"DagBag with socket connect/getaddrinfo refused: {row['probe_dags']} DAGs loaded, "
                            f"import errors: {row['import_errors'] or 'none'}"))
        found.append(Figure("1 parse", f"parse before one task start: {row['plan']}", row["task_start_parse_seconds"],
                            "s", "", None, command, row["load"],
                            f"the file with Airflow's parsing context set to one wave's DAG builds "
                            f"{row['task_start_dags']}; the whole file: {row['parse_seconds']} s, {row['dags']} DAGs"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=2000)
    args = parser.parse_args()
    command = f"{PY} -m bench.parse_cost --services {args.services}"
    with tempfile.TemporaryDirectory(prefix="bench-parse-") as tmp:
        work = Path(tmp)
        home = work / "airflow"
        env = environment(home, work, work)
        log("airflow db migrate (the report command needs a metadata database)")
        airflow(env, "db", "migrate")
        rows = [measure("seed-fleet", ROOT / "include" / "plans" / "seed-fleet.yaml", home, work),
                measure("seed-full", seed_plan(), home, work),
                measure(f"synthetic-{args.services}", synthetic_plan(args.services), home, work)]
    for row in rows:
        log(json.dumps(row))
    emit(figures(rows, command), rows=rows)


if __name__ == "__main__":
    main()
