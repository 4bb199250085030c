"""Item 6 (issue 15): Airflow's no-op floor with this repository's plugins folder against the floor with an empty
one, measured in the same run; the target is the plugins folder within 10 % of the empty one.

    .venv/bin/python -m bench.floor [--pairs 3] [--services 20] [--probes 3] [--first plugins|empty]

No lab, no Prometheus: `airflow standalone` alone (LocalExecutor, SQLite, the soak benchmark's parallelism of 8)
runs the soak benchmark's DAG of no-op tasks (a mapped task group of --services map indexes, 5 tasks each: 100
task instances by default) once per run, and each run's seconds per task run are the DAG run's wall time over its
task instances. The two configurations alternate (plugins folder, empty folder, plugins folder, ...) for --pairs
pairs so that what else the machine does weighs on both, and every run starts its own Airflow in a new, empty
Airflow home (a new SQLite database, new logs) once every process of the one before has gone, so nothing carries
over from one run to the next (--first empty opens each pair with the empty folder instead). The only
difference is AIRFLOW__CORE__PLUGINS_FOLDER: the repository's plugins/ (whose .airflowignore keeps the meshwave
library out of the plugin scan) or a new empty folder.

Before the runs, with no Airflow running, the plugin load alone: a fresh interpreter that imports
`airflow.plugins_manager` and calls `ensure_plugins_loaded()` (what the scheduler, api-server and `airflow
plugins` call; a task run loads plugins through `airflow.sdk.plugins_manager`), with the same environment as the
runs' Airflow, --probes times per configuration, alternating: the interpreter's wall time, and the call alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.airflow_stack import NOOP_DAG_ID, NOOP_STEPS, airflow_alone, run_noop, write_noop_dag
from bench.common import PY, ROOT, Figure, emit, load_average, log
from bench.soak import AIRFLOW_ENV
from meshstack.process import AirflowProcess

ITEM = "6 floor"
TARGET = 1.10  # plugins folder / empty folder
PLUGINS, EMPTY = "plugins", "empty"
LABELS = {PLUGINS: "plugins folder plugins/", EMPTY: "empty plugins folder"}

# A fresh interpreter's plugin load; prints what it found and how long the import and the load took.
PROBE = """import json, time
t0 = time.perf_counter()
from airflow import plugins_manager
t1 = time.perf_counter()
plugins_manager.ensure_plugins_loaded()
t2 = time.perf_counter()
plugins, errors = plugins_manager._get_plugins()
print(json.dumps({"import_seconds": t1 - t0, "load_seconds": t2 - t1, "plugins": [p.name for p in plugins],
                  "import_errors": errors}))
"""


def order(pairs: int, first: str = PLUGINS) -> list[str]:
    """The runs' configurations, alternating: plugins folder, empty folder, plugins folder, ... (or the empty
    folder first: whether a configuration gains from its place in a pair)."""
    return ([PLUGINS, EMPTY] if first == PLUGINS else [EMPTY, PLUGINS]) * pairs


def plugins_env(config: str, work: Path) -> dict[str, str]:
    """The plugins folder of a configuration: the repository's, or a new empty one in `work`."""
    if config == PLUGINS:
        folder = ROOT / "plugins"
    else:
        folder = work / "empty-plugins"
        folder.mkdir(parents=True, exist_ok=True)
    return {"AIRFLOW__CORE__PLUGINS_FOLDER": str(folder)}


def probe(config: str, work: Path) -> dict[str, Any]:
    """One plugin load in a fresh interpreter, with a new Airflow home and the environment a run's Airflow gets."""
    (work / "dags").mkdir(parents=True, exist_ok=True)
    # The environment AirflowProcess would start `airflow standalone` with (nothing is started here).
    env = AirflowProcess(work / "airflow", {}, {"AIRFLOW__CORE__DAGS_FOLDER": str(work / "dags"), **AIRFLOW_ENV,
                                                **plugins_env(config, work)}).environment()
    (work / "airflow").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=work / "airflow", capture_output=True, text=True,
                          timeout=300)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"plugin load ({config}) exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"config": config, "interpreter_seconds": round(wall, 3),
            "import_seconds": round(found["import_seconds"], 3), "load_seconds": round(found["load_seconds"], 4),
            "plugins": found["plugins"],
            "import_errors": found["import_errors"]}


