"""The `/metrics` body the lab serves (meshlab.textformat's renderer, its line prefixes kept across scrapes) is what
prometheus_client's generate_latest writes for the same families: same series, labels, values, HELP and TYPE, in
the same order, on the seed fleet while it ticks, its pods come and go and an app's label names change."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from meshlab import resources as r
from meshlab.lab import Lab
from meshlab.server import Exposition
from meshlab.textformat import COUNTER, GAUGE, HISTOGRAM, Family, TextRenderer
from meshlab.topology import load_topology
from tests.conftest import SEED
from tests.lab.sim import Clock

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def reference(families: list[Metric]) -> bytes:
    """generate_latest's body for these families, as the lab served it before its own renderer."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def parsed(body: bytes) -> tuple[list[tuple[str, str, str]], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """(name, type, help) of every family in order, and every sample's value by (name, labels)."""
    families, samples = [], {}
    for family in text_string_to_metric_families(body.decode()):
        families.append((family.name, family.type, family.documentation))
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"series exposed twice: {key}"
            samples[key] = s.value
    return families, samples


def assert_same_exposition(ours: bytes, theirs: bytes) -> None:
    our_families, our_samples = parsed(ours)
    their_families, their_samples = parsed(theirs)
    assert our_families == their_families
    missing = their_samples.keys() - our_samples.keys()
    extra = our_samples.keys() - their_samples.keys()
    assert not missing and not extra, f"{len(missing)} series missing, e.g. {sorted(missing)[:2]}; " \
                                      f"{len(extra)} not in generate_latest's, e.g. {sorted(extra)[:2]}"
    differ = {k: (v, their_samples[k]) for k, v in our_samples.items() if v != their_samples[k]}
    assert not differ, f"{len(differ)} values differ, e.g. {sorted(differ.items())[:2]}"
    assert ours == theirs, "same samples, but not the same text (order or formatting)"


def scrape_both_ways(lab: Lab, exposition: Exposition) -> None:
    exposition.render()
    assert exposition.body is not None
    assert_same_exposition(exposition.body, reference(list(lab.telemetry.families(lab.metric_sources()))))


@pytest.fixture(scope="module")
def seed_lab() -> Lab:
    return Lab(load_topology(SEED))


def test_the_seed_body_is_what_generate_latest_writes_while_pods_come_and_go(seed_lab: Lab) -> None:
    lab, clock = seed_lab, Clock(seed_lab)
    exposition = Exposition(lab)
    clock.run(2)
    scrape_both_ways(lab, exposition)  # every prefix built
    clock.run(1)
    exposition.render()  # every prefix kept

    store = lab.clusters["prod-eu-1"].store
    victims = [p["metadata"]["name"] for p in store.items(r.PODS, "identity")][:3]
    for name in victims:  # deleted pods' series go, their replacements' come
        store.delete(r.PODS, "identity", name)
    store.patch(r.NAMESPACES, None, "payments", MERGE, {"metadata": {"labels": {"istio-injection": "enabled"}}})
    for dep in [d["metadata"]["name"] for d in store.items(r.DEPLOYMENTS, "payments")]:
        store.patch(r.DEPLOYMENTS, "payments", dep, STRATEGIC, {"spec": {"template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": "2026-11-30T07:00:00Z"}}}}})  # sidecars: Istio series appear
    app = next(key for key, svc in lab.knobs.items() if key[0] == "prod-us-1" and svc.kind == "deployment"
               and not svc.gateway)
    lab.set_knobs(app, {"app_metrics_label": "service"})  # the application families gain a label name
    clock.run(6)
    scrape_both_ways(lab, exposition)
    names = {line.split(b"{")[0] for line in exposition.body.splitlines()}  # type: ignore[union-attr]
    assert b"istio_requests_total" in names
    assert not any(v.encode() in exposition.body for v in victims), "a deleted pod's series are gone"  # type: ignore


class _Histogram:
    def __init__(self, buckets: list[float], total: float, count: float) -> None:
        self.buckets, self.sum, self.count = buckets, total, count


def _odd_families() -> list[Family]:
    """What the seed never has: escaping, an empty family, no labels, ints, huge, tiny, infinite and NaN values."""
    odd = ("quote\"d", "back\\slash", "new\nline", "ünïcode", "")
    return [
        Family("odd", COUNTER, "Doc with \\ and\nnewline.", ("a", "b"),
               [((v, "x"), n) for n, v in enumerate(odd)] + [(("big", "x"), 1234567.891), (("int", "x"), 3)]),
        Family("empty", GAUGE, "Nothing exposed.", ("a",), []),
        Family("bare", GAUGE, "No labels.", (), [((), 0.5)]),
        Family("special", GAUGE, "Special values.", ("v",),
               [(("inf",), float("inf")), (("-inf",), float("-inf")), (("nan",), float("nan")), (("tiny",), 1e-9),
                (("neg",), -2.5), (("e16",), 1e16), (("below",), 999999.9999), (("at",), 1e6), (("-big",), -1e7),
                (("zero",), 0), (("-zero",), -0.0), (("true",), True)]),
        Family("latency_seconds", HISTOGRAM, "A histogram.", ("a", "z"),
               [(("x", "y"), _Histogram([1.0, 2.0, 3.5], 7.25, 4.0)),
                (("q\"", ""), _Histogram([0.0, 0, 1e7], 1e8, 1e7))],
               ("0.1", "1", "10")),
    ]


def test_escaping_and_special_values_are_written_as_generate_latest_writes_them() -> None:
    renderer = TextRenderer()
    for _ in range(2):  # built, then from the kept prefixes
        ours = renderer.render(_odd_families())
        theirs = reference([f.metric() for f in _odd_families()])
        assert ours == theirs


def test_a_family_whose_label_names_change_is_not_written_with_the_old_ones() -> None:
    """An app's metrics label can change (app_metrics_label) while its label values stay the same tuple."""
    renderer = TextRenderer()
    for names in (("cluster", "service"), ("cluster", "workload"), ("cluster", "service")):
        family = Family("http_requests", COUNTER, "Requests.", names, [(("lab", "ledger"), 1.0)])
        assert renderer.render([family]) == reference([family.metric()])
