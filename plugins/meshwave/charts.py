"""The wave report's chart: one PNG per wave run, one row per service (in plan order) across three panels:

1. its success rate before (the baseline) and after (as the soak last judged it),
2. its p99 latency before and after,
3. a timeline of its steps.

Each row's label names the service and its outcome, red for a red outcome (`ServiceOutcome.red`), green otherwise.
A value not measured is written "no before" / "no after" / "no data" in grey, never drawn as 0: a 0 % success rate
is a real and very different thing.

matplotlib (Agg, a file only) is imported when a chart is drawn, never at plugin load or DAG parse: every task start
parses its DAG file, and only the report task draws. A Figure of its own, not pyplot's global state: nothing is left
open in a long-lived worker.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from meshwave.outcomes import ServiceOutcome
from meshwave.record import ServiceRecord

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

RED = "#d62728"
GREEN = "#2ca02c"
BEFORE = "#555555"  # the baseline: hollow, neutral
MISSING = "#999999"
WIDTH_IN = 17.0
TOP_IN = 1.6  # the title, the legends and the panels' titles
BOTTOM_IN = 0.45  # the x axes' labels
ROW_IN = 0.24
MAX_HEIGHT_IN = 40.0  # 4000 px: from some 160 services on, rows (and their labels) shrink to fit
DPI = 100


class Pair(NamedTuple):
    """One service's value before and after; None: not measured."""

    before: float | None
    after: float | None


def outcome_colour(outcome: ServiceOutcome) -> str:
    return RED if outcome.red else GREEN


def row_label(record: ServiceRecord) -> str:
    return f"{record.service}  ({record.outcome.value})"


def figure_height(services: int) -> float:
    return min(MAX_HEIGHT_IN, TOP_IN + BOTTOM_IN + ROW_IN * max(services, 2))


def font_size(services: int) -> float:
    """Labels as large as a row allows (60 % of its height), between 4 and 9 pt: readable at 200 services."""
    row_pt = (figure_height(services) - TOP_IN - BOTTOM_IN) * 72 / max(services, 1)
    return max(4.0, min(9.0, 0.6 * row_pt))


def draw(records: Sequence[ServiceRecord], title: str) -> Figure:
    """The chart as a Figure (not yet written). At least one record: a wave run without services has no chart."""
    if not records:
        raise ValueError("no services: nothing to chart")
    from matplotlib.ticker import PercentFormatter

    fig = _figure(records)
    rate_ax, p99_ax, time_ax = fig.axes
    size = font_size(len(records))
    _rows(rate_ax, records, size)
    _pairs(rate_ax, records, [Pair(r.baseline.success_rate, r.after.success_rate) for r in records], size)
    _title(rate_ax, "success rate (requests without a 5xx)")
    rate_ax.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=1))
    _hide_ticks_above(rate_ax, 1.0)  # the margin kept for "no after" is not a success rate over 100 %
    _title(p99_ax, "p99 latency, ms")
    _pairs(p99_ax, records, [Pair(r.baseline.p99_ms, r.after.p99_ms) for r in records], size, log_when_wide=True)
    steps = _timeline(time_ax, records, size)
    _header(fig, records, title, steps)
    return fig


