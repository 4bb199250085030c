"""One simulated cluster's object store: the API semantics the clients rely on.

resourceVersion on every write (409 on a stale one), generation on spec changes, status kept apart
from the main resource, namespaces that must exist, cascade delete of a namespace, label and field
selectors, and a watch stream fed from a bounded event history.
"""

from __future__ import annotations

import asyncio
import copy
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from meshlab import resources as r
from meshlab.errors import ApiError, already_exists, invalid, not_found, webhook_denied
from meshlab.patching import apply_patch
from meshlab.quota import defaulted_limit_range
from meshlab.selectors import parse_field_selector, parse_selector

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
HISTORY = 5000

Key = tuple[str, str]  # (namespace or "", name)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Event:
    resource_version: int
    type: str
    resource: r.Resource
    obj: dict[str, Any]


class Watcher:
    def __init__(self, resource: r.Resource, namespace: str | None, accept: Callable[[dict[str, Any]], bool]):
        self.resource = resource
        self.namespace = namespace
        self.accept = accept
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def offer(self, event: Event) -> None:
        if event.resource != self.resource:
            return
        ns = event.obj["metadata"].get("namespace")
        if self.namespace is not None and ns != self.namespace:
            return
        if self.accept(event.obj):
            self.queue.put_nowait(event)


