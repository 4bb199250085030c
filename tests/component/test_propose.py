"""`meshwave plan propose` against a running lab and a real Prometheus (issue 16): the waves, the STRICT flags and
their reasons, the cost, a plan that validates; an unreachable cluster or Prometheus writes nothing."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshstack.process import LabProcess, PrometheusProcess, free_port
from meshwave.cli import main
from meshwave.plan import load_plan

pytestmark = pytest.mark.component

TOPOLOGY = Path(__file__).with_name("propose.yaml")
SHOP = "pc/shop/"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabProcess, PrometheusProcess]]:
    workdir = tmp_path_factory.mktemp("propose")
    with LabProcess(TOPOLOGY, workdir / "lab") as lab, \
            PrometheusProcess([lab.metrics_target], workdir / "prom") as prom:
        time.sleep(24)  # a 20 s lookback of scrapes every 2 s
        yield lab, prom


def propose(lab: LabProcess, prom_url: str, out: Path, *extra: str) -> int:
    return main(["plan", "propose", "--kubeconfig", f"pc={lab.kubeconfig('pc')}", "--prometheus", prom_url,
                 "--lookback", "20s", "--max-wave", "3", "--max-batch", "2", "--conn-prefix", "lab",
                 "--out", str(out), *extra])


@pytest.fixture(scope="module")
def proposed(stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "shop-mesh.yaml"
    assert propose(stack[0], stack[1].url, out) == 0  # how long it takes: `make bench` (bench/propose_cost.py)
    return out


def services(path: Path) -> list[list[dict]]:
    return [w["services"] for w in yaml.safe_load(path.read_text())["waves"]]


def test_the_plan_validates_and_names_the_connections(proposed: Path) -> None:
    assert main(["plan", "validate", str(proposed)]) == 0
    (plain := proposed.with_name("plain.txt")).touch()
    assert {p.stat().st_mode for p in proposed.parent.iterdir()} == {plain.stat().st_mode}, \
        "the plan and its summary are readable as any file written there (the DAG parser may be another user)"
    plan = load_plan(proposed)
    assert plan.migration == "shop-mesh"
    assert plan.clusters["pc"].kubernetes_conn_id == "lab_pc"
    assert plan.clusters["pc"].prometheus_conn_id == "lab_prometheus_pc"
    assert [w.after for w in plan.waves] == [None, "wave-1", "wave-2", "wave-3"]
    assert plan.defaults.batch_size == 2


def test_waves_pilot_first_callers_before_callees_the_cycle_together_idle_last(proposed: Path) -> None:
    waves = [[f"{s['namespace']}/{s['workload']}" for s in wave] for wave in services(proposed)]
    assert waves == [["shop/report", "shop/front"], ["shop/search", "shop/cart", "shop/pricing"],
                     ["shop/invoice", "shop/ledger"], ["shop/archive"]]
    assert all("ops/prober" not in w for w in waves)  # its namespace disables injection: never planned


def test_strict_only_when_every_caller_is_meshed_with_the_reason_as_a_comment(proposed: Path) -> None:
    strict = {s["workload"]: s.get("strict", True) for wave in services(proposed) for s in wave}
    assert strict == {"report": False, "front": False, "search": True, "cart": True, "pricing": True,
                      "invoice": False, "ledger": False, "archive": False}
    text = proposed.read_text()
    assert "# strict: false: callers that stay without a sidecar: pc/ops/prober (namespace ops has " \
           "istio-injection=disabled)" in text
    assert "workload: ledger" in text and "user (not traced: its calls start new traces" in text
    assert "unseen callers (requests its own metrics count that no trace and no proxy attribute" in text
    assert "no observed traffic in the lookback" in text


def test_an_undersized_proxy_is_listed_with_what_it_needs(proposed: Path) -> None:
    pricing = next(s for wave in services(proposed) for s in wave if s["workload"] == "pricing")
    assert pricing["sidecar"] == {"memory_limit": "192Mi"}
    assert "istio-proxy memory limit 96Mi (the sidecar.istio.io/proxy* annotations) < the sidecar's expected " \
           "150Mi: needs 192Mi; the pod then needs 704Mi (app 512Mi)" in proposed.read_text()


def test_the_summary_has_the_cost_per_cluster_and_the_longest_chain(proposed: Path) -> None:
    summary = proposed.with_suffix(".md").read_text()
    # 7 services at Istio's default proxy (100m/128Mi, limits 2000m/1024Mi), pricing's 2 at its 192Mi limit alone
    assert "| pc | 8 | 16 | 1400m | 28000m (+2 unlimited) | 2176Mi | 14720Mi |" in summary
    assert "| fleet | 8 | 16 | 1400m | 28000m (+2 unlimited) | 2176Mi | 14720Mi |" in summary
    assert "- 3 hops, +105-150 ms: user -> pc/istio-system/istio-ingressgateway -> pc/shop/front -> pc/shop/cart " \
           "-> pc/shop/ledger" in summary
    assert "- `pc/ops/prober`: namespace ops has istio-injection=disabled" in summary


def test_the_inventory_reads_gitops_owners_and_criticality(stack) -> None:
    from kubernetes import config

    from meshwave.kube import MeshKube
    from meshwave.propose.inventory import read_inventory

    kube = MeshKube(config.new_client_from_config(config_file=stack[0].kubeconfig("pc")), "pc")
    found = read_inventory({"pc": kube}).by_key()
    assert found[SHOP + "cart"].gitops == "Argo CD (argocd.argoproj.io/instance: shop)"
    assert found[SHOP + "ledger"].criticality == "high" and found[SHOP + "invoice"].criticality == "medium"
    assert found[SHOP + "pricing"].proxy.memory_limit_mi == 96 and found[SHOP + "cart"].replicas == 2
    assert found["pc/istio-system/istio-ingressgateway"].gateway


def test_an_unreachable_cluster_is_named_and_nothing_is_written(stack, tmp_path: Path, capsys) -> None:
    lab, prom = stack
    broken = tmp_path / "down.kubeconfig"
    text = Path(lab.kubeconfig("pc")).read_text()
    server = yaml.safe_load(text)["clusters"][0]["cluster"]["server"]
    broken.write_text(text.replace(server, f"http://127.0.0.1:{free_port()}"))
    out = tmp_path / "plan.yaml"
    assert main(["plan", "propose", "--kubeconfig", f"pc={lab.kubeconfig('pc')}", "--kubeconfig", f"down={broken}",
                 "--prometheus", prom.url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cluster down (kubeconfig {broken}): cluster down (http://127.0.0.1:" in err
    assert err.rstrip().endswith("nothing written")
    assert list(tmp_path.iterdir()) == [broken]


def test_an_unreachable_prometheus_is_named_and_nothing_is_written(stack, tmp_path: Path, capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "plan.yaml"
    assert propose(stack[0], url, out) == 2
    err = capsys.readouterr().err
    assert f"Prometheus for pc: Prometheus at {url}: cannot connect" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == []


def test_the_picture_colours_every_wave_s_services_in_the_wave_s_colour(proposed: Path) -> None:
    """The PNG beside the plan, opened: each wave's colour (viridis, first wave to last) is on it, and grey for
    what is not planned."""
    from matplotlib import colormaps
    from PIL import Image

    image = Image.open(proposed.with_suffix(".png")).convert("RGB")
    assert image.width > 800 and image.height > 600
    seen = set(image.getdata())
    waves = len(services(proposed))
    for wave in range(waves):
        rgb = tuple(round(255 * c) for c in colormaps["viridis"](wave / (waves - 1))[:3])
        assert any(max(abs(a - b) for a, b in zip(rgb, pixel, strict=True)) <= 2 for pixel in seen), \
            f"wave {wave + 1}'s colour {rgb} is not in the picture"
    assert (211, 211, 211) in seen, "lightgrey: a node not planned (the gateway, the prober, user)"


def lab_connections(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lab: LabProcess, prom_url: str) -> None:
    """The lab's connections as the DAGs would find them, in AIRFLOW_CONN_<ID> (meshstack.process.AirflowProcess)."""
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))  # the metastore searched after them: not ~/airflow
    monkeypatch.setenv("AIRFLOW_CONN_LAB_PC", json.dumps({"conn_type": "kubernetes",
                                                          "extra": {"kube_config_path": lab.kubeconfig("pc")}}))
    monkeypatch.setenv("AIRFLOW_CONN_LAB_PROMETHEUS_PC", json.dumps({"conn_type": "http", "host": prom_url,
                                                                     "extra": {"cluster": "pc"}}))


