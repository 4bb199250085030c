"""Resource reads for the headroom preflight (meshwave.headroom): quotas, limit ranges, nodes, pods and the
injector's values. Mixed into `MeshKube`.
"""

from __future__ import annotations

import json
from typing import Any

from meshwave.kube.injection import DEFAULT_REVISION
from meshwave.kube.validation import validate_name
from meshwave.kube_errors import NotFound, ServerError


class Capacity:
    """What a cluster has room for (part of MeshKube)."""

    def resource_quotas(self, ns: str) -> list[dict[str, Any]]:
        """The namespace's ResourceQuotas (spec.hard, status.used as the quota controller keeps it)."""
        ns = validate_name(ns, "namespace")
        return self._call("LIST", f"resourcequotas in {ns}", self.core.list_namespaced_resource_quota,
                          ns).get("items", [])

    def limit_ranges(self, ns: str) -> list[dict[str, Any]]:
        """The namespace's LimitRanges (as the API stores them: defaults filled in from max and min)."""
        ns = validate_name(ns, "namespace")
        return self._call("LIST", f"limitranges in {ns}", self.core.list_namespaced_limit_range, ns).get("items", [])

    def nodes(self) -> list[dict[str, Any]]:
        """Every Node (status.allocatable is what the scheduler fits pods' requests into)."""
        return self._call("LIST", "nodes", self.core.list_node).get("items", [])

    def all_pods(self) -> list[dict[str, Any]]:
        """Every pod of the cluster (what the nodes already hold: their spec.nodeName and requests)."""
        return self._call("LIST", "pods (all namespaces)", self.core.list_pod_for_all_namespaces).get("items", [])

    def injector_values(self, revision: str) -> dict[str, Any] | None:
        """The install's values the injector renders its template with (ConfigMap istio-sidecar-injector[-<rev>]
        in the root namespace, key `values`, JSON); None when there is no such ConfigMap."""
        name = "istio-sidecar-injector" if revision == DEFAULT_REVISION else \
            f"istio-sidecar-injector-{validate_name(revision, 'revision')}"
        try:
            cm = self._call("GET", f"configmap {self.root_namespace}/{name}", self.core.read_namespaced_config_map,
                            name, self.root_namespace)
        except NotFound:
            return None
        try:
            values = json.loads((cm.get("data") or {}).get("values") or "{}")
        except ValueError:
            raise ServerError(f"cluster {self.cluster}: configmap {self.root_namespace}/{name}: `values` is not "
                              "JSON", cluster=self.cluster, verb="GET", target=name) from None
        return values if isinstance(values, dict) else None

    def injection_revision(self) -> str:
        """The revision whose injector would size new sidecars here (the plan's, else the webhooks' default)."""
        revision, _ = self._revision_for("the headroom preflight")
        return revision
