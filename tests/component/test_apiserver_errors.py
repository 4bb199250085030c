"""Bad requests get Kubernetes Status errors with the right codes, and never take the lab down."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from meshstack.process import LabProcess
from tests.conftest import SMALL

pytestmark = pytest.mark.component


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    with LabProcess(SMALL, tmp_path_factory.mktemp("api-errors")) as started:
        yield started


def call(lab: LabProcess, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    server = lab.state["clusters"]["lab"]["server"]
    req = urllib.request.Request(server + path, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


PA_URL = "/apis/security.istio.io/v1/namespaces/shop/peerauthentications"


@pytest.mark.parametrize(("method", "path", "body", "ctype", "code", "reason", "text"), [
    ("POST", PA_URL, b"{not json", "application/json", 400, "BadRequest", "could not be decoded"),
    ("POST", PA_URL, b"[1, 2]", "application/json", 400, "BadRequest", "must be a JSON or YAML object"),
    ("GET", "/api/v1/namespaces/shop/widgets", None, "", 404, "NotFound", "could not find the requested resource"),
    ("GET", "/apis/nope.io/v1/things", None, "", 404, "NotFound", "could not find the requested resource"),
    ("GET", "/apis/apps/v7/deployments", None, "", 404, "NotFound", "could not find the requested resource"),
    ("GET", "/apis/apps/v1/namespaces/shop/deployments/ghost", None, "", 404, "NotFound",
     'deployments.apps "ghost" not found'),
    ("DELETE", PA_URL + "/ghost", None, "", 404, "NotFound", 'peerauthentications.security.istio.io "ghost" not found'),
    ("POST", "/apis/apps/v1/namespaces/shop/deployments/auth", b"{}", "application/json", 405, "MethodNotAllowed", ""),
    ("PATCH", "/apis/apps/v1/namespaces/shop/deployments/auth", b"{}", "text/plain", 415, "UnsupportedMediaType", ""),
    ("PATCH", PA_URL + "/ghost", b"{}", "application/merge-patch+json", 404, "NotFound", ""),
    ("POST", "/api/v1/namespaces", b'{"metadata": {"name": "Bad_Name"}}', "application/json", 422, "Invalid",
     "metadata.name"),
    ("POST", "/api/v1/namespaces/ghost/services", b'{"metadata": {"name": "x"}}', "application/json", 404,
     "NotFound", 'namespaces "ghost" not found'),
    ("POST", "/api/v1/namespaces", b'{"metadata": {"name": "shop"}}', "application/json", 409, "AlreadyExists",
     'namespaces "shop" already exists'),
    ("GET", "/apis/apps/v1/deployments?labelSelector=app+in+oops", None, "", 400, "BadRequest", "unable to parse"),
    ("GET", "/apis/apps/v1/deployments?watch=true&resourceVersion=x", None, "", 400, "BadRequest", ""),
])
def test_bad_requests_get_status_errors(lab: LabProcess, method: str, path: str, body: bytes | None,
                                        ctype: str, code: int, reason: str, text: str) -> None:
    status, answer = call(lab, method, path, body, ctype)
    assert (status, answer["kind"], answer["status"], answer["code"], answer["reason"]) == \
        (code, "Status", "Failure", code, reason)
    assert text in answer["message"]
    ok, version = call(lab, "GET", "/version")
    assert ok == 200 and version["gitVersion"].startswith("v1.")


def test_admin_endpoint_validates_fault_knobs(small_lab: LabProcess) -> None:
    changed = small_lab.admin("PATCH", "/services/lab/shop/auth", {"error_rate": 0.25})
    assert changed["knobs"]["error_rate"] == 0.25 and changed["success_rate"] == pytest.approx(0.75)
    for body, text in (({"error_rate": 7}, "error_rate: Input should be less than or equal to 1"),
                       ({"colour": "red"}, "cannot change colour")):
        with pytest.raises(urllib.error.HTTPError) as err:
            small_lab.admin("PATCH", "/services/lab/shop/auth", body)
        assert err.value.code == 400 and text in json.loads(err.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        small_lab.admin("GET", "/services/lab/shop/ghost")
    assert err.value.code == 404


def test_watch_streams_events_and_ends_at_its_timeout(lab: LabProcess) -> None:
    server = lab.state["clusters"]["lab"]["server"]
    query = "watch=true&timeoutSeconds=1&fieldSelector=metadata.name%3Dauth"
    url = f"{server}/apis/apps/v1/namespaces/shop/deployments?{query}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        events = [json.loads(line) for line in resp.read().splitlines()]
    assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == "auth"
    assert {e["object"]["metadata"]["name"] for e in events} == {"auth"}
