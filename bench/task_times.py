"""Where a run's worker-slot time goes, task by task, from its task logs (Airflow writes one JSON event per line).

Each task process logs "::group::Pre Execute" when it starts, "Worker startup parse complete" with the DAG file's parse
time, "::endgroup::" when the task's own code begins, and its last line when it hands the slot back (done, deferred or
failed). A trigger that ends its task writes to a file of its own (`*.trigger.*.log`), which holds no slot and is left
out. Per task: the process starts, the seconds before the task's code (the runner, the parse) and the seconds in it.

    .venv/bin/python -m bench.task_times LOGS_DIR   (a run's folder under Airflow's logs, or a parent of it)
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

START, PARSED, CODE = "::group::Pre Execute", "Worker startup parse complete", "::endgroup::"


@dataclass
class Segment:
    """One task process: when it started, the DAG file's parse, when the task's code began, its last line."""

    start: float
    parse_seconds: float = 0.0
    code: float | None = None
    last: float = 0.0

    @property
    def before_code(self) -> float:
        return (self.code or self.last) - self.start

    @property
    def in_code(self) -> float:
        return self.last - (self.code or self.last)


@dataclass
class TaskTimes:
    runs: int = 0
    parse: float = 0.0
    before_code: float = 0.0
    in_code: float = 0.0
    segments: list[Segment] = field(default_factory=list)

    def add(self, s: Segment) -> None:
        self.runs += 1
        self.parse += s.parse_seconds
        self.before_code += s.before_code
        self.in_code += s.in_code

    def row(self) -> dict[str, float]:
        n = max(self.runs, 1)
        return {"runs": self.runs, "parse_mean": round(self.parse / n, 2),
                "before_code_mean": round(self.before_code / n, 2), "in_code_mean": round(self.in_code / n, 2),
                "slot_seconds": round(self.before_code + self.in_code, 1)}


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def segments(log: Path) -> list[Segment]:
    """The task processes one attempt's log holds (a deferred task that resumes on a worker has two)."""
    found: list[Segment] = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
            at = _stamp(event["timestamp"])
        except (ValueError, KeyError, TypeError):
            continue
        text = event.get("event")
        if text == START:
            found.append(Segment(start=at, last=at))
            continue
        if not found:
            continue
        current = found[-1]
        if text == PARSED:
            current.parse_seconds = float(event.get("dag_file_parse_ms") or 0) / 1000
        elif text == CODE and current.code is None:
            current.code = at
        current.last = at
    return found


def task_of(log: Path) -> str:
    """The task's own id (the last part of a task group's id) from the log's path."""
    match = re.search(r"task_id=([^/]+)", str(log))
    return match.group(1).rsplit(".", 1)[-1] if match else "?"


def by_task(logs: Path) -> dict[str, dict[str, float]]:
    tasks: dict[str, TaskTimes] = defaultdict(TaskTimes)
    for log in sorted(logs.rglob("attempt=*.log")):  # not attempt=N.log.trigger.M.log: a trigger holds no slot
        for s in segments(log):
            tasks[task_of(log)].add(s)
    return {task: t.row() for task, t in sorted(tasks.items())}


def main() -> None:
    rows = by_task(Path(sys.argv[1]))
    for task, row in rows.items():
        print(f"{task:22s} {json.dumps(row)}")
    total = sum(r["slot_seconds"] for r in rows.values())
    print(f"worker-slot seconds in all: {total:.0f} over {sum(r['runs'] for r in rows.values())} task processes")


if __name__ == "__main__":
    main()
