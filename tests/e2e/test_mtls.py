"""End to end, the mesh as Istio sees it: the real wave DAGs and mesh_service on the lab and a real Prometheus
(safety review findings 2 and 3).

- A namespace-wide STRICT set before meshwave: the service with a plaintext caller is blocked at preflight (the
  policy named), the one whose callers all have a sidecar ends STRICT, proven by a plaintext probe.
- A team's older workload policy: the flip is refused naming it; a team's STRICT policy is relaxed in place by
  "back to PERMISSIVE".
In every scenario each caller's success rate stays at or above its baseline minus 0.02 for the whole run (from
Prometheus' history), and every record's mTLS mode is the lab's data plane's.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import eventually
from tests.e2e.conftest import EARLY, Early, Stack
from tests.e2e.test_wave import patch_template, proxies

pytestmark = pytest.mark.e2e

LOCKED, TEAMS, ADHOC = "meshwave_e2e_mtls_locked", "meshwave_e2e_mtls_teams", "mesh_service"
RATIO = ('sum(rate(http_requests_total{{namespace="{ns}", app="{app}", code!~"5.."}}[15s])) / '
         'sum(rate(http_requests_total{{namespace="{ns}", app="{app}"}}[15s]))')


def lowest_since(stack: Stack, ns: str, app: str, since: float) -> float:
    """The lowest success rate of a caller since `since` (Prometheus history, 2 s resolution)."""
    seconds = int(time.time() - since) + 1
    found = stack.prometheus.query(f"min_over_time(({RATIO.format(ns=ns, app=app)})[{seconds}s:2s])")
    assert found, f"no success rate history for {ns}/{app}"
    return float(found[0]["value"][1])


def assert_callers_kept(stack: Stack, callers: dict[tuple[str, str], float], since: float) -> None:
    for (ns, app), baseline in callers.items():
        lowest = lowest_since(stack, ns, app, since)
        assert lowest >= baseline - 0.02, f"caller {ns}/{app} fell to {lowest} (baseline {baseline})"


def data_plane(stack: Stack, ns: str, workload: str, cluster: str = "lab") -> dict[str, Any]:
    """What the lab's simulated proxies do for a workload: its sidecar share and the mode they enforce."""
    return stack.lab.admin("GET", f"/services/{cluster}/{ns}/{workload}")


def assert_records_match_the_data_plane(stack: Stack, records: dict[str, dict[str, Any]]) -> None:
    for workload, record in records.items():
        seen = data_plane(stack, record["namespace"], workload, record["cluster"])
        if record["sidecar"]:
            assert seen["sidecar_fraction"] == 1.0, (workload, seen)
            assert (record["mtls"] or "").split(",")[0] == seen["mtls_mode"], (workload, record["mtls"], seen)
        elif record["sidecar"] is False:
            assert seen["sidecar_fraction"] == 0.0, (workload, seen)


def pa(stack: Stack, ns: str, name: str) -> dict[str, Any] | None:
    items = stack.k8s()[2].list_namespaced_custom_object("security.istio.io", "v1", ns, "peerauthentications")
    return next((p for p in items["items"] if p["metadata"]["name"] == name), None)


# Both waves only end and are looked at, in namespaces of their own: triggered when the stack is up (EARLY), beside
# the other modules' runs. The hooks run just before each trigger; they record, the tests assert (a failed assertion
# in a hook would fail every module's tests).
before: dict[str, dict[str, Any]] = {}  # DAG id -> "since" (the trigger's time), each caller's rate then, ...
LOCKED_CALLERS, TEAMS_CALLERS = (("cronjobs", "l-cron"), ("locked", "l-web")), (("teams", "t-web"),)


def rates(stack: Stack, callers: tuple[tuple[str, str], ...]) -> dict[tuple[str, str], float | None]:
    found = {caller: stack.prometheus.query(RATIO.format(ns=caller[0], app=caller[1])) for caller in callers}
    return {caller: float(result[0]["value"][1]) if result else None for caller, result in found.items()}


def before_locked(stack: Stack) -> None:
    before[LOCKED] = {"rates": rates(stack, LOCKED_CALLERS), "since": time.time()}


def before_teams(stack: Stack) -> None:
    # t-web calls t-auth and t-pay; with a sidecar of its own it speaks mTLS to them once they have theirs.
    patch_template(stack, "teams", "t-web", labels={"sidecar.istio.io/inject": "true"})
    deadline = time.monotonic() + 60
    while not (injected := proxies(stack, "teams", "t-web") == [True, True]) and time.monotonic() < deadline:
        time.sleep(0.5)
    before[TEAMS] = {"t-web injected": injected, "rates": rates(stack, TEAMS_CALLERS), "since": time.time()}


