"""Which notifications a run sends, to whom (meshwave.notify), without a server: the delivery itself is in
tests/component/test_notify.py."""

from __future__ import annotations

from typing import Any

import pytest

from meshwave import notify
from meshwave.fleet import Fleet
from meshwave.plan import NotifyEvent, NotifyTarget, parse_plan
from meshwave.record import ServiceRecord

LINK = "http://ui/dags/d/runs/r"


def record(outcome: str) -> ServiceRecord:
    return ServiceRecord.model_validate({"service": "lab/shop/cart", "outcome": outcome, "reason": "because"})


@pytest.mark.parametrize(("outcome", "events"), [
    ("rolled_back", [NotifyEvent.ROLLED_BACK]), ("held", [NotifyEvent.HELD]), ("failed", [NotifyEvent.FAILED]),
    ("frozen", [NotifyEvent.FROZEN]), ("strict", []), ("permissive", []), ("skipped", []), ("blocked", []),
])
def test_the_outcomes_somebody_is_told_about(outcome: str, events: list[NotifyEvent]) -> None:
    assert [m.event for m in notify.service_messages(record(outcome), {}, {}, "d", LINK)] == events


def test_an_undo_step_that_failed_for_good_is_an_undo_that_gave_up_one_still_retrying_is_not() -> None:
    gave_up = notify.service_messages(record("failed"), {"back_to_permissive": "failed"},
                                      {"back_to_permissive": "the API server does not answer"}, "d", LINK)
    assert [m.event for m in gave_up] == [NotifyEvent.FAILED, NotifyEvent.UNDO_GAVE_UP]
    assert "why: back_to_permissive: the API server does not answer" in gave_up[1].text
    retrying = notify.service_messages(record("failed"), {"back_to_permissive": "up_for_retry"}, {}, "d", LINK)
    assert [m.event for m in retrying] == [NotifyEvent.FAILED]


def test_each_target_gets_the_events_it_asked_for_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, str]] = []

    class Fake:
        def __init__(self, target: NotifyTarget, msg: notify.Message) -> None:
            self.target, self.msg = target, msg

        def notify(self, context: Any) -> None:
            sent.append((self.target.conn_id, self.msg.event.value))

    monkeypatch.setattr(notify, "_notifier", Fake)
    mail = NotifyTarget(channel="email", conn_id="m", to=["a@b.c"], events=[NotifyEvent.WAVE_FAILED])
    chat = NotifyTarget(channel="webhook", conn_id="c")
    msgs = [notify.message(NotifyEvent.WAVE_FAILED, "s", "w", "r", LINK),
            *notify.service_messages(record("rolled_back"), {}, {}, "d", LINK)]
    notify.send([mail, chat, chat], msgs, {})
    assert sent == [("m", "wave_failed"), ("c", "wave_failed"), ("c", "rolled_back")]


def test_the_emergency_tells_every_plan_with_a_service_in_scope() -> None:
    def plan(name: str, cluster: str, conn: str) -> Any:
        return parse_plan({"migration": name, "clusters": {cluster: {"kubernetes_conn_id": "k", "prometheus_conn_id":
                                                                     "p"}},
                           "defaults": {"notify": [{"channel": "webhook", "conn_id": conn}]},
                           "waves": [{"name": "w", "services": [{"cluster": cluster, "namespace": "n",
                                                                 "workload": name}]}]})

    fleet = Fleet()
    for p in (plan("a", "eu", "chat_a"), plan("b", "eu", "chat_b"), plan("c", "us", "chat_c"), plan("d", "eu",
                                                                                                    "chat_a")):
        fleet.add(p, p.migration)
    assert [t.conn_id for t in notify.fleet_targets(fleet, ["eu"])] == ["chat_a", "chat_b"]
    assert [t.conn_id for t in notify.fleet_targets(fleet, ["eu", "us"])] == ["chat_a", "chat_b", "chat_c"]


def test_a_wave_or_emergency_event_is_told_with_the_run_link_to_the_targets_that_want_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, str, str]] = []

    class Fake:
        def __init__(self, target: NotifyTarget, msg: notify.Message) -> None:
            self.target, self.msg = target, msg

        def notify(self, context: Any) -> None:
            sent.append((self.target.conn_id, self.msg.subject, self.msg.text))

    monkeypatch.setattr(notify, "_notifier", Fake)
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://ui/")
    wants = NotifyTarget(channel="webhook", conn_id="c", events=[NotifyEvent.CIRCUIT_BREAKER])
    other = NotifyTarget(channel="email", conn_id="m", to=["a@b.c"], events=[NotifyEvent.WAVE_FAILED])
    run_id = "manual__2026-01-01T00:00:00+00:00"
    done = notify.tell([wants, other], NotifyEvent.CIRCUIT_BREAKER, "d: circuit breaker TRIPPED",
                       "after batch 1, the batches after it are not started", "2 rollbacks", "d",
                       {"run_id": run_id})
    assert sent == [("c", "meshwave: d: circuit breaker TRIPPED",
                     "d: after batch 1, the batches after it are not started\nwhy: 2 rollbacks\n"
                     "run: http://ui/dags/d/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00")]
    assert done == ["notified webhook via c: meshwave: d: circuit breaker TRIPPED"]
    assert notify.tell([], NotifyEvent.WAVE_FAILED, "s", "w", "r", "d", {"run_id": run_id}) == []
