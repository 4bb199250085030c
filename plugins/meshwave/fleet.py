"""The fleet the plans describe: every cluster and planned service across the plan files.

Read at DAG parse time from local files only. The ad-hoc and emergency DAGs offer the clusters found here;
a broken plan file does not hide the others (its error is kept, for the DAG docs and the task logs).

A workload belongs to one plan: two plans naming it would migrate it twice, with different settings
(finding 18). `load_fleet` keeps the first and records the error naming both files; a wave DAG file whose plan
names a workload that another plan file names fails to load (`check_unique`), naming both.
"""

from __future__ import annotations

import functools
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
    plans: list[Plan] = field(default_factory=list)  # in file name order

    def add(self, plan: Plan, source: str) -> None:
        self.plans.append(plan)
        for name, cfg in plan.clusters.items():
            known = self.clusters.setdefault(name, cfg)
            self.defaults.setdefault(name, plan.defaults)
            if known != cfg:
                self.errors.append(f"{source}: clusters.{name}: differs from an earlier plan's {name} "
                                   f"({known.model_dump()}); the earlier one is used")
        for wave in plan.waves:
            for svc in wave.services:
                known_svc = self.services.setdefault(svc.key, PlannedService(plan, svc, source))
                if known_svc.source != source:
                    self.errors.append(_twice(svc.key, known_svc.source, source) + f"; {known_svc.source}'s is used")


    @property
    def canary_asked(self) -> bool:
        """Some planned service, or a cluster's defaults (an unplanned service's), tries a canary first."""
        return any(d.canary is not None for d in self.defaults.values()) or any(
            ps.plan.settings_of(ps.plan.wave_of(key), ps.service).canary is not None
            for key, ps in self.services.items())


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


def _twice(key: str, first: str, second: str) -> str:
    return f"{key} is planned in two plan files, {first} and {second}: a workload belongs to one plan"


def planned_keys(path: Path) -> frozenset[str]:
    """The "cluster/namespace/workload" keys of a plan file that loads; one that does not load names nothing (it
    makes no DAG, so it migrates nothing; its own DAG file reports why)."""
    try:
        stat = path.stat()
    except OSError:
        return frozenset()
    return _keys(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _keys(path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """Cached by the file's modification time and size: the dag-processor parses every DAG file again and again."""
    try:
        plan = load_plan(path)
    except PlanError:
        return frozenset()
    return frozenset(svc.key for wave in plan.waves for svc in wave.services)


def check_unique(plan: Plan, path: Path, directory: Path | None = None) -> None:
    """PlanError naming both files when a workload of `plan` is also named by another plan file of the directory."""
    directory = directory or plans_dir()
    mine = {svc.key for wave in plan.waves for svc in wave.services}
    problems = [_twice(key, path.name, other.name)
                for other in sorted(directory.glob("*.yaml")) if other.resolve() != path.resolve()
                for key in sorted(mine & planned_keys(other))]
    if problems:
        raise PlanError("\n".join(problems))
