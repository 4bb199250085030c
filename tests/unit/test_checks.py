"""meshwave.checks and the query side of meshwave.prometheus, against a fake source (no network)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from meshwave import checks as c
from meshwave import prometheus as p
from meshwave.checks import Outcome

NS, WL, WIN = "shop", "auth", "10s"
MI = 2**20
Response = float | list[p.Sample] | Exception | None


class FakeSource:
    """Answers the rendered queries.yaml templates it was given; anything else is an empty vector."""

    def __init__(self, cluster: str | None = None, window: str = WIN) -> None:
        self.cluster = cluster
        self.window = window
        self.answers: dict[str, Response] = {}
        self.seen: list[str] = []

    def set(self, name: str, value: Response, namespace: str = NS, workload: str = WL,
            window: str | None = None) -> FakeSource:
        query = p.render(name, namespace=namespace, workload=workload, window=window or self.window,
                         cluster=self.cluster)
        self.answers[query] = value
        return self

    def instant(self, query: str) -> list[p.Sample]:
        self.seen.append(query)
        value = self.answers.get(query)
        if isinstance(value, Exception):
            raise value
        if value is None:
            return []
        if isinstance(value, list):
            return value
        return [p.Sample({}, float(value), 1.0)]


def healthy(source: FakeSource | None = None, workload: str = WL) -> FakeSource:
    """A workload at 40 rps, all 2xx (its proxy too), 6/14 ms, one pod with a 80 Mi sidecar, no restarts."""
    src = source or FakeSource()
    pod = f"{workload}-5d8f7-x7k2p"
    for name, value in (("app_success_rate", 1.0), ("app_request_rate", 40.0), ("app_request_count", 400.0),
                        ("app_latency_p50_ms", 6.0), ("app_latency_p99_ms", 14.0),
                        ("istio_success_rate", 1.0), ("istio_inbound_request_rate", 40.0),
                        ("sidecar_memory_bytes", 80.0 * MI), ("sidecar_memory_limit_bytes", 1024.0 * MI)):
        src.set(name, value, workload=workload)
    src.set("container_restarts", [p.Sample({"namespace": NS, "pod": pod, "container": c_}, 0.0)
                                   for c_ in (workload, "istio-proxy")], workload=workload)
    src.set("app_memory_bytes", [p.Sample({"container": workload}, 200.0 * MI)], workload=workload)
    return src


def baseline(**overrides: Any) -> c.Baseline:
    values = {"success_rate": 1.0, "request_rate": 40.0, "request_count": 400.0, "p50_ms": 6.0, "p99_ms": 14.0}
    return c.Baseline(NS, WL, WIN, **{**values, **overrides})


def by_check(verdicts: list[c.Verdict]) -> dict[str, c.Verdict]:
    return {v.check: v for v in verdicts}


def down() -> p.PrometheusUnavailable:
    return p.PrometheusUnavailable("Prometheus at http://127.0.0.1:1: cannot connect: [Errno 111] Connection refused")


# ---- names, windows and templates ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ['x"} or vector(1)', "Auth", "-auth", "auth-", "a" * 64, "", "a.b", "a_b", None, 3])
def test_a_bad_label_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="^workload: "):
        p.render("app_success_rate", namespace=NS, workload=bad, window=WIN)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", ["30s", "5m", "1h30m", "2d", "500ms", "1y2w", 30])
def test_windows_prometheus_accepts(good: str | int) -> None:
    assert p.validate_window(good) in (good, f"{good}s")


@pytest.mark.parametrize("bad", ["5", "5 m", "0s", "-1m", "1m1h", "5m]) or vector(1", "", "1.5m", True, None])
def test_a_bad_window_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="^window: "):
        p.render("app_request_rate", namespace=NS, workload=WL, window=bad)  # type: ignore[arg-type]


def test_window_seconds() -> None:
    assert p.window_seconds("1h30m") == 5400
    assert p.window_seconds("10s") == 10
    assert p.window_seconds("250ms") == 0.25


def test_every_selector_of_every_query_gets_the_cluster() -> None:
    for name, template in p.load_queries().items():
        query = template.render(namespace=NS, workload=WL, window="5m", cluster="lab-1")
        selectors = p.SELECTOR.findall(query)
        assert selectors, name
        assert all(s.endswith(', cluster="lab-1"}') for s in selectors), (name, query)
        # no cluster matcher without a cluster (Istio's source_cluster/destination_cluster labels are not one)
        assert not re.search(r"(?<!_)cluster", template.render(namespace=NS, workload=WL, window="5m")), name
        assert template.no_series and template.unit, f"{name}: document what no series means"


def test_the_queries_the_checks_need_are_there() -> None:
    needed = {"app_success_rate", "app_request_rate", "app_request_count", "app_latency_p50_ms", "app_latency_p99_ms",
              "container_restarts", "oom_killed", "sidecar_memory_bytes", "app_memory_bytes", "plaintext_http_requests",
              "plaintext_tcp_connections", "plaintext_tcp_bytes", "mtls_http_callers", "mtls_tcp_callers",
              "istio_inbound_request_rate", "istio_inbound_tcp_rate", "istio_success_rate"}
    assert needed <= set(p.load_queries())


def test_rendered_queries_match_the_istio_facts() -> None:
    query = p.render("plaintext_http_requests", namespace=NS, workload=WL, window="5m")
    selector = ('istio_requests_total{reporter="destination", destination_workload="auth", '
                'destination_workload_namespace="shop", connection_security_policy!="mutual_tls"}')
    assert query == (f'sum by (source_workload, source_workload_namespace) ( (max_over_time({selector}[5m]) '
                     f'unless {selector} offset 5m) or increase({selector}[5m]))')


# ---- pods joined to their Deployment through their owner, not a name prefix (finding 21) -----------------------
POD_QUERIES = ("container_restarts", "oom_killed", "sidecar_memory_bytes", "sidecar_memory_limit_bytes",
               "app_memory_bytes")


@pytest.mark.parametrize("name", POD_QUERIES)
def test_pod_queries_join_the_deployment_through_its_replicasets_not_a_name_prefix(name: str) -> None:
    template = p.load_queries()[name]
    query = template.render(namespace=NS, workload=WL, window=WIN)
    assert "pod=~" not in query and "[a-z0-9]" not in query, "no pod-name pattern"
    assert 'kube_pod_owner{namespace="shop", owner_kind="ReplicaSet"}' in query.replace("max_over_time(", "")
    assert 'kube_replicaset_owner{namespace="shop", owner_kind="Deployment", owner_name="auth"}' in query
    batch = template.batch.render(window=WIN)
    assert "pod=~" not in batch and "[a-z0-9]" not in batch
    assert 'kube_pod_owner{owner_kind="ReplicaSet"}' in batch
    assert 'kube_replicaset_owner{owner_kind="Deployment"}' in batch


def test_the_loader_refuses_a_selector_without_the_cluster(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text('queries:\n  x:\n    promql: sum(up{job="$workload"})\n')
    with pytest.raises(ValueError, match=r"queries\.x: selector .* must end with \$cluster"):
        p.load_queries(path)
    path.write_text('queries:\n  x:\n    promql: sum(up{job="$job"$cluster})\n')
    with pytest.raises(ValueError, match="placeholders"):
        p.load_queries(path)


def test_an_unknown_query_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown query 'nope'"):
        p.render("nope", namespace=NS, workload=WL, window=WIN)


# ---- samples and the client's set-up --------------------------------------------------------------------------
def test_nan_and_inf_are_kept_and_flagged() -> None:
    samples = p._samples([{"metric": {"a": "b"}, "value": [1.5, "NaN"]}, {"metric": {}, "value": [1.5, "+Inf"]},
                          {"metric": {}, "value": [1.5, "0.25"]}], "q", "url")
    assert math.isnan(samples[0].value) and not samples[0].finite
    assert samples[1].value == math.inf and not samples[1].finite
    assert samples[2].finite and samples[2].value == 0.25
    encoded = json.dumps([s.to_dict() for s in samples], allow_nan=False)
    back = [p.Sample.from_dict(d) for d in json.loads(encoded)]
    assert math.isnan(back[0].value) and back[1].value == math.inf and back[0].labels == {"a": "b"}


def test_a_scalar_result_is_one_sample_and_a_range_vector_is_refused() -> None:
    assert p._samples([1.5, "3"], "q", "url")[0].value == 3.0
    with pytest.raises(p.PrometheusQueryError, match="range vector.*query: up\\[1m\\]"):
        p._samples([{"metric": {}, "values": [[1, "1"]]}], "up[1m]", "url")


def test_the_client_does_not_retry_and_connects_fast() -> None:
    source = p.PrometheusSource("http://user:secret@127.0.0.1:9/", timeout=20, cluster="lab")
    adapter = source._client._session.get_adapter(source.url)
    assert adapter.max_retries.total == 0
    assert source.connect_timeout <= 3 and source.timeout == 20
    assert "secret" not in repr(source)
    with pytest.raises(ValueError, match="^cluster: "):
        p.PrometheusSource("http://127.0.0.1:9", cluster="Lab")


# ---- baseline -------------------------------------------------------------------------------------------------
def test_baseline_records_the_application_metrics() -> None:
    base = c.measure_baseline(healthy(), NS, WL, WIN)
    assert (base.success_rate, base.request_rate, base.request_count, base.p50_ms, base.p99_ms) == \
        (1.0, 40.0, 400.0, 6.0, 14.0)
    assert base.app_memory_bytes == {WL: 200.0 * MI}
    assert base.complete and set(base.queries) >= {"app_success_rate", "app_latency_p99_ms"}


def test_baseline_notes_what_had_no_data() -> None:
    src = healthy().set("app_success_rate", math.nan).set("app_latency_p99_ms", None)
    base = c.measure_baseline(src, NS, WL, WIN)
    assert base.success_rate is None and base.p99_ms is None and base.request_rate == 40.0
    notes = {n.check: n for n in base.notes}
    assert set(notes) == {"baseline.app_success_rate", "baseline.app_latency_p99_ms"}
    assert all(n.outcome is Outcome.NO_DATA for n in notes.values())
    assert "NaN" in notes["baseline.app_success_rate"].reason
    assert "no series" in notes["baseline.app_latency_p99_ms"].reason


def test_baseline_with_prometheus_down_is_errors_after_one_attempt() -> None:
    src = FakeSource().set("app_success_rate", down())
    base = c.measure_baseline(src, NS, WL, WIN)
    assert len(src.seen) == 1, "after 'unavailable' the other queries are not tried"
    assert base.notes and all(n.outcome is Outcome.ERROR for n in base.notes)
    assert base.success_rate is None and "Connection refused" in base.notes[0].reason


def test_baseline_round_trip() -> None:
    base = c.measure_baseline(healthy(FakeSource(cluster="lab")).set("app_latency_p99_ms", math.nan), NS, WL, WIN,
                              cluster="lab")
    data = json.loads(json.dumps(base.to_dict(), allow_nan=False))
    back = c.Baseline.from_dict(data)
    assert back.to_dict() == base.to_dict()
    assert back.cluster == "lab" and back.notes[0].check == "baseline.app_latency_p99_ms"


# ---- after injection -------------------------------------------------------------------------------------------
def test_after_injection_healthy_passes_everything() -> None:
    verdicts = c.verify_after_injection(healthy(), baseline(), NS, WL, WIN, c.Thresholds())
    assert {v.check: v.outcome for v in verdicts} == {
        "app_request_rate": Outcome.PASS, "app_success_rate": Outcome.PASS, "app_latency_p99": Outcome.PASS,
        "istio_success_rate": Outcome.PASS, "restarts": Outcome.PASS, "oom_killed": Outcome.PASS,
        "sidecar_memory": Outcome.PASS}
    assert all(v.query and v.expectation and v.reason and v.at for v in verdicts)


def test_traffic_lost_before_the_application_fails_the_soak() -> None:
    """Safety review finding 1: 90 % of the requests refused by the new proxy, the 10 % left all succeed."""
    lost = by_check(c.verify_after_injection(healthy().set("app_request_rate", 4.0), baseline(), NS, WL, WIN))
    assert lost["app_success_rate"].outcome is Outcome.PASS, "the application sees nothing wrong"
    verdict = lost["app_request_rate"]
    assert verdict.outcome is Outcome.FAIL
    assert verdict.reason == ("request rate 4/s < 0.8 x baseline 40/s: requests are lost before they reach the "
                              "application")
    kept = by_check(c.verify_after_injection(healthy().set("app_request_rate", 33.0), baseline(), NS, WL, WIN))
    assert kept["app_request_rate"].outcome is Outcome.PASS
    loose = c.Thresholds(max_traffic_drop=0.95)
    assert by_check(c.verify_after_injection(healthy().set("app_request_rate", 4.0), baseline(), NS, WL, WIN,
                                             loose))["app_request_rate"].outcome is Outcome.PASS
    blind = by_check(c.verify_after_injection(healthy(), baseline(request_rate=None), NS, WL, WIN))
    assert blind["app_request_rate"].outcome is Outcome.NO_DATA


def test_a_success_drop_fails_with_the_numbers() -> None:
    verdict = by_check(c.verify_after_injection(healthy().set("app_success_rate", 0.62), baseline(), NS, WL, WIN))[
        "app_success_rate"]
    assert verdict.outcome is Outcome.FAIL
    assert verdict.reason == "success rate 0.62 < baseline 1.00 - 0.02"
    assert verdict.values["success_rate"] == 0.62 and verdict.values["requests"] == 400.0
    assert "http_requests_total" in verdict.query


def test_a_drop_within_the_allowance_passes() -> None:
    verdict = by_check(c.verify_after_injection(healthy().set("app_success_rate", 0.98), baseline(), NS, WL, WIN))[
        "app_success_rate"]
    assert verdict.outcome is Outcome.PASS


def test_every_request_failing_is_a_fail_not_no_data() -> None:
    verdict = by_check(c.verify_after_injection(healthy().set("app_success_rate", 0.0), baseline(), NS, WL, WIN))[
        "app_success_rate"]
    assert verdict.outcome is Outcome.FAIL


@pytest.mark.parametrize("count", [9.0, 0.0, None, math.nan])
def test_low_traffic_is_no_data_never_pass_or_fail(count: float | None) -> None:
    src = healthy().set("app_request_count", count).set("app_success_rate", 0.1).set("app_latency_p99_ms", 9000.0)
    verdicts = by_check(c.verify_after_injection(src, baseline(), NS, WL, WIN, c.Thresholds(min_requests=10)))
    for check in ("app_success_rate", "app_latency_p99"):
        assert verdicts[check].outcome is Outcome.NO_DATA, check
        assert "min_requests 10" in verdicts[check].reason


def test_a_low_traffic_baseline_cannot_judge() -> None:
    verdict = by_check(c.verify_after_injection(healthy(), baseline(request_count=3.0), NS, WL, WIN))[
        "app_success_rate"]
    assert verdict.outcome is Outcome.NO_DATA and "baseline saw only 3 requests" in verdict.reason


def test_nan_success_rate_with_traffic_is_no_data() -> None:
    verdict = by_check(c.verify_after_injection(healthy().set("app_success_rate", math.nan), baseline(), NS, WL,
                                                WIN))["app_success_rate"]
    assert verdict.outcome is Outcome.NO_DATA and "NaN" in verdict.reason
    json.dumps(verdict.to_dict(), allow_nan=False)


def test_no_baseline_is_no_data() -> None:
    verdicts = by_check(c.verify_after_injection(healthy(), baseline(success_rate=None, p99_ms=None), NS, WL, WIN))
    assert verdicts["app_success_rate"].outcome is Outcome.NO_DATA
    assert verdicts["app_latency_p99"].outcome is Outcome.NO_DATA


@pytest.mark.parametrize(("p99", "outcome"), [
    (200.0, Outcome.PASS),    # +186 ms but x14: only the ratio is exceeded
    (600.0, Outcome.FAIL),    # +586 ms and x43
    (14.0, Outcome.PASS),
])
def test_p99_fails_only_if_both_the_increase_and_the_ratio_are_exceeded(p99: float, outcome: Outcome) -> None:
    verdict = by_check(c.verify_after_injection(healthy().set("app_latency_p99_ms", p99), baseline(), NS, WL, WIN))[
        "app_latency_p99"]
    assert verdict.outcome is outcome, verdict.reason


def test_p99_increase_without_the_ratio_passes() -> None:
    src = healthy().set("app_latency_p99_ms", 1300.0)  # +300 ms over a 1000 ms baseline: x1.3
    verdict = by_check(c.verify_after_injection(src, baseline(p99_ms=1000.0), NS, WL, WIN))["app_latency_p99"]
    assert verdict.outcome is Outcome.PASS and "+300.0 ms (> 250)" in verdict.reason


def test_restarts_and_oom_fail() -> None:
    pod = "auth-5d8f7-x7k2p"
    src = healthy().set("container_restarts", [p.Sample({"pod": pod, "container": "istio-proxy"}, 2.0),
                                               p.Sample({"pod": pod, "container": "auth"}, 0.0)])
    src.set("oom_killed", [p.Sample({"pod": pod, "container": "istio-proxy"}, 1.0)])
    verdicts = by_check(c.verify_after_injection(src, baseline(), NS, WL, WIN))
    assert verdicts["restarts"].outcome is Outcome.FAIL
    assert f"{pod}/istio-proxy 2x" in verdicts["restarts"].reason
    assert verdicts["oom_killed"].outcome is Outcome.FAIL and f"{pod}/istio-proxy" in verdicts["oom_killed"].reason
    tolerant = by_check(c.verify_after_injection(src, baseline(), NS, WL, WIN, c.Thresholds(max_restarts=2)))
    assert tolerant["restarts"].outcome is Outcome.PASS


def test_unknown_pods_are_no_data_for_restarts_and_oom() -> None:
    verdicts = by_check(c.verify_after_injection(healthy().set("container_restarts", None), baseline(), NS, WL, WIN))
    assert verdicts["restarts"].outcome is Outcome.NO_DATA
    assert verdicts["oom_killed"].outcome is Outcome.NO_DATA, "an empty OOM vector proves nothing without pods"


def test_sidecar_memory() -> None:
    th = c.Thresholds(sidecar_memory_limit_mi=64)
    over = by_check(c.verify_after_injection(healthy(), baseline(), NS, WL, WIN, th))["sidecar_memory"]
    assert over.outcome is Outcome.FAIL and over.reason == "istio-proxy working set 80 Mi of limit 1024 Mi > 64 Mi"
    missing = by_check(c.verify_after_injection(healthy().set("sidecar_memory_bytes", None), baseline(), NS, WL, WIN,
                                                th))["sidecar_memory"]
    assert missing.outcome is Outcome.NO_DATA
    recorded = by_check(c.verify_after_injection(healthy(), baseline(), NS, WL, WIN))["sidecar_memory"]
    assert recorded.outcome is Outcome.PASS and recorded.values["working_set_mi"] == 80


def test_prometheus_down_gives_error_verdicts_never_pass() -> None:
    src = healthy().set("app_request_count", down())
    verdicts = c.verify_after_injection(src, baseline(), NS, WL, WIN)
    assert [v.outcome for v in verdicts] == [Outcome.ERROR] * 7
    assert len(src.seen) == 1
    assert "Connection refused" in verdicts[0].reason


def test_a_query_error_is_an_error_verdict_and_the_rest_still_run() -> None:
    src = healthy().set("app_latency_p99_ms", p.PrometheusQueryError("bad query; query: x"))
    verdicts = by_check(c.verify_after_injection(src, baseline(), NS, WL, WIN))
    assert verdicts["app_latency_p99"].outcome is Outcome.ERROR
    assert verdicts["app_success_rate"].outcome is Outcome.PASS


def test_cluster_comes_from_the_source_or_the_argument() -> None:
    src = healthy(FakeSource(cluster="lab"))
    assert by_check(c.verify_after_injection(src, baseline(), NS, WL, WIN))["app_success_rate"].outcome is Outcome.PASS
    assert all('cluster="lab"' in q for q in src.seen)
    other = FakeSource()
    c.measure_baseline(other, NS, WL, WIN, cluster="east")
    assert all('cluster="east"' in q for q in other.seen)


# ---- injection attempts never reach PromQL ---------------------------------------------------------------------
EVIL = 'x"} or vector(1) or up{a="'


@pytest.mark.parametrize("call", [
    lambda s: c.measure_baseline(s, EVIL, WL, WIN),
    lambda s: c.measure_baseline(s, NS, EVIL, WIN),
    lambda s: c.measure_baseline(s, NS, WL, WIN, cluster=EVIL),
    lambda s: c.verify_after_injection(s, baseline(), NS, EVIL, WIN),
    lambda s: c.verify_after_injection(s, baseline(), NS, WL, "5m] or vector(1) #"),
    lambda s: c.strict_gate(s, NS, EVIL, WIN),
    lambda s: c.mtls_callers(s, EVIL, WL, WIN),
    lambda s: c.inbound_rate(s, NS, EVIL, WIN),
    lambda s: c.verify_after_strict(s, NS, WL, [(NS, EVIL)], 40.0, WIN),
    lambda s: c.verify_after_strict(s, NS, WL, [(EVIL, "user")], 40.0, WIN),
])
def test_an_injection_attempt_raises_before_any_query(call: Any) -> None:
    src = healthy()
    with pytest.raises(ValueError, match="(namespace|workload|cluster|window): "):
        call(src)
    assert src.seen == []


# ---- the STRICT gate -------------------------------------------------------------------------------------------
def plaintext(rate: float, workload: str = "unknown", namespace: str = "unknown") -> list[p.Sample]:
    return [p.Sample({"source_workload": workload, "source_workload_namespace": namespace}, rate)]


def test_strict_gate_fails_on_plaintext_from_a_caller_without_sidecar() -> None:
    src = FakeSource().set("plaintext_http_requests", plaintext(200.0)).set("istio_inbound_request_rate", 40.0)
    verdict, callers = c.strict_gate(src, NS, WL, WIN)
    assert verdict.outcome is Outcome.FAIL and verdict.check == "strict_plaintext"
    assert callers == [c.Caller("unknown", "unknown", "http", 20.0, 200.0, WIN)] and not callers[0].has_sidecar
    assert "unknown (a caller without sidecar) http 200 requests in the last 10s" in verdict.reason


def test_strict_gate_fails_on_plaintext_tcp() -> None:
    src = FakeSource().set("plaintext_tcp_connections", plaintext(2.0, "batch", "jobs"))
    src.set("istio_inbound_tcp_rate", 1.0)
    verdict, callers = c.strict_gate(src, NS, WL, WIN)
    assert verdict.outcome is Outcome.FAIL and callers[0].protocol == "tcp" and callers[0].key == "jobs/batch"


def test_strict_gate_passes_only_with_istio_traffic_as_proof() -> None:
    src = FakeSource().set("istio_inbound_request_rate", 40.0)
    verdict, callers = c.strict_gate(src, NS, WL, WIN)
    assert verdict.outcome is Outcome.PASS and callers == []


@pytest.mark.parametrize("inbound", [None, 0.0, math.nan])
def test_strict_gate_without_istio_traffic_is_no_data(inbound: float | None) -> None:
    src = FakeSource().set("istio_inbound_request_rate", inbound)
    verdict, _ = c.strict_gate(src, NS, WL, WIN)
    assert verdict.outcome is Outcome.NO_DATA and "zero plaintext proves nothing" in verdict.reason


def test_strict_gate_a_drained_plaintext_series_is_not_a_caller() -> None:
    src = FakeSource().set("plaintext_http_requests", plaintext(0.0)).set("istio_inbound_request_rate", 40.0)
    verdict, callers = c.strict_gate(src, NS, WL, WIN)
    assert verdict.outcome is Outcome.PASS and callers == []
    assert verdict.values["drained_callers"][0]["workload"] == "unknown"


def test_strict_gate_error() -> None:
    verdict, callers = c.strict_gate(FakeSource().set("plaintext_http_requests", down()), NS, WL, WIN)
    assert verdict.outcome is Outcome.ERROR and callers == []


def test_mtls_callers_and_inbound_rate() -> None:
    src = FakeSource().set("mtls_http_callers", plaintext(20.0, "user", NS) + plaintext(0.0, "old", NS))
    src.set("istio_inbound_request_rate", 40.0).set("istio_inbound_tcp_rate", 2.0)
    assert c.mtls_callers(src, NS, WL, WIN) == [c.Caller(NS, "user", "http", 20.0)]
    assert c.inbound_rate(src, NS, WL, WIN) == 42.0
    assert c.inbound_rate(FakeSource(), NS, WL, WIN) is None
    with pytest.raises(p.PrometheusUnavailable):
        c.inbound_rate(FakeSource().set("istio_inbound_request_rate", down()), NS, WL, WIN)


# ---- after STRICT ----------------------------------------------------------------------------------------------
def after_strict(inbound: float = 40.0, caller_success: float = 1.0) -> FakeSource:
    src = FakeSource().set("istio_success_rate", 1.0).set("istio_inbound_request_rate", inbound)
    return healthy(src, "user").set("app_success_rate", caller_success, workload="user")


def test_after_strict_healthy() -> None:
    callers = [c.Caller(NS, "user", "http", 20.0), c.Caller("unknown", "unknown", "http", 1.0), (NS, "user")]
    verdicts = c.verify_after_strict(after_strict(), NS, WL, callers, 40.0, WIN, c.Thresholds())
    assert {v.check: v.outcome for v in verdicts} == {"istio_success_rate": Outcome.PASS,
                                                      "caller_success_rate[shop/user]": Outcome.PASS,
                                                      "inbound_rate": Outcome.PASS}


def test_after_strict_a_caller_collapsing_fails() -> None:
    verdicts = by_check(c.verify_after_strict(after_strict(caller_success=0.1), NS, WL, [(NS, "user")], 40.0, WIN))
    verdict = verdicts["caller_success_rate[shop/user]"]
    assert verdict.outcome is Outcome.FAIL and verdict.reason == "success rate 0.10 < before 1.00 - 0.02"
    assert 'app="user"' in verdict.query


def test_after_strict_the_callers_own_before_rate_is_the_reference() -> None:
    src = after_strict(caller_success=0.9)
    verdicts = by_check(c.verify_after_strict(src, NS, WL, [(NS, "user")], 40.0, WIN,
                                              success_before={"shop/user": 0.91}))
    assert verdicts["caller_success_rate[shop/user]"].outcome is Outcome.PASS


def test_the_strict_gate_hands_each_caller_s_own_rate_before_strict_to_the_verification() -> None:
    """A caller already at 0.95 before STRICT was compared with 1.0 after it: a good STRICT undone (part 2, 10)."""
    from meshwave import stages

    src = after_strict(caller_success=0.95)
    src.set("mtls_http_callers", [p.Sample({"source_workload": "user", "source_workload_namespace": NS}, 20.0)])
    src.set("caller_outbound_success_rate", 0.97, workload="istio-ingressgateway")
    handed = stages.on_pass("strict_gate", src, {"namespace": NS, "workload": WL, "window": WIN})
    assert handed["callers_success_before"] == {"shop/user": 0.95}
    assert c.caller_success_rates(src, NS, WL, [(NS, "istio-ingressgateway")], WIN) == {
        "shop/istio-ingressgateway": 0.97}, "a caller without application metrics is read through its proxy"
    with_own = by_check(c.verify_after_strict(src, NS, WL, [(NS, "user")], 40.0, WIN,
                                              success_before=handed["callers_success_before"]))
    assert with_own["caller_success_rate[shop/user]"].outcome is Outcome.PASS
    against_one = by_check(c.verify_after_strict(src, NS, WL, [(NS, "user")], 40.0, WIN))
    assert against_one["caller_success_rate[shop/user]"].outcome is Outcome.FAIL


def test_after_strict_inbound_collapse_fails() -> None:
    verdicts = by_check(c.verify_after_strict(after_strict(inbound=15.0), NS, WL, [], 40.0, WIN))
    assert verdicts["inbound_rate"].outcome is Outcome.FAIL
    assert verdicts["inbound_rate"].reason == "inbound 15/s < 0.5 x 40/s before STRICT"


def test_after_strict_without_a_before_rate_is_no_data() -> None:
    verdicts = by_check(c.verify_after_strict(after_strict(), NS, WL, [], None, WIN))
    assert verdicts["inbound_rate"].outcome is Outcome.NO_DATA


def test_after_strict_low_istio_traffic_is_no_data() -> None:
    verdicts = by_check(c.verify_after_strict(after_strict(inbound=0.5), NS, WL, [], 0.6, WIN))
    assert verdicts["istio_success_rate"].outcome is Outcome.NO_DATA  # 0.5/s x 10 s = 5 < 10
    assert verdicts["inbound_rate"].outcome is Outcome.PASS


# ---- serialisation ---------------------------------------------------------------------------------------------
def test_verdict_round_trip_with_nan_and_inf() -> None:
    verdict = c.Verdict("app_latency_p99", Outcome.NO_DATA, "p99 is NaN",
                        {"p99_ms": math.nan, "ratio": math.inf, "per": {"a/b": -math.inf}, "list": [1.0, math.nan]},
                        "x", {"app_latency_p99_ms": "q"})
    text = json.dumps(verdict.to_dict(), allow_nan=False)
    back = c.Verdict.from_dict(json.loads(text))
    assert back.check == verdict.check and back.outcome is Outcome.NO_DATA and back.at == verdict.at
    assert math.isnan(back.values["p99_ms"]) and back.values["ratio"] == math.inf
    assert back.values["per"]["a/b"] == -math.inf and math.isnan(back.values["list"][1])
    assert back.query == "q"


def test_thresholds_round_trip_and_validation() -> None:
    th = c.Thresholds(max_success_drop=0.05, sidecar_memory_limit_mi=256, min_requests=20)
    assert c.Thresholds.from_dict(json.loads(json.dumps(th.to_dict()))) == th
    with pytest.raises(ValueError, match="max_restarts"):
        c.Thresholds(max_restarts=-1)
    with pytest.raises(ValueError, match="unknown field"):
        c.Thresholds.from_dict({"max_succes_drop": 0.1})


def test_thresholds_take_the_plans_thresholds() -> None:
    from meshwave.plan import Settings

    settings = Settings()
    th = c.Thresholds.from_dict({**settings.thresholds.model_dump(), "min_requests": settings.min_requests})
    assert th == c.Thresholds()


def test_caller_round_trip() -> None:
    caller = c.Caller("unknown", "unknown", "http", math.nan)
    back = c.Caller.from_dict(json.loads(json.dumps(caller.to_dict(), allow_nan=False)))
    assert back.key == "unknown/unknown" and math.isnan(back.rate)


# ---- the gate ---------------------------------------------------------------------------------------------------
def v(check: str, outcome: str, value: float = 1.0) -> c.Verdict:
    return c.Verdict(check, Outcome(outcome), f"{check} {outcome}", {"value": value})


def poll(tracker: c.BreachTracker, *verdicts: c.Verdict, now: float = 0.0) -> c.GateResult:
    """One trigger poll: the state travels as JSON between polls, as it would in a trigger's kwargs."""
    result = tracker.feed(list(verdicts), now=now)
    restored = c.BreachTracker.from_dict(json.loads(json.dumps(tracker.to_dict(), allow_nan=False)))
    assert restored.to_dict() == tracker.to_dict()
    return result


