"""meshwave.kube and meshwave.changes without a cluster: rollout verdicts, pod states, names, errors, records."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from urllib3.exceptions import MaxRetryError, NewConnectionError

from meshwave.changes import ApiRequest, Change
from meshwave.kube import (
    AccessDenied,
    ClusterUnreachable,
    Conflict,
    ContainerIssue,
    InjectionBlocked,
    Injectors,
    KubeError,
    MeshKube,
    NotFound,
    PodState,
    Rejected,
    RolloutState,
    ServerError,
    WorkloadState,
    assess_rollout,
    current_replicaset,
    injection_applies,
    label_selector,
    translate,
    unreachable_reason,
    validate_labels,
    validate_name,
    workload_state,
)
from meshwave.mtls import Mode

# ---- assess_rollout over hand-built states ----------------------------------------------------------


def pod(name: str, current: bool = True, ready: bool = True, proxy: bool = True, proxy_ready: bool | None = None,
        issues: list[Any] | None = None) -> PodState:
    return PodState(name, current, ready, proxy, ready if proxy_ready is None else proxy_ready and proxy,
                    "Running", issues or [])


def state(pods: list[PodState], replicas: int = 2, updated: int | None = None, available: int | None = None,
          generation: int = 2, observed: int = 2, progressing: tuple[str, str] = ("True", "ReplicaSetUpdated"),
          replicaset: str | None = "auth-new") -> WorkloadState:
    new = sum(p.current for p in pods)
    return WorkloadState(
        "lab", "shop", "auth", replicas, generation=generation, observed_generation=observed,
        updated_replicas=new if updated is None else updated, ready_replicas=sum(p.ready for p in pods),
        available_replicas=sum(p.ready for p in pods) if available is None else available,
        status_replicas=len(pods), progressing_status=progressing[0], progressing_reason=progressing[1], pods=pods,
        replicaset=replicaset)


def issue(container: str, reason: str, restarts: int = 1, waiting: str | None = "CrashLoopBackOff") -> ContainerIssue:
    return ContainerIssue(container, reason, restarts, waiting)


def test_done_when_every_pod_is_new_available_and_proxied() -> None:
    verdict = assess_rollout(state([pod("a-1"), pod("a-2")]), expect_proxy=True)
    assert verdict.done and not verdict.failed
    assert (verdict.updated, verdict.available, verdict.proxies_ready, verdict.old_pods) == (2, 2, 2, 0)


def test_mixed_old_and_new_pods_is_progressing_with_counts() -> None:
    mixed = state([pod("old-1", current=False, proxy=False), pod("old-2", current=False, proxy=False),
                   pod("new-1", ready=False)], available=2)
    verdict = assess_rollout(mixed, expect_proxy=True)
    assert verdict.status == "progressing"
    assert "1/2 updated" in verdict.message and "2 old pod(s) left" in verdict.message
    assert verdict.old_pods == 2


def test_oom_in_a_new_pod_fails_fast_naming_pod_and_container() -> None:
    oom = state([pod("old-1", current=False, proxy=False), pod("old-2", current=False, proxy=False),
                 pod("new-1", ready=False, issues=[issue("payment", "OOMKilled")])])
    verdict = assess_rollout(oom, expect_proxy=True)
    assert verdict.failed
    assert (verdict.pod, verdict.container, verdict.reason) == ("new-1", "payment", "OOMKilled")
    assert "new-1" in verdict.message and "payment: OOMKilled" in verdict.message


def test_oomkilled_beats_crashloop_when_a_pod_has_both() -> None:
    both = state([pod("new-1", ready=False, issues=[issue("istio-proxy", "CrashLoopBackOff"),
                                                    issue("app", "OOMKilled")])])
    assert assess_rollout(both).reason == "OOMKilled"


def test_crashloop_and_error_fail() -> None:
    crash = state([pod("new-1", ready=False, issues=[issue("app", "CrashLoopBackOff")]), pod("new-2")])
    assert assess_rollout(crash).reason == "CrashLoopBackOff"
    legacy = state([pod("new-1", ready=False, issues=[issue("email-service", "Error", waiting=None)])], replicas=1)
    assert assess_rollout(legacy).reason == "Error"


def test_crashing_old_pods_do_not_fail_the_rollback_rollout() -> None:
    # Removing injection from an OOMing workload: the crashing pods are the OLD template now.
    rollback = state([pod("old-oom", current=False, ready=False, issues=[issue("payment", "OOMKilled")]),
                      pod("old-ok", current=False, proxy=True), pod("new-1", proxy=False)], available=2)
    assert assess_rollout(rollback, expect_proxy=False).status == "progressing"


def test_a_non_failing_waiting_reason_does_not_fail() -> None:
    pulling = state([pod("new-1", ready=False, issues=[issue("app", "ImagePullBackOff", 0, "ImagePullBackOff")]),
                     pod("new-2")], available=1)
    assert assess_rollout(pulling).status == "progressing"


def test_progress_deadline_exceeded_fails() -> None:
    stuck = state([pod("old-1", current=False), pod("new-1", ready=False)], available=1,
                  progressing=("False", "ProgressDeadlineExceeded"))
    verdict = assess_rollout(stuck)
    assert verdict.failed and verdict.reason == "ProgressDeadlineExceeded"


def test_unobserved_generation_is_progressing_even_if_counts_look_done() -> None:
    verdict = assess_rollout(state([pod("a-1"), pod("a-2")], generation=3, observed=2))
    assert verdict.status == "progressing" and "generation 3" in verdict.message


def test_proxy_expectations() -> None:
    no_proxy = state([pod("a-1", proxy=False), pod("a-2", proxy=False)])
    assert assess_rollout(no_proxy, expect_proxy=True).reason == "ProxyMissing"
    assert assess_rollout(no_proxy, expect_proxy=False).done
    assert assess_rollout(no_proxy, expect_proxy=None).done
    proxied = state([pod("a-1"), pod("a-2")])
    assert assess_rollout(proxied, expect_proxy=False).reason == "ProxyPresent"
    warming = state([pod("a-1"), pod("a-2", proxy_ready=False)])
    assert assess_rollout(warming, expect_proxy=True).status == "progressing"


def test_zero_replicas_is_done() -> None:
    assert assess_rollout(state([], replicas=0)).done


def test_without_the_current_replicaset_the_rollout_is_never_done() -> None:
    # The counts look finished, but the controller has not created (or recorded) the current ReplicaSet yet.
    verdict = assess_rollout(state([pod("a-1", current=False), pod("a-2", current=False)], updated=2,
                                   replicaset=None), expect_proxy=None)
    assert verdict.status == "progressing" and "create the ReplicaSet" in verdict.message


def test_an_unobserved_template_never_judges_the_previous_replicaset() -> None:
    # A rollback of an OOMing rollout: until the controller observes it, the crashing pods are still "current".
    crashing = state([pod("new-1", ready=False, issues=[issue("payment", "OOMKilled")])], replicas=1,
                     generation=4, observed=3, progressing=("False", "ProgressDeadlineExceeded"))
    assert assess_rollout(crashing, expect_proxy=False).status == "progressing"


def test_progress_deadline_is_read_from_the_reason_as_kubectl_does() -> None:
    stuck = state([pod("new-1", ready=False)], replicas=1, available=0,
                  progressing=("Unknown", "ProgressDeadlineExceeded"))
    assert assess_rollout(stuck).reason == "ProgressDeadlineExceeded"


def test_kubectl_order_old_replicas_pending_termination() -> None:
    surge = state([pod("new-1"), pod("new-2")], updated=2)
    surge.status_replicas = 3  # one old pod terminating that the pod list no longer shows
    verdict = assess_rollout(surge)
    assert verdict.status == "progressing" and "1 old replicas are pending termination" in verdict.message


# ---- workload_state from API objects -----------------------------------------------------------------


def deployment(labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "payment", "namespace": "shop", "generation": 2, "resourceVersion": "9",
                     "uid": "dep-uid", "annotations": {"deployment.kubernetes.io/revision": "2"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "payment"}}, "template": {
            "metadata": {"labels": labels, "annotations": annotations or {}},
            "spec": {"containers": [{"name": "payment", "image": "payment:1", "resources": {
                "limits": {"memory": "512Mi"}, "requests": {"memory": "400Mi"}}}]}}},
        "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1, "availableReplicas": 2,
                   "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]},
    }


def replicaset(pod_hash: str, revision: str, owner_uid: str = "dep-uid") -> dict[str, Any]:
    return {"metadata": {"name": f"payment-{pod_hash}", "namespace": "shop", "uid": f"rs-{pod_hash}",
                         "labels": {"app": "payment", "pod-template-hash": pod_hash},
                         "annotations": {"deployment.kubernetes.io/revision": revision},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "payment",
                                              "uid": owner_uid, "controller": True}]},
            "spec": {"selector": {"matchLabels": {"app": "payment", "pod-template-hash": pod_hash}}}}


def api_pod(name: str, pod_hash: str, labels: dict[str, str], proxy: bool, statuses: list[dict[str, Any]],
            ready: bool = True, created: str = "2026-01-01T00:00:00Z", annotations: dict[str, str] | None = None,
            image: str = "payment:1") -> dict[str, Any]:
    containers = [{"name": "payment", "image": image}] + ([{"name": "istio-proxy", "image": "px"}] if proxy
                                                            else [])
    extra = {"security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": "payment"} if proxy else {}
    return {
        "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created,
                     "labels": {**labels, **extra, "pod-template-hash": pod_hash},
                     "annotations": {**(annotations or {}), **({"sidecar.istio.io/status": "{}"} if proxy else {})},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": f"payment-{pod_hash}", "uid": f"rs-{pod_hash}",
                                          "controller": True}]},
        "spec": {"containers": containers},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}],
                   "containerStatuses": statuses},
    }


RUNNING = {"state": {"running": {}}, "ready": True, "restartCount": 0}


def test_workload_state_classifies_pods_and_reads_memory_and_reasons() -> None:
    new_labels = {"app": "payment", "sidecar.istio.io/inject": "true"}
    dep = deployment(new_labels)
    crashing = {"name": "payment", "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "ready": False,
                "restartCount": 2, "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
    pods = [api_pod("payment-old-1", "old", {"app": "payment"}, False, [{"name": "payment", **RUNNING}]),
            api_pod("payment-old-2", "old", {"app": "payment"}, False, [{"name": "payment", **RUNNING}]),
            api_pod("payment-new-1", "new", new_labels, True, [crashing, {"name": "istio-proxy", **RUNNING}],
                    ready=False)]
    w = workload_state("lab", dep, pods, [replicaset("old", "1"), replicaset("new", "2")])
    assert (w.replicas, w.generation, w.observed_generation, w.updated_replicas, w.status_replicas) == (2, 2, 2, 1, 3)
    assert w.replicaset == "payment-new"
    assert (w.memory_limit_bytes, w.memory_request_bytes, w.app_container) == (512 * 2**20, 400 * 2**20, "payment")
    assert [p.name for p in w.new_pods] == ["payment-new-1"]
    assert (w.pods_total, w.pods_ready, w.pods_with_proxy, w.proxies_ready) == (3, 2, 1, 1)
    new = w.new_pods[0]
    assert str(new.issues[0]) == "payment: OOMKilled (CrashLoopBackOff, 2 restarts)"
    verdict = assess_rollout(w)
    assert verdict.failed and verdict.reason == "OOMKilled" and verdict.pod == "payment-new-1"
    assert RolloutState.from_dict(json.loads(json.dumps(verdict.to_dict()))) == verdict
    assert json.loads(json.dumps(w.to_dict()))["pods_with_proxy"] == 1


def test_pods_rewritten_by_metrics_merging_and_digest_pinning_are_current() -> None:
    # The template says port 8080 and a tag; Istio's metrics merging and an admission webhook changed both on
    # the pods. The ReplicaSet and pod-template-hash still say which pods the current template made.
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    merged = {"prometheus.io/scrape": "true", "prometheus.io/port": "15020", "prometheus.io/path": "/stats/prometheus"}
    digest = "registry.lab/payment@sha256:" + "ab" * 32
    labels = {"app": "payment", "sidecar.istio.io/inject": "true"}
    dep = deployment(labels, scrape)
    dep["status"] = {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
    proxied = [{"name": "payment", **RUNNING}, {"name": "istio-proxy", **RUNNING}]
    pods = [api_pod(f"payment-new-{i}", "new", labels, True, proxied, annotations=merged, image=digest)
            for i in (1, 2)]
    w = workload_state("lab", dep, pods, [replicaset("old", "1"), replicaset("new", "2")])
    assert [p.name for p in w.new_pods] == ["payment-new-1", "payment-new-2"] and not w.old_pods
    verdict = assess_rollout(w, expect_proxy=True)
    assert verdict.done, verdict


def test_the_current_replicaset_is_owned_by_the_deployment_and_at_its_revision() -> None:
    dep = deployment({"app": "payment"})
    foreign = replicaset("other", "2", owner_uid="someone-else")  # same selector and revision, other owner
    assert current_replicaset(dep, [replicaset("old", "1"), foreign]) is None
    assert current_replicaset(dep, [replicaset("old", "1"), replicaset("new", "2"), foreign])["metadata"]["name"] \
        == "payment-new"
    unsynced = deployment({"app": "payment"})
    del unsynced["metadata"]["annotations"]  # a new Deployment the controller has not synced yet
    assert current_replicaset(unsynced, [replicaset("new", "2")]) is None


def test_pods_of_the_old_replicaset_or_of_another_owner_are_not_current() -> None:
    dep = deployment({"app": "payment"})
    running = [{"name": "payment", **RUNNING}]
    adopted = api_pod("payment-new-x", "new", {"app": "payment"}, False, running)
    adopted["metadata"]["ownerReferences"][0]["uid"] = "rs-of-a-deleted-replicaset"
    pods = [api_pod("payment-old-1", "old", {"app": "payment"}, False, running),
            api_pod("payment-new-1", "new", {"app": "payment"}, False, running), adopted]
    w = workload_state("lab", dep, pods, [replicaset("old", "1"), replicaset("new", "2")])
    assert [p.name for p in w.new_pods] == ["payment-new-1"]
    assert [p.name for p in w.old_pods] == ["payment-old-1", "payment-new-x"]
    assert workload_state("lab", dep, pods).new_pods == []  # no ReplicaSets given: nothing is current


def test_native_sidecar_counts_as_proxy() -> None:
    dep = deployment({"app": "payment"})
    native = api_pod("payment-a", "h", {"app": "payment"}, False, [{"name": "payment", **RUNNING}])
    native["spec"]["initContainers"] = [{"name": "istio-proxy", "image": "px", "restartPolicy": "Always"}]
    native["status"]["initContainerStatuses"] = [{"name": "istio-proxy", **RUNNING}]
    w = workload_state("lab", dep, [native], [replicaset("h", "2")])
    assert w.pods[0].has_proxy and w.pods[0].proxy_ready and w.pods[0].current


def test_injection_precedence() -> None:
    assert injection_applies({}, {"sidecar.istio.io/inject": "true"})
    assert not injection_applies({"istio-injection": "disabled"}, {"sidecar.istio.io/inject": "true"})
    assert not injection_applies({"istio-injection": "enabled"}, {"sidecar.istio.io/inject": "false"})
    assert injection_applies({"istio-injection": "enabled"}, {})
    assert injection_applies({"istio.io/rev": "canary"}, {})
    assert not injection_applies({}, {})


def test_injection_needs_a_served_revision() -> None:
    revision_only = frozenset({"1-24-0"})
    assert not injection_applies({}, {"sidecar.istio.io/inject": "true"}, revision_only)  # no default injector
    assert injection_applies({}, {"istio.io/rev": "1-24-0"}, revision_only)
    assert not injection_applies({"istio-injection": "enabled"}, {}, revision_only)
    assert injection_applies({"istio.io/rev": "1-24-0"}, {"sidecar.istio.io/inject": "true"}, revision_only)
    # the default injector skips a pod that names a revision; a namespace revision beats the pod's
    assert not injection_applies({}, {"istio.io/rev": "canary", "sidecar.istio.io/inject": "true"},
                                 frozenset({"default"}))
    assert not injection_applies({"istio.io/rev": "gone"}, {"istio.io/rev": "1-24-0"}, revision_only)
    assert not injection_applies({"istio.io/rev": "1-24-0"}, {"sidecar.istio.io/inject": "false"}, revision_only)


def webhook(rev: str | None, tag: str | None = None) -> dict[str, Any]:
    labels = {"app": "sidecar-injector", **({"istio.io/rev": rev} if rev else {}),
              **({"istio.io/tag": tag} if tag else {})}
    return {"metadata": {"name": f"istio-sidecar-injector-{tag or rev}", "labels": labels}}


def test_injectors_from_the_webhooks() -> None:
    default = Injectors.from_webhooks([webhook("default")])
    assert default.default and default.choose("prod-eu-1", "deployment shop/auth") == "default"
    tagged = Injectors.from_webhooks([webhook("1-23-1"), webhook("1-24-0"), webhook("1-24-0", "default")])
    assert tagged.default and tagged.names == {"1-23-1", "1-24-0", "default"}
    assert tagged.choose("prod-eu-1", "deployment shop/auth") == "default"
    unlabelled = Injectors.from_webhooks([webhook(None)])  # releases before revisions: the default injector
    assert unlabelled.default
    only = Injectors.from_webhooks([webhook("1-24-0"), webhook("1-24-0", "stable")])
    assert not only.default and only.choose("prod-eu-1", "deployment shop/auth") == "1-24-0"
    # `istioctl tag set default` left the unrevisioned webhooks in place, with selectors that never match
    never = {"matchLabels": {"istio.io/deactivated": "never-match"}}
    neutered = {**webhook("default"), "webhooks": [{"name": "namespace.sidecar-injector.istio.io",
                                                    "namespaceSelector": never, "objectSelector": never}]}
    moved = Injectors.from_webhooks([neutered, webhook("1-24-0")])
    assert not moved.default and moved.names == {"1-24-0"}


def test_several_revisions_without_a_default_block_injection() -> None:
    several = Injectors.from_webhooks([webhook("1-23-1"), webhook("1-24-0")])
    with pytest.raises(InjectionBlocked, match=r"several revisions \(1-23-1, 1-24-0\) and no default.*"
                                               r"clusters\.prod-eu-1\.revision in the plan"):
        several.choose("prod-eu-1", "deployment shop/auth")
    with pytest.raises(InjectionBlocked, match="no sidecar injector"):
        Injectors.from_webhooks([]).choose("prod-eu-1", "namespace shop")


def test_the_plan_revision_is_an_rfc1123_label() -> None:
    from pydantic import ValidationError

    from meshwave.plan import ClusterConfig

    conns = {"kubernetes_conn_id": "k8s", "prometheus_conn_id": "prom"}
    assert ClusterConfig(**conns).revision is None
    assert ClusterConfig(**conns, revision="1-24-0").revision == "1-24-0"
    with pytest.raises(ValidationError, match="revision"):
        ClusterConfig(**conns, revision="1.24")
    with pytest.raises(ValueError, match="revision"):
        MeshKube(client.ApiClient(client.Configuration()), "lab", revision="Canary")


def test_label_selector() -> None:
    assert label_selector({"matchLabels": {"app": "a", "tier": "b"}, "matchExpressions": [
        {"key": "x", "operator": "In", "values": ["1", "2"]}, {"key": "y", "operator": "DoesNotExist"}]}) \
        == "app=a,tier=b,x in (1,2),!y"


# ---- names and inputs are checked before any request -------------------------------------------------


@pytest.mark.parametrize("bad", ['x"} or vector(1)', "../etc", "", "Auth", "-auth", "auth-", "a" * 64, "a.b", None])
def test_invalid_names_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="namespace"):
        validate_name(bad, "namespace")


def test_valid_names() -> None:
    assert validate_name("email-service", "workload") == "email-service"
    assert validate_name("a" * 63, "workload")


@pytest.fixture
def offline() -> MeshKube:
    """A MeshKube whose server refuses connections: a request would raise ClusterUnreachable, not ValueError."""
    config = client.Configuration()
    config.host = "http://127.0.0.1:1"
    return MeshKube(client.ApiClient(config), "prod-eu-1")


@pytest.mark.parametrize("call", [
    lambda k: k.workload("../etc", "auth"),
    lambda k: k.workload("shop", 'x"} or vector(1)'),
    lambda k: k.ensure_injected("shop", "../etc", "workload"),
    lambda k: k.remove_injection("Shop", "auth"),
    lambda k: k.mtls.ensure_strict("shop", "../etc"),
    lambda k: k.mtls.namespace_wide('x"} or vector(1)'),
    lambda k: k.mtls.effective("shop", ""),
    lambda k: k.mtls.ensure_permissive("Shop", "auth", "note"),
])
def test_methods_validate_names_before_any_request(offline: MeshKube, call: Any) -> None:
    with pytest.raises(ValueError, match="namespace|workload"):
        call(offline)


def test_input_checks(offline: MeshKube) -> None:
    with pytest.raises(ValueError, match="no selector.matchLabels.*never writes"):
        offline.mtls._check_writable("shop", {})
    with pytest.raises(ValueError, match="root namespace"):
        offline.mtls._check_writable("istio-system", {"app": "auth"})
    with pytest.raises(ValueError, match="mode must be"):
        offline.ensure_injected("shop", "auth", "mesh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantity"):
        offline.ensure_sidecar_resources("shop", "auth", memory="lots")
    with pytest.raises(ValueError, match="range"):
        offline.ensure_exclusions("shop", "auth", inbound_ports=[70000])


def test_validate_labels() -> None:
    assert validate_labels({"app": "auth", "app.kubernetes.io/name": "auth-1"}, "sel") == {
        "app": "auth", "app.kubernetes.io/name": "auth-1"}
    for bad in ({"": "x"}, {"a b": "x"}, {"app": "a b"}, {"app": 1}, {"Bad_Prefix/x": "y"}):
        with pytest.raises(ValueError):
            validate_labels(bad, "sel")


def test_mtls_plan_creates_patches_or_does_nothing_at_the_served_version(offline: MeshKube) -> None:
    pa = offline.mtls
    pa.__dict__["version"] = "v1beta1"  # as discovered on a cluster older than Istio 1.22 (no request here)
    create = pa._plan_write("shop", "meshwave-auth", None, {"app": "auth"}, Mode.STRICT)
    assert create.request is not None and create.request.verb == "POST" and create.before is None
    assert create.request.path == "/apis/security.istio.io/v1beta1/namespaces/shop/peerauthentications"
    assert create.request.body["apiVersion"] == "security.istio.io/v1beta1"
    assert create.request.body["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "meshwave"}
    assert create.request.body["spec"] == {"selector": {"matchLabels": {"app": "auth"}}, "mtls": {"mode": "STRICT"}}
    existing = {"metadata": {"name": "meshwave-auth", "resourceVersion": "7"},
                "spec": {"selector": {"matchLabels": {"app": "auth", "old": "x"}}, "mtls": {"mode": "PERMISSIVE"}}}
    patch = pa._plan_write("shop", "meshwave-auth", existing, {"app": "auth"}, Mode.STRICT)
    assert patch.request is not None and patch.request.content_type == "application/merge-patch+json"
    assert patch.request.body["metadata"]["resourceVersion"] == "7"  # a concurrent writer gets a 409, not lost
    assert patch.request.body["spec"]["selector"]["matchLabels"] == {"app": "auth", "old": None}
    same = pa._plan_write("shop", "meshwave-auth", {**existing, "spec": {
        "selector": {"matchLabels": {"app": "auth"}}, "mtls": {"mode": "STRICT"}}}, {"app": "auth"}, Mode.STRICT)
    assert same.request is None and not same.applied and same.reason == "already STRICT"


# ---- errors ------------------------------------------------------------------------------------------


def api_exception(code: int, body: Any, reason: str = "") -> ApiException:
    exc = ApiException(status=code, reason=reason)
    exc.body = json.dumps(body) if isinstance(body, dict) else body
    return exc


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}


@pytest.mark.parametrize(("code", "reason", "kind"), [
    (404, "NotFound", NotFound), (409, "AlreadyExists", Conflict), (409, "Conflict", Conflict),
    (403, "Forbidden", AccessDenied), (422, "Invalid", Rejected), (415, "UnsupportedMediaType", Rejected),
    (500, "InternalError", ServerError), (429, "TooManyRequests", KubeError)])
def test_translate_parses_the_status_body(code: int, reason: str, kind: type[KubeError]) -> None:
    err = translate(api_exception(code, status(code, reason, 'deployments.apps "auth" says no')), "prod-eu-1",
                    "PATCH", "deployment shop/auth")
    assert type(err) is kind and isinstance(err, KubeError) and not isinstance(err, ApiException)
    expected = f'cluster prod-eu-1: PATCH deployment shop/auth: {code} {reason}: deployments.apps "auth" says no'
    assert str(err) == expected
    assert (err.code, err.reason, err.cluster, err.verb) == (code, reason, "prod-eu-1", "PATCH")


def test_translate_non_status_answers() -> None:
    proxy_404 = translate(api_exception(404, "", "Not Found"), "c", "GET", "deployment shop/auth", "http://x")
    assert isinstance(proxy_404, ServerError) and "not a Kubernetes Status" in str(proxy_404)
    html = translate(api_exception(502, "<html>bad gateway</html>", "Bad Gateway"), "c", "GET", "x")
    assert isinstance(html, ServerError) and "bad gateway" in str(html)
    transport = translate(ApiException(status=0, reason="SSLError certificate verify failed"), "c", "GET", "x", "h")
    assert isinstance(transport, ClusterUnreachable) and "certificate verify failed" in str(transport)


def test_unreachable_reason_says_refused() -> None:
    refused = MaxRetryError(None, "/version", NewConnectionError(  # type: ignore[arg-type]
        None, "Failed to establish a new connection: [Errno 111] Connection refused"))
    assert unreachable_reason(refused, (3, 15)) == "connection refused"


def test_unreachable_cluster_fails_fast(offline: MeshKube) -> None:
    with pytest.raises(ClusterUnreachable, match=r"cluster prod-eu-1 \(http://127.0.0.1:1\): connection refused"):
        offline.ping()


# ---- change records ----------------------------------------------------------------------------------


def test_change_round_trips_through_json() -> None:
    change = Change("lab", "restart", "deployment shop/auth", before={"restartedAt": None},
                    after={"restartedAt": "2026-11-25T02:00:00Z"},
                    request=ApiRequest("PATCH", "/apis/apps/v1/namespaces/shop/deployments/auth",
                                       "application/strategic-merge-patch+json",
                                       {"spec": {"template": {"metadata": {"annotations": {"a": "b"}}}}}),
                    applied=True, reason="restarting once", resource_version="42")
    wire = json.loads(json.dumps(change.to_dict()))
    assert Change.from_dict(wire) == change
    assert wire["request"]["verb"] == "PATCH" and wire["timestamp"].endswith("Z")
    planned = Change("lab", "set-mtls", "peerauthentication shop/meshwave-auth", before="STRICT", after="STRICT",
                     reason="already STRICT")
    assert Change.from_dict(planned.to_dict()) == planned and planned.to_dict()["request"] is None
    assert "not applied: already STRICT" in planned.summary()


def test_change_refuses_unknown_fields_and_non_json_values() -> None:
    with pytest.raises(ValueError, match="surprise"):
        Change.from_dict({**Change("lab", "x", "y").to_dict(), "surprise": 1})
    with pytest.raises(TypeError):
        Change("lab", "x", "y", before={1, 2}).to_dict()
