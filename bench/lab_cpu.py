"""Item 5: CPU and memory of the lab under a real Prometheus scraping every 2 s.

    .venv/bin/python bench/lab_cpu.py [--topology include/lab/seed.yaml] [--seconds 60]
    .venv/bin/python bench/lab_cpu.py --services 2000 [--seconds 60]     # a generated topology (bench/fleetgen.py)
    .venv/bin/python -m bench.lab_cpu --bench [--seconds 60]              # both, as `make bench` runs it

Starts the lab and Prometheus on free loopback ports, lets them settle, then samples the lab process's
CPU time and resident memory over the measured interval. Prints one JSON line per topology.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PY, Figure, emit, load_average, log  # noqa: E402
from bench.fleetgen import synthetic_topology, write  # noqa: E402
from meshstack.process import ROOT, LabProcess, PrometheusProcess  # noqa: E402


def measure(topology: Path, seconds: float, warmup: float = 15) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        lab = LabProcess(topology, Path(tmp) / "lab")
        try:
            lab.start(timeout=600)  # a 2,000-service topology takes longer than the default minute to build
            return _sample(lab, tmp, topology, seconds, warmup)
        finally:
            lab.stop()


def _sample(lab: LabProcess, tmp: str, topology: Path, seconds: float, warmup: float) -> dict[str, Any]:
    with PrometheusProcess([lab.metrics_target], Path(tmp) / "prom") as prom:
        proc = psutil.Process(lab.proc.pid)
        time.sleep(warmup)
        before, started, load = proc.cpu_times(), time.monotonic(), load_average()
        time.sleep(seconds)
        after, elapsed = proc.cpu_times(), time.monotonic() - started
        scrapes = prom.query('avg_over_time(scrape_duration_seconds{job="meshlab"}[1m])')
        samples = prom.query('scrape_samples_scraped{job="meshlab"}')
        cpu = (after.user + after.system - before.user - before.system) / elapsed
        return {
            "topology": str(topology.relative_to(ROOT) if topology.is_relative_to(ROOT) else topology.name),
            "seconds": round(elapsed, 1),
            "lab_cpu_cores": round(cpu, 3),
            "lab_rss_mib": round(proc.memory_info().rss / 2**20, 1),
            "scrape_seconds": round(float(scrapes[0]["value"][1]), 3) if scrapes else None,
            "samples_per_scrape": int(float(samples[0]["value"][1])) if samples else None,
            "scrape_interval": "2s",
            "load": load,
        }


def render_seconds(topology: Path, tries: int = 5) -> float:
    """The best of a few renderings of the /metrics body, in this process, after the first (which builds every
    series' line prefix). Under Exposition.INLINE_SECONDS, a scrape ticks the lab and renders on its own moment, as a
    real proxy's counters are current when scraped; above it, the scrape gets a body up to a tick old."""
    from meshlab.lab import Lab
    from meshlab.server import Exposition
    from meshlab.topology import load_topology

    exposition = Exposition(Lab(load_topology(topology)))
    exposition.render()
    found = []
    for _ in range(tries):
        exposition.lab.tick()
        exposition.render()
        found.append(exposition.render_seconds)
    return round(min(found), 3)


def render_figure(seconds: float, label: str, command: str) -> Figure:
    from meshlab.server import Exposition

    return Figure("5 lab", f"/metrics render, {label}", seconds, "s",
                  f"< {Exposition.INLINE_SECONDS} s (rendered on the scrape itself)",
                  seconds < Exposition.INLINE_SECONDS, command, load_average(), "best of 5, after the first")


def figures(row: dict, label: str, command: str) -> list[Figure]:
    load = row["load"]
    return [
        Figure("5 lab", f"lab CPU, {label}", row["lab_cpu_cores"], "cores", command=command, load=load,
               notes=f"average over {row['seconds']} s, scraped every 2 s"),
        Figure("5 lab", f"lab RSS, {label}", row["lab_rss_mib"], "MiB", command=command, load=load),
        Figure("5 lab", f"scrape duration, {label}", row["scrape_seconds"], "s",
               "< 2 s (the scrape interval), with samples", row["scrape_seconds"] is not None
               and row["scrape_seconds"] < 2 and bool(row["samples_per_scrape"]), command, load,
               f"{row['samples_per_scrape']} samples per scrape"
               + ("" if row["samples_per_scrape"] else ": the scrapes time out, Prometheus gets nothing")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", type=Path, default=ROOT / "include" / "lab" / "seed.yaml")
    parser.add_argument("--services", type=int, help="a generated topology of this many services instead")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--bench", action="store_true", help="the seed and a generated 2,000-service topology")
    args = parser.parse_args()
    if not args.bench:
        topology = args.topology.resolve()
        with tempfile.TemporaryDirectory() as tmp:
            if args.services:
                topology = write(synthetic_topology(args.services), Path(tmp) / f"synthetic-{args.services}.yaml")
            print(json.dumps(measure(topology, args.seconds)))
        return
    found = []
    seed = measure(ROOT / "include" / "lab" / "seed.yaml", args.seconds)
    log(json.dumps(seed))
    found += figures(seed, "seed (190 deployments, 800 pods)", f"{PY} bench/lab_cpu.py --seconds {args.seconds:g}")
    found.append(render_figure(render_seconds(ROOT / "include" / "lab" / "seed.yaml"), "seed",
                               f"{PY} -m bench.lab_cpu --bench"))
    with tempfile.TemporaryDirectory() as tmp:
        big = measure(write(synthetic_topology(2000), Path(tmp) / "synthetic-2000.yaml"), args.seconds)
    log(json.dumps(big))
    found += figures(big, "2,000 services (2,004 deployments, 4,004 pods)",
                     f"{PY} bench/lab_cpu.py --services 2000 --seconds {args.seconds:g}")
    emit(found, rows=[seed, big])


if __name__ == "__main__":
    main()
