"""Notifications: somebody is told when a service is rolled back at 3 a.m.

The plan's `notify:` (defaults, or a service's own) lists targets: an Airflow connection, a channel and the events it
wants (plan.NotifyTarget). Delivery goes through Airflow's notifiers, the SMTP provider's `SmtpNotifier` (email) and
the Slack provider's `SlackWebhookNotifier` (any Slack-compatible incoming webhook), called directly, not as
callbacks: the task decides which event happened, from the record it has just built. A message says what happened,
to which service, why, and links to the run.

A target that cannot be reached (no such connection, SMTP refused, webhook 500) is logged in the task log and the
run goes on: a notification never fails, retries or delays a migration.
"""

from __future__ import annotations

import html
import logging
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from meshwave.fleet import Fleet
from meshwave.outcomes import ServiceOutcome
from meshwave.plan import NotifyEvent, NotifyTarget
from meshwave.record import ServiceRecord

# The service outcomes somebody is told about, as the events a target subscribes to.
# Airflow sends a task's stdlib logging to its task log, each line with its level and this module's name
log = logging.getLogger(__name__)

OUTCOME_EVENTS = {ServiceOutcome.ROLLED_BACK: NotifyEvent.ROLLED_BACK, ServiceOutcome.HELD: NotifyEvent.HELD,
                  ServiceOutcome.FAILED: NotifyEvent.FAILED, ServiceOutcome.FROZEN: NotifyEvent.FROZEN}
# The steps that undo a change: one that failed for good is an undo that gave up.
UNDO_STEPS = ("back_to_permissive", "rollback_injection", "wait_rollback")


class Message(BaseModel):
    """One notification: a one-line subject and a body with the service, the reason and the link."""

    model_config = ConfigDict(frozen=True)

    event: NotifyEvent
    subject: str
    text: str


def run_link(dag_id: str, run_id: str) -> str:
    """The run in the Airflow UI, from `[api] base_url` (what the UI's own links use)."""
    from airflow.configuration import conf

    base = (conf.get("api", "base_url", fallback="") or "http://localhost:8080").rstrip("/")
    return f"{base}/dags/{urllib.parse.quote(dag_id)}/runs/{urllib.parse.quote(run_id, safe='')}"


def service_messages(record: ServiceRecord, states: dict[str, str | None], errors: dict[str, str],
                     dag_id: str, link: str) -> list[Message]:
    """What a service's outcome tells: its outcome when it is one somebody is told about, and an undo that gave up."""
    messages = []
    if (event := OUTCOME_EVENTS.get(record.outcome)) is not None:
        messages.append(Message(event=event, subject=f"meshwave: {record.service} {record.outcome.value.upper()}",
                                text=_body(f"{record.service} ended {record.outcome.value} in {dag_id}",
                                           record.reason, link, record.mtls, record.sidecar)))
    gave_up = [step for step in UNDO_STEPS if states.get(step) == "failed"]
    if gave_up:
        why = "; ".join(f"{step}: {errors.get(step, 'failed, see its log')}" for step in gave_up)
        messages.append(Message(event=NotifyEvent.UNDO_GAVE_UP,
                                subject=f"meshwave: UNDO GAVE UP on {record.service}",
                                text=_body(f"the undo of {record.service} did not complete in {dag_id}: what is "
                                           "left on the workload needs a person", why, link, record.mtls,
                                           record.sidecar)))
    return messages


def message(event: NotifyEvent, subject: str, what: str, reason: str, link: str) -> Message:
    """A wave's or the emergency rollback's own event."""
    return Message(event=event, subject=f"meshwave: {subject}", text=_body(what, reason, link))


def fleet_targets(fleet: Fleet, clusters: Iterable[str]) -> list[NotifyTarget]:
    """The emergency rollback's targets: the defaults `notify` of every plan with a service in a cluster in scope,
    each target once."""
    wanted = set(clusters)
    return _unique(t for planned in fleet.services.values() if planned.service.cluster in wanted
                   for t in planned.plan.defaults.notify)


def _body(what: str, reason: str, link: str, mtls: str | None = None, sidecar: bool | None = None) -> str:
    lines = [what, f"why: {reason}"]
    if mtls is not None or sidecar is not None:
        lines.append(f"left: mTLS {mtls or 'unknown'}, sidecar {_sidecar(sidecar)}")
    lines.append(f"run: {link}")
    return "\n".join(lines)


def _sidecar(sidecar: bool | None) -> str:
    return "unknown" if sidecar is None else ("yes" if sidecar else "no")


def send(targets: Iterable[NotifyTarget], messages: Sequence[Message], context: Any) -> list[str]:
    """Each message to each target that wants its event; returns what happened to each, as logged. Never raises."""
    done = []
    for target in _unique(targets):
        for msg in messages:
            if msg.event not in target.events:
                continue
            where = f"{target.channel} via {target.conn_id}"
            try:
                _notifier(target, msg).notify(context)
                done.append(f"notified {where}: {msg.subject}")
            except Exception as exc:  # a notifier that cannot deliver never fails the migration
                done.append(f"NOT notified {where} ({msg.event.value}): {type(exc).__name__}: {exc}")
            (log.warning if done[-1].startswith("NOT ") else log.info)(done[-1])
    return done


def tell(targets: Iterable[NotifyTarget], event: NotifyEvent, subject: str, what: str, why: str, dag_id: str,
         context: Any) -> list[str]:
    """A wave's or the emergency rollback's own event, to the targets that want it: the body is `dag_id: what`, the
    reason and the link to this run (`context["run_id"]`); the subject is the caller's (after `meshwave: `).
    Whether a dry run tells anybody is the caller's decision. Returns what happened to each target. Never raises."""
    targets = list(targets)
    if not targets:
        return []
    try:
        msg = message(event, subject, f"{dag_id}: {what}", why, run_link(dag_id, context["run_id"]))
    except Exception as exc:  # no link or message (a broken [api] base_url): the run goes on, untold
        done = [f"NOT notified anyone ({event.value}): {type(exc).__name__}: {exc}"]
        log.warning(done[-1])
        return done
    return send(targets, [msg], context)


def _unique(targets: Iterable[NotifyTarget]) -> list[NotifyTarget]:
    """A target listed twice (a service's own list repeating the defaults) is told once. A list scan, not a dict:
    a NotifyTarget is frozen but not hashable (its `to` and `events` are lists)."""
    seen: list[NotifyTarget] = []
    for target in targets:
        if target not in seen:
            seen.append(target)
    return seen


def _notifier(target: NotifyTarget, msg: Message) -> Any:
    # The providers load here, when there is something to send, not at DAG parse time.
    if target.channel == "email":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        return SmtpNotifier(to=target.to, subject=msg.subject, smtp_conn_id=target.conn_id,
                            html_content=f"<pre>{html.escape(msg.text)}</pre>")
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    return SlackWebhookNotifier(slack_webhook_conn_id=target.conn_id, text=f"{msg.subject}\n{msg.text}")
