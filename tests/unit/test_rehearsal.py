"""The rehearsal's plan copy (shorter waits, nothing a decision reads changed) and its end state (the data plane
first, every record checked against it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meshlab.rehearsal.end_state import End, end_state
from meshlab.rehearsal.plan_copy import RehearsalError, first_waves, rehearsal_plan
from meshwave.plan import load_plan
from meshwave.propose.models import Workload
from meshwave.record import ServiceRecord
from meshwave.wave import services_of

PLAN = {
    "migration": "rh",
    "clusters": {"a": {"kubernetes_conn_id": "ka", "prometheus_conn_id": "pa"},
                 "b": {"kubernetes_conn_id": "kb", "prometheus_conn_id": "pb"}},
    "defaults": {"soak_seconds": 600, "verify_seconds": 300, "query_window_seconds": 120, "poke_interval_seconds": 30,
                 "breaches_to_fail": 3, "max_failures": 1, "thresholds": {"max_success_drop": 0.01}},
    "waves": [
        {"name": "one", "window": {"cron": "0 2 * * 6", "duration_minutes": 240, "timezone": "Europe/Berlin"},
         "services": [{"cluster": "a", "namespace": "x", "workload": "web", "soak_seconds": 900},
                      {"cluster": "b", "namespace": "y", "workload": "api", "strict": False, "criticality": "low"}]},
        {"name": "two", "after": "one", "services": [{"cluster": "a", "namespace": "x", "workload": "db"}]},
    ],
}


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "rh.yaml"
    path.write_text(yaml.safe_dump(PLAN))
    return path


def test_the_copy_shortens_every_wait_drops_windows_and_keeps_every_decision_input(plan_file: Path) -> None:
    original = load_plan(plan_file)
    plan, text = rehearsal_plan(plan_file, 20)
    assert yaml.safe_load(text)["waves"][0].get("window") is None and plan.waves[0].window is None
    assert plan.waves[1].after == "one" and first_waves(plan) == ["one"]
    for wave, before in zip(plan.waves, original.waves, strict=True):
        for svc, was in zip(wave.services, before.services, strict=True):
            now, then = svc.settings(plan.defaults), was.settings(original.defaults)
            assert (now.soak_seconds, now.verify_seconds, now.query_window_seconds) == (20, 20, 20)
            assert now.poke_interval_seconds * now.breaches_to_fail <= now.query_window_seconds
            assert (now.thresholds, now.breaches_to_fail, now.min_requests, now.sidecar) == \
                (then.thresholds, then.breaches_to_fail, then.min_requests, then.sidecar)
            assert (svc.key, svc.strict, svc.criticality) == (was.key, was.strict, was.criticality)
    assert plan.defaults.max_failures == 1 and plan.migration == "rh"


def test_approvals_are_not_rehearsed(plan_file: Path, tmp_path: Path) -> None:
    """Nobody answers in a rehearsal: the copy asks for no approval (else every batch waits out its timeout and
    ends PERMISSIVE where the plan means STRICT)."""
    data = yaml.safe_load(plan_file.read_text())
    data.setdefault("defaults", {})["approval"] = {"before_strict": "all", "timeout_seconds": 3600}
    data["waves"][0]["approval"] = {"before_strict": ["medium"]}
    asked = tmp_path / "asked.yaml"
    asked.write_text(yaml.safe_dump(data))
    original = load_plan(asked)
    assert [[s.needs_approval for s in services_of(original, w)] for w in original.waves] == [[True, False], [True]]
    plan, text = rehearsal_plan(asked, 20)
    assert "approval" not in text
    assert not any(s.needs_approval for w in plan.waves for s in services_of(plan, w))


def test_a_bad_plan_or_a_too_short_soak_is_refused_naming_it(plan_file: Path, tmp_path: Path) -> None:
    with pytest.raises(RehearsalError, match="--soak-seconds 5: at least 10"):
        rehearsal_plan(plan_file, 5)
    broken = tmp_path / "broken.yaml"
    broken.write_text("migration: rh\nwaves: []\n")
    with pytest.raises(RehearsalError, match=r"plan .*broken.yaml"):
        rehearsal_plan(broken, 20)


def workload(name: str, ns: str = "x", cluster: str = "a", pods: int = 2, sidecars: int = 0,
             mtls: str = "PERMISSIVE", **kw) -> Workload:
    return Workload(cluster=cluster, namespace=ns, name=name, replicas=pods, pods=pods, pods_with_sidecar=sidecars,
                    mtls=mtls, **kw)


def record(key: str, outcome: str, sidecar: bool | None, mtls: str | None, reason: str = "why") -> ServiceRecord:
    return ServiceRecord.model_validate({"service": key, "outcome": outcome, "sidecar": sidecar, "mtls": mtls,
                                         "reason": reason})


def test_the_end_state_is_the_data_plane_s_and_a_record_it_contradicts_is_a_mismatch(plan_file: Path) -> None:
    plan = load_plan(plan_file)
    workloads = [workload("web", sidecars=2, mtls="STRICT"), workload("db", sidecars=0),
                 workload("api", ns="y", cluster="b", sidecars=2), workload("extra"),
                 workload("gw", gateway=True)]
    records = [record("a/x/web", "strict", True, "STRICT"), record("b/y/api", "strict", True, "STRICT")]
    ends = {e.key: e for e in end_state(workloads, plan, records)}
    assert set(ends) == {"a/x/web", "a/x/db", "b/y/api", "a/x/extra"}  # the gateway is no service of the plan
    assert (ends["a/x/web"].end, ends["a/x/web"].mismatch, ends["a/x/web"].wave) == (End.STRICT, "", "one")
    assert ends["b/y/api"].end is End.PERMISSIVE  # what the cluster shows, not what the record claims
    assert "the record says mTLS STRICT" in ends["b/y/api"].mismatch and "PERMISSIVE" in ends["b/y/api"].mismatch
    assert (ends["a/x/db"].end, ends["a/x/db"].mismatch) == (End.NOT_RUN, "")
    assert (ends["a/x/extra"].end, ends["a/x/extra"].wave) == (End.EXCLUDED, None)


def test_records_without_a_sidecar_name_why_and_a_stray_sidecar_is_a_mismatch(plan_file: Path) -> None:
    plan = load_plan(plan_file)
    workloads = [workload("web"), workload("db", sidecars=1), workload("api", ns="y", cluster="b")]
    records = [record("a/x/web", "rolled_back", False, "PERMISSIVE", "soak failed: restarts"),
               record("a/x/db", "rolled_back", False, "PERMISSIVE"),
               record("b/y/api", "blocked", False, None, "preflight: too small")]
    ends = {e.key: e for e in end_state(workloads, plan, records)}
    assert (ends["a/x/web"].end, ends["a/x/web"].mismatch) == (End.ROLLED_BACK, "")
    assert "soak failed: restarts" in ends["a/x/web"].reason
    assert ends["a/x/db"].end is End.PARTIAL and "sidecar False" in ends["a/x/db"].mismatch
    assert (ends["b/y/api"].end, ends["b/y/api"].mismatch) == (End.BLOCKED, "")


def test_a_planned_workload_the_cluster_does_not_have_is_a_failure(plan_file: Path) -> None:
    ends = {e.key: e for e in end_state([workload("web")], load_plan(plan_file), [])}
    assert ends["b/y/api"].end is End.FAILED and ends["b/y/api"].data_plane == "no such Deployment"


def test_the_command_refuses_a_plan_whose_clusters_the_topology_lacks_before_starting_anything(
        plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from meshlab.cli import main

    small = Path(__file__).parents[2] / "include" / "lab" / "small.yaml"  # one cluster, "lab"
    assert main(["rehearse", str(plan_file), "--topology", str(small), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "names clusters the topology" in err and "a, b" in err and "(it has lab)" in err, err
    assert not (tmp_path / "out").exists(), "nothing started, nothing written"
    assert main(["rehearse", str(plan_file), "--topology", str(small), "--soak-seconds", "3"]) == 2
    assert "--soak-seconds 3: at least 10" in capsys.readouterr().err


class FakeAirflow:
    """Airflow's REST API as `follow` reads it: runs per DAG, each with its task instances and records."""

    def __init__(self) -> None:
        self.runs: dict[str, list[dict]] = {}
        self.tis: dict[str, dict[str, dict]] = {}
        self.records: dict[tuple[str, str], dict] = {}
        self.triggered: list[str] = []

    def add_run(self, dag_id: str, state: str, outcomes: dict[str, str], publish: str | None) -> None:
        run_id = f"run-{dag_id}"
        self.runs[dag_id] = [{"dag_run_id": run_id, "state": state, "start_date": "2026-11-29T10:00:00Z",
                              "end_date": "2026-11-29T10:05:00Z" if state in ("success", "failed") else None}]
        tis = {f"batch_1.outcome[{key}]": {"task_id": "batch_1.outcome", "state": "success", "dag_id": dag_id,
                                           "dag_run_id": run_id, "map_index": i, "key": key}
               for i, key in enumerate(outcomes)}
        if publish is not None:
            tis["publish"] = {"task_id": "publish", "state": publish}
        self.tis[run_id] = tis
        for key, outcome in outcomes.items():
            self.records[(run_id, key)] = {"service": key, "outcome": outcome, "reason": f"{outcome} because"}

    def api(self, method: str, path: str, body: object = None) -> dict:
        dag_id = path.split("/")[2]
        if path.endswith("limit=1"):
            return {"dag_runs": self.runs.get(dag_id, [])}
        return next(r for r in self.runs[dag_id] if path.endswith(r["dag_run_id"]))

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        self.triggered.append(dag_id)
        self.add_run(dag_id, "running", {}, None)
        return f"run-{dag_id}"

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        return self.tis[run_id]

    def ti_xcom(self, ti: dict, key: str = "return_value") -> dict:
        return self.records[(ti["dag_run_id"], ti["key"])]


