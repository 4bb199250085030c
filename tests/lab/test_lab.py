"""The lab's behaviour, ticked with a simulated clock: rollouts, injection, OOM, mTLS, traffic."""

from __future__ import annotations

import pytest

from meshlab import resources as r
from meshlab.injection import injection_applies
from meshlab.lab import Lab
from meshlab.mesh import effective_mode
from meshlab.topology import TopologyError
from tests.lab.sim import Clock, store

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"




def restart(lab: Lab, ns: str, name: str, stamp: str = "2026-11-25T02:00:00Z") -> None:
    store(lab).patch(r.DEPLOYMENTS, ns, name, STRATEGIC, {"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": stamp}}}}})


def pods(lab: Lab, app: str) -> list[dict]:
    return store(lab).list(r.PODS, "shop", f"app={app}")


def containers(pod: dict) -> list[str]:
    return [c["name"] for c in pod["spec"]["containers"]]


def enable_injection(lab: Lab) -> None:
    store(lab).patch(r.NAMESPACES, None, "shop", MERGE, {"metadata": {"labels": {"istio-injection": "enabled"}}})


def apply_pa(lab: Lab, ns: str, name: str, mode: str, selector: dict | None = None) -> None:
    spec: dict = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    s = store(lab)
    body = {"metadata": {"name": name, "namespace": ns}, "spec": spec}
    if s.peek(r.PEER_AUTHENTICATIONS, ns, name):
        s.patch(r.PEER_AUTHENTICATIONS, ns, name, MERGE, {"spec": spec})
    else:
        s.create(r.PEER_AUTHENTICATIONS, ns, body)


def success(lab: Lab, name: str, ns: str = "shop") -> float:
    return lab.flows.workloads[("lab", ns, name)].ok


def test_starts_with_every_deployment_ready_and_no_sidecars(lab: Lab) -> None:
    for dep in store(lab).list(r.DEPLOYMENTS, "shop"):
        assert dep["status"]["readyReplicas"] == dep["spec"]["replicas"]
    assert all(containers(p) == [p["metadata"]["labels"]["app"]] for p in store(lab).list(r.PODS, "shop"))
    assert all(f.ok == 1.0 for f in lab.flows.workloads.values())


def test_injection_needs_a_restart_and_then_adds_a_ready_proxy(lab: Lab, clock: Clock) -> None:
    enable_injection(lab)
    clock.run(3)
    assert all("istio-proxy" not in containers(p) for p in pods(lab, "auth")), "no restart, no sidecar"
    restart(lab, "shop", "auth")
    clock.run(8)
    auth = pods(lab, "auth")
    assert len(auth) == 2 and all(containers(p) == ["auth", "istio-proxy"] for p in auth)
    assert all(all(c["ready"] for c in p["status"]["containerStatuses"]) for p in auth)
    status = store(lab).get(r.DEPLOYMENTS, "shop", "auth")["status"]
    assert status["updatedReplicas"] == status["availableReplicas"] == status["replicas"] == 2
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Progressing"] == "NewReplicaSetAvailable"


def test_undersized_pod_is_oomkilled_and_the_rollout_never_completes(lab: Lab, clock: Clock) -> None:
    enable_injection(lab)
    restart(lab, "shop", "payment")
    clock.run(12)
    new = [p for p in pods(lab, "payment") if "istio-proxy" in containers(p)]
    old = [p for p in pods(lab, "payment") if "istio-proxy" not in containers(p)]
    assert new and len(old) == 2, "maxUnavailable 0 for 2 replicas: the old pods keep serving"
    proxy = next(c for c in new[0]["status"]["containerStatuses"] if c["name"] == "istio-proxy")
    assert proxy["lastState"]["terminated"]["reason"] == "OOMKilled", "the sidecar's 150Mi is over its own 128Mi"
    assert proxy["lastState"]["terminated"]["exitCode"] == 137
    assert proxy["restartCount"] >= 2
    app = next(c for c in new[0]["status"]["containerStatuses"] if c["name"] == "payment")
    assert "lastState" not in app, "the app's 400Mi is under its own 512Mi limit: a container's limit is its own"
    status = store(lab).get(r.DEPLOYMENTS, "shop", "payment")["status"]
    assert status["updatedReplicas"] < 2 or status.get("availableReplicas", 0) < status["updatedReplicas"] + 2
    assert success(lab, "payment") == 1.0, "traffic still served by the old pods"


def test_proxy_memory_limit_annotation_gives_the_sidecar_its_own_budget(lab: Lab, clock: Clock) -> None:
    enable_injection(lab)
    store(lab).patch(r.DEPLOYMENTS, "shop", "payment", STRATEGIC, {"spec": {"template": {"metadata": {
        "annotations": {"sidecar.istio.io/proxyMemory": "160Mi", "sidecar.istio.io/proxyMemoryLimit": "256Mi"}}}}})
    clock.run(10)
    new = pods(lab, "payment")
    assert len(new) == 2 and all("istio-proxy" in containers(p) for p in new)
    proxy = next(c for c in new[0]["spec"]["containers"] if c["name"] == "istio-proxy")
    # Istio's template: with any proxy annotation only the annotated values (no default cpu request).
    assert proxy["resources"] == {"requests": {"memory": "160Mi"}, "limits": {"memory": "256Mi"}}
    assert all(c["restartCount"] == 0 for p in new for c in p["status"]["containerStatuses"])


