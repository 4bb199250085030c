"""End to end on clusters unlike the default one: the real wave DAGs and the emergency rollback on the lab.

- `rev`: a revision-only Istio install (no default tag: `sidecar.istio.io/inject=true` alone injects nothing),
  a namespace labelled `istio.io/rev`, and pods mutated as real clusters mutate them (Istio's metrics merging
  rewrites `prometheus.io/*`, an admission webhook pins images to digests). Safety review findings 10 and 14.
- `beta`: an Istio older than 1.22, serving PeerAuthentication at `security.istio.io/v1beta1` only (finding 23).
Every caller keeps its success rate (Prometheus history) and every record's mTLS mode is the data plane's.
Both waves run on clusters of their own: they are triggered when the stack is up (EARLY), beside each other.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import EARLY, Early, Stack
from tests.e2e.test_emergency import FAST, trigger, xcom
from tests.e2e.test_mtls import RATIO, assert_callers_kept, assert_records_match_the_data_plane, data_plane

pytestmark = pytest.mark.e2e

REV, BETA = "meshwave_e2e_clusters_rev", "meshwave_e2e_clusters_beta"
CALLER = {REV: ("revns", "r-web"), BETA: ("betans", "b-web")}
before: dict[str, tuple[float, float | None]] = {}  # DAG id -> (when, the caller's success rate then), by the hook


def record_before(dag_id: str):
    """Runs just before the trigger: it records, the test asserts (a failed assertion here would fail every
    module's tests)."""

    def record(stack: Stack) -> None:
        found = stack.prometheus.query(RATIO.format(ns=CALLER[dag_id][0], app=CALLER[dag_id][1]))
        before[dag_id] = (time.time(), float(found[0]["value"][1]) if found else None)

    return record


# last: after test_undo's run, which races its timed API outage
EARLY[REV] = Early(REV, {}, before=record_before(REV), last=True)
EARLY[BETA] = Early(BETA, {}, before=record_before(BETA), last=True)


def early_callers(stack: Stack, dag_id: str) -> tuple[dict[tuple[str, str], float], float, str, str]:
    """The early run, once ended: the caller's rate before it, when it started, its run id and state."""
    run_id, state = stack.early_run(dag_id, timeout=600)
    since, rate = before[dag_id]
    assert rate is not None, f"no success rate for {CALLER[dag_id]} in Prometheus before the run"
    return {CALLER[dag_id]: rate}, since, run_id, state


def test_a_revision_only_cluster_with_mutated_pods_ends_the_wave_right(stack: Stack) -> None:
    """Prometheus scrapes the lab's one endpoint, so the rev cluster's series carry cluster="rev" (its own)."""
    callers, since, run_id, state = early_callers(stack, REV)
    records = stack.records(REV, run_id)
    summary = {w: (r["outcome"], r["mtls"], r["reason"]) for w, r in records.items()}
    assert state == "success", summary
    assert {w: (r["outcome"], r["mtls"]) for w, r in records.items()} == {
        "r-web": ("strict", "STRICT"), "r-api": ("strict", "STRICT")}, summary
    core, apps, _ = stack.k8s("rev")
    assert "istio-injection" not in (core.read_namespace("revns").metadata.labels or {}), "the revision label stays"
    api_labels = apps.read_namespaced_deployment("r-api", "plain").spec.template.metadata.labels
    assert api_labels.get("istio.io/rev") == "1-24" and "sidecar.istio.io/inject" not in api_labels
    for ns, app in (("revns", "r-web"), ("plain", "r-api")):
        for pod in core.list_namespaced_pod(ns, label_selector=f"app={app}").items:
            assert any(c.name == "istio-proxy" for c in pod.spec.containers), pod.metadata.name
            assert pod.metadata.annotations["prometheus.io/port"] == "15020", "Istio's metrics merging"
            assert "@sha256:" in pod.spec.containers[0].image, "the image pinned to a digest"
    assert_records_match_the_data_plane(stack, records)
    assert_callers_kept(stack, callers, since)


def test_a_v1beta1_cluster_runs_a_wave_and_the_emergency_rollback(stack: Stack) -> None:
    callers, since, run_id, state = early_callers(stack, BETA)
    records = stack.records(BETA, run_id)
    record = records["b-web"]
    assert (state, record["outcome"], record["mtls"]) == ("success", "strict", "STRICT"), record["reason"]
    [flip] = [c for c in record["changes"] if c["action"] == "set-mtls"]
    assert flip["request"]["path"] == "/apis/security.istio.io/v1beta1/namespaces/betans/peerauthentications"
    assert stack.airflow.xcom(BETA, run_id, "wave_preflight")["beta"]["peer_authentication_version"] == "v1beta1"
    assert_records_match_the_data_plane(stack, records)

    stack.settle_early()  # the rollback sets the freeze: no other early wave may still be running
    run_id, state = trigger(stack, {"clusters": ["beta"], "dry_run": False, **FAST})
    stage1 = xcom(stack, run_id, "stage_1.stage_1_done")
    assert state == "success" and not stage1["failed_clusters"], stage1
    [relaxed] = [c for c in stage1["changes"] if c["applied"]]
    assert relaxed["target"] == "peerauthentication betans/meshwave-b-web"
    assert relaxed["request"]["path"].startswith("/apis/security.istio.io/v1beta1/")
    assert data_plane(stack, "betans", "b-web", "beta")["mtls_mode"] == "PERMISSIVE"
    assert_callers_kept(stack, callers, since)
