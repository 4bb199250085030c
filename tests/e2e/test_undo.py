"""End to end: undo never gives up quietly (issue 13 item 6, safety review finding 9).

Cluster `down`'s API server is unreachable for two minutes, as in a control-plane upgrade, while `mesh_service`
takes d-api back to PERMISSIVE (its team's STRICT policy cuts off a plaintext caller). Its tasks (admit reads the
workload and takes its lease; back_to_permissive writes) fail on a refused connection and are retried with backoff
(an undo's admit as long as the undo steps), not failed for good, and the undo completes once the API server is
back: the record says PERMISSIVE, and so does the lab's data plane. The run is triggered as soon as the stack is up
(EARLY), so its two minutes pass beside the other modules.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest

from tests.e2e.conftest import EARLY, Early, Stack
from tests.e2e.test_mtls import data_plane

pytestmark = pytest.mark.e2e

ADHOC, NAME = "mesh_service", "undo-during-an-api-outage"
CLUSTER, NS, WORKLOAD = "down", "undo", "d-api"
OUTAGE_SECONDS = 120
outage: dict[str, Any] = {}  # set by the EARLY hook: the mode before, the outage's status and end (epoch seconds)


def start_outage(stack: Stack) -> None:
    """Runs once, before the trigger, for the whole session: it records, the test asserts (a failed assertion
    here would fail every module's tests)."""
    mode = data_plane(stack, NS, WORKLOAD, CLUSTER)["mtls_mode"]
    status = stack.lab.outage(CLUSTER, OUTAGE_SECONDS)
    outage.update(mode_before=mode, status=status, ends=time.time() + status["seconds_left"])


EARLY[NAME] = Early(ADHOC, {"cluster": CLUSTER, "namespace": NS, "service": WORKLOAD, "action": "permissive"},
                    before=start_outage)


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_back_to_permissive_outlasts_a_two_minute_api_outage(stack: Stack) -> None:
    run_id, state = stack.early_run(NAME, timeout=900)
    assert outage["mode_before"] == "STRICT" and outage["status"]["down"], outage
    tis: dict[str, Any] = stack.airflow.task_instances(ADHOC, run_id)
    admit = tis[f"service.admit[{CLUSTER}/{NS}/{WORKLOAD}]"]
    back = tis[f"service.back_to_permissive[{CLUSTER}/{NS}/{WORKLOAD}]"]
    [record] = stack.records(ADHOC, run_id).values()
    summary = (state, record["outcome"], record["mtls"], record["reason"], back["try_number"], back["end_date"])
    assert state == "success", summary
    assert (record["outcome"], record["mtls"]) == ("permissive", "PERMISSIVE"), summary
    assert data_plane(stack, NS, WORKLOAD, CLUSTER)["mtls_mode"] == "PERMISSIVE", "the data plane agrees"
    # the first tries met the outage (admit reads the workload and takes its lease) and were retried with backoff,
    # not failed for good; the undo that succeeded ran after it
    assert admit["try_number"] + back["try_number"] > 2, (summary, admit["try_number"])
    assert epoch(back["end_date"]) > outage["ends"], (summary, outage)
    assert not stack.lab.admin("GET", f"/clusters/{CLUSTER}/outage")["down"]
    [change] = [c for c in record["changes"] if c["action"] == "relax-mtls"]
    assert change["applied"] and change["target"] == f"peerauthentication {NS}/team-api", change
    team = stack.k8s(CLUSTER)[2].get_namespaced_custom_object("security.istio.io", "v1", NS, "peerauthentications",
                                                              "team-api")
    assert team["spec"]["mtls"]["mode"] == "PERMISSIVE", "relaxed in place once the API server was back"
