"""The JSON values meshwave keeps in annotations of the Deployments it changes (pending.py, lease.py).

Each is a frozen pydantic model held in one annotation; a value there that meshwave cannot read is an error naming
the object and the annotation, never ignored (someone else's value, or a hand edit)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError


class WorkloadAnnotation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ANNOTATION: ClassVar[str]

    def to_annotation(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_annotation(cls, text: str, where: str) -> Self:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(f"{where}: annotation {cls.ANNOTATION} is not meshwave's: {exc.errors()[0]['msg']} "
                             f"({text[:200]!r})") from None


def iso(moment: datetime) -> str:
    """UTC, to the second, with a `Z`: how the annotations show a time to a person."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
