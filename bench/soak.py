"""Items 2 and 3: one wave of N services (default 50), soak 60 s, all in one batch, run by `airflow standalone`
against the lab and a real Prometheus.

    .venv/bin/python -m bench.soak [--services 50] [--soak 60] [--stack standalone|postgres]

Figures: the run's wall time against the waits on its critical path (the soak's and the STRICT
verification's minimum seconds: every other second is overhead: scheduling, task start-up, rollouts);
the soak stage's own span; the most worker slots held at once during the soak and how long each soak
sensor held one (sampled every second through the REST API: `running` holds a slot, `deferred` does not);
Prometheus queries per minute during the soak, from Prometheus' own prometheus_http_requests_total and,
per check, from its query log. After the wave, the same Airflow runs a DAG of no-op tasks (a mapped task
group of --services map indexes, 5 tasks each): Airflow's own cost per task run on this machine, which, times
the task runs the wave needed, is the part of the overhead that no change inside a task can remove.

--stack postgres runs the same wave, and the same no-op floor after it, on Airflow distributed as
tests/distributed starts it (CeleryExecutor, Postgres, Redis, every component its own process) with two Celery
workers of 4 slots: the 8 task processes at once of standalone's PARALLELISM 8. Only the stack's start and the
metadata database that the sampling reads differ; the figures carry the stack in their names.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy.pool import NullPool

from bench.airflow_stack import (
    NOOP_STEPS,
    Stack,
    dag_ids,
    retried,
    run_noop,
    stack,
    stamp,
    wait_loaded,
)
from bench.common import PY, Figure, emit, load_average, log
from bench.fleetgen import deployments, make_plan, synthetic_topology
from bench.querylog import per_check
from bench.statsd_sink import SCHEDULER_LOOP, StatsdSink
from bench.task_times import by_task
from meshstack.process import AirflowProcess, PostgresProcess
from tests.distributed.processes import SHARED_SETTINGS, CeleryAirflow, RedisProcess

# The tasks that wait in the triggerer (inject waits for its rollout, flip_strict verifies, the undos watch theirs).
SENSORS = ("inject", "soak", "strict_gate", "flip_strict", "back_to_permissive", "rollback_injection")
WORKER_RUN = '"Worker startup parse complete"'  # what every task process (a start or a resume) logs once
CLUSTER, WINDOW = "c1", "20s"
# A 50-service batch really runs in parallel (the default caps a DAG at 16 tasks at once); 8 task processes at once
# on 2 cores; and every task start parses the whole DAG file again (Airflow 3's task runner), which takes
# longer than the default 30 s import timeout when several do it at once on a loaded 2-core machine.
SLOTS = 8
AIRFLOW_ENV = {"AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "1000", "AIRFLOW__CORE__PARALLELISM": str(SLOTS),
               "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300"}
# The distributed stack: 2 workers x 4 slots hold the 8 task processes that PARALLELISM lets the scheduler queue
# (fewer worker processes than 4 x 2 on 2 cores). The queued-task timeout is the production one, not the tests'
# 90 s: a benchmark does not kill workers, and a task waiting for a slot must not be re-queued.
WORKERS, SLOTS_PER_WORKER = 2, 4
CELERY_ENV = {"AIRFLOW__CELERY__WORKER_CONCURRENCY": str(SLOTS_PER_WORKER),
              **{k: SHARED_SETTINGS[k] for k in ("AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT",
                                                 "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL")}}
STACKS = {"standalone": "", "postgres": " (Postgres, Celery)"}  # the suffix of each figure's name


def plan_for(n: int, soak: int) -> tuple[dict[str, Any], dict[str, Any]]:
    topology = synthetic_topology(n, clusters=1, namespaces=1, ingress_rps=100)
    plan = make_plan(f"soak-{n}", deployments(topology), wave_size=n, batch_size=n, soak_seconds=soak,
                     poke_interval_seconds=5, query_window_seconds=20, verify_seconds=30,
                     strict_gate_timeout_seconds=180, rollout_timeout_seconds=300, min_requests=5,
                     sidecar={"expected_memory_mi": 50})
    return topology, plan


class BenchCelery(CeleryAirflow):
    """tests/distributed's Airflow with SLOTS_PER_WORKER slots a worker (the tests' workers have 2)."""

    def start_worker(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self._spawn(name, ["celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency",
                                  str(SLOTS_PER_WORKER), "--skip-serve-logs"], env or self.environment())

    @property
    def log_path(self) -> Path:
        """The scheduler's log: analyse() counts the tries it failed on a stale exit there (standalone's is one)."""
        return self.log_of("scheduler")


@contextlib.contextmanager
def celery_airflow(home: Path, connections: dict[str, Any], env: dict[str, str]) -> Iterator[CeleryAirflow]:
    """Airflow as tests/distributed starts it (Postgres, Redis, one process per component, Celery workers), for
    bench.airflow_stack.stack; stop them all whatever happens."""
    log("starting Postgres and Redis")
    with PostgresProcess() as postgres, RedisProcess() as redis:
        log(f"on CeleryExecutor: {WORKERS} workers x {SLOTS_PER_WORKER} slots")
        with BenchCelery(home, connections, postgres.url, redis.url, {**env, **CELERY_ENV},
                         workers=WORKERS) as airflow:
            yield airflow


def metadata_url(s: Stack) -> str:
    """The metadata database the stack's Airflow writes: Postgres, or standalone's SQLite file (read-only)."""
    if isinstance(s.airflow, CeleryAirflow):
        return s.airflow.database
    return f"sqlite:///file:{s.airflow.home / 'airflow.db'}?mode=ro&uri=true"


@functools.cache
def engine(url: str) -> sqlalchemy.Engine:
    # A connection per query (NullPool), as a bare sqlite3.connect did: no pooled SQLite connection stays open
    # beside the scheduler's writes; SQLite waits up to 10 s for a lock, Postgres up to 10 s to connect.
    timeout = {"timeout": 10} if url.startswith("sqlite") else {"connect_timeout": 10}
    return sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=timeout)


def db_rows(s: Stack, sql: str, **params: str) -> list[tuple[Any, ...]]:
    """Read Airflow's metadata database directly: sampling through the REST API every second would load the
    api-server that the scheduler needs, and it times out under load."""
    with engine(metadata_url(s)).connect() as db:
        return [tuple(row) for row in db.execute(sqlalchemy.text(sql), params)]


def sample(s: Stack, dag_id: str, run_id: str) -> dict[str, Any]:
    rows = db_rows(s, "SELECT task_id || '[' || map_index || ']', state FROM task_instance WHERE dag_id = :dag "
                      "AND run_id = :run AND state IN ('running', 'deferred')", dag=dag_id, run=run_id)
    [(state,)] = db_rows(s, "SELECT state FROM dag_run WHERE dag_id = :dag AND run_id = :run", dag=dag_id, run=run_id)
    return {"t": time.time(), "running": [t for t, st in rows if st == "running"],
            "deferred": sum(st == "deferred" for _, st in rows), "query_requests": s.prometheus.query_api_requests(),
            "deferred_ids": [t for t, st in rows if st == "deferred"], "run_state": state}


def is_sensor(task_id: str, kind: str | None = None) -> bool:
    """Whether a task id (mapped ones as `task_id[index]`) is a sensor (of `kind`)."""
    last = task_id.split("[", 1)[0].rsplit(".", 1)[-1]
    return last == kind if kind else last in SENSORS


def follow(s: Stack, dag_id: str, run_id: str, timeout: float) -> list[dict[str, Any]]:
    samples, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            samples.append(sample(s, dag_id, run_id))
        except sqlalchemy.exc.OperationalError as exc:  # SQLite locked, or Postgres not answering: a missed sample
            log(f"missed a sample: {exc}")
            continue
        if samples[-1]["run_state"] in ("success", "failed"):
            return samples
        time.sleep(max(0.0, 1 - (time.time() - samples[-1]["t"])))
    raise RuntimeError(f"{dag_id}/{run_id} not finished in {timeout}s")


def at(samples: list[dict[str, Any]], when: float) -> float:
    """The Prometheus query counter at `when` (the nearest sample)."""
    return min(samples, key=lambda x: abs(x["t"] - when))["query_requests"]


def why_failed(s: Stack, ti: dict[str, Any]) -> str:
    """The error lines of a failed task instance's last try, from its log (through the REST API)."""
    quoted = urllib.parse.quote(ti["dag_run_id"], safe="")
    try:
        log_page = s.airflow.api("GET", f"/dags/{ti['dag_id']}/dagRuns/{quoted}/taskInstances/{ti['task_id']}/logs/"
                                        f"{ti['try_number']}?map_index={ti['map_index']}&full_content=true")
    except OSError as exc:  # urllib's HTTPError included: the figure stays, without the reason
        return f"log not read: {exc}"
    lines = [e for e in log_page.get("content", []) if isinstance(e, dict) and e.get("level") in ("error", "critical")]
    def text(entry: dict[str, Any]) -> str:
        errors = entry.get("error_detail") or []
        cause = "; ".join(f"{x.get('exc_type')}: {x.get('exc_value')}" for x in errors if isinstance(x, dict))
        return f"{entry.get('event')}{f' ({cause})' if cause else ''}"[:300]

    return " | ".join(text(e) for e in lines[-3:]) or "no error line in the log"