def test_a_wave_over_its_budget_keeps_the_chained_wave_from_starting_and_says_why(plan_file: Path) -> None:
    from meshlab.rehearsal.follow import follow

    plan = load_plan(plan_file)
    airflow = FakeAirflow()
    airflow.add_run(plan.dag_id(plan.waves[0]), "failed", {"a/x/web": "rolled_back", "b/y/api": "held"}, "skipped")
    waves = follow(airflow, plan, timeout=5, poll=0, log=lambda _: None)
    assert airflow.triggered == [], "the first wave's run existed: followed, not triggered again"
    assert (waves[0].state, waves[0].published, len(waves[0].records)) == ("failed", False, 2)
    assert waves[1].run_id is None and waves[1].state == "not started"
    assert "wave one did not publish" in waves[1].reason and "held: b/y/api" in waves[1].reason, waves[1].reason


def test_a_rehearsal_out_of_time_names_the_waves_it_did_not_see_end(plan_file: Path) -> None:
    from meshlab.rehearsal.follow import follow

    plan = load_plan(plan_file)
    airflow = FakeAirflow()
    waves = follow(airflow, plan, timeout=0.2, poll=0.05, log=lambda _: None)
    assert airflow.triggered == [plan.dag_id(plan.waves[0])]
    assert [w.state for w in waves] == ["timed out", "timed out"]
    assert waves[0].run_id == f"run-{plan.dag_id(plan.waves[0])}" and waves[1].run_id is None
    assert "still running or waiting" in waves[0].reason


