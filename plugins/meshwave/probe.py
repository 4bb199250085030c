"""The plaintext probe: proof from the data plane that a workload refuses callers without a sidecar.

Policies say what Istio should enforce; only a request says what the proxy does. After a flip to STRICT,
meshwave starts a short-lived pod without a sidecar (`sidecar.istio.io/inject: "false"`) in the workload's
namespace that runs curl against the workload's Service, and reads curl's exit code:

- 56 (connection reset by the peer): the workload's proxy refused plaintext. STRICT is in force.
- 0 or 22 (an HTTP answer): plaintext reached the application. STRICT is NOT in force.
- anything else (no Service, no endpoint, DNS, timeout, the pod never ran): nothing is proven.

The share of mTLS requests proves nothing here: with every caller meshed it is 100 % under PERMISSIVE too.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from meshwave.kube_errors import NotFound

if TYPE_CHECKING:
    from meshwave.kube import MeshKube

PROBE_FOR_LABEL = "meshwave.io/probe-for"
REFUSED_CODES = {56: "connection reset by the workload's proxy"}
REACHED_CODES = {0: "an HTTP answer", 22: "an HTTP error answer"}
CURL_CODES = {6: "could not resolve the Service's name", 7: "connection refused (no endpoint listening)",
              28: "timed out", 52: "empty reply"}


class ProbeVerdict(StrEnum):
    REFUSED = "refused"  # STRICT is in force
    REACHED = "reached"  # plaintext got through: not STRICT
    INCONCLUSIVE = "inconclusive"


class ProbeResult(BaseModel):
    verdict: ProbeVerdict
    message: str
    url: str | None = None
    pod: str | None = None
    exit_code: int | None = None
    seconds: float = 0.0


def verdict_of(exit_code: int) -> tuple[ProbeVerdict, str]:
    """What curl's exit code proves."""
    if exit_code in REFUSED_CODES:
        return ProbeVerdict.REFUSED, f"curl exit {exit_code}: {REFUSED_CODES[exit_code]}"
    if exit_code in REACHED_CODES:
        return ProbeVerdict.REACHED, f"curl exit {exit_code}: {REACHED_CODES[exit_code]}: plaintext was accepted"
    return ProbeVerdict.INCONCLUSIVE, f"curl exit {exit_code}: {CURL_CODES.get(exit_code, 'an error')}"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def service_url(services: list[dict[str, Any]], ns: str, pod_labels: dict[str, str]) -> str | None:
    """http://<service>.<ns>.svc.cluster.local:<port>/ of the first Service (by name) selecting the pods."""
    for svc in sorted(services, key=lambda s: (s.get("metadata") or {}).get("name", "")):
        spec = svc.get("spec") or {}
        ports = [p for p in spec.get("ports") or [] if p.get("protocol", "TCP") == "TCP"]
        if ports and _selects(spec.get("selector") or {}, pod_labels):
            name = (svc.get("metadata") or {}).get("name")
            return f"http://{name}.{ns}.svc.cluster.local:{ports[0]['port']}/"
    return None


def probe_pod(ns: str, workload: str, image: str, url: str, deadline: int) -> dict[str, Any]:
    name = f"meshwave-probe-{workload}"[:56].rstrip("-") + "-" + secrets.token_hex(3)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"sidecar.istio.io/inject": "false", "app.kubernetes.io/managed-by": "meshwave",
                                PROBE_FOR_LABEL: workload}},
        "spec": {
            "restartPolicy": "Never", "activeDeadlineSeconds": deadline, "automountServiceAccountToken": False,
            "containers": [{
                "name": "probe", "image": image,
                "command": ["curl", "-sS", "-o", "/dev/null", "--max-time", "5", url],
                "terminationMessagePolicy": "FallbackToLogsOnError",  # curl's error line as the message
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                              "limits": {"cpu": "100m", "memory": "32Mi"}},
                "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 100,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        done = (status.get("state") or {}).get("terminated")
        if done is not None:
            return done
    return None


class PlaintextProbe:
    """Runs the probe pod on one cluster and cleans up after it (its own earlier pods too)."""

    def __init__(self, kube: MeshKube, image: str, timeout_seconds: float, poll_seconds: float = 1.0) -> None:
        self.kube, self.image, self.timeout, self.poll = kube, image, timeout_seconds, poll_seconds

    def run(self, ns: str, workload: str) -> ProbeResult:
        started = time.monotonic()
        labels, _ = self.kube.template_labels(ns, workload)
        services = self.kube.call("LIST", f"services {ns}", self.kube.core.list_namespaced_service, ns)
        url = service_url(services.get("items", []), ns, labels)
        if url is None:
            return ProbeResult(verdict=ProbeVerdict.INCONCLUSIVE,
                               message=f"no Service in {ns} selects {workload}'s pods: nothing to send a request to")
        self._clean(ns, workload)
        pod = probe_pod(ns, workload, self.image, url, int(self.timeout) + 30)
        name = pod["metadata"]["name"]
        self.kube.call("POST", f"pod {ns}/{name}", self.kube.core.create_namespaced_pod, ns, pod)
        try:
            result = self._wait(ns, name, url)
        finally:
            self._delete(ns, name)
        return result.model_copy(update={"seconds": round(time.monotonic() - started, 2)})

    def _wait(self, ns: str, name: str, url: str) -> ProbeResult:
        deadline = time.monotonic() + self.timeout
        phase = "Pending"
        while time.monotonic() < deadline:
            pod = self.kube.call("GET", f"pod {ns}/{name}", self.kube.core.read_namespaced_pod, name, ns)
            phase = (pod.get("status") or {}).get("phase", "Pending")
            done = _terminated(pod)
            if done is not None:
                code = int(done.get("exitCode", -1))
                verdict, why = verdict_of(code)
                detail = f" ({done['message'].strip()})" if done.get("message") else ""
                return ProbeResult(verdict=verdict, message=f"{why}{detail}", url=url, pod=name, exit_code=code)
            time.sleep(self.poll)
        return ProbeResult(verdict=ProbeVerdict.INCONCLUSIVE, url=url, pod=name,
                           message=f"probe pod {ns}/{name} did not finish within {self.timeout:g}s (phase {phase})")

    def _clean(self, ns: str, workload: str) -> None:
        """Probe pods an earlier, interrupted try left behind."""
        left = self.kube.call("LIST", f"pods {ns}", self.kube.core.list_namespaced_pod, ns,
                              label_selector=f"{PROBE_FOR_LABEL}={workload}").get("items", [])
        for pod in left:
            self._delete(ns, (pod.get("metadata") or {}).get("name", ""))

    def _delete(self, ns: str, name: str) -> None:
        with contextlib.suppress(NotFound):  # gone already: what deleting wanted
            self.kube.call("DELETE", f"pod {ns}/{name}", self.kube.core.delete_namespaced_pod, name, ns,
                           grace_period_seconds=0)
