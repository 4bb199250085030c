"""End to end: operating the migration. Maintenance windows, chained waves, the freeze switch and the
ad-hoc `mesh_service` DAG, on the real scheduler, triggerer and dag-processor.

The scenarios use their own namespaces of the lab and run side by side: the module fixture starts them
all (a window that opens a minute from now, two chained plans, an ad-hoc run), the tests follow each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import eventually
from tests.e2e.conftest import Stack
from tests.e2e.test_wave import pa_mode, proxies

pytestmark = pytest.mark.e2e

GOOD_1, GOOD_2 = "meshwave_e2e_chain_good_wave_1", "meshwave_e2e_chain_good_wave_2"
BAD_1, BAD_2 = "meshwave_e2e_chain_bad_wave_1", "meshwave_e2e_chain_bad_wave_2"
WINDOW = "meshwave_e2e_window_main"
PASSED = "meshwave_e2e_window_passed"  # its window closed before the DAG appeared
ADHOC = "mesh_service"
# The window opens 75 s from the fixture's start and lasts 50 s; w-early soaks 45 s and verifies 15 s, so it is
# always in flight when the window closes and w-late (the next batch) always comes after.
WINDOW_OPENS_IN, WINDOW_SECONDS = 75, 50

WINDOW_PLAN = """\
migration: e2e-window
clusters:
  lab: {{kubernetes_conn_id: meshlab_lab, prometheus_conn_id: meshlab_prometheus}}
defaults:
  batch_size: 1
  soak_seconds: 45
  poke_interval_seconds: 3
  query_window_seconds: 15
  verify_seconds: 15
  strict_gate_timeout_seconds: 60
  rollout_timeout_seconds: 60
  breaches_to_fail: 2
  min_requests: 5
  sidecar: {{expected_memory_mi: 40}}
waves:
  - name: main
    window:
      dates: [{{start: "{start}", end: "{end}"}}]
    services:
      - {{cluster: lab, namespace: window, workload: w-early}}
      - {{cluster: lab, namespace: window, workload: w-late}}
  - name: passed
    window:
      dates: [{{start: "{passed_start}", end: "{passed_end}"}}]
    services:
      - {{cluster: lab, namespace: window, workload: w-passed}}
"""


def runs(stack: Stack, dag_id: str) -> list[dict[str, Any]]:
    try:
        return stack.airflow.api("GET", f"/dags/{dag_id}/dagRuns?limit=50")["dag_runs"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # a DAG added at run time, not parsed yet
            return []
        raise


def conf(**given: Any) -> dict[str, Any]:
    return {"cluster": "lab", "namespace": "adhoc", "service": "solo", "action": "migrate", "soak_seconds": 15,
            "dry_run": False, **given}


def refused(stack: Stack, body: dict[str, Any]) -> str:
    """The API's answer to a trigger it refuses (4xx), as text."""
    with pytest.raises(urllib.error.HTTPError) as exc:
        stack.airflow.api("POST", f"/dags/{ADHOC}/dagRuns", {"logical_date": None, "conf": body})
    assert 400 <= exc.value.code < 500, exc.value.code
    return f"{exc.value.code} {exc.value.read().decode()}"


@pytest.fixture(scope="module")
def started(stack: Stack) -> dict[str, Any]:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=WINDOW_OPENS_IN)
    end = start + timedelta(seconds=WINDOW_SECONDS)
    passed = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    stack.add_wave_dags("window", WINDOW_PLAN.format(start=start.isoformat(), end=end.isoformat(),
                                                     passed_start=passed.isoformat(),
                                                     passed_end=(passed + timedelta(hours=1)).isoformat()))
    found: dict[str, Any] = {"window": (start, end)}
    for dag_id in (GOOD_1, BAD_1):
        stack.airflow.wait_for_dag(dag_id)
        found[dag_id] = stack.airflow.trigger(dag_id)
    stack.airflow.wait_for_dag(ADHOC)
    found[ADHOC] = stack.airflow.trigger(ADHOC, conf())
    return found


def finished(stack: Stack, dag_id: str, run_id: str, timeout: float = 420) -> str:
    return stack.airflow.wait_for_run(dag_id, run_id, timeout)


