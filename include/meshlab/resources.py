"""The resource types the lab's API serves, as discovery describes them."""

from __future__ import annotations

from dataclasses import dataclass, field

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class Resource:
    group: str
    versions: tuple[str, ...]
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    builtin: bool = True  # built-in kinds accept strategic merge patch; custom resources do not
    has_status: bool = False
    categories: tuple[str, ...] = field(default=())

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def storage_version(self) -> str:
        return self.versions[0]

    def api_version(self, version: str | None = None) -> str:
        version = version or self.storage_version
        return f"{self.group}/{version}" if self.group else version


NAMESPACES = Resource("", ("v1",), "namespaces", "Namespace", False, ("ns",), has_status=True)
PODS = Resource("", ("v1",), "pods", "Pod", True, ("po",), has_status=True, categories=("all",))
SERVICES = Resource("", ("v1",), "services", "Service", True, ("svc",), has_status=True, categories=("all",))
DEPLOYMENTS = Resource("apps", ("v1",), "deployments", "Deployment", True, ("deploy",), has_status=True,
                       categories=("all",))
PEER_AUTHENTICATIONS = Resource("security.istio.io", ("v1", "v1beta1"), "peerauthentications",
                                "PeerAuthentication", True, ("pa",), builtin=False,
                                categories=("istio-io", "security-istio-io"))
DESTINATION_RULES = Resource("networking.istio.io", ("v1", "v1beta1", "v1alpha3"), "destinationrules",
                             "DestinationRule", True, ("dr",), builtin=False,
                             categories=("istio-io", "networking-istio-io"))
SIDECARS = Resource("networking.istio.io", ("v1", "v1beta1", "v1alpha3"), "sidecars", "Sidecar", True,
                    builtin=False, categories=("istio-io", "networking-istio-io"))
VIRTUAL_SERVICES = Resource("networking.istio.io", ("v1", "v1beta1", "v1alpha3"), "virtualservices",
                            "VirtualService", True, ("vs",), builtin=False,
                            categories=("istio-io", "networking-istio-io"))

REPLICA_SETS = Resource("apps", ("v1",), "replicasets", "ReplicaSet", True, ("rs",), has_status=True,
                        categories=("all",))
MUTATING_WEBHOOK_CONFIGURATIONS = Resource("admissionregistration.k8s.io", ("v1",), "mutatingwebhookconfigurations",
                                           "MutatingWebhookConfiguration", False, categories=("api-extensions",))

# What admission and the scheduler read: a namespace's quotas and limit ranges, the nodes, and the injector's
# ConfigMap (Istio keeps the injection template and its values, global.proxy.resources among them, there).
RESOURCE_QUOTAS = Resource("", ("v1",), "resourcequotas", "ResourceQuota", True, ("quota",), has_status=True)
LIMIT_RANGES = Resource("", ("v1",), "limitranges", "LimitRange", True, ("limits",))
NODES = Resource("", ("v1",), "nodes", "Node", False, ("no",), has_status=True)
CONFIG_MAPS = Resource("", ("v1",), "configmaps", "ConfigMap", True, ("cm",))

ALL = (NAMESPACES, PODS, SERVICES, DEPLOYMENTS, PEER_AUTHENTICATIONS, DESTINATION_RULES, SIDECARS,
       VIRTUAL_SERVICES, REPLICA_SETS, MUTATING_WEBHOOK_CONFIGURATIONS, RESOURCE_QUOTAS, LIMIT_RANGES, NODES,
       CONFIG_MAPS)


def groups() -> dict[str, list[str]]:
    """Group name -> served versions (preferred first), for the non-core groups."""
    result: dict[str, list[str]] = {}
    for res in ALL:
        if res.group:
            for v in res.versions:
                if v not in result.setdefault(res.group, []):
                    result[res.group].append(v)
    return result


def lookup(group: str, version: str, plural: str) -> Resource | None:
    for res in ALL:
        if res.group == group and version in res.versions and res.plural == plural:
            return res
    return None


def in_group_version(group: str, version: str) -> list[Resource]:
    return [r for r in ALL if r.group == group and version in r.versions]
