"""Label and field selectors with the Kubernetes grammar (`a=b,c!=d,e in (f,g),!h,i`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from meshlab.errors import ApiError

Predicate = Callable[[Mapping[str, str]], bool]

_SET_EXPR = re.compile(r"^\s*([^\s!=,()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    terms, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    return [t.strip() for t in terms if t.strip()]


def _term(term: str) -> Predicate:
    if m := _SET_EXPR.match(term):
        key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    for op in ("!=", "==", "="):
        if op in term:
            key, value = (p.strip() for p in term.split(op, 1))
            if not key:
                break
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    else:
        if term.startswith("!"):
            key = term[1:].strip()
            if key and " " not in key:
                return lambda labels: key not in labels
        elif " " not in term and "(" not in term:
            return lambda labels: term in labels
    raise ApiError(400, f"unable to parse requirement: {term!r}")


def parse_selector(selector: str | None) -> Predicate:
    """Parse a label selector; raises a 400 Status error on bad syntax."""
    if not selector:
        return lambda labels: True
    predicates = [_term(t) for t in _split_terms(selector)]
    return lambda labels: all(p(labels) for p in predicates)


def field_values(obj: Mapping[str, Any]) -> dict[str, str]:
    """The fields a field selector may name (the common ones every resource supports, plus phase)."""
    meta = obj.get("metadata", {})
    values = {"metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", "")}
    phase = obj.get("status", {}).get("phase")
    if phase is not None:
        values["status.phase"] = phase
    return values


def parse_field_selector(selector: str | None) -> Callable[[Mapping[str, Any]], bool]:
    if not selector:
        return lambda obj: True
    predicates = []
    for term in _split_terms(selector):
        pred = _term(term)
        if " in " in term or " notin " in term or "=" not in term:
            raise ApiError(400, f"invalid field selector term {term!r}: only =, == and != are supported")
        field = re.split(r"!=|==|=", term, maxsplit=1)[0].strip()
        if field not in ("metadata.name", "metadata.namespace", "status.phase"):
            raise ApiError(400, f'field label not supported: "{field}"')
        predicates.append(pred)
    return lambda obj: all(p(field_values(obj)) for p in predicates)


def matches_labels(match_labels: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """`spec.selector.matchLabels` semantics: every pair present; an empty selector matches all."""
    return all(labels.get(k) == v for k, v in (match_labels or {}).items())
