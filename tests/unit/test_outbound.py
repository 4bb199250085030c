"""meshwave.outbound and its use: a sidecar's removal first reads where the workload calls over mTLS and the mode
each destination enforces (safety review, finding 4); after the rollout its own success rate is compared with
before, and the outcome says when the removal made things worse."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from meshwave import decisions, outbound, steps
from meshwave import prometheus as p
from meshwave.kube import PodState
from meshwave.mtls import effective_mtls
from meshwave.outbound import Destination, RemovalRefused, Verdict
from meshwave.outcomes import ServiceOutcome
from meshwave.plan import parse_plan
from meshwave.results import StepResults
from meshwave.wave import services_of
from tests.unit.test_steps import NS, WL, FakeKube, FakeSource, deployment_state, service

MESHWAVE = {"app.kubernetes.io/managed-by": "meshwave"}


def policy(ns: str, name: str, mode: str, selector: dict[str, str] | None = None,
           labels: dict[str, str] | None = None, ports: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = {port: {"mode": m} for port, m in ports.items()}
    return {"metadata": {"namespace": ns, "name": name, "labels": labels or {},
                         "creationTimestamp": "2026-11-01T00:00:00Z"}, "spec": spec}


def dest(workload: str = "ledger", ns: str = NS, same_cluster: bool = True) -> Destination:
    return Destination(cluster="lab" if same_cluster else "prod-us-1", namespace=ns, workload=workload,
                       same_cluster=same_cluster, rate=2.0)


def mode_of(policies: list[dict[str, Any]], workload: str = "ledger", ns: str = NS):
    return effective_mtls(policies, "istio-system", ns, {"app": workload})


# ---- judge: what a destination needs ---------------------------------------------------------------------------
@pytest.mark.parametrize(("policies", "proxied", "verdict", "words"), [
    ([], True, Verdict.FINE, "not STRICT: PERMISSIVE"),
    ([policy(NS, "default", "STRICT")], False, Verdict.FINE, "no sidecar: nothing enforces mTLS"),
    ([policy(NS, "meshwave-ledger", "STRICT", {"app": "ledger"}, MESHWAVE)], True, Verdict.RELAX,
     "STRICT by meshwave's own policy (all ports: peerauthentication shop/meshwave-ledger (workload, STRICT; "
     "meshwave's))"),
    # meshwave's own STRICT over a namespace-wide PERMISSIVE... and over a namespace-wide STRICT: still its own
    ([policy(NS, "default", "STRICT"), policy(NS, "meshwave-ledger", "STRICT", {"app": "ledger"}, MESHWAVE)], True,
     Verdict.RELAX, "meshwave's own policy"),
    ([policy(NS, "team-ledger", "STRICT", {"app": "ledger"})], True, Verdict.REFUSE,
     "STRICT by a policy meshwave does not own (all ports: peerauthentication shop/team-ledger (workload, STRICT; "
     "not meshwave's))"),
    ([policy(NS, "default", "STRICT")], True, Verdict.REFUSE, "shop/default (namespace-wide, STRICT; not meshwave's)"),
    ([policy("istio-system", "default", "STRICT")], True, Verdict.REFUSE, "istio-system/default (mesh-wide"),
    # one port STRICT by a team's policy, the rest PERMISSIVE: the call may be on that port
    ([policy(NS, "team-ledger", "PERMISSIVE", {"app": "ledger"}, ports={"9090": "STRICT"})], True, Verdict.REFUSE,
     "port 9090: peerauthentication shop/team-ledger"),
    ([policy(NS, "meshwave-ledger", "PERMISSIVE", {"app": "ledger"}, MESHWAVE, ports={"9090": "STRICT"})], True,
     Verdict.RELAX, "port 9090"),
])
def test_a_destination_is_fine_relaxed_when_meshwave_owns_its_strict_or_refuses(
        policies: list[dict[str, Any]], proxied: bool, verdict: Verdict, words: str) -> None:
    checked = outbound.judge(dest(), mode_of(policies), proxied)
    assert checked.verdict == verdict and words in checked.why, checked


def test_a_strict_that_is_relaxed_before_the_removal_is_fine_and_only_that_one() -> None:
    """An emergency dry run: its stage 1 wrote nothing, but the real run's stage 1 relaxes the mesh-wide policy before
    stage 2 removes any sidecar; a team's workload policy outside what stage 1 relaxes still refuses."""
    mesh_wide = [policy("istio-system", "default", "STRICT")]
    fine = outbound.judge(dest(), mode_of(mesh_wide), True, relaxed_first=frozenset({"istio-system/default"}))
    assert fine.verdict == Verdict.FINE and "relaxed before this removal" in fine.why, fine
    team = [*mesh_wide, policy(NS, "team-ledger", "STRICT", {"app": "ledger"})]
    refused = outbound.judge(dest(), mode_of(team), True, relaxed_first=frozenset({"istio-system/default"}))
    assert refused.verdict == Verdict.REFUSE and "shop/team-ledger" in refused.why, refused


