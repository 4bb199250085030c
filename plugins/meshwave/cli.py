"""The `meshwave` command: `meshwave plan validate FILE...`, `meshwave plan propose ...`, `meshwave plan schema`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meshwave.plan import Plan, PlanError, Wave, load_plan


def _validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.plans:
        try:
            plan = load_plan(path)
        except PlanError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        services = sum(len(w.services) for w in plan.waves)
        print(f"{path}: ok: migration {plan.migration}, {len(plan.waves)} waves, {services} services, "
              f"DAGs {', '.join(plan.dag_id(w) for w in plan.waves)}")
        for wave in plan.waves:
            print(f"  {wave.name}: {len(wave.services)} services; starts: {_starts(plan, wave)}")
        if plan.freeze:
            why = plan.freeze if isinstance(plan.freeze, str) else "freeze: true"
            print(f"  FROZEN ({why}): no wave of this plan changes anything")
    return 1 if failed else 0


def _starts(plan: Plan, wave: Wave) -> str:
    cron = wave.schedule or plan.defaults.schedule
    starts = [f"window {wave.window.describe()}" if wave.window else "", f"after {wave.after}" if wave.after else "",
              f"cron {cron}" if cron and not (wave.window or wave.after) else ""]
    return ", ".join(filter(None, starts)) or "manual"


SCHEMA_ID = "https://meshwave.invalid/schemas/plan.schema.json"  # an identifier, not a download address


def schema_text() -> str:
    """The plan's JSON Schema (Draft 2020-12, as pydantic writes it): docs/generate.py commits the same text."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
              **Plan.model_json_schema(), "title": "meshwave migration plan"}
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _schema(args: argparse.Namespace) -> int:
    sys.stdout.write(schema_text())
    return 0


def _propose_arguments(parser: argparse.ArgumentParser) -> None:
    from meshwave.propose.command import add_arguments  # the proposer loads only for this command

    add_arguments(parser)


def _propose(args: argparse.Namespace) -> int:
    from meshwave.propose.command import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshwave", description="Move Kubernetes services onto an Istio mesh.")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="work with migration plans").add_subparsers(dest="plan_command", required=True)
    validate = plan.add_parser("validate", help="check plan files as the DAG factory will")
    validate.add_argument("plans", nargs="+", type=Path)
    validate.set_defaults(func=_validate)
    propose = plan.add_parser("propose", help="read clusters and their telemetry, write a plan (waves, STRICT or not)")
    _propose_arguments(propose)
    propose.set_defaults(func=_propose)
    schema = plan.add_parser("schema", help="print the plan's JSON Schema (docs/plan.schema.json, for editors)")
    schema.set_defaults(func=_schema)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
