"""Names, labels, quantities and ports checked before any request is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

from meshwave.names import rfc1123_label

_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_name(value: Any, field_name: str) -> str:
    """An RFC 1123 label (namespace, workload), checked before any request is built."""
    return rfc1123_label(value, field_name)


def validate_labels(labels: Any, field_name: str) -> dict[str, str]:
    if not isinstance(labels, dict):
        raise ValueError(f"{field_name} must be a mapping of label names to values")
    for key, value in labels.items():
        prefix, _, name = str(key).rpartition("/") if "/" in str(key) else ("", "", str(key))
        key_ok = isinstance(key, str) and 0 < len(name) <= 63 and _LABEL_NAME.match(name) \
            and (not prefix or (len(prefix) <= 253 and _LABEL_PREFIX.match(prefix)))
        if not key_ok:
            raise ValueError(f"{field_name}: {key!r} is not a valid label name")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_NAME.match(value):
            raise ValueError(f"{field_name}: value {value!r} of {key} is not a valid label value")
    return dict(labels)


def _quantity(value: Any, field_name: str) -> Decimal:
    try:
        return parse_quantity(value)
    except (ValueError, TypeError):
        raise ValueError(f"{field_name} {value!r} is not a Kubernetes quantity (e.g. 100m, 128Mi)") from None


def _ports(ports: Iterable[int], field_name: str) -> str:
    values = sorted({int(p) for p in ports})
    bad = [p for p in values if not 0 < p < 65536]
    if bad:
        raise ValueError(f"{field_name}: ports out of range 1-65535: {bad}")
    return ",".join(str(p) for p in values)
