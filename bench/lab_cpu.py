"""CPU and memory of the lab under a real Prometheus scraping every 2 s.

    .venv/bin/python bench/lab_cpu.py [--topology include/lab/seed.yaml] [--seconds 60]

Starts the lab and Prometheus on free loopback ports, lets them settle, then samples the lab process's
CPU time and resident memory over the measured interval. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import psutil

from meshlab.process import ROOT, LabProcess, PrometheusProcess


def measure(topology: Path, seconds: float, warmup: float = 15) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp, LabProcess(topology, Path(tmp) / "lab") as lab, \
                PrometheusProcess([lab.metrics_target], Path(tmp) / "prom") as prom:
        proc = psutil.Process(lab.proc.pid)
        time.sleep(warmup)
        before, started = proc.cpu_times(), time.monotonic()
        time.sleep(seconds)
        after, elapsed = proc.cpu_times(), time.monotonic() - started
        scrapes = prom.query('scrape_duration_seconds{job="meshlab"}')
        samples = prom.query('scrape_samples_scraped{job="meshlab"}')
        cpu = (after.user + after.system - before.user - before.system) / elapsed
        return {
            "topology": str(topology.relative_to(ROOT) if topology.is_relative_to(ROOT) else topology),
            "seconds": round(elapsed, 1),
            "lab_cpu_cores": round(cpu, 3),
            "lab_rss_mib": round(proc.memory_info().rss / 2**20, 1),
            "scrape_seconds": round(float(scrapes[0]["value"][1]), 3) if scrapes else None,
            "samples_per_scrape": int(float(samples[0]["value"][1])) if samples else None,
            "scrape_interval": "2s",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", type=Path, default=ROOT / "include" / "lab" / "seed.yaml")
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    print(json.dumps(measure(args.topology.resolve(), args.seconds)))


if __name__ == "__main__":
    main()
