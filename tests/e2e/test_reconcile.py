"""End to end, work a paused wave leaves is not lost: the wave is paused while STRICT is being verified and the
service fails meanwhile; `mesh_reconcile` finds the pending state on the Deployment once it is due and puts the
service back to PERMISSIVE, with the same checks. Unpaused, the wave ends with a record that says what the data
plane does (safety review, issue 13 item 7)."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from meshwave.pending import PENDING_ANNOTATION
from tests.conftest import eventually
from tests.e2e.conftest import Stack
from tests.e2e.test_mtls import assert_records_match_the_data_plane, data_plane

pytestmark = pytest.mark.e2e

WAVE, RECONCILE = "meshwave_e2e_paused_verify", "mesh_reconcile"
NS, WORKLOAD = "paused", "p-api"


def pending(stack: Stack) -> dict | None:
    annotations = stack.k8s()[1].read_namespaced_deployment(WORKLOAD, NS).metadata.annotations or {}
    return json.loads(annotations[PENDING_ANNOTATION]) if PENDING_ANNOTATION in annotations else None


def test_a_wave_paused_during_a_failed_verify_is_put_back_to_permissive_by_mesh_reconcile(stack: Stack) -> None:
    stack.airflow.wait_for_dag(WAVE)
    run_id = stack.airflow.trigger(WAVE)
    eventually(lambda: data_plane(stack, NS, WORKLOAD)["mtls_mode"] == "STRICT", timeout=300, interval=1,
               what="p-api flipped to STRICT")
    stack.airflow.set_paused(WAVE, True)  # while verify_strict waits for its minimum
    try:
        stack.lab.admin("PATCH", f"/services/lab/{NS}/{WORKLOAD}", {"error_rate": 0.5})  # a verify would fail
        left = pending(stack)
        assert left is not None and left["undo"] == "permissive", left
        assert left["state"] == "STRICT, not verified yet" and left["run"] == f"{WAVE}/{run_id}", left

        due = datetime.fromisoformat(left["until"].replace("Z", "+00:00")).timestamp()
        time.sleep(max(0.0, due - time.time()) + 1)
        # the lab cluster only: the e2e plans also name the seed's clusters, whose connections come and go
        reconciled, state = stack.run(RECONCILE, {"clusters": ["lab"]}, timeout=300)
        [record] = stack.records(RECONCILE, reconciled).values()
        assert (state, record["outcome"]) == ("success", "permissive"), record["reason"]
        assert data_plane(stack, NS, WORKLOAD)["mtls_mode"] == "PERMISSIVE"
        assert pending(stack) is None, "the undo done, nothing is left pending"
        assert_records_match_the_data_plane(stack, {WORKLOAD: record})
    finally:
        stack.airflow.set_paused(WAVE, False)
    state = stack.airflow.wait_for_run(WAVE, run_id, timeout=300)
    records = stack.records(WAVE, run_id)
    stack.lab.admin("PATCH", f"/services/lab/{NS}/{WORKLOAD}", {"error_rate": 0.0})
    wave = records[WORKLOAD]
    assert (state, wave["outcome"], wave["mtls"]) == ("failed", "rolled_back", "PERMISSIVE"), wave["reason"]
    assert_records_match_the_data_plane(stack, records)
    assert pending(stack) is None
