"""The OpenTelemetry Collector's servicegraph connector as the lab emits it (issue 16): the call graph before any
sidecar exists, with the connector's names, labels and virtual nodes for callers and callees that are not traced.
Each read is what Prometheus would scrape (the exposition's samples)."""

from __future__ import annotations

import pytest

from meshlab import resources as r
from meshlab.lab import Lab
from meshlab.topology import TopologyError, parse_topology
from tests.lab.sim import Clock
from tests.lab.test_gate_faults import increase, scraped

EDGE = "traces_service_graph_request_total"


def edge(client: str, server: str, connection_type: str = "", failed: str | None = None):
    def match(found: dict[str, str]) -> bool:
        return (found.get("client") == client and found.get("server") == server
                and found.get("connection_type") == connection_type and (failed is None or found["failed"] == failed))
    return match


def test_traced_callers_are_named_and_untraced_ones_are_the_user_virtual_node(lab: Lab, clock: Clock) -> None:
    clock.run(2)
    # the gateway (20 rps from outside: root server spans) calls api-gateway, which calls auth once per request
    assert increase(clock, 10, lambda: scraped(lab, EDGE, edge("api-gateway", "auth"))) == pytest.approx(200, rel=0.01)
    assert increase(clock, 10, lambda: scraped(lab, EDGE, edge("user", "istio-ingressgateway", "virtual_node"))) \
        == pytest.approx(200, rel=0.01)
    # batch-processor runs outside Kubernetes, untraced: its 2 rps into ledger come from the "user" virtual node
    assert increase(clock, 10, lambda: scraped(lab, EDGE, edge("user", "ledger", "virtual_node"))) \
        == pytest.approx(20, rel=0.01)
    assert scraped(lab, EDGE, edge("batch-processor", "ledger")) == 0


def test_series_carry_the_connectors_labels_and_the_dimensions_of_the_traced_side_only(lab: Lab, clock: Clock) -> None:
    clock.run(2)
    samples = {s.name: s.labels for f in lab.telemetry.families(lab.metric_sources()) for s in f.samples
               if s.name.startswith("traces_service_graph") and s.labels["client"] == "user"
               and s.labels["server"] == "ledger"}
    assert set(samples) >= {EDGE, "traces_service_graph_request_server_seconds_bucket",
                            "traces_service_graph_request_client_seconds_bucket",
                            "traces_service_graph_request_server_seconds_count"}
    labels = samples[EDGE]
    assert labels["failed"] == "false" and labels["cluster"] == "lab"
    assert labels["server_service_namespace"] == "shop" and labels["server_k8s_cluster_name"] == "lab"
    assert labels["client_service_namespace"] == "" and labels["client_k8s_cluster_name"] == ""


TOPOLOGY = {
    "clusters": [{"name": "c"}],
    "services": [
        {"name": "web", "namespace": "a", "ingress_rps": 10, "calls": [{"service": "old"}, {"service": "db",
                                                                                           "protocol": "tcp"}]},
        {"name": "old", "namespace": "a", "legacy": True, "calls": [{"service": "api", "per_request": 0.5}]},
        {"name": "api", "namespace": "a", "error_rate": 0.1, "calls": [{"service": "web", "per_request": 0.2,
                                                                        "cycle": True}]},
        {"name": "db", "namespace": "a", "kind": "external", "port": 5432},
    ],
}


def test_untraced_callees_databases_failures_and_a_cycle() -> None:
    lab = Lab(parse_topology(TOPOLOGY))
    clock = Clock(lab)
    clock.run(2)
    # a legacy callee is not traced: web's client spans expire unpaired and name it by peer.service
    assert increase(clock, 10, lambda: scraped(lab, EDGE, edge("web", "old", "virtual_node"))) \
        == pytest.approx(100, rel=0.01)
    # a legacy caller is not traced either: api's server spans are roots, "user"; 10 % of them failed
    assert increase(clock, 10, lambda: scraped(lab, "traces_service_graph_request_failed_total",
                                               edge("user", "api", "virtual_node", "true"))) == pytest.approx(5, 0.01)
    assert increase(clock, 10, lambda: scraped(lab, EDGE, edge("web", "db", "database"))) \
        == pytest.approx(100, rel=0.01)
    # the call that closes the cycle api -> web carries its rate: 0.2 x api's 5 rps
    assert increase(clock, 10, lambda: scraped(lab, EDGE, edge("api", "web"))) == pytest.approx(10, rel=0.01)


def test_a_cycle_is_refused_unless_a_call_closes_it_explicitly() -> None:
    cyclic = {**TOPOLOGY, "services": [{**s, "calls": [{k: v for k, v in c.items() if k != "cycle"}
                                                       for c in s.get("calls", [])]} for s in TOPOLOGY["services"]]}
    with pytest.raises(TopologyError, match="calls form a cycle"):
        parse_topology(cyclic)


def test_deployment_labels_come_from_the_topology() -> None:
    topology = {"clusters": [{"name": "c"}], "services": [{"name": "web", "labels": {"criticality": "low"}}]}
    lab = Lab(parse_topology(topology))
    dep = lab.clusters["c"].store.peek(r.DEPLOYMENTS, "default", "web")
    assert dep["metadata"]["labels"] == {"criticality": "low", "app": "web"}