def adhoc_record(stack: Stack, run_id: str) -> dict[str, Any]:
    return stack.airflow.xcom(ADHOC, run_id, "service.outcome", key="record", map_index=0)


def test_a_good_wave_1_starts_wave_2(stack: Stack, started: dict[str, Any]) -> None:
    assert finished(stack, GOOD_1, started[GOOD_1]) == "success"
    assert stack.records(GOOD_1, started[GOOD_1])["good-one"]["outcome"] == "permissive"
    assert stack.airflow.task_instances(GOOD_1, started[GOOD_1])["publish"]["state"] == "success"
    chained = eventually(lambda: runs(stack, GOOD_2), timeout=90, what="wave 2 started by wave 1's Asset")
    assert chained[0]["run_type"] == "asset_triggered"
    assert finished(stack, GOOD_2, chained[0]["dag_run_id"]) == "success"
    assert stack.records(GOOD_2, chained[0]["dag_run_id"])["good-two"]["outcome"] == "permissive"


def test_wave_2_does_not_start_after_wave_1_broke_its_failure_budget(stack: Stack, started: dict[str, Any]) -> None:
    assert finished(stack, BAD_1, started[BAD_1]) == "failed"
    record = stack.records(BAD_1, started[BAD_1])["bad-one"]
    assert record["outcome"] == "rolled_back" and "OOMKilled" in record["reason"]
    assert stack.airflow.task_instances(BAD_1, started[BAD_1])["publish"]["state"] == "upstream_failed"
    # The good chain's wave 2 started within seconds of its wave 1 (the test above): give this one longer.
    ended = datetime.fromisoformat(stack.airflow.api("GET", f"/dags/{BAD_1}/dagRuns/"
                                                     f"{urllib.parse.quote(started[BAD_1], safe='')}")["end_date"])
    time.sleep(max(0.0, 30 - (datetime.now(UTC) - ended).total_seconds()))
    assert runs(stack, BAD_2) == [], "wave 2 must not start after a wave 1 over its failure budget"
    assert not any(proxies(stack, "chain-bad", "bad-two"))


def test_the_window_closes_mid_run_without_leaving_a_service_half_migrated(stack: Stack,
                                                                          started: dict[str, Any]) -> None:
    start, end = started["window"]
    scheduled = eventually(lambda: runs(stack, WINDOW), timeout=WINDOW_OPENS_IN + 90,
                           what="the wave scheduled at its window's start")
    assert scheduled[0]["run_type"] == "scheduled"
    run_id = scheduled[0]["dag_run_id"]
    assert finished(stack, WINDOW, run_id) == "success"
    records = stack.records(WINDOW, run_id)
    # w-early started inside the window and finished after it closed: all the way, never half-way.
    assert records["w-early"]["outcome"] == "strict", records["w-early"]["reason"]
    assert pa_mode(stack, "window", "w-early") == "STRICT" and all(proxies(stack, "window", "w-early"))
    late = records["w-late"]
    assert (late["outcome"], late["changes"]) == ("skipped", [])
    assert late["reason"] == f"not started: the maintenance window closed at {end.isoformat()}"
    assert not any(proxies(stack, "window", "w-late")) and pa_mode(stack, "window", "w-late") is None

    # Outside the window, a manual run is refused before any change unless it says outside_window.
    run_id, state = stack.run(WINDOW, timeout=120)
    assert state == "failed"
    preflight_error = stack.airflow.xcom(WINDOW, run_id, "wave_preflight", key="error")
    assert "outside the maintenance window" in preflight_error and "outside_window = true" in preflight_error
    assert {r["outcome"] for r in stack.records(WINDOW, run_id).values()} == {"skipped"}
    assert not any(proxies(stack, "window", "w-late"))


