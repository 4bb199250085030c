"""The seed's outage, replayed on the full seed fleet and seen in a real Prometheus, then recovered."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client, config

from meshstack.process import LabProcess, PrometheusProcess
from tests.component.seed_outage import inject_namespaces, mesh_wide_strict
from tests.conftest import SEED, below, eventually

pytestmark = pytest.mark.component

CLUSTER = "prod-eu-1"
SUCCESS = ('sum(rate(http_requests_total{{cluster="{c}", {sel}code!~"5.."}}[10s])) / '
           'sum(rate(http_requests_total{{cluster="{c}", {sel}}}[10s]))')


def success(prom: PrometheusProcess, selector: str = "") -> float | None:
    result = prom.query(SUCCESS.format(c=CLUSTER, sel=selector))
    return float(result[0]["value"][1]) if result else None


def test_mesh_wide_strict_reproduces_the_outage_and_permissive_recovers(tmp_path: Path) -> None:
    with LabProcess(SEED, tmp_path / "lab") as lab, PrometheusProcess([lab.metrics_target], tmp_path / "prom") as prom:
        api = config.new_client_from_config(config_file=lab.kubeconfig(CLUSTER))
        custom = client.CustomObjectsApi(api)
        eventually(lambda: success(prom) == 1.0, timeout=40, what="a healthy fleet in Prometheus")

        inject_namespaces(lab, prom, CLUSTER)
        assert success(prom) == 1.0, "PERMISSIVE: sidecars or not, everyone still talks"

        mesh_wide_strict(lab, CLUSTER)
        eventually(lambda: below(success(prom), 0.9), timeout=40, what="the fleet's success rate collapsing")
        for caller, ns in (("blackbox-exporter", "monitoring"), ("batch-processor", "external"),
                           ("api-gateway", "edge")):
            eventually(lambda c=caller, n=ns: below(success(prom, f'namespace="{n}", app="{c}", '), 0.5),
                       timeout=30, what=f"{caller} cut off")

        # The fix that works: back to PERMISSIVE (no restart needed).
        custom.patch_namespaced_custom_object("security.istio.io", "v1", "istio-system", "peerauthentications",
                                              "default", {"spec": {"mtls": {"mode": "PERMISSIVE"}}})
        eventually(lambda: success(prom) == 1.0, timeout=40, what="the fleet recovering under PERMISSIVE")
