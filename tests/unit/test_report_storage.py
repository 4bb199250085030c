"""The report dir is an ObjectStoragePath: a local folder by default, written as before (the same files, the same
bytes, the same path in the task log), or object storage from MESHWAVE_REPORT_DIR (s3://, gs://), written and served
through the path's own filesystem. fsspec's in-memory filesystem stands in for a bucket (no provider needed)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from meshwave import report
from tests.unit.test_report_charts import wave

DAG = "meshwave_shop_mesh_wave_1"


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """memory://<unique>: registered as Airflow registers a provider's filesystem, emptied afterwards."""
    from airflow.sdk.io import attach

    attach("memory", fs=MemoryFileSystem())
    root = f"reports-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MESHWAVE_REPORT_DIR", f"memory://{root}")
    yield root
    MemoryFileSystem().rm(f"/{root}", recursive=True)


def test_the_default_local_folder_gets_the_same_files_as_before(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHWAVE_REPORT_DIR", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    records = wave()
    frame = report.report_frame(records)
    path = report.save(frame, records, DAG, "manual__2026-01-01T00:00:00+00:00")
    on_disk = tmp_path / "meshwave-reports" / DAG / "manual__2026-01-01T00_00_00_00_00.csv"
    assert str(path) == str(on_disk), "the task log's 'report saved to' and the report task's XCom: a plain path"
    assert on_disk.read_text() == frame.to_csv(index=False)
    assert json.loads(on_disk.with_suffix(".json").read_text()) == [r.model_dump(mode="json") for r in records]
    assert on_disk.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(report.chart_of(path)) == str(on_disk.with_suffix(".png"))


def test_object_storage_gets_the_csv_the_json_and_the_chart(bucket: str) -> None:
    records = wave()
    path = report.save(report.report_frame(records), records, DAG, "manual__1")
    assert (path.protocol, path.path) == ("memory", f"/{bucket}/{DAG}/manual__1.csv")
    store = MemoryFileSystem()
    assert store.cat(f"/{bucket}/{DAG}/manual__1.csv").decode().splitlines()[0] == ",".join(report.COLUMNS)
    assert json.loads(store.cat(f"/{bucket}/{DAG}/manual__1.json")) == [r.model_dump(mode="json") for r in records]
    chart = report.chart_of(path)
    assert chart is not None and store.cat(chart.path)[:4] == b"\x89PNG"


def test_a_chart_that_breaks_in_object_storage_leaves_none_behind(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshwave import charts

    def broken(_records: Any, path: Any, _title: str) -> None:
        with path.open("wb") as f:
            f.write(b"half a ")
        raise RuntimeError("no font today")

    monkeypatch.setattr(charts, "write", broken)
    path = report.save(report.report_frame(wave()), wave(), DAG, "manual__1")
    assert report.chart_of(path) is None and path.is_file()


def _serve(monkeypatch: pytest.MonkeyPatch, run_file: str) -> Any:
    from meshwave.ui import app

    monkeypatch.setattr(app, "_readable", lambda _user: {DAG})
    return app.report_file(DAG, run_file, user=None)  # type: ignore[arg-type]


def test_the_page_serves_a_local_report_from_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.responses import FileResponse

    monkeypatch.setenv("MESHWAVE_REPORT_DIR", str(tmp_path))
    report.save(report.report_frame(wave()), wave(), DAG, "manual__1")
    served = _serve(monkeypatch, "manual__1.csv")
    assert isinstance(served, FileResponse) and served.path == str(tmp_path / DAG / "manual__1.csv")
    assert served.media_type == "text/csv"


def test_the_page_serves_a_report_from_object_storage(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    report.save(report.report_frame(wave()), wave(), DAG, "manual__1")
    served = _serve(monkeypatch, "manual__1.png")
    assert served.media_type == "image/png" and served.body[:4] == b"\x89PNG"
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as missing:
        _serve(monkeypatch, "manual__2.csv")
    assert missing.value.status_code == 404
