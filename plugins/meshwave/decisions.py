"""The branch decisions of a service's task group and its final outcome, as pure functions.

Inputs are what the group's tasks left behind: their XCom results (`results.<step>`, results.StepResults), their states
(`states[step]`: success, failed, upstream_failed, skipped, or None when never run) and the error a
failed step recorded (`errors[step]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from meshwave.canary import canary_name
from meshwave.outcomes import ServiceOutcome
from meshwave.record import After, ApprovalRecord, Baseline, FinalState, ServiceRecord
from meshwave.results import GateEvent, RolloutResult, RolloutStatus, StepResults
from meshwave.steps import Service

RAN = ("success",)
BROKEN = ("failed", "upstream_failed")

# What a deciding task chooses: the next path's first task, or an end (not_started, hold_permissive,
# stay_permissive, strict_done: nothing more to do before the outcome).
SOAK, ROLLBACK_AFTER_ROLLOUT, NOT_STARTED = "soak", "rollback_after_rollout", "not_started"
STRICT_GATE, ROLLBACK_AFTER_SOAK, HOLD = "strict_gate", "rollback_after_soak", "hold_permissive"
FLIP, STAY = "flip_strict", "stay_permissive"
STRICT_DONE, BACK = "strict_done", "back_to_permissive"
# The canary (canary.py): its rollout decides canary_soak | canary_failed; its soak inject | canary_failed |
# canary_held. The canary task chooses inject at once when the service has no canary to try.
CANARY_SOAK, CANARY_FAILED, CANARY_HELD, INJECT = "canary_soak", "canary_failed", "canary_held", "inject"


class Decision(BaseModel):
    """What a deciding task chose (`to`: the next path's first task, or an end) and why: an XCom "decision" of the
    task that made it, read by the next path's check and by the outcome."""

    model_config = ConfigDict(frozen=True)

    to: str
    why: str


def after_rollout(results: StepResults, states: dict[str, str | None],
                  errors: dict[str, str] | None = None) -> tuple[str, str]:
    """(next step, why). Injection never attempted or refused: nothing to undo. Rollout not done: roll back."""
    errors = errors or {}
    if states.get("inject") != "success":
        if states.get("preflight") != "success" or states.get("baseline") != "success":
            return NOT_STARTED, "not started: preflight or baseline did not pass"
        if str(errors.get("inject", "")).startswith("blocked:"):
            return NOT_STARTED, f"injection refused before any change: {errors['inject']}"
        return ROLLBACK_AFTER_ROLLOUT, "injection failed part-way: undo whatever was applied"
    if states.get("wait_rollout") != "success":
        return ROLLBACK_AFTER_ROLLOUT, "could not follow the rollout"
    return rollout_decision(results.wait_rollout)


def rollout_decision(rollout: RolloutResult | None) -> tuple[str, str]:
    """After a rollout the wait followed to its end (made where the wait ends: in the triggerer). None: the wait
    left no result."""
    if rollout is None:
        return ROLLBACK_AFTER_ROLLOUT, "rollout None: None"
    if rollout.status == RolloutStatus.DONE:
        return SOAK, rollout.message
    return ROLLBACK_AFTER_ROLLOUT, f"rollout {rollout.status}: {rollout.message}"


def canary_rollout_decision(rollout: RolloutResult | None) -> tuple[str, str]:
    """After the canary's rollout: its pods ready with their sidecar, or the canary failed (OOMKilled, crash loop,
    never ready by the deadline)."""
    if rollout is not None and rollout.status == RolloutStatus.DONE:
        return CANARY_SOAK, f"canary ready: {rollout.message}"
    if rollout is None:
        return CANARY_FAILED, "canary rollout: the wait left no result"
    return CANARY_FAILED, f"canary rollout {rollout.status}: {rollout.message}"


def canary_decision(gate: GateEvent | None, on_no_data: str) -> tuple[str, str]:
    """After the canary's soak: only a pass lets the primary be injected. A canary that could not be judged (no
    traffic, no primary to compare with, Prometheus down) is held, or failed when the plan says roll back."""
    status = gate.status if gate is not None else "error"
    reason = (gate.reason if gate is not None else "") or "the canary soak did not report"
    if status == "pass":
        return INJECT, f"canary passed: {reason}"
    if status == "fail":
        return CANARY_FAILED, f"canary failed: {reason}"
    if on_no_data == "rollback":
        return CANARY_FAILED, f"canary ended {status} and the plan says roll back: {reason}"
    return CANARY_HELD, f"canary ended {status}: not judged, so the workload is not injected: {reason}"


def after_soak(svc: Service, results: StepResults, states: dict[str, str | None]) -> tuple[str, str]:
    # a soak that did not succeed is an error, whatever it left
    soak = results.soak if states.get("soak") == "success" else None
    return soak_decision(soak, SoakFacts(strict=svc.strict, action=svc.action,
                                         on_no_data=svc.settings.on_no_data))


@dataclass(frozen=True)
class SoakFacts:
    """What the decision after the soak needs of the service (a trigger's kwargs carry it)."""

    strict: bool
    action: str
    on_no_data: str


def soak_decision(soak: GateEvent | None, facts: SoakFacts) -> tuple[str, str]:
    """None: the soak did not report (it failed, or left no result): an error."""
    status = soak.status if soak is not None else "error"
    reason = (soak.reason if soak is not None else "") or "the soak did not report"
    if status == "pass":
        if facts.strict:
            return STRICT_GATE, f"soak passed: {reason}"
        if facts.action == "inject_only":
            return HOLD, "soak passed; action inject_only: stays PERMISSIVE"
        return HOLD, "soak passed; the plan keeps this service PERMISSIVE (strict: false)"
    if status == "fail":
        return ROLLBACK_AFTER_SOAK, f"soak failed: {reason}"
    if facts.on_no_data == "rollback":
        return ROLLBACK_AFTER_SOAK, f"soak ended {status} and the plan says roll back: {reason}"
    return HOLD, f"soak ended {status}; the plan says hold (sidecar kept, PERMISSIVE): {reason}"


def after_strict_gate(results: StepResults, states: dict[str, str | None]) -> tuple[str, str]:
    gate = results.strict_gate if states.get("strict_gate") == "success" else None
    return gate_decision(gate)


def gate_decision(gate: GateEvent | None) -> tuple[str, str]:
    """None: the gate did not report (it failed, or left no result): STRICT is not flipped."""
    if gate is None:
        return STAY, "STRICT gate error: did not report"
    if gate.status == "pass":
        unread = gate.extra.callers_error if gate.extra is not None else None
        if unread:  # verify_strict would watch no caller: a flip that nobody watches is not made
            return STAY, (f"STRICT gate passed, but the callers to watch after the flip could not be read from "
                          f"Prometheus: {unread}")
        return FLIP, gate.reason
    callers = (gate.extra.plaintext_callers if gate.extra is not None else None) or []
    if callers:
        return STAY, f"plaintext callers in the lookback when the STRICT gate timed out: {'; '.join(callers)}"
    return STAY, f"STRICT gate {gate.status}: {gate.reason}"


def after_strict(svc: Service, results: StepResults, states: dict[str, str | None]) -> tuple[str, str]:
    if states.get("flip_strict") != "success":
        return BACK, "the flip to STRICT did not complete or was not proven in force: make sure it is PERMISSIVE"
    refused = results.flip_strict.refused if results.flip_strict is not None else None
    if refused:
        return STAY, f"STRICT not flipped: {refused}"
    verify = results.verify_strict
    # a verification that did not succeed is an error; one that succeeded always left its result
    status = (verify.status if verify is not None else None) if states.get("verify_strict") == "success" else "error"
    reason = verify.reason if verify is not None else None
    if status == "pass":
        return STRICT_DONE, f"STRICT verified (the service and its callers): {reason}"
    if status in ("fail", "inconclusive") or svc.settings.on_no_data == "rollback":
        return BACK, f"after STRICT: {status}: {reason}"
    return BACK, f"after STRICT the checks ended {status}: never leave STRICT unverified: {reason}"


def mtls_in_force(results: StepResults) -> str | None:
    """The mode the workload enforces, as the last step that computed it from every policy saw it (preflight, then
    flip_strict, then back_to_permissive): what the record reports, never what meshwave meant to write."""
    for step in (results.back_to_permissive, results.flip_strict, results.preflight):
        if step is not None and step.mtls_in_force is not None:
            return step.mtls_in_force.label()
    return None


def _after_values(results: StepResults) -> After:
    """The last application values seen by the soak (the 'after' column of the report): only those it judged."""
    return soaked_values(results.soak)


def soaked_values(event: GateEvent | None) -> After:
    """What the soak judged last: the workload's success rate and p99 (only those it judged)."""
    found: dict[str, Any] = {}
    soak = event.result if event is not None else None
    for v in (soak or {}).get("verdicts", []):
        values = v.get("values") or {}
        if v.get("check") == "app_success_rate":
            found["success_rate"] = values.get("success_rate")
        elif v.get("check") == "app_latency_p99":
            found["p99_ms"] = values.get("p99_ms")
    return After(**found)


def _identity(svc: Service | None) -> dict[str, Any]:
    """The record's identity fields, as keyword arguments of ServiceRecord."""
    if svc is None:
        return {"service": "(refused input)"}
    p = svc.plan
    return {"service": p.key, "cluster": p.cluster, "namespace": p.namespace, "workload": p.workload,
            "criticality": p.criticality, "batch": svc.batch, "action": svc.action}


def _baseline(results: StepResults) -> Baseline:
    base = results.baseline.baseline if results.baseline is not None else None
    if base is None:
        return Baseline()
    return Baseline(success_rate=base.success_rate, p99_ms=base.p99_ms, request_rate=base.request_rate)


def _plaintext_callers(results: StepResults) -> list[str]:
    gate = results.strict_gate
    return list((gate.extra.plaintext_callers if gate is not None and gate.extra is not None else None) or [])


def outcome(svc: Service | None, results: StepResults, states: dict[str, str | None], errors: dict[str, str],
            decisions: dict[str, str], dry_run: bool, approval: ApprovalRecord | None = None) -> ServiceRecord:
    """The final state and why: strict, permissive, frozen, removed, rolled_back, blocked, failed, skipped, planned.

    `svc` is None when the input was refused before a service could be named. `approval`: the answer of the batch's
    approval, when the service needed one (flip_strict read it).
    """
    final = _final_state(svc, results, states, errors, decisions, dry_run)
    return ServiceRecord(
        **_identity(svc), baseline=_baseline(results), after=_after_values(results), changes=results.changes(),
        verdicts=results.verdicts(), plaintext_callers=_plaintext_callers(results), decisions=decisions,
        errors=errors, steps=results.seconds(), approval=approval,
        outcome=final.outcome, mtls=final.mtls, sidecar=final.sidecar, reason=final.reason)


def _final_state(svc: Service | None, results: StepResults, states: dict[str, str | None],
                 errors: dict[str, str], decisions: dict[str, str], dry_run: bool) -> FinalState:
    if states.get("admit") == "failed":
        return FinalState(outcome=ServiceOutcome.BLOCKED, mtls=None, sidecar=None,
                          reason=errors.get("admit", "admit failed: see its log"))
    if svc is None or states.get("admit") != "success":
        why = errors.get("admit") or errors.get("wave") or "the wave stopped before this batch"
        return FinalState(outcome=ServiceOutcome.SKIPPED, mtls=None, sidecar=False, reason=f"not started: {why}")
    if svc.action == "clear_emergency":
        return _cleared(results, states, errors, dry_run)
    if svc.action in ("permissive", "remove_sidecar"):
        return _requested_undo(svc, results, states, errors, dry_run)
    if svc.action == "remove_canary":
        return _canary_removed(svc, results, states, errors, dry_run)
    return _migration_state(svc, results, states, errors, decisions, dry_run)


def _requested_undo(svc: Service, results: StepResults, states: dict[str, str | None], errors: dict[str, str],
                    dry_run: bool) -> FinalState:
    """The ad-hoc actions 'back to PERMISSIVE' and 'remove the sidecar': done, planned, or failed and why."""
    if dry_run:
        return FinalState(outcome=ServiceOutcome.PLANNED, mtls=None, sidecar=None,
                          reason=f"dry run of {svc.action}: the changes listed were logged, none applied")
    if svc.action == "permissive":
        if states.get("back_to_permissive") != "success":
            problem = errors.get("back_to_permissive", "see the task log")
            return FinalState(outcome=ServiceOutcome.FAILED, mtls=None, sidecar=None,
                              reason=f"could not set PERMISSIVE: {problem}")
        recovery = results.verify_recovery
        checked = f"{recovery.status}: {recovery.reason}" if recovery is not None else "not run: "
        return FinalState(outcome=ServiceOutcome.PERMISSIVE, mtls=mtls_in_force(results) or "PERMISSIVE", sidecar=None,
                          reason=f"set to PERMISSIVE on request; recovery check: {checked}".rstrip(": "))
    rollout = results.wait_rollback
    if states.get("rollback_injection") != "success" or rollout is None or rollout.status != RolloutStatus.DONE:
        problem = errors.get("rollback_injection") or errors.get("wait_rollback") or \
            (rollout.message if rollout is not None else None)
        return FinalState(outcome=ServiceOutcome.FAILED, mtls=None, sidecar=None,
                          reason=f"sidecar removal did not complete: {problem or 'see the task logs'}")
    after = results.after_removal
    if after is not None and after.status == "worse":  # done as asked, but the workload is worse off: red, says so
        return FinalState(outcome=ServiceOutcome.FAILED, mtls="PERMISSIVE", sidecar=False,
                          reason=f"sidecar removed on request, but {after.reason}")
    return FinalState(outcome=ServiceOutcome.REMOVED, mtls="PERMISSIVE", sidecar=False,
                      reason=f"sidecar removed on request: {rollout.message}{_after_note(results)}")


def _canary_removed(svc: Service, results: StepResults, states: dict[str, str | None], errors: dict[str, str],
                    dry_run: bool) -> FinalState:
    """mesh_reconcile's undo of a canary a run left: the canary deleted; the workload itself untouched."""
    p = svc.plan
    if dry_run:
        return FinalState(outcome=ServiceOutcome.PLANNED, mtls=None, sidecar=None,
                          reason="dry run of remove_canary: the changes listed were logged, none applied")
    if states.get("remove_canary") != "success" or results.remove_canary is None:
        problem = errors.get("remove_canary", "see the task log")
        return FinalState(outcome=ServiceOutcome.FAILED, mtls=None, sidecar=None,
                          reason=f"the canary {p.namespace}/{canary_name(p.workload)} could not be removed: {problem}")
    done = "removed" if results.remove_canary.removed else "already gone"
    return FinalState(outcome=ServiceOutcome.REMOVED, mtls=None, sidecar=None,
                      reason=f"canary {p.namespace}/{canary_name(p.workload)} {done}; {p.namespace}/{p.workload} "
                             "was not touched")


def _after_note(results: StepResults) -> str:
    """What the workload's own success rate did once its sidecar was gone (empty when it was not checked)."""
    after = results.after_removal
    return f"; after the removal: {after.reason}" if after is not None and after.reason else ""


def _rolled_out_again(results: StepResults) -> bool:
    """The rollout after the sidecar's removal was followed to its end."""
    return results.wait_rollback is not None and results.wait_rollback.status == RolloutStatus.DONE


def _migration_state(svc: Service, results: StepResults, states: dict[str, str | None],
                     errors: dict[str, str], decisions: dict[str, str], dry_run: bool) -> FinalState:
    def done(step: str) -> bool:
        return states.get(step) == "success"

    if states.get("preflight") in (None, "skipped", "upstream_failed"):
        return FinalState(outcome=ServiceOutcome.SKIPPED, mtls=None, sidecar=False,
                          reason="not started: " + (errors.get("wave") or "the wave stopped before this batch"))
    for step in ("preflight", "baseline"):  # read-only steps: they run for real in a dry run too
        if states.get(step) in BROKEN:
            return FinalState(outcome=ServiceOutcome.BLOCKED, mtls=None, sidecar=False,
                              reason=f"{step}: {str(errors.get(step, 'failed')).removeprefix('blocked: ')}")
    if dry_run:
        return FinalState(outcome=ServiceOutcome.PLANNED, mtls=None, sidecar=False,
                          reason="dry run: the changes listed were logged, none applied")
    if frozen := _frozen(results, errors):
        return frozen
    if canary := _canary_state(svc, results, states, errors, decisions):
        return canary
    if states.get("inject") in BROKEN and str(errors.get("inject", "")).startswith("blocked:"):
        return FinalState(outcome=ServiceOutcome.BLOCKED, mtls=None, sidecar=False,
                          reason=f"inject: {errors['inject'].removeprefix('blocked: ')}")
    if states.get("rollback_injection") in RAN or states.get("rollback_injection") in BROKEN:
        undone = done("rollback_injection") and done("wait_rollback") and _rolled_out_again(results)
        why = decisions.get("after_rollout") if decisions.get("after_rollout_to") == ROLLBACK_AFTER_ROLLOUT else \
            decisions.get("after_soak")
        if not undone:
            problem = errors.get("rollback_injection") or errors.get("wait_rollback") or \
                (results.wait_rollback.message if results.wait_rollback is not None else None) or \
                f"rollback_injection {states.get('rollback_injection')}, wait_rollback {states.get('wait_rollback')}"
            return FinalState(outcome=ServiceOutcome.FAILED, mtls=None, sidecar=None,
                              reason=f"rollback did not complete ({problem}); it was rolled back because {why}")
        worse = results.after_removal is not None and results.after_removal.status == "worse"
        if worse:
            why = f"{results.after_removal.reason}; it was rolled back because {why}"
        return FinalState(outcome=ServiceOutcome.ROLLED_BACK, mtls="PERMISSIVE", sidecar=False,
                          reason=f"{why}{'' if worse else _after_note(results)}")
    if states.get("back_to_permissive") in RAN or states.get("back_to_permissive") in BROKEN:
        if not done("back_to_permissive"):
            return FinalState(outcome=ServiceOutcome.FAILED, mtls="STRICT?", sidecar=True,
                              reason=f"could not go back to PERMISSIVE: {errors.get('back_to_permissive')}")
        recovery = results.verify_recovery.status if results.verify_recovery is not None else "unknown"
        return FinalState(outcome=ServiceOutcome.ROLLED_BACK, mtls=mtls_in_force(results) or "PERMISSIVE", sidecar=True,
                          reason=f"STRICT undone, sidecar kept: {decisions.get('after_strict')}; recovery: {recovery}")
    if done("verify_strict"):
        if decisions.get("after_strict_to") != STRICT_DONE:  # never "strict" without the verified decision
            return FinalState(outcome=ServiceOutcome.FAILED, mtls=mtls_in_force(results) or "STRICT?", sidecar=True,
                              reason=f"STRICT flipped but not confirmed as verified (after_strict: "
                                     f"{decisions.get('after_strict', 'not decided')}); make sure it is PERMISSIVE")
        return FinalState(outcome=ServiceOutcome.STRICT, mtls=mtls_in_force(results) or "STRICT", sidecar=True,
                          reason=decisions.get("after_strict", ""))
    if results.flip_strict is not None and results.flip_strict.refused:
        return FinalState(outcome=ServiceOutcome.PERMISSIVE, mtls=mtls_in_force(results), sidecar=True,
                          reason=f"STRICT not flipped: {results.flip_strict.refused}")
    if decisions.get("after_approval_to") == STAY:  # not approved, or its gate no longer held once approved
        return FinalState(outcome=ServiceOutcome.PERMISSIVE, mtls=mtls_in_force(results) or "PERMISSIVE", sidecar=True,
                          reason=decisions.get("after_approval", ""))
    if decisions.get("after_strict_gate_to") == FLIP and states.get("flip_strict") == "upstream_failed":
        # the gate passed; the one other task flip_strict waits for is the batch's approval, which broke
        return FinalState(outcome=ServiceOutcome.PERMISSIVE, mtls=mtls_in_force(results) or "PERMISSIVE", sidecar=True,
                          reason="STRICT not flipped: the batch's approval task did not complete (see its log)")
    if decisions.get("after_strict_gate_to") == STAY:
        return FinalState(outcome=ServiceOutcome.PERMISSIVE, mtls=mtls_in_force(results) or "PERMISSIVE", sidecar=True,
                          reason=decisions.get("after_strict_gate", ""))
    if decisions.get("after_soak_to") == HOLD:
        judged = states.get("soak") == "success" and results.soak is not None and results.soak.status == "pass"
        return FinalState(outcome=ServiceOutcome.PERMISSIVE if judged else ServiceOutcome.HELD,
                          mtls=mtls_in_force(results) or "PERMISSIVE", sidecar=True,
                          reason=decisions.get("after_soak", ""))
    broken = [s for s, st in states.items() if st in BROKEN]
    return FinalState(outcome=ServiceOutcome.FAILED, mtls=None, sidecar=None,
                      reason="; ".join(f"{s}: {errors.get(s, states[s])}" for s in broken) or "unknown state")


def _canary_state(svc: Service, results: StepResults, states: dict[str, str | None], errors: dict[str, str],
                  decisions: dict[str, str]) -> FinalState | None:
    """The end of a service whose canary did not let it go on (None: no canary, or it passed). Its primary was never
    changed: the record says so, or what is left when the canary could not be removed."""
    broken = [step for step in ("canary", "wait_canary", "canary_soak") if states.get(step) in BROKEN]
    chosen = decisions.get("after_canary_to") or decisions.get("after_canary_rollout_to")
    if not broken and chosen not in (CANARY_FAILED, CANARY_HELD):
        return None
    p = svc.plan
    mtls = mtls_in_force(results) or "PERMISSIVE"
    if states.get("remove_canary") != "success":
        problem = errors.get("remove_canary") or f"remove_canary {states.get('remove_canary')}"
        why = decisions.get("after_canary") or decisions.get("after_canary_rollout") or \
            "; ".join(f"{step}: {errors.get(step, states[step])}" for step in broken)
        return FinalState(outcome=ServiceOutcome.FAILED, mtls=mtls, sidecar=False,
                          reason=f"{why}; the canary could not be removed ({problem}): LEFT: deployment "
                                 f"{p.namespace}/{canary_name(p.workload)} with a sidecar takes a share of the "
                                 f"Service's traffic; {p.namespace}/{p.workload} was not changed")
    removed = results.remove_canary is not None and results.remove_canary.removed
    untouched = ("the canary was removed; " if removed else "") + \
        f"{p.namespace}/{p.workload} was not changed or restarted"
    if broken:
        step = broken[0]
        error = str(errors.get(step) or states[step])
        outcome = ServiceOutcome.BLOCKED if error.startswith("blocked:") else ServiceOutcome.FAILED
        return FinalState(outcome=outcome, mtls=mtls, sidecar=False,
                          reason=f"{step}: {error.removeprefix('blocked: ')}; {untouched}")
    why = decisions.get("after_canary") or decisions.get("after_canary_rollout", "")
    outcome = ServiceOutcome.ROLLED_BACK if chosen == CANARY_FAILED else ServiceOutcome.HELD
    return FinalState(outcome=outcome, mtls=mtls, sidecar=False, reason=f"{why}; {untouched}")


def _frozen(results: StepResults, errors: dict[str, str]) -> FinalState | None:
    """The freeze came while the service was in flight: read again just before the injection or the flip to STRICT
    (service_group._not_frozen), that write was not made. The service stays as it was (PERMISSIVE)."""
    for step, what, sidecar in (("canary", "no canary made, not injected", False), ("inject", "not injected", False),
                                ("flip_strict", "sidecar kept, not STRICT", True)):
        error = str(errors.get(step, ""))
        if error.startswith("frozen:"):
            return FinalState(outcome=ServiceOutcome.FROZEN, mtls=mtls_in_force(results) or "PERMISSIVE",
                              sidecar=sidecar, reason=f"{what}: {error}")
    return None


def _cleared(results: StepResults, states: dict[str, str | None], errors: dict[str, str],
             dry_run: bool) -> FinalState:
    """The operator's all-clear after an emergency rollback (mesh_service clear_emergency): no mode changes."""
    if dry_run:
        return FinalState(outcome=ServiceOutcome.PLANNED, mtls=None, sidecar=None,
                          reason="dry run of clear_emergency: the changes listed were logged, none applied")
    if states.get("back_to_permissive") != "success":
        problem = errors.get("back_to_permissive", "see the task log")
        return FinalState(outcome=ServiceOutcome.FAILED, mtls=None, sidecar=None,
                          reason=f"could not clear the emergency mark: {problem}")
    written = results.back_to_permissive.changes if results.back_to_permissive is not None else []
    cleared = [c["target"] for c in written if c.get("applied")]
    return FinalState(outcome=ServiceOutcome.CLEARED, mtls=mtls_in_force(results), sidecar=None,
                      reason=f"emergency mark cleared on {', '.join(cleared)}: meshwave may make them STRICT again"
                      if cleared else "no policy of the workload carried the emergency mark")
