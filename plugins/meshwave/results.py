"""What each step of a service's task group leaves behind: its result, typed (issue 15, item 3).

A step returns one of these models; its task pushes `model_dump(mode="json")` as an XCom under the step's name
(group_state.TASKS), and every reader validates the pulled value once (`StepResults`, group_state.results_of) and
reads attributes. The JSON is what the steps pushed as dicts before: the same keys, in the same order (the field
order), and a key a step leaves out in some case (a dry run, a refusal) is left out, not written as null: a field
not given is not dumped (`_Result`). So `Model.model_validate(json).model_dump(mode="json")` is the JSON again.

`changes` (meshwave.changes.Change.to_dict()), gate `result`s and `history` (meshwave.checks) and a rollout's
`state` (kube.RolloutState.to_dict()) stay the dicts their own modules write and read.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from meshwave.checks import GateStatus
from meshwave.mtls import Mode
from meshwave.outbound import AfterRemoval
from meshwave.probe import ProbeResult

# A result is a fact about a run: frozen; a key it does not know is a writer and a reader out of step, refused.
# Built at first use, not at import (record.py says why: every task start imports this module through its DAG file).
_RESULT = ConfigDict(frozen=True, extra="forbid", defer_build=True)

Changes = list[dict[str, Any]]  # meshwave.changes.Change.to_dict() of each write, in order


class _Result(BaseModel):
    """Dumps the fields it was given, so that a key a step did not write stays out of the JSON, as before."""

    model_config = _RESULT

    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class MtlsInForce(_Result):
    """The mode the workload's pods enforce, computed from every policy (mtls.EffectiveMtls.summary())."""

    mode: Mode
    ports: dict[str, Mode] = Field(description="port -> its own mode, where a workload policy sets one")
    decided_by: str | None = Field(description="the policy that decides the mode; None: Istio's default")
    describe: str

    def label(self) -> str:
        """What the record's `mtls` says: the mode, then each port's own (e.g. 'STRICT, port 9090 DISABLE')."""
        return str(self.mode) + "".join(f", port {p} {m}" for p, m in sorted(self.ports.items()))


# ---- the steps that run in a worker (steps.py) -----------------------------------------------------------------
class PreflightResult(_Result):
    replicas: int
    app_container: str | None
    changes: Changes = Field(description="the sidecar resource annotations and port exclusions applied")
    notes: list[str] = Field(description="what the run will not change: who reverts the template, who decides STRICT")
    # Optional: the mode's reader (decisions.mtls_in_force) has always taken a result without it
    mtls_in_force: MtlsInForce | None = Field(None, description="what the pods enforce once injected (now, if they "
                                                                "are)")
    plaintext_before_injection: str | None = Field(None, description="only when a STRICT would apply once injected: "
                                                                     "the callers without a sidecar, in numbers")
    headroom: str
    seconds: float


class MeasuredBaseline(_Result):
    """checks.Baseline.to_dict(): the application's own metrics before any change; a None has a note saying why."""

    namespace: str
    workload: str
    window: str
    cluster: str | None
    success_rate: float | None
    request_rate: float | None
    request_count: float | None
    p50_ms: float | None
    p99_ms: float | None
    app_memory_bytes: dict[str, float] = Field(description="container -> working set bytes")
    queries: dict[str, str]
    notes: list[dict[str, Any]] = Field(description="checks.Verdict.to_dict() of each value not measured")
    at: str


class BaselineResult(_Result):
    baseline: MeasuredBaseline
    seconds: float


# `pending`: the run's expected state (pending.py) the service group wrote before the change (Change.to_dict(), or
# None: nothing this run's); set by the service group, not by the step, so absent from a step's own result.
class InjectResult(_Result):
    changes: Changes
    sidecars: str | None = Field(None, description="strict_only: the pods' sidecars, found (nothing written)")
    seconds: float
    pending: dict[str, Any] | None = None


class CanaryResult(_Result):
    """The canary copy made (or found: a retry), or why the service has none (`none`: nothing written)."""

    changes: Changes
    canary: str | None = Field(None, description="the canary Deployment's name")
    none: str | None = Field(None, description="why there is no canary to try (no canary in the plan, ...)")
    seconds: float
    pending: dict[str, Any] | None = None


class RemoveCanaryResult(_Result):
    changes: Changes
    seconds: float
    pending: dict[str, Any] | None = None  # the canary's pending state settled (Change.to_dict())

    @property
    def removed(self) -> bool:
        return any(c.get("applied") for c in self.changes)


class FlipResult(_Result):
    """STRICT written and proven; or refused (`refused`, nothing written); or a dry run (no mtls_in_force, no probe)."""

    changes: Changes
    refused: str | None = Field(None, description="the policy of someone else's that decides the mode")
    mode: Mode | None = Field(None, description="STRICT when written (absent when refused)")
    mtls_in_force: MtlsInForce | None = None
    probe: ProbeResult | None = Field(None, description="the plaintext probe that proved STRICT in force")
    seconds: float
    pending: dict[str, Any] | None = None


class BackToPermissiveResult(_Result):
    changes: Changes
    mode: Mode = Field(description="PERMISSIVE")
    mtls_in_force: MtlsInForce | None = Field(None, description="absent in a dry run")
    seconds: float
    pending: dict[str, Any] | None = None


