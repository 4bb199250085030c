"""Item 3: Prometheus queries per minute while N services soak, batched (one query per check, split by
workload) against per-workload queries, measured by Prometheus itself.

    .venv/bin/python -m bench.prom_load [--sizes 10,50,500] [--seconds 60]

The lab runs a generated topology of max(sizes) services (one cluster, 10 namespaces); N soak gates poll the
soak checks every 5 s for --seconds, each as a GateTrigger does it: its own PrometheusSource (wrapped in a
BatchingSource when batched), `stages.evaluate` through asyncio.to_thread on the event loop's default
thread pool. Queries per minute are Prometheus' own prometheus_http_requests_total{handler="/api/v1/query"}
over the interval; the per-check split comes from Prometheus' query log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PY, Figure, emit, load_average, log
from bench.fleetgen import deployments, synthetic_topology, write
from bench.querylog import per_check
from meshstack.process import LabProcess, PrometheusProcess
from meshwave import stages
from meshwave.checks import Baseline, Thresholds
from meshwave.prometheus import BatchingSource, PrometheusSource, SharedBatches

CLUSTER, WINDOW, POKE = "c1", "20s", 5.0


def params(namespace: str, workload: str) -> dict[str, Any]:
    base = Baseline(namespace, workload, WINDOW, CLUSTER, success_rate=1.0, request_rate=5.0, request_count=100.0,
                    p50_ms=5.0, p99_ms=20.0)
    return {"namespace": namespace, "workload": workload, "window": WINDOW, "thresholds": Thresholds().to_dict(),
            "baseline": base.to_dict()}


async def gate(url: str, svc: dict[str, str], batched: bool, shared: SharedBatches, until: float,
               polls: list[float]) -> None:
    inner = PrometheusSource(url, timeout=10, cluster=CLUSTER)
    source: Any = BatchingSource(inner, POKE, shared) if batched else inner
    args = params(svc["namespace"], svc["workload"])
    while time.time() < until:
        started = time.time()
        await asyncio.to_thread(stages.evaluate, "soak", source, args)
        polls.append(time.time() - started)
        await asyncio.sleep(POKE)
    inner.close()


async def soak(url: str, services: list[dict[str, str]], batched: bool, seconds: float) -> list[float]:
    polls: list[float] = []
    until, shared = time.time() + seconds, SharedBatches()  # one triggerer process: one shared cache
    await asyncio.gather(*(gate(url, s, batched, shared, until, polls) for s in services))
    return polls


def run(prom: PrometheusProcess, services: list[dict[str, str]], batched: bool, seconds: float) -> dict[str, Any]:
    load = load_average()
    before, start = prom.query_api_requests(), time.time()
    polls = asyncio.run(soak(prom.url, services, batched, seconds))
    after, end = prom.query_api_requests(), time.time()
    minutes = (end - start) / 60
    time.sleep(1)  # the query log is written as queries finish
    checks = per_check(prom.queries(), WINDOW, CLUSTER, start, end)
    return {"services": len(services), "mode": "batched" if batched else "per workload",
            "queries_per_minute": round((after - before) / minutes, 1),
            "per_check_per_minute": {k: round(v / minutes, 1) for k, v in checks.items()},
            "polls_per_gate_per_minute": round(len(polls) / len(services) / minutes, 2),
            "poll_seconds_max": round(max(polls), 2) if polls else None, "seconds": round(end - start, 1),
            "load": load}


def figures(rows: list[dict[str, Any]], command: str) -> list[Figure]:
    found = []
    batched = {r["services"]: r for r in rows if r["mode"] == "batched"}
    smallest = batched[min(batched)]["queries_per_minute"] if batched else None
    for r in rows:
        label = f"{r['services']} soaking services, {r['mode']}"
        notes = (f"per check/min: {json.dumps(r['per_check_per_minute'])}; {r['polls_per_gate_per_minute']} polls "
                 f"per gate per minute (poke {POKE:g} s), slowest poll {r['poll_seconds_max']} s")
        if r["mode"] == "batched" and smallest is not None:
            # "does not grow": within 25% of the smallest batch's rate (bucket boundaries make it jitter a little)
            ok = r["queries_per_minute"] <= 1.25 * smallest
            found.append(Figure("3 prometheus", f"queries/min, {label}", r["queries_per_minute"], "queries/min",
                                f"flat in the number of services (<= 1.25 x the {min(batched)}-service figure)", ok,
                                command, r["load"], notes))
        else:
            found.append(Figure("3 prometheus", f"queries/min, {label}", r["queries_per_minute"], "queries/min",
                                command=command, load=r["load"], notes=notes + " (before this change)"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50,500")
    parser.add_argument("--plain-sizes", default="10,50", help="per-workload runs, for comparison")
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    plain = [int(x) for x in args.plain_sizes.split(",") if x]
    command = (f"{PY} -m bench.prom_load --sizes {args.sizes} --plain-sizes {args.plain_sizes} "
               f"--seconds {args.seconds:g}")
    topology = synthetic_topology(max(sizes + plain), clusters=1, namespaces=10, ingress_rps=200)
    services = deployments(topology)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prom-") as tmp:
        path = write(topology, Path(tmp) / "topology.yaml")
        with LabProcess(path, Path(tmp) / "lab") as lab, \
                PrometheusProcess([lab.metrics_target], Path(tmp) / "prom", query_log=True) as prom:
            time.sleep(25)  # a full query window of data
            for n in plain:
                log(f"prometheus load: {n} services, per workload")
                rows.append(run(prom, services[:n], False, args.seconds))
                log(json.dumps(rows[-1]))
            for n in sizes:
                log(f"prometheus load: {n} services, batched")
                rows.append(run(prom, services[:n], True, args.seconds))
                log(json.dumps(rows[-1]))
    emit(figures(rows, command), rows=rows)


if __name__ == "__main__":
    main()
