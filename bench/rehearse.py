"""Issue 16: the full seed rehearsal. Every wave of include/plans/seed-fleet.yaml on the seed lab (187 services,
3 clusters), a real Prometheus and `airflow standalone`, soaks of 20 s, as `make rehearse` runs it.

    .venv/bin/python -m bench.rehearse [--plan include/plans/seed-fleet.yaml] [--soak 20] [--timeout 150]

Figures: the wall time from the command's start to its report (target: under 30 minutes on this machine), and the
callers that lost traffic at any moment (target 0), with what the rehearsal found (its verdict lines) in the notes.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from bench.common import PY, Figure, emit, load_average, log
from meshlab.rehearsal.plan_copy import RehearsalError
from meshlab.rehearsal.run import rehearse_on_lab, summary_lines
from meshstack.process import ROOT

SEED_LAB = ROOT / "include" / "lab" / "seed.yaml"
TARGET_MINUTES = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, default=ROOT / "include" / "plans" / "seed-fleet.yaml")
    parser.add_argument("--soak", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=150, help="minutes")
    parser.add_argument("--out", type=Path, default=ROOT / ".rehearsal" / "bench",
                        help="the rehearsal's report, charts and stack logs (kept to be looked at)")
    args = parser.parse_args()
    command = f"{PY} -m bench.rehearse --soak {args.soak} --timeout {args.timeout:g}"
    load = load_average()
    started = time.monotonic()
    shutil.rmtree(args.out, ignore_errors=True)
    try:
        result = rehearse_on_lab(args.plan, SEED_LAB, args.soak, args.out, args.timeout * 60, log=log)
    except RehearsalError as exc:
        minutes = (time.monotonic() - started) / 60
        emit([Figure("16 rehearse", "seed rehearsal: wall time", round(minutes, 1), "min",
                     f"< {TARGET_MINUTES} min", False, command, load, f"did not finish: {exc}"[:900])])
        return
    lines = summary_lines(result)
    for line in lines:
        log(line)
    minutes = (time.monotonic() - started) / 60
    lost = len(result.history.lost) if result.history is not None else None
    services = sum(len(w.records) for w in result.waves)
    notes = f"{services} service records in {len(result.waves)} waves; " + "; ".join(lines[-1 - len(result.problems):])
    # The time target holds only for a rehearsal that ran every wave: one stopped by a failed wave is shorter.
    ran_all = all(w.run_id is not None for w in result.waves)
    emit([Figure("16 rehearse", "seed rehearsal: wall time, start to report"
                 + ("" if ran_all else f" (stopped after {sum(w.run_id is not None for w in result.waves)} of "
                                       f"{len(result.waves)} waves)"), round(minutes, 1), "min",
                 f"< {TARGET_MINUTES} min, every wave run", ran_all and minutes < TARGET_MINUTES, command, load,
                 notes[:900]),
          Figure("16 rehearse", "seed rehearsal: callers that lost traffic", lost, "callers", "0", lost == 0, command,
                 load_average(), "from the tracing service graph's history (meshlab.rehearsal.history)")])


if __name__ == "__main__":
    main()
