"""The small lab in-process and a simulated clock to tick it, for the lab's own tests."""

from __future__ import annotations

import pytest

from meshlab.lab import Lab
from meshlab.topology import load_topology
from tests.conftest import SMALL
from tests.lab.sim import Clock


@pytest.fixture
def lab() -> Lab:
    return Lab(load_topology(SMALL))


@pytest.fixture
def clock(lab: Lab) -> Clock:
    return Clock(lab)
