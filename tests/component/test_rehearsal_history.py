"""The rehearsal's history check on a real Prometheus scraping the lab: quiet while nothing changes, and both of a
STRICT service's plaintext callers (one traced, one not) named as having lost traffic once STRICT cuts them off."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from meshlab.rehearsal.history import check_history
from meshstack.process import LabProcess, PrometheusProcess
from meshwave.plan import Plan
from meshwave.prometheus import PrometheusSource

pytestmark = pytest.mark.component
TOPOLOGY = Path(__file__).with_name("rehearsal.yaml")
PLAN = Plan.model_validate({
    "migration": "history", "clusters": {"rl": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}},
    "waves": [{"name": "one", "services": [{"cluster": "rl", "namespace": "meshed", "workload": "api"}]}]})
BEFORE, WINDOW, STEP = 30, 10, 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabProcess, PrometheusSource]]:
    work = tmp_path_factory.mktemp("rehearsal")
    with LabProcess(TOPOLOGY, work / "lab") as lab, \
            PrometheusProcess([lab.metrics_target], work / "prom", scrape_interval="1s") as prom:
        yield lab, PrometheusSource(prom.url, timeout=20)


def test_quiet_traffic_breaks_no_floor_and_strict_cuts_off_both_plaintext_callers(stack) -> None:
    lab, source = stack
    time.sleep(BEFORE + WINDOW + 5)  # the edges' rates before, over a full window
    start = time.time() - 2
    time.sleep(3 * STEP)
    quiet = check_history(source, PLAN, start, time.time(), before_seconds=BEFORE, window=WINDOW, step=STEP)
    judged = {str(c.edge) for c in quiet.checks}
    assert judged == {"rl/app/web -> rl/meshed/api", "user -> rl/meshed/api"}, quiet
    assert quiet.lost == [], [(str(c.edge), c.lowest) for c in quiet.checks]
    assert all(c.lowest > 0.98 for c in quiet.checks), [(str(c.edge), c.lowest) for c in quiet.checks]

    objects = client.CustomObjectsApi(config.new_client_from_config(config_file=lab.kubeconfig("rl")))
    objects.create_namespaced_custom_object("security.istio.io", "v1", "meshed", "peerauthentications", {
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "meshed"}, "spec": {"mtls": {"mode": "STRICT"}}})
    cut = time.time()
    time.sleep(WINDOW + 3 * STEP)
    history = check_history(source, PLAN, start, time.time(), before_seconds=BEFORE, window=WINDOW, step=STEP)
    lost = {str(c.edge): c for c in history.lost}
    assert set(lost) == {"rl/app/web -> rl/meshed/api", "user -> rl/meshed/api"}, history
    for check in lost.values():
        assert check.lowest < 0.05 and check.lowest_at > cut and check.seconds_below >= STEP, check
    assert min(share for _, share in history.lowest_by_time) < 0.05
