"""End to end: a real scheduler and triggerer run the wave DAGs against the lab and a real Prometheus.

The tests share one stack and run in order; the last one stops Prometheus.
"""

from __future__ import annotations

import html
import json
import re
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest

from meshwave.group_state import CANARY_TASKS, TASKS
from meshwave.lease import LEASE_ANNOTATION
from tests.conftest import eventually
from tests.e2e.conftest import EARLY, Early, Stack

pytestmark = pytest.mark.e2e

SHOP, BREAKER, HOLD = "meshwave_e2e_shop_main", "meshwave_e2e_breaker_main", "meshwave_e2e_hold_main"
HEALTHY = ("frontend", "cart", "catalog", "pricing", "inventory")
SUCCESS = ('sum(rate(http_requests_total{{namespace="{ns}", app="{app}", code!~"5.."}}[15s])) / '
           'sum(rate(http_requests_total{{namespace="{ns}", app="{app}"}}[15s]))')


def pa_mode(stack: Stack, ns: str, workload: str) -> str | None:
    custom = stack.k8s()[2]
    items = custom.list_namespaced_custom_object("security.istio.io", "v1", ns, "peerauthentications")["items"]
    found = [p for p in items if p["metadata"]["name"] == f"meshwave-{workload}"]
    return found[0]["spec"]["mtls"]["mode"] if found else None


def proxies(stack: Stack, ns: str, workload: str) -> list[bool]:
    pods = stack.k8s()[0].list_namespaced_pod(ns, label_selector=f"app={workload}").items
    return [any(c.name == "istio-proxy" for c in p.spec.containers) for p in pods]


def success(stack: Stack, ns: str, app: str) -> float | None:
    result = stack.prometheus.query(SUCCESS.format(ns=ns, app=app))
    return float(result[0]["value"][1]) if result else None