def _figure(records: Sequence[ServiceRecord]) -> Figure:
    """The figure and its three panels, one row a service in each, sized for the rows and their labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(records)
    height = figure_height(n)
    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI)
    FigureCanvasAgg(fig)  # Agg: a PNG only, whatever backend the environment names
    # Margins computed, not constrained layout: that measures every tick label again and again (seconds at 200
    # services). The labels' width from their length: DejaVu Sans averages some 0.55 em a character.
    left_in = 0.25 + 0.55 * font_size(n) / 72 * max(len(row_label(r)) for r in records)
    fig.subplots_adjust(left=min(left_in / WIDTH_IN, 0.4), right=0.99, top=1 - TOP_IN / height,
                        bottom=BOTTOM_IN / height, wspace=0.04)
    # Not sharey: a shared axis gives each panel its own 200 tick objects to make and measure; the rows line up
    # by the same limits instead, and only the first panel is labelled.
    for ax in fig.subplots(1, 3, width_ratios=[1, 1, 1.6]):
        _bands(ax, n)
    return fig


def _header(fig: Figure, records: Sequence[ServiceRecord], title: str, steps: list[Patch]) -> None:
    """The title with the outcome counts, then the dots' legend over the first panel and the steps' over the
    timeline, in the band kept free above the panels."""
    height = fig.get_figheight()
    n = len(records)
    counts = Counter(r.outcome for r in records)
    summary = ", ".join(f"{counts[o]} {o.value}" for o in ServiceOutcome if counts[o])  # the report's order
    fig.suptitle(f"{title}\n{n} service{'' if n == 1 else 's'}: {summary}", fontsize=12, y=1 - 0.1 / height,
                 va="top")
    rate_ax, _, time_ax = fig.axes
    legend_y = 1 - 0.68 / height
    fig.legend(handles=_pair_legend({r.outcome.red for r in records}), loc="upper left",
               bbox_to_anchor=(rate_ax.get_position().x0, legend_y), ncol=3, fontsize=8, frameon=False,
               borderaxespad=0)
    if steps:
        fig.legend(handles=steps, loc="upper right", bbox_to_anchor=(time_ax.get_position().x1, legend_y),
                   ncol=min(len(steps), 6), fontsize=7, frameon=False, borderaxespad=0, title="steps",
                   title_fontsize=7, alignment="left")


def write(records: Sequence[ServiceRecord], path: Path | ObjectStoragePath,
          title: str) -> Path | ObjectStoragePath | None:
    """Draw and write the PNG at `path` (a local Path or the report dir's ObjectStoragePath: written through its
    open()); None (and nothing written) when there are no services."""
    if not records:
        return None
    fig = draw(records, title)
    with path.open("wb") as f:
        fig.savefig(f, format="png")
    return path


def _title(ax: Axes, text: str) -> None:
    # y given: matplotlib then does not measure every tick label to place the title (seconds at 200 rows)
    ax.set_title(text, fontsize=10, y=1.0, pad=4)


def _bands(ax: Axes, rows: int) -> None:
    """Every other row shaded, across the whole panel, so that a row reads across the three panels; one artist.
    Rows are y = 0, 1, ... from the top (the limits inverted: plan order reads top down)."""
    from matplotlib.collections import PolyCollection

    bands = [[(0, y - 0.5), (1, y - 0.5), (1, y + 0.5), (0, y + 0.5)] for y in range(1, rows, 2)]
    ax.add_collection(PolyCollection(bands, facecolors="#f2f2f2", edgecolors="none", zorder=0,
                                     transform=ax.get_yaxis_transform()), autolim=False)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_yticks([])


def _rows(ax: Axes, records: Sequence[ServiceRecord], size: float) -> None:
    """The first panel's labels: one a row, the service and its outcome, coloured by the outcome."""
    ax.set_yticks(range(len(records)), [row_label(r) for r in records], fontsize=size)
    for tick, record in zip(ax.get_yticklabels(), records, strict=True):
        tick.set_color(outcome_colour(record.outcome))


def _pairs(ax: Axes, records: Sequence[ServiceRecord], pairs: list[Pair], size: float,
           log_when_wide: bool = False) -> None:
    """Before (hollow grey) and after (filled, the outcome's colour) as two dots joined by a line; a value not
    measured has no dot and says so at the panel's right edge, in a margin kept free of dots."""
    seen = [v for p in pairs for v in p if v is not None]
    log = log_when_wide and bool(seen) and min(seen) > 0 and max(seen) / min(seen) >= 20
    if log:
        ax.set_xscale("log")
    ax.set_xlim(*_limits(seen, log))
    colours = [outcome_colour(r.outcome) for r in records]
    both = [(y, p) for y, p in enumerate(pairs) if p.before is not None and p.after is not None]
    if both:  # one collection, not a line a row: 200 artists cost a second to draw
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection([[(p.before, y), (p.after, y)] for y, p in both], linewidths=1, alpha=0.6,
                                         colors=[colours[y] for y, _ in both], zorder=1), autolim=False)
    before = [(p.before, y) for y, p in enumerate(pairs) if p.before is not None]
    after = [(p.after, y, colours[y]) for y, p in enumerate(pairs) if p.after is not None]
    if before:
        ax.scatter(*zip(*before, strict=True), s=28, facecolors="none", edgecolors=BEFORE, label="before",
                   zorder=2, gid="before")
    if after:
        xs, ys, cs = zip(*after, strict=True)
        ax.scatter(xs, ys, s=28, c=list(cs), label="after", zorder=3, gid="after")
    edge = ax.get_yaxis_transform()  # x in axes fraction, y in rows
    for y, p in enumerate(pairs):
        if (missing := _missing(p)) is not None:
            ax.text(0.99, y, missing, transform=edge, ha="right", va="center", fontsize=size, color=MISSING,
                    style="italic")
    if not log:  # ticks read as values: no "1e-14+4.97" offset under a narrow range (seen on a 3-service wave)
        ax.ticklabel_format(axis="x", useOffset=False)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6, linestyle=":")
    ax.tick_params(axis="x", labelsize=8)


