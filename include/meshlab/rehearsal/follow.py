"""The waves of a rehearsal, run as production runs them: the first triggered, the rest on their predecessor's Asset.

A chained wave starts only when its predecessor published (ended within its failure budget with every service
attempted and none held). When the predecessor ended without publishing, the chained wave never starts and the
rehearsal says why from the predecessor's own records, as `publish` decided.
"""

from __future__ import annotations

import time
import urllib.parse
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from meshlab.rehearsal.plan_copy import first_waves
from meshwave.outcomes import ServiceOutcome
from meshwave.plan import Plan, Wave
from meshwave.record import ServiceRecord

DONE = ("success", "failed")
ASSET_GRACE_SECONDS = 120  # a published Asset becomes the next wave's run within the scheduler's next loops


class Airflow(Protocol):
    """What the rehearsal needs of Airflow's REST API (meshstack.process.AirflowProcess)."""

    def api(self, method: str, path: str, body: Any = None) -> Any: ...
    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str: ...
    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]: ...
    def ti_xcom(self, ti: dict[str, Any], key: str = "return_value") -> Any: ...


class WaveRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    wave: str
    dag_id: str
    run_id: str | None = None
    state: str = "not started"  # success, failed, not started, timed out
    started: datetime | None = None
    ended: datetime | None = None
    published: bool = False
    reason: str = ""  # why it did not start, or why it failed
    records: list[ServiceRecord] = []


def follow(airflow: Airflow, plan: Plan, timeout: float, poll: float = 5, log: Any = print) -> list[WaveRun]:
    """Trigger the first waves (unless a run of theirs exists already) and follow every wave to its end."""
    runs: dict[str, str | None] = {}
    for name in first_waves(plan):
        dag_id = plan.dag_id(plan.wave(name))
        runs[name] = _latest_run(airflow, dag_id) or airflow.trigger(dag_id, {"outside_window": True})
        log(f"{dag_id}: run {runs[name]}")
    results: dict[str, WaveRun] = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(plan.waves):
        if time.monotonic() > deadline:  # what ended is reported; the rest is named, not waited for
            for wave in plan.waves:
                if wave.name not in results:
                    run_id = runs.get(wave.name)
                    done = _records(airflow, plan.dag_id(wave), run_id) if run_id else []
                    results[wave.name] = WaveRun(wave=wave.name, dag_id=plan.dag_id(wave), run_id=run_id,
                                                 state="timed out", records=done, reason=f"still running or waiting "
                                                 f"after the rehearsal's {timeout / 60:.0f} min")
                    log(f"{plan.dag_id(wave)}: {results[wave.name].reason}")
            break
        for wave in plan.waves:
            if wave.name not in results:
                _step(airflow, plan, wave, runs, results, log)
        time.sleep(poll)
    return [results[w.name] for w in plan.waves]


def _step(airflow: Airflow, plan: Plan, wave: Wave, runs: dict[str, str | None], results: dict[str, WaveRun],
          log: Any) -> None:
    dag_id = plan.dag_id(wave)
    if wave.name not in runs:  # chained: waits for its predecessor
        before = results.get(wave.after)
        if before is None:
            return
        if not before.published:
            why = (f"wave {before.wave} did not run" if before.run_id is None else
                   f"wave {before.wave} did not publish its Asset: {before.reason or 'see its run'}")
            results[wave.name] = WaveRun(wave=wave.name, dag_id=dag_id, reason=why)
            log(f"{dag_id}: not started: {results[wave.name].reason}")
            return
        run_id = _latest_run(airflow, dag_id)
        if run_id is None:
            if before.ended is not None and time.time() - before.ended.timestamp() > ASSET_GRACE_SECONDS:
                results[wave.name] = WaveRun(wave=wave.name, dag_id=dag_id, reason=f"wave {before.wave} published "
                                             f"but no run started within {ASSET_GRACE_SECONDS} s")
            return
        runs[wave.name] = run_id
        log(f"{dag_id}: run {run_id} (started by wave {before.wave}'s Asset)")
    run_id = runs[wave.name]
    run = airflow.api("GET", f"/dags/{dag_id}/dagRuns/{_quote(run_id)}")
    if run["state"] in DONE:
        results[wave.name] = _ended(airflow, dag_id, wave.name, run)
        log(f"{dag_id}: {run['state']}, {_tally(results[wave.name].records)}"
            + (f": {results[wave.name].reason}" if results[wave.name].reason else ""))


def _ended(airflow: Airflow, dag_id: str, wave: str, run: dict[str, Any]) -> WaveRun:
    tis = airflow.task_instances(dag_id, run["dag_run_id"])
    records = _records(airflow, dag_id, run["dag_run_id"], tis)
    publish = tis.get("publish")  # a wave no other wave follows has none
    published = publish is not None and publish.get("state") == "success"
    reason = _why_not_published(records, run["state"]) if publish is not None and not published else ""
    return WaveRun(wave=wave, dag_id=dag_id, run_id=run["dag_run_id"], state=run["state"],
                   started=run.get("start_date"), ended=run.get("end_date"), published=published, reason=reason,
                   records=records)


def _records(airflow: Airflow, dag_id: str, run_id: str,
             tis: dict[str, dict[str, Any]] | None = None) -> list[ServiceRecord]:
    """The records of the services whose outcome task has ended."""
    tis = airflow.task_instances(dag_id, run_id) if tis is None else tis
    return [ServiceRecord.model_validate(airflow.ti_xcom(ti, key="record")) for _, ti in sorted(tis.items())
            if ti["task_id"].endswith(".outcome") and ti.get("state") in ("success", "failed")]


def _why_not_published(records: list[ServiceRecord], state: str) -> str:
    """`publish`'s own rule, from the records: what kept the next wave waiting."""
    left = [r.service for r in records if not r.outcome.attempted]
    held = [r.service for r in records if r.outcome is ServiceOutcome.HELD]
    failed = [f"{r.service} {r.outcome}" for r in records if r.outcome.against_budget or r.outcome.fails_wave]
    parts = ([f"not attempted: {', '.join(left)}"] if left else []) + ([f"held: {', '.join(held)}"] if held else [])
    parts += [f"over budget or unknown: {', '.join(failed)}"] if failed and state == "failed" else []
    return "; ".join(parts) or f"its run {state}"


def _latest_run(airflow: Airflow, dag_id: str) -> str | None:
    runs = airflow.api("GET", f"/dags/{dag_id}/dagRuns?order_by=-run_after&limit=1")["dag_runs"]
    return runs[0]["dag_run_id"] if runs else None


def _tally(records: list[ServiceRecord]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.outcome)] = counts.get(str(r.outcome), 0) + 1
    return ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "no records"


def _quote(run_id: str) -> str:
    return urllib.parse.quote(run_id, safe="")