def test_one_noisy_sample_does_not_fail() -> None:
    tracker = c.BreachTracker(c.GatePolicy(breaches_to_fail=3, passes_to_pass=3))
    statuses = []
    for outcome in ("fail", "pass", "fail", "fail", "pass", "pass", "pass"):
        statuses.append(poll(tracker, v("app_success_rate", outcome), v("restarts", "pass")).status)
        tracker = c.BreachTracker.from_dict(json.loads(json.dumps(tracker.to_dict())))
    assert statuses == [c.GateStatus.PENDING] * 6 + [c.GateStatus.PASS]


def test_n_consecutive_failures_of_the_same_check_confirm() -> None:
    tracker = c.BreachTracker(c.GatePolicy(breaches_to_fail=3))
    assert poll(tracker, v("a", "fail"), v("b", "pass")).status is c.GateStatus.PENDING
    assert poll(tracker, v("a", "pass"), v("b", "fail")).status is c.GateStatus.PENDING  # a different check
    assert poll(tracker, v("a", "fail"), v("b", "fail")).breaching == {"a": 1, "b": 2}
    result = poll(tracker, v("a", "fail", 0.5), v("b", "fail"))
    assert result.status is c.GateStatus.FAIL and result.failed == ["b"] and result.breaching == {"a": 2}
    assert "b: b fail (3 polls in a row)" in result.reason
    assert poll(tracker, v("a", "pass"), v("b", "pass")).status is c.GateStatus.FAIL, "a decision is sticky"