def test_an_unreadable_destination_refuses() -> None:
    gone = outbound.judge(dest(), None, False, "deployment shop/ledger not found")
    assert gone.verdict == Verdict.REFUSE and "cannot be read: deployment shop/ledger not found" in gone.why


# ---- destinations: what the workload's proxy reported calling --------------------------------------------------
def sample(ns: str, wl: str, value: float = 3.0, dest_cluster: str = "lab") -> p.Sample:
    return p.Sample({"source_cluster": "lab", "destination_cluster": dest_cluster,
                     "destination_workload_namespace": ns, "destination_workload": wl}, value, 1.0)


def test_destinations_skip_outside_the_mesh_itself_and_idle_series() -> None:
    source = FakeSource(window=outbound.LOOKBACK).set("outbound_destinations", [
        sample(NS, "ledger"), sample("external", "unknown"), sample(NS, WL), sample(NS, "idle", 0.0),
        sample("bank", "fx", dest_cluster="prod-us-1")])
    found, query = outbound.destinations(source, NS, WL)
    assert query == source.query("outbound_destinations") and 'reporter="source"' in query
    assert [(d.key, d.same_cluster) for d in found] == [("lab/shop/ledger", True), ("prod-us-1/bank/fx", False)]


# ---- rollback_injection: relax first, or refuse and keep the sidecar PERMISSIVE --------------------------------
def calling(*dests: str) -> FakeSource:
    """The workload's proxy called these workloads of its namespace; its own success rate before was 0.99."""
    source = FakeSource(window=outbound.LOOKBACK).set("outbound_destinations", [sample(NS, d) for d in dests])
    source.answers[p.render("app_success_rate", namespace=NS, workload=WL, window=service().window)] = 0.99
    return source


def test_rollback_relaxes_a_destination_meshwave_made_strict_before_removing_the_sidecar() -> None:
    kube = FakeKube(state=deployment_state(), policies=[
        policy(NS, "meshwave-ledger", "STRICT", {"app": "ledger"}, MESHWAVE)])
    kube.state.pods.append(pod_with_proxy())
    result = steps.rollback_injection(service(), kube, calling("ledger"), "meshwave test")  # type: ignore[arg-type]
    writes = [c for c in kube.calls if c[0] in ("mtls.ensure_permissive", "remove_injection")]
    assert writes == [("mtls.ensure_permissive", (NS, "ledger", True)), ("mtls.ensure_permissive", (NS, WL, False)),
                      ("remove_injection", (NS, WL))], "the destination first, then the workload's own undo"
    assert [c["target"] for c in result.changes][:1] == ["peerauthentication shop/meshwave-ledger"]
    assert result.success_before == 0.99
    [checked] = result.outbound["destinations"]
    assert checked["verdict"] == "relax" and checked["destination"]["workload"] == "ledger"


def test_rollback_refuses_when_a_destination_is_strict_by_a_team_s_policy_and_leaves_it_permissive() -> None:
    kube = FakeKube(state=deployment_state(), policies=[policy(NS, "team-ledger", "STRICT", {"app": "ledger"})])
    kube.state.pods.append(pod_with_proxy())
    with pytest.raises(RemovalRefused) as refused:
        steps.rollback_injection(service(), kube, calling("ledger", "pricing"), "meshwave test")  # type: ignore[arg-type]
    message = str(refused.value)
    assert message.startswith("sidecar of shop/payment NOT removed: without it, its calls to lab/shop/ledger: STRICT "
                              "by a policy meshwave does not own (all ports: peerauthentication shop/team-ledger")
    assert "pricing" not in message, "only the destinations that refuse are named"
    assert message.endswith("LEFT: the sidecar stays, mTLS PERMISSIVE once applied (dry run)")
    writes = [c for c in kube.calls if c[0] in ("mtls.ensure_permissive", "remove_injection")]
    assert writes == [("mtls.ensure_permissive", (NS, WL, True))], "no destination touched, the sidecar kept"


def test_a_prometheus_that_does_not_answer_fails_the_try_rather_than_remove_blind() -> None:
    kube = FakeKube()
    source = FakeSource(window=outbound.LOOKBACK).set("outbound_destinations", p.PrometheusUnavailable("down"))
    with pytest.raises(p.PrometheusUnavailable):
        steps.rollback_injection(service(), kube, source)  # type: ignore[arg-type]
    assert not [c for c in kube.calls if c[0] in ("mtls.ensure_permissive", "remove_injection")]


