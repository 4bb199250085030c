"""BatchingSource: the per-workload checks answered from one batched query per template (a fake Prometheus)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest

from meshwave import checks as c
from meshwave import prometheus as p
from tests.unit.test_checks import MI, NS, WIN, FakeSource, baseline, down, healthy

WORKLOADS = [f"svc-{i:03d}" for i in range(50)]


class BatchedFake:
    """Answers each template's batched query with what the per-workload fakes answer, labelled by workload."""

    def __init__(self, per_workload: dict[str, FakeSource], cluster: str | None = None) -> None:
        self.per_workload = per_workload
        self.cluster = cluster
        self.timeout = 5.0
        self.identity = ("fake", "")
        self.calls: list[tuple[str, float | None]] = []
        self.lock = threading.Lock()
        self.batches = {t.batch.render(window=WIN, cluster=cluster): (name, t.batch)
                        for name, t in p.load_queries().items() if t.batch}

    def instant(self, query: str, at: float | None = None) -> list[p.Sample]:
        with self.lock:
            self.calls.append((query, at))
        if query not in self.batches:  # a per-workload query: the fakes answer it
            return next(iter(self.per_workload.values())).instant(query)
        name, spec = self.batches[query]
        samples = []
        for workload, fake in self.per_workload.items():
            rendered = p.render(name, namespace=NS, workload=workload, window=WIN, cluster=self.cluster)
            for s in fake.instant(rendered):
                labels = {**s.labels, spec.namespace_label: NS, spec.workload_label: workload, "extra": "dropped"}
                samples.append(p.Sample(labels, s.value, s.timestamp))
        return samples


def fleet() -> dict[str, FakeSource]:
    fakes = {w: healthy(FakeSource(), workload=w) for w in WORKLOADS}
    fakes["svc-007"].set("app_success_rate", 0.5, workload="svc-007")  # one breach among them
    return fakes


def comparable(verdicts: list[c.Verdict]) -> list[dict[str, Any]]:
    return [{k: v for k, v in verdict.to_dict().items() if k != "at"} for verdict in verdicts]


def test_every_batched_query_gets_the_cluster_and_only_window_placeholders() -> None:
    for name, template in p.load_queries().items():
        if not re.search(r"\$\{?(namespace|workload)\b", template.promql):
            continue  # already one query for the whole cluster: nothing to batch
        assert template.batch is not None, f"{name}: no batched form"
        query = template.batch.render(window="5m", cluster="lab-1")
        selectors = p.SELECTOR.findall(query)
        assert selectors and all(s.endswith(', cluster="lab-1"}') for s in selectors), (name, query)
        assert "$" not in template.batch.render(window="5m").replace("$1", ""), name


def test_split_keeps_the_per_workload_labels_only() -> None:
    spec = p.BatchSpec("x", "destination_workload_namespace", "destination_workload", ("source_workload",))
    split = spec.split([p.Sample({"destination_workload_namespace": "a", "destination_workload": "w",
                                  "source_workload": "s1"}, 1.0),
                        p.Sample({"destination_workload_namespace": "a", "destination_workload": "w",
                                  "source_workload": "s2"}, 2.0),
                        p.Sample({"destination_workload_namespace": "b", "destination_workload": "w"}, 3.0)])
    assert split == {("a", "w"): [p.Sample({"source_workload": "s1"}, 1.0), p.Sample({"source_workload": "s2"}, 2.0)],
                     ("b", "w"): [p.Sample({}, 3.0)]}


def test_batched_verdicts_equal_the_per_workload_verdicts_with_one_query_per_template() -> None:
    fakes = fleet()
    inner = BatchedFake(fakes)
    source = p.BatchingSource(inner, bucket=3600, shared=p.SharedBatches())  # type: ignore[arg-type]
    for w in WORKLOADS:
        direct = c.verify_after_injection(fakes[w], baseline(), NS, w, WIN, c.Thresholds())
        batched = c.verify_after_injection(source, baseline(), NS, w, WIN, c.Thresholds())
        assert comparable(batched) == comparable(direct), w
    soak_templates = {"app_request_count", "app_request_rate", "app_success_rate", "app_latency_p50_ms",
                      "app_latency_p99_ms", "container_restarts", "oom_killed", "sidecar_memory_bytes",
                      "sidecar_memory_limit_bytes", "istio_success_rate", "istio_inbound_request_rate"}
    assert len(inner.calls) == len(soak_templates), "one query per template, not per workload"
    assert len({at for _, at in inner.calls}) == 1, "every batched query is evaluated at the bucket's start"
    verdicts = {v.check: v for v in c.verify_after_injection(source, baseline(), NS, "svc-007", WIN)}
    assert verdicts["app_success_rate"].outcome is c.Outcome.FAIL


