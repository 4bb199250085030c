"""Airflow's own metrics over StatsD, received on a loopback UDP port: how long each scheduler loop took.

Airflow times every scheduler loop (`scheduler.scheduler_loop_duration`, jobs/scheduler_job_runner.py) and sends it
through its StatsD logger when `[metrics] statsd_on` is set (the `statsd` package, Airflow's `statsd` extra). This
sink is the StatsD server: it keeps each timer value with the time it arrived, so a benchmark reads the loops of
one run's span. Only timers are kept; counters and gauges are dropped.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

PREFIX = "airflow"
SCHEDULER_LOOP = "scheduler.scheduler_loop_duration"


@dataclass
class StatsdSink:
    timers: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> [(arrived, ms)]
    _sock: socket.socket = field(init=False)
    _thread: threading.Thread = field(init=False)

    def __enter__(self) -> StatsdSink:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.5)
        self._running = True
        self._thread = threading.Thread(target=self._receive, name="statsd-sink", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._running = False
        self._thread.join(timeout=5)
        self._sock.close()

    @property
    def env(self) -> dict[str, str]:
        """What Airflow's components need to send their metrics here."""
        return {"AIRFLOW__METRICS__STATSD_ON": "True", "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
                "AIRFLOW__METRICS__STATSD_PORT": str(self._sock.getsockname()[1]),
                "AIRFLOW__METRICS__STATSD_PREFIX": PREFIX}

    def _receive(self) -> None:
        while self._running:
            try:
                packet = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.add(packet.decode(errors="replace"), time.time())

    def add(self, packet: str, arrived: float) -> None:
        """One datagram: StatsD lines `name:value|type[|@rate]`, several per datagram when pipelined."""
        for line in packet.splitlines():
            name, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if kind.split("|")[0] != "ms":
                continue
            try:
                self.timers.setdefault(name.removeprefix(f"{PREFIX}."), []).append((arrived, float(value)))
            except ValueError:
                continue

    def summary(self, name: str, since: float, until: float) -> dict[str, float | int | None]:
        """The timer's values that arrived in [since, until], in ms: how many, median, 95th percentile, max."""
        values = sorted(ms for arrived, ms in self.timers.get(name, []) if since <= arrived <= until)
        if not values:
            return {"count": 0, "median_ms": None, "p95_ms": None, "max_ms": None, "total_s": 0.0}
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        return {"count": len(values), "median_ms": round(statistics.median(values), 1), "p95_ms": round(p95, 1),
                "max_ms": round(values[-1], 1), "total_s": round(sum(values) / 1000, 1)}
