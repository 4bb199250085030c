"""End to end: removing a sidecar whose workload calls STRICT services (issue 14 item 1; safety review finding 4),
through the real `mesh_service remove_sidecar` on the lab and a real Prometheus.

Namespace `outbound` runs sidecars from the start. o-front (traffic from outside) calls o-web1 and o-web2; o-web1
calls o-api, STRICT by meshwave's own policy (meshwave-o-api, as a wave writes it); o-web2 calls o-db, STRICT by its
team's policy (team-o-db). Without its sidecar a caller's calls leave in plaintext and a STRICT proxy resets them.

- o-web1: the destination meshwave made STRICT is relaxed first, then the sidecar goes; the outcome `removed`.
- o-web2: refused, naming the team's policy; the sidecar stays, PERMISSIVE; the team's policy untouched.
Both runs are triggered when the stack is up (EARLY, after the other entries); nobody loses traffic meanwhile:
o-front, o-web1 and o-web2 stay at their baseline minus 0.02 (Prometheus history), and the records match the lab's
data plane.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from meshwave.kube import INJECT_LABEL
from tests.e2e.conftest import EARLY, Early, Stack
from tests.e2e.test_mtls import RATIO, assert_callers_kept, assert_records_match_the_data_plane, data_plane, pa
from tests.e2e.test_wave import proxies

pytestmark = pytest.mark.e2e

ADHOC, NS = "mesh_service", "outbound"
OURS, TEAMS = "remove-sidecar-calling-meshwave-strict", "remove-sidecar-calling-team-strict"
CALLERS = ("o-front", "o-web1", "o-web2")
before: dict[str, Any] = {}  # set by the EARLY hook: when, each caller's success rate, the data plane


def record_before(stack: Stack) -> None:
    """Runs once, before the first trigger: it records, the test asserts (a failed assertion here would fail every
    module's tests)."""
    before["since"] = time.time()
    for app in CALLERS:
        found = stack.prometheus.query(RATIO.format(ns=NS, app=app))
        before[app] = float(found[0]["value"][1]) if found else None
    for workload in ("o-web1", "o-web2", "o-api", "o-db"):
        before[workload + " data plane"] = data_plane(stack, NS, workload)


def conf(service: str) -> dict[str, str]:
    return {"cluster": "lab", "namespace": NS, "service": service, "action": "remove_sidecar"}


EARLY[OURS] = Early(ADHOC, conf("o-web1"), before=record_before, last=True)
EARLY[TEAMS] = Early(ADHOC, conf("o-web2"), last=True)


def test_remove_sidecar_relaxes_meshwave_s_strict_destination_and_refuses_a_team_s(stack: Stack) -> None:
    ours_run, ours_state = stack.early_run(OURS, timeout=1200)  # may queue behind test_undo's run (its outage)
    teams_run, teams_state = stack.early_run(TEAMS, timeout=600)
    baselines = {app: before[app] for app in CALLERS}
    assert all(b is not None and b > 0.9 for b in baselines.values()), baselines
    for workload, mode in (("o-web1", "PERMISSIVE"), ("o-web2", "PERMISSIVE"), ("o-api", "STRICT"),
                           ("o-db", "STRICT")):
        seen = before[workload + " data plane"]
        assert (seen["sidecar_fraction"], seen["mtls_mode"]) == (1.0, mode), (workload, seen)

    # o-web1 -> o-api, STRICT by meshwave's own policy: relaxed first, then the sidecar removed
    [ours] = stack.records(ADHOC, ours_run).values()
    summary = (ours_state, ours["outcome"], ours["mtls"], ours["reason"])
    assert (ours_state, ours["outcome"], ours["mtls"], ours["sidecar"]) == ("success", "removed", "PERMISSIVE",
                                                                            False), summary
    assert "after the removal: its own success rate " in ours["reason"] and "WORSE" not in ours["reason"], summary
    applied = [(c["action"], c["target"]) for c in ours["changes"] if c["applied"]]
    relax = ("delete-mtls", f"peerauthentication {NS}/meshwave-o-api")
    remove = ("remove-injection", f"deployment {NS}/o-web1")
    assert relax in applied and remove in applied and applied.index(relax) < applied.index(remove), applied
    tis = stack.airflow.task_instances(ADHOC, ours_run)
    check = stack.airflow.ti_xcom(tis[f"service.rollback_injection[lab/{NS}/o-web1]"], "rollback_injection")["outbound"]
    assert [(d["destination"]["workload"], d["verdict"]) for d in check["destinations"]] == [("o-api", "relax")], check
    assert pa(stack, NS, "meshwave-o-api") is None
    seen = data_plane(stack, NS, "o-api")
    assert (seen["sidecar_fraction"], seen["mtls_mode"]) == (1.0, "PERMISSIVE"), seen
    assert not any(proxies(stack, NS, "o-web1"))
    assert_records_match_the_data_plane(stack, {"o-web1": ours})

    # o-web2 -> o-db, STRICT by its team's policy: refused naming it; the sidecar stays, PERMISSIVE
    [teams] = stack.records(ADHOC, teams_run).values()
    summary = (teams_state, teams["outcome"], teams["mtls"], teams["reason"])
    assert (teams_state, teams["outcome"]) == ("failed", "failed"), summary
    assert f"sidecar of {NS}/o-web2 NOT removed: without it, its calls to lab/{NS}/o-db: STRICT by a policy " \
           f"meshwave does not own (all ports: peerauthentication {NS}/team-o-db (workload, STRICT; not meshwave's))" \
           in teams["reason"], summary
    assert "LEFT: the sidecar stays, mTLS PERMISSIVE" in teams["reason"], summary
    assert not [c for c in teams["changes"] if c["applied"] and (c["action"] == "remove-injection" or
                                                                  c["target"].endswith("/team-o-db"))], teams
    team = pa(stack, NS, "team-o-db")
    assert team is not None and team["spec"]["mtls"]["mode"] == "STRICT", "nobody else's policy is touched"
    _, apps, _ = stack.k8s()
    template = apps.read_namespaced_deployment("o-web2", NS).spec.template.metadata
    assert (template.labels or {}).get(INJECT_LABEL) != "false", template.labels
    assert proxies(stack, NS, "o-web2") and all(proxies(stack, NS, "o-web2"))
    seen = data_plane(stack, NS, "o-web2")
    assert (seen["sidecar_fraction"], seen["mtls_mode"]) == (1.0, "PERMISSIVE"), seen
    assert data_plane(stack, NS, "o-db")["mtls_mode"] == "STRICT"

    # nobody lost traffic: the two removed services' own success rates (what o-front and their outside callers get)
    assert_callers_kept(stack, {(NS, app): baseline for app, baseline in baselines.items()}, before["since"])