def test_fail_is_confirmed_after_one_breach_when_n_is_one() -> None:
    tracker = c.BreachTracker(c.GatePolicy(breaches_to_fail=1))
    assert poll(tracker, v("a", "fail")).status is c.GateStatus.FAIL


def test_k_consecutive_passes() -> None:
    tracker = c.BreachTracker(c.GatePolicy(passes_to_pass=2))
    assert poll(tracker, v("a", "pass")).status is c.GateStatus.PENDING
    assert poll(tracker, v("a", "no_data")).status is c.GateStatus.PENDING
    assert poll(tracker, v("a", "pass")).status is c.GateStatus.PENDING
    assert poll(tracker, v("a", "pass")).status is c.GateStatus.PASS


def test_no_data_wait_ends_no_data_at_the_deadline() -> None:
    tracker = c.BreachTracker(c.GatePolicy(deadline=100.0))
    for now in (0.0, 30.0, 60.0, 90.0):
        result = poll(tracker, v("a", "pass"), v("b", "no_data"), now=now)
        assert result.status is c.GateStatus.PENDING and result.no_data == ["b"]
    result = poll(tracker, v("a", "pass"), v("b", "no_data"), now=120.0)
    assert result.status is c.GateStatus.NO_DATA and "deadline" in result.reason and result.failed == []


