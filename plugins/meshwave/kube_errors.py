"""Kubernetes errors as meshwave names them, apart from the client (kube.py) so that code which only
catches them (the DAG files, the task groups) does not import the kubernetes client when a DAG is parsed."""

from __future__ import annotations


class KubeError(Exception):
    """A Kubernetes call that failed; carries the cluster, verb, object and the API's Status."""

    def __init__(self, message: str, *, cluster: str = "", verb: str = "", target: str = "", code: int = 0,
                 reason: str = "", api_message: str = "") -> None:
        super().__init__(message)
        self.cluster, self.verb, self.target = cluster, verb, target
        self.code, self.reason, self.api_message = code, reason, api_message


class ClusterUnreachable(KubeError):
    """Connection refused, timed out, TLS failure: the API server did not answer."""


class NotFound(KubeError):
    pass


class WorkloadNotFound(NotFound):
    pass


class Conflict(KubeError):
    """409: AlreadyExists on create, stale resourceVersion on update."""


class AccessDenied(KubeError):
    """401/403."""


class Rejected(KubeError):
    """400/415/422: the API refused the request itself (validation, patch type)."""


class ServerError(KubeError):
    """5xx, or an answer that is not what the API promises."""


class InjectionBlocked(KubeError):
    """A label that wins over ours (istio-injection=disabled on the namespace) would prevent injection."""


class NotInForce(KubeError):
    """After a write, the mode Istio computes from every PeerAuthentication is not the one asked for."""


class MtlsRefused(KubeError):
    """meshwave will not write this policy: another one decides the workload's mode (the message names it)."""
