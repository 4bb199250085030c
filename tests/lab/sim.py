"""A simulated clock for an in-process lab: ticks it in steps, without waiting for real time."""

from __future__ import annotations

import time

from meshlab.lab import Lab
from meshlab.store import Store


class Clock:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.now = time.monotonic()

    def run(self, seconds: float, step: float = 0.5) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            self.lab.tick(self.now)


def store(lab: Lab) -> Store:
    """The store of the small topology's one cluster."""
    return lab.clusters["lab"].store