def analyse(s: Stack, dag_id: str, run_id: str, samples: list[dict[str, Any]], soak: int,
            verify: int) -> dict[str, Any]:
    run = s.run_info(dag_id, run_id)
    tis = retried(lambda: s.airflow.task_instances(dag_id, run_id))
    soaks = [t for tid, t in tis.items() if is_sensor(tid, "soak") and t["start_date"]]
    start, end = stamp(run["start_date"]), stamp(run["end_date"])
    soak_start = min(stamp(t["start_date"]) for t in soaks)
    soak_end = max(stamp(t["end_date"]) for t in soaks)
    during = [x for x in samples if soak_start <= x["t"] <= soak_end]
    held: Counter[str] = Counter()  # seconds each soak sensor was seen running (holding a slot)
    for x in during:
        held.update(tid for tid in x["running"] if is_sensor(tid, "soak"))
    waits: dict[str, list[float]] = {}  # each soak sensor's wait: from its first to its last `deferred` sample
    for x in samples:
        for tid in x["deferred_ids"]:
            if is_sensor(tid, "soak"):
                waits.setdefault(tid, []).append(x["t"])
    held_waiting = sum(1 for x in samples for tid in x["running"]
                       if tid in waits and min(waits[tid]) < x["t"] < max(waits[tid]))
    minutes = (soak_end - soak_start) / 60
    queries = at(samples, soak_end) - at(samples, soak_start)
    checks = per_check(s.prometheus.queries(), WINDOW, CLUSTER, soak_start, soak_end)
    states = Counter(t["state"] for t in tis.values())
    outcomes = Counter((s.airflow.ti_xcom(t, "record") or {}).get("outcome") for tid, t in tis.items()
                       if tid.split("[", 1)[0].endswith(".outcome") and t["state"] in ("success", "failed"))
    # Tries that Airflow's scheduler failed on a deferring task's stale exit (see meshwave.triggers); retried.
    mismatches = s.airflow.log_path.read_text(errors="replace").count("but the task instance's state attribute is")
    started = sum(bool(t.get("hostname")) for t in tis.values())  # ran on a worker (a scheduler skip does not)
    runs = worker_runs(s, dag_id, run_id)  # starts, resumes and retries: a wait that ends in the triggerer has none
    return {
        "worker_task_runs": runs, "stale_exit_failures": mismatches, "by_task": by_task(run_logs(s, dag_id, run_id)),
        "task_instances_started": started, "resumed_after_deferral": runs - started,
        "state": run["state"], "wall_seconds": round(end - start, 1), "critical_waits_seconds": soak + verify,
        "soak_seconds": soak,
        "soak_span_seconds": round(soak_end - soak_start, 1), "soak_tasks": len(soaks),
        "max_slots_during_soak": max((len(x["running"]) for x in during), default=0),
        "max_sensor_slots_during_soak": max((sum(is_sensor(t) for t in x["running"]) for x in during), default=0),
        "max_deferred": max((x["deferred"] for x in samples), default=0),
        "soak_sensor_running_seconds_max": max(held.values(), default=0),
        "soak_sensor_running_seconds_mean": round(sum(held.values()) / len(soaks), 1) if soaks else None,
        "soak_sensor_slot_seconds_while_deferred": held_waiting, "soak_sensors_seen_deferred": len(waits),
        "queries_per_minute": round(queries / minutes, 1) if minutes else None,
        "per_check_per_minute": {k: round(v / minutes, 1) for k, v in checks.items()} if minutes else {},
        "task_states": dict(states), "service_outcomes": dict(outcomes),
        "failed_tasks": {tid: why_failed(s, t) for tid, t in sorted(tis.items()) if t["state"] == "failed"},
    }


