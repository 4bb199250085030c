"""The lease on the lab's API server: a patch carrying a stale resourceVersion is 409 Conflict as Kubernetes answers
it, two MeshKubes racing for one workload cannot both win, an expired lease is taken over, a broken one refuses
its holder's next write."""

from __future__ import annotations

import json
import threading

import pytest

from meshwave.kube import Conflict, MeshKube
from meshwave.lease import LEASE_ANNOTATION, LeaseRefused, Leases
from tests.component.kubes import api_client

NS, NAME, KEY = "shop", "ledger", "lab/shop/ledger"


def holder(kube: MeshKube) -> str | None:
    text = (kube.deployment(NS, NAME)["metadata"].get("annotations") or {}).get(LEASE_ANNOTATION)
    return None if text is None else json.loads(text)["holder"]


def test_a_strategic_merge_patch_with_a_stale_resource_version_is_409(kube: MeshKube) -> None:
    stale = kube.deployment(NS, NAME)["metadata"]["resourceVersion"]
    kube.leases.take(NS, NAME, "a/1", KEY, 60)
    body = {"metadata": {"resourceVersion": stale, "annotations": {LEASE_ANNOTATION: None}}}
    with pytest.raises(Conflict, match="the object has been modified; please apply your changes to the latest"):
        kube.call("PATCH", "deployment", kube.apps.patch_namespaced_deployment, NAME, NS, body,
                  _content_type="application/strategic-merge-patch+json")
    assert holder(kube) == "a/1"
    kube.leases.release(NS, NAME, "a/1", "done")
    assert holder(kube) is None


def test_two_writers_racing_for_one_workload_cannot_both_win(lab, kube: MeshKube) -> None:  # noqa: ANN001
    kubes = [MeshKube(api_client(lab), "lab") for _ in range(6)]
    won, refused, start = [], [], threading.Barrier(len(kubes))

    def race(i: int) -> None:
        start.wait()
        try:
            kubes[i].leases.take(NS, NAME, f"run/{i}", KEY, 60)
            won.append(i)
        except LeaseRefused as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(kubes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == len(kubes) - 1
    assert holder(kube) == f"run/{won[0]}"
    assert all(f"being changed by run/{won[0]}" in r for r in refused), refused
    kube.leases.release(NS, NAME, f"run/{won[0]}", "done")


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_renew_it(kube: MeshKube) -> None:
    kube.leases.take(NS, NAME, "old/1", KEY, -1)  # expired at once
    change = kube.leases.take(NS, NAME, "new/2", KEY, 60)
    assert change.applied and "taken over" in change.reason and holder(kube) == "new/2"
    with pytest.raises(LeaseRefused, match="old/1.*no longer holds .*held by new/2"):
        kube.leases.renew(NS, NAME, "old/1", 60)
    kube.leases.release(NS, NAME, "new/2", "done")


def test_a_broken_lease_refuses_its_holder_and_can_be_taken(kube: MeshKube) -> None:
    kube.leases.take(NS, NAME, "wave/1", KEY, 600)
    assert kube.leases.break_(NS, NAME, "mesh_emergency_rollback/9").applied
    with pytest.raises(LeaseRefused, match="broken by mesh_emergency_rollback/9"):
        kube.leases.renew(NS, NAME, "wave/1", 60)
    assert kube.leases.take(NS, NAME, "adhoc/2", KEY, 60).applied
    kube.leases.release(NS, NAME, "adhoc/2", "done")


def test_the_lease_restarts_no_pod_and_a_missing_workload_has_nothing_to_lease(kube: MeshKube) -> None:
    before = kube.deployment(NS, NAME)["metadata"].get("generation")
    kube.leases.take(NS, NAME, "wave/1", KEY, 60)
    assert kube.deployment(NS, NAME)["metadata"].get("generation") == before, "metadata only: no new rollout"
    kube.leases.release(NS, NAME, "wave/1", "done")
    assert not kube.leases.take(NS, "no-such-workload", "wave/1", "lab/shop/x", 60).applied
    assert isinstance(kube.leases, Leases)
