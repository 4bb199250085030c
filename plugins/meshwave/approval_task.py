"""The batch's approval task: Airflow's human-in-the-loop operator over the services ready for STRICT (approval.py
says how the approval works; this module is the operator, imported only by DAGs that ask for approval)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import TriggerRule

from meshwave.approval import NONE, Answer, Candidate, answer_of, asked_again, candidates, responder
from meshwave.decisions import FLIP

# Airflow sends a task's stdlib logging to its task log, each line with its level and this module's name
log = logging.getLogger(__name__)


class StrictApproval(HITLOperator):
    """The batch's approval task (see the module's doc). The options are the ready services, known only once the
    gates have ended: set at run time, and again when the task resumes (a new process), from the same XComs."""

    ui_color = "#fff3cd"

    def __init__(self, *, group_id: str, **kwargs: Any) -> None:
        super().__init__(subject=f"{group_id}: approve STRICT", options=[NONE], defaults=[NONE], multiple=True,
                         trigger_rule=TriggerRule.ALL_DONE, **kwargs)
        self.group_id = group_id

    def _ready(self, context: Any) -> list[Candidate]:
        pulled = context["ti"].xcom_pull(task_ids=f"{self.group_id}.strict_gate", key="candidate")
        return [c for c in candidates(pulled) if c.to == FLIP]

    def _offer(self, ready: list[Candidate]) -> None:
        self.options = [c.service for c in ready] + [NONE]
        self.response_timeout = timedelta(seconds=min(c.timeout_seconds for c in ready))
        self.subject = f"{self.group_id}: approve STRICT for {len(ready)} service(s)"
        self.body = ("Their STRICT gate passed: no plaintext caller over the lookback. Choose the services to make "
                     f"STRICT; the others stay PERMISSIVE ('not approved'). No answer in "
                     f"{int(self.response_timeout.total_seconds())} s: none is approved. Each approved service's "
                     "gate is read again over the time this took before its flip. Take out the pre-selected "
                     f"'{NONE}' when you choose services: both at once approve nothing.\n\n"
                     + "\n".join(c.evidence() for c in ready))

    def execute(self, context: Any) -> Any:
        ready = self._ready(context)
        if not ready:
            log.info("no service of this batch is ready for STRICT and needs approval: nobody is asked")
            return Answer().model_dump(mode="json")
        if context["params"].get("dry_run"):
            asked = [c.service for c in ready]
            log.info(f"dry run: approval would be asked for {', '.join(asked)}; nobody is asked")
            return Answer(asked=asked, approved=asked, dry_run=True,
                          note="dry run: approval not asked").model_dump(mode="json")
        self._offer(ready)
        again = asked_again(context["ti"].try_number)
        self.body = again + self.body
        if again:
            log.warning(f"asking again (try {context['ti'].try_number}): an earlier answer does not carry over")
        log.info(f"asking for approval of STRICT: {', '.join(self.options[:-1])} (timeout {self.response_timeout})")
        self._tell(ready, context)
        return super().execute(context)

    def _tell(self, ready: list[Candidate], context: Any) -> None:
        """The services' notification targets: a person is needed (a notification never fails the task)."""
        from meshwave import notify
        from meshwave.plan import NotifyEvent, NotifyTarget

        targets = [NotifyTarget.model_validate(t) for c in ready for t in c.notify]
        dag_id, seconds = context["dag"].dag_id, int(self.response_timeout.total_seconds())
        notify.tell(targets, NotifyEvent.APPROVAL_NEEDED, f"{dag_id}: approval needed before STRICT",
                    f"{self.group_id}: {', '.join(c.service for c in ready)} ready for STRICT, waiting for a person",
                    f"answer in the run's Required Actions ({self.task_id}) within {seconds} s; no answer keeps them "
                    "PERMISSIVE", dag_id, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        ready = self._ready(context)
        if ready:
            self._offer(ready)
        chosen = super().execute_complete(context, event)
        found = answer_of(ready, list(chosen.get("chosen_options") or []), *responder(chosen),
                          bool(event.get("timedout")))
        log.info(f"approved: {', '.join(found.approved) or 'none'}; by {found.by or 'nobody'}"
                 + (f" ({found.note})" if found.note else ""))
        return found.model_dump(mode="json")
