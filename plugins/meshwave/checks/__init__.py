"""Verdicts and the Prometheus checks of a migration step, and the gate that turns polls into a decision.

Every check answers pass | fail | no_data | error, with the values it saw and the queries it ran.
- no_data is never a pass: low traffic (fewer than `min_requests` in the window), NaN, an empty vector
  where emptiness proves nothing. What to do about it is the Gate's per-check policy.
- error is a Prometheus that could not answer (down, timeout, bad query); the checks never raise for it.
- a bad namespace/workload/cluster/window raises ValueError before any query is sent.

No Airflow imports; synchronous; all results serialise to JSON through to_dict/from_dict.

One module per gated stage; each names, in its docstring, the rest of its stage (the poll's params, the policy and
timing, the decision). stages.py runs a stage's checks (`evaluate`) on the trigger's params.

| stage            | its checks                                       | module            | decided by                 |
|------------------|--------------------------------------------------|-------------------|----------------------------|
| baseline         | `measure_baseline` (the soak's reference)        | baseline.py       | (a step, not a gate)       |
| canary_soak      | `judge_canary`                                   | canary_soak.py    | decisions.canary_decision  |
| soak             | `verify_after_injection`                         | soak.py           | decisions.soak_decision    |
| strict_gate      | `strict_gate`; on a pass, whom to watch after it | strict_gate.py    | decisions.gate_decision    |
| verify_strict    | `verify_after_strict`                            | verify_strict.py  | decisions.after_strict     |
| verify_recovery  | `verify_after_strict` without the inbound rate   | verify_strict.py  | decisions.outcome          |

Shared by the stages: verdict.py (`Verdict`, `Outcome`, `Thresholds`, `Caller`), reader.py (running the named
queries), shared.py (success rate, p99, restarts and OOMKill verdicts), gate.py (`BreachTracker`, `GatePolicy`:
polls to a decision). Each stage's policy, wait and minimum are set in service_group._gate_watch. A passing STRICT
gate names whom verify_strict watches (stages.on_pass: `mtls_callers`, `inbound_rate` in strict_gate.py,
`caller_success_rates` in verify_strict.py).

The names below are those callers import from `meshwave.checks`: import them from here, not from the modules.
"""

from __future__ import annotations

from meshwave.checks.baseline import Baseline, measure_baseline
from meshwave.checks.canary_soak import judge_canary
from meshwave.checks.gate import (
    EVENT_CHECKS,
    BreachTracker,
    CheckPolicy,
    Gate,
    GatePolicy,
    GateResult,
    GateStatus,
    OnMissing,
    decode_values,
)
from meshwave.checks.soak import verify_after_injection
from meshwave.checks.strict_gate import PLAINTEXT_QUERIES, inbound_rate, mtls_callers, strict_gate
from meshwave.checks.verdict import EPSILON, MI, NO_SIDECAR, Caller, Outcome, Thresholds, Verdict
from meshwave.checks.verify_strict import CallerRef, caller_success_rates, verify_after_strict
from meshwave.prometheus import decode_float

__all__ = [
    "Baseline", "BreachTracker", "Caller", "CheckPolicy", "Gate", "GatePolicy", "GateResult", "GateStatus",
    "OnMissing", "Outcome", "Thresholds", "Verdict", "decode_float", "decode_values", "inbound_rate",
    "measure_baseline", "mtls_callers", "strict_gate", "verify_after_injection", "verify_after_strict",
    # also importable from here, as they were from checks.py
    "EPSILON", "EVENT_CHECKS", "MI", "NO_SIDECAR", "PLAINTEXT_QUERIES", "CallerRef", "caller_success_rates",
    "judge_canary",
]
