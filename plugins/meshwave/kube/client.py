"""`MeshKube`: one cluster through a kubernetes-client `ApiClient`: its API objects, the transport every read and
write goes through (errors translated, dry run honoured), and the resources mixed in from the modules beside.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from meshwave.changes import Change, utc_now
from meshwave.kube.canaries import Canaries
from meshwave.kube.capacity import Capacity
from meshwave.kube.deployments import Deployments
from meshwave.kube.errors import translate, unreachable_reason
from meshwave.kube.injection import Injection
from meshwave.kube.namespaces import Namespaces
from meshwave.kube.pending_annotation import PendingAnnotations
from meshwave.kube.state import _meta
from meshwave.kube.validation import validate_name
from meshwave.kube_errors import ClusterUnreachable, ServerError
from meshwave.lease import Leases
from meshwave.peer_auth import PeerAuthentications

# The kubernetes client's urllib3 pool retries a GET, PUT or DELETE three more times after a read timeout, unseen:
# four read timeouts per call (a minute at 15 s) before the step hears of it. One quick retry is kept (a pooled
# connection the server just closed, a refused connect); waiting out an outage is Airflow's job, with backoff, and
# every step reads before it writes. No sleeping on a Retry-After: a 429 or 503 is the step's error, retried the same.
CLIENT_RETRIES = urllib3.util.Retry(total=1, redirect=0, status=0, respect_retry_after_header=False,
                                    raise_on_status=False)


def bound_retries(api_client: client.ApiClient) -> None:
    """Make the client's connection pools (those created from now on) retry as CLIENT_RETRIES says."""
    pools = getattr(getattr(api_client, "rest_client", None), "pool_manager", None)
    if pools is not None:
        pools.connection_pool_kw["retries"] = CLIENT_RETRIES


# ---- the cluster ----------------------------------------------------------------------------------
class MeshKube(Deployments, Namespaces, Injection, Canaries, PendingAnnotations, Capacity):
    """One cluster, through a kubernetes-client ApiClient."""

    def __init__(self, api_client: client.ApiClient, cluster: str, root_namespace: str = "istio-system",
                 dry_run: bool = False, *, connect_timeout: float = 3.0, read_timeout: float = 15.0,
                 revision: str | None = None) -> None:
        self.cluster = cluster
        # The plan's injection revision (clusters.<name>.revision); None: found from the injection webhooks.
        self.revision = None if revision is None else validate_name(revision, "revision")
        self.root_namespace = validate_name(root_namespace, "root_namespace")
        self.dry_run = dry_run
        self.server = getattr(api_client.configuration, "host", "")
        self.timeout = (connect_timeout, read_timeout)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.admission = client.AdmissionregistrationV1Api(api_client)
        self.api_client = api_client
        bound_retries(api_client)

    # ---- transport ---------------------------------------------------------------------------------
    def _call(self, verb: str, target: str, fn: Callable[..., Any], *args: Any,
              timeout: tuple[float, float] | None = None, **kwargs: Any) -> dict[str, Any]:
        timeout = timeout or self.timeout
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
            data = resp.data
        except ApiException as exc:
            raise translate(exc, self.cluster, verb, target, self.server) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ClusterUnreachable(f"cluster {self.cluster} ({self.server}): {unreachable_reason(exc, timeout)}",
                                     cluster=self.cluster, verb=verb, target=target) from None
        try:
            return json.loads(data) if data else {}
        except ValueError:
            raise ServerError(f"cluster {self.cluster}: {verb} {target}: the answer is not JSON: {data[:200]!r}",
                              cluster=self.cluster, verb=verb, target=target) from None

    def _send(self, change: Change, call: Callable[[], dict[str, Any]]) -> Change:
        """Perform the change's request, or in dry run describe it and write nothing."""
        assert change.request is not None
        if self.dry_run:
            change.dry_run = True
            change.reason = f"dry run: would {change.request.describe()}; {change.reason}"
            return change
        obj = call()
        change.applied = True
        change.resource_version = _meta(obj).get("resourceVersion")
        change.timestamp = utc_now()
        return change

    def _noop(self, action: str, target: str, state: Any, reason: str) -> Change:
        return Change(self.cluster, action, target, before=state, after=state, reason=reason,
                      dry_run=self.dry_run)

    # The resource modules (peer_auth, probe) write through the same transport, errors and dry run.
    call, send, noop = _call, _send, _noop

    @functools.cached_property
    def mtls(self) -> PeerAuthentications:
        """This cluster's PeerAuthentications: every mTLS read and write goes through it."""
        return PeerAuthentications(self)

    def api_group(self, group: str) -> dict[str, Any]:
        """The API discovery document of one group (`/apis/<group>`): its served versions."""
        return self._call("GET", f"/apis/{group}", self.api_client.call_api, f"/apis/{group}", "GET",
                          auth_settings=["BearerToken"], header_params={"Accept": "application/json"},
                          _return_http_data_only=True)

    # ---- reads -------------------------------------------------------------------------------------
    def ping(self) -> str:
        """The server's version; fails fast with ClusterUnreachable."""
        # kubectl's path; VersionApi.get_code asks for "/version/", which the lab does not serve
        info = self._call("GET", "/version", self.api_client.call_api, "/version", "GET", auth_settings=["BearerToken"],
                          header_params={"Accept": "application/json"}, _return_http_data_only=True,
                          timeout=(self.timeout[0], 5.0))
        return str(info.get("gitVersion") or "unknown")

    # ---- one writer per workload (lease.py) -------------------------------------------------------
    @functools.cached_property
    def leases(self) -> Leases:
        """The meshwave.io/lease annotations of this cluster's Deployments, written conditionally."""
        return Leases(self)