def _hide_ticks_above(ax: Axes, top: float) -> None:
    from matplotlib.ticker import FixedLocator

    ax.xaxis.set_major_locator(FixedLocator([t for t in ax.get_xticks() if t <= top + 1e-9]))


def _missing(pair: Pair) -> str | None:
    if pair.before is None and pair.after is None:
        return "no data"
    if pair.before is None:
        return "no before"
    return "no after" if pair.after is None else None


def _limits(seen: list[float], log: bool) -> tuple[float, float]:
    """The values' range, padded, with the right quarter left free for the "no ..." words."""
    if not seen:
        return (0.0, 1.0)
    import math

    to, back = (math.log10, lambda v: 10 ** v) if log else (float, float)
    lo, hi = to(min(seen)), to(max(seen))
    span = hi - lo or max(abs(hi) * 0.01, 0.01)  # one value, or all equal: a small window round it
    return back(lo - 0.08 * span), back(hi + 0.45 * span)


def _pair_legend(red: set[bool]) -> list[Line2D]:
    """Before, and after in each outcome colour the chart uses (`red`: whether each outcome drawn is red): red on
    the chart always means a red outcome."""
    from matplotlib.lines import Line2D

    def dot(label: str, face: str, edge: str) -> Line2D:
        return Line2D([], [], linestyle="none", marker="o", markerfacecolor=face, markeredgecolor=edge, label=label)

    after = [dot(f"after: {'red' if r else 'green'} outcome", RED if r else GREEN, RED if r else GREEN)
             for r in (False, True) if r in red]
    return [dot("before", "none", BEFORE), *after]


def _timeline(ax: Axes, records: Sequence[ServiceRecord], size: float) -> list[Patch]:
    """Each service's steps as consecutive segments from 0, one colour per step. The record keeps each step's
    seconds in the order the steps ran, not when each started: the row is laid out from those durations in order,
    so the time between tasks (the scheduler's, a deferral's wait outside a step) is not shown."""
    names = list(dict.fromkeys(step for r in records for step in r.steps))  # first seen first: the run's order
    palette = _palette(len(names))
    colour = dict(zip(names, palette, strict=True))
    for y, record in enumerate(records):
        if not record.steps:
            ax.text(0.01, y, "no steps", transform=ax.get_yaxis_transform(), va="center", fontsize=size,
                    color=MISSING, style="italic")
            continue
        starts = _starts(list(record.steps.values()))
        ax.broken_barh(list(zip(starts, record.steps.values(), strict=True)), (y - 0.35, 0.7),
                       facecolors=[colour[s] for s in record.steps], gid=f"steps:{record.service}")
        # the total at the row's end: a row of a few short steps (a service blocked at preflight) is too thin to see
        total = sum(record.steps.values())
        ax.text(total, y, f" {total:.1f} s" if total < 10 else f" {total:.0f} s", va="center", fontsize=size * 0.85,
                color=MISSING)
    _title(ax, "steps, seconds (durations laid end to end; waits between tasks not shown)")
    longest = max((sum(r.steps.values()) for r in records), default=0.0)
    ax.set_xlim(0, 1.1 * longest or 1.0)  # room for the totals
    ax.tick_params(axis="x", labelsize=8)
    from matplotlib.patches import Patch

    return [Patch(color=colour[s], label=s) for s in names]  # the legend: one entry a step, in the run's order


def _starts(seconds: list[float]) -> list[float]:
    starts, at = [], 0.0
    for s in seconds:
        starts.append(at)
        at += s
    return starts


def _palette(count: int) -> list[tuple[float, ...]]:
    """Distinct colours for the steps: tab20's without its greens and reds (those say an outcome here), repeated
    past 16 (a wave has some 15 step names)."""
    from matplotlib import colormaps

    tab = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (4, 5, 6, 7)]
    return [tab[i % len(tab)] for i in range(count)]