def run_logs(s: Stack, dag_id: str, run_id: str) -> Path:
    return s.airflow.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"


def worker_runs(s: Stack, dag_id: str, run_id: str) -> int:
    """Task processes the run started on a worker, counted from its task logs (one line per process)."""
    return sum(f.read_text(errors="replace").count(WORKER_RUN) for f in run_logs(s, dag_id, run_id).rglob("*.log"))


def by_task_note(rows: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{task} {row['runs']:.0f}, {row['before_code_mean']}, {row['in_code_mean']}"
                     for task, row in sorted(rows.items(), key=lambda kv: -kv[1]["slot_seconds"]))


def run_floor(s: Stack, dags: Path, n: int) -> dict[str, Any]:
    """Airflow's own seconds per task run: n x NOOP_STEPS no-op task instances, on the same Airflow."""
    return run_noop(s.airflow, dags, n)


def figures(r: dict[str, Any], n: int, command: str, load: list[float], stack_name: str = "standalone",
            scale: bool = False) -> list[Figure]:
    figs = stack_figures(r, n, command, load)
    if scale:  # beside the 50-service run's figures in one table: the names say which wave
        for f in figs:
            f.name += f" [{n} services]" if f"{n} services" not in f.name else ""
    if stack_name == "standalone":  # the names the earlier results carry
        return figs
    where = f"on {stack_name}: CeleryExecutor, Postgres, Redis, {WORKERS} workers x {SLOTS_PER_WORKER} slots"
    for f in figs:
        f.name += STACKS[stack_name]
        f.notes = f"{where}; {f.notes}" if f.notes else where
    return figs


