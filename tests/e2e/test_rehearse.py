"""A rehearsal on the shared stack: a plan whose two chained waves each span two clusters (lab and beta), rehearsed
with soaks of 20 s (issue 16, items 3 and 4). The rehearsal triggers wave `webs` itself; `apis` must start on its
Asset. The end state is read from both clusters and every record checked against it; the callers' history comes
from Prometheus. Not an EARLY run: the emergency tests press the button on `beta` once the early runs have ended,
and a chained wave still running then would end frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import config

from meshlab.rehearsal.end_state import End
from meshlab.rehearsal.plan_copy import rehearsal_plan
from meshlab.rehearsal.run import rehearse
from meshwave.kube import MeshKube
from meshwave.prometheus import PrometheusSource
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e
PLAN_FILE = Path(__file__).parent / "plans" / "rehearse.yaml"
PLAN, TEXT = rehearsal_plan(PLAN_FILE, 20)
WEBS, APIS = (PLAN.dag_id(w) for w in PLAN.waves)


def test_two_chained_waves_spanning_two_clusters_rehearse_to_a_true_end_state(stack: Stack, tmp_path: Path) -> None:
    stack.add_wave_dags("rehearse", TEXT)  # replaces the plan's own file (soaks of 300 s, a Saturday window)
    for dag_id in (WEBS, APIS):
        stack.wait_for_details(dag_id)
    kubes = {c: MeshKube(config.new_client_from_config(config_file=stack.lab.kubeconfig(c)), c) for c in PLAN.clusters}
    result = rehearse(stack.airflow, kubes, PrometheusSource(stack.prometheus.url, timeout=60), PLAN, tmp_path,
                      timeout=900, title="e2e rehearsal")
    waves = {w.wave: w for w in result.waves}
    assert waves["webs"].run_id.startswith("manual__"), "the rehearsal triggered the first wave"
    assert (waves["webs"].state, waves["webs"].published) == ("success", True), waves["webs"]
    assert waves["apis"].state == "success" and waves["apis"].run_id is not None, waves["apis"]
    # started by the Asset that webs' publish task updated (its run ends a moment after that task)
    assert waves["apis"].run_id.startswith("asset_triggered__"), waves["apis"].run_id
    assert waves["apis"].started > waves["webs"].started
    assert {r.cluster for w in result.waves for r in w.records} == {"lab", "beta"}

    ends = {e.key: e for e in result.ends if e.wave is not None}
    assert {k: e.end for k, e in ends.items()} == {
        "lab/rehearse/rh-web": End.PERMISSIVE, "beta/rehearse/rb-web": End.PERMISSIVE,
        "lab/rehearse/rh-api": End.STRICT, "beta/rehearse/rb-api": End.STRICT}, ends
    assert all(not e.mismatch for e in result.ends), [e.mismatch for e in result.ends if e.mismatch]
    assert all(e.data_plane.startswith("2/2 pods with a sidecar") for e in ends.values()), ends

    assert result.history is not None
    judged = {str(c.edge) for c in result.history.checks}
    assert {"lab/rehearse/rh-web -> lab/rehearse/rh-api", "beta/rehearse/rb-web -> beta/rehearse/rb-api"} <= judged
    assert result.history.lost == [], [(str(c.edge), c.lowest) for c in result.history.lost]
    assert result.passed, result.problems

    text = result.report.read_text()
    assert "**Passed**" in text and "### beta: " in text and "### lab: " in text
    for chart in ("end-states.png", "callers.png"):
        assert (tmp_path / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({chart})" in text
