"""The test harness's trigger: a 500 from a busy API is not taken for a failed trigger, nor sent twice blindly."""

from __future__ import annotations

import io
import time
import urllib.error
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meshstack.process import AirflowProcess


def busy() -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://127.0.0.1/api/v2/dags/d/dagRuns", 500, "Internal Server Error", {},
                                  io.BytesIO(b"database is locked"))


class Api:
    def __init__(self, posts: list[Any], made: list[dict]) -> None:
        self.posts, self.made, self.calls = posts, made, []

    def __call__(self, method: str, path: str, body: Any = None) -> Any:
        self.calls.append(method)
        if method == "POST":
            answer = self.posts.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return {"dag_runs": self.made}


@pytest.fixture
def airflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AirflowProcess:
    monkeypatch.setattr(time, "sleep", lambda _: None)
    return AirflowProcess(tmp_path, {})


def test_a_500_whose_run_was_made_anyway_takes_that_run(airflow: AirflowProcess) -> None:
    now = datetime.now(UTC).isoformat()
    api = Api([busy()], [{"dag_run_id": "manual__x", "run_type": "manual", "conf": {"a": 1}, "run_after": now}])
    airflow.api = api  # type: ignore[method-assign]
    assert airflow.trigger("d", {"a": 1}) == "manual__x" and api.calls == ["POST", "GET"]


def test_a_500_with_no_run_made_is_sent_again_and_a_third_500_raises(airflow: AirflowProcess) -> None:
    old = "2020-01-01T00:00:00+00:00"  # an earlier run of the DAG is not this trigger's
    api = Api([busy(), {"dag_run_id": "manual__y"}], [{"dag_run_id": "old", "run_type": "manual", "conf": {},
                                                       "run_after": old}])
    airflow.api = api  # type: ignore[method-assign]
    assert airflow.trigger("d") == "manual__y" and api.calls == ["POST", "GET", "POST"]
    airflow.api = Api([busy(), busy(), busy()], [])  # type: ignore[method-assign]
    with pytest.raises(urllib.error.HTTPError):
        airflow.trigger("d")