def test_no_data_policy_fail_counts_as_a_breach() -> None:
    policy = c.GatePolicy(breaches_to_fail=2, checks={"b": c.CheckPolicy(on_no_data="fail")})
    tracker = c.BreachTracker(policy)
    assert poll(tracker, v("a", "pass"), v("b", "no_data")).status is c.GateStatus.PENDING
    result = poll(tracker, v("a", "pass"), v("b", "no_data"))
    assert result.status is c.GateStatus.FAIL and result.failed == ["b"] and result.no_data == ["b"]


def test_no_data_policy_pass_ignores_it() -> None:
    tracker = c.BreachTracker(c.GatePolicy(default=c.CheckPolicy(on_no_data="pass")))
    assert poll(tracker, v("a", "pass"), v("b", "no_data")).status is c.GateStatus.PASS


def test_errors_wait_then_end_error_never_pass() -> None:
    tracker = c.BreachTracker(c.GatePolicy(deadline=10.0))
    assert poll(tracker, v("a", "error"), now=1.0).status is c.GateStatus.PENDING
    result = poll(tracker, v("a", "error"), v("b", "no_data"), now=11.0)
    assert result.status is c.GateStatus.ERROR and result.errors == ["a"] and result.no_data == ["b"]


def test_errors_with_policy_fail_confirm_after_n() -> None:
    tracker = c.BreachTracker(c.GatePolicy(breaches_to_fail=2, default=c.CheckPolicy(on_error="fail")))
    poll(tracker, v("a", "error"))
    assert poll(tracker, v("a", "error")).status is c.GateStatus.FAIL


