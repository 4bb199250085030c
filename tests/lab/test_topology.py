"""Topology validation: a bad file names the file, the field and the problem; the CLI exits non-zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshlab.topology import TopologyError, load_topology
from tests.conftest import SMALL

GOOD = """
clusters: [{name: c1}]
services:
  - {name: a, namespace: shop, calls: [{service: b}]}
  - {name: b, namespace: shop}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    return path


def test_small_topology_is_valid() -> None:
    topology = load_topology(SMALL)
    assert {s.name for s in topology.services} >= {"api-gateway", "auth", "user", "payment", "email-service"}


def test_calls_are_resolved_to_cluster_namespace_name(tmp_path: Path) -> None:
    topology = load_topology(write(tmp_path, GOOD))
    assert topology.services[0].calls[0].service == "c1/shop/b"


@pytest.mark.parametrize(("text", "message"), [
    ("clusters: []", "clusters: List should have at least 1 item"),
    ("clusters: [{name: C1}]", "clusters[0].name: Value error, 'C1' is not a valid RFC 1123 label"),
    (GOOD.replace("{service: b}", "{service: nope}"), "services[0].calls[0].service: unknown service 'nope'"),
    (GOOD.replace("namespace: shop}", "namespace: shop, calls: [{service: a}]}"), "calls form a cycle"),
    (GOOD.replace("{name: b, namespace: shop}", "{name: b, namespace: shop, error_rate: 3}"),
     "services[1].error_rate: Input should be less than or equal to 1"),
    (GOOD.replace("{name: b, namespace: shop}", "{name: b, namespace: shop, colour: red}"),
     "services[1].colour: Extra inputs are not permitted"),
    (GOOD.replace("{name: b, namespace: shop}", "{name: a, namespace: shop}"), "duplicate service c1/shop/a"),
    ("clusters: [{name: c1}]\nservices: [{name: a, cluster: c9}]", "services[0].cluster: unknown cluster 'c9'"),
    ("- just\n- a list", "the topology must be a mapping"),
    ("clusters: [unclosed", "not valid YAML"),
])
def test_bad_topologies_name_the_file_field_and_problem(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert str(info.value).startswith(str(path))
    assert message.replace("Value error, ", "") in str(info.value)


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "meshlab", "validate", str(SMALL)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok: 1 clusters, 7 deployments" in ok.stdout
    bad = write(tmp_path, GOOD.replace("{service: b}", "{service: nope}"))
    result = subprocess.run([sys.executable, "-m", "meshlab", "validate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{bad}: services[0].calls[0].service: unknown service 'nope'"
    missing = subprocess.run([sys.executable, "-m", "meshlab", "serve", "--topology", str(tmp_path / "none.yaml")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "none.yaml: cannot read" in missing.stderr
