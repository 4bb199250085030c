"""The Kubernetes and Istio side of meshwave, on a kubernetes-client `ApiClient` (no Airflow imports).

Airflow tasks build it from `KubernetesHook(conn_id).api_client`, tests from
`kubernetes.config.new_client_from_config(config_file=...)`. Every write checks before it writes (a retried
or cleared task is safe), returns a `Change` for the ledger, and honours `dry_run`. Every API failure is a
`KubeError` naming the cluster, the verb, the object and the API's own Status message.

One module per resource; `MeshKube` (client.py) is the one object callers hold, made of them:

- client.py: `MeshKube`, its API objects and transport (`_call`, `_send`, `_noop`), `ping`, and the
  PeerAuthentications (meshwave.peer_auth) and leases (meshwave.lease) of its cluster.
- deployments.py: reading a workload and its rollout; pod template writes (sidecar resources, exclusions, restarts).
- injection.py: which injector a pod gets (`injection_applies`, `Injectors`); `ensure_injected`, `remove_injection`.
- namespaces.py, canaries.py, pending_annotation.py, capacity.py (the headroom preflight's reads).
- state.py: the pure observed state (`WorkloadState`, `PodState`, `RolloutState`, `assess_rollout`).
- errors.py: API failures as `KubeError`s; validation.py: names, labels, quantities, ports.

The names below are those callers import from `meshwave.kube`: import them from here, not from the modules.
"""

from __future__ import annotations

from meshwave.kube.client import CLIENT_RETRIES, MeshKube, bound_retries
from meshwave.kube.deployments import (
    EXCLUDE_INBOUND,
    EXCLUDE_OUTBOUND,
    RESTARTED_AT,
    SIDECAR_RESOURCES,
    SMP,
    label_selector,
)
from meshwave.kube.errors import translate, unreachable_reason
from meshwave.kube.injection import (
    DEACTIVATED,
    DEFAULT_REVISION,
    INJECT_LABEL,
    INJECTOR_SELECTOR,
    LABEL_BEFORE_ANNOTATION,
    MERGE_PATCH,
    NS_INJECT_LABEL,
    REV_LABEL,
    TAG_LABEL,
    Injectors,
    injection_applies,
)
from meshwave.kube.state import (
    FAILING,
    POD_TEMPLATE_HASH,
    PROXY,
    REVISION_ANNOTATION,
    STARTING,
    ContainerIssue,
    PodState,
    RolloutState,
    WorkloadState,
    assess_rollout,
    current_replicaset,
    pod_state,
    replicaset_pods,
    workload_state,
)
from meshwave.kube.validation import validate_labels, validate_name
from meshwave.kube_errors import (  # callers catch them from here too
    AccessDenied,
    ClusterUnreachable,
    Conflict,
    InjectionBlocked,
    KubeError,
    NotFound,
    Rejected,
    ServerError,
    WorkloadNotFound,
)

__all__ = [
    "CLIENT_RETRIES", "DEACTIVATED", "DEFAULT_REVISION", "EXCLUDE_INBOUND", "EXCLUDE_OUTBOUND", "FAILING",
    "INJECTOR_SELECTOR", "INJECT_LABEL", "LABEL_BEFORE_ANNOTATION", "MERGE_PATCH", "NS_INJECT_LABEL",
    "POD_TEMPLATE_HASH", "PROXY", "RESTARTED_AT", "REVISION_ANNOTATION", "REV_LABEL", "SIDECAR_RESOURCES", "SMP",
    "STARTING", "TAG_LABEL", "AccessDenied", "ClusterUnreachable", "Conflict", "ContainerIssue", "InjectionBlocked",
    "Injectors", "KubeError", "MeshKube", "NotFound", "PodState", "Rejected", "RolloutState", "ServerError",
    "WorkloadNotFound", "WorkloadState", "assess_rollout", "bound_retries", "current_replicaset", "injection_applies",
    "label_selector", "pod_state", "replicaset_pods", "translate", "unreachable_reason", "validate_labels",
    "validate_name", "workload_state",
]
