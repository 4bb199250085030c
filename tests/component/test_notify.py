"""Notifications through Airflow's own notifiers (the SMTP provider's SmtpNotifier, the Slack provider's
SlackWebhookNotifier) to an SMTP server and a webhook this test starts on loopback: one message per event and target,
with the service, the reason and the link to the run; a target that cannot be reached is logged, never raised."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshwave import notify
from meshwave.plan import NotifyEvent, NotifyTarget
from meshwave.record import ServiceRecord
from tests.notify_sink import NotifySink

pytestmark = pytest.mark.component

LINK = "http://127.0.0.1:8080/dags/meshwave_shop_main/runs/manual__2026-11-29"
EMAIL = NotifyTarget(channel="email", conn_id="mw_smtp", to=["sre@example.test"])
WEBHOOK = NotifyTarget(channel="webhook", conn_id="mw_chat", events=[NotifyEvent.ROLLED_BACK])


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[NotifySink]:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    with NotifySink() as running:
        for conn_id, conn in running.connections("mw_smtp", "mw_chat").items():
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
        yield running


def rolled_back() -> ServiceRecord:
    return ServiceRecord.model_validate({
        "service": "lab/shop/payment", "cluster": "lab", "namespace": "shop", "workload": "payment",
        "outcome": "rolled_back", "mtls": "PERMISSIVE", "sidecar": False,
        "reason": "soak failed: OOMKilled and restarted in istio-proxy (2 restarts)"})


def test_a_rollback_reaches_the_mail_and_the_chat_once_each_with_the_service_reason_and_link(sink: NotifySink) -> None:
    messages = notify.service_messages(rolled_back(), {"rollback_injection": "success"}, {}, "meshwave_shop_main",
                                       LINK)
    done = notify.send([EMAIL, WEBHOOK, EMAIL], messages, {})
    assert done == ["notified email via mw_smtp: meshwave: lab/shop/payment ROLLED_BACK",
                    "notified webhook via mw_chat: meshwave: lab/shop/payment ROLLED_BACK"], done
    [mail] = sink.mails
    assert mail.to == ["sre@example.test"] and mail.subject == "meshwave: lab/shop/payment ROLLED_BACK"
    for text in (mail.body, *sink.texts()):
        assert "lab/shop/payment ended rolled_back in meshwave_shop_main" in text, text
        assert "why: soak failed: OOMKilled and restarted in istio-proxy (2 restarts)" in text
        assert "left: mTLS PERMISSIVE, sidecar no" in text and f"run: {LINK}" in text
    assert len(sink.posts) == 1


def test_an_undo_that_gave_up_is_its_own_event_and_a_target_gets_only_what_it_asked_for(sink: NotifySink) -> None:
    record = ServiceRecord.model_validate({**rolled_back().model_dump(), "outcome": "failed", "mtls": "STRICT?",
                                           "sidecar": True})
    messages = notify.service_messages(record, {"rollback_injection": "failed"},
                                       {"rollback_injection": "cluster lab: connection refused"}, "w", LINK)
    assert [m.event for m in messages] == [NotifyEvent.FAILED, NotifyEvent.UNDO_GAVE_UP]
    notify.send([EMAIL, WEBHOOK], messages, {})
    assert [m.subject for m in sink.mails] == ["meshwave: lab/shop/payment FAILED",
                                               "meshwave: UNDO GAVE UP on lab/shop/payment"]
    assert "why: rollback_injection: cluster lab: connection refused" in sink.mails[1].body
    assert sink.posts == [], "the webhook asked for rollbacks only"


def test_a_target_that_cannot_deliver_is_logged_and_the_others_still_get_theirs(
        sink: NotifySink, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    sink.webhook_status = 500
    nowhere = NotifyTarget(channel="email", conn_id="mw_nowhere", to=["x@example.test"])
    monkeypatch.setenv("AIRFLOW_CONN_MW_NOWHERE", json.dumps(
        {"conn_type": "smtp", "host": "127.0.0.1", "port": 9, "extra": {"disable_tls": True, "disable_ssl": True,
                                                                         "from_email": "m@example.test",
                                                                         "timeout": 3, "retry_limit": 1}}))
    missing = NotifyTarget(channel="webhook", conn_id="mw_missing")
    msg = notify.message(NotifyEvent.WAVE_FAILED, "w: wave FAILED", "w: failed", "over budget", LINK)
    rolled = notify.service_messages(rolled_back(), {}, {}, "w", LINK)
    with caplog.at_level(logging.INFO, logger="meshwave.notify"):
        done = notify.send([nowhere, missing, WEBHOOK, EMAIL], [msg, *rolled], {})
    assert [d.split(":")[0] for d in done] == [
        "NOT notified email via mw_nowhere (wave_failed)", "NOT notified email via mw_nowhere (rolled_back)",
        "NOT notified webhook via mw_missing (wave_failed)", "NOT notified webhook via mw_missing (rolled_back)",
        "NOT notified webhook via mw_chat (rolled_back)",
        "notified email via mw_smtp", "notified email via mw_smtp"], done
    assert done[0].endswith("ConnectionRefusedError: [Errno 111] Connection refused"), done[0]
    assert done[2].endswith("AirflowNotFoundException: The conn_id `mw_missing` isn't defined"), done[2]
    assert "Status Code: 500" in done[4], done[4]
    assert [m.subject for m in sink.mails] == ["meshwave: w: wave FAILED", "meshwave: lab/shop/payment ROLLED_BACK"]
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "meshwave.notify"]
    assert logged == [(logging.WARNING if d.startswith("NOT ") else logging.INFO, d) for d in done], logged
