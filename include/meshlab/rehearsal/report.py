"""The rehearsal's report: a markdown file and two charts beside it (matplotlib, drawn to files only).

- `end-states.png`: per cluster, how many services ended in each state;
- `callers.png`: over the rehearsal, the least share of its traffic before that any judged caller still had
  delivered, against the floor, with each wave's run shaded.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshlab.rehearsal.end_state import End, ServiceEnd
from meshlab.rehearsal.follow import WaveRun
from meshlab.rehearsal.history import History

END_COLOURS = {End.STRICT: "#2e7d32", End.PERMISSIVE: "#81c784", End.ROLLED_BACK: "#ef6c00", End.BLOCKED: "#fbc02d",
               End.FAILED: "#c62828", End.HELD: "#8e24aa", End.SKIPPED: "#90a4ae", End.NOT_RUN: "#cfd8dc",
               End.EXCLUDED: "#eceff1", End.PARTIAL: "#d81b60"}


def verdict(waves: list[WaveRun], ends: list[ServiceEnd], history: History | None, history_error: str) -> list[str]:
    """Why the rehearsal failed, one line per reason; [] when it passed."""
    problems = [f"wave {w.wave} did not run: {w.reason}" for w in waves if w.run_id is None]
    problems += [f"wave {w.wave} {w.state}" for w in waves if w.run_id is not None and w.state != "success"]
    problems += [f"{e.key}: {e.mismatch}" for e in ends if e.mismatch]
    if history is None:
        problems.append(f"caller history not judged: {history_error}")
    else:
        problems += [f"{c.edge} lost traffic: {c.lowest:.0%} of its rate before at "
                     f"{_clock(c.lowest_at)} (floor {c.floor:.0%}), {c.seconds_below:.0f} s below"
                     for c in history.lost]
    return problems


def markdown(title: str, waves: list[WaveRun], ends: list[ServiceEnd], history: History | None, problems: list[str],
             took_seconds: float, charts: list[str]) -> str:
    lines = [f"# {title}", "", f"Took {took_seconds / 60:.1f} min. "
             + ("**Passed**: every wave ran, every record matches the clusters, no caller lost traffic."
                if not problems else f"**Failed** ({len(problems)}):"), ""]
    lines += [f"- {p}" for p in problems] + ([""] if problems else [])
    lines += ["## Waves", "", "| wave | state | started | took | outcomes | note |", "|---|---|---|---|---|---|"]
    for w in waves:
        took = f"{(w.ended - w.started).total_seconds() / 60:.1f} min" if w.started and w.ended else "-"
        tally = Counter(str(r.outcome) for r in w.records)
        lines.append(f"| {w.wave} | {w.state} | {_clock(w.started.timestamp()) if w.started else '-'} | {took} | "
                     f"{', '.join(f'{n} {o}' for o, n in sorted(tally.items())) or '-'} | {w.reason or ''} |")
    lines += ["", "## End state per cluster", "", *[f"![{c}]({c})" for c in charts if c.startswith("end")], ""]
    for cluster in sorted({e.cluster for e in ends}):
        mine = [e for e in ends if e.cluster == cluster]
        tally = Counter(str(e.end) for e in mine)
        lines += [f"### {cluster}: " + ", ".join(f"{n} {s}" for s, n in sorted(tally.items())), "",
                  "| service | wave | end | data plane | reason |", "|---|---|---|---|---|"]
        lines += [f"| {e.namespace}/{e.workload} | {e.wave or '-'} | {e.end}"
                  f"{' **MISMATCH**: ' + e.mismatch if e.mismatch else ''} | {e.data_plane} | {_cell(e.reason)} |"
                  for e in mine]
        lines.append("")
    lines += ["## Callers", ""]
    if history is None:
        lines.append("Not judged (see above).")
    else:
        lines += [f"{len(history.checks)} edges judged from {_clock(history.start)} to {_clock(history.end)} every "
                  f"{history.step:g} s; {len(history.lost)} lost traffic; {len(history.too_thin)} too thin to judge.",
                  "", *[f"![{c}]({c})" for c in charts if c.startswith("callers")], "",
                  "| edge | rate before | least share | at | floor | seconds below |", "|---|---|---|---|---|---|"]
        worst = sorted(history.checks, key=lambda c: c.lowest)
        lines += [f"| {c.edge} | {c.before_rps:.2f}/s | {c.lowest:.1%} | {_clock(c.lowest_at)} | {c.floor:.0%} | "
                  f"{c.seconds_below:.0f} |" for c in worst]
    return "\n".join(lines) + "\n"


def charts(out: Path, waves: list[WaveRun], ends: list[ServiceEnd], history: History | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [_end_chart(plt, out / "end-states.png", ends)]
    if history is not None and history.lowest_by_time:
        written.append(_callers_chart(plt, out / "callers.png", waves, history))
    return written


def _end_chart(plt: Any, path: Path, ends: list[ServiceEnd]) -> str:
    clusters = sorted({e.cluster for e in ends})
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(clusters)))
    left = [0] * len(clusters)
    for state in End:
        counts = [sum(1 for e in ends if e.cluster == c and e.end is state) for c in clusters]
        if any(counts):
            ax.barh(clusters, counts, left=left, color=END_COLOURS[state], edgecolor="grey", label=str(state))
            left = [a + b for a, b in zip(left, counts, strict=True)]
    ax.set_xlabel("services")
    ax.set_title("where the rehearsal left each cluster's services")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _callers_chart(plt: Any, path: Path, waves: list[WaveRun], history: History) -> str:
    fig, ax = plt.subplots(figsize=(10, 4))
    t0 = history.start
    ax.plot([(t - t0) / 60 for t, _ in history.lowest_by_time], [100 * v for _, v in history.lowest_by_time],
            color="black", label="least share of any caller's traffic before")
    floor = min((c.floor for c in history.checks), default=1.0)
    ax.axhline(100 * floor, color="red", linestyle="--", label=f"floor {floor:.0%}")
    for i, w in enumerate(x for x in waves if x.started and x.ended):
        ax.axvspan((w.started.timestamp() - t0) / 60, (w.ended.timestamp() - t0) / 60, alpha=0.12,
                   color="C0" if i % 2 == 0 else "C1", label=f"wave {w.wave}" if i < 8 else None)
    ax.set_ylim(0, max(110, 100 * max(v for _, v in history.lowest_by_time) + 5))
    ax.set_xlabel("minutes since the first wave started")
    ax.set_ylabel("% of the rate before")
    ax.set_title("did any caller lose traffic?")
    ax.legend(loc="lower left", fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]
