"""The lab's faults behind the fail-closed gates (issue 13, items 1 and 3), with a simulated clock: a proxy that fails
what it accepts, callers that call in bursts, TCP bytes over long-lived connections, app metrics under another label.
Each read is what Prometheus would scrape (the exposition's samples)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshlab.lab import Lab
from meshlab.topology import TopologyError
from tests.lab.sim import Clock
from tests.lab.test_lab import inject_all

Labels = dict[str, str]


def scraped(lab: Lab, metric: str, where: Callable[[Labels], bool] = lambda labels: True) -> float:
    """The sum of a counter's samples (as /metrics exposes them) whose labels match."""
    total = 0.0
    for family in lab.telemetry.families(lab.metric_sources()):
        for sample in family.samples:
            if sample.name == metric and where(sample.labels):
                total += sample.value
    return total


def into(workload: str, reporter: str = "destination", **labels: str) -> Callable[[Labels], bool]:
    def match(found: Labels) -> bool:
        return (found.get("destination_workload") == workload and found.get("reporter") == reporter
                and all(found.get(k) == v for k, v in labels.items()))
    return match


def app(name: str, label: str = "app") -> Callable[[Labels], bool]:
    return lambda found: found.get(label) == name


def increase(clock: Clock, seconds: float, read: Callable[[], float]) -> float:
    before = read()
    clock.run(seconds)
    return read() - before


# ---- proxy_drop: the service's own sidecar fails what it accepted ------------------------------------------------
def test_a_dropping_proxy_fails_requests_before_the_app_and_reports_them_as_503_uf(lab: Lab, clock: Clock) -> None:
    lab.set_knobs(("lab", "shop", "auth"), {"proxy_drop": 0.9})
    steady = increase(clock, 10, lambda: scraped(lab, "http_requests_total", app("auth")))
    assert scraped(lab, "istio_requests_total", into("auth")) == 0.0, "no sidecar yet: nothing dropped, no report"
    inject_all(lab, clock, ["auth", "user"])  # user calls auth over mTLS, api-gateway (no sidecar) in plaintext
    served = increase(clock, 10, lambda: scraped(lab, "http_requests_total", app("auth")))
    assert served == pytest.approx(0.1 * steady, rel=0.02), "90 % never reach the application"

    def dropped() -> float:
        return scraped(lab, "istio_requests_total", into("auth", response_code="503", response_flags="UF"))

    def answered() -> float:
        return scraped(lab, "istio_requests_total", into("auth", response_code="200", response_flags="-"))

    failed, ok = increase(clock, 10, dropped), increase(clock, 10, answered)
    assert failed == pytest.approx(9 * ok, rel=0.02), "the destination proxy reports what it failed, with its flag"
    for security, caller in (("mutual_tls", "user"), ("none", "unknown")):
        assert scraped(lab, "istio_requests_total", into("auth", response_flags="UF", source_workload=caller,
                                                         connection_security_policy=security)) > 0, caller
    relayed = scraped(lab, "istio_requests_total", into("auth", "source", response_code="503"))
    relayed_flagged = scraped(lab, "istio_requests_total", into("auth", "source", response_flags="UF"))
    assert relayed > 0 and relayed_flagged == 0, "the caller's proxy relays the 503 with no flag of its own"
    assert lab.flows.workloads[("lab", "shop", "user")].ok == pytest.approx(0.1), "callers see the failures"
    assert lab.flows.workloads[("lab", "shop", "api-gateway")].ok < 0.2


def test_a_dropping_proxy_drops_nothing_a_strict_handshake_already_refused(lab: Lab, clock: Clock) -> None:
    from tests.lab.test_lab import apply_pa

    inject_all(lab, clock, ["ledger"])
    lab.set_knobs(("lab", "shop", "ledger"), {"proxy_drop": 0.5})
    apply_pa(lab, "shop", "ledger", "STRICT", {"app": "ledger"})
    clock.run(1)
    plaintext = increase(clock, 10, lambda: scraped(lab, "istio_requests_total",
                                                    into("ledger", connection_security_policy="none")))
    assert plaintext == 0.0, "reset at the handshake: the proxy never saw a request to fail"


