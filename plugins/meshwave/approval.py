"""A person before STRICT: one approval task per batch, between the batch's STRICT gates and its flips.

    batch_N.strict_gate (every map index) -> approve_batch_N -> batch_N.flip_strict (every map index)

The task sits outside the mapped group, as one task of the batch: a branch inside a mapped task group hits open
Airflow bugs (apache/airflow#65745, #67265), and a person answers once per batch, not once per service.

It is Airflow's human-in-the-loop operator (providers-standard's HITLOperator): on Airflow 3.3 the task waits in the
`awaiting_input` state (no worker slot, no triggerer) until someone answers in the UI's "Required actions" or the
REST API, or its timeout passes. The services whose STRICT gate passed and whose criticality the plan's `approval`
names are the options, with their evidence in the body; the approver chooses which to flip. Nobody answering in
time chooses NONE (the operator's `defaults`): nothing is approved.

The operator is approval_task.StrictApproval. Each service's flip_strict reads the answer (`decide`): approved, it
goes on (after its STRICT gate is read again over the time the approval took); not approved, it stays PERMISSIVE
with the answer as its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from meshwave.record import ApprovalRecord

# The option that approves nothing; also what a timeout chooses. The API wants at least one option chosen.
NONE = "none of them: all stay PERMISSIVE"


class Candidate(BaseModel):
    """A service that needs approval, as its STRICT gate ended: what the approver is shown (an XCom "candidate" of
    the service's strict_gate task, pushed with its decision)."""

    model_config = ConfigDict(frozen=True)

    service: str
    criticality: str
    timeout_seconds: int
    to: str = Field(description="the gate's decision: flip_strict (ready) or stay_permissive")
    why: str = Field(description="what the gate's checks saw last (their reasons), else its decision's why")
    gate_ended: float | None = None
    success_before: float | None = None
    success_soak: float | None = None
    p99_before_ms: float | None = None
    p99_soak_ms: float | None = None
    notify: list[dict[str, Any]] = Field(default_factory=list, description="the service's notification targets "
                                                                           "(plan.NotifyTarget, as JSON)")

    def evidence(self) -> str:
        """One line of the approval's body."""

        def pair(before: float | None, after: float | None, fmt: str) -> str:
            return " -> ".join("-" if v is None else format(v, fmt) for v in (before, after))

        success = pair(self.success_before, self.success_soak, ".3f")
        p99 = pair(self.p99_before_ms, self.p99_soak_ms, ".0f")
        return (f"- **{self.service}** ({self.criticality}): {self.why}; success {success}, p99 {p99} ms "
                "(baseline -> soak)")


class Answer(BaseModel):
    """The approval task's result (its return value): who was asked about which services, and what came back."""

    model_config = ConfigDict(frozen=True)

    asked: list[str] = Field(default_factory=list, description="the services offered (ready for STRICT)")
    approved: list[str] = Field(default_factory=list)
    by: str | None = Field(None, description="the approver's name; None: nobody answered, or nobody was asked")
    at: str | None = None
    timed_out: bool = False
    dry_run: bool = False
    note: str = ""


def candidates(pulled: Any) -> list[Candidate]:
    """Every map index's candidate, from one pull of all of them (a lone value comes bare; an index that pushed
    none, None)."""
    from meshwave.group_state import decoded

    values = pulled if isinstance(pulled, list) else [pulled]
    return [Candidate.model_validate(decoded(v)) for v in values if v is not None]


def answer_of(ready: list[Candidate], chosen: list[str], by: str | None, at: str | None,
              timed_out: bool) -> Answer:
    """What the chosen options approve. NONE chosen with services is a contradiction: nothing is approved."""
    asked = [c.service for c in ready]
    approved = [s for s in chosen if s in asked]
    note = ""
    if timed_out:
        approved, note = [], "nobody answered in time"
    elif NONE in chosen and approved:
        approved, note = [], f"the answer chose '{NONE}' and services at once: nothing is approved"
    return Answer(asked=asked, approved=approved, by=by, at=at, timed_out=timed_out, note=note)


def asked_again(try_number: int) -> str:
    """The paragraph a question opens with when its task asks a second time. On Airflow 3.3 an answer given within
    moments of the question can be lost: the scheduler reads the asking process's exit as a failure, the task is
    retried and asks again (docs/known-airflow-issues.md). The person must know an earlier answer does not count."""
    if try_number <= 1:
        return ""
    return (f"**Asked again (try {try_number})**: this question was asked before in this run, and an answer given "
            "then does not carry over to this try (Airflow may have lost an answer given within moments of the "
            "question, or the task was cleared). Answer again.\n\n")


def responder(chosen: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Who answered a human-in-the-loop request and when (ISO 8601), from the operator's resumed payload: the user
    comes as {"id", "name"}, or None when the timeout answered."""
    user, at = chosen.get("responded_by_user"), chosen.get("responded_at")
    by = (user.get("name") or user.get("id")) if isinstance(user, dict) else None
    return by, at.isoformat() if hasattr(at, "isoformat") else at


def decide(service: str, answer: Answer | None) -> tuple[bool, ApprovalRecord]:
    """Whether `service` may be flipped, and the record of why. No answer (the approval task broke) and a service
    that was not offered (its gate's candidate went missing) are "not approved": STRICT is never made unasked."""
    if answer is None:
        return False, ApprovalRecord(approved=False, why="not approved: the batch's approval task left no answer "
                                                         "(see its log)")
    if answer.dry_run:
        return True, ApprovalRecord(approved=True, why="dry run: approval not asked")
    if service not in answer.asked:
        return False, ApprovalRecord(approved=False, why="not approved: it was not among the services offered for "
                                                         "approval")
    if answer.timed_out:
        return False, ApprovalRecord(approved=False, timed_out=True, at=answer.at,
                                     why="not approved: nobody answered the approval in time")
    if service in answer.approved:
        return True, ApprovalRecord(approved=True, by=answer.by, at=answer.at,
                                    why=f"approved by {answer.by or 'unknown'} at {answer.at}")
    note = f" ({answer.note})" if answer.note else ""
    return False, ApprovalRecord(approved=False, by=answer.by, at=answer.at,
                                 why=f"not approved: {answer.by or 'the approver'} did not choose it{note}")


def approval_task_id(group_id: str) -> str:
    return f"approve_{group_id}"
