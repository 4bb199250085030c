"""`make bench`: every benchmark, one table, and bench/results.json.

    .venv/bin/python -m bench.run [--only NAME,...] [--output bench/results.json]

NAME: parse, soak, soak-postgres, prom_load, rollback, lab, floor, sqlite_width, propose, rehearse, and soak-200
(only when named).

Each benchmark runs in its own process and starts (and stops) the lab, Prometheus and Airflow it needs; it
prints one BENCH-RESULT line that this runner collects. A benchmark that fails is a row saying so, and the
runner exits 1. Timings depend on what else the machine runs: each figure carries the load average at the
time it was taken.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULT_PREFIX, ROOT, Figure, load_average, log, machine

BENCHMARKS: dict[str, list[str]] = {  # name -> the module and its arguments
    "parse": ["bench.parse_cost", "--services", "2000"],
    "prom_load": ["bench.prom_load", "--sizes", "10,50,500", "--plain-sizes", "10,50", "--seconds", "60"],
    "lab": ["bench.lab_cpu", "--bench", "--seconds", "60"],
    "rollback": ["bench.rollback"],
    "soak": ["bench.soak", "--services", "50", "--soak", "60"],
    # The same wave on the distributed stack (CeleryExecutor, Postgres, Redis): its figures' names say so.
    "soak-postgres": ["bench.soak", "--stack", "postgres", "--services", "50", "--soak", "60"],
    "floor": ["bench.floor", "--pairs", "3", "--services", "20", "--probes", "3"],
    # A wave four times as wide: does the overhead per service stay flat, and the scheduler's loop? Not in the
    # default set: on this 2-core machine it takes about two hours (docs/benchmarks.md, 2c); ONLY=soak-200 runs it.
    "soak-200": ["bench.soak", "--services", "200", "--soak", "60", "--scale"],
    # How many task processes at once the SQLite standalone stack holds before "database is locked".
    "sqlite_width": ["bench.sqlite_width", "--parallelism", "8,16,32,64", "--services", "40"],
    # Issue 16: `meshwave plan propose` on the seed lab and on a generated fleet of 2,000 services.
    "propose": ["bench.propose_cost", "--services", "2000", "--lookback", "20s"],
    # Issue 16: every wave of the seed plan on the seed lab, soaks of 20 s (target under 30 minutes, 0 callers lost).
    "rehearse": ["bench.rehearse", "--soak", "20", "--timeout", "150"],
}

ON_REQUEST = ("soak-200",)  # run only when named in --only
TIMEOUTS = {"rehearse": 3 * 3600}  # seconds a benchmark may run (default an hour): the rehearsal's own limit is 150 min


def run(name: str, argv: list[str]) -> tuple[list[dict[str, Any]], list[Any]]:
    command = [sys.executable, "-m", *argv]
    log(f"{name}: {' '.join(command[1:])}")
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True,
                          timeout=TIMEOUTS.get(name, 3600))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        error = Figure(name, f"{name}: the benchmark failed (exit {proc.returncode})", None, "", "runs", False,
                       f".venv/bin/python -m {' '.join(argv)}", load_average(), proc.stdout[-500:])
        return [{**error.to_dict(), "benchmark": name}], []
    data = json.loads(lines[-1][len(RESULT_PREFIX):])
    log(f"{name}: done in {time.monotonic() - started:.0f} s")
    return [{**f, "benchmark": name} for f in data["figures"]], data.get("rows", [])


def benchmark_of(figure: dict[str, Any]) -> str | None:
    """The benchmark a figure came from, by the command that re-runs it."""
    # the first that matches: bench.rehearse's command has "--soak" in it
    modules = {"bench.rehearse": "rehearse", "--stack postgres": "soak-postgres", "--scale": "soak-200",
               "parse_cost": "parse", "soak": "soak",
               "prom_load": "prom_load", "rollback": "rollback", "lab_cpu": "lab", "bench.floor": "floor",
               "sqlite_width": "sqlite_width", "propose_cost": "propose"}
    return next((name for module, name in modules.items() if module in figure.get("command", "")), None)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def table(figures: list[dict[str, Any]]) -> str:
    rows = [("item", "figure", "value", "target", "ok", "load (1m)")]
    for f in figures:
        ok = {True: "yes", False: "NO", None: "-"}[f["passed"]]
        rows.append((f["item"], f["name"], f"{fmt(f['value'])} {f['unit']}".strip(), f["target"] or "-", ok,
                     fmt(f["load"][0]) if f["load"] else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(figures: list[dict[str, Any]]) -> str:
    lines = ["| # | figure | value | target | met | load avg (1 min) | re-run |", "|---|---|---|---|---|---|---|"]
    for f in figures:
        ok = {True: "yes", False: "**no**", None: "-"}[f["passed"]]
        lines.append(f"| {f['item']} | {f['name']} | {fmt(f['value'])} {f['unit']} | {f['target'] or '-'} | {ok} | "
                     f"{fmt(f['load'][0]) if f['load'] else '-'} | `{f['command']}` |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(name for name in BENCHMARKS if name not in ON_REQUEST))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--soak-services", type=int, default=50, help="services in the soak wave (item 2)")
    parser.add_argument("--rehearse-timeout", type=int, default=150,
                        help="minutes the seed rehearsal may take (item 16); a shorter one measures its first waves")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other benchmarks' figures from the existing results file (a partial re-run)")
    args = parser.parse_args()
    start = machine()
    figures, rows = [], {}
    names = args.only.split(",")
    if args.merge and args.output.exists():
        kept = json.loads(args.output.read_text())
        figures = [f for f in kept["figures"] if (f.get("benchmark") or benchmark_of(f)) not in names]
        rows = {k: v for k, v in kept.get("details", {}).items() if k not in names}
        start = {**kept["machine"], "rerun": {**kept["machine"].get("rerun", {}), **{n: start for n in names}}}
    for soak in ("soak", "soak-postgres"):  # both stacks run the wave --soak-services wide
        argv = BENCHMARKS[soak]
        argv[argv.index("--services") + 1] = str(args.soak_services)
    BENCHMARKS["rehearse"][BENCHMARKS["rehearse"].index("--timeout") + 1] = str(args.rehearse_timeout)
    TIMEOUTS["rehearse"] = (args.rehearse_timeout + 30) * 60
    for name in names:
        found, detail = run(name, BENCHMARKS[name])
        figures += found
        rows[name] = detail
        result = {"machine": start, "load_average_end": load_average(), "figures": figures, "details": rows,
                  "command": f".venv/bin/python -m bench.run --only {args.only}"}
        args.output.write_text(json.dumps(result, indent=2) + "\n")  # after each: a late failure keeps the rest
    m = start
    print(f"\nmeshwave benchmarks, {m['date']}: {m['nproc']} cores ({m['cpu_model']}), {m['ram_gib']} GiB, "
          f"load average {' '.join(map(str, m['load_average']))} at the start\n")
    print(table(figures))
    print(f"\nwritten: {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    print("\n" + markdown(figures))
    sys.exit(1 if any(f["passed"] is False and f["value"] is None for f in figures) else 0)


if __name__ == "__main__":
    main()