def processes_of(home: Path) -> list[psutil.Process]:
    """Processes of an Airflow whose AIRFLOW_HOME is `home` (ours: other users' processes are not readable)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get("AIRFLOW_HOME") == str(home):
                found.append(proc)
    return found


def wait_gone(home: Path, timeout: float = 60) -> tuple[float, int]:
    """Wait until no process of the Airflow in `home` is left (a task process outliving the stop would weigh on the
    next run): the seconds waited, and how many were still there when the stop returned."""
    started, left = time.monotonic(), len(processes_of(home))
    while processes_of(home):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"processes of {home} still running {timeout} s after the stop: {processes_of(home)}")
        time.sleep(1)
    return round(time.monotonic() - started, 1), left


def task_times(home: Path) -> dict[str, float | None]:
    """From a stopped Airflow's SQLite database: the task instances' mean duration (a task process's own time: its
    start, the DAG file's parse, plugin load, the no-op, the Execution API calls) and mean wait from queued to
    started."""
    uri = f"file:{home / 'airflow.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        [(duration, queued)] = db.execute(
            "SELECT avg(duration), avg((julianday(start_date) - julianday(queued_dttm)) * 86400) FROM task_instance "
            "WHERE dag_id = ?", (NOOP_DAG_ID,)).fetchall()
    return {"mean_task_seconds": None if duration is None else round(duration, 3),
            "mean_queued_seconds": None if queued is None else round(queued, 3)}


def one_run(config: str, work: Path, n: int) -> dict[str, Any]:
    """The no-op DAG once, on an Airflow of its own started in a new home under `work`."""
    write_noop_dag(work / "dags", n)  # there before Airflow starts: parsed as it starts
    load_start = load_average()
    started = time.monotonic()
    with airflow_alone(work, {**AIRFLOW_ENV, **plugins_env(config, work)}) as airflow:
        healthy = time.monotonic() - started
        log(f"{config}: airflow healthy in {healthy:.0f} s")
        result = run_noop(airflow, work / "dags", n)
        failed_plugins = airflow.log_path.read_text(errors="replace").count("Failed to import plugin")
    waited, left = wait_gone(work / "airflow")
    result |= task_times(work / "airflow")
    log(f"{config}: {result}; {left} processes left after the stop, gone {waited} s later")
    return {"config": config, **result, "start_to_healthy_seconds": round(healthy, 1),
            "plugin_import_failures_in_log": failed_plugins, "processes_left_after_stop": left,
            "seconds_until_gone": waited, "load_start": load_start, "load_end": load_average()}


def summary(runs: list[dict[str, Any]], target: float = TARGET) -> dict[str, Any]:
    """Each configuration's seconds per task run (in run order), their medians, the ratio plugins / empty, and
    whether it meets the target (every run succeeded, and the ratio is at most `target`)."""
    per = {c: [r["seconds_per_task_run"] for r in runs if r["config"] == c] for c in (PLUGINS, EMPTY)}
    if not all(per.values()):
        raise ValueError(f"both configurations need a run: {per}")
    median = {c: round(statistics.median(v), 3) for c, v in per.items()}
    ratio = round(median[PLUGINS] / median[EMPTY], 3)
    succeeded = all(r["state"] == "success" for r in runs)
    return {"per_run": per, "median": median, "ratio": ratio, "all_succeeded": succeeded,
            "met": succeeded and ratio <= target}


def probe_summary(probes: list[dict[str, Any]], config: str) -> dict[str, Any]:
    mine = [p for p in probes if p["config"] == config]
    return {key: round(statistics.median(p[key] for p in mine), 4)
            for key in ("interpreter_seconds", "import_seconds", "load_seconds")} | {
        "runs": [p["interpreter_seconds"] for p in mine], "plugins": mine[-1]["plugins"],
        "import_errors": mine[-1]["import_errors"], "load": mine[-1]["load"]}


def figures(runs: list[dict[str, Any]], probes: list[dict[str, Any]], n: int, command: str) -> list[Figure]:
    s = summary(runs)
    out = []
    for i, r in enumerate(runs, 1):
        out.append(Figure(ITEM, f"no-op floor, run {i} of {len(runs)}: {LABELS[r['config']]}",
                          r["seconds_per_task_run"], "s/task run", command=command, load=r["load_start"],
                          notes=f"run {r['state']}; {r['wall_seconds']} s for {r['task_instances']} no-op task "
                                f"instances ({n} map indexes x {NOOP_STEPS}); a task instance's own duration "
                                f"{r['mean_task_seconds']} s on average, {r['mean_queued_seconds']} s from queued to "
                                f"started; airflow standalone healthy "
                                f"{r['start_to_healthy_seconds']} s after its start (new home); 'Failed to import "
                                f"plugin' in its log: {r['plugin_import_failures_in_log']}; processes left after the "
                                f"stop: {r['processes_left_after_stop']} (gone {r['seconds_until_gone']} s later); "
                                f"load at the end {' '.join(map(str, r['load_end']))}"))
    load = runs[-1]["load_end"]
    for c in (PLUGINS, EMPTY):
        out.append(Figure(ITEM, f"no-op floor, {LABELS[c]} (median of {len(s['per_run'][c])})", s["median"][c],
                          "s/task run", command=command, load=load,
                          notes=f"runs: {', '.join(map(str, s['per_run'][c]))} s per task run; a task instance's "
                                f"own mean duration in those runs: "
                                f"{', '.join(str(r['mean_task_seconds']) for r in runs if r['config'] == c)} s"))
    out.append(Figure(ITEM, "no-op floor: plugins folder / empty folder", s["ratio"], "x",
                      f"<= {TARGET:.2f} (within 10 %)", s["met"], command, load,
                      f"medians {s['median'][PLUGINS]} / {s['median'][EMPTY]} s per task run, runs alternating in "
                      f"one benchmark run; every run succeeded: {s['all_succeeded']}"))
    for c in (PLUGINS, EMPTY):
        p = probe_summary(probes, c)
        out.append(Figure(ITEM, f"plugin load in a fresh interpreter, {LABELS[c]} (median of {len(p['runs'])})",
                          p["interpreter_seconds"], "s", command=command, load=p["load"],
                          notes=f"`from airflow import plugins_manager; plugins_manager.ensure_plugins_loaded()`: "
                                f"interpreter wall times {', '.join(map(str, p['runs']))} s; the import "
                                f"{p['import_seconds']} s, ensure_plugins_loaded() alone {p['load_seconds']} s "
                                f"(medians); plugins loaded: {p['plugins'] or 'none'}; import errors: "
                                f"{p['import_errors'] or 'none'}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3,
                        help="runs per configuration, alternating (3: each median is one run's figure)")
    parser.add_argument("--services", type=int, default=20,
                        help=f"map indexes of the no-op DAG ({NOOP_STEPS} tasks each)")
    parser.add_argument("--probes", type=int, default=3, help="fresh-interpreter plugin loads per configuration")
    parser.add_argument("--first", choices=(PLUGINS, EMPTY), default=PLUGINS,
                        help="the configuration that opens each pair (plugins: the plugins folder)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (each run's Airflow home, logs)")
    args = parser.parse_args()
    if args.pairs < 2 or args.probes < 1:
        parser.error("--pairs must be at least 2 (the noise of the machine on both configurations), --probes 1")
    command = (f"{PY} -m bench.floor --pairs {args.pairs} --services {args.services} --probes {args.probes}"
               f"{f' --first {args.first}' if args.first != PLUGINS else ''}")
    began, load_begin = time.monotonic(), load_average()
    keep = contextlib.nullcontext(str(args.keep)) if args.keep else None
    with keep or tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        work = Path(tmp)
        probes = []
        for i, config in enumerate(order(args.probes, args.first)):
            probes.append({**probe(config, work / f"probe-{i}-{config}"), "load": load_average()})
            log(f"plugin load, {config}: {probes[-1]}")
        runs = []
        for i, config in enumerate(order(args.pairs, args.first)):
            log(f"run {i + 1} of {2 * args.pairs}: {LABELS[config]}")
            runs.append(one_run(config, work / f"run-{i}-{config}", args.services))
    s = summary(runs)
    detail = {"runs": runs, "probes": probes, "summary": s, "wall_seconds": round(time.monotonic() - began),
              "load_start": load_begin, "load_end": load_average()}
    log(json.dumps(detail))
    emit(figures(runs, probes, args.services, command), rows=[detail])


if __name__ == "__main__":
    main()
