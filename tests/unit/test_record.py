"""meshwave.record: the typed outcome record (issue 15, item 3). What the outcome task pushes (XCom "record") keeps
the plain JSON shape every reader has had: the same keys in the same order, the same nesting, the outcome a string.
The readers validate it back into a ServiceRecord: the wave's batches, its report's JSON ledger."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from meshwave import report
from meshwave.plan import parse_plan
from meshwave.record import ServiceRecord
from meshwave.wave import _records, batch_group, services_of
from tests.unit.test_decisions import (
    BASELINE,
    FLIP,
    GATE_PASS,
    INJECT,
    LABEL,
    OOM,
    PREFLIGHT,
    ROLLBACK,
    SOAK_PASS,
    T0,
    VERIFY_PASS,
    record,
    rollout,
    service,
    states,
)

# the XCom record's keys, in the order they are pushed (and written to the report's JSON ledger)
KEYS = ["service", "cluster", "namespace", "workload", "criticality", "batch", "action", "baseline", "after",
        "changes", "verdicts", "plaintext_callers", "decisions", "errors", "steps", "outcome", "mtls", "sidecar",
        "reason"]


def strict() -> ServiceRecord:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT,
               "wait_rollout": rollout("done", "2/2 pods updated and available, 2 proxies ready"),
               "soak": SOAK_PASS, "strict_gate": GATE_PASS, "flip_strict": FLIP, "verify_strict": VERIFY_PASS}
    return record(service(), results, states("preflight", "baseline", "inject", "wait_rollout", "after_rollout",
                                             "soak", "after_soak", "strict_gate", "after_strict_gate", "flip_strict",
                                             "verify_strict", "after_strict", "strict_done"))


def rolled_back() -> ServiceRecord:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": INJECT, "wait_rollout": rollout("failed", OOM),
               "rollback_injection": ROLLBACK,
               "wait_rollback": rollout("done", "2/2 pods updated and available", T0 + 46, T0 + 80.5)}
    return record(service(), results, states("preflight", "baseline", "inject", "wait_rollout", "after_rollout",
                                             "rollback_after_rollout", "rollback_injection", "wait_rollback"))


def blocked() -> ServiceRecord:
    st = states("preflight", "after_rollout", "not_started", baseline="failed", inject="upstream_failed",
                wait_rollout="upstream_failed")
    return record(service(), {"preflight": PREFLIGHT}, st, {"baseline": "ValueError: window: '0s'"})


def skipped() -> ServiceRecord:
    return record(service(), {}, states(admit="skipped"), {"admit": "the maintenance window closed"})


def planned() -> ServiceRecord:
    results = {"preflight": PREFLIGHT, "baseline": BASELINE, "inject": {"changes": [LABEL], "seconds": 0.2},
               "wait_rollout": {"status": "done", "message": "dry run: nothing to wait for", "dry_run": True},
               "soak": {"stage": "soak", "status": "pass", "reason": "dry run: not checked", "dry_run": True}}
    st = states("preflight", "baseline", "inject", "wait_rollout", "after_rollout", "soak", "after_soak",
                "hold_permissive")
    return record(service(strict=False), results, st, dry_run=True)


SCENARIOS = {"strict": strict, "rolled_back": rolled_back, "blocked": blocked, "skipped": skipped,
             "planned": planned}


def assert_pushed_shape(pushed: dict[str, Any]) -> None:
    """The types every reader of the XCom record relies on (JSON types: no enum, no model, no tuple)."""
    assert list(pushed) == KEYS
    assert type(pushed["service"]) is str and type(pushed["outcome"]) is str and type(pushed["reason"]) is str
    for key in ("cluster", "namespace", "workload", "criticality", "action", "mtls"):
        assert pushed[key] is None or type(pushed[key]) is str, key
    assert pushed["batch"] is None or type(pushed["batch"]) is int
    assert pushed["sidecar"] is None or type(pushed["sidecar"]) is bool
    assert list(pushed["baseline"]) == ["success_rate", "p99_ms", "request_rate"]
    assert set(pushed["after"]) <= {"success_rate", "p99_ms"}
    for values in (pushed["baseline"], pushed["after"]):
        assert all(v is None or type(v) is float for v in values.values()), values
    assert all(type(c) is dict for c in pushed["changes"] + pushed["verdicts"])
    assert all(type(c) is str for c in pushed["plaintext_callers"])
    for key in ("decisions", "errors"):
        assert all(type(k) is str and type(v) is str for k, v in pushed[key].items()), key
    assert all(type(k) is str and type(v) is float for k, v in pushed["steps"].items())
    assert json.loads(json.dumps(pushed)) == pushed


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_pushed_record_keeps_its_json_shape(name: str) -> None:
    r = SCENARIOS[name]()
    pushed = r.model_dump(mode="json")
    assert_pushed_shape(pushed)
    assert pushed["outcome"] == name


def test_the_pushed_records_in_full() -> None:
    """Whole records where they are short: a value the soak did not judge is absent from `after`, not null."""
    identity = {"service": "lab/shop/payment", "cluster": "lab", "namespace": "shop", "workload": "payment",
                "criticality": "critical", "batch": 2, "action": "migrate"}
    assert skipped().model_dump(mode="json") == {
        **identity, "baseline": {"success_rate": None, "p99_ms": None, "request_rate": None}, "after": {},
        "changes": [], "verdicts": [], "plaintext_callers": [], "decisions": {},
        "errors": {"admit": "the maintenance window closed"}, "steps": {}, "outcome": "skipped", "mtls": None,
        "sidecar": False, "reason": "not started: the maintenance window closed"}
    assert blocked().model_dump(mode="json") == {
        **identity, "baseline": {"success_rate": None, "p99_ms": None, "request_rate": None}, "after": {},
        "changes": [], "verdicts": [], "plaintext_callers": [],
        "decisions": {"after_rollout": "not started: preflight or baseline did not pass",
                      "after_rollout_to": "not_started"},
        "errors": {"baseline": "ValueError: window: '0s'"}, "steps": {"preflight": 0.41}, "outcome": "blocked",
        "mtls": None, "sidecar": False, "reason": "baseline: ValueError: window: '0s'"}
    assert strict().model_dump(mode="json")["after"] == {"success_rate": 0.997, "p99_ms": 15.1}
    assert rolled_back().model_dump(mode="json")["after"] == {}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_record_round_trips_through_its_json(name: str) -> None:
    r = SCENARIOS[name]()
    pushed = r.model_dump(mode="json")
    assert ServiceRecord.model_validate(pushed) == r
    assert ServiceRecord.model_validate_json(json.dumps(pushed)) == r
    assert ServiceRecord.model_validate(pushed).model_dump(mode="json") == pushed, "the same JSON again"


def test_an_unknown_outcome_or_key_is_refused() -> None:
    pushed = strict().model_dump(mode="json")
    with pytest.raises(ValidationError, match="outcome\n  Input should be 'strict', 'permissive'"):
        ServiceRecord.model_validate({**pushed, "outcome": "green"})
    with pytest.raises(ValidationError, match="colour\n  Extra inputs are not permitted"):
        ServiceRecord.model_validate({**pushed, "colour": "green"})
    with pytest.raises(ValidationError, match="success_rate\n  Input should be a valid number"):
        ServiceRecord.model_validate({**pushed, "after": {"success_rate": "high"}})


# ---- the readers --------------------------------------------------------------------------------------------
def wave_services() -> list[Any]:
    plan = parse_plan({
        "migration": "shop-mesh",
        "clusters": {"lab": {"kubernetes_conn_id": "k8s_lab", "prometheus_conn_id": "prom_lab"}},
        "defaults": {"batch_size": 2},
        "waves": [{"name": "wave-1", "services": [{"cluster": "lab", "namespace": "shop", "workload": w}
                                                  for w in ("auth", "user", "payment")]}],
    })
    return services_of(plan, plan.waves[0])


class TI:
    def __init__(self, pulled: dict[str, Any]) -> None:
        self.pulled = pulled

    def xcom_pull(self, task_ids: str, key: str) -> Any:
        assert key == "record"
        return self.pulled.get(task_ids)


def test_the_wave_reads_each_batch_s_records_typed_and_names_a_missing_one_failed() -> None:
    auth, user, payment = wave_services()
    pushed = {svc.plan.key: strict().model_dump(mode="json") | {"service": svc.plan.key, "batch": svc.batch}
              for svc in (auth, user, payment)}
    # batch 1: every map index in a list, one of them pushed nothing; batch 2: a lone record, bare and
    # JSON-encoded once more (as Airflow 3.3.2 stores what a trigger pushed)
    ti = TI({f"{batch_group(1)}.outcome": [pushed[auth.plan.key], None],
             f"{batch_group(2)}.outcome": json.dumps(pushed[payment.plan.key])})
    records = _records({"ti": ti}, [auth, user, payment])
    assert [type(r) for r in records] == [ServiceRecord] * 3
    assert records[0].model_dump(mode="json") == pushed[auth.plan.key]
    assert records[2].model_dump(mode="json") == pushed[payment.plan.key]
    assert (records[1].service, records[1].batch, records[1].outcome, records[1].reason) == \
        (user.plan.key, 1, "failed", "no outcome recorded")
    assert records[1].outcome.fails_wave, "a service without a record fails the wave's report"
    assert [r.service for r in _records({"ti": ti}, [auth, user, payment], up_to=1)] == [auth.plan.key, user.plan.key]


def test_the_report_writes_the_records_as_pushed(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHWAVE_REPORT_DIR", str(tmp_path))
    records = [strict(), rolled_back()]
    frame = report.report_frame(records)
    path = report.save(frame, records, "meshwave_shop_mesh_wave_1", "manual__1")
    assert json.loads(path.with_suffix(".json").read_text()) == [r.model_dump(mode="json") for r in records]
    row = frame.iloc[0]
    assert (row["outcome"], row["mtls"], row["sidecar"], row["success_before"], row["success_after"],
            row["p99_before_ms"], row["p99_after_ms"], row["changes"]) == \
        ("strict", "STRICT", "yes", 0.998, 0.997, 14.2, 15.1, 2)
    assert type(row["outcome"]) is str, "a plain string in the table and the CSV"
    assert pd.isna(frame.iloc[1]["success_after"]), "the soak never judged it: no value, not 0"
