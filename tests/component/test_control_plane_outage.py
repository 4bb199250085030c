"""A cluster's API server unreachable for a while (the lab's outage admin endpoint), seen through the kubernetes
client and through meshwave's undo steps (issue 13 item 6, safety review finding 9).

The outage closes one cluster's API port (new connections refused) and resets the open ones; the other cluster keeps
answering and the cluster's data plane keeps serving. meshwave's undo steps fail fast with an error Airflow retries
(not an AirflowFailException), and a retry after the outage reads before it writes: it completes, and once more
changes nothing.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client, config

from meshlab.server import kubeconfig
from meshstack.process import LabProcess
from meshwave import steps
from meshwave.kube import ClusterUnreachable, MeshKube
from meshwave.plan import parse_plan
from meshwave.service_group import recording
from meshwave.steps import Service
from tests.component.kubes import api_client
from tests.conftest import eventually


class NoCalls:
    """A Prometheus in which web's proxy reported no outbound call (this lab runs no Prometheus): the removal's
    outbound check finds nothing to relax, and the test is about the API server's outage."""

    cluster = None

    def instant(self, query: str) -> list[Any]:
        return []


NO_CALLS = NoCalls()
TOPOLOGY = {
    "name": "outage",
    "clusters": [{"name": "a", "namespaces": [{"name": "undo", "labels": {"istio-injection": "enabled"}}]},
                 {"name": "b"}],
    "services": [
        {"name": "api", "cluster": "a", "namespace": "undo", "latency_ms": 2},
        {"name": "web", "cluster": "a", "namespace": "undo", "latency_ms": 2},
        # plaintext caller (no sidecar): cut off from api while the team's STRICT policy is in force
        {"name": "cron", "cluster": "a", "namespace": "jobs", "kind": "external", "ingress_rps": 4,
         "calls": [{"service": "undo/api"}, {"service": "undo/web"}]},
        {"name": "web", "cluster": "b", "namespace": "shop", "ingress_rps": 5, "latency_ms": 2},
    ],
    "peer_authentications": [{"cluster": "a", "namespace": "undo", "name": "team-api", "mode": "STRICT",
                              "selector": {"app": "api"}}],
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabProcess]:
    work = tmp_path_factory.mktemp("outage")
    (work / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    with LabProcess(work / "topology.yaml", work / "lab") as running:
        yield running


@pytest.fixture(autouse=True)
def no_outage_left(lab: LabProcess) -> Iterator[None]:
    yield
    for cluster in ("a", "b"):
        lab.outage(cluster, 0)


def service(workload: str, action: str) -> Service:
    plan = parse_plan({"migration": "outage", "clusters": {"a": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}},
                       "waves": [{"name": "w", "services": [{"cluster": "a", "namespace": "undo",
                                                             "workload": workload}]}]})
    svc = plan.waves[0].services[0]
    return Service(svc, svc.settings(plan.defaults), plan.clusters["a"], batch=1, action=action)


