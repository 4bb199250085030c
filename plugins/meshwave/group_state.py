"""What a service's tasks left behind, as the steps they ran: read by the group's checks and by its outcome.

A task of the service group runs one or more steps in order (TASKS): `inject` writes the sidecar and then waits
for the rollout in the triggerer, which ends the task. Each step's result is an XCom of its task under the step's
name (a model of results.py, as JSON); a step that raised left a results.StepError under "error". The decisions
(decisions.py) read steps, not tasks: a step's state is derived from its task's state and the results it left
(`step_states`)."""

from __future__ import annotations

import json
from typing import Any

from meshwave import decisions
from meshwave.record import ApprovalRecord
from meshwave.results import StepError, StepResults
from meshwave.steps import Service

# The group's tasks and the steps each runs, in order.
TASKS: dict[str, tuple[str, ...]] = {
    "admit": ("admit", "preflight", "baseline"),
    "canary": ("canary", "wait_canary"),
    "canary_soak": ("canary_soak",),
    "remove_canary": ("remove_canary",),
    "inject": ("inject", "wait_rollout"),
    "soak": ("soak",),
    "strict_gate": ("strict_gate",),
    "flip_strict": ("flip_strict", "verify_strict"),
    "back_to_permissive": ("back_to_permissive", "verify_recovery"),
    "rollback_injection": ("rollback_injection", "wait_rollback"),
}
CANARY_TASKS = ("canary", "canary_soak", "remove_canary")  # only in a group where some service tries a canary
TASK_OF = {step: task for task, steps in TASKS.items() for step in steps}
# The decisions after admit, and the task that makes each: a wait decides what follows it when it ends.
DECIDED_BY = {"after_canary_rollout": "canary", "after_canary": "canary_soak",
              "after_rollout": "inject", "after_soak": "soak", "after_strict_gate": "strict_gate",
              "after_approval": "flip_strict", "after_strict": "back_to_permissive"}
# Task states in which a task may have left results or an error.
_LEFT_SOMETHING = ("success", "failed", "up_for_retry", "skipped")


def step_states(task_state: str | None, steps: tuple[str, ...], done: set[str]) -> dict[str, str | None]:
    """Each step's state: `success` when it left its result; the first step that did not takes its task's state
    (`skipped` when the task succeeded without it: not needed); the steps after that never ran (None)."""
    states: dict[str, str | None] = {}
    stopped = False
    for step in steps:
        if step in done:
            states[step] = "success"
        elif not stopped:
            stopped = True
            states[step] = "skipped" if task_state == "success" else task_state
        else:
            states[step] = None
    return states


def decoded(value: Any) -> Any:
    """An XCom the triggerer pushed, as the worker's would read. Airflow 3.3.2 stores the XComs a trigger ends its
    task with (TaskSuccessEvent(xcoms=...)) JSON-encoded once more than a worker's (models/trigger.py pushes them
    through TaskInstance.xcom_push -> XComModel.set, which serializes a value the JSON column encodes again), so the
    Task SDK reads back a string. Nothing of the group is pushed as a string: a string is that encoding."""
    return json.loads(value) if isinstance(value, str) else value


def pull(context: dict[str, Any], prefix: str, task: str, key: str) -> Any:
    """What `task` of this service (the caller's own map index) pushed under `key`."""
    ti = context["ti"]
    return decoded(ti.xcom_pull(task_ids=f"{prefix}.{task}", key=key, map_indexes=ti.map_index))


def decision(context: dict[str, Any], prefix: str, task: str) -> decisions.Decision | None:
    """The decision `task` of this service pushed, if it made one."""
    found = pull(context, prefix, task, "decision")
    return decisions.Decision.model_validate(found) if found else None


def results_of(context: dict[str, Any], prefix: str, *steps: str) -> StepResults:
    """The results the named steps of this service left (a step that left none: None), validated once."""
    pulled = {step: pull(context, prefix, TASK_OF[step], step) for step in steps}
    return StepResults.model_validate(pulled)


class GroupState:
    """The states first, in one request; then only the XComs that can exist. Every pull is a round trip to the API
    server (a deciding task once spent 11 s on 34 of them on a loaded 2-core machine)."""

    def __init__(self, context: dict[str, Any], prefix: str) -> None:
        ti = context["ti"]
        found = ti.get_task_states(dag_id=ti.dag_id, task_group_id=prefix, map_index=ti.map_index,
                                   run_ids=[ti.run_id]).get(ti.run_id, {})
        # a mapped task instance's state comes keyed "<group>.<task>_<map index>"
        self.tasks = {tid.removeprefix(f"{prefix}.").removesuffix(f"_{ti.map_index}"): st for tid, st in found.items()}
        pulled: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.states: dict[str, str | None] = {}
        admitted = None
        for task, steps in TASKS.items():
            state = self.tasks.get(task)
            if state in _LEFT_SOMETHING:
                for step in steps:
                    if step != "admit" and (value := pull(context, prefix, task, step)) is not None:
                        pulled[step] = value
                if task == "admit":
                    admitted = pull(context, prefix, task, "service")
                if state != "success" and (error := pull(context, prefix, task, "error")) is not None:
                    found = StepError.model_validate(error)
                    self.errors[found.step] = found.message
            done = set(pulled) | ({"admit"} if task == "admit" and admitted else set())
            self.states.update(step_states(state, steps, done))
        self.results = StepResults.model_validate(pulled)
        self.service = Service.from_dict(admitted) if admitted else None
        self.decisions = self._decisions(context, prefix)
        self.approval = self._approval(context, prefix)

    def _decisions(self, context: dict[str, Any], prefix: str) -> dict[str, str]:
        """The decisions the tasks pushed; a wait whose task failed (its trigger crashed, its retries ran out) pushed
        none: its decision is made here, from the step states, as the wait would have made it."""
        chosen: dict[str, str] = {}
        for name, task in DECIDED_BY.items():
            if name == "after_approval" and not self._asked():
                continue  # flip_strict decides only about an approval (a pull less for every other service)
            d = decision(context, prefix, task) if self.tasks.get(task) is not None else None
            if d is None and self.tasks.get(task) == "failed":
                d = self._fallback(name)
            if d is not None:
                chosen[name], chosen[f"{name}_to"] = d.why, d.to
        return chosen

    def _asked(self) -> bool:
        """Whether flip_strict ran for a service that needed approval (and so read the batch's answer)."""
        return self.service is not None and self.service.needs_approval and self.tasks.get("flip_strict") in \
            _LEFT_SOMETHING

    def _approval(self, context: dict[str, Any], prefix: str) -> ApprovalRecord | None:
        found = pull(context, prefix, "flip_strict", "approval") if self._asked() else None
        return ApprovalRecord.model_validate(found) if found else None

    def _fallback(self, name: str) -> decisions.Decision | None:
        if name == "after_rollout":
            to, why = decisions.after_rollout(self.results, self.states, self.errors)
        elif name == "after_soak" and self.service is not None:
            to, why = decisions.after_soak(self.service, self.results, self.states)
        elif name == "after_strict_gate":
            to, why = decisions.after_strict_gate(self.results, self.states)
        else:
            return None
        return decisions.Decision(to=to, why=why)
