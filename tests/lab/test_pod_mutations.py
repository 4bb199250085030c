"""What real clusters do to a new pod besides the sidecar: metrics merging and image digest pinning (per cluster)."""

from __future__ import annotations

import json
import re

import pytest

from meshlab import resources as r
from meshlab.lab import Lab, deployment_manifest
from meshlab.topology import Service, parse_topology

MERGE = "application/merge-patch+json"
APP_SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
MERGED_SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/port": "15020",
                 "prometheus.io/path": "/stats/prometheus"}
PINNED = re.compile(r"^(?P<ref>[^@]+)@sha256:(?P<digest>[0-9a-f]{64})$")


def lab_of(**cluster: object) -> Lab:
    return Lab(parse_topology({
        "clusters": [{"name": "lab", **cluster,
                      "namespaces": [{"name": "meshed", "labels": {"istio-injection": "enabled"}}, {"name": "plain"}]}],
        "services": [{"name": "web", "namespace": "meshed"}, {"name": "old", "namespace": "plain"}]}))


def pods(lab: Lab, ns: str) -> list[dict]:
    return lab.clusters["lab"].store.list(r.PODS, ns)


def scrape(pod: dict) -> dict[str, str]:
    return {k: v for k, v in pod["metadata"]["annotations"].items() if k.startswith("prometheus.io/")}


def proxy(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy")


def test_app_templates_carry_the_apps_own_scrape_annotations() -> None:
    template = deployment_manifest(Service(name="web", port=8080))["spec"]["template"]
    assert template["metadata"]["annotations"] == APP_SCRAPE


def test_metrics_merging_points_an_injected_pods_scrape_annotations_at_the_agent() -> None:
    lab = lab_of(metrics_merge=True)
    store = lab.clusters["lab"].store
    for pod in pods(lab, "meshed"):
        assert scrape(pod) == MERGED_SCRAPE
        env = {e["name"]: e["value"] for e in proxy(pod).get("env", [])}
        # The app's own values go to the agent, which scrapes the app and merges its metrics with Envoy's.
        assert json.loads(env["ISTIO_PROMETHEUS_ANNOTATIONS"]) == {"scrape": "true", "path": "/metrics", "port": "8080"}
        assert env["ISTIO_PROMETHEUS_ANNOTATIONS"] == '{"scrape":"true","path":"/metrics","port":"8080"}'
    template = store.get(r.DEPLOYMENTS, "meshed", "web")["spec"]["template"]
    assert template["metadata"]["annotations"] == APP_SCRAPE, "the template is not what the pod got"
    assert all(scrape(p) == APP_SCRAPE for p in pods(lab, "plain")), "no sidecar, nothing merged"


def test_without_metrics_merging_an_injected_pod_keeps_the_apps_annotations() -> None:
    lab = lab_of()
    for pod in pods(lab, "meshed"):
        assert scrape(pod) == APP_SCRAPE and "env" not in proxy(pod)


@pytest.mark.parametrize(("annotations", "merged"), [
    ({"prometheus.io/scrape": "false"}, False),  # the app opted out of scraping: left alone
    ({"prometheus.istio.io/merge-metrics": "false"}, False),  # the pod opted out of merging
    ({}, True),
])
def test_metrics_merging_respects_the_pods_opt_outs(annotations: dict, merged: bool) -> None:
    lab = lab_of(metrics_merge=True)
    store = lab.clusters["lab"].store
    body = {"metadata": {"name": "p", "annotations": {**APP_SCRAPE, **annotations}},
            "spec": {"containers": [{"name": "app", "image": "registry.meshlab.local/app:1"}]}}
    pod = store.create(r.PODS, "meshed", body)
    assert (scrape(pod) == MERGED_SCRAPE) is merged


def test_image_digest_pins_every_image_of_a_new_pod() -> None:
    lab = lab_of(image_digest=True)
    store = lab.clusters["lab"].store
    template_image = store.get(r.DEPLOYMENTS, "meshed", "web")["spec"]["template"]["spec"]["containers"][0]["image"]
    meshed = pods(lab, "meshed")
    images = {c["name"]: c["image"] for p in meshed for c in p["spec"]["containers"] + p["spec"]["initContainers"]}
    for image in images.values():
        assert PINNED.match(image), image
    assert PINNED.match(images["web"])["ref"] == template_image == "registry.meshlab.local/web:1.0"
    assert len({c["image"] for p in meshed for c in p["spec"]["containers"] if c["name"] == "web"}) == 1, \
        "the same tag pins to the same digest"
    assert PINNED.match(images["istio-proxy"])["ref"] == "docker.io/istio/proxyv2:1.24.0"
    status = meshed[0]["status"]["containerStatuses"][0]
    assert status["imageID"] == f"{template_image}@sha256:{PINNED.match(images['web'])['digest']}"


def test_without_image_digest_pods_run_the_templates_tags() -> None:
    lab = lab_of()
    assert {c["image"] for p in pods(lab, "plain") for c in p["spec"]["containers"]} == {
        "registry.meshlab.local/old:1.0"}


def test_mutations_happen_at_creation_only() -> None:
    lab = lab_of(metrics_merge=True, image_digest=True)
    store = lab.clusters["lab"].store
    name = pods(lab, "plain")[0]["metadata"]["name"]
    patched = store.patch(r.PODS, "plain", name, MERGE, {"metadata": {"labels": {"sidecar.istio.io/inject": "true"},
                                                                       "annotations": {"prometheus.io/port": "9"}}})
    assert [c["name"] for c in patched["spec"]["containers"]] == ["old"], "no injection on an update"
    assert patched["metadata"]["annotations"]["prometheus.io/port"] == "9"
