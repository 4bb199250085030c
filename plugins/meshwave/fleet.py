"""The fleet the plans describe: every cluster and planned service across the plan files.

Read at DAG parse time from local files only. The ad-hoc and emergency DAGs offer the clusters found here;
a broken plan file does not hide the others (its error is kept, for the DAG docs and the task logs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from meshwave.plan import ClusterConfig, Defaults, Plan, PlanError, ServicePlan, load_plan

ROOT = Path(__file__).resolve().parents[2]


def plans_dir() -> Path:
    return Path(os.environ.get("MESHWAVE_PLANS_DIR", ROOT / "include" / "plans"))


@dataclass(frozen=True)
class PlannedService:
    plan: Plan
    service: ServicePlan
    source: str


@dataclass
class Fleet:
    clusters: dict[str, ClusterConfig] = field(default_factory=dict)
    defaults: dict[str, Defaults] = field(default_factory=dict)  # per cluster: the first plan naming it
    services: dict[str, PlannedService] = field(default_factory=dict)  # by "cluster/namespace/workload"
    errors: list[str] = field(default_factory=list)

    def add(self, plan: Plan, source: str) -> None:
        for name, cfg in plan.clusters.items():
            known = self.clusters.setdefault(name, cfg)
            self.defaults.setdefault(name, plan.defaults)
            if known != cfg:
                self.errors.append(f"{source}: clusters.{name}: differs from an earlier plan's {name} "
                                   f"({known.model_dump()}); the earlier one is used")
        for wave in plan.waves:
            for svc in wave.services:
                self.services.setdefault(svc.key, PlannedService(plan, svc, source))


def load_fleet(directory: Path | None = None) -> Fleet:
    """Every `*.yaml` plan in the plans directory, in name order."""
    fleet = Fleet()
    directory = directory or plans_dir()
    for path in sorted(directory.glob("*.yaml")):
        try:
            fleet.add(load_plan(path), path.name)
        except PlanError as exc:
            fleet.errors.append(str(exc))
    return fleet
