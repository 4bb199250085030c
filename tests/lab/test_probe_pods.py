"""Bare pods that run curl against a Service: the kubelet runs them as curl would fare in the simulated mesh."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshlab import resources as r
from meshlab.lab import Lab
from meshlab.topology import parse_topology
from meshstack.process import LabProcess
from tests.conftest import eventually
from tests.lab.sim import Clock, store

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
LEDGER = "http://ledger.shop.svc.cluster.local:8080/"




def probe_body(name: str, command: list[str] | None = None, inject: bool = False, **container: object) -> dict:
    spec = {"name": "probe", "image": "curlimages/curl:8.11.0", **container}
    if command is not None:
        spec["command"] = command
    labels = {} if inject else {"sidecar.istio.io/inject": "false"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"restartPolicy": "Never", "containers": [spec]}}


def curl(url: str = LEDGER) -> list[str]:
    return ["curl", "-sS", "-o", "/dev/null", "--max-time", "5", url]


def start_probe(lab: Lab, name: str = "probe", ns: str = "shop", **kwargs: object) -> None:
    kwargs.setdefault("command", curl())
    store(lab).create(r.PODS, ns, probe_body(name, **kwargs))  # type: ignore[arg-type]


def terminated(lab: Lab, name: str = "probe", ns: str = "shop") -> dict | None:
    statuses = (store(lab).get(r.PODS, ns, name).get("status") or {}).get("containerStatuses") or []
    return (statuses[0].get("state") or {}).get("terminated") if statuses else None


def exit_code(lab: Lab, clock: Clock, name: str = "probe", ns: str = "shop") -> int:
    for _ in range(40):
        clock.run(0.5)
        if (done := terminated(lab, name, ns)) is not None:
            return done["exitCode"]
    raise AssertionError(f"{name} did not finish: {store(lab).get(r.PODS, ns, name).get('status')}")


def inject(lab: Lab, clock: Clock, name: str, annotations: dict | None = None) -> None:
    store(lab).patch(r.NAMESPACES, None, "shop", MERGE, {"metadata": {"labels": {"istio-injection": "enabled"}}})
    store(lab).patch(r.DEPLOYMENTS, "shop", name, STRATEGIC, {"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2026-11-25T02:00:00Z", **(annotations or {})}}}}})
    clock.run(10)
    assert all(any(c["name"] == "istio-proxy" for c in p["spec"]["containers"])
               for p in store(lab).list(r.PODS, "shop", f"app={name}"))


def strict(lab: Lab, ns: str = "shop") -> None:
    store(lab).create(r.PEER_AUTHENTICATIONS, ns, {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                                                   "metadata": {"name": "default"},
                                                   "spec": {"mtls": {"mode": "STRICT"}}})


# ---- what curl gets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["ledger", "ledger.shop", "ledger.shop.svc", "ledger.shop.svc.cluster.local"])
def test_every_service_name_form_resolves(lab: Lab, clock: Clock, host: str) -> None:
    start_probe(lab, command=curl(f"http://{host}:8080/"))
    assert exit_code(lab, clock) == 0


def test_plaintext_into_strict_is_reset_exit_56(lab: Lab, clock: Clock) -> None:
    inject(lab, clock, "ledger")
    strict(lab)
    start_probe(lab)
    assert exit_code(lab, clock) == 56


def test_a_workload_policy_is_enforced_on_its_port(lab: Lab, clock: Clock) -> None:
    inject(lab, clock, "ledger")
    store(lab).create(r.PEER_AUTHENTICATIONS, "shop", {
        "metadata": {"name": "ledger"},
        "spec": {"selector": {"matchLabels": {"app": "ledger"}}, "mtls": {"mode": "STRICT"},
                 "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}})
    start_probe(lab)
    assert exit_code(lab, clock) == 0, "port-level PERMISSIVE on the container port"


def test_permissive_with_a_sidecar_answers(lab: Lab, clock: Clock) -> None:
    inject(lab, clock, "ledger")
    start_probe(lab)
    assert exit_code(lab, clock) == 0


def test_strict_without_a_sidecar_at_the_endpoint_answers(lab: Lab, clock: Clock) -> None:
    strict(lab)  # nobody enforces it: ledger has no proxy
    start_probe(lab)
    assert exit_code(lab, clock) == 0


def test_an_excluded_inbound_port_bypasses_the_proxy(lab: Lab, clock: Clock) -> None:
    inject(lab, clock, "ledger", {"traffic.sidecar.istio.io/excludeInboundPorts": "8080"})
    strict(lab)
    start_probe(lab)
    assert exit_code(lab, clock) == 0


def test_an_unknown_service_cannot_be_resolved_exit_6(lab: Lab, clock: Clock) -> None:
    start_probe(lab, command=curl("http://nope.shop.svc.cluster.local:8080/"))
    assert exit_code(lab, clock) == 6


def test_a_bare_name_resolves_in_the_pods_own_namespace(lab: Lab, clock: Clock) -> None:
    start_probe(lab, ns="default", command=curl("http://ledger:8080/"))
    assert exit_code(lab, clock, ns="default") == 6


def test_no_ready_endpoint_is_connection_refused_exit_7(lab: Lab, clock: Clock) -> None:
    lab.set_knobs(("lab", "shop", "ledger"), {"replicas": 0})
    clock.run(2)
    start_probe(lab)
    assert exit_code(lab, clock) == 7


def test_a_port_the_service_does_not_have_times_out_exit_28(lab: Lab, clock: Clock) -> None:
    start_probe(lab, command=["curl", "-sS", "--max-time", "3", "http://ledger.shop:9999/"])
    started = clock.now
    assert exit_code(lab, clock) == 28
    assert clock.now - started >= 3


@pytest.mark.parametrize("container", [
    {"args": ["-sS", "-o", "/dev/null", "--max-time", "5", LEDGER]},  # the image's entrypoint is curl
    {"command": ["sh", "-c", f"curl -sS -o /dev/null --max-time 5 {LEDGER}"]},
    {"command": ["/usr/bin/curl"], "args": ["-fsS", LEDGER]},
])
def test_the_command_line_forms(lab: Lab, clock: Clock, container: dict) -> None:
    inject(lab, clock, "ledger")
    strict(lab)
    store(lab).create(r.PODS, "shop", {"metadata": {"name": "probe", "labels": {"sidecar.istio.io/inject": "false"}},
                                       "spec": {"restartPolicy": "Never", "containers": [
                                           {"name": "probe", "image": "curlimages/curl:8.11.0", **container}]}})
    assert exit_code(lab, clock) == 56


def test_the_endpoint_is_picked_by_the_share_of_ready_pods_with_a_sidecar(lab: Lab, clock: Clock) -> None:
    # Two user pods with a sidecar, two without: a probe lands on either, about half and half.
    lab.set_knobs(("lab", "shop", "user"), {"replicas": 4})
    clock.run(6)
    store(lab).patch(r.NAMESPACES, None, "shop", MERGE, {"metadata": {"labels": {"istio-injection": "enabled"}}})
    for pod in store(lab).list(r.PODS, "shop", "app=user")[:2]:
        store(lab).delete(r.PODS, "shop", pod["metadata"]["name"])  # recreated by the ReplicaSet, with a sidecar
    clock.run(6)
    proxied = [any(c["name"] == "istio-proxy" for c in p["spec"]["containers"])
               for p in store(lab).list(r.PODS, "shop", "app=user")]
    assert sorted(proxied) == [False, False, True, True]
    strict(lab)
    for i in range(40):
        start_probe(lab, name=f"probe-{i}", command=curl("http://user.shop:8080/"))
    codes = [exit_code(lab, clock, f"probe-{i}") for i in range(40)]
    assert set(codes) == {0, 56} and 8 <= codes.count(56) <= 32


# ---- when the outcome is decided, and the pod's life -------------------------------------------------------------
def test_the_pod_goes_pending_running_succeeded_within_start_time_and_a_tick(lab: Lab, clock: Clock) -> None:
    watcher, _ = store(lab).watch(r.PODS, "shop", None, "metadata.name=probe", None)
    start_probe(lab)
    created = clock.now
    code = exit_code(lab, clock)
    assert code == 0 and clock.now - created <= lab.timing.pod_start_seconds + 1.0
    phases = []
    while not watcher.queue.empty():
        phase = watcher.queue.get_nowait().obj.get("status", {}).get("phase")
        if not phases or phases[-1] != phase:
            phases.append(phase)
    assert phases == ["Pending", "Running", "Succeeded"]
    pod = store(lab).get(r.PODS, "shop", "probe")
    done = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert done["reason"] == "Completed" and done["startedAt"] and done["finishedAt"] and "message" not in done
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "False"


def test_a_failed_curl_fails_the_pod_and_its_log_tail_is_the_message_when_asked(lab: Lab, clock: Clock) -> None:
    inject(lab, clock, "ledger")
    strict(lab)
    start_probe(lab, name="plain")
    start_probe(lab, name="logs", terminationMessagePolicy="FallbackToLogsOnError")
    start_probe(lab, name="quiet", command=["curl", "-s", LEDGER], terminationMessagePolicy="FallbackToLogsOnError")
    assert exit_code(lab, clock, "plain") == exit_code(lab, clock, "logs") == exit_code(lab, clock, "quiet") == 56
    assert store(lab).get(r.PODS, "shop", "plain")["status"]["phase"] == "Failed"
    assert terminated(lab, "plain")["reason"] == "Error"
    assert "message" not in terminated(lab, "plain"), "curl writes no termination log; the policy is File"
    assert terminated(lab, "logs")["message"] == "curl: (56) Recv failure: Connection reset by peer\n"
    assert "message" not in terminated(lab, "quiet"), "-s without -S prints nothing"


def test_a_policy_counts_only_if_written_before_the_container_ran(lab: Lab, clock: Clock) -> None:
    inject(lab, clock, "ledger")
    start_probe(lab, name="before")
    assert exit_code(lab, clock, "before") == 0
    strict(lab)
    clock.run(1)
    assert terminated(lab, "before")["exitCode"] == 0, "a finished run does not change"
    start_probe(lab, name="after")  # STRICT written while it is still Pending: it counts
    assert store(lab).get(r.PODS, "shop", "after")["status"]["phase"] == "Pending"
    assert exit_code(lab, clock, "after") == 56


def test_a_probe_with_its_own_sidecar_speaks_mtls_and_never_completes(lab: Lab, clock: Clock) -> None:
    inject(lab, clock, "ledger")
    strict(lab)
    start_probe(lab, inject=True)  # istio-injection=enabled, no opt-out: it gets a sidecar
    assert exit_code(lab, clock) == 0
    pod = store(lab).get(r.PODS, "shop", "probe")
    assert [c["name"] for c in pod["spec"]["containers"]] == ["probe", "istio-proxy"]
    clock.run(5)
    pod = store(lab).get(r.PODS, "shop", "probe")
    # istio-proxy keeps running after curl is done: the pod stays Running (istio/istio#11045).
    assert pod["status"]["phase"] == "Running"
    assert "running" in pod["status"]["containerStatuses"][1]["state"]


def test_restart_policies_other_than_never_run_curl_again(lab: Lab, clock: Clock) -> None:
    body = probe_body("again", curl("http://nope:8080/"))
    body["spec"]["restartPolicy"] = "OnFailure"
    store(lab).create(r.PODS, "shop", body)
    clock.run(8)
    status = store(lab).get(r.PODS, "shop", "again")["status"]
    first = status["containerStatuses"][0]
    assert status["phase"] == "Running" and first["restartCount"] >= 2
    assert first["lastState"]["terminated"]["exitCode"] == 6


def test_a_bare_pod_that_does_not_run_curl_keeps_running(lab: Lab, clock: Clock) -> None:
    store(lab).create(r.PODS, "shop", probe_body("sleeper", ["sleep", "3600"]))
    clock.run(5)
    status = store(lab).get(r.PODS, "shop", "sleeper")["status"]
    assert status["phase"] == "Running" and "running" in status["containerStatuses"][0]["state"]


def test_bare_pods_leave_the_deployments_and_telemetry_alone(lab: Lab, clock: Clock) -> None:
    before = {d["metadata"]["name"]: d["status"]["readyReplicas"] for d in store(lab).list(r.DEPLOYMENTS, "shop")}
    start_probe(lab, name="ledger-probe")  # named like a deployment's pod, owned by nobody
    start_probe(lab, name="sleeper", command=["sleep", "3600"])
    clock.run(5)
    after = {d["metadata"]["name"]: d["status"]["readyReplicas"] for d in store(lab).list(r.DEPLOYMENTS, "shop")}
    assert after == before and len(store(lab).list(r.PODS, "shop", "app=ledger")) == 2
    names = {m.name for m in lab.telemetry.families(lab.metric_sources())}
    assert "container_memory_working_set_bytes" in names
    assert lab.flows.workloads[("lab", "shop", "ledger")].ok == 1.0


# ---- through the API: the kubernetes client against `meshlab serve` -------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabProcess]:
    workdir = tmp_path_factory.mktemp("probes")
    topology = {
        "clusters": [{"name": "lab", "namespaces": [{"name": "shop", "labels": {"istio-injection": "enabled"}},
                                                    {"name": "legacy"}]}],
        "services": [{"name": "ledger", "namespace": "shop"}, {"name": "ledger", "namespace": "legacy"}],
        "peer_authentications": [{"namespace": "istio-system", "name": "default", "mode": "STRICT"}],
    }
    parse_topology(topology)
    path = Path(workdir) / "topology.yaml"
    path.write_text(yaml.safe_dump(topology))
    with LabProcess(path, workdir, extra_args=["--tick-seconds", "0.2", "--pod-start-seconds", "0.5"]) as started:
        yield started


@pytest.mark.parametrize(("ns", "code"), [("shop", 56), ("legacy", 0)])
def test_the_kubernetes_client_reads_the_probes_exit_code(served: LabProcess, ns: str, code: int) -> None:
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(config_file=served.kubeconfig()))
    body = probe_body("probe", curl(f"http://ledger.{ns}.svc.cluster.local:8080/"))
    core.create_namespaced_pod(ns, body)

    def finished() -> client.V1ContainerStateTerminated | None:
        pod = core.read_namespaced_pod("probe", ns)
        statuses = pod.status.container_statuses or []
        return statuses[0].state.terminated if statuses else None

    done = eventually(finished, timeout=20, what=f"the probe in {ns} to finish")
    assert done.exit_code == code  # type: ignore[union-attr]
    pod = core.read_namespaced_pod("probe", ns)
    assert pod.status.phase == ("Succeeded" if code == 0 else "Failed")
    assert [c.name for c in pod.spec.containers] == ["probe"], "sidecar.istio.io/inject=false"
    core.delete_namespaced_pod("probe", ns)