class ClearEmergencyResult(_Result):
    """mesh_service clear_emergency runs in back_to_permissive's place and leaves this under its name."""

    changes: Changes
    mtls_in_force: MtlsInForce | None = Field(description="None in a dry run (written as null)")
    seconds: float


class RollbackResult(_Result):
    changes: Changes
    outbound: dict[str, Any] = Field(description="outbound.RemovalCheck.summary(): the destinations it calls")
    success_before: float | None = Field(description="its own success rate just before the removal")
    seconds: float
    pending: dict[str, Any] | None = None


# ---- the waits that end in the triggerer (triggers.py), or pushed by the worker in a dry run (sensors.push_ended) -
class RolloutStatus(StrEnum):
    DONE = "done"
    FAILED = "failed"  # OOMKilled, CrashLoopBackOff, a missing proxy
    TIMEOUT = "timeout"  # not done by the deadline
    ERROR = "error"  # not done by the deadline, and the API server failed meanwhile


class RolloutResult(_Result):
    """wait_rollout, wait_rollback. A dry run has only status, message and dry_run."""

    status: RolloutStatus
    message: str
    state: dict[str, Any] | None = Field(None, description="kube.RolloutState.to_dict() (absent at the deadline)")
    started: float | None = None
    ended: float | None = None
    dry_run: bool | None = None


class Stage(StrEnum):
    CANARY_SOAK = "canary_soak"
    SOAK = "soak"
    STRICT_GATE = "strict_gate"
    VERIFY_STRICT = "verify_strict"
    VERIFY_RECOVERY = "verify_recovery"


class GateExtra(_Result):
    """What a gate hands on (stages.evaluate's and stages.on_pass's extra): the STRICT gate's callers."""

    plaintext_callers: list[str] | None = Field(None, description="checks.Caller.describe() of each plaintext caller")
    callers: list[dict[str, Any]] | None = Field(None, description="checks.Caller.to_dict() of each mTLS caller")
    inbound_before: float | None = None
    callers_success_before: dict[str, float] | None = Field(None, description="'namespace/workload' -> its rate")
    callers_error: str | None = Field(None, description="why the callers could not be read")


class GateEvent(_Result):
    """canary_soak, soak, strict_gate, verify_strict, verify_recovery. A dry run has only stage, status, reason and
    dry_run."""

    stage: Stage
    status: GateStatus
    reason: str
    polls: int | None = None
    result: dict[str, Any] | None = Field(None, description="checks.GateResult.to_dict(): the last poll's verdicts")
    extra: GateExtra | None = None
    history: list[dict[str, Any]] | None = Field(None, description="the polls' verdicts, the newest kept")
    started: float | None = None
    ended: float | None = None
    dry_run: bool | None = None


class StepError(_Result):
    """What a failed step recorded (one per task, under the XCom key "error")."""

    step: str
    message: str


WRITES = (PreflightResult, CanaryResult, RemoveCanaryResult, InjectResult, FlipResult, BackToPermissiveResult,
          ClearEmergencyResult, RollbackResult)
WAITS = (RolloutResult, GateEvent)
TIMED = (*WRITES, BaselineResult)  # the steps that say how long they took


class StepResults(BaseModel):
    """Every step's result one service's tasks left (None: none), in the order the steps run: the record's changes,
    verdicts and step seconds keep that order. `after_removal` is the outcome task's own check."""

    model_config = _RESULT

    preflight: PreflightResult | None = None
    baseline: BaselineResult | None = None
    canary: CanaryResult | None = None
    wait_canary: RolloutResult | None = None
    canary_soak: GateEvent | None = None
    remove_canary: RemoveCanaryResult | None = None
    inject: InjectResult | None = None
    wait_rollout: RolloutResult | None = None
    soak: GateEvent | None = None
    strict_gate: GateEvent | None = None
    flip_strict: FlipResult | None = None
    verify_strict: GateEvent | None = None
    # mesh_service clear_emergency leaves its own result here (only it has no `mode`; only the other has `pending`)
    back_to_permissive: BackToPermissiveResult | ClearEmergencyResult | None = None
    verify_recovery: GateEvent | None = None
    rollback_injection: RollbackResult | None = None
    wait_rollback: RolloutResult | None = None
    after_removal: AfterRemoval | None = None

    def present(self) -> list[tuple[str, BaseModel]]:
        """(step, result) of each step that left one, in step order."""
        return [(name, value) for name in type(self).model_fields if (value := getattr(self, name)) is not None]

    def changes(self) -> Changes:
        return [c for _, r in self.present() if isinstance(r, WRITES) for c in r.changes]

    def verdicts(self) -> list[dict[str, Any]]:
        """Every gate's last verdicts, each with the step ("stage") that ran it."""
        return [{**v, "stage": step} for step, r in self.present() if isinstance(r, GateEvent) and r.result is not None
                for v in r.result.get("verdicts", [])]

    def seconds(self) -> dict[str, float]:
        """How long each step took: its own `seconds`, or a wait's start to end (a dry run's wait has neither)."""
        found: dict[str, float] = {}
        for step, r in self.present():
            if isinstance(r, TIMED):
                found[step] = r.seconds
            elif isinstance(r, WAITS) and r.ended is not None:
                found[step] = round(r.ended - (r.started or 0), 1)
        return found
