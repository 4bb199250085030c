"""Kubernetes names, checked once and the same way everywhere before they reach the API or PromQL."""

from __future__ import annotations

import re

RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RULE = ("lower case letters, digits and '-', starting and ending with a letter or digit, at most 63 "
        "characters")


def rfc1123_label(value: object, field: str | None = None) -> str:
    """The value if it is an RFC 1123 label (namespace, workload, cluster), else ValueError naming the field."""
    if not isinstance(value, str) or len(value) > 63 or not RFC1123_LABEL.match(value):
        where = f"{field}: " if field else ""
        raise ValueError(f"{where}{value!r} is not a valid RFC 1123 label ({RULE})")
    return value
