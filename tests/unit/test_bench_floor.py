"""The no-op floor benchmark (bench/floor.py, issue 15): the runs alternate, and the plugins-folder / empty-folder
ratio and whether it meets its target come from the measured runs."""

from __future__ import annotations

import pytest

from bench.floor import EMPTY, PLUGINS, order, summary


def run(config: str, seconds: float, state: str = "success") -> dict[str, object]:
    return {"config": config, "seconds_per_task_run": seconds, "state": state}


def test_the_configurations_alternate_one_pair_after_the_other() -> None:
    assert order(2) == [PLUGINS, EMPTY, PLUGINS, EMPTY]
    assert order(3).count(PLUGINS) == order(3).count(EMPTY) == 3
    assert order(2, first=EMPTY) == [EMPTY, PLUGINS, EMPTY, PLUGINS]


def test_the_ratio_is_of_the_medians_and_meets_the_target_at_ten_percent_at_most() -> None:
    runs = [run(PLUGINS, 0.33), run(EMPTY, 0.30), run(PLUGINS, 0.90), run(EMPTY, 0.31), run(PLUGINS, 0.32),
            run(EMPTY, 0.29)]
    s = summary(runs)
    assert s["per_run"] == {PLUGINS: [0.33, 0.90, 0.32], EMPTY: [0.30, 0.31, 0.29]}
    assert s["median"] == {PLUGINS: 0.33, EMPTY: 0.30}, "one slow run does not move a median of three"
    assert s["ratio"] == 1.1 and s["met"]
    assert not summary([run(PLUGINS, 0.34), run(EMPTY, 0.30)])["met"]  # 1.133


def test_a_failed_run_fails_the_target_whatever_the_ratio() -> None:
    s = summary([run(PLUGINS, 0.30, "failed"), run(EMPTY, 0.30)])
    assert s["ratio"] == 1.0 and not s["all_succeeded"] and not s["met"]


def test_both_configurations_need_a_run() -> None:
    with pytest.raises(ValueError, match="both configurations"):
        summary([run(PLUGINS, 0.30)])