# ---- a destination in another cluster: read there, through the plan's connection to it ---------------------------
def calling_far(*dests: tuple[str, str]) -> FakeSource:
    """The workload's proxy called these (cluster, workload) destinations of namespace `shop`."""
    source = FakeSource(window=outbound.LOOKBACK).set("outbound_destinations",
                                                      [sample(NS, wl, dest_cluster=c) for c, wl in dests])
    source.answers[p.render("app_success_rate", namespace=NS, workload=WL, window=service().window)] = 0.99
    return source


def test_a_destination_in_a_cluster_the_run_has_no_connection_for_refuses_the_removal() -> None:
    kube = FakeKube(state=deployment_state())
    with pytest.raises(RemovalRefused) as refused:
        steps.rollback_injection(service(), kube, calling_far(("prod-us-1", "ledger")), "t")  # type: ignore[arg-type]
    assert "its calls to prod-us-1/shop/ledger: its mode cannot be read: cluster prod-us-1 is not one of this " \
           "run's clusters: no connection to read it" in str(refused.value)
    writes = [c for c in kube.calls if c[0] in ("mtls.ensure_permissive", "remove_injection")]
    assert writes == [("mtls.ensure_permissive", (NS, WL, True))], "the sidecar kept, the workload PERMISSIVE"


def far_kube(policies: list[dict[str, Any]], proxied: bool = True) -> FakeKube:
    far = FakeKube(state=deployment_state(), policies=policies, cluster="prod-us-1")
    if proxied:
        far.state.pods.append(pod_with_proxy())
    return far


def test_a_permissive_destination_in_another_cluster_of_the_plan_is_read_there_and_the_sidecar_goes() -> None:
    kube, far = FakeKube(state=deployment_state()), far_kube([])
    asked: list[str] = []

    def peers(cluster: str) -> FakeKube:
        asked.append(cluster)
        return far

    result = steps.rollback_injection(service(), kube, calling_far(("prod-us-1", "ledger")), "t",
                                      peers)  # type: ignore[arg-type]
    assert asked == ["prod-us-1"]
    assert ("mtls.effective", (NS, "ledger")) in far.calls and ("workload", (NS, "ledger")) in far.calls
    assert ("workload", (NS, "ledger")) not in kube.calls, "read in its own cluster, not the caller's"
    [checked] = result.outbound["destinations"]
    assert checked["verdict"] == "fine" and checked["why"].startswith("not STRICT"), checked
    assert [c["action"] for c in result.changes][-1] == "remove-injection"


def test_a_destination_meshwave_made_strict_in_another_cluster_is_relaxed_there_first() -> None:
    kube = FakeKube(state=deployment_state())
    far = far_kube([policy(NS, "meshwave-ledger", "STRICT", {"app": "ledger"}, MESHWAVE)])
    result = steps.rollback_injection(service(), kube, calling_far(("prod-us-1", "ledger")), "t",
                                      lambda cluster: far)  # type: ignore[arg-type]
    assert [c for c in far.calls if c[0] == "mtls.ensure_permissive"] == [
        ("mtls.ensure_permissive", (NS, "ledger", True))]
    assert (result.changes[0]["cluster"], result.changes[0]["target"]) == (
        "prod-us-1", "peerauthentication shop/meshwave-ledger")
    assert [c for c in kube.calls if c[0] == "mtls.ensure_permissive"] == [
        ("mtls.ensure_permissive", (NS, WL, False))], "the caller's own undo only, in its own cluster"


def test_a_team_s_strict_in_another_cluster_refuses_and_nothing_is_touched_there() -> None:
    kube = FakeKube(state=deployment_state())
    far = far_kube([policy(NS, "team-ledger", "STRICT", {"app": "ledger"})])
    with pytest.raises(RemovalRefused) as refused:
        steps.rollback_injection(service(), kube, calling_far(("prod-us-1", "ledger")), "t",
                                 lambda cluster: far)  # type: ignore[arg-type]
    assert "prod-us-1/shop/ledger: STRICT by a policy meshwave does not own" in str(refused.value)
    assert not [c for c in far.calls if c[0] == "mtls.ensure_permissive"]


def test_the_policies_relaxed_first_count_in_their_own_cluster_only() -> None:
    """An emergency dry run: stage 1 would relax the far cluster's mesh-wide policy, not the caller's."""
    mesh_wide = [policy("istio-system", "default", "STRICT")]
    kube, far = FakeKube(state=deployment_state()), far_kube(mesh_wide)
    first = {"prod-us-1": frozenset({"istio-system/default"})}
    check = outbound.check_removal(kube, calling_far(("prod-us-1", "ledger")), NS, WL,  # type: ignore[arg-type]
                                   lambda c: first.get(c, frozenset()), lambda c: far)  # type: ignore[arg-type]
    assert [c.verdict for c in check.checked] == [Verdict.FINE]
    check = outbound.check_removal(kube, calling_far(("prod-us-1", "ledger")), NS, WL,  # type: ignore[arg-type]
                                   lambda c: first.get(c, frozenset()) if c == "lab" else frozenset(),
                                   lambda c: far)  # type: ignore[arg-type]
    assert [c.verdict for c in check.checked] == [Verdict.REFUSE]


