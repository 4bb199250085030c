"""One writer per workload: the lease's decisions, its conditional writes against a fake API server that answers
409 on a stale resourceVersion as Kubernetes does, and how the service group takes, renews and releases it."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from meshwave import service_group as sg
from meshwave import steps
from meshwave.kube_errors import Conflict
from meshwave.lease import LEASE_ANNOTATION, Lease, LeaseRefused, Leases, breaking, releasing, renewing, taking
from meshwave.plan import parse_plan
from meshwave.record import ServiceRecord
from meshwave.wave import services_of

NOW = datetime(2026, 11, 28, 21, 0, tzinfo=UTC)
WAVE, ADHOC = "meshwave_m_wave_1/manual__1", "mesh_service/manual__2"
PLAN = {"migration": "m", "clusters": {"lab": {"kubernetes_conn_id": "k", "prometheus_conn_id": "p"}},
        "waves": [{"name": "wave-1", "services": [{"cluster": "lab", "namespace": "shop", "workload": "cart"}]}]}


def lease(holder: str = WAVE, seconds: float = 600, broken: str | None = None) -> Lease:
    return Lease(holder=holder, service="lab/shop/cart", taken=NOW, expires=NOW + timedelta(seconds=seconds),
                 broken=broken)


# ---- the decisions --------------------------------------------------------------------------------------------
def test_a_live_lease_of_another_run_refuses_naming_the_holder() -> None:
    with pytest.raises(LeaseRefused, match=f"lab/shop/cart is being changed by {WAVE} .*until 2026-11-28T21:10:00Z"):
        taking(ADHOC, "lab/shop/cart", 300)(lease(), NOW)


@pytest.mark.parametrize(("current", "said"), [
    (None, "taken until"),
    (lease(seconds=-1), "taken over"),  # expired
    (lease(broken="mesh_emergency_rollback/manual__9"), "taken over"),
])
def test_a_free_expired_or_broken_lease_is_taken(current: Lease | None, said: str) -> None:
    value, reason = taking(ADHOC, "lab/shop/cart", 300)(current, NOW)
    assert value.holder == ADHOC and value.expires == NOW + timedelta(seconds=300) and value.broken is None
    assert reason.startswith(said)


def test_the_holder_takes_its_own_lease_again_a_cleared_task_re_runs() -> None:
    value, reason = taking(WAVE, "lab/shop/cart", 900)(lease(seconds=10), NOW)
    assert value.holder == WAVE and value.taken == NOW and value.expires == NOW + timedelta(seconds=900)
    assert reason.startswith("held again")


def test_a_renewal_needs_the_lease_unbroken_and_this_run_s() -> None:
    value, _ = renewing(WAVE, 60)(lease(seconds=5), NOW)
    assert value.expires == NOW + timedelta(seconds=60), "set to the next deadline, not extended from the old one"
    with pytest.raises(LeaseRefused, match=f"no longer holds .*held by {ADHOC}"):
        renewing(WAVE, 60)(lease(holder=ADHOC), NOW)
    with pytest.raises(LeaseRefused, match="released or removed"):
        renewing(WAVE, 60)(None, NOW)
    with pytest.raises(LeaseRefused, match="broken by mesh_emergency_rollback/manual__9"):
        renewing(WAVE, 60)(lease(broken="mesh_emergency_rollback/manual__9"), NOW)


def test_a_release_leaves_another_run_s_lease_and_a_break_only_a_live_one() -> None:
    assert releasing(WAVE, "strict")(lease(), NOW) == (None, "released: strict")
    assert releasing(WAVE, "strict")(lease(holder=ADHOC), NOW)[0] is not None
    broken, _ = breaking("mesh_emergency_rollback/manual__9")(lease(), NOW)
    assert broken.broken == "mesh_emergency_rollback/manual__9" and not broken.live(NOW)
    assert breaking("x")(lease(seconds=-1), NOW)[1] == "no live lease"


def test_an_annotation_meshwave_cannot_read_is_an_error_naming_the_object() -> None:
    with pytest.raises(ValueError, match="deployment shop/cart: annotation meshwave.io/lease is not meshwave's"):
        Lease.from_annotation('{"holder": 1}', "deployment shop/cart")


# ---- the conditional writes ---------------------------------------------------------------------------------
class FakeApi:
    """One Deployment behind an API server that checks the resourceVersion a patch carries, as Kubernetes does;
    `interleave` runs once before the next patch is applied (another writer between our read and our write)."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] = {"metadata": {"namespace": "shop", "name": "cart", "resourceVersion": "1",
                                                 "annotations": {}}}
        self.interleave: Any = None
        self.patches = 0

    def read(self) -> dict[str, Any]:
        return copy.deepcopy(self.obj)

    def patch(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.interleave is not None:
            run, self.interleave = self.interleave, None
            run()
        self.patches += 1
        meta = self.obj["metadata"]
        if body["metadata"].get("resourceVersion") not in (None, meta["resourceVersion"]):
            raise Conflict('Operation cannot be fulfilled on deployments.apps "cart": the object has been modified; '
                           "please apply your changes to the latest version and try again", code=409)
        for k, v in body["metadata"]["annotations"].items():
            if v is None:
                meta["annotations"].pop(k, None)
            else:
                meta["annotations"][k] = v
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
        return self.read()


class FakeKube:
    cluster, dry_run = "lab", False

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.apps = type("Apps", (), {"patch_namespaced_deployment": lambda *a, **k: None})()

    def deployment(self, ns: str, name: str) -> dict[str, Any]:
        return self.api.read()

    def call(self, verb: str, target: str, fn: Any, name: str, ns: str, body: dict[str, Any], **kw: Any) -> Any:
        return self.api.patch(body)

    def send(self, change: Any, call: Any) -> Any:
        obj = call()
        change.applied, change.resource_version = True, obj["metadata"]["resourceVersion"]
        return change

    def noop(self, action: str, target: str, state: Any, reason: str) -> Any:
        from meshwave.changes import Change
        return Change(self.cluster, action, target, state, state, reason=reason)


def holder(api: FakeApi) -> str | None:
    text = api.obj["metadata"]["annotations"].get(LEASE_ANNOTATION)
    return None if text is None else json.loads(text)["holder"]


def test_two_writers_racing_cannot_both_win() -> None:
    api = FakeApi()
    leases = Leases(FakeKube(api))  # type: ignore[arg-type]
    # the wave takes the lease between mesh_service's read and its write: mesh_service's patch carries the stale
    # resourceVersion, gets 409, reads again, and is refused naming the wave
    api.interleave = lambda: Leases(FakeKube(api)).take("shop", "cart", WAVE, "lab/shop/cart", 600)  # type: ignore
    with pytest.raises(LeaseRefused, match=f"being changed by {WAVE}"):
        leases.take("shop", "cart", ADHOC, "lab/shop/cart", 600)
    assert holder(api) == WAVE and api.patches == 2


def test_a_conflict_from_a_status_update_is_read_again_and_the_write_goes_through() -> None:
    api = FakeApi()

    def status_update() -> None:  # the Deployment controller writing status moves the resourceVersion too
        api.obj["metadata"]["resourceVersion"] = "7"

    api.interleave = status_update
    change = Leases(FakeKube(api)).take("shop", "cart", WAVE, "lab/shop/cart", 600)  # type: ignore[arg-type]
    assert change.applied and holder(api) == WAVE
    sent = change.request.body["metadata"]
    assert sent["resourceVersion"] == "7", "the write carries the version it was decided on"


def test_writes_that_keep_conflicting_fail_the_step_as_a_conflict() -> None:
    api = FakeApi()
    kube = FakeKube(api)
    kube.deployment = lambda ns, name: {**api.read(), "metadata": {**api.read()["metadata"], "resourceVersion": "0"}}
    with pytest.raises(Conflict, match="5 conflicts in a row"):
        Leases(kube).take("shop", "cart", WAVE, "lab/shop/cart", 600)  # type: ignore[arg-type]


# ---- the service group --------------------------------------------------------------------------------------
def service() -> Any:
    plan = parse_plan(PLAN)
    return services_of(plan, plan.waves[0])[0]


def context(run: str) -> dict[str, Any]:
    class Dag:
        dag_id = run.split("/")[0]
    return {"dag": Dag(), "run_id": run.split("/")[1], "params": {"dry_run": False}}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    api = FakeApi()

    class Kube(FakeKube):
        @property
        def leases(self) -> Leases:
            return Leases(self)  # type: ignore[arg-type]

    monkeypatch.setattr(sg, "kube_for", lambda svc, c: Kube(api))
    return api


def test_admit_takes_the_lease_until_the_path_s_deadline_and_the_outcome_releases_it(api: FakeApi) -> None:
    svc = service()
    sg._take_lease(svc, context(WAVE))
    taken = Lease.model_validate_json(api.obj["metadata"]["annotations"][LEASE_ANNOTATION])
    assert taken.holder == WAVE and taken.service == "lab/shop/cart"
    expected = datetime.now(UTC) + timedelta(seconds=sg._trial_seconds(svc.settings))
    assert abs((taken.expires - expected).total_seconds()) < 5
    with pytest.raises(LeaseRefused, match=f"being changed by {WAVE}"):
        sg._take_lease(svc, context(ADHOC))
    sg._release_lease(svc, ServiceRecord(service=svc.plan.key, outcome="blocked", reason="r"), context(ADHOC))
    assert holder(api) == WAVE, "a refused run releases nothing"
    sg._release_lease(svc, ServiceRecord(service=svc.plan.key, outcome="strict", reason="r"), context(WAVE))
    assert holder(api) is None


def test_a_forward_write_without_the_lease_is_blocked_before_it_writes_an_undo_goes_ahead(api: FakeApi) -> None:
    svc = service()
    sg._take_lease(svc, context(WAVE))
    Leases(FakeKube(api)).break_("shop", "cart", "mesh_emergency_rollback/manual__9")  # type: ignore[arg-type]
    ran: list[str] = []
    inject = sg.holding(lambda s, c: ran.append("inject") or {}, sg._trial_seconds)
    with pytest.raises(steps.Blocked, match="lease: this run's lease was broken by mesh_emergency_rollback"):
        inject(svc, context(WAVE))
    sg.undoing(lambda s, c: ran.append("rollback") or {})(svc, context(WAVE))
    assert ran == ["rollback"]


def test_the_flip_renews_to_the_unverified_deadline_no_later_than_the_pending_state(api: FakeApi) -> None:
    svc = service()
    sg._take_lease(svc, context(WAVE))
    sg.holding(lambda s, c: {}, sg._unverified_seconds)(svc, context(WAVE))
    renewed = Lease.model_validate_json(api.obj["metadata"]["annotations"][LEASE_ANNOTATION])
    due = datetime.now(UTC) + timedelta(seconds=sg._unverified_seconds(svc.settings))
    assert renewed.expires <= due, "mesh_reconcile, when the pending state is due, finds the lease expired"
