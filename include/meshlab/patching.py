"""The three PATCH types of the Kubernetes API.

- JSON patch (RFC 6902) through the `jsonpatch` library;
- JSON merge patch (RFC 7386);
- strategic merge patch for built-in kinds: lists with a merge key (containers by `name`, ports by
  `containerPort`, ...) merge element-wise, and the `$patch`, `$setElementOrder/` and
  `$deleteFromPrimitiveList/` directives that kubectl sends are honoured.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from meshlab.errors import ApiError

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# Merge keys of the lists a migration touches (from the Kubernetes API's patchMergeKey tags).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "tolerations": "key",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: dict[str, Any], operations: Any) -> dict[str, Any]:
    if not isinstance(operations, list):
        raise ApiError(400, "json patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(target, operations)
    except (jsonpatch.JsonPatchConflict, jsonpatch.JsonPatchTestFailed) as exc:
        raise ApiError(422, f"the server rejected our request due to an error in our request: {exc}") from None
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as exc:
        raise ApiError(400, f"invalid json patch: {exc}") from None


def strategic_merge_patch(target: Any, patch: Any, field: str = "") -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name, []) if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in MERGE_KEYS:
            result[key] = _merge_list(result.get(key) or [], value, MERGE_KEYS[key])
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value, key)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(current: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    result = [copy.deepcopy(i) for i in current]
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise ApiError(400, f"strategic merge patch: list item without merge key {merge_key!r}")
        index = next((n for n, cur in enumerate(result) if cur.get(merge_key) == item[merge_key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append({k: v for k, v in item.items() if k != "$patch"})
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def apply_patch(target: dict[str, Any], content_type: str, body: Any, *, builtin: bool) -> dict[str, Any]:
    """Apply a PATCH body of the given content type; custom resources refuse strategic merge, like the API."""
    kind = content_type.split(";")[0].strip()
    if kind == JSON_PATCH:
        return json_patch(target, body)
    if kind == MERGE_PATCH:
        if not isinstance(body, dict):
            raise ApiError(400, "merge patch must be a JSON object")
        return merge_patch(target, body)
    if kind == STRATEGIC_PATCH:
        if not builtin:
            raise ApiError(415, "strategic merge patch format is not supported")
        if not isinstance(body, dict):
            raise ApiError(400, "strategic merge patch must be a JSON object")
        return strategic_merge_patch(target, body)
    if kind == APPLY_PATCH:
        raise ApiError(415, "server-side apply is not supported by meshlab; use client-side apply")
    raise ApiError(415, f"the body of the request was in an unknown format - accepted media types include: "
                        f"{JSON_PATCH}, {MERGE_PATCH}, {STRATEGIC_PATCH}")