def without_rates(text: str) -> list[str]:
    """The plan's lines after the header line, its callers' rates masked: two reads a moment apart may differ in
    the last digit."""
    return [re.sub(r"\d[\d.e+-]*/s", "N/s", line) for line in text.splitlines()[1:]]


def test_the_plan_through_airflow_connections_is_the_one_through_kubeconfigs(stack, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    lab, prom = stack
    lab_connections(monkeypatch, tmp_path, lab, prom.url)
    direct, through = tmp_path / "direct" / "shop-mesh.yaml", tmp_path / "conn" / "shop-mesh.yaml"
    assert propose(lab, prom.url, direct) == 0
    assert main(["plan", "propose", "--conn", "pc=lab_pc,lab_prometheus_pc", "--lookback", "20s", "--max-wave", "3",
                 "--max-batch", "2", "--out", str(through)]) == 0
    assert "from pc (their Airflow connections), telemetry of the last 20s" in through.read_text().splitlines()[0]
    # the connection ids are the ones given, not --conn-prefix's (its default would be meshwave_pc)
    assert without_rates(through.read_text()) == without_rates(direct.read_text())
    assert load_plan(through).clusters["pc"].prometheus_conn_id == "lab_prometheus_pc"


def test_a_missing_or_unreachable_connection_is_named_and_nothing_is_written(stack, tmp_path: Path, capsys,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    lab, _ = stack
    down = f"http://127.0.0.1:{free_port()}"
    lab_connections(monkeypatch, tmp_path, lab, down)
    out = tmp_path / "plans" / "plan.yaml"
    assert main(["plan", "propose", "--conn", "pc=lab_pc,lab_prom_pc", "--out", str(out)]) == 2
    assert "cluster pc: Prometheus connection lab_prom_pc is not defined (searched: the secrets backend, " \
           "AIRFLOW_CONN_LAB_PROM_PC, the metastore); nothing written" in capsys.readouterr().err
    assert main(["plan", "propose", "--conn", "pc=lab_pc,lab_prometheus_pc", "--out", str(out)]) == 2
    assert f"Prometheus for pc (connection lab_prometheus_pc): Prometheus at {down}: cannot connect" in \
        capsys.readouterr().err
    assert main(["plan", "propose", "--conn", "pc=lab_pc,lab_prometheus_pc", "--kubeconfig",
                 f"pc={lab.kubeconfig('pc')}", "--out", str(out)]) == 2
    assert "--conn reads the clusters through Airflow connections, --kubeconfig and --prometheus directly: give " \
           "one or the other, not both" in capsys.readouterr().err
    assert not out.parent.exists()


def test_an_excluded_workload_is_not_planned_and_keeps_its_callees_permissive(stack, tmp_path: Path,
                                                                              capsys) -> None:
    lab, prom = stack
    out = tmp_path / "shop-mesh.yaml"
    assert propose(lab, prom.url, out, "--exclude", "pc/shop/cart=crash-loops with a sidecar") == 0
    planned = {s["workload"]: s for wave in services(out) for s in wave}
    assert "cart" not in planned
    # cart calls pricing and ledger: neither is STRICT while it stays without a sidecar; search (called by front
    # alone, meshed in the pilot) still is
    assert (planned["pricing"].get("strict"), planned["ledger"].get("strict"), planned["search"].get("strict")) == \
        (False, False, None)
    text = out.read_text()
    assert "# strict: false: callers that stay without a sidecar: pc/shop/cart (excluded: crash-loops with a " \
           "sidecar), " in text
    assert "# Not planned: pc/shop/cart: excluded: crash-loops with a sidecar" in text
    assert "- `pc/shop/cart`: excluded: crash-loops with a sidecar" in out.with_suffix(".md").read_text()
    assert propose(lab, prom.url, tmp_path / "typo.yaml", "--exclude", "pc/shop/kart=legacy") == 2
    assert "--exclude pc/shop/kart: no such Deployment in the clusters read; nothing written" in \
        capsys.readouterr().err
    assert not (tmp_path / "typo.yaml").exists()


def test_defaults_a_team_reviewed_are_carried_from_a_plan(stack, proposed: Path, tmp_path: Path) -> None:
    lab, prom = stack
    reviewed = tmp_path / "reviewed.yaml"
    plan = yaml.safe_load(proposed.read_text())
    plan["defaults"] |= {"batch_size": 1, "soak_seconds": 90, "thresholds": {"max_p99_ratio": 1.5},
                         "sidecar": {"expected_memory_mi": 80}}
    reviewed.write_text(yaml.safe_dump(plan))
    out = tmp_path / "again.yaml"
    assert main(["plan", "propose", "--kubeconfig", f"pc={lab.kubeconfig('pc')}", "--prometheus", prom.url,
                 "--lookback", "20s", "--max-wave", "3", "--defaults-from", str(reviewed), "--out", str(out)]) == 0
    defaults = load_plan(out).defaults
    assert (defaults.soak_seconds, defaults.thresholds.max_p99_ratio) == (90, 1.5)
    assert defaults.verify_seconds == 120 and defaults.thresholds.max_restarts == 0, "meshwave's, as it sets none"
    # batch_size and the sidecar's expected memory shape the proposal: the carried ones, unless given
    assert (defaults.batch_size, defaults.sidecar.expected_memory_mi) == (1, 80)
    assert [len(w) for w in services(out)][0] == 1, "the pilot wave is one batch"
    assert "sidecar" not in next(s for w in services(out) for s in w if s["workload"] == "pricing"), \
        "its 96Mi proxy holds the expected 80Mi"
    assert propose(lab, prom.url, out, "--defaults-from", str(reviewed), "--sidecar-memory-mi", "150") == 0
    defaults = load_plan(out).defaults
    assert (defaults.batch_size, defaults.sidecar.expected_memory_mi, defaults.soak_seconds) == (2, 150, 90)
