"""The headroom preflight against a running lab: the proxy's own limit, quotas, limit ranges and nodes, read
through MeshKube as the DAG's preflight reads them (tests/component/headroom.yaml)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshstack.process import LabProcess
from meshwave import headroom
from meshwave.kube import MeshKube
from tests.component.kubes import api_client

TOPOLOGY = Path(__file__).with_name("headroom.yaml")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabProcess]:
    with LabProcess(TOPOLOGY, tmp_path_factory.mktemp("lab")) as running:
        yield running


def kube_of(lab: LabProcess, cluster: str = "lab") -> MeshKube:
    return MeshKube(api_client(lab, cluster), cluster)


def test_a_namespace_at_its_quota_blocks_with_the_quota_and_its_numbers(lab: LabProcess) -> None:
    with pytest.raises(headroom.HeadroomBlocked) as info:
        headroom.check(kube_of(lab), "quota", "tight", {}, 128, injected=False)
    message = str(info.value)
    # 2 replicas x 1024Mi (Istio's default proxy limit) + 1 surge pod x (512Mi + 1024Mi) = 3584Mi; 3Gi - 1Gi used.
    assert "ResourceQuota quota/compute: limits.memory hard 3072Mi, used 1024Mi, free 2048Mi < 3584Mi needed" \
        in message, message
    assert "403 Forbidden" in message


def test_a_limit_range_max_under_the_proxy_s_limit_blocks_with_the_api_s_words(lab: LabProcess) -> None:
    with pytest.raises(headroom.HeadroomBlocked,
                       match=r"LimitRange capped/limits: maximum memory usage per Container is 512Mi, "
                             r"but limit is 1024Mi\."):
        headroom.check(kube_of(lab), "capped", "small", {}, 128, injected=False)


def test_plan_annotations_within_the_limit_range_pass_it_and_then_the_nodes_decide(lab: LabProcess) -> None:
    sized = {"sidecar.istio.io/proxyMemory": "128Mi", "sidecar.istio.io/proxyMemoryLimit": "256Mi",
             "sidecar.istio.io/proxyCPULimit": "500m"}
    # The LimitRange passes the 256Mi proxy; this cluster's nodes have 256Mi left, and 1 proxy (128Mi) plus one
    # surge pod (256Mi + 128Mi) request 512Mi.
    with pytest.raises(headroom.HeadroomBlocked, match=r"^the 2 node\(s\) have 256Mi .* < 512Mi requested"):
        headroom.check(kube_of(lab), "capped", "small", sized, 128, injected=False)
    found = headroom.check(kube_of(lab), "capped", "small", sized, 128, injected=True)
    assert found.proxy.source == "the sidecar.istio.io/proxy* annotations"
    assert found.summary().startswith("the istio-proxy limit 256Mi (the sidecar.istio.io/proxy* annotations) holds")


def test_nodes_without_room_for_the_extra_requests_block(lab: LabProcess) -> None:
    with pytest.raises(headroom.HeadroomBlocked, match=r"the 2 node\(s\) have 256Mi of allocatable memory not yet "
                                                       r"requested < 1664Mi requested by"):
        headroom.check(kube_of(lab), "filled", "big", {}, 128, injected=False)


def test_the_injector_s_values_size_the_proxy_and_everything_fits(lab: LabProcess) -> None:
    found = headroom.check(kube_of(lab, "open"), "roomy", "fine", {}, 200, injected=False)
    assert found.proxy.source == ("the injector's values.global.proxy.resources "
                                  "(istio-system/istio-sidecar-injector)")
    assert found.proxy.get("limits", "memory") == 256 * 2**20
    assert found.notes == []
    with pytest.raises(headroom.HeadroomBlocked, match=r"own memory limit 256Mi \(the injector's values"):
        headroom.check(kube_of(lab, "open"), "roomy", "fine", {}, 300, injected=False)
