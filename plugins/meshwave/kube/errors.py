"""Kubernetes API failures as meshwave's `KubeError`s (the classes are in kube_errors.py).

Every failure names the cluster, the verb, the object and the API's own Status message; a transport failure
(refused, timed out) is `ClusterUnreachable` with the reason in words.
"""

from __future__ import annotations

import json
from typing import Any

import urllib3
from kubernetes.client.rest import ApiException

from meshwave.kube_errors import AccessDenied, ClusterUnreachable, Conflict, KubeError, NotFound, Rejected, ServerError

_BY_CODE: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 401: AccessDenied, 403: AccessDenied,
                                        400: Rejected, 415: Rejected, 422: Rejected}


def translate(exc: ApiException, cluster: str, verb: str, target: str, server: str = "") -> KubeError:
    """An ApiException as a KubeError, with the Status message and reason parsed from the body."""
    code = int(exc.status or 0)
    if code == 0:  # the client's own transport failures (SSL, bad parameters) come as status 0
        return ClusterUnreachable(f"cluster {cluster} ({server}): {verb} {target}: {exc.reason}",
                                  cluster=cluster, verb=verb, target=target, reason=str(exc.reason))
    status = _status_body(exc.body)
    reason = str(status.get("reason") or exc.reason or "")
    api_message = str(status.get("message") or exc.reason or "")
    kind = _BY_CODE.get(code, ServerError if code >= 500 else KubeError)
    if status.get("kind") != "Status" and code == 404:  # a proxy or a wrong URL, not "object not found"
        kind = ServerError
        api_message += f" (not a Kubernetes Status: is {server or 'the server'} an API server?)"
    return kind(f"cluster {cluster}: {verb} {target}: {code} {reason}: {api_message}", cluster=cluster, verb=verb,
                target=target, code=code, reason=reason, api_message=api_message)


def _status_body(body: Any) -> dict[str, Any]:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        return {"message": str(body)[:300]}
    return parsed if isinstance(parsed, dict) else {}


def unreachable_reason(exc: BaseException, timeout: tuple[float, float]) -> str:
    cause = getattr(exc, "reason", None) or exc  # MaxRetryError wraps the last attempt's error
    text = str(cause)
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2: test for refusal first
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(cause, urllib3.exceptions.NewConnectionError):
        return text.rsplit(": ", 1)[-1]
    if isinstance(cause, urllib3.exceptions.ConnectTimeoutError):
        return f"connect timed out after {timeout[0]:g}s"
    if isinstance(cause, urllib3.exceptions.ReadTimeoutError):
        return f"no answer within {timeout[1]:g}s"
    return text