class Store:
    def __init__(self, cluster: str, served_versions: dict[str, list[str]] | None = None) -> None:
        """`served_versions`: group -> the only versions this cluster serves it at (None: every version in
        resources.py), for clusters older than the lab's catalogue (Istio before 1.22 serves security.istio.io at
        v1beta1 only). The API server's discovery and routing follow it, and so does the apiVersion stored."""
        self.cluster = cluster
        self.served_versions = _checked_served_versions(served_versions)
        self._objects: dict[r.Resource, dict[Key, dict[str, Any]]] = {res: {} for res in r.ALL}
        self._rv = 1
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._watchers: set[Watcher] = set()
        self.on_change: list[Callable[[Event], None]] = []
        # Pods by their deployment, kept up to date on every write: the controller asks for a deployment's pods
        # many times per tick, and a scan of every pod each time is quadratic in a 2,000-service fleet.
        self._pods_by_deployment: dict[tuple[str, str], dict[Key, dict[str, Any]]] = {}

    # ---- served versions -----------------------------------------------------------------------
    def versions(self, res: r.Resource) -> tuple[str, ...]:
        """The versions this cluster serves a resource at, preferred first (empty: not served at all)."""
        allowed = self.served_versions.get(res.group)
        return res.versions if allowed is None else tuple(v for v in res.versions if v in allowed)

    def api_version(self, res: r.Resource) -> str:
        """The apiVersion objects of a resource are stored with here: the preferred served version."""
        served = self.versions(res)
        return res.api_version(served[0] if served else None)

    # ---- reading -------------------------------------------------------------------------------
    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def get(self, res: r.Resource, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._objects[res].get((namespace or "", name))
        if obj is None:
            raise not_found(res.plural, name, res.group)
        return copy.deepcopy(obj)

    def peek(self, res: r.Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object itself (no copy), for the lab's own read-only use."""
        return self._objects[res].get((namespace or "", name))

    def items(self, res: r.Resource, namespace: str | None = None) -> Iterator[dict[str, Any]]:
        """Stored objects (no copies), for the lab's own read-only use."""
        for (ns, _), obj in list(self._objects[res].items()):
            if namespace is None or ns == namespace:
                yield obj

    def pods_of(self, namespace: str, deployment: str) -> list[dict[str, Any]]:
        """The pods of a deployment's ReplicaSets (stored objects, no copies), in store order."""
        return list(self._pods_by_deployment.get((namespace, deployment), {}).values())

    def list(self, res: r.Resource, namespace: str | None = None, label_selector: str | None = None,
             field_selector: str | None = None) -> list[dict[str, Any]]:
        labels_ok = parse_selector(label_selector)
        fields_ok = parse_field_selector(field_selector)
        found = [
            copy.deepcopy(obj)
            for obj in self.items(res, namespace)
            if labels_ok(obj["metadata"].get("labels") or {}) and fields_ok(obj)
        ]
        return sorted(found, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    # ---- writing -------------------------------------------------------------------------------
    def create(self, res: r.Resource, namespace: str | None, body: Any, *, dry_run: bool = False) -> dict[str, Any]:
        obj = self._check_body(res, namespace, body)
        meta = obj["metadata"]
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["name"] = name
        if res in DEFAULTERS:
            obj = DEFAULTERS[res](obj)
        self._validate(res, obj)
        key = (meta.get("namespace", ""), name)
        if key in self._objects[res]:
            raise already_exists(res.plural, name, res.group)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
        meta.pop("resourceVersion", None)
        if res not in _NO_GENERATION:
            meta["generation"] = 1
        if res is r.NAMESPACES:
            obj["status"] = {"phase": "Active"}
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        if dry_run:
            return obj
        return self._commit("ADDED", res, key, obj)

    def replace(self, res: r.Resource, namespace: str | None, name: str, body: Any, *,
                subresource: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        current = self.get(res, namespace, name)
        obj = self._check_body(res, namespace, body)
        if obj["metadata"].get("name", name) != name:
            raise ApiError(400, f"the name of the object ({obj['metadata'].get('name')}) does not match "
                                f"the name on the URL ({name})")
        sent_rv = obj["metadata"].get("resourceVersion")
        # Without a resourceVersion a PUT is unconditional, as in the API.
        if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
            raise self._conflict(res, name)
        return self._update(res, current, obj, subresource, dry_run)

    def patch(self, res: r.Resource, namespace: str | None, name: str, content_type: str, body: Any, *,
              subresource: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        current = self.get(res, namespace, name)
        patched = apply_patch(current, content_type, body, builtin=res.builtin)
        if not isinstance(patched, dict):
            raise ApiError(422, "the patch turned the object into something that is not an object")
        sent_rv = patched.get("metadata", {}).get("resourceVersion")
        if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
            raise self._conflict(res, name)
        return self._update(res, current, patched, subresource, dry_run)

    def delete(self, res: r.Resource, namespace: str | None, name: str, *, dry_run: bool = False) -> dict[str, Any]:
        current = self.get(res, namespace, name)
        if dry_run:
            return current
        if res is r.NAMESPACES:
            for other in r.ALL:
                if other.namespaced:
                    for obj in list(self.items(other, name)):
                        self._remove(other, (name, obj["metadata"]["name"]))
        return self._remove(res, (namespace or "", name))

    def set_status(self, res: r.Resource, namespace: str | None, name: str, status: dict[str, Any]) -> None:
        """The controller's status write; skipped when nothing changed (no event, no new version)."""
        obj = self._objects[res].get((namespace or "", name))
        if obj is None or obj.get("status") == status:
            return
        updated = copy.deepcopy(obj)
        updated["status"] = copy.deepcopy(status)
        self._commit("MODIFIED", res, (namespace or "", name), updated)

    def bind(self, namespace: str, name: str, node: str) -> dict[str, Any] | None:
        """The scheduler's pods/binding: spec.nodeName set once, a MODIFIED event like any other write."""
        obj = self._objects[r.PODS].get((namespace, name))
        if obj is None or obj["spec"].get("nodeName"):
            return obj
        bound = copy.deepcopy(obj)
        bound["spec"]["nodeName"] = node
        self._commit("MODIFIED", r.PODS, (namespace, name), bound)
        return self._objects[r.PODS][(namespace, name)]

    # ---- watching ------------------------------------------------------------------------------
    def watch(self, res: r.Resource, namespace: str | None, label_selector: str | None,
              field_selector: str | None, since: str | None) -> tuple[Watcher, list[Event]]:
        """Subscribe; returns the watcher and the events to send first (replay or initial state)."""
        labels_ok = parse_selector(label_selector)
        fields_ok = parse_field_selector(field_selector)
        watcher = Watcher(res, namespace, lambda o: labels_ok(o["metadata"].get("labels") or {}) and fields_ok(o))
        if since in (None, "", "0"):
            first = [Event(self._rv, "ADDED", res, o) for o in self.list(res, namespace, label_selector,
                                                                         field_selector)]
        else:
            try:
                since_rv = int(since)
            except ValueError:
                raise ApiError(400, f"invalid resourceVersion {since!r}") from None
            oldest = self._history[0].resource_version if self._history else self._rv
            if since_rv < oldest - 1:
                raise ApiError(410, f"too old resource version: {since_rv} ({oldest})", reason="Expired")
            first = []
            for event in self._history:
                if event.resource_version > since_rv:
                    probe = Watcher(res, namespace, watcher.accept)
                    probe.offer(event)
                    if not probe.queue.empty():
                        first.append(event)
        self._watchers.add(watcher)
        return watcher, first

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    # ---- internals -----------------------------------------------------------------------------
    def _conflict(self, res: r.Resource, name: str) -> ApiError:
        qualified = f"{res.plural}.{res.group}" if res.group else res.plural
        return ApiError(409, f'Operation cannot be fulfilled on {qualified} "{name}": the object has been '
                             "modified; please apply your changes to the latest version and try again")

    def _check_body(self, res: r.Resource, namespace: str | None, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON or YAML object")
        obj = copy.deepcopy(body)
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if kind is not None and kind != res.kind:
            raise ApiError(400, f"the kind of the object ({kind}) does not match the URL ({res.kind})")
        # Only a served version: a cluster that does not know security.istio.io/v1 cannot take an object of it.
        if api_version is not None and api_version not in {res.api_version(v) for v in self.versions(res)}:
            raise ApiError(400, f"the API version of the object ({api_version}) does not match the URL "
                                f"({self.api_version(res)})")
        obj["kind"], obj["apiVersion"] = res.kind, self.api_version(res)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "metadata must be an object")
        if res.namespaced:
            ns = meta.get("namespace") or namespace
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise ApiError(400, "the namespace of the provided object does not match the namespace sent "
                                    "on the request")
            if not ns:
                raise ApiError(400, "a namespace is required for namespaced resources")
            if ("", ns) not in self._objects[r.NAMESPACES]:
                raise not_found("namespaces", ns)
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        for field in ("labels", "annotations"):
            values = meta.get(field)
            if values is not None and (not isinstance(values, dict)
                                       or not all(isinstance(v, str) for v in values.values())):
                raise invalid(res.kind, meta.get("name", ""), [(f"metadata.{field}", "values must be strings")],
                              res.group)
        return obj

    def _validate(self, res: r.Resource, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        name = meta.get("name")
        if not name:
            raise invalid(res.kind, "", [("metadata.name", "Required value: name or generateName is required")],
                          res.group)
        pattern = DNS_LABEL if res in (r.NAMESPACES, r.SERVICES) else DNS_SUBDOMAIN
        limit = 63 if pattern is DNS_LABEL else 253
        if not isinstance(name, str) or len(name) > limit or not pattern.match(name):
            rule = "RFC 1123 label" if pattern is DNS_LABEL else "RFC 1123 subdomain"
            raise invalid(res.kind, str(name), [("metadata.name", f'Invalid value: "{name}": a lowercase {rule} '
                                                 "must consist of lower case alphanumeric characters, '-' or '.', "
                                                 "and must start and end with an alphanumeric character")],
                          res.group)
        causes = VALIDATORS.get(res, lambda o: [])(obj)
        if causes:
            raise invalid(res.kind, name, causes, res.group)
        self._admit(res, obj)

    @staticmethod
    def _admit(res: r.Resource, obj: dict[str, Any]) -> None:
        """Validating admission: the API server calls the webhook after its own checks, for dry runs as well."""
        if res not in WEBHOOKS:
            return
        webhook, check = WEBHOOKS[res]
        denials = check(obj)
        if denials:
            raise webhook_denied(webhook, f"configuration is invalid: {_multierror(denials)}")

    def _update(self, res: r.Resource, current: dict[str, Any], obj: dict[str, Any], subresource: str | None,
                dry_run: bool) -> dict[str, Any]:
        meta, old_meta = obj["metadata"], current["metadata"]
        for immutable in ("uid", "creationTimestamp", "name", "namespace"):
            if immutable in old_meta:
                meta[immutable] = old_meta[immutable]
        if subresource == "status":
            obj = {**current, "status": obj.get("status", {})}
        elif subresource is not None:
            raise ApiError(404, f"the server could not find the requested resource (subresource {subresource})")
        else:
            if res.has_status and "status" in current:
                obj["status"] = current["status"]
            if "generation" in old_meta:
                changed = obj.get("spec") != current.get("spec")
                meta["generation"] = old_meta["generation"] + (1 if changed else 0)
        if res in DEFAULTERS:
            obj = DEFAULTERS[res](obj)
        self._validate(res, obj)
        if dry_run:
            return obj
        key = (old_meta.get("namespace", ""), old_meta["name"])
        return self._commit("MODIFIED", res, key, obj)

    def _commit(self, kind: str, res: r.Resource, key: Key, obj: dict[str, Any]) -> dict[str, Any]:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if res is r.PODS:
            self._unindex(key, self._objects[res].get(key))
            owner = _deployment_of(obj)
            if owner:
                self._pods_by_deployment.setdefault(owner, {})[key] = obj
        self._objects[res][key] = obj
        self._publish(Event(self._rv, kind, res, copy.deepcopy(obj)))
        return copy.deepcopy(obj)

    def _unindex(self, key: Key, old: dict[str, Any] | None) -> None:
        owner = _deployment_of(old) if old is not None else None
        if owner and key in self._pods_by_deployment.get(owner, {}):
            del self._pods_by_deployment[owner][key]

    def _remove(self, res: r.Resource, key: Key) -> dict[str, Any]:
        obj = self._objects[res].pop(key)
        if res is r.PODS:
            self._unindex(key, obj)
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._publish(Event(self._rv, "DELETED", res, copy.deepcopy(obj)))
        return copy.deepcopy(obj)

    def _publish(self, event: Event) -> None:
        self._history.append(event)
        for watcher in list(self._watchers):
            watcher.offer(event)
        for callback in self.on_change:
            callback(event)


def _checked_served_versions(served: dict[str, list[str]] | None) -> dict[str, tuple[str, ...]]:
    """The served-versions knob, refused at start when it names a group or version the lab does not know."""
    known = r.groups()
    checked: dict[str, tuple[str, ...]] = {}
    for group, versions in (served or {}).items():
        if group not in known:
            raise ValueError(f"served_versions: unknown API group {group!r} (known: {', '.join(sorted(known))})")
        unknown = [v for v in versions if v not in known[group]]
        if not versions or unknown:
            raise ValueError(f"served_versions: {group} needs one or more of {', '.join(known[group])}, "
                             f"got {list(versions)!r}")
        checked[group] = tuple(versions)
    return checked


# ---- per-kind validation (what the API server or Istio's validating webhook would refuse) ------------
def _validate_deployment(obj: dict[str, Any]) -> list[tuple[str, str]]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "Required value")]
    causes = []
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 0:
        causes.append(("spec.replicas", f"Invalid value: {replicas!r}: must be greater than or equal to 0"))
    selector = (spec.get("selector") or {}).get("matchLabels")
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    if not selector:
        causes.append(("spec.selector", "Required value"))
    elif any(labels.get(k) != v for k, v in selector.items()):
        causes.append(("spec.template.metadata.labels",
                       f"Invalid value: {labels!r}: `selector` does not match template `labels`"))
    containers = (template.get("spec") or {}).get("containers")
    if not containers or not isinstance(containers, list):
        causes.append(("spec.template.spec.containers", "Required value"))
    elif not all(isinstance(c, dict) and c.get("name") for c in containers):
        causes.append(("spec.template.spec.containers[*].name", "Required value"))
    return causes


def _validate_peer_authentication(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """What the PeerAuthentication CRD's OpenAPI schema refuses (types and the mode enum), 422 before any webhook."""
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        return [("spec", "Invalid value: must be an object")]
    causes = []
    mode = (spec.get("mtls") or {}).get("mode")
    if mode is not None and mode not in MTLS_MODES:
        causes.append(("spec.mtls.mode", _unsupported_mode(mode)))
    selector = spec.get("selector")
    if selector is not None and not isinstance((selector or {}).get("matchLabels", {}), dict):
        causes.append(("spec.selector.matchLabels", "Invalid value: must be a map of strings"))
    port_level = spec.get("portLevelMtls")
    if port_level is not None and not isinstance(port_level, dict):
        return [*causes, ("spec.portLevelMtls", "Invalid value: must be an object")]
    for port, setting in (port_level or {}).items():
        port_mode = (setting or {}).get("mode") if isinstance(setting, dict) or setting is None else setting
        if port_mode is not None and port_mode not in MTLS_MODES:
            causes.append((f"spec.portLevelMtls.{port}.mode", _unsupported_mode(port_mode)))
    return causes + _peer_authentication_rules(spec)


def _peer_authentication_rules(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """The CRD's CEL rules (x-kubernetes-validations, Istio 1.22+): 422 Invalid, as `kubectl apply` shows them:
    `The PeerAuthentication "x" is invalid: spec: Invalid value: "object": portLevelMtls requires selector`."""
    port_level = spec.get("portLevelMtls")
    if port_level is None:
        return []
    causes = []
    if not ((spec.get("selector") or {}).get("matchLabels") or {}):  # port-level modes on a namespace or the mesh
        causes.append(("spec", 'Invalid value: "object": portLevelMtls requires selector'))
    if any(not str(port).isdigit() or not 0 < int(port) <= 65535 for port in port_level):
        causes.append(("spec.portLevelMtls", 'Invalid value: "object": port must be between 1-65535'))
    return causes


def _unsupported_mode(mode: Any) -> str:
    return f'Unsupported value: "{mode}": supported values: ' + ", ".join(f'"{m}"' for m in MTLS_MODES)


# ---- validating admission webhooks: called after the schema, on every create and update, dry runs included ------
def _istio_peer_authentication(obj: dict[str, Any]) -> list[str]:
    """What Istio's webhook (validation.istio.io, pilot's ValidatePeerAuthentication) denies."""
    port_level = (obj.get("spec") or {}).get("portLevelMtls")
    if port_level is not None and not port_level:
        return ["port level mTLS, if defined, must have at least one element"]
    return []


def _multierror(messages: list[str]) -> str:
    """Istio joins its validation errors the way hashicorp/go-multierror does; one error stays one line."""
    if len(messages) == 1:
        return messages[0]
    points = "\n\t".join(f"* {m}" for m in messages)
    return f"{len(messages)} errors occurred:\n\t{points}\n\n"


# Core kinds without metadata.generation (only objects with a spec the controllers act on count generations).
_NO_GENERATION = frozenset({r.PODS, r.NAMESPACES, r.SERVICES, r.CONFIG_MAPS, r.NODES, r.RESOURCE_QUOTAS,
                            r.LIMIT_RANGES})

# The API's defaulting of a kind, applied to what is stored (create and update alike).
DEFAULTERS: dict[r.Resource, Callable[[dict[str, Any]], dict[str, Any]]] = {
    r.LIMIT_RANGES: defaulted_limit_range,
}

VALIDATORS: dict[r.Resource, Callable[[dict[str, Any]], list[tuple[str, str]]]] = {
    r.DEPLOYMENTS: _validate_deployment,
    r.PEER_AUTHENTICATIONS: _validate_peer_authentication,
}

# Resource -> (webhook name, denials): only the kinds a webhook is registered for reach one.
WEBHOOKS: dict[r.Resource, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    r.PEER_AUTHENTICATIONS: ("validation.istio.io", _istio_peer_authentication),
}


def _deployment_of(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(namespace, deployment) of a pod owned by a deployment's ReplicaSet `<deployment>-<hash>`, else None."""
    refs = pod["metadata"].get("ownerReferences") or []
    if not refs or not (pod["metadata"].get("labels") or {}).get("pod-template-hash"):
        return None
    return pod["metadata"].get("namespace", ""), refs[0]["name"].rsplit("-", 1)[0]