def test_unconfirmed_breaches_at_the_deadline_are_inconclusive() -> None:
    tracker = c.BreachTracker(c.GatePolicy(breaches_to_fail=3, deadline=5.0))
    poll(tracker, v("a", "fail"), now=1.0)
    result = poll(tracker, v("a", "fail"), now=6.0)
    assert result.status is c.GateStatus.INCONCLUSIVE and "a failed 2x in a row" in result.reason


def test_policy_for_caller_checks_by_prefix() -> None:
    policy = c.GatePolicy(checks={"caller_success_rate": c.CheckPolicy(on_no_data="pass")})
    assert policy.for_check("caller_success_rate[shop/user]").on_no_data is c.OnMissing.PASS
    assert policy.for_check("inbound_rate").on_no_data is c.OnMissing.WAIT
    assert c.GatePolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def test_an_empty_poll_never_passes() -> None:
    tracker = c.BreachTracker(c.GatePolicy(deadline=1.0))
    assert poll(tracker, now=0.0).status is c.GateStatus.PENDING
    assert poll(tracker, now=2.0).status is c.GateStatus.NO_DATA


def test_every_value_seen_is_recorded() -> None:
    tracker = c.BreachTracker(c.GatePolicy(), max_history=5)
    for i in range(4):
        poll(tracker, v("a", "pass", float(i)), v("b", "no_data", math.nan))
    assert tracker.dropped == 3 and len(tracker.history) == 5
    assert [h["values"]["value"] for h in tracker.history if h["check"] == "a"] == [2.0, 3.0]
    assert tracker.history[-1]["values"]["value"] == "NaN" and tracker.history[-1]["poll"] == 4
    assert math.isnan(c.decode_values(tracker.history[-1]["values"])["value"])