class TaskInstance:
    """What `recording()` uses of a task instance: the XComs it pushes."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def metric_total(lab: LabProcess, name: str, **labels: str) -> float:
    """The sum of one counter's samples matching `labels`, from the lab's own /metrics (what Prometheus scrapes)."""
    with urllib.request.urlopen(lab.state["metrics"], timeout=10) as resp:
        text = resp.read().decode()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in wanted))


def test_an_outage_refuses_new_connections_and_resets_open_ones_on_that_cluster_only(lab: LabProcess) -> None:
    core_a, core_b = client.CoreV1Api(api_client(lab, "a")), client.CoreV1Api(api_client(lab, "b"))
    assert len(core_a.list_namespaced_pod("undo").items) == 4  # a kept-alive connection in the client's pool
    server = lab.state["clusters"]["a"]["server"]
    # a watch, as controllers and rollout followers hold them: its first event read, the stream left open
    watching = urllib.request.urlopen(f"{server}/api/v1/namespaces/undo/pods?watch=true&timeoutSeconds=60",
                                      timeout=10)
    assert json.loads(watching.readline())["type"] == "ADDED"

    status = lab.outage("a", 4)
    assert (status["down"], status["cluster"]) == (True, "a") and 3 < status["seconds_left"] <= 4
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.MaxRetryError) as refused:
        core_a.list_namespaced_pod("undo")
    assert isinstance(refused.value.reason, urllib3.exceptions.NewConnectionError), refused.value.reason
    assert "refused" in str(refused.value.reason).lower()
    assert time.monotonic() - started < 1, "a refused connection fails at once"
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", status["port"]), timeout=2):
        pass
    with pytest.raises(ConnectionResetError):  # the open watch is cut, as a dying server cuts it
        while watching.readline():
            pass
    assert len(core_b.list_namespaced_pod("shop").items) == 2, "the other cluster keeps answering"

    eventually(lambda: not lab.admin("GET", "/clusters/a/outage")["down"], timeout=10, what="the outage's end")
    assert len(core_a.list_namespaced_pod("undo").items) == 4, "the same client works once it is back"
    assert lab.admin("GET", "/clusters/a/outage")["outages"] == 1


def test_the_data_plane_keeps_serving_while_the_api_server_is_away(lab: LabProcess) -> None:
    lab.outage("a", 30)
    before = metric_total(lab, "http_requests_total", cluster="a", namespace="undo", app="web")
    described = lab.admin("GET", "/services/a/undo/web")
    eventually(lambda: metric_total(lab, "http_requests_total", cluster="a", namespace="undo", app="web") > before + 4,
               timeout=10, what="web's request counter advancing during the outage")
    assert lab.admin("GET", "/clusters/a/outage")["down"], "still down: the counter advanced without the API server"
    assert (described["available"], described["sidecar_fraction"], described["success_rate"]) == (True, 1.0, 1.0)
    assert lab.outage("a", 0)["down"] is False, "0 ends an outage early"
    assert len(client.CoreV1Api(api_client(lab, "a")).list_namespaced_pod("undo").items) == 4


@pytest.mark.parametrize(("path", "body", "code"), [
    ("/clusters/nowhere/outage", {"seconds": 5}, 404),
    ("/clusters/a/outage", {"seconds": -1}, 400),
    ("/clusters/a/outage", {"seconds": "120"}, 400),
    ("/clusters/a/outage", {"seconds": True}, 400),
    ("/clusters/a/outage", {"minutes": 2}, 400),
    ("/clusters/a/outage", {"seconds": 10**9}, 400),
])
def test_the_outage_endpoint_checks_its_input(lab: LabProcess, path: str, body: Any, code: int) -> None:
    with pytest.raises(urllib.error.HTTPError) as answer:
        lab.admin("POST", path, body)
    assert answer.value.code == code
    assert lab.admin("GET", "/clusters/a/outage")["down"] is False, "a refused request changes nothing"


def test_undo_steps_fail_retryably_during_an_outage_and_complete_after_it(lab: LabProcess) -> None:
    kube = MeshKube(api_client(lab, "a"), "a")
    back, remove = service("api", "permissive"), service("web", "remove_sidecar")
    assert lab.admin("GET", "/services/a/undo/api")["mtls_mode"] == "STRICT"
    lab.outage("a", 6)
    for undo in (lambda: steps.back_to_permissive(back, kube, "meshwave test"),
                 lambda: steps.rollback_injection(remove, kube, NO_CALLS)):
        ti = TaskInstance()
        started = time.monotonic()
        # recording() is how every undo step runs: an AirflowFailException here would end the undo for good
        with pytest.raises(ClusterUnreachable, match="connection refused"), recording({"ti": ti}, "back_to_permissive"):
            undo()
        assert time.monotonic() - started < 2, "one try fails fast: Airflow's backoff does the waiting"
        assert ti.pushed["error"]["step"] == "back_to_permissive"
        assert "connection refused" in ti.pushed["error"]["message"]

    eventually(lambda: not lab.admin("GET", "/clusters/a/outage")["down"], timeout=15, what="the outage's end")
    relaxed = steps.back_to_permissive(back, kube, "meshwave test")
    assert [(c["action"], c["applied"]) for c in relaxed.changes] == [("relax-mtls", True)], relaxed
    assert lab.admin("GET", "/services/a/undo/api")["mtls_mode"] == "PERMISSIVE"
    removed = steps.rollback_injection(remove, kube, NO_CALLS)
    assert [(c["action"], c["applied"]) for c in removed.changes][-1] == ("remove-injection", True), removed
    # a retry of a step that did complete (its answer lost) reads first and changes nothing
    again = [*steps.back_to_permissive(back, kube, "meshwave test").changes,
             *steps.rollback_injection(remove, kube, NO_CALLS).changes]
    assert not any(c["applied"] for c in again), again
    eventually(lambda: lab.admin("GET", "/services/a/undo/web")["sidecar_fraction"] == 0.0, timeout=30,
               what="web's pods rolled without a sidecar")


def test_a_server_that_never_answers_costs_one_read_timeout_per_try_and_two_tries(tmp_path: Path) -> None:
    """The client's urllib3 pool retried each GET three more times, unseen: four read timeouts per call (a minute at
    meshwave's 15 s) before the step's own error. One quick retry is left (a pooled connection the server just
    closed); retrying longer is Airflow's job, with backoff."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections land in the backlog; nothing ever answers
        path = tmp_path / "silent.kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig("silent", f"http://127.0.0.1:{silent.getsockname()[1]}")))
        kube = MeshKube(config.new_client_from_config(config_file=str(path)), "silent", read_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(ClusterUnreachable, match="no answer within 1s"):
            kube.deployment("undo", "api")
        took = time.monotonic() - started
    assert 1.9 < took < 3.0, f"{took:.1f}s for a GET with a 1 s read timeout"