def test_a_scheduled_run_for_a_window_that_closed_before_the_dag_appeared_is_skipped_not_failed(
        stack: Stack, started: dict[str, Any]) -> None:
    """The scheduler makes a run for a window date already past when the DAG first appears (the first `make demo`
    on a Saturday): nothing is started, and the run says why without showing as a failed DAG."""
    [run] = eventually(lambda: runs(stack, PASSED), timeout=180, what="the run made for the passed window")
    assert run["run_type"] == "scheduled"
    assert finished(stack, PASSED, run["dag_run_id"]) == "success"
    run_id = run["dag_run_id"]
    assert stack.airflow.task_instances(PASSED, run_id)["wave_preflight"]["state"] == "skipped"
    skipped = stack.airflow.xcom(PASSED, run_id, "wave_preflight", key="skipped")
    assert skipped.startswith("a scheduled run that started after its window: outside the maintenance window"), \
        skipped
    with pytest.raises(urllib.error.HTTPError) as none:
        stack.airflow.xcom(PASSED, run_id, "wave_preflight", key="error")
    assert none.value.code == 404, "a skip, not an error"
    record = stack.records(PASSED, run_id)["w-passed"]
    assert (record["outcome"], record["reason"], record["changes"]) == ("skipped", f"not started: {skipped}", [])
    assert stack.airflow.xcom(PASSED, run_id, "report")["skipped"] == skipped
    assert not any(proxies(stack, "window", "w-passed"))


def test_mesh_service_from_the_rest_api(stack: Stack, started: dict[str, Any]) -> None:
    run_id = started[ADHOC]
    assert finished(stack, ADHOC, run_id) == "success"
    record = adhoc_record(stack, run_id)
    assert (record["service"], record["outcome"], record["action"]) == ("lab/adhoc/solo", "strict", "migrate")
    assert pa_mode(stack, "adhoc", "solo") == "STRICT" and all(proxies(stack, "adhoc", "solo"))

    # Refused at the API, before a run exists: names that could break out of a selector or a path.
    before = len(runs(stack, ADHOC))  # other modules of the shared stack run mesh_service too
    for field, bad in (("service", 'x"} or vector(1)'), ("namespace", "../etc")):
        answer = refused(stack, conf(**{field: bad}))
        assert "does not match" in answer and field in answer, answer
    assert len(runs(stack, ADHOC)) == before


def test_mesh_service_honours_the_freeze_and_undoes_from_the_cli(stack: Stack, started: dict[str, Any]) -> None:
    assert finished(stack, ADHOC, started[ADHOC]) == "success"
    stack.settle_early()  # the freeze is global: no other early wave may still be running
    stack.airflow.api("POST", "/variables", {"key": "meshwave_freeze", "value": "INC-4711 payments incident"})
    try:
        run_id, state = stack.run(ADHOC, conf(service="solo-db"), timeout=120)
    finally:
        stack.airflow.api("DELETE", "/variables/meshwave_freeze")
    record = adhoc_record(stack, run_id)
    assert (state, record["outcome"], record["changes"]) == ("success", "skipped", [])
    assert record["reason"] == ("not started: frozen: the Airflow Variable meshwave_freeze is set: INC-4711 "
                                "payments incident")
    assert not any(proxies(stack, "adhoc", "solo-db"))

    # The CLI: a dry run of removing solo's sidecar lists the change and makes none.
    cli = [sys.executable, "-m", "airflow", "dags", "trigger", ADHOC, "-r", "cli-dry-run",
           "-c", json.dumps(conf(action="remove_sidecar", dry_run=True))]
    done = subprocess.run(cli, env=stack.airflow.environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert finished(stack, ADHOC, "cli-dry-run", timeout=120) == "success"
    assert adhoc_record(stack, "cli-dry-run")["outcome"] == "planned"
    assert all(proxies(stack, "adhoc", "solo")) and pa_mode(stack, "adhoc", "solo") == "STRICT"

    run_id, state = stack.run(ADHOC, conf(action="remove_sidecar"), timeout=300)
    record = adhoc_record(stack, run_id)
    assert (state, record["outcome"], record["sidecar"]) == ("success", "removed", False), record["reason"]
    # meshwave's STRICT policy is deleted (none existed before it), not left PERMISSIVE to exempt solo later
    assert not any(proxies(stack, "adhoc", "solo")) and pa_mode(stack, "adhoc", "solo") is None
