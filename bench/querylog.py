"""Which check a query in Prometheus' query log belongs to: the batched form or the per-workload form of a
template of include/promql/queries.yaml (anything else is 'other')."""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime
from typing import Any

from meshwave.prometheus import load_queries


def _pattern(text: str, *placeholders: str) -> str:
    escaped = re.escape(text)
    for value in placeholders:
        escaped = escaped.replace(re.escape(value), "[a-z0-9-]+")
    return escaped


def classifier(window: str, cluster: str | None) -> list[tuple[str, re.Pattern[str]]]:
    rules = []
    for name, template in load_queries().items():
        if template.batch:
            rules.append((f"{name} (batched)", re.compile(re.escape(template.batch.render(window=window,
                                                                                          cluster=cluster)))))
        per = template.render(namespace="nsplaceholder", workload="wlplaceholder", window=window, cluster=cluster)
        rules.append((f"{name} (per workload)", re.compile(_pattern(per, "nsplaceholder", "wlplaceholder"))))
    return rules


def when(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()


def per_check(entries: list[dict[str, Any]], window: str, cluster: str | None, start: float,
              end: float) -> dict[str, int]:
    """Queries per check between start and end (epoch seconds), by the log's own timestamps."""
    rules = classifier(window, cluster)
    counts: Counter[str] = Counter()
    for entry in entries:
        if not start <= when(entry) <= end:
            continue
        query = entry.get("params", {}).get("query", "")
        counts[next((name for name, rule in rules if rule.fullmatch(query)), "other")] += 1
    return dict(counts.most_common())