def stack_figures(r: dict[str, Any], n: int, command: str, load: list[float]) -> list[Figure]:
    overhead = round(r["wall_seconds"] - r["critical_waits_seconds"], 1)
    note = (f"run {r['state']}; service outcomes {json.dumps(r['service_outcomes'])}; task states "
            f"{json.dumps(r['task_states'])}; failed: {', '.join(r['failed_tasks']) or 'none'} (why: details)")
    runs, loop = r["worker_task_runs"], r["scheduler_loop"]
    slot_seconds = round(sum(t["slot_seconds"] for t in r["by_task"].values()), 1)
    figs = [
        Figure("2 soak", f"wave wall time, {n} services in one batch", r["wall_seconds"], "s", command=command,
               load=load, notes=f"critical-path waits {r['critical_waits_seconds']} s (soak + verify_strict "
                                f"minimums); {note}"),
        Figure("2 soak", "overhead over the critical-path waits", overhead, "s", "< 60 s", overhead < 60, command,
               load, "wall time - (soak_seconds + verify_seconds)"),
        Figure("2 soak", "soak stage span (first soak start -> last soak end)", r["soak_span_seconds"], "s",
               command=command, load=load, notes=f"{r['soak_tasks']} soak sensors, soak_seconds {r['soak_seconds']}"),
        Figure("2 soak", "most worker slots held at once during the soak", r["max_slots_during_soak"], "slots",
               command=command, load=load,
               notes=f"of which sensors: {r['max_sensor_slots_during_soak']}; most deferred at once: "
                     f"{r['max_deferred']}"),
        Figure("2 soak", "worker-slot seconds of soak sensors inside their wait",
               r["soak_sensor_slot_seconds_while_deferred"], "s", "0: no slot held by a waiting sensor",
               r["soak_sensor_slot_seconds_while_deferred"] == 0, command, load,
               f"samples (1 s apart) that saw a soak sensor running between its first and last `deferred` "
                     f"sample; {r['soak_sensors_seen_deferred']} of {r['soak_tasks']} seen deferred"),
        Figure("2 soak", "longest time one soak sensor held a worker slot (to defer, and to resume)",
               r["soak_sensor_running_seconds_max"], "s", command=command, load=load,
               notes=f"mean {r['soak_sensor_running_seconds_mean']} s per soak sensor, sampled every 1 s: the task's "
                     f"start (parse, execute, defer); its trigger ends it (no resume)"),
        Figure("2 soak", "tries failed by the scheduler on a deferral's stale exit", r["stale_exit_failures"], "tries",
               command=command, load=load,
               notes="'finished with state success, but the task instance's state attribute is queued' in the "
                     "scheduler's log (apache/airflow#67287): each is retried; three in a row fail the task"),
        Figure("2 soak", "task runs on a worker in the wave", runs, "runs", command=command, load=load,
               notes=f"{round(runs / n, 1)} per service: {r['task_instances_started']} task instances started (a "
                     f"path's first task skipping itself included), {r['resumed_after_deferral']} resumed after a "
                     f"deferral"),
        Figure("2 soak", "worker-slot seconds of the wave's task processes", slot_seconds, "s", command=command,
               load=load, notes=f"{SLOTS} slots: {slot_seconds / SLOTS:.0f} s of wall time if always full; by task "
                                f"(runs, mean s before the task's code incl. the DAG file's parse, mean s in it): "
                                f"{by_task_note(r['by_task'])} (bench.task_times, from the task logs)"),
        Figure("2 soak", "overhead per service", round(overhead / n, 2), "s", command=command, load=load,
               notes=f"{overhead} s over {n} services: the figure to compare across wave sizes (linear growth "
                     f"keeps it flat)"),
        Figure("2 soak", "scheduler loop time during the wave (median)", loop["median_ms"], "ms", command=command,
               load=load, notes=f"{loop['count']} loops between the run's start and end, p95 {loop['p95_ms']} ms, "
                                f"max {loop['max_ms']} ms, {loop['total_s']} s in all (Airflow's "
                                f"{SCHEDULER_LOOP} over StatsD)"),
        Figure("3 prometheus", f"queries/min during the soak, {n} services (Airflow)", r["queries_per_minute"],
               "queries/min", command=command, load=load,
               notes=f"per check/min: {json.dumps(r['per_check_per_minute'])}"),
    ]
    return figs + floor_figures(r["floor"], runs, n, command, load) if r.get("floor") else figs


