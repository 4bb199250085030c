"""The proposer's ordering on hand-built call graphs (issue 16): cycles in one wave, STRICT only when every caller is
meshed in the same or an earlier wave, the pilot first."""

from __future__ import annotations

from meshwave.propose.order import OrderInput, components, order


def waves_of(result) -> list[list[str]]:
    return [[s.key for s in wave] for wave in result]


def flags(result) -> dict[str, tuple[bool, str]]:
    return {s.key: (s.strict, s.reason) for wave in result for s in wave}


def test_strongly_connected_services_are_one_component() -> None:
    callers = {"b": ["a", "c"], "c": ["b"], "d": ["c"]}
    assert sorted(components(["a", "b", "c", "d"], callers)) == [("a",), ("b", "c"), ("d",)]


def test_a_cycle_goes_in_one_wave_and_can_be_strict_together() -> None:
    data = OrderInput(services={"gw-called": "low", "b": "medium", "c": "medium", "d": "medium"},
                      callers={"gw-called": {"gateway": 5}, "b": {"gw-called": 5, "c": 1}, "c": {"b": 5},
                               "d": {"c": 2}},
                      meshed=frozenset({"gateway"}), max_wave=2, max_batch=1)
    result = order(data)
    assert waves_of(result) == [["gw-called"], ["b", "c"], ["d"]]
    assert all(strict for strict, _ in flags(result).values())


def test_callers_come_first_and_an_unmeshable_caller_keeps_its_callee_permissive() -> None:
    data = OrderInput(services={"front": "medium", "back": "low", "ledger": "high"},
                      callers={"front": {"gateway": 10}, "back": {"front": 10}, "ledger": {"back": 3, "user": 2}},
                      meshed=frozenset({"gateway"}), unmeshable={"user": "not traced"}, max_wave=5, max_batch=3)
    result = order(data)
    assert waves_of(result) == [["front", "back"], ["ledger"]]  # the pilot takes no high service while others wait
    strict, reason = flags(result)["ledger"]
    assert not strict and reason == "callers that stay without a sidecar: user (not traced), 2/s"
    assert flags(result)["back"] == (True, "")


def test_the_pilot_is_one_batch_of_the_least_critical_lowest_fan_in_services() -> None:
    services = {"a": "critical", "b": "low", "c": "low", "d": "medium", "e": "low"}
    callers = {k: {"gateway": 1.0} for k in services} | {"c": {"gateway": 1.0, "x": 1.0}}
    result = order(OrderInput(services=services, callers=callers, meshed=frozenset({"gateway", "x"}), max_wave=10,
                              max_batch=2))
    assert waves_of(result) == [["b", "e"], ["c", "d", "a"]]


def test_idle_services_go_last_and_permissive_unless_told_otherwise() -> None:
    data = OrderInput(services={"a": "medium", "quiet": "low"}, callers={"a": {"gateway": 1.0}},
                      meshed=frozenset({"gateway"}), idle=frozenset({"quiet"}), max_wave=5, max_batch=5)
    result = order(data)
    assert waves_of(result) == [["a"], ["quiet"]]
    assert flags(result)["quiet"] == (False, "no observed traffic in the lookback: nothing shows who calls it")
    told = order(OrderInput(**{**data.__dict__, "idle_last": False}))
    assert waves_of(told) == [["quiet", "a"]] and flags(told)["quiet"] == (True, "")


def test_waves_never_exceed_max_wave_except_for_one_cycle_larger_than_a_wave() -> None:
    ring = {"r1": {"r3": 1.0, "gateway": 1.0}, "r2": {"r1": 1.0}, "r3": {"r2": 1.0}}
    data = OrderInput(services={"r1": "low", "r2": "low", "r3": "low", "z": "low"},
                      callers=ring | {"z": {"gateway": 1.0}}, meshed=frozenset({"gateway"}), max_wave=2, max_batch=2)
    result = waves_of(order(data))
    assert result == [["z"], ["r1", "r2", "r3"]]
