"""The gate every stage shares: successive polls' verdicts to a decision (`BreachTracker`), under a `GatePolicy`.

Each stage's policy (breaches to fail, passes to pass, what no_data and error do) and its wait are set in
service_group._gate_watch and steps.Service.gate_policy; the trigger (triggers.GateTrigger) feeds the polls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from meshwave.checks.verdict import Outcome, Verdict, _decode, _encode


class OnMissing(StrEnum):
    """What a no_data or error verdict does in the gate."""

    FAIL = "fail"   # counts as a breach (N in a row confirm a FAIL)
    PASS = "pass"   # ignored: counts as a pass
    WAIT = "wait"   # pending until the deadline; then the gate ends NO_DATA (or ERROR)


# Restarts and OOMKills are events, not noisy measurements: one failing poll of these checks is a confirmed failure.
# At the plan defaults an event stays visible in a query window for fewer polls than `breaches_to_fail`
# (safety review, finding 11): waiting for N polls in a row let two OOMKills pass a soak.
EVENT_CHECKS = ("restarts", "oom_killed")


class GateStatus(StrEnum):
    PENDING = "pending"
    PASS = "pass"
    FAIL = "fail"              # a confirmed breach: N consecutive failing polls of one check
    NO_DATA = "no_data"        # deadline reached while waiting for data
    ERROR = "error"            # deadline reached while Prometheus kept failing
    INCONCLUSIVE = "inconclusive"  # deadline reached with breaches not (yet) confirmed


@dataclass(frozen=True)
class CheckPolicy:
    on_no_data: OnMissing = OnMissing.WAIT
    on_error: OnMissing = OnMissing.WAIT

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_no_data", OnMissing(self.on_no_data))
        object.__setattr__(self, "on_error", OnMissing(self.on_error))

    def to_dict(self) -> dict[str, str]:
        return {"on_no_data": self.on_no_data.value, "on_error": self.on_error.value}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> CheckPolicy:
        return cls(OnMissing(data.get("on_no_data", "wait")), OnMissing(data.get("on_error", "wait")))


@dataclass(frozen=True)
class GatePolicy:
    """N consecutive failing polls of one check confirm a FAIL; K consecutive all-pass polls confirm a PASS.

    `checks` overrides `default` by check name; "caller_success_rate" also covers "caller_success_rate[ns/x]".
    `deadline` (epoch seconds) ends the waiting; None waits as long as the caller keeps polling.
    A FAIL verdict of a check in `confirm_at_once` is confirmed by that one poll (no data or errors of it are not).
    """

    breaches_to_fail: int = 3
    passes_to_pass: int = 1
    deadline: float | None = None
    default: CheckPolicy = field(default_factory=CheckPolicy)
    checks: dict[str, CheckPolicy] = field(default_factory=dict)
    confirm_at_once: tuple[str, ...] = EVENT_CHECKS

    def __post_init__(self) -> None:
        if self.breaches_to_fail < 1 or self.passes_to_pass < 1:
            raise ValueError("gate policy: breaches_to_fail and passes_to_pass must be >= 1")

    def for_check(self, check: str) -> CheckPolicy:
        return self.checks.get(check) or self.checks.get(check.split("[", 1)[0]) or self.default

    def to_dict(self) -> dict[str, Any]:
        return {"breaches_to_fail": self.breaches_to_fail, "passes_to_pass": self.passes_to_pass,
                "deadline": self.deadline, "default": self.default.to_dict(),
                "checks": {k: v.to_dict() for k, v in self.checks.items()},
                "confirm_at_once": list(self.confirm_at_once)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatePolicy:
        return cls(int(data.get("breaches_to_fail", 3)), int(data.get("passes_to_pass", 1)), data.get("deadline"),
                   CheckPolicy.from_dict(data.get("default") or {}),
                   {k: CheckPolicy.from_dict(v) for k, v in (data.get("checks") or {}).items()},
                   tuple(data.get("confirm_at_once", EVENT_CHECKS)))


@dataclass
class GateResult:
    status: GateStatus
    reason: str
    polls: int
    failed: list[str] = field(default_factory=list)     # checks with a confirmed breach
    breaching: dict[str, int] = field(default_factory=dict)  # unconfirmed: check -> consecutive breaches
    no_data: list[str] = field(default_factory=list)    # checks whose latest verdict is no_data
    errors: list[str] = field(default_factory=list)     # checks whose latest verdict is error
    verdicts: list[Verdict] = field(default_factory=list)  # the latest poll

    @property
    def decided(self) -> bool:
        return self.status is not GateStatus.PENDING

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status.value, "reason": self.reason, "polls": self.polls, "failed": list(self.failed),
                "breaching": dict(self.breaching), "no_data": list(self.no_data), "errors": list(self.errors),
                "verdicts": [v.to_dict() for v in self.verdicts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateResult:
        return cls(GateStatus(data["status"]), data["reason"], int(data["polls"]), list(data.get("failed") or []),
                   dict(data.get("breaching") or {}), list(data.get("no_data") or []), list(data.get("errors") or []),
                   [Verdict.from_dict(v) for v in data.get("verdicts") or []])


@dataclass
class BreachTracker:
    """Feed it each poll's verdicts; it decides. Its whole state goes through to_dict/from_dict between polls.

    Every verdict seen is kept in `history` (without its queries, which every poll repeats), the oldest
    dropped beyond `max_history`. Once decided, the decision is sticky.
    """

    policy: GatePolicy = field(default_factory=GatePolicy)
    polls: int = 0
    breaches: dict[str, int] = field(default_factory=dict)
    passes: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0
    max_history: int = 2000
    result: GateResult | None = None

    def feed(self, verdicts: Sequence[Verdict], now: float | None = None) -> GateResult:
        if self.result is not None and self.result.decided:
            return self.result
        now = time.time() if now is None else now
        self.polls += 1
        self._record(verdicts)
        effective = {v.check: self._effective(v) for v in verdicts}
        self.breaches = {c: self.breaches.get(c, 0) + 1 for c, e in effective.items() if e == "breach"}
        all_pass = bool(effective) and all(e == "pass" for e in effective.values())
        self.passes = self.passes + 1 if all_pass else 0
        self.result = self._decide(list(verdicts), effective, now)
        return self.result

    def _effective(self, verdict: Verdict) -> str:
        """pass, breach or wait, after the check's policy for no_data and error."""
        if verdict.outcome is Outcome.PASS:
            return "pass"
        if verdict.outcome is Outcome.FAIL:
            return "breach"
        policy = self.policy.for_check(verdict.check)
        rule = policy.on_no_data if verdict.outcome is Outcome.NO_DATA else policy.on_error
        return {OnMissing.FAIL: "breach", OnMissing.PASS: "pass", OnMissing.WAIT: "wait"}[rule]

    def _events(self, verdicts: list[Verdict]) -> set[str]:
        """Event checks that failed in this poll: confirmed without waiting for more polls."""
        return {v.check for v in verdicts if v.outcome is Outcome.FAIL and v.check in self.policy.confirm_at_once}

    def _decide(self, verdicts: list[Verdict], effective: dict[str, str], now: float) -> GateResult:
        n = self.policy.breaches_to_fail
        events = self._events(verdicts)
        failed = sorted({c for c, count in self.breaches.items() if count >= n} | events)
        result = GateResult(GateStatus.PENDING, "", self.polls, failed,
                            {c: k for c, k in self.breaches.items() if k < n and c not in events},
                            sorted(v.check for v in verdicts if v.outcome is Outcome.NO_DATA),
                            sorted(v.check for v in verdicts if v.outcome is Outcome.ERROR), verdicts)
        by_check = {v.check: v for v in verdicts}
        if failed:
            result.status = GateStatus.FAIL
            result.reason = "; ".join(f"{c}: {by_check[c].reason} "
                                      f"({'an event: confirmed at once' if c in events else f'{n} polls in a row'})"
                                      for c in failed)
        elif self.passes >= self.policy.passes_to_pass:
            result.status = GateStatus.PASS
            result.reason = f"all {len(verdicts)} checks passed {self.passes} poll(s) in a row"
        elif not verdicts:
            result.reason = "no verdicts in this poll"
        else:
            result.reason = self._pending_reason(by_check, effective)
        if not result.decided and self.policy.deadline is not None and now >= self.policy.deadline:
            self._at_deadline(result)
        return result

    def _pending_reason(self, by_check: dict[str, Verdict], effective: dict[str, str]) -> str:
        open_checks = [c for c, e in effective.items() if e != "pass"]
        if not open_checks:
            return f"passing, {self.passes}/{self.policy.passes_to_pass} polls in a row"
        parts = []
        for c in open_checks:
            v = by_check[c]
            count = f" {self.breaches[c]}/{self.policy.breaches_to_fail}" if c in self.breaches else ""
            parts.append(f"{c}: {v.outcome.value}{count}: {v.reason}")
        return "pending: " + "; ".join(parts)

    def _at_deadline(self, result: GateResult) -> None:
        if result.breaching:
            result.status = GateStatus.INCONCLUSIVE
            listed = ", ".join(f"{c} failed {k}x in a row" for c, k in sorted(result.breaching.items()))
            result.reason = f"deadline reached with unconfirmed breaches ({listed}; {self.policy.breaches_to_fail} " \
                            "needed)"
        elif result.errors:
            result.status = GateStatus.ERROR
            result.reason = (f"deadline reached, Prometheus still failing for {', '.join(result.errors)}: "
                             f"{result.reason}")
        elif result.no_data or not result.verdicts:
            result.status = GateStatus.NO_DATA
            result.reason = f"deadline reached without data for {', '.join(result.no_data) or 'any check'}: " \
                            f"{result.reason}"
        else:  # all pass but fewer than K polls in a row
            result.status = GateStatus.INCONCLUSIVE
            result.reason = f"deadline reached before {self.policy.passes_to_pass} passing polls in a row " \
                            f"({self.passes})"

    def _record(self, verdicts: Sequence[Verdict]) -> None:
        for v in verdicts:
            self.history.append({"poll": self.polls, "at": v.at, "check": v.check, "outcome": v.outcome.value,
                                 "values": _encode(v.values), "reason": v.reason})
        excess = len(self.history) - self.max_history
        if excess > 0:
            del self.history[:excess]
            self.dropped += excess

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "polls": self.polls, "breaches": dict(self.breaches),
                "passes": self.passes, "history": list(self.history), "dropped": self.dropped,
                "max_history": self.max_history, "result": self.result.to_dict() if self.result else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BreachTracker:
        return cls(GatePolicy.from_dict(data.get("policy") or {}), int(data.get("polls", 0)),
                   {k: int(v) for k, v in (data.get("breaches") or {}).items()}, int(data.get("passes", 0)),
                   list(data.get("history") or []), int(data.get("dropped", 0)), int(data.get("max_history", 2000)),
                   GateResult.from_dict(data["result"]) if data.get("result") else None)


Gate = BreachTracker  # the name the design uses


def decode_values(values: dict[str, Any]) -> dict[str, Any]:
    """Values of a history entry back to floats ("NaN" -> nan)."""
    return _decode(values)