def floor_figures(floor: dict[str, Any], runs: int, n: int, command: str, load: list[float]) -> list[Figure]:
    per_run = floor["seconds_per_task_run"]
    return [
        Figure("2 soak", f"Airflow alone: {floor['task_instances']} no-op tasks ({n} map indexes x {NOOP_STEPS})",
               floor["wall_seconds"], "s", command=command, load=load,
               notes=f"run {floor['state']}; {per_run} s of wall time per task run, on the same Airflow (parallelism "
                     f"8) after the wave"),
        Figure("2 soak", "Airflow's own share of the overhead (task runs x no-op seconds per run)",
               round(runs * per_run, 1), "s", command=command, load=load,
               notes=f"a floor that no change inside a task removes; the < 60 s target allows at most "
                     f"{int(60 / per_run)} task runs for {n} services ({60 / per_run / n:.1f} per service) on this "
                     f"machine"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--soak", type=int, default=60)
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (Airflow's logs, the lab's)")
    parser.add_argument("--stack", choices=STACKS, default="standalone",
                        help="standalone: `airflow standalone` on SQLite; postgres: CeleryExecutor on Postgres, Redis")
    parser.add_argument("--scale", action="store_true",
                        help="the wave size's own figures (names carry N) and no no-op floor after it (its seconds "
                             "per task run do not depend on N; the 50-service run measures it)")
    args = parser.parse_args()
    command = f"{PY} -m bench.soak --services {args.services} --soak {args.soak}"
    command += f" --stack {args.stack}" if args.stack != "standalone" else ""
    command += " --scale" if args.scale else ""
    topology, plan = plan_for(args.services, args.soak)
    [dag_id] = dag_ids(plan)
    keep = contextlib.nullcontext(str(args.keep)) if args.keep else None
    start_airflow = celery_airflow if args.stack == "postgres" else AirflowProcess
    with keep or tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp, StatsdSink() as metrics, \
            stack(Path(tmp), topology, plan, CLUSTER, {**AIRFLOW_ENV, **metrics.env}, start_airflow) as s:
        wait_loaded(s, dag_id)
        time.sleep(20)  # a query window of data for the baselines
        load = load_average()
        log(f"triggering {dag_id}")
        run_id = retried(lambda: s.airflow.trigger(dag_id), tries=1)
        samples = follow(s, dag_id, run_id, timeout=max(1800, 15 * args.services))
        result = analyse(s, dag_id, run_id, samples, args.soak, plan["defaults"]["verify_seconds"])
        result["scheduler_loop"] = metrics.summary(SCHEDULER_LOOP, samples[0]["t"], samples[-1]["t"])
        if not args.scale:  # after the wave: its load is its own
            result["floor"] = run_floor(s, Path(tmp) / "dags", args.services)
        result["load_end"] = load_average()
    log(json.dumps(result))
    emit(figures(result, args.services, command, load, args.stack, args.scale), rows=[{"stack": args.stack, **result}])


if __name__ == "__main__":
    main()