def test_gate_result_round_trip() -> None:
    tracker = c.BreachTracker(c.GatePolicy(breaches_to_fail=1))
    result = poll(tracker, v("a", "fail", math.inf))
    back = c.GateResult.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False)))
    assert back.status is c.GateStatus.FAIL and back.decided and back.verdicts[0].values["value"] == math.inf


def test_after_strict_a_caller_without_application_metrics_is_judged_by_its_proxy() -> None:
    gw = ("istio-system", "istio-ingressgateway")
    src = FakeSource().set("istio_success_rate", 1.0).set("istio_inbound_request_rate", 40.0)
    src.set("caller_outbound_success_rate", 1.0, *gw).set("caller_outbound_request_count", 300.0, *gw)
    verdict = by_check(c.verify_after_strict(src, NS, WL, [gw], 40.0, WIN))[
        "caller_success_rate[istio-system/istio-ingressgateway]"]
    assert verdict.outcome is Outcome.PASS and 'reporter="source"' in verdict.query
    src.set("caller_outbound_success_rate", 0.4, *gw)
    verdict = by_check(c.verify_after_strict(src, NS, WL, [gw], 40.0, WIN))[
        "caller_success_rate[istio-system/istio-ingressgateway]"]
    assert verdict.outcome is Outcome.FAIL


