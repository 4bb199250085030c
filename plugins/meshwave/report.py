"""The wave report: one row per service (outcome, reason, baseline vs after, step durations), built with pandas."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from airflow.sdk import ObjectStoragePath

from meshwave.outcomes import ServiceOutcome
from meshwave.record import ServiceRecord

log = logging.getLogger(__name__)

COLUMNS = ["service", "batch", "outcome", "mtls", "sidecar", "reason", "plaintext_callers", "approval",
           "success_before", "success_after", "p99_before_ms", "p99_after_ms", "changes", "seconds"]


def _value(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def report_frame(records: Sequence[ServiceRecord]) -> pd.DataFrame:
    """One row per service, in plan order."""
    rows = []
    for r in records:
        rows.append({
            "service": r.service,
            "batch": r.batch,
            "outcome": r.outcome.value,  # a plain string in the table and the CSV
            "mtls": r.mtls or "-",
            "sidecar": "yes" if r.sidecar else "no",
            "reason": r.reason,
            "plaintext_callers": ", ".join(r.plaintext_callers) or "-",
            "approval": r.approval.describe() if r.approval is not None else "-",
            "success_before": _value(r.baseline.success_rate),
            "success_after": _value(r.after.success_rate),
            "p99_before_ms": _value(r.baseline.p99_ms),
            "p99_after_ms": _value(r.after.p99_ms),
            "changes": sum(1 for c in r.changes if c.get("applied")),
            "seconds": round(sum(r.steps.values()), 1),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(frame: pd.DataFrame) -> dict[str, int]:
    counts = frame["outcome"].value_counts().to_dict() if not frame.empty else {}
    return {str(k): int(counts[k]) for k in ServiceOutcome if counts.get(k)}  # in the enum's order


def _pair(before: float | None, after: float | None, digits: int) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None or pd.isna(v) else f"{v:.{digits}f}"

    return f"{fmt(before)} -> {fmt(after)}"


def render(frame: pd.DataFrame) -> str:
    """The table as it appears in the task log and `make demo`: the numbers, then why, per service."""
    if frame.empty:
        return "no services"
    table = pd.DataFrame({
        "service": frame["service"], "batch": frame["batch"], "outcome": frame["outcome"], "mTLS": frame["mtls"],
        "sidecar": frame["sidecar"], **({"approval": frame["approval"]} if (frame["approval"] != "-").any() else {}),
        "success": [_pair(b, a, 3) for b, a in zip(frame["success_before"], frame["success_after"], strict=True)],
        "p99 ms": [_pair(b, a, 0) for b, a in zip(frame["p99_before_ms"], frame["p99_after_ms"], strict=True)],
        "changes": frame["changes"], "seconds": frame["seconds"],
    }).to_string(index=False)
    reasons = "\n".join(f"  {row.service}: {row.reason}" for row in frame.itertuples())
    counts = ", ".join(f"{n} {k}" for k, n in summary(frame).items())
    return f"{table}\n\nwhy:\n{reasons}\n\n{len(frame)} services: {counts}"


def report_dir() -> ObjectStoragePath:
    """MESHWAVE_REPORT_DIR: a local folder (by default $AIRFLOW_HOME/meshwave-reports), or object storage as a URL,
    `s3://bucket/prefix`, `gs://bucket/prefix`, the Airflow connection to reach it by as the URL's user
    (`s3://aws_default@bucket/prefix`). Airflow knows a scheme from the provider that registers its filesystem
    (apache-airflow-providers-amazon for s3, -google for gs): installed wherever reports are written or served (the
    workers, the api-server); meshwave itself adds none. Object storage lets them share reports without a shared
    disk."""
    default = Path(os.environ.get("AIRFLOW_HOME", ".")) / "meshwave-reports"
    return ObjectStoragePath(os.environ.get("MESHWAVE_REPORT_DIR", str(default)))


def report_base(dag_id: str, run_id: str) -> ObjectStoragePath:
    """`<report dir>/<dag_id>/<run_id>`, the run id's characters other than letters, digits and `-_.` as `_` (a
    manual run's id holds `:` and `+`); `save` adds the suffixes."""
    safe_run = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_id)
    return report_dir() / dag_id / safe_run


def save(frame: pd.DataFrame, records: Sequence[ServiceRecord], dag_id: str, run_id: str) -> ObjectStoragePath:
    """Write `<dag_id>/<run_id>.csv` (the table), `.json` (everything seen, the ledger) and `.png` (the chart, see
    `chart_of`) under the report dir; returns the CSV's path."""
    base = report_base(dag_id, run_id)
    base.parent.mkdir(parents=True, exist_ok=True)  # object storage has no folders: nothing to do there
    with base.with_suffix(".csv").open("w", encoding="utf-8") as f:
        frame.to_csv(f, index=False)
    # the records as the outcome tasks pushed them (plain JSON)
    with base.with_suffix(".json").open("w", encoding="utf-8") as f:
        f.write(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
    _save_chart(records, base.with_suffix(".png"), f"{dag_id}  {run_id}")  # last: the CSV and JSON are the record
    return base.with_suffix(".csv")


def chart_of(report: ObjectStoragePath) -> ObjectStoragePath | None:
    """The chart `save` wrote beside the report at `report` (its CSV); None when it drew none: no services, or the
    drawing failed (the task log says why)."""
    chart = report.with_suffix(".png")
    return chart if chart.is_file() else None


def _save_chart(records: Sequence[ServiceRecord], path: ObjectStoragePath, title: str) -> ObjectStoragePath | None:
    """The chart, or None. A chart is a picture of the record, not the record: whatever breaks in drawing it
    (matplotlib, a font, the disk) is logged and the report goes on."""
    path.unlink(missing_ok=True)  # an earlier try's chart of this run is not this report's
    try:
        from meshwave import charts  # matplotlib: only when a report is written

        return charts.write(records, path, title)
    except Exception:
        log.exception("the report's chart %s was not drawn; the CSV and JSON beside it are complete", path)
        path.unlink(missing_ok=True)  # half a file is no chart
        return None
