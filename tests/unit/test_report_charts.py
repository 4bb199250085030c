"""meshwave.charts and the report's PNG (issue 17, item 2): per service, the success rate and p99 before and after,
and a timeline of its steps, written beside the report's CSV and JSON. The tests read the Figure's artists (what is
drawn where) and open the PNG (what a person sees); a chart that breaks never costs the CSV or the JSON."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import to_hex, to_rgb
from PIL import Image

from meshwave import charts, report
from meshwave.outcomes import ServiceOutcome
from meshwave.record import ServiceRecord

FORWARD = {"preflight": 0.41, "baseline": 0.82, "inject": 0.33, "wait_rollout": 42.5, "soak": 120.2,
           "strict_gate": 30.0, "flip_strict": 0.27, "verify_strict": 120.5}
ROLLBACK = {"preflight": 0.41, "baseline": 0.82, "inject": 0.33, "wait_rollout": 42.5, "rollback_injection": 0.3,
            "wait_rollback": 34.5}


def pushed(workload: str, outcome: str, baseline: dict[str, float], after: dict[str, float],
           steps: dict[str, float], batch: int = 1) -> ServiceRecord:
    """A record as the outcome task pushes it (XCom "record", plain JSON), read back as every reader does. `after`
    carries only what the soak judged: a value not judged is absent, not null."""
    return ServiceRecord.model_validate({
        "service": f"lab/shop/{workload}", "cluster": "lab", "namespace": "shop", "workload": workload,
        "criticality": "high", "batch": batch, "action": "migrate", "baseline": baseline, "after": after,
        "changes": [], "verdicts": [], "plaintext_callers": [], "decisions": {}, "errors": {}, "steps": steps,
        "outcome": outcome, "mtls": "STRICT" if outcome == "strict" else "PERMISSIVE", "sidecar": outcome != "blocked",
        "reason": f"{outcome}: as the test says"})


def wave() -> list[ServiceRecord]:
    return [
        pushed("payment", "strict", {"success_rate": 0.998, "p99_ms": 14.2, "request_rate": 38.5},
               {"success_rate": 0.997, "p99_ms": 15.1}, FORWARD),
        pushed("cart", "rolled_back", {"success_rate": 0.995, "p99_ms": 40.0, "request_rate": 12.0}, {}, ROLLBACK),
        # a step broke after the soak judged it: red, with an after value
        pushed("auth", "failed", {"success_rate": 0.999, "p99_ms": 9.0, "request_rate": 80.0},
               {"success_rate": 0.962, "p99_ms": 31.0}, dict(FORWARD, flip_strict=3.0, verify_strict=60.0)),
        pushed("legacy", "blocked", {}, {}, {"preflight": 0.4}),
        pushed("search", "permissive", {"success_rate": 0.99, "p99_ms": 120.0, "request_rate": 5.0},
               {"success_rate": 0.992, "p99_ms": 118.0}, dict(FORWARD, flip_strict=0.0)),
        pushed("mail", "skipped", {}, {}, {}, batch=2),
    ]


def panels(fig: Any) -> tuple[Any, Any, Any]:
    rate, p99, steps = fig.axes
    return rate, p99, steps


def dots(ax: Any, gid: str) -> PathCollection:
    found = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_gid() == gid]
    assert len(found) == 1, f"one {gid} scatter"
    return found[0]


def words_at(ax: Any) -> dict[int, str]:
    """The words written in a panel, by row."""
    return {round(t.get_position()[1]): t.get_text() for t in ax.texts}


def segments(ax: Any, service: str) -> list[tuple[float, float, str]]:
    """A timeline row's segments: (start, width, colour) from the broken_barh's rectangles."""
    bars = [c for c in ax.collections if isinstance(c, PolyCollection) and c.get_gid() == f"steps:{service}"]
    assert len(bars) == 1, f"one timeline row for {service}"
    out = []
    for path, face in zip(bars[0].get_paths(), bars[0].get_facecolors(), strict=True):
        xs = path.vertices[:, 0]
        out.append((float(xs.min()), float(xs.max() - xs.min()), to_hex(face)))
    return out


def test_each_row_names_the_service_and_its_outcome_coloured_red_or_green() -> None:
    records = wave()
    fig = charts.draw(records, "meshwave_shop_mesh_wave_1  manual__1")
    rate, p99, steps = panels(fig)
    labels = rate.get_yticklabels()
    assert [t.get_text() for t in labels] == [
        "lab/shop/payment  (strict)", "lab/shop/cart  (rolled_back)", "lab/shop/auth  (failed)",
        "lab/shop/legacy  (blocked)", "lab/shop/search  (permissive)", "lab/shop/mail  (skipped)"]
    assert [to_hex(t.get_color()) for t in labels] == [charts.GREEN, charts.RED, charts.RED, charts.RED,
                                                       charts.GREEN, charts.GREEN]
    assert list(rate.get_yticks()) == list(range(6))
    for ax in (rate, p99, steps):
        assert ax.get_ylim() == (5.5, -0.5), "the rows line up across the panels, the first service at the top"
    assert "6 services: 1 strict, 1 permissive, 1 rolled_back, 1 blocked, 1 failed, 1 skipped" in fig.get_suptitle()


def test_before_and_after_are_the_records_values_and_a_missing_one_is_no_dot_but_words() -> None:
    records = wave()
    rate, p99, _ = panels(charts.draw(records, "t"))
    # rows: 0 payment, 1 cart (no after), 2 auth, 3 legacy (no data), 4 search, 5 mail (no data)
    assert dots(rate, "before").get_offsets().tolist() == [[0.998, 0], [0.995, 1], [0.999, 2], [0.99, 4]]
    assert dots(rate, "after").get_offsets().tolist() == [[0.997, 0], [0.962, 2], [0.992, 4]]
    assert dots(p99, "before").get_offsets().tolist() == [[14.2, 0], [40.0, 1], [9.0, 2], [120.0, 4]]
    assert dots(p99, "after").get_offsets().tolist() == [[15.1, 0], [31.0, 2], [118.0, 4]]
    for ax in (rate, p99):
        xs = np.concatenate([dots(ax, g).get_offsets()[:, 0] for g in ("before", "after")])
        assert (xs > 0).all(), "nothing missing is drawn as 0"
        assert words_at(ax) == {1: "no after", 3: "no data", 5: "no data"}
    after = [to_hex(c) for c in dots(rate, "after").get_facecolors()]
    assert after == [charts.GREEN, charts.RED, charts.GREEN], "the after dot in the outcome's colour"
    assert rate.get_xlim()[0] < 0.962 and rate.get_xlim()[1] > 0.999, "every value inside the panel"
    assert max(rate.get_xticks()) <= 1.0, "no success rate over 100 % on the axis"
    assert p99.get_xscale() == "linear", "9 to 120 ms: a linear axis"


def test_a_wide_p99_range_gets_a_log_axis() -> None:
    records = [pushed("fast", "strict", {"p99_ms": 3.0}, {"p99_ms": 4.0}, FORWARD),
               pushed("slow", "strict", {"p99_ms": 2500.0}, {"p99_ms": 2600.0}, FORWARD)]
    _, p99, _ = panels(charts.draw(records, "t"))
    assert p99.get_xscale() == "log"
    assert p99.get_xlim()[0] < 3.0 and p99.get_xlim()[1] > 2600.0


def test_the_timeline_lays_each_service_s_steps_end_to_end_one_colour_a_step() -> None:
    records = wave()
    fig = charts.draw(records, "t")
    _, _, steps = panels(fig)
    payment = segments(steps, "lab/shop/payment")
    assert [round(w, 6) for _, w, _ in payment] == list(FORWARD.values())
    assert [round(x, 6) for x, _, _ in payment] == [0.0, 0.41, 1.23, 1.56, 44.06, 164.26, 194.26, 194.53]
    cart = segments(steps, "lab/shop/cart")
    assert [round(w, 6) for _, w, _ in cart] == list(ROLLBACK.values())
    colour = {name: c for name, (_, _, c) in zip(FORWARD, payment, strict=True)}
    assert [c for _, _, c in cart][:4] == [colour[s] for s in ("preflight", "baseline", "inject", "wait_rollout")]
    assert len(set(colour.values())) == len(FORWARD), "one colour a step"
    assert not {charts.RED, charts.GREEN} & {c for _, _, c in payment + cart}, "red and green say outcomes only"
    assert words_at(steps) == {0: " 315 s", 1: " 79 s", 2: " 257 s", 3: " 0.4 s", 4: " 315 s", 5: "no steps"}, \
        "each row's total (the blocked one's too thin to see), and the skipped service never ran a step"
    legend = fig.legends[1]
    assert [t.get_text() for t in legend.get_texts()] == [*FORWARD, "rollback_injection", "wait_rollback"]


def test_the_png_is_what_a_person_would_see(tmp_path: Path) -> None:
    records = wave()
    fig = charts.draw(records, "t")
    path = tmp_path / "run.png"
    fig.savefig(path, format="png")  # as charts.write does
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert (width, height) == (round(charts.WIDTH_IN * charts.DPI), round(charts.figure_height(6) * charts.DPI))
        assert 300 < height < 600
        pixels = np.asarray(image.convert("RGB"))
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50, "not blank: text, dots, bars in many colours"

    def at(ax: Any, x: float, y: float) -> tuple[int, ...]:
        px, py = ax.transData.transform((x, y))
        return tuple(int(v) for v in pixels[round(height - py), round(px)])

    rate, p99, steps = panels(fig)
    red, green = (tuple(round(255 * v) for v in to_rgb(c)) for c in (charts.RED, charts.GREEN))
    assert at(rate, 0.962, 2) == red, "auth failed: its after dot is red"
    assert at(p99, 31.0, 2) == red
    assert at(rate, 0.997, 0) == green, "payment strict: green"
    assert at(rate, 0.998, 0) != green and at(rate, 0.998, 0) != red, "before: hollow"
    soak = tuple(round(255 * v) for v in to_rgb(segments(steps, "lab/shop/payment")[4][2]))
    assert at(steps, 100.0, 0) == soak, "payment at 100 s: in its soak"
    assert at(steps, 100.0, 1) != soak, "cart never soaked: its row is empty at 100 s"


def test_an_all_green_wave_draws_no_red(tmp_path: Path) -> None:
    records = [r for r in wave() if not r.outcome.red]
    path = charts.write(records, tmp_path / "green.png", "t")
    assert path == tmp_path / "green.png"
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    red = np.array([round(255 * v) for v in to_rgb(charts.RED)])
    assert not (pixels == red).all(axis=1).any(), "red says a red outcome, and there is none"
    green = np.array([round(255 * v) for v in to_rgb(charts.GREEN)])
    assert (pixels == green).all(axis=1).any()
    legend = charts.draw(records, "t").legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["before", "after: green outcome"]


def test_one_service(tmp_path: Path) -> None:
    records = wave()[:1]
    fig = charts.draw(records, "t")
    assert [t.get_text() for t in panels(fig)[0].get_yticklabels()] == ["lab/shop/payment  (strict)"]
    assert "1 service: 1 strict" in fig.get_suptitle()
    path = charts.write(records, tmp_path / "one.png", "t")
    assert path is not None
    with Image.open(path) as image:
        assert image.size[1] == round(charts.figure_height(1) * charts.DPI) >= 200


def test_no_services_no_chart(tmp_path: Path) -> None:
    assert charts.write([], tmp_path / "none.png", "t") is None
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(ValueError, match="no services"):
        charts.draw([], "t")


def test_200_services_grow_the_figure_up_to_its_cap_and_shrink_the_labels(tmp_path: Path) -> None:
    outcomes = list(ServiceOutcome)
    records = [pushed(f"svc-{i}", outcomes[i % len(outcomes)].value,
                      {"success_rate": 0.95 + i / 4000, "p99_ms": 10.0 + i}, {"success_rate": 0.99, "p99_ms": 12.0 + i},
                      FORWARD) for i in range(200)]
    assert charts.figure_height(20) < charts.figure_height(100) < charts.figure_height(200) == charts.MAX_HEIGHT_IN
    assert charts.figure_height(1000) == charts.MAX_HEIGHT_IN
    assert 4.0 <= charts.font_size(1000) < charts.font_size(200) < charts.font_size(20) == 9.0
    fig = charts.draw(records, "t")
    rate = panels(fig)[0]
    labels = rate.get_yticklabels()
    assert len(labels) == 200 and labels[199].get_text() == f"lab/shop/svc-199  ({outcomes[199 % len(outcomes)]})"
    assert labels[0].get_fontsize() == charts.font_size(200)
    row_pt = (rate.get_window_extent().height / 200) * 72 / charts.DPI
    assert labels[0].get_fontsize() < row_pt, "a label fits its row: they do not overlap"
    assert rate.get_position().x0 < 0.4, "the labels leave room for the panels"
    path = charts.write(records, tmp_path / "big.png", "t")
    assert path is not None
    with Image.open(path) as image:
        assert image.size == (1700, round(charts.MAX_HEIGHT_IN * charts.DPI))


def test_the_report_writes_the_chart_beside_the_csv_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHWAVE_REPORT_DIR", str(tmp_path))
    records = wave()
    path = report.save(report.report_frame(records), records, "meshwave_shop_mesh_wave_1", "manual__2026-01-01:00")
    assert str(path) == str(tmp_path / "meshwave_shop_mesh_wave_1" / "manual__2026-01-01_00.csv")
    chart = report.chart_of(path)
    assert chart == path.with_suffix(".png")
    with Image.open(str(chart)) as image:
        assert image.format == "PNG" and image.size[0] == 1700
    assert path.with_suffix(".json").is_file()


def test_a_chart_that_breaks_costs_neither_the_csv_nor_the_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MESHWAVE_REPORT_DIR", str(tmp_path))
    stale = tmp_path / "meshwave_shop_mesh_wave_1" / "manual__1.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier try's chart")

    def broken(*_: Any) -> None:
        raise RuntimeError("no font today")

    monkeypatch.setattr(charts, "write", broken)
    records = wave()
    frame = report.report_frame(records)
    with caplog.at_level(logging.ERROR, logger="meshwave.report"):
        path = report.save(frame, records, "meshwave_shop_mesh_wave_1", "manual__1")
    assert json.loads(path.with_suffix(".json").read_text()) == [r.model_dump(mode="json") for r in records]
    assert path.read_text().splitlines()[0] == ",".join(report.COLUMNS)
    assert len(path.read_text().splitlines()) == 1 + len(records)
    assert report.chart_of(path) is None and not stale.exists(), "no chart, not an earlier try's"
    assert "was not drawn" in caplog.text and "no font today" in caplog.text


def test_a_wave_without_services_has_a_report_and_no_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHWAVE_REPORT_DIR", str(tmp_path))
    path = report.save(report.report_frame([]), [], "meshwave_shop_mesh_wave_1", "manual__1")
    assert path.is_file() and path.with_suffix(".json").read_text() == "[]"
    assert report.chart_of(path) is None


def test_matplotlib_loads_only_when_a_chart_is_drawn() -> None:
    code = ("import sys, meshwave.charts, meshwave.report; "
            "assert 'matplotlib' not in sys.modules, sorted(m for m in sys.modules if 'matplotlib' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
