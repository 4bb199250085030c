"""What a run leaves pending on a workload, and how the outcome settles it or leaves it to mesh_reconcile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from meshwave import service_group as sg
from meshwave.mtls import EffectiveMtls, Mode
from meshwave.pending import Pending, Undo, expecting
from meshwave.plan import parse_plan
from meshwave.record import ServiceRecord
from meshwave.steps import Service
from meshwave.wave import services_of

PLAN = {"migration": "m", "clusters": {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}},
        "defaults": {"reconcile_grace_seconds": 30},
        "waves": [{"name": "wave-1", "services": [{"cluster": "lab", "namespace": "shop", "workload": "cart"}]}]}
RUN = "meshwave_m_wave_1/manual__1"


def service() -> Service:
    plan = parse_plan(PLAN)
    return services_of(plan, plan.waves[0])[0]


def test_a_pending_state_round_trips_through_its_annotation_and_falls_due() -> None:
    pending = expecting(sg.UNVERIFIED, Undo.PERMISSIVE, 60, RUN, service().to_dict())
    back = Pending.from_annotation(pending.to_annotation(), "deployment shop/cart")
    assert back == pending
    assert not back.due() and back.due(datetime.now(UTC) + timedelta(seconds=61))
    assert Service.from_dict({**back.service, "action": str(back.undo)}).action == "permissive"


def test_an_annotation_meshwave_cannot_read_is_an_error_naming_the_object() -> None:
    with pytest.raises(ValueError, match="deployment shop/cart: annotation meshwave.io/pending is not meshwave's"):
        Pending.from_annotation('{"state": "x"}', "deployment shop/cart")


def test_the_deadlines_cover_the_run_s_own_steps_plus_the_grace() -> None:
    s = service().settings
    assert sg._unverified_seconds(s) == s.probe.timeout_seconds + 2 * s.verify_seconds + 30
    assert sg._trial_seconds(s) > s.rollout_timeout_seconds + s.soak_seconds + s.strict_gate_timeout_seconds


class Workload:
    pods_with_proxy, pods_total = 2, 2


class StrictMtls:
    def effective(self, ns: str, workload: str) -> EffectiveMtls:
        return EffectiveMtls(mode=Mode.STRICT)


class FakeKube:
    """A cluster where this run left a STRICT unverified, and it is still in force."""

    mtls = StrictMtls()

    def __init__(self, pending: Pending | None) -> None:
        self.annotation, self.writes = pending, []

    def pending(self, ns: str, workload: str) -> Pending | None:
        return self.annotation

    def clear_pending(self, ns: str, workload: str, why: str) -> Any:
        self.writes.append(("clear", why))
        self.annotation = None
        return _Change()

    def set_pending(self, ns: str, workload: str, pending: Pending) -> Any:
        self.writes.append(("set", pending))
        self.annotation = pending
        return _Change()

    def workload(self, ns: str, workload: str) -> Workload:
        return Workload()

class _Change:
    def summary(self) -> str:
        return "change"


def context() -> dict[str, Any]:
    class Dag:
        dag_id = RUN.split("/")[0]
    return {"dag": Dag(), "run_id": RUN.split("/")[1], "params": {}}


def settle(outcome: str, pending: Pending | None, monkeypatch: pytest.MonkeyPatch) -> tuple[ServiceRecord, FakeKube]:
    kube = FakeKube(pending)
    monkeypatch.setattr(sg, "kube_for", lambda svc, c: kube)
    record = ServiceRecord(service="lab/shop/cart", outcome=outcome, reason="r", mtls="STRICT?", sidecar=True)
    return sg._settle_outcome(service(), record, context()), kube


def test_an_outcome_that_stands_settles_what_its_run_left(monkeypatch: pytest.MonkeyPatch) -> None:
    pending = expecting(sg.UNVERIFIED, Undo.PERMISSIVE, 600, RUN, service().to_dict())
    record, kube = settle("strict", pending, monkeypatch)
    assert record.reason == "r" and kube.writes == [("clear", "strict: r")] and kube.annotation is None


def test_a_failed_undo_is_left_due_now_and_the_record_says_what_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    pending = expecting(sg.UNVERIFIED, Undo.PERMISSIVE, 600, RUN, service().to_dict())
    record, kube = settle("failed", pending, monkeypatch)
    assert kube.annotation is not None and kube.annotation.due(), "mesh_reconcile's next run carries it out"
    assert record.mtls == "STRICT" and record.sidecar is True, "what the cluster has, not what was meant"
    assert "LEFT: 2 of 2 pods with a sidecar, mTLS STRICT" in record.reason
    assert record.reason.endswith("mesh_reconcile carries out permissive")


def test_another_run_s_pending_state_is_not_this_run_s_to_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = expecting(sg.TRIAL, Undo.REMOVE_SIDECAR, 600, "other/run", service().to_dict())
    record, kube = settle("permissive", theirs, monkeypatch)
    assert kube.writes == [] and kube.annotation == theirs and record.reason == "r"


def test_mesh_reconcile_runs_the_undo_on_the_service_the_run_admitted() -> None:
    from meshwave import reconcile

    pending = expecting(sg.TRIAL, Undo.REMOVE_SIDECAR, 0, RUN, service().to_dict())

    class TI:
        def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
            assert (task_ids, key) == ("find_due", "pending")
            return {"lab/shop/cart": pending.model_dump(mode="json")}

    svc = reconcile._resolve({"ti": TI()}, "lab/shop/cart")
    assert (svc.action, svc.plan.key, svc.settings.reconcile_grace_seconds) == ("remove_sidecar", "lab/shop/cart", 30)
    with pytest.raises(ValueError, match="lab/shop/other: no pending state"):
        reconcile._resolve({"ti": TI()}, "lab/shop/other")


def test_mesh_reconcile_names_what_it_could_not_settle() -> None:
    from meshwave.reconcile import not_reconciled

    done = ServiceRecord(service="lab/shop/cart", outcome="permissive", reason="set to PERMISSIVE on request")
    failed = ServiceRecord(service="lab/shop/pay", outcome="failed", reason="could not set PERMISSIVE: 503")
    assert not_reconciled([], [done]) == []
    assert not_reconciled(["cluster eu: cannot list pending states: timeout"], [done, failed]) == [
        "cluster eu: cannot list pending states: timeout", "lab/shop/pay: failed: could not set PERMISSIVE: 503"]
