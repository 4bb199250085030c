"""The lab writes its kubeconfigs for the owner only (0600), whatever the umask, and they still work."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshlab.server import _write_atomic
from meshstack.process import LabProcess

TOPOLOGY = {"clusters": [{"name": "lab", "namespaces": [{"name": "shop"}]}],
            "services": [{"name": "ledger", "namespace": "shop"}]}


@pytest.fixture()
def loose_umask() -> Iterator[None]:
    """A umask that would leave a file world-readable (and writable): the mode must not depend on it."""
    before = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(before)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_served_labs_kubeconfigs_are_0600_and_the_client_reads_them(tmp_path: Path, loose_umask: None) -> None:
    from kubernetes import client, config

    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump(TOPOLOGY))
    with LabProcess(topology, tmp_path / "lab") as lab:  # the child inherits the umask 000
        path = lab.kubeconfig("lab")
        assert mode(path) == 0o600, f"{path}: {oct(mode(path))}"
        assert mode(lab.workdir / "state.json") == 0o666, "the state file (no credentials) keeps the umask's mode"
        core = client.CoreV1Api(config.new_client_from_config(config_file=path))
        assert [p.metadata.name for p in core.list_namespaced_pod("shop").items], "the kubeconfig still works"


def test_a_left_over_tmp_file_does_not_keep_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "x.kubeconfig"
    left = tmp_path / "x.kubeconfig.tmp"
    left.write_text("old")
    left.chmod(0o666)
    _write_atomic(path, "new", 0o600)
    assert mode(path) == 0o600 and path.read_text() == "new" and not left.exists()