class FakeRange:
    """Prometheus' answers for one edge whose counter is scraped every 2 s, delivering `rates[i]` requests per second
    over the i-th 10 s from `origin`; a sample in `late` reaches Prometheus that many seconds after it was counted
    (it carries the time it was counted at, as the lab's do)."""

    LABELS = {"client": "web", "client_service_namespace": "x", "client_k8s_cluster_name": "a",
              "server": "db", "server_service_namespace": "x", "server_k8s_cluster_name": "a"}

    def __init__(self, rates: list[float], origin: float = 900.0, late: dict[float, float] | None = None) -> None:
        self.samples, total, t = [], 0.0, origin
        for rate in rates:
            for _ in range(5):
                t += 2
                total += 2 * rate
                self.samples.append((t, total))
        self.late = late or {}

    def range(self, query: str, start: float, end: float, step: float) -> list:
        from meshlab.rehearsal.history import OK_SAMPLED_AT
        from meshwave.prometheus import Series

        points = []
        for k in range(int((end - round(start)) // step) + 1):
            at = round(start) + k * step
            taken = [(ts, v) for ts, v in self.samples if ts + self.late.get(ts, 0) <= at]  # stamped when counted
            if taken:
                points.append((at, taken[-1][0] if query == OK_SAMPLED_AT else taken[-1][1]))
        return [Series(dict(self.LABELS), points)]


def test_a_late_scrape_is_no_loss_and_a_cut_off_is(plan_file: Path) -> None:
    """Rates are read between real samples: a scrape taken 6 s late (a loaded lab) changes nothing, while 20 s of
    nothing delivered is a loss, named with how long the rate stayed under the floor."""
    from meshlab.rehearsal.history import check_history

    plan = load_plan(plan_file)
    start, end = 1060.0, 1200.0  # the first wave starts at 1060; 60 s before it, from 1000
    late = check_history(FakeRange([5.0] * 30, late={1090.0 + d: 14.0 for d in (2, 4, 6, 8, 10)}), plan, start, end)
    assert late.lost == [] and late.checks[0].lowest == pytest.approx(1.0), late.checks
    cut = check_history(FakeRange([5.0] * 19 + [0.0, 0.0] + [5.0] * 9), plan, start, end)
    assert [str(c.edge) for c in cut.lost] == ["a/x/web -> a/x/db"]
    assert cut.lost[0].lowest < 0.5 and cut.lost[0].seconds_below >= 30, cut.lost[0]
    with pytest.raises(ValueError, match="at least 2 steps"):
        check_history(FakeRange([5.0] * 30), plan, start, end, window=15, step=10)


def test_a_long_history_is_read_in_chunks_on_one_grid_and_judged_as_one(plan_file: Path) -> None:
    """78 minutes of the seed in one range query outlasted Prometheus' query timeout: the history is read 10 minutes
    at a time, each chunk starting one step after the last, and a cut-off inside the second chunk is still found."""
    from meshlab.rehearsal.history import CHUNK_SECONDS, OK_COUNT, check_history

    calls: list[tuple[float, float]] = []

    class Recording(FakeRange):
        def range(self, query: str, start: float, end: float, step: float) -> list:
            if query == OK_COUNT:
                calls.append((start, end))
            return super().range(query, start, end, step)

    plan = load_plan(plan_file)
    rates = [5.0] * 100 + [0.0, 0.0] + [5.0] * 60  # 27 minutes; nothing delivered 16:40-17:00 after 900
    history = check_history(Recording(rates), plan, 1060.0, 900.0 + 10 * len(rates))
    assert len(calls) == 3 and all(end - start <= CHUNK_SECONDS for start, end in calls), calls
    assert all(b[0] == a[1] + 2.0 for a, b in zip(calls, calls[1:], strict=False)), "contiguous, no overlap"
    [lost] = history.lost
    assert lost.lowest < 0.5 and lost.seconds_below >= 30, lost


def test_a_wave_after_one_that_never_ran_says_so_without_repeating_the_chain(tmp_path: Path) -> None:
    from meshlab.rehearsal.follow import follow

    three = {**PLAN, "waves": [*PLAN["waves"], {"name": "three", "after": "two",
                                                 "services": [{"cluster": "a", "namespace": "x", "workload": "q"}]}]}
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(three))
    plan = load_plan(path)
    airflow = FakeAirflow()
    airflow.add_run(plan.dag_id(plan.waves[0]), "failed", {"a/x/web": "failed"}, "upstream_failed")
    waves = follow(airflow, plan, timeout=5, poll=0, log=lambda _: None)
    assert waves[1].reason.startswith("wave one did not publish its Asset: over budget or unknown: a/x/web failed")
    assert waves[2].reason == "wave two did not run"
