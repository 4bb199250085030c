"""A rehearsal from start to end: on a running stack (`rehearse`), or on one it starts itself (`rehearse_on_lab`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from meshlab.rehearsal import report
from meshlab.rehearsal.end_state import End, ServiceEnd, read_end_state
from meshlab.rehearsal.follow import Airflow, WaveRun, follow
from meshlab.rehearsal.history import History, RangeSource, check_history
from meshlab.rehearsal.plan_copy import RehearsalError, rehearsal_plan
from meshwave.plan import Plan
from meshwave.prometheus import PrometheusError

if TYPE_CHECKING:
    from meshwave.kube import MeshKube

HISTORY_WINDOW, HISTORY_STEP, BEFORE = 30, 10, 60  # seconds: the callers' rate window, its step, the time before


class Rehearsal(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    waves: list[WaveRun]
    ends: list[ServiceEnd]
    history: History | None
    problems: list[str]  # why it failed; [] when it passed
    took_seconds: float
    report: Path

    @property
    def passed(self) -> bool:
        return not self.problems


def rehearse(airflow: Airflow, kubes: dict[str, MeshKube], prometheus: RangeSource, plan: Plan, out: Path, *,
             timeout: float, title: str, log: Any = print) -> Rehearsal:
    """Every wave of `plan` (its DAGs already loaded in `airflow`), then the end state, the callers' history and
    the report in `out`."""
    began = time.time()
    waves = follow(airflow, plan, timeout, log=log)
    time.sleep(HISTORY_WINDOW)  # the last wave's last change inside a full rate window before it is judged
    records = [r for w in waves for r in w.records]
    ends = read_end_state(kubes, plan, records)
    start = min((w.started.timestamp() for w in waves if w.started), default=began)
    history, history_error = None, ""
    try:
        history = check_history(prometheus, plan, start, time.time(), before_seconds=BEFORE, window=HISTORY_WINDOW,
                                step=HISTORY_STEP)
    except (RehearsalError, PrometheusError) as exc:
        history_error = str(exc)
    problems = report.verdict(waves, ends, history, history_error)
    took = time.time() - began
    out.mkdir(parents=True, exist_ok=True)
    charts = report.charts(out, waves, ends, history)
    path = out / "rehearsal.md"
    path.write_text(report.markdown(title, waves, ends, history, problems, took, charts))
    return Rehearsal(waves=waves, ends=ends, history=history, problems=problems, took_seconds=took, report=path)


def summary_lines(result: Rehearsal) -> list[str]:
    """What the command prints at the end: the fleet's end state per cluster, then the verdict."""
    lines = []
    for cluster in sorted({e.cluster for e in result.ends}):
        mine = [e for e in result.ends if e.cluster == cluster]
        counts: dict[str, int] = {}
        for e in mine:
            counts[str(e.end)] = counts.get(str(e.end), 0) + 1
        lines.append(f"{cluster}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        lines += [f"  {e.namespace}/{e.workload}: {e.end} ({e.data_plane}): {e.reason[:160]}"
                  for e in mine if e.wave is not None and e.end is not End.STRICT or e.mismatch]
        excluded = [e for e in mine if e.wave is None]
        lines += [f"  {e.namespace}/{e.workload}: excluded ({e.data_plane}): {e.reason[:160]}"
                  for e in excluded if len(excluded) <= 10]
    if result.history is not None:
        lines.append(f"callers: {len(result.history.checks)} edges judged, {len(result.history.lost)} lost traffic")
    lines.append(("PASSED" if result.passed else f"FAILED ({len(result.problems)})") +
                 f" in {result.took_seconds / 60:.1f} min; report: {result.report}")
    lines += [f"  - {p}" for p in result.problems]
    return lines


def rehearse_on_lab(plan_path: Path, topology: Path, soak_seconds: int, out: Path, timeout: float,
                    log: Any = print) -> Rehearsal:
    """Start the lab on `topology`, a Prometheus and `airflow standalone` with the plan's rehearsal copy, rehearse,
    stop them all (their logs stay under `out`/stack)."""
    from kubernetes import config

    from meshlab.topology import load_topology
    from meshstack.process import ROOT, AirflowProcess, LabProcess, PrometheusProcess, wave_dag_file
    from meshwave.kube import MeshKube
    from meshwave.prometheus import PrometheusSource

    plan, text = rehearsal_plan(plan_path, soak_seconds)
    clusters = {c.name for c in load_topology(topology).clusters}
    if missing := sorted(set(plan.clusters) - clusters):
        raise RehearsalError(f"plan {plan_path} names clusters the topology {topology} does not have: "
                             f"{', '.join(missing)} (it has {', '.join(sorted(clusters))})")
    work = out / "stack"
    plans, dags = work / "plans", work / "dags"
    for folder in (plans, dags):
        folder.mkdir(parents=True, exist_ok=True)
    (plans / f"{plan.migration}.yaml").write_text(text)
    (dags / f"rehearse_{plan.migration.replace('-', '_')}.py").write_text(
        wave_dag_file(f"{plan.migration}.yaml", f"the rehearsal of {plan_path.name}"))
    for dag_file in sorted((ROOT / "dags").glob("mesh_*.py")):
        link = dags / dag_file.name
        if not link.exists():
            link.symlink_to(dag_file)
    log(f"rehearsing {plan_path} ({sum(len(w.services) for w in plan.waves)} services, {len(plan.waves)} waves, "
        f"soaks of {soak_seconds} s) on {topology}")
    with LabProcess(topology, work / "lab") as lab, PrometheusProcess([lab.metrics_target], work / "prometheus") \
            as prom:
        ready_at = time.monotonic() + BEFORE + HISTORY_WINDOW  # the callers' rates before the first wave
        env = {"MESHWAVE_PLANS_DIR": str(plans), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
               "MESHWAVE_REPORT_DIR": str(out / "wave-reports")}
        with AirflowProcess(work / "airflow", _connections(plan, lab, prom.url), env) as airflow:
            log(f"lab, Prometheus {prom.url} and Airflow {airflow.url} up")
            for wave in plan.waves:
                airflow.wait_for_dag(plan.dag_id(wave), timeout=300)
            time.sleep(max(0.0, ready_at - time.monotonic()))
            kubes = {c: MeshKube(config.new_client_from_config(config_file=lab.kubeconfig(c)), c,
                                 root_namespace=cfg.root_namespace) for c, cfg in plan.clusters.items()}
            return rehearse(airflow, kubes, PrometheusSource(prom.url, timeout=60), plan, out, timeout=timeout,
                            title=f"Rehearsal of {plan_path.name} on {topology.name}, soaks of {soak_seconds} s",
                            log=log)


def _connections(plan: Plan, lab: Any, prometheus_url: str) -> dict[str, dict[str, Any]]:
    """The plan's connection ids, pointing at the lab's clusters and the Prometheus that scrapes them (a Prometheus
    connection that several clusters share carries no cluster: the plan asked for one Prometheus for them)."""
    found: dict[str, dict[str, Any]] = {}
    sharing: dict[str, list[str]] = {}
    for name, cfg in plan.clusters.items():
        found[cfg.kubernetes_conn_id] = {"conn_type": "kubernetes", "extra": {"kube_config_path": lab.kubeconfig(name)}}
        sharing.setdefault(cfg.prometheus_conn_id, []).append(name)
    for conn_id, names in sharing.items():
        extra = {"cluster": names[0]} if len(names) == 1 else {}
        found[conn_id] = {"conn_type": "meshwave_prometheus", "host": prometheus_url, "extra": extra}
    return found
