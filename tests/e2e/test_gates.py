"""End to end, the fail-closed gates (issue 13, items 1 and 3; safety review findings 1 and 8): one wave of the real
DAGs on the lab and a real Prometheus, three services at once (tests/e2e/plans/gates.yaml, run EARLY).

- g-burst: g-batch (no sidecar) calls it in a 3 s burst every 90 s. Between bursts one query window holds no
  plaintext; the STRICT gate counts plaintext since the sidecar came, so g-burst stays PERMISSIVE, naming the caller.
- g-drop: its new proxy fails 90 % of the requests (503 UF) before they reach the app: rolled back by the soak.
- g-nolabel: its app exports its metrics without the `app` label: blocked before any change, named by wave_preflight.
Every record's sidecar and mTLS mode are the lab's data plane's.
"""

from __future__ import annotations

import pytest

from meshwave.group_state import decoded
from tests.e2e.conftest import Stack
from tests.e2e.test_mtls import assert_records_match_the_data_plane, data_plane, pa
from tests.e2e.test_wave import proxies

pytestmark = pytest.mark.e2e

DAG = "meshwave_e2e_gates_gates"
PLAINTEXT_15S = ('sum(rate(istio_requests_total{reporter="destination", destination_workload="g-burst", '
                 'destination_workload_namespace="gates", connection_security_policy!="mutual_tls"}[15s]))')


def gate_span(stack: Stack, run_id: str) -> tuple[float, float]:
    """When g-burst's STRICT gate started and ended (its trigger's own clock)."""
    for ti in stack.airflow.task_instances(DAG, run_id).values():
        if ti["task_id"].endswith(".strict_gate") and ti.get("state") == "success":  # the others skipped
            event = decoded(stack.airflow.ti_xcom(ti, "strict_gate"))  # the result its trigger ended it with
            if isinstance(event, dict) and event.get("started"):
                return float(event["started"]), float(event["ended"])
    raise AssertionError("g-burst's STRICT gate left no event")


def test_bursts_keep_permissive_a_dropping_proxy_is_rolled_back_and_unlabelled_metrics_block(stack: Stack) -> None:
    run_id, state = stack.early_run(DAG, timeout=900)
    records = stack.records(DAG, run_id)
    summary = {w: (r["outcome"], r["mtls"], r["reason"]) for w, r in records.items()}
    assert set(records) == {"g-burst", "g-drop", "g-nolabel"}, summary

    burst = records["g-burst"]
    assert (burst["outcome"], burst["mtls"]) == ("permissive", "PERMISSIVE"), summary
    assert burst["reason"].startswith("plaintext callers in the lookback when the STRICT gate timed out: unknown (a "
                                      "caller without sidecar) http "), summary
    assert "requests in the last" in burst["reason"], summary
    assert pa(stack, "gates", "meshwave-g-burst") is None, "no STRICT policy was written"
    # The point: during the gate, a single query window saw no plaintext at some poll; the lookback always did.
    started, ended = gate_span(stack, run_id)
    span = int(ended - started)
    quiet = stack.prometheus.query(f"min_over_time(({PLAINTEXT_15S})[{span}s:2s] @ {ended:.3f})")
    assert quiet and float(quiet[0]["value"][1]) == 0.0, f"a 15 s window without plaintext in the {span} s gate"

    drop = records["g-drop"]
    assert drop["outcome"] == "rolled_back", summary
    assert "soak failed" in drop["reason"] and "istio_success_rate: success rate 0.10 < baseline 1.00" in \
        drop["reason"], summary
    assert not any(proxies(stack, "gates", "g-drop")), "the sidecar is gone, and the drops with it"
    assert data_plane(stack, "gates", "g-drop")["sidecar_fraction"] == 0.0

    nolabel = records["g-nolabel"]
    assert (nolabel["outcome"], nolabel["changes"]) == ("blocked", []), summary
    assert "no baseline: " in nolabel["reason"] and 'app="g-nolabel"' in nolabel["reason"], summary
    assert nolabel["reason"].endswith(": no series"), summary
    assert not any(proxies(stack, "gates", "g-nolabel"))
    preflight = stack.airflow.xcom(DAG, run_id, "wave_preflight")
    assert preflight["lab"]["without_app_metrics"] == ["gates/g-nolabel"], preflight

    assert state == "success", "a rollback and a blocked service: within the wave's failure budget (3)"
    assert_records_match_the_data_plane(stack, records)
