"""One enum of service outcomes (issue 15, item 3): which are red, which count against the failure budget, which
stop the next wave; and the report counts every one of them."""

from __future__ import annotations

from meshwave import report
from meshwave.outcomes import ServiceOutcome as O
from meshwave.record import ServiceRecord


def test_what_each_outcome_means_for_the_run_the_wave_and_the_next_wave() -> None:
    assert {o for o in O if o.red} == {O.ROLLED_BACK, O.BLOCKED, O.FAILED, O.HELD}
    assert {o for o in O if o.against_budget} == {O.ROLLED_BACK, O.FAILED, O.HELD}
    assert {o for o in O if o.fails_wave} == {O.FAILED, O.HELD}
    assert {o for o in O if not o.attempted} == {O.SKIPPED, O.PLANNED, O.FROZEN}
    assert {o for o in O if not o.settled} == {O.FAILED, O.PLANNED}
    assert {o for o in O if o.undone} == {O.PERMISSIVE, O.REMOVED, O.SKIPPED}
    assert O.STRICT == "strict" and O("rolled_back") is O.ROLLED_BACK, "records keep plain strings"


def test_the_report_counts_every_outcome_frozen_and_cleared_included() -> None:
    """The report's own list of outcomes left out `frozen` and `cleared`: a wave frozen by the red button
    summarised as if those services did not exist."""
    records = [ServiceRecord(service=f"s{i}", outcome=o.value, reason="") for i, o in enumerate(O)]
    counts = report.summary(report.report_frame(records))
    assert counts == {o.value: 1 for o in O}
    assert list(counts) == [o.value for o in O], "in the enum's (the report's) order"
