"""The StatsD sink that `make bench` reads Airflow's scheduler loop time from (bench/statsd_sink.py, issue 15): the
values come from what a real StatsD client sends over loopback UDP, only timers count, and only those of the span
asked for."""

from __future__ import annotations

import time

import statsd

from bench.statsd_sink import SCHEDULER_LOOP, StatsdSink
from tests.conftest import eventually


def test_timers_sent_by_the_statsd_client_airflow_uses_are_summarised_by_name() -> None:
    with StatsdSink() as sink:
        client = statsd.StatsClient("127.0.0.1", int(sink.env["AIRFLOW__METRICS__STATSD_PORT"]), prefix="airflow")
        client.timing(SCHEDULER_LOOP, 40)
        client.incr("scheduler.heartbeat")  # a counter: not a timer
        with client.pipeline() as batch:  # several lines in one datagram
            for ms in (10, 20, 30, 1000):
                batch.timing(SCHEDULER_LOOP, ms)
        eventually(lambda: len(sink.timers.get(SCHEDULER_LOOP, [])) == 5, timeout=10, what="five loop timings")
        summary = sink.summary(SCHEDULER_LOOP, 0, time.time() + 1)
    assert summary == {"count": 5, "median_ms": 30.0, "p95_ms": 1000.0, "max_ms": 1000.0, "total_s": 1.1}
    assert set(sink.timers) == {SCHEDULER_LOOP}


def test_only_the_values_inside_the_span_count_and_an_empty_span_says_so() -> None:
    sink = StatsdSink()
    sink.add("airflow.scheduler.scheduler_loop_duration:5|ms", arrived=100.0)
    sink.add("airflow.scheduler.scheduler_loop_duration:7|ms|@0.5\nairflow.x:1|c\nbroken", arrived=200.0)
    assert sink.summary(SCHEDULER_LOOP, 150, 250)["count"] == 1
    assert sink.summary(SCHEDULER_LOOP, 300, 400) == {"count": 0, "median_ms": None, "p95_ms": None, "max_ms": None,
                                                     "total_s": 0.0}
