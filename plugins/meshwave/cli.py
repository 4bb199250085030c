"""The `meshwave` command: `meshwave plan validate FILE...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshwave.plan import PlanError, load_plan


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
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshwave", description="Move Kubernetes services onto an Istio mesh.")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="work with migration plans").add_subparsers(dest="plan_command", required=True)
    validate = plan.add_parser("validate", help="check plan files as the DAG factory will")
    validate.add_argument("plans", nargs="+", type=Path)
    validate.set_defaults(func=_validate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
