"""What every benchmark shares: figures, machine facts, and printing the one JSON line the runner reads."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
PY = ".venv/bin/python"
RESULT_PREFIX = "BENCH-RESULT "


@dataclass
class Figure:
    """One measured figure, its target, and the command that re-runs the benchmark that measured it."""

    item: str
    name: str
    value: float | int | str | None
    unit: str
    target: str = ""
    passed: bool | None = None  # None: no target, informational
    command: str = ""
    load: list[float] = field(default_factory=list)  # 1, 5, 15 min load average when measured
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": sys.version.split()[0], "platform": platform.platform(), "load_average": load_average(),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def emit(figures: list[Figure], **extra: Any) -> None:
    """The line the runner (bench/run.py) parses; the rest of stdout is for people."""
    print(RESULT_PREFIX + json.dumps({"figures": [f.to_dict() for f in figures], **extra}), flush=True)


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')} load {' '.join(map(str, load_average()))}] {message}",
          file=sys.stderr, flush=True)