# ---- a malformed answer is an unavailable Prometheus (finding 13) ---------------------------------------------
MALFORMED = [
    pytest.param([{"metric": {}, "value": [1.5, None]}], id="null value"),
    pytest.param([{"metric": {}, "value": [1.5, "1", "2"]}], id="a triple"),
    pytest.param([{"metric": {}, "value": [1.5]}], id="a single"),
    pytest.param([{"metric": {}, "value": [1.5, "many"]}], id="not a number"),
    pytest.param([{"metric": None, "value": [1.5, "1"]}], id="null labels"),
    pytest.param([1.5, None], id="null scalar"),
]


@pytest.mark.parametrize("answer", MALFORMED)
def test_a_malformed_sample_is_prometheus_unavailable_never_an_empty_answer(answer: Any) -> None:
    source = p.PrometheusSource("http://127.0.0.1:9", cluster="lab")
    source._client.custom_query = lambda query, params=None: answer  # type: ignore[method-assign]
    with pytest.raises(p.PrometheusUnavailable, match=r"^Prometheus unavailable: malformed answer from "
                                                      r"http://127\.0\.0\.1:9.*; query: up$"):
        source.instant("up")


def test_a_malformed_plaintext_answer_makes_the_strict_gate_an_error() -> None:
    source = p.PrometheusSource("http://127.0.0.1:9")
    answers = {"plaintext_http_requests": [{"metric": {"source_workload": "unknown"}, "value": [1.5, None]}],
               "istio_inbound_request_rate": [{"metric": {}, "value": [1.5, "40"]}]}
    by_query = {p.render(name, namespace=NS, workload=WL, window=WIN): answer for name, answer in answers.items()}
    source._client.custom_query = lambda query, params=None: by_query.get(query, [])  # type: ignore[method-assign]
    verdict, callers = c.strict_gate(source, NS, WL, WIN)
    assert verdict.outcome is Outcome.ERROR and callers == []
    assert "malformed answer" in verdict.reason