def test_legacy_service_crash_loops_with_a_sidecar(lab: Lab, clock: Clock) -> None:
    enable_injection(lab)
    restart(lab, "shop", "email-service")
    clock.run(8)
    crashed = [p for p in pods(lab, "email-service") if "istio-proxy" in containers(p)]
    st = next(c for c in crashed[0]["status"]["containerStatuses"] if c["name"] == "email-service")
    assert st["lastState"]["terminated"]["reason"] == "Error"


def test_a_deleted_pod_is_recreated(lab: Lab, clock: Clock) -> None:
    victim = pods(lab, "auth")[0]["metadata"]["name"]
    store(lab).delete(r.PODS, "shop", victim)
    clock.run(3)
    names = [p["metadata"]["name"] for p in pods(lab, "auth")]
    assert len(names) == 2 and victim not in names


@pytest.mark.parametrize(("ns_labels", "pod_labels", "expected"), [
    ({"istio-injection": "enabled"}, {}, True),
    ({"istio-injection": "disabled"}, {"sidecar.istio.io/inject": "true"}, False),
    ({"istio-injection": "enabled"}, {"sidecar.istio.io/inject": "false"}, False),
    ({"istio.io/rev": "default"}, {}, True),
    ({"istio.io/rev": "canary"}, {}, False),  # no such revision installed
    ({"istio-injection": "disabled", "istio.io/rev": "default"}, {}, False),  # istio-injection wins
    ({}, {"sidecar.istio.io/inject": "true"}, True),
    ({}, {}, False),
])
def test_injection_precedence(ns_labels: dict, pod_labels: dict, expected: bool) -> None:
    assert injection_applies(ns_labels, pod_labels, {}, ["default"]) is expected


def test_peer_authentication_precedence(lab: Lab) -> None:
    s, labels = store(lab), {"app": "auth"}
    mode = lambda port=None: effective_mode(s, "istio-system", "shop", labels, port)  # noqa: E731
    assert mode() == "PERMISSIVE"
    apply_pa(lab, "istio-system", "default", "STRICT")
    assert mode() == "STRICT"
    apply_pa(lab, "shop", "default", "PERMISSIVE")
    assert mode() == "PERMISSIVE", "namespace beats mesh"
    apply_pa(lab, "shop", "auth", "STRICT", {"app": "auth"})
    assert mode() == "STRICT", "workload beats namespace"
    apply_pa(lab, "shop", "auth", "UNSET", {"app": "auth"})
    assert mode() == "PERMISSIVE", "UNSET inherits"
    apply_pa(lab, "istio-system", "auth-in-root", "DISABLE", {"app": "auth"})
    assert mode() == "PERMISSIVE", "a selector policy in the root namespace is ignored"
    s.patch(r.PEER_AUTHENTICATIONS, "shop", "auth", MERGE,
            {"spec": {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"9090": {"mode": "DISABLE"}}}})
    assert (mode(8080), mode(9090)) == ("STRICT", "DISABLE")
    apply_pa(lab, "shop", "auth-later", "PERMISSIVE", {"app": "auth"})
    assert mode(8080) == "STRICT", "the oldest workload policy wins"


def inject_all(lab: Lab, clock: Clock, names: list[str]) -> None:
    enable_injection(lab)
    for name in names:
        restart(lab, "shop", name)
    clock.run(10)


def test_strict_with_a_plaintext_caller_fails_at_the_caller_and_permissive_recovers(lab: Lab, clock: Clock) -> None:
    # ledger gets a sidecar; payment (no sidecar) and batch-processor (outside Kubernetes) call it in plaintext.
    inject_all(lab, clock, ["ledger"])
    assert success(lab, "payment") == 1.0
    apply_pa(lab, "shop", "ledger", "STRICT", {"app": "ledger"})
    clock.run(1)
    assert success(lab, "payment") == 0.0
    assert success(lab, "batch-processor", "external") == 0.0
    assert success(lab, "api-gateway") < 1.0, "the failure propagates up the call chain"
    assert lab.flows.workloads[("lab", "shop", "ledger")].reached == 0.0, "plaintext never reaches ledger's app"
    apply_pa(lab, "shop", "ledger", "PERMISSIVE", {"app": "ledger"})
    clock.run(1)
    assert success(lab, "payment") == success(lab, "api-gateway") == 1.0


def test_strict_between_sidecars_keeps_working(lab: Lab, clock: Clock) -> None:
    inject_all(lab, clock, ["api-gateway", "user", "auth"])
    apply_pa(lab, "shop", "auth", "STRICT", {"app": "auth"})
    clock.run(1)
    assert success(lab, "user") == success(lab, "api-gateway") == 1.0


