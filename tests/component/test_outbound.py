"""Removing a sidecar against the lab and a real Prometheus (safety review, finding 4): the lab resets the plaintext
calls of a workload without a sidecar into a STRICT destination (its own success rate falls, and `after_removal`
says WORSE); `rollback_injection` relaxes a destination meshwave made STRICT first, and refuses, keeping the
sidecar, when a team's policy makes it STRICT."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshstack.process import LabProcess, PrometheusProcess
from meshwave import outbound, steps
from meshwave.kube import INJECT_LABEL, MeshKube
from meshwave.outbound import RemovalRefused
from meshwave.plan import parse_plan
from meshwave.prometheus import PrometheusSource
from meshwave.steps import Service
from tests.component.kubes import api_client
from tests.conftest import eventually

pytestmark = pytest.mark.component

NS, WINDOW = "out", "10s"
# Every pod of `out` runs a sidecar from the start. o-app calls o-mine (STRICT by meshwave's policy, created by the
# test); o-app2 and o-raw call o-team (STRICT by its team's policy).
TOPOLOGY = {
    "name": "outbound",
    "clusters": [{"name": "lab", "namespaces": [{"name": NS, "labels": {"istio-injection": "enabled"}}]},
                 {"name": "far", "namespaces": [{"name": NS, "labels": {"istio-injection": "enabled"}}]}],
    "services": [
        # across clusters: o-cross calls far's o-far-mine (STRICT by meshwave's policy), o-cross2 far's o-far-open
        {"name": "o-cross", "namespace": NS, "ingress_rps": 5, "latency_ms": 2,
         "calls": [{"service": "far/out/o-far-mine"}]},
        {"name": "o-cross2", "namespace": NS, "ingress_rps": 5, "latency_ms": 2,
         "calls": [{"service": "far/out/o-far-open"}]},
        {"name": "o-far-mine", "cluster": "far", "namespace": NS, "latency_ms": 2},
        {"name": "o-far-open", "cluster": "far", "namespace": NS, "latency_ms": 2},
        {"name": "o-app", "namespace": NS, "ingress_rps": 5, "latency_ms": 2, "calls": [{"service": "o-mine"}]},
        {"name": "o-app2", "namespace": NS, "ingress_rps": 5, "latency_ms": 2, "calls": [{"service": "o-team"}]},
        {"name": "o-raw", "namespace": NS, "ingress_rps": 5, "latency_ms": 2, "calls": [{"service": "o-team"}]},
        {"name": "o-mine", "namespace": NS, "latency_ms": 2},
        {"name": "o-team", "namespace": NS, "latency_ms": 2},
    ],
    "peer_authentications": [{"namespace": NS, "name": "team-o-team", "mode": "STRICT",
                              "selector": {"app": "o-team"}}],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabProcess, PrometheusSource, MeshKube]]:
    work: Path = tmp_path_factory.mktemp("outbound")
    (work / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    with LabProcess(work / "topology.yaml", work / "lab") as lab, \
            PrometheusProcess([lab.metrics_target], work / "prom") as prom, \
            PrometheusSource(prom.url, timeout=5) as source:
        kube = MeshKube(api_client(lab), "lab")
        body = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": "meshwave-o-mine", "namespace": NS,
                             "labels": {"app.kubernetes.io/managed-by": "meshwave"}},
                "spec": {"selector": {"matchLabels": {"app": "o-mine"}}, "mtls": {"mode": "STRICT"}}}
        kube.custom.create_namespaced_custom_object("security.istio.io", "v1", NS, "peerauthentications", body)
        far = MeshKube(api_client(lab, "far"), "far")
        body = {**body, "metadata": {**body["metadata"], "name": "meshwave-o-far-mine"},
                "spec": {"selector": {"matchLabels": {"app": "o-far-mine"}}, "mtls": {"mode": "STRICT"}}}
        far.custom.create_namespaced_custom_object("security.istio.io", "v1", NS, "peerauthentications", body)
        # Prometheus has seen each caller's proxy call its destination
        for caller in ("o-app", "o-app2", "o-raw", "o-cross", "o-cross2"):
            eventually(lambda c=caller: outbound.destinations(source, NS, c)[0], timeout=60, what=f"{caller}'s calls")
        yield lab, source, kube, far


def service(workload: str) -> Service:
    plan = parse_plan({"migration": "outbound",
                       "clusters": {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}},
                       "defaults": {"query_window_seconds": 10, "poke_interval_seconds": 3},
                       "waves": [{"name": "w", "services": [{"cluster": "lab", "namespace": NS,
                                                             "workload": workload}]}]})
    svc = plan.waves[0].services[0]
    return Service(svc, svc.settings(plan.defaults), plan.clusters["lab"], batch=1, action="remove_sidecar")


def seen(lab: LabProcess, workload: str, cluster: str = "lab") -> dict:
    return lab.admin("GET", f"/services/{cluster}/{NS}/{workload}")


def sidecar_gone(lab: LabProcess, workload: str) -> None:
    eventually(lambda: seen(lab, workload)["sidecar_fraction"] == 0.0, timeout=60, what=f"{workload} without sidecar")


def test_the_lab_resets_a_workload_without_sidecar_calling_strict_and_after_removal_says_worse(stack) -> None:
    lab, source, kube, _ = stack
    before = outbound.success_rate(source, NS, "o-raw", WINDOW)
    assert before is not None and before > 0.98, before
    kube.remove_injection(NS, "o-raw")  # what the rollback did before: no look at its destinations
    sidecar_gone(lab, "o-raw")
    after = outbound.after_removal(source, NS, "o-raw", WINDOW, before, 0.02, time.time())
    assert after.status == "worse" and after.after is not None and after.after < 0.1, after
    assert after.reason.startswith("the removal made things WORSE: its own success rate 0.0")


def test_a_destination_meshwave_made_strict_is_relaxed_before_the_sidecar_goes(stack) -> None:
    lab, source, kube, _ = stack
    assert seen(lab, "o-mine")["mtls_mode"] == "STRICT"
    result = steps.rollback_injection(service("o-app"), kube, source, "meshwave test")
    assert [(c["action"], c["target"]) for c in result.changes] == [
        ("delete-mtls", "peerauthentication out/meshwave-o-mine"),
        ("set-mtls", "peerauthentication out/meshwave-o-app"), ("remove-injection", "deployment out/o-app")
    ], result.changes
    assert seen(lab, "o-mine")["mtls_mode"] == "PERMISSIVE"
    [checked] = result.outbound["destinations"]
    assert (checked["destination"]["workload"], checked["verdict"]) == ("o-mine", "relax")
    sidecar_gone(lab, "o-app")
    after = outbound.after_removal(source, NS, "o-app", WINDOW, result.success_before, 0.02, time.time())
    assert after.status == "better_or_same" and after.after is not None and after.after > 0.98, after


def test_a_destination_strict_by_a_team_s_policy_refuses_the_removal_and_the_sidecar_stays(stack) -> None:
    lab, source, kube, _ = stack
    with pytest.raises(RemovalRefused) as refused:
        steps.rollback_injection(service("o-app2"), kube, source, "meshwave test")
    message = str(refused.value)
    assert "its calls to lab/out/o-team: STRICT by a policy meshwave does not own (all ports: peerauthentication " \
           "out/team-o-team (workload, STRICT; not meshwave's))" in message, message
    assert message.endswith("LEFT: the sidecar stays, mTLS PERMISSIVE (no policy applies: Istio's default)"), message
    assert kube.workload(NS, "o-app2").template_labels.get(INJECT_LABEL) != "false"
    assert seen(lab, "o-team")["mtls_mode"] == "STRICT", "nobody else's policy is touched"
    assert seen(lab, "o-app2")["sidecar_fraction"] == 1.0
    assert outbound.success_rate(source, NS, "o-app2", WINDOW) == 1.0


def test_a_destination_in_another_cluster_is_read_and_relaxed_there_through_the_plan_s_peer(stack) -> None:
    """o-cross calls far's o-far-mine, STRICT by meshwave's policy: without a connection to `far` the removal is
    refused; with it, the policy is relaxed in `far` first and the sidecar goes, and its calls still succeed."""
    lab, source, kube, far = stack
    with pytest.raises(RemovalRefused) as refused:
        steps.rollback_injection(service("o-cross"), kube, source, "meshwave test")
    assert "far/out/o-far-mine: its mode cannot be read: cluster far is not one of this run's clusters" \
        in str(refused.value), refused.value
    assert seen(lab, "o-cross")["sidecar_fraction"] == 1.0 and seen(lab, "o-far-mine", "far")["mtls_mode"] == "STRICT"

    result = steps.rollback_injection(service("o-cross"), kube, source, "meshwave test", {"far": far}.__getitem__)
    assert [(c["cluster"], c["action"], c["target"]) for c in result.changes][:1] == [
        ("far", "delete-mtls", "peerauthentication out/meshwave-o-far-mine")], result.changes
    assert seen(lab, "o-far-mine", "far")["mtls_mode"] == "PERMISSIVE"
    sidecar_gone(lab, "o-cross")
    after = outbound.after_removal(source, NS, "o-cross", WINDOW, result.success_before, 0.02, time.time())
    assert after.status == "better_or_same" and after.after is not None and after.after > 0.98, after


def test_a_permissive_destination_in_another_cluster_needs_nothing(stack) -> None:
    lab, source, kube, far = stack
    result = steps.rollback_injection(service("o-cross2"), kube, source, "meshwave test", {"far": far}.__getitem__)
    [checked] = result.outbound["destinations"]
    assert (checked["destination"]["cluster"], checked["verdict"]) == ("far", "fine"), checked
    assert not [c for c in result.changes if c["cluster"] == "far"], "nothing written in the other cluster"
    sidecar_gone(lab, "o-cross2")
