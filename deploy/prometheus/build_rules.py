"""Write deploy/prometheus/meshwave-alerts.rules.yaml: the PrometheusRule's groups as a plain Prometheus rule file.

meshwave-alerts.yaml (the PrometheusRule) is the one that is edited. The plain file is its `spec:` block moved two
columns left, text for text, so the comments stay with the rules; `promtool check rules` and `promtool test rules`
(meshwave-alerts.test.yaml) read it, and so does a Prometheus run without the Operator.

    .venv/bin/python deploy/prometheus/build_rules.py          # rewrite the rule file
    .venv/bin/python deploy/prometheus/build_rules.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "meshwave-alerts.yaml"
OUTPUT = HERE / "meshwave-alerts.rules.yaml"
HEADER = ("# Generated from meshwave-alerts.yaml (the PrometheusRule's spec) by build_rules.py: edit that file, then\n"
          "# run .venv/bin/python deploy/prometheus/build_rules.py. docs/monitoring.md explains every alert.\n")


def plain_rules(source_text: str) -> str:
    """The lines after the top-level `spec:` key, two columns to the left (spec must be the last top-level key)."""
    lines = source_text.splitlines()
    start = lines.index("spec:") + 1
    body = []
    for line in lines[start:]:
        if line and not line.startswith("  "):
            raise ValueError(f"{SOURCE.name}: `spec:` must be the last top-level key (found {line!r})")
        body.append(line[2:])
    text = HEADER + "\n".join(body).rstrip("\n") + "\n"
    # the move must not change what the rules say
    if yaml.safe_load(text) != yaml.safe_load(source_text)["spec"]:
        raise ValueError(f"{SOURCE.name}: its spec did not survive the move to a plain rule file")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the rule file is out of date")
    args = parser.parse_args(argv)
    text = plain_rules(SOURCE.read_text())
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