def test_mesh_wide_strict_reproduces_the_outage(lab: Lab, clock: Clock) -> None:
    inject_all(lab, clock, ["auth", "user"])
    apply_pa(lab, "istio-system", "default", "STRICT")
    clock.run(1)
    assert success(lab, "api-gateway") == 0.0, "api-gateway has no sidecar: plaintext to STRICT auth and user"
    store(lab).delete(r.PEER_AUTHENTICATIONS, "istio-system", "default")
    clock.run(1)
    assert success(lab, "api-gateway") == 1.0


def test_each_sidecar_on_the_path_adds_latency(lab: Lab, clock: Clock) -> None:
    before = lab.flows.workloads[("lab", "shop", "user")].latency_ms
    inject_all(lab, clock, ["user", "auth"])
    after = lab.flows.workloads[("lab", "shop", "user")].latency_ms
    assert after == pytest.approx(before + 2 * lab.topology.mesh.sidecar_latency_ms)


def test_admin_knobs_are_validated_all_or_nothing(lab: Lab) -> None:
    key = ("lab", "shop", "auth")
    lab.set_knobs(key, {"error_rate": 0.5})
    lab.tick()
    assert success(lab, "auth") == pytest.approx(0.5)
    with pytest.raises(TopologyError, match=r"error_rate: Input should be less than or equal to 1"):
        lab.set_knobs(key, {"error_rate": 2, "latency_ms": 1})
    with pytest.raises(TopologyError, match="cannot change name"):
        lab.set_knobs(key, {"name": "x"})
    with pytest.raises(TopologyError, match="unknown service 'nope'"):
        lab.set_knobs(key, {"calls": [{"service": "nope"}]})
    assert lab.knobs[key].latency_ms == 6 and lab.knobs[key].error_rate == 0.5


def test_a_rarely_called_failing_callee_costs_only_its_share(lab: Lab) -> None:
    # api-gateway calls payment on half of its requests: a dead payment fails about half, not all.
    lab.set_knobs(("lab", "shop", "payment"), {"error_rate": 1.0})
    lab.tick()
    assert success(lab, "api-gateway") == pytest.approx(0.5)


def test_gateways_are_not_governed_by_peer_authentication(lab: Lab, clock: Clock) -> None:
    apply_pa(lab, "istio-system", "default", "STRICT")
    clock.run(1)
    gateway = lab.flows.workloads[("lab", "istio-system", "istio-ingressgateway")]
    assert gateway.reached == pytest.approx(20) and gateway.ok == 1.0


def test_an_empty_selector_is_namespace_or_mesh_wide(lab: Lab) -> None:
    s = store(lab)
    s.create(r.PEER_AUTHENTICATIONS, "istio-system", {"metadata": {"name": "default"},
                                                       "spec": {"selector": {"matchLabels": {}},
                                                                "mtls": {"mode": "STRICT"}}})
    assert effective_mode(s, "istio-system", "shop", {"app": "auth"}) == "STRICT"


def _requests_total(body: bytes) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("http_requests_total{"))


def test_a_slow_exposition_is_rendered_after_the_ticks_not_on_the_scrape(lab: Lab, clock: Clock,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from meshlab.server import Exposition

    exposition = Exposition(lab)
    clock.run(2)
    fresh = exposition.for_scrape()
    assert _requests_total(fresh) > 0
    clock.run(2)
    assert _requests_total(exposition.for_scrape()) > _requests_total(fresh), "a fast render is fresh per scrape"

    monkeypatch.setattr(Exposition, "INLINE_SECONDS", 0.0)  # as if rendering took longer than a scrape can wait
    cached = exposition.for_scrape()
    clock.run(2)
    assert exposition.for_scrape() is cached, "the scrape does not render: it gets the latest rendering at once"
    exposition.after_tick()
    assert _requests_total(exposition.for_scrape()) > _requests_total(cached), "the tick after a scrape renders"
    exposition.scraped_at -= Exposition.SCRAPED_RECENTLY
    body = exposition.body
    exposition.after_tick()
    assert exposition.body is body, "nobody scraping: the ticks do not render"


def test_a_fast_scrape_brings_the_counters_up_to_its_own_moment(lab: Lab, clock: Clock,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A real proxy's counters are current when scraped: a scrape a second after the last tick (a loaded machine's
    tick loop running late) counts that second too, instead of reading the tick's counters as if they were now."""
    import meshlab.lab
    from meshlab.server import Exposition

    exposition = Exposition(lab)
    clock.run(2)
    monkeypatch.setattr(meshlab.lab.time, "monotonic", lambda: clock.now)
    at_tick = _requests_total(exposition.for_scrape())
    clock.run(1)
    per_second = _requests_total(exposition.for_scrape()) - at_tick  # what one second of ticks counts
    monkeypatch.setattr(meshlab.lab.time, "monotonic", lambda: clock.now + 1.0)
    a_second_later = _requests_total(exposition.for_scrape()) - at_tick
    assert per_second > 0 and a_second_later == pytest.approx(2 * per_second, rel=0.05), (per_second, a_second_later)
