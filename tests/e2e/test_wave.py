"""End to end: a real scheduler and triggerer run the wave DAGs against the lab and a real Prometheus."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e


def mode(stack: Stack, workload: str) -> str | None:
    custom = stack.k8s()[2]
    try:
        pa = custom.get_namespaced_custom_object("security.istio.io", "v1", "shop", "peerauthentications",
                                                 f"meshwave-{workload}")
    except Exception:
        return None
    return pa["spec"]["mtls"]["mode"]


def test_breaker_wave_stops_after_two_rollbacks(stack: Stack) -> None:
    run_id, state = stack.run("meshwave_e2e_breaker_main", timeout=600)
    records = stack.records("meshwave_e2e_breaker_main", run_id)
    outcomes = {w: r["outcome"] for w, r in records.items()}
    print(outcomes)
    for w, r in records.items():
        print(w, r["outcome"], r["reason"])
    assert outcomes == {"alpha": "rolled_back", "beta": "rolled_back", "gamma": "skipped", "web": "skipped"}
    assert state == "failed"
