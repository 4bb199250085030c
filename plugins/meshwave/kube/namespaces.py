"""Namespaces: one read, and the list of their names (the emergency rollback's scope). Mixed into `MeshKube`."""

from __future__ import annotations

from typing import Any

from meshwave.kube.state import _meta
from meshwave.kube.validation import validate_name


class Namespaces:
    """A cluster's namespaces (part of MeshKube)."""

    def namespace(self, ns: str) -> dict[str, Any]:
        validate_name(ns, "namespace")
        return self._call("GET", f"namespace {ns}", self.core.read_namespace, ns)

    def namespace_names(self) -> list[str]:
        items = self._call("LIST", "namespaces", self.core.list_namespace).get("items", [])
        return sorted(_meta(n).get("name", "") for n in items)
