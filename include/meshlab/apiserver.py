"""The Kubernetes API subset of one simulated cluster, on aiohttp.

Discovery (`/api`, `/apis`, group versions), CRUD on the resources in `resources.py`, watch streams,
`dryRun=All`, server-side `Table` printing for kubectl, and `Status` errors for everything that goes wrong.
A cluster serves the group versions its store says (`Store.versions`): an older cluster lacks the newer ones in
discovery, OpenAPI and requests alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web

from meshlab import resources as r
from meshlab.errors import ApiError
from meshlab.store import Store
from meshlab.tables import table

log = logging.getLogger(__name__)

VERSION_INFO = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.0-meshlab", "gitCommit": "meshlab",
    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
    "compiler": "gc", "platform": "linux/amd64",
}


# The versions a cluster serves a resource at, preferred first (Store.versions); every version by default.
Versions = Callable[[r.Resource], tuple[str, ...]]


def all_versions(res: r.Resource) -> tuple[str, ...]:
    return res.versions


def served_groups(versions: Versions) -> dict[str, list[str]]:
    """Group name -> served versions (preferred first), for the non-core groups a cluster serves at all."""
    result: dict[str, list[str]] = {}
    for res in r.ALL:
        for v in versions(res) if res.group else ():
            if v not in result.setdefault(res.group, []):
                result[res.group].append(v)
    return {group: vs for group, vs in result.items() if vs}


def _served_in(group: str, version: str, versions: Versions) -> list[r.Resource]:
    return [res for res in r.ALL if res.group == group and version in versions(res)]


@dataclass
class Target:
    """What a resource URL names."""

    resource: r.Resource
    version: str
    namespace: str | None
    name: str | None
    subresource: str | None


def _resource_list(group: str, version: str, versions: Versions) -> dict[str, Any]:
    entries = []
    for res in _served_in(group, version, versions):
        entries.append({
            "name": res.plural, "singularName": res.singular, "namespaced": res.namespaced, "kind": res.kind,
            "verbs": r.VERBS, "shortNames": list(res.short_names), "categories": list(res.categories),
        })
        if res.has_status:
            entries.append({"name": f"{res.plural}/status", "singularName": "", "namespaced": res.namespaced,
                            "kind": res.kind, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version,
            "resources": entries}


def _api_group(group: str, versions: list[str]) -> dict[str, Any]:
    gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}


def _gv_path(res: r.Resource, version: str) -> str:
    return f"apis/{res.group}/{version}" if res.group else f"api/{version}"


def openapi_v3_root(versions: Versions = all_versions) -> dict[str, Any]:
    """The OpenAPI v3 index kubectl reads to learn that PATCH takes `fieldValidation` (server-side validation)."""
    paths = {}
    for res in r.ALL:
        for version in versions(res):
            gv = _gv_path(res, version)
            paths[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}?hash=meshlab"}
    return {"paths": paths}


def openapi_v3_group_version(gv: str, versions: Versions = all_versions) -> dict[str, Any]:
    """A minimal OpenAPI v3 document for one group version: the item paths and their PATCH parameters."""
    paths: dict[str, Any] = {}
    for res in r.ALL:
        for version in versions(res):
            if _gv_path(res, version) != gv:
                continue
            scope = "/namespaces/{namespace}" if res.namespaced else ""
            gvk = {"group": res.group, "version": version, "kind": res.kind}
            paths[f"/{gv}{scope}/{res.plural}/{{name}}"] = {"patch": {
                "x-kubernetes-group-version-kind": gvk,
                "x-kubernetes-action": "patch",
                "parameters": [{"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                               for p in ("dryRun", "fieldManager", "fieldValidation", "force")],
                "responses": {"200": {"description": "OK"}},
            }}
    if not paths:
        raise ApiError(404, "the server could not find the requested resource")
    return {"openapi": "3.0.0", "info": {"title": "meshlab", "version": "v1.32.0"}, "paths": paths,
            "components": {"schemas": {}}}


def _pb_string(field: int, value: bytes) -> bytes:
    """One length-delimited protobuf field (values here are shorter than 128 bytes: a one-byte length)."""
    return bytes([field << 3 | 2, len(value)]) + value


# gnostic's openapi_v2.Document {swagger: "2.0", info: {title}}: no definitions. kubectl falls back to it
# for client-side validation when a group version is missing from /openapi/v3 (a version the cluster does not
# serve); finding no schema there, it goes on to map the kind and fails as on a real cluster ("no matches for
# kind"), where a 404 here would fail it earlier with "error validating data".
OPENAPI_V2_PB = _pb_string(1, b"2.0") + _pb_string(2, _pb_string(1, b"meshlab"))
OPENAPI_V2_PB_TYPE = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


def openapi_v2(accept: str) -> web.Response:
    if "protobuf" in accept or "json" not in accept:
        return web.Response(body=OPENAPI_V2_PB, content_type=OPENAPI_V2_PB_TYPE)
    return web.json_response({"swagger": "2.0", "info": {"title": "meshlab"}, "paths": {}, "definitions": {}})


def parse_path(path: str, versions: Versions = all_versions) -> Target | dict[str, Any]:
    """Resolve a URL path to a resource target, or to a discovery document.

    A group version the cluster does not serve is unknown here, in discovery and in requests alike: 404, as on a
    real cluster without it.
    """
    parts = [p for p in path.split("/") if p]
    groups = served_groups(versions)
    if parts == ["api"]:
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
    if parts == ["apis"]:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [_api_group(g, vs) for g, vs in groups.items()]}
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 2:
        group = parts[1]
        if group not in groups:
            raise ApiError(404, "the server could not find the requested resource")
        if len(parts) == 2:
            return _api_group(group, groups[group])
        version, rest = parts[2], parts[3:]
    else:
        raise ApiError(404, "the server could not find the requested resource")
    if group == "" and version != "v1" or (group and version not in groups[group]):
        raise ApiError(404, "the server could not find the requested resource")
    if not rest:
        return _resource_list(group, version, versions)
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    res = next((res for res in _served_in(group, version, versions) if res.plural == rest[0]), None)
    if res is None or len(rest) > 3 or (namespace is not None and not res.namespaced):
        raise ApiError(404, "the server could not find the requested resource")
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and (sub != "status" or not res.has_status):
        raise ApiError(404, "the server could not find the requested resource")
    return Target(res, version, namespace, name, sub)


async def _read_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise ApiError(400, "the request body is empty")
    ctype = request.content_type or ""
    try:
        if "yaml" in ctype:
            return yaml.safe_load(raw)
        return json.loads(raw)
    except (ValueError, yaml.YAMLError) as exc:
        raise ApiError(400, f"the request body could not be decoded: {exc}") from None


def _with_version(obj: dict[str, Any], target: Target) -> dict[str, Any]:
    obj["apiVersion"] = target.resource.api_version(target.version)
    return obj


class ApiServer:
    """HTTP front of one `Store`; the store's `served_versions` decides which group versions exist here."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.app = web.Application(client_max_size=8 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except ApiError as exc:
            return web.json_response(exc.status(), status=exc.code)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the lab must answer a Status, never die, on any bad request
            log.exception("internal error on %s %s", request.method, request.path)
            return web.json_response(ApiError(500, f"internal error: {exc}").status(), status=500)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if path in ("/version", "/version/"):
            return web.json_response(VERSION_INFO)
        versions = self.store.versions
        if path == "/openapi/v3":
            return web.json_response(openapi_v3_root(versions))
        if path.startswith("/openapi/v3/"):
            return web.json_response(openapi_v3_group_version(path.removeprefix("/openapi/v3/"), versions))
        if path == "/openapi/v2":
            return openapi_v2(request.headers.get("Accept", ""))
        if path.startswith("/openapi"):
            raise ApiError(404, "the server could not find the requested resource")
        target = parse_path(path, versions)
        if isinstance(target, dict):
            if request.method != "GET":
                raise ApiError(405, f"method {request.method} is not allowed here", reason="MethodNotAllowed")
            return web.json_response(target)
        return await self._serve(request, target)

    async def _serve(self, request: web.Request, t: Target) -> web.StreamResponse:
        q = request.query
        dry_run = q.get("dryRun") == "All"
        store, method = self.store, request.method
        if t.name is None:
            if method == "GET" and q.get("watch") in ("true", "1"):
                return await self._watch(request, t)
            if method == "GET":
                items = store.list(t.resource, t.namespace, q.get("labelSelector"), q.get("fieldSelector"))
                if "as=Table" in request.headers.get("Accept", ""):
                    return web.json_response(table(t.resource, items, store.resource_version))
                return web.json_response({
                    "kind": f"{t.resource.kind}List", "apiVersion": t.resource.api_version(t.version),
                    "metadata": {"resourceVersion": store.resource_version},
                    "items": [_with_version(o, t) for o in items],
                })
            if method == "POST":
                created = store.create(t.resource, t.namespace, await _read_body(request), dry_run=dry_run)
                return web.json_response(_with_version(created, t), status=201)
            raise ApiError(405, f"method {method} is not allowed on a collection", reason="MethodNotAllowed")
        if method == "GET":
            obj = store.get(t.resource, t.namespace, t.name)
            if "as=Table" in request.headers.get("Accept", ""):
                return web.json_response(table(t.resource, [obj], store.resource_version))
            return web.json_response(_with_version(obj, t))
        if method == "PUT":
            obj = store.replace(t.resource, t.namespace, t.name, await _read_body(request),
                                subresource=t.subresource, dry_run=dry_run)
            return web.json_response(_with_version(obj, t))
        if method == "PATCH":
            obj = store.patch(t.resource, t.namespace, t.name, request.content_type, await _read_body(request),
                              subresource=t.subresource, dry_run=dry_run)
            return web.json_response(_with_version(obj, t))
        if method == "DELETE":
            gone = store.delete(t.resource, t.namespace, t.name, dry_run=dry_run)
            return web.json_response({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": t.name, "group": t.resource.group, "kind": t.resource.plural,
                            "uid": gone["metadata"].get("uid")},
            })
        raise ApiError(405, f"method {method} is not allowed", reason="MethodNotAllowed")

    async def _watch(self, request: web.Request, t: Target) -> web.StreamResponse:
        q = request.query
        watcher, first = self.store.watch(t.resource, t.namespace, q.get("labelSelector"), q.get("fieldSelector"),
                                          q.get("resourceVersion"))
        try:
            timeout = float(q.get("timeoutSeconds", 1800))
        except ValueError:
            self.store.unwatch(watcher)
            raise ApiError(400, "timeoutSeconds must be a number") from None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for event in first:
                await self._send(response, event.type, event.obj, t)
            if q.get("sendInitialEvents") == "true":  # WatchList: mark the end of the initial state
                await self._send(response, "BOOKMARK", {
                    "kind": t.resource.kind, "metadata": {
                        "resourceVersion": self.store.resource_version,
                        "annotations": {"k8s.io/initial-events-end": "true"}}}, t)
            while (left := deadline - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), timeout=left)
                except TimeoutError:
                    break
                await self._send(response, event.type, event.obj, t)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unwatch(watcher)
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, kind: str, obj: dict[str, Any], t: Target) -> None:
        line = json.dumps({"type": kind, "object": _with_version(dict(obj), t)}) + "\n"
        await response.write(line.encode())