# ---- restarts and OOMKills: counted over the soak, confirmed at once (finding 11) -----------------------------
def test_restarts_and_oom_are_read_over_the_events_window() -> None:
    pod = "auth-5d8f7-x7k2p"
    src = healthy()  # over the 10 s window: no restart
    for name, samples in (("container_restarts", [p.Sample({"pod": pod, "container": "auth"}, 1.0)]),
                          ("oom_killed", [p.Sample({"pod": pod, "container": "auth"}, 1.0)])):
        src.answers[p.render(name, namespace=NS, workload=WL, window="90s")] = samples
    verdicts = by_check(c.verify_after_injection(src, baseline(), NS, WL, WIN, events_window="90s"))
    assert verdicts["restarts"].outcome is Outcome.FAIL and "restarted in 90s" in verdicts["restarts"].reason
    assert verdicts["oom_killed"].outcome is Outcome.FAIL and "in 90s" in verdicts["oom_killed"].reason
    assert verdicts["app_success_rate"].outcome is Outcome.PASS, "the other checks keep the query window"
    assert by_check(c.verify_after_injection(src, baseline(), NS, WL, WIN))["restarts"].outcome is Outcome.PASS
    with pytest.raises(ValueError, match="^events_window: "):
        c.verify_after_injection(src, baseline(), NS, WL, WIN, events_window="90")


def test_a_failing_restart_or_oom_poll_confirms_at_once_the_other_checks_keep_n() -> None:
    tracker = c.BreachTracker(c.GatePolicy(breaches_to_fail=3))
    result = poll(tracker, v("app_success_rate", "fail"), v("restarts", "pass"), v("oom_killed", "pass"))
    assert result.status is c.GateStatus.PENDING and result.breaching == {"app_success_rate": 1}
    result = poll(tracker, v("app_success_rate", "fail"), v("restarts", "fail"), v("oom_killed", "fail"))
    assert result.status is c.GateStatus.FAIL and result.failed == ["oom_killed", "restarts"]
    assert result.breaching == {"app_success_rate": 2}
    assert "restarts: restarts fail (an event: confirmed at once)" in result.reason


def test_no_data_of_an_event_check_is_not_an_event() -> None:
    policy = c.GatePolicy(breaches_to_fail=2, default=c.CheckPolicy(on_no_data="fail"))
    tracker = c.BreachTracker(policy)
    assert poll(tracker, v("restarts", "no_data")).status is c.GateStatus.PENDING
    assert poll(tracker, v("restarts", "no_data")).status is c.GateStatus.FAIL


def test_the_event_checks_travel_with_the_policy() -> None:
    assert c.GatePolicy().confirm_at_once == ("restarts", "oom_killed")
    assert c.GatePolicy.from_dict({"breaches_to_fail": 3}).confirm_at_once == ("restarts", "oom_killed")
    none = c.GatePolicy.from_dict(c.GatePolicy(confirm_at_once=()).to_dict())
    tracker = c.BreachTracker(none)
    assert poll(tracker, v("restarts", "fail")).status is c.GateStatus.PENDING


# ---- one Prometheus for several clusters (finding 20) ------------------------------------------------------------
def test_clusters_sharing_a_prometheus_without_the_cluster_extra_are_named() -> None:
    shared = "http://prometheus.monitoring:9090"
    assert p.shared_without_cluster({"eu": (shared, None), "us": (shared + "/", "us")}) == ["eu", "us"]
    assert p.shared_without_cluster({"eu": (shared, ""), "us": ("HTTP://user:pw@Prometheus.monitoring:9090", None),
                                     "ap": ("http://other:9090", None)}) == ["eu", "us"]
    assert p.shared_without_cluster({"eu": (shared, "eu"), "us": (shared, "us")}) == [], "each scoped to its own"
    assert p.shared_without_cluster({"eu": (shared, None), "us": ("http://prom.us:9090", None)}) == [], \
        "a Prometheus per cluster needs no extra"
    assert p.shared_without_cluster({"lab": (shared, None)}) == []
