"""The small lab, one per test module that asks for it (modules touch disjoint workloads within it), and a
MeshKube on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshstack.process import LabProcess
from meshwave.kube import MeshKube
from tests.component.kubes import api_client
from tests.conftest import SMALL


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabProcess]:
    with LabProcess(SMALL, tmp_path_factory.mktemp("lab")) as running:
        yield running


@pytest.fixture
def kube(lab: LabProcess) -> MeshKube:
    return MeshKube(api_client(lab), "lab")
