"""End to end, part of the replicas first (issue 18 item 3): the wave of tests/e2e/plans/canary.yaml on the lab and a
real Prometheus, run EARLY.

- cn-bad's sidecar fails every request it accepts. Its one-pod canary takes a quarter of the Service's traffic: the
  callers' failures, measured from Prometheus over the canary's soak, are exactly the canary's share (every request to
  the canary's pod, none to the primary's); the canary fails against the primary's live success rate, is removed, and
  cn-bad's pods are never restarted (same pods, same generation, no sidecar): rolled_back, "canary failed".
- cn-good's canary passes: the canary is removed, cn-good is injected and ends STRICT.
Every record's sidecar and mTLS mode are the lab's data plane's.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.e2e.conftest import EARLY, Early, Stack
from tests.e2e.test_mtls import assert_records_match_the_data_plane, pa

pytestmark = pytest.mark.e2e

DAG = "meshwave_e2e_canary_canaries"
NS, BAD, GOOD = "canary", "cn-bad", "cn-good"
FINISHED = ("success", "failed", "skipped", "upstream_failed")
before: dict[str, Any] = {}


def pods(stack: Stack, app: str) -> dict[str, dict[str, Any]]:
    """The pods the Service `app` selects, by name: their uid, owner and containers."""
    core = stack.k8s()[0]
    found = core.list_namespaced_pod(NS, label_selector=f"app={app}").items
    return {p.metadata.name: {"uid": p.metadata.uid, "owner": p.metadata.owner_references[0].name,
                              "containers": [c.name for c in p.spec.containers]} for p in found}


def record_before(stack: Stack) -> None:
    apps = stack.k8s()[1]
    before.update(pods=pods(stack, BAD), generation=apps.read_namespaced_deployment(BAD, NS).metadata.generation,
                  since=time.time())


def gate_event(stack: Stack, run_id: str, service: str, step: str) -> dict[str, Any]:
    ti = stack.airflow.task_instances(DAG, run_id)[f"batch_1.{step}[lab/{NS}/{service}]"]
    found = stack.airflow.ti_xcom(ti, key=step)
    return json.loads(found) if isinstance(found, str) else found


def measure_the_canary(stack: Stack, run_id: str) -> dict[str, Any]:
    """Beside the run, once cn-bad's canary soak has ended: what Prometheus saw over it (asked then, while this
    session's Prometheus runs: test_wave.py stops it later)."""
    deadline = time.monotonic() + 600
    key = f"batch_1.canary_soak[lab/{NS}/{BAD}]"
    while (stack.airflow.task_instances(DAG, run_id).get(key) or {}).get("state") not in FINISHED:
        if time.monotonic() > deadline:
            raise AssertionError(f"{key} did not end")
        time.sleep(2)
    time.sleep(5)  # the last scrapes of the soak's window
    soak = gate_event(stack, run_id, BAD, "canary_soak")
    seconds, at = soak["ended"] - soak["started"], soak["ended"]
    window = f"[{seconds:.0f}s] @ {at:.3f}"
    flags = stack.prometheus.query(f'sum by (response_flags) (increase(istio_requests_total{{reporter="destination", '
                                   f'destination_workload="{BAD}-canary"}}{window}))')
    app_errors = stack.prometheus.query(f'sum(increase(http_requests_total{{namespace="{NS}", app="{BAD}", '
                                        f'code=~"5.."}}{window}))')
    return {"seen": by_workload_and_code(stack, f'reporter="source", source_workload="cn-gw", '
                                                f'destination_service_name="{BAD}"', window),
            "flags": {s["metric"]["response_flags"] for s in flags if float(s["value"][1]) > 0},
            "app_errors": float(app_errors[0]["value"][1]) if app_errors else 0.0}


EARLY[DAG] = Early(DAG, {}, before=record_before, during=measure_the_canary)


def by_workload_and_code(stack: Stack, metric_filter: str, window: str) -> dict[tuple[str, str], float]:
    found = stack.prometheus.query(f"sum by (destination_workload, response_code) (increase(istio_requests_total"
                                   f"{{{metric_filter}}}{window}))")
    return {(s["metric"]["destination_workload"], s["metric"]["response_code"]): float(s["value"][1]) for s in found}


def test_a_failed_canary_costs_only_its_share_and_never_restarts_the_primary(stack: Stack) -> None:
    run_id, state = stack.early_run(DAG, timeout=900)
    records = stack.records(DAG, run_id)
    summary = {w: (r["outcome"], r["mtls"], r["sidecar"], r["reason"]) for w, r in records.items()}
    bad, good = records[BAD], records[GOOD]

    assert (bad["outcome"], bad["sidecar"]) == ("rolled_back", False), summary
    assert bad["reason"].startswith("canary failed: "), summary
    assert bad["reason"].endswith("the canary was removed; canary/cn-bad was not changed or restarted"), summary
    failed = [v for v in bad["verdicts"] if v["stage"] == "canary_soak" and v["outcome"] == "fail"]
    assert [v["check"] for v in failed] == ["canary_success_rate"], bad["verdicts"]
    assert failed[0]["values"]["primary"] >= 0.99 and failed[0]["values"]["success_rate"] == 0.0, failed
    assert [c["action"] for c in bad["changes"] if c["applied"]] == ["create-canary", "delete-canary"], bad["changes"]

    # the primary never restarted: the same pods, its template never changed, no sidecar
    apps = stack.k8s()[1]
    assert apps.read_namespaced_deployment(BAD, NS).metadata.generation == before["generation"]
    assert pods(stack, BAD) == before["pods"], "cn-bad's pods were replaced"
    assert all("istio-proxy" not in p["containers"] for p in before["pods"].values())
    assert not [d.metadata.name for d in apps.list_namespaced_deployment(NS).items
                if d.metadata.name.endswith("-canary")], "a canary was left behind"

    # only the canary's share failed, as the caller's proxy saw it over the canary's soak
    measured = stack.during[DAG].result(timeout=60)
    seen = measured["seen"]
    canary = {code: n for (workload, code), n in seen.items() if workload == f"{BAD}-canary" and n > 0}
    primary = {code: n for (workload, code), n in seen.items() if workload == BAD and n > 0}
    assert set(canary) == {"503"} and set(primary) == {"200"}, seen
    share = canary["503"] / (canary["503"] + primary["200"])
    assert 0.15 < share < 0.35, f"the canary (1 of 4 ready pods) took {share:.2f} of cn-bad's requests: {seen}"
    assert measured["flags"] == {"UF"}, measured  # every one failed by the canary's own proxy
    assert measured["app_errors"] == 0.0, measured  # and no pod's application failed one

    # a canary that passed: removed, then the primary injected and STRICT
    assert (good["outcome"], good["mtls"], good["sidecar"]) == ("strict", "STRICT", True), summary
    assert good["decisions"]["after_canary"].startswith("canary passed: "), good["decisions"]
    assert [c["action"] for c in good["changes"] if c["applied"]][:3] == ["create-canary", "delete-canary",
                                                                          "label-workload"], good["changes"]
    assert pa(stack, NS, f"meshwave-{GOOD}")["spec"]["mtls"]["mode"] == "STRICT"
    now = pods(stack, GOOD)
    assert len(now) == 3 and all(p["owner"].startswith(f"{GOOD}-") and "canary" not in p["owner"] and
                                 "istio-proxy" in p["containers"] for p in now.values()), now
    assert state == "success", summary  # one rollback is within the plan's failure budget (max_failures 3)
    assert_records_match_the_data_plane(stack, records)
