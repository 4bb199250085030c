"""The ledger record of one cluster change: made, not needed, or only planned (dry run).

Records travel through Airflow XCom, so `to_dict` is JSON-safe and `from_dict` restores the record.
No Airflow or Kubernetes imports here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any


def utc_now() -> str:
    """Current time, UTC, ISO 8601 with a `Z` (also valid RFC 3339, as `kubectl rollout restart` sends)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_safe(value: Any) -> Any:
    """A deep copy that is guaranteed to survive JSON (fails loudly on anything that would not)."""
    return json.loads(json.dumps(value))


@dataclass
class ApiRequest:
    """The request a change sent (or would send): verb, API path, patch content type, body."""

    verb: str
    path: str
    content_type: str | None = None
    body: Any = None

    def describe(self) -> str:
        kind = f" ({self.content_type})" if self.content_type else ""
        return f"{self.verb} {self.path}{kind}"


@dataclass
class Change:
    cluster: str
    action: str  # label-namespace, label-workload, restart, set-sidecar-resources, set-exclusions, set-mtls, ...
    target: str  # "deployment shop/auth", "namespace shop", "peerauthentication shop/meshwave-auth"
    before: Any = None
    after: Any = None
    request: ApiRequest | None = None
    applied: bool = False
    dry_run: bool = False
    reason: str = ""
    resource_version: str | None = None  # of the object after the write, when applied
    timestamp: str = field(default_factory=utc_now)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Change:
        values = dict(data)
        request = values.pop("request", None)
        known = {f for f in cls.__dataclass_fields__ if f != "request"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Change field(s): {', '.join(unknown)}")
        return cls(**values, request=ApiRequest(**request) if request else None)

    def summary(self) -> str:
        state = "applied" if self.applied else ("dry run" if self.dry_run else "not applied")
        return f"[{self.cluster}] {self.action} {self.target}: {state}: {self.reason}"
