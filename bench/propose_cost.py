"""Issue 16: what `meshwave plan propose` costs. On the seed lab (187 services, 3 clusters; target under 10 s)
and on a generated fleet of 2,000 services (bench/fleetgen.py, 4 clusters; target under 60 s).

    .venv/bin/python -m bench.propose_cost [--services 2000] [--lookback 20s]

For each fleet: the lab and a real Prometheus on free loopback ports, a settle of the lookback plus two scrapes
(so the window holds data from its start), then `meshwave plan propose` as a user runs it, in a new interpreter
(its import and start-up included), against every cluster's kubeconfig and the one Prometheus; the figure is that
process's wall time, with what it proposed from its own summary line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PY, Figure, emit, load_average, log
from bench.fleetgen import synthetic_topology, write
from meshstack.process import ROOT, LabProcess, PrometheusProcess

SEED = ROOT / "include" / "lab" / "seed.yaml"
TARGETS = {"seed": 10.0, "generated": 60.0}  # seconds


def propose(topology: Path, work: Path, lookback: str, settle: float) -> dict[str, Any]:
    lab = LabProcess(topology, work / "lab")
    lab.start(timeout=600)  # a 2,000-service topology takes longer than the default minute to build
    try:
        with PrometheusProcess([lab.metrics_target], work / "prom") as prom:
            time.sleep(settle)
            command = [sys.executable, "-m", "meshwave.cli", "plan", "propose", "--prometheus", prom.url,
                       "--lookback", lookback, "--out", str(work / "plan.yaml"), "--conn-prefix", "bench"]
            for cluster in lab.state["clusters"]:
                command += ["--kubeconfig", f"{cluster}={lab.kubeconfig(cluster)}"]
            load = load_average()
            started = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
            seconds = time.monotonic() - started
    finally:
        lab.stop()
    return {"seconds": round(seconds, 1), "exit": done.returncode, "load": load, "clusters": len(lab.state["clusters"]),
            "summary": (done.stdout.strip().splitlines() or [""])[0][:300], "stderr": done.stderr[-500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--lookback", default="20s")
    args = parser.parse_args()
    command = f"{PY} -m bench.propose_cost --services {args.services} --lookback {args.lookback}"
    settle = int(args.lookback.rstrip("s")) + 4
    figures, rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench-propose-") as tmp:
        generated = write(synthetic_topology(args.services), Path(tmp) / "generated.yaml")
        for name, topology, what in (("seed", SEED, "the seed lab (187 services)"),
                                     ("generated", generated, f"a generated fleet of {args.services} services")):
            log(f"plan propose on {what}")
            r = propose(topology, Path(tmp) / name, args.lookback, settle)
            log(f"{name}: {r}")
            rows.append({"fleet": name, **r})
            ok = r["exit"] == 0 and r["seconds"] < TARGETS[name]
            figures.append(Figure("8 propose", f"plan propose on {what}", r["seconds"], "s",
                                  f"< {TARGETS[name]:g} s, exit 0", ok, command, r["load"],
                                  f"exit {r['exit']}; {r['clusters']} clusters; {r['summary']}"
                                  + (f"; stderr: {r['stderr']}" if r["exit"] else "")))
    emit(figures, rows=rows)


if __name__ == "__main__":
    main()
