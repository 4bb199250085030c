"""End to end, one writer per workload (issue 14, item 4; finding 18): while a wave migrates ls-api, `mesh_service`
on ls-api is refused at admit naming the wave's run, changes nothing, and the wave goes on; the wave's outcome
releases the lease."""

from __future__ import annotations

import json

import pytest

from tests.conftest import eventually
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

WAVE, ADHOC, NS, NAME = "meshwave_e2e_lease_lease", "mesh_service", "lease", "ls-api"
LEASE = "meshwave.io/lease"


def lease_of(stack: Stack) -> dict | None:
    _, apps, _ = stack.k8s()
    text = (apps.read_namespaced_deployment(NAME, NS).metadata.annotations or {}).get(LEASE)
    return None if text is None else json.loads(text)


def test_mesh_service_on_a_service_a_wave_is_migrating_is_refused_naming_the_run(stack: Stack) -> None:
    stack.airflow.wait_for_dag(WAVE)
    wave_run = stack.airflow.trigger(WAVE, {})
    held = eventually(lambda: lease_of(stack), timeout=180, interval=2)  # the wave's admit took it
    assert held["holder"] == f"{WAVE}/{wave_run}"
    run_id, state = stack.run(ADHOC, {"cluster": "lab", "namespace": NS, "service": NAME, "action": "remove_sidecar"},
                              timeout=600)
    record = stack.records(ADHOC, run_id)[NAME]
    assert state == "failed" and record["outcome"] == "blocked", record  # a red outcome fails mesh_service's run
    assert f"is being changed by {WAVE}/{wave_run}" in record["reason"], record["reason"]
    assert record["changes"] == [], "refused before any change"
    assert stack.airflow.wait_for_run(WAVE, wave_run, 600) == "success"
    wave = stack.records(WAVE, wave_run)[NAME]
    assert wave["outcome"] == "permissive" and wave["sidecar"] is True, wave  # the wave was not disturbed
    assert lease_of(stack) is None, "the wave's outcome released the lease"
