"""A service's outcome record: what one run did to one service, where it left it and why.

`decisions.outcome` builds it; the outcome task pushes `record.model_dump(mode="json")` as its XCom "record" (plain
JSON: the outcome a string such as "strict"), and the wave's circuit breaker, report and `publish`, mesh_service's
report and mesh_reconcile's summary read it back with `ServiceRecord.model_validate`. The field order is the JSON's
key order (the report's JSON ledger keeps it).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from meshwave.outcomes import ServiceOutcome

# A record is a fact about a run: frozen; and a key it does not know is a writer and a reader out of step, refused.
# Built at first use, not at import: every task start parses its DAG file, which imports this module, and only the
# outcome and report tasks make or read a record (building at import cost each task start some 5 ms).
_RECORD = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class FinalState(BaseModel):
    """Where the run left the service, as the record's outcome, mtls, sidecar and reason."""

    model_config = _RECORD

    outcome: ServiceOutcome = Field(description="what the run ended with (outcomes.ServiceOutcome says what each "
                                                "means for the run, the wave and the next wave)")
    mtls: str | None = Field(description="the mTLS mode the workload enforces, as a step last computed it from every "
                                         "policy (e.g. 'STRICT', 'PERMISSIVE, port 9090 DISABLE'; 'STRICT?' when the "
                                         "way back failed); None when not known or not read")
    sidecar: bool | None = Field(description="whether its pods run a sidecar; None when not known, or only some do")
    reason: str = Field(description="why, in words: the decision, the error, or what is LEFT on the workload")


class Baseline(BaseModel):
    """The workload's own metrics before any change (the baseline step; None: not measured)."""

    model_config = _RECORD

    success_rate: float | None = Field(None, description="share of its requests answered without a 5xx, 0..1")
    p99_ms: float | None = Field(None, description="99th percentile latency of its requests, in milliseconds")
    request_rate: float | None = Field(None, description="requests per second it served")


class After(BaseModel):
    """The workload's own metrics as the soak last judged them (the report's 'after' column). A value the soak did
    not judge is left out of the JSON, not written as null: the record has always carried only what was seen."""

    model_config = _RECORD

    success_rate: float | None = Field(None, description="share of its requests answered without a 5xx, 0..1")
    p99_ms: float | None = Field(None, description="99th percentile latency of its requests, in milliseconds")

    @model_serializer(mode="wrap")
    def _seen_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class ApprovalRecord(BaseModel):
    """What the person asked to approve STRICT answered (approval.py), for a service that needed it."""

    model_config = _RECORD

    approved: bool = Field(description="whether its STRICT was approved")
    by: str | None = Field(None, description="who answered; None when nobody did (the timeout) or nobody was asked")
    at: str | None = Field(None, description="when the answer came (ISO 8601, UTC)")
    timed_out: bool = Field(False, description="nobody answered in time: not approved")
    why: str = Field(description="the answer in words, as the record's reason gives it")

    def describe(self) -> str:
        """The report's approval column."""
        if self.timed_out:
            return "timed out"
        return f"{'approved' if self.approved else 'refused'}{f' by {self.by}' if self.by else ''}"


class ServiceRecord(BaseModel):
    """One service's outcome record. Only `service`, `outcome` and `reason` are required: the wave names a service
    whose outcome task recorded nothing with those three alone (wave._records)."""

    model_config = _RECORD

    # who: the service as the plan (or the trigger form) names it; "(refused input)" and None when it was refused
    # before it could be named
    service: str = Field(description="the service's key: cluster/namespace/workload")
    cluster: str | None = None
    namespace: str | None = None
    workload: str | None = Field(None, description="the Deployment")
    criticality: str | None = Field(None, description="the plan's criticality: critical, high, medium, low")
    batch: int | None = Field(None, description="the wave's batch it ran in")
    action: str | None = Field(None, description="what was asked: migrate, strict_only, inject_only, permissive, "
                                                 "remove_sidecar, clear_emergency")
    # what was measured and done
    baseline: Baseline = Field(default_factory=Baseline)
    after: After = Field(default_factory=After)
    # meshwave.changes.Change.to_dict(): every write made (or logged, in a dry run), in order
    changes: list[dict[str, Any]] = Field(default_factory=list)
    # meshwave.checks.Verdict.to_dict() of every check, with the "stage" (step) that ran it
    verdicts: list[dict[str, Any]] = Field(default_factory=list)
    plaintext_callers: list[str] = Field(default_factory=list, description="callers seen without mTLS by the STRICT "
                                                                           "gate: what kept it PERMISSIVE")
    decisions: dict[str, str] = Field(default_factory=dict, description="each deciding task's why, and under "
                                                                        "'<name>_to' the path it chose")
    errors: dict[str, str] = Field(default_factory=dict, description="the error of each step that failed, by step")
    steps: dict[str, float] = Field(default_factory=dict, description="seconds each step took, by step")
    approval: ApprovalRecord | None = Field(None, description="the approval before STRICT, when the plan asked for one")
    # where it was left: FinalState's fields, flat (as the JSON has always had them)
    outcome: ServiceOutcome
    mtls: str | None = None
    sidecar: bool | None = None
    reason: str

    @model_serializer(mode="wrap")
    def _approval_when_asked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """`approval` is in the JSON of a service that needed one only: every other record keeps its shape."""
        found = handler(self)
        if found.get("approval") is None:
            found.pop("approval", None)
        return found


def unrecorded(service: str, batch: int | None = None) -> ServiceRecord:
    """What a service counts as when its outcome task recorded nothing (it never ran, or broke) in a run that
    reached its report: failed. The report, the breaker, `publish` and the migration page all read it so."""
    return ServiceRecord(service=service, batch=batch, outcome=ServiceOutcome.FAILED, reason="no outcome recorded")