@pytest.mark.parametrize("n", [1, 10, 50])
def test_the_number_of_queries_does_not_grow_with_the_workloads(n: int) -> None:
    fakes = {w: healthy(FakeSource(), workload=w) for w in WORKLOADS[:n]}
    inner = BatchedFake(fakes)
    source = p.BatchingSource(inner, bucket=3600, shared=p.SharedBatches())  # type: ignore[arg-type]
    threads = [threading.Thread(target=c.strict_gate, args=(source, NS, w, WIN)) for w in fakes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(inner.calls) == 5  # plaintext http, tcp and bytes, inbound http + tcp: single-flight across threads


def test_a_workload_missing_from_the_batch_is_no_series() -> None:
    source = p.BatchingSource(BatchedFake(fleet()), bucket=3600, shared=p.SharedBatches())  # type: ignore[arg-type]
    verdicts = {v.check: v for v in c.verify_after_injection(source, baseline(), NS, "not-there", WIN)}
    assert verdicts["restarts"].outcome is c.Outcome.NO_DATA
    assert verdicts["app_success_rate"].outcome is c.Outcome.NO_DATA


def test_an_unavailable_prometheus_is_an_error_and_is_not_cached() -> None:
    inner = BatchedFake(fleet())
    shared = p.SharedBatches()
    source = p.BatchingSource(inner, bucket=3600, shared=shared)  # type: ignore[arg-type]
    answer = inner.instant
    inner.instant = lambda query, at=None: (_ for _ in ()).throw(down())  # type: ignore[method-assign]
    verdicts = c.verify_after_injection(source, baseline(), NS, "svc-001", WIN)
    assert {v.outcome for v in verdicts} == {c.Outcome.ERROR}
    inner.instant = answer  # type: ignore[method-assign]
    verdicts = c.verify_after_injection(source, baseline(), NS, "svc-001", WIN)
    assert {v.outcome for v in verdicts} == {c.Outcome.PASS}


def test_without_a_batched_form_or_when_refused_the_per_workload_query_is_used(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text('queries:\n  app_request_rate:\n    promql: sum(rate(x{app="$workload"$cluster}[$window]))\n'
                    '  app_success_rate:\n    promql: sum(y{app="$workload"$cluster})\n'
                    '    batch: {namespace_label: namespace, workload_label: app,\n'
                    '            promql: "bad(y{a=\\"1\\"$cluster})"}\n')
    seen: list[str] = []

    class Inner:
        cluster, timeout, identity = None, 5.0, ("x", "")

        def instant(self, query: str, at: float | None = None) -> list[p.Sample]:
            seen.append(query)
            if query.startswith("bad("):
                raise p.PrometheusQueryError("bad_data")
            return [p.Sample({}, 7.0)]

    source = p.BatchingSource(Inner(), bucket=3600, shared=p.SharedBatches(), path=path)  # type: ignore[arg-type]
    assert source.workload_query("app_request_rate", "q1", namespace=NS, workload="a", window=WIN, cluster=None) \
        == [p.Sample({}, 7.0)]
    assert source.workload_query("app_success_rate", "q2", namespace=NS, workload="a", window=WIN, cluster=None) \
        == [p.Sample({}, 7.0)]
    assert seen == ["q1", 'bad(y{a="1"})', "q2"]


def test_the_bucket_is_never_wider_than_the_poke_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    assert p.bucket_seconds(30) == p.BUCKET_SECONDS
    assert p.bucket_seconds(2) == 2
    monkeypatch.setenv(p.BUCKET_ENV, "1")
    assert p.bucket_seconds(30) == 1


def test_the_loader_refuses_a_batched_form_with_workload_placeholders(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text('queries:\n  x:\n    promql: sum(up{job="$workload"$cluster})\n'
                    '    batch: {namespace_label: n, workload_label: w,\n'
                    '            promql: "sum(up{job=\\"$workload\\"$cluster})"}\n')
    with pytest.raises(ValueError, match=r"queries\.x\.batch: placeholders"):
        p.load_queries(path)


def test_sidecar_memory_split_is_in_bytes_like_the_plain_query() -> None:
    source = p.BatchingSource(BatchedFake(fleet()), bucket=3600, shared=p.SharedBatches())  # type: ignore[arg-type]
    [sample] = source.workload_query("sidecar_memory_bytes", "", namespace=NS, workload="svc-003", window=WIN,
                                     cluster=None)
    assert sample.value == 80.0 * MI and sample.labels == {}


class SlowFirstFailure:
    """A Prometheus whose first batched query fails with a non-Prometheus exception (as a malformed sample once
    did in `_samples`) after the test lets it; every later query is answered by the fake fleet."""

    def __init__(self, fleet: BatchedFake) -> None:
        self.fleet = fleet
        self.cluster, self.timeout, self.identity = None, 5.0, ("slow", "")
        self.started, self.release = threading.Event(), threading.Event()
        self.failed = False

    def instant(self, query: str, at: float | None = None) -> list[p.Sample]:
        if not self.failed:
            self.failed = True
            self.started.set()
            self.release.wait(10)
            raise TypeError("float() argument must be a string or a real number, not 'NoneType'")
        return self.fleet.instant(query, at)


class Arrivals(p.SharedBatches):
    """SharedBatches that counts the gates that asked it, to release the owner once a second gate waits."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = 0

    def get(self, key: Any, fetch: Any, wait: float) -> dict[tuple[str, str], list[p.Sample]]:
        with self._lock:
            self.arrived += 1
        return super().get(key, fetch, wait)


def test_any_failure_of_the_shared_batch_is_the_error_of_every_waiting_and_later_gate() -> None:
    """Finding 13: the owner fails with a TypeError; the gate waiting on it and a later gate in the same bucket
    must not read "no plaintext" for ledger, whose plaintext caller is in Prometheus."""
    from tests.unit.test_checks import plaintext

    fakes = {w: FakeSource().set("istio_inbound_request_rate", 40.0, workload=w) for w in ("payment", "ledger")}
    fakes["ledger"].set("plaintext_http_requests", plaintext(25.0), workload="ledger")
    inner, shared = SlowFirstFailure(BatchedFake(fakes)), Arrivals()
    results: dict[str, Any] = {}

    def gate(workload: str) -> None:
        with_batches = p.BatchingSource(inner, bucket=3600, shared=shared)  # type: ignore[arg-type]
        try:
            results[workload] = c.strict_gate(with_batches, NS, workload, WIN)[0]
        except Exception as exc:  # noqa: BLE001 - what the gate's thread would die of
            results[workload] = exc

    owner = threading.Thread(target=gate, args=("payment",))
    owner.start()
    assert inner.started.wait(5)
    waiter = threading.Thread(target=gate, args=("ledger",))
    waiter.start()
    while shared.arrived < 2:
        threading.Event().wait(0.01)
    threading.Event().wait(0.1)  # the waiter is past its look-up: it waits on the owner's entry
    inner.release.set()
    owner.join(10)
    waiter.join(10)
    for workload in ("ledger", "payment"):  # ledger first: today's fail-open is its pass
        verdict = results[workload]
        assert isinstance(verdict, c.Verdict) and verdict.outcome is c.Outcome.ERROR, (workload, verdict)
        assert "batched query failed with TypeError" in verdict.reason
    later = c.strict_gate(p.BatchingSource(inner, bucket=3600, shared=shared), NS, "ledger", WIN)[0]  # type: ignore[arg-type]
    assert later.outcome is c.Outcome.FAIL, "a later gate asks again: it sees the plaintext caller"
    assert "unknown (a caller without sidecar) http 25 requests in the last 10s" in later.reason


def test_an_interrupted_owner_leaves_its_waiters_an_error_not_an_empty_answer() -> None:
    shared = p.SharedBatches()

    def interrupted() -> dict[tuple[str, str], list[p.Sample]]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shared.get(("x", "q", 0.0), interrupted, wait=1)
    assert shared._entries == {}, "the failed entry is not left behind"
    with pytest.raises(p.PrometheusUnavailable, match="batched query failed with TypeError"):
        shared.get(("x", "q", 0.0), lambda: (_ for _ in ()).throw(TypeError("bad")), wait=1)