def page_wave(stack: Stack, dag_id: str) -> dict[str, Any]:
    """A wave as the migration page's JSON shows it (GET /meshwave/api/fleet)."""
    req = urllib.request.Request(f"{stack.airflow.url}/meshwave/api/fleet",
                                 headers={"Authorization": f"Bearer {stack.airflow.token()}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        fleet = json.loads(resp.read())
    return next(w for w in fleet["waves"] if w["dag_id"] == dag_id)


def patch_template(stack: Stack, ns: str, name: str, labels: dict | None = None, annotations: dict | None = None):
    meta = {k: v for k, v in (("labels", labels), ("annotations", annotations)) if v}
    stack.k8s()[1].patch_namespaced_deployment(name, ns, {"spec": {"template": {"metadata": meta}}})


# A run that only ends and is looked at, in a namespace of its own: triggered when the stack is up, beside the rest
EARLY[BREAKER] = Early(BREAKER, {}, last=True)


def test_circuit_breaker_stops_the_wave_after_two_rollbacks(stack: Stack) -> None:
    run_id, state = stack.early_run(BREAKER, timeout=600)
    records = stack.records(BREAKER, run_id)
    assert {w: r["outcome"] for w, r in records.items()} == {
        "alpha": "rolled_back", "beta": "rolled_back", "gamma": "skipped", "web": "skipped"}
    assert "OOMKilled" in records["alpha"]["reason"]
    assert state == "failed", "a wave over its failure budget fails its run"
    assert not any(proxies(stack, "breaker", "gamma")), "the skipped services were not touched"

    # One message per event and target, each with the service (or wave), the reason and the run's link.
    mails = {m.subject: m.body for m in stack.notified.mails if "e2e_breaker" in m.body}
    dag = "meshwave_e2e_breaker_main"
    assert sorted(mails) == sorted([
        "meshwave: lab/breaker/alpha ROLLED_BACK", "meshwave: lab/breaker/beta ROLLED_BACK",
        f"meshwave: {dag}: circuit breaker TRIPPED", f"meshwave: {dag}: wave FAILED"]), sorted(mails)
    link = f"/dags/{dag}/runs/{urllib.parse.quote(run_id, safe='')}"
    assert all(link in body for body in mails.values()), mails
    assert f"why: {records['alpha']['reason']}" in html.unescape(mails["meshwave: lab/breaker/alpha ROLLED_BACK"])
    assert "circuit breaker: 2 rollbacks/failures" in mails[f"meshwave: {dag}: circuit breaker TRIPPED"]
    chats = [t for t in stack.notified.texts() if dag in t or "lab/breaker/" in t]
    assert sorted(t.splitlines()[0] for t in chats) == sorted(mails), chats


def test_main_wave(stack: Stack) -> None:
    # reporting (not in the wave) calls reviews; it gets its sidecar first, so it is an mTLS caller.
    patch_template(stack, "shop", "reporting", labels={"sidecar.istio.io/inject": "true"})
    eventually(lambda: proxies(stack, "shop", "reporting") == [True, True], timeout=60, what="reporting injected")

    stack.airflow.wait_for_dag(SHOP)
    run_id = stack.airflow.trigger(SHOP)
    # Fault: once reviews is STRICT, reporting starts bypassing its sidecar for port 8080 (plaintext).
    eventually(lambda: pa_mode(stack, "shop", "reviews") == "STRICT", timeout=600, interval=1,
               what="reviews flipped to STRICT")
    midway = page_wave(stack, SHOP)  # the migration page while the wave is under way
    patch_template(stack, "shop", "reporting",
                   annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "8080"})
    threshold = 1 - 0.02
    breach_seen = eventually(lambda: (s := success(stack, "shop", "reporting")) is not None and s < threshold
                             and time.monotonic(), timeout=120, interval=0.5, what="the breach in Prometheus")
    # meshwave created reviews' policy (none existed before it): undoing STRICT deletes it
    permissive = eventually(lambda: pa_mode(stack, "shop", "reviews") is None and time.monotonic(),
                            timeout=120, interval=0.5, what="reviews back to PERMISSIVE (its policy deleted)")
    # How fast is measured by `make bench`, not asserted here (a loaded CI machine is not a benchmark).
    print(f"breach visible in Prometheus -> PERMISSIVE applied: {permissive - breach_seen:.1f}s")
    eventually(lambda: success(stack, "shop", "reporting") == 1.0, timeout=90, what="reporting recovered")

    state = stack.airflow.wait_for_run(SHOP, run_id, timeout=900)
    records = stack.records(SHOP, run_id)
    summary = {w: (r["outcome"], r["reason"]) for w, r in records.items()}
    print(summary)
    for workload in HEALTHY:
        assert records[workload]["outcome"] == "strict", summary[workload]
        assert pa_mode(stack, "shop", workload) == "STRICT"
        assert all(proxies(stack, "shop", workload))
    assert success(stack, "shop", "frontend") == 1.0, "the application success rate is unchanged"

    assert records["payment"]["outcome"] == "rolled_back" and "OOMKilled" in records["payment"]["reason"]
    assert proxies(stack, "shop", "payment") == [False, False] and pa_mode(stack, "shop", "payment") is None

    assert records["ledger"]["outcome"] == "permissive"
    assert any("unknown" in c for c in records["ledger"]["plaintext_callers"]), records["ledger"]
    assert pa_mode(stack, "shop", "ledger") is None, "never STRICT"

    assert records["reviews"]["outcome"] == "rolled_back" and records["reviews"]["mtls"] == "PERMISSIVE"
    assert "caller_success_rate[shop/reporting]" in records["reviews"]["reason"]
    assert state == "success", "two rollbacks stay within max_failures 3"

    # The migration page mid-wave: this run, services still under way named with the group task they were in, and
    # every service it already showed an outcome for showing the outcome the run ended with.
    assert midway["run_id"] == run_id, midway
    under_way = [r for r in midway["services"] if r["state"] == "in progress"]
    assert under_way and all(r["step"].split(" ")[0] in (*TASKS, "outcome") for r in under_way), midway
    for row in midway["services"]:
        if row["state"] not in ("in progress", "not started"):
            assert row["state"] == records[row["workload"]]["outcome"], row

    # The soak's log says what each poll saw while it was deferred (the triggerer's lines), not only its end.
    soaks = [ti for ti in stack.airflow.task_instances(SHOP, run_id).values()
             if ti["task_id"].endswith(".soak") and ti["state"] == "success"]
    log = stack.airflow.task_log(soaks[0])
    # the first poll comes a few seconds into the soak: the trigger starts after the task deferred
    assert re.search(r"soak poll 1 \(\d+ of \d+ s soaked\): ", log) and "soak poll 2 (" in log, log[-2000:]
    assert "app_success_rate pass: " in log, log[-2000:]


def deployment_state(apps: Any) -> tuple[Any, Any, dict]:
    """pricing's Deployment as a re-run could change it: its pod template (generation), its spec, and every
    annotation but the lease, which each run takes and releases (bookkeeping, not a change to the workload)."""
    d = apps.read_namespaced_deployment("pricing", "shop")
    notes = {k: v for k, v in (d.metadata.annotations or {}).items() if k != LEASE_ANNOTATION}
    return d.metadata.generation, d.spec.to_dict(), notes


def test_clearing_a_finished_group_changes_nothing_more(stack: Stack) -> None:
    runs = stack.airflow.api("GET", f"/dags/{SHOP}/dagRuns?order_by=-start_date&limit=1")["dag_runs"]
    run_id = runs[0]["dag_run_id"]
    apps, custom = stack.k8s()[1], stack.k8s()[2]
    before = (deployment_state(apps), custom.get_namespaced_custom_object(
        "security.istio.io", "v1", "shop", "peerauthentications", "meshwave-pricing")["metadata"]["resourceVersion"])
    tis = stack.airflow.task_instances(SHOP, run_id)
    # pricing's map index of the batch group: every task instance of that index, cleared
    [index] = {ti["map_index"] for key, ti in tis.items() if key.endswith("[lab/shop/pricing]")}
    tasks = sorted({(ti["task_id"], index) for ti in tis.values() if ti["map_index"] == index})
    assert {t for t, _ in tasks} >= {f"batch_1.{task}" for task in TASKS if task not in CANARY_TASKS}, tasks
    stack.airflow.api("POST", f"/dags/{SHOP}/clearTaskInstances", {
        "dag_run_id": run_id, "task_ids": tasks, "dry_run": False, "only_failed": False, "reset_dag_runs": True})
    time.sleep(5)
    assert stack.airflow.wait_for_run(SHOP, run_id, timeout=600) == "success"
    record = stack.records(SHOP, run_id)["pricing"]
    assert record["outcome"] == "strict"
    assert [c for c in record["changes"] if c["applied"]] == [], "nothing applied the second time"
    after = (deployment_state(apps), custom.get_namespaced_custom_object(
        "security.istio.io", "v1", "shop", "peerauthentications", "meshwave-pricing")["metadata"]["resourceVersion"])
    assert after == before


def test_a_mesh_wide_strict_policy_stops_the_wave_before_any_change(stack: Stack) -> None:
    custom = stack.k8s()[2]
    custom.create_namespaced_custom_object("security.istio.io", "v1", "istio-system", "peerauthentications", {
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}})
    try:
        run_id, state = stack.run(HOLD, timeout=300)
    finally:
        custom.delete_namespaced_custom_object("security.istio.io", "v1", "istio-system", "peerauthentications",
                                               "default")
    record = stack.records(HOLD, run_id)["store"]
    assert state == "failed" and record["outcome"] == "skipped", record
    assert "peerauthentication istio-system/default (mesh-wide, STRICT; not meshwave's) is STRICT" in record["reason"]
    assert not any(proxies(stack, "hold", "store"))