EARLY[LOCKED] = Early(LOCKED, {}, before=before_locked, last=True)
EARLY[TEAMS] = Early(TEAMS, {}, before=before_teams, last=True)


def early_callers(dag_id: str) -> tuple[dict[tuple[str, str], float], float]:
    """The callers' success rates just before the early run's trigger, and when that was."""
    seen = before[dag_id]
    missing = [caller for caller, rate in seen["rates"].items() if rate is None]
    assert not missing, f"no success rate in Prometheus before the run for {missing}"
    return seen["rates"], seen["since"]


def test_namespace_wide_strict_blocks_the_service_a_plaintext_caller_needs(stack: Stack) -> None:
    callers, since = early_callers(LOCKED)
    run_id, state = stack.early_run(LOCKED, timeout=600)
    records = stack.records(LOCKED, run_id)
    summary = {w: (r["outcome"], r["mtls"], r["reason"]) for w, r in records.items()}
    assert state == "success", summary
    api = records["l-api"]
    assert api["outcome"] == "blocked" and api["changes"] == [], summary
    assert "peerauthentication locked/default (namespace-wide, STRICT; not meshwave's)" in api["reason"], summary
    assert "come from callers without a sidecar: injection would cut them off" in api["reason"], summary
    assert not any(proxies(stack, "locked", "l-api"))
    web = records["l-web"]
    assert (web["outcome"], web["mtls"]) == ("strict", "STRICT"), summary
    assert pa(stack, "locked", "meshwave-l-web") is None, "STRICT by the namespace's policy: nothing written"
    preflight = stack.airflow.xcom(LOCKED, run_id, "wave_preflight")
    assert list(preflight["lab"]["namespace_wide_strict"]) == ["locked"]
    assert_records_match_the_data_plane(stack, records)
    assert_callers_kept(stack, callers, since)


def test_a_team_policy_refuses_the_flip_and_a_strict_one_is_relaxed_in_place(stack: Stack) -> None:
    callers, since = early_callers(TEAMS)
    assert before[TEAMS]["t-web injected"], "t-web had no sidecar before the wave (the early run's hook)"
    run_id, state = stack.early_run(TEAMS, timeout=600)
    records = stack.records(TEAMS, run_id)
    auth = records["t-auth"]
    assert (state, auth["outcome"], auth["mtls"]) == ("success", "permissive", "PERMISSIVE"), auth["reason"]
    assert auth["reason"].startswith("STRICT not flipped: cluster lab: teams/t-auth is selected by "
                                     "peerauthentication teams/team-auth (workload, PERMISSIVE; not meshwave's)")
    assert pa(stack, "teams", "meshwave-t-auth") is None and all(proxies(stack, "teams", "t-auth"))
    assert_records_match_the_data_plane(stack, records)

    # t-pay gets a sidecar outside meshwave: its team's STRICT policy is in force. Back to PERMISSIVE acts on it.
    patch_template(stack, "teams", "t-pay", labels={"sidecar.istio.io/inject": "true"})
    eventually(lambda: data_plane(stack, "teams", "t-pay")["sidecar_fraction"] == 1.0, timeout=60,
               what="t-pay injected")
    assert data_plane(stack, "teams", "t-pay")["mtls_mode"] == "STRICT"
    run_id, state = stack.run(ADHOC, {"cluster": "lab", "namespace": "teams", "service": "t-pay",
                                      "action": "permissive"}, timeout=300)
    [record] = stack.records(ADHOC, run_id).values()
    assert (state, record["outcome"], record["mtls"]) == ("success", "permissive", "PERMISSIVE"), record["reason"]
    [change] = record["changes"]
    assert change["action"] == "relax-mtls" and change["target"] == "peerauthentication teams/team-pay", change
    team = pa(stack, "teams", "team-pay")
    assert team is not None and team["spec"]["mtls"]["mode"] == "PERMISSIVE", "relaxed in place, not deleted"
    assert team["metadata"]["annotations"]["meshwave.io/emergency-previous-mtls"] == '{"mtls": "STRICT"}'
    assert pa(stack, "teams", "meshwave-t-pay") is None, "no policy of meshwave's was needed"
    assert data_plane(stack, "teams", "t-pay")["mtls_mode"] == "PERMISSIVE"
    assert_records_match_the_data_plane(stack, {"t-pay": record})
    assert_callers_kept(stack, callers, since)