# ---- bursts ----------------------------------------------------------------------------------------------------
def test_a_bursty_caller_sends_its_average_rate_in_short_bursts(lab: Lab, clock: Clock) -> None:
    lab.set_knobs(("lab", "external", "batch-processor"), {"calls": [
        {"service": "shop/ledger", "burst_every_seconds": 90, "burst_seconds": 3}]})
    lab.set_knobs(("lab", "shop", "payment"), {"calls": []})  # batch-processor is ledger's only caller
    inject_all(lab, clock, ["ledger"])  # ledger's proxy reports the plaintext it accepts

    def plaintext() -> float:
        return scraped(lab, "istio_requests_total", into("ledger", connection_security_policy="none"))

    while increase(clock, 1, plaintext) == 0:  # up to the next burst
        pass
    while increase(clock, 1, plaintext) > 0:  # and through it
        pass
    quiet = increase(clock, 60, plaintext)
    assert quiet == 0.0, "60 s between two bursts: no plaintext at all"
    period = increase(clock, 90, plaintext)
    assert period == pytest.approx(2 * 90, rel=0.01), "one burst holds the whole period's 2 rps"


def test_a_burst_longer_than_its_period_is_refused(lab: Lab) -> None:
    with pytest.raises(TopologyError, match="burst_seconds 10 is longer than burst_every_seconds 5"):
        lab.set_knobs(("lab", "external", "batch-processor"), {"calls": [
            {"service": "shop/ledger", "burst_every_seconds": 5, "burst_seconds": 10}]})


# ---- TCP bytes -------------------------------------------------------------------------------------------------
def test_a_long_lived_plaintext_connection_keeps_sending_bytes_and_opens_nothing_new(lab: Lab, clock: Clock) -> None:
    # batch-processor keeps one connection to ledger's 5432 open and streams over it; no request opens another.
    lab.set_knobs(("lab", "external", "batch-processor"), {"ingress_rps": 0, "calls": [
        {"service": "shop/ledger", "protocol": "tcp", "port": 5432, "bytes_per_second": 2000,
         "response_bytes_per_second": 500}]})
    inject_all(lab, clock, ["ledger"])
    plaintext = into("ledger", connection_security_policy="none")
    received = increase(clock, 30, lambda: scraped(lab, "istio_tcp_received_bytes_total", plaintext))
    sent = increase(clock, 30, lambda: scraped(lab, "istio_tcp_sent_bytes_total", plaintext))
    assert received == pytest.approx(2000 * 30) and sent == pytest.approx(500 * 30)
    opened = increase(clock, 30, lambda: scraped(lab, "istio_tcp_connections_opened_total", plaintext))
    assert opened == 0.0 and scraped(lab, "istio_tcp_connections_opened_total", plaintext) == 1.0, \
        "opened once, when its first bytes were seen"
    assert scraped(lab, "istio_tcp_connections_closed_total", plaintext) == 0.0, "still open"
    assert scraped(lab, "istio_tcp_received_bytes_total", into("ledger", "source")) == 0.0, \
        "a caller without a sidecar has no proxy to report it"


def test_bytes_over_mtls_are_reported_by_both_proxies(lab: Lab, clock: Clock) -> None:
    lab.set_knobs(("lab", "shop", "user"), {"calls": [
        {"service": "auth", "protocol": "tcp", "port": 5432, "bytes_per_second": 1000}]})
    inject_all(lab, clock, ["auth", "user"])
    for reporter in ("destination", "source"):
        moved = increase(clock, 10, lambda r=reporter: scraped(lab, "istio_tcp_received_bytes_total", into(
            "auth", r, source_workload="user")))
        assert moved == pytest.approx(10_000), reporter
    assert scraped(lab, "istio_tcp_received_bytes_total", into("auth", connection_security_policy="mutual_tls")) > 0
    assert increase(clock, 10, lambda: scraped(lab, "istio_tcp_received_bytes_total", into(
        "auth", connection_security_policy="none"))) == 0, "plaintext only while user's pods were rolling"


# ---- app metrics under another label ---------------------------------------------------------------------------
def test_app_metrics_can_name_the_app_by_another_label(lab: Lab, clock: Clock) -> None:
    lab.set_knobs(("lab", "shop", "ledger"), {"app_metrics_label": "service"})
    clock.run(5)
    served = increase(clock, 10, lambda: scraped(lab, "http_requests_total", app("ledger", "service")))
    assert served > 0
    assert increase(clock, 10, lambda: scraped(lab, "http_requests_total", app("ledger"))) == 0.0
    assert scraped(lab, "http_requests_total", app("auth")) > 0, "the others keep `app`"
    with pytest.raises(TopologyError, match="not a Prometheus label name"):
        lab.set_knobs(("lab", "shop", "ledger"), {"app_metrics_label": "app-name"})