def test_dry_run_logs_the_changes_and_applies_none(stack: Stack) -> None:
    apps = stack.k8s()[1]
    before = apps.read_namespaced_deployment("store", "hold").metadata.resource_version
    run_id, state = stack.run(HOLD, conf={"dry_run": True}, timeout=600)
    record = stack.records(HOLD, run_id)["store"]
    assert state == "success" and record["outcome"] == "planned", record
    planned = [c for c in record["changes"] if c["dry_run"]]
    assert planned and not any(c["applied"] for c in record["changes"])
    assert any("sidecar.istio.io/inject" in str(c["request"]) for c in planned), planned
    assert apps.read_namespaced_deployment("store", "hold").metadata.resource_version == before
    assert pa_mode(stack, "hold", "store") is None


def test_prometheus_down_during_the_soak_holds_and_never_flips(stack: Stack) -> None:
    stack.airflow.wait_for_dag(HOLD)
    run_id = stack.airflow.trigger(HOLD)

    def soaking() -> bool:
        tis = stack.airflow.task_instances(HOLD, run_id).values()
        return any(ti["task_id"] == "batch_1.soak" and ti["state"] == "deferred" for ti in tis)

    eventually(soaking, timeout=300, interval=1, what="the soak deferred")
    stack.prometheus.stop()
    # judged blind is not green (safety review finding 7): held, red, and the wave's report fails
    assert stack.airflow.wait_for_run(HOLD, run_id, timeout=600) == "failed"
    record = stack.records(HOLD, run_id)["store"]
    assert record["outcome"] == "held", record
    assert "error" in record["reason"] and "hold" in record["reason"]
    assert pa_mode(stack, "hold", "store") is None, "no STRICT flip while Prometheus is down"


def test_a_wave_does_not_start_while_prometheus_is_down(stack: Stack) -> None:
    """After the test above: Prometheus is still stopped. No service is injected without a baseline."""
    run_id, state = stack.run(HOLD, timeout=300)
    record = stack.records(HOLD, run_id)["store"]
    assert state == "failed" and record["outcome"] == "skipped" and record["changes"] == [], record
    assert "Prometheus does not answer" in record["reason"], record["reason"]
