"""MeshKube's pending annotations against the lab: written on the Deployment's own metadata (no pod restarts),
found across all namespaces, removed by a merge patch's null, and an annotation that is not meshwave's is an error."""

from __future__ import annotations

import pytest

from meshstack.process import LabProcess
from meshwave.kube import MeshKube
from meshwave.pending import PENDING_ANNOTATION, Undo, expecting
from meshwave.plan import parse_plan
from meshwave.wave import services_of

pytestmark = pytest.mark.component
NS, WORKLOAD = "shop", "ledger"
PLAN = {"migration": "m", "clusters": {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}},
        "waves": [{"name": "w", "services": [{"cluster": "lab", "namespace": NS, "workload": WORKLOAD}]}]}


def test_a_pending_state_is_written_found_and_cleared_without_restarting_pods(kube: MeshKube) -> None:
    plan = parse_plan(PLAN)
    svc = services_of(plan, plan.waves[0])[0]
    generation = kube.deployment(NS, WORKLOAD)["metadata"].get("generation")
    pending = expecting("STRICT, not verified yet", Undo.PERMISSIVE, 0, "wave/run-1", svc.to_dict())

    change = kube.set_pending(NS, WORKLOAD, pending)
    assert change.applied and change.action == "set-pending"
    assert kube.pending(NS, WORKLOAD) == pending
    assert kube.list_pending() == ([(NS, WORKLOAD, pending)], [])
    assert kube.deployment(NS, WORKLOAD)["metadata"].get("generation") == generation, "no new pod template"

    cleared = kube.clear_pending(NS, WORKLOAD, "STRICT verified")
    assert cleared.applied and kube.pending(NS, WORKLOAD) is None and kube.list_pending() == ([], [])
    assert PENDING_ANNOTATION not in (kube.deployment(NS, WORKLOAD)["metadata"].get("annotations") or {})
    assert not kube.clear_pending(NS, WORKLOAD, "again").applied, "nothing pending: no write"


def test_an_annotation_that_is_not_meshwave_s_is_named_and_does_not_hide_the_others(lab: LabProcess,
                                                                                     kube: MeshKube) -> None:
    kube.apps.patch_namespaced_deployment(WORKLOAD, NS, {"metadata": {"annotations": {PENDING_ANNOTATION: "later"}}})
    try:
        found, problems = kube.list_pending()
        assert found == [] and len(problems) == 1
        assert problems[0].startswith(f"cluster lab: deployment {NS}/{WORKLOAD}: annotation {PENDING_ANNOTATION} is "
                                      "not meshwave's")
        with pytest.raises(ValueError, match=f"cluster lab: deployment {NS}/{WORKLOAD}: annotation "):
            kube.pending(NS, WORKLOAD)
    finally:
        kube.apps.patch_namespaced_deployment(WORKLOAD, NS, {"metadata": {"annotations": {PENDING_ANNOTATION: None}}})