def pod_with_proxy() -> PodState:
    """The destination runs a sidecar (FakeKube answers every workload with the same state)."""
    return PodState("ledger-1", current=True, ready=True, has_proxy=True, proxy_ready=True)


# ---- after the rollout: worse, or not ----------------------------------------------------------------------------
@pytest.mark.parametrize(("before", "after", "status"), [
    (1.0, 0.4, "worse"), (1.0, 0.99, "better_or_same"), (0.7, 0.95, "better_or_same"), (1.0, None, "no_data"),
    (None, 0.9, "no_data"),
])
def test_compare(before: float | None, after: float | None, status: str) -> None:
    assert outbound.compare(before, after, 0.02, "20s").status == status


WORSE = outbound.compare(1.0, 0.4, 0.02, "20s").model_dump()


def test_a_requested_removal_that_made_things_worse_is_red_and_says_so() -> None:
    svc = dataclasses.replace(service(), action="remove_sidecar")
    states = {"admit": "success", "rollback_injection": "success", "wait_rollback": "success"}
    results = StepResults.model_validate({"wait_rollback": {"status": "done", "message": "2/2 pods"},
                                          "after_removal": WORSE})
    record = decisions.outcome(svc, results, states, {}, {}, dry_run=False)
    assert record.outcome == "failed" and ServiceOutcome(record.outcome).red
    assert record.reason == ("sidecar removed on request, but the removal made things WORSE: its own success rate "
                             "0.400 over 20s after the rollout, 1.000 before")
    results = results.model_copy(update={"after_removal": outbound.compare(1.0, 1.0, 0.02, "20s")})
    record = decisions.outcome(svc, results, states, {}, {}, dry_run=False)
    assert (record.outcome, record.sidecar) == ("removed", False)
    assert record.reason.endswith("after the removal: its own success rate 1.000 after the removal (1.000 before)")


def test_a_wave_rollback_that_made_things_worse_says_so_first() -> None:
    states = {"admit": "success", "preflight": "success", "baseline": "success", "inject": "success",
              "wait_rollout": "success", "soak": "success", "rollback_injection": "success",
              "wait_rollback": "success"}
    results = StepResults.model_validate({"wait_rollback": {"status": "done", "message": "2/2 pods"},
                                          "after_removal": WORSE})
    why = {"after_soak": "soak failed: p99", "after_soak_to": decisions.ROLLBACK_AFTER_SOAK}
    record = decisions.outcome(service(), results, states, {}, why, dry_run=False)
    assert record.outcome == "rolled_back"
    assert record.reason.startswith("the removal made things WORSE: its own success rate 0.400")
    assert record.reason.endswith("; it was rolled back because soak failed: p99")


def test_a_refused_wave_rollback_is_failed_and_names_what_is_left() -> None:
    states = {"admit": "success", "preflight": "success", "baseline": "success", "inject": "success",
              "wait_rollout": "success", "soak": "success", "rollback_injection": "failed",
              "wait_rollback": "upstream_failed"}
    error = "sidecar of shop/payment NOT removed: ... LEFT: the sidecar stays, mTLS PERMISSIVE"
    why = {"after_soak": "soak failed: p99", "after_soak_to": decisions.ROLLBACK_AFTER_SOAK}
    record = decisions.outcome(service(), StepResults(), states, {"rollback_injection": error}, why, dry_run=False)
    assert record.outcome == "failed" and error in record.reason, record


def test_a_wave_s_service_carries_the_plan_s_other_clusters_through_its_xcom() -> None:
    plan = parse_plan({"migration": "two", "clusters": {
        "eu": {"kubernetes_conn_id": "k_eu", "prometheus_conn_id": "p_eu"},
        "us": {"kubernetes_conn_id": "k_us", "prometheus_conn_id": "p_us", "root_namespace": "mesh"}},
        "waves": [{"name": "w", "services": [{"cluster": "eu", "namespace": NS, "workload": WL}]}]})
    [svc] = services_of(plan, plan.waves[0])
    assert svc.peers == {"us": plan.clusters["us"]}
    back = steps.Service.from_dict(json.loads(json.dumps(svc.to_dict())))
    assert back == svc and back.peers["us"].root_namespace == "mesh"
    older = {k: v for k, v in svc.to_dict().items() if k != "peers"}  # a record written before peers existed
    assert steps.Service.from_dict(older).peers == {}
