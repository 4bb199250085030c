"""Server-side printing: the `Table` kubectl asks for, with the columns the real API server gives."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from meshlab import resources as r


def _age(obj: dict[str, Any]) -> str:
    created = obj["metadata"].get("creationTimestamp")
    if not created:
        return "<unknown>"
    seconds = int((datetime.now(UTC) - datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC))
                  .total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _pod_row(pod: dict[str, Any]) -> list[Any]:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(c.get("restartCount", 0) for c in statuses)
    status = pod.get("status", {}).get("phase", "Pending")
    for c in statuses:
        waiting = c.get("state", {}).get("waiting")
        if waiting:
            status = waiting.get("reason", status)
    return [pod["metadata"]["name"], f"{ready}/{len(statuses)}", status, restarts, _age(pod)]


def _deployment_row(dep: dict[str, Any]) -> list[Any]:
    st = dep.get("status", {})
    want = dep.get("spec", {}).get("replicas", 1)
    return [dep["metadata"]["name"], f"{st.get('readyReplicas', 0)}/{want}", st.get("updatedReplicas", 0),
            st.get("availableReplicas", 0), _age(dep)]


def _service_row(svc: dict[str, Any]) -> list[Any]:
    spec = svc.get("spec", {})
    ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports", []))
    return [svc["metadata"]["name"], spec.get("type", "ClusterIP"), spec.get("clusterIP", "None"), "<none>",
            ports or "<none>", _age(svc)]


def _column(name: str) -> dict[str, Any]:
    # kubectl prefixes the kind ("deployment.apps/auth") on the column whose format is "name".
    return {"name": name, "type": "string", "format": "name" if name == "Name" else "", "description": name,
            "priority": 0}


COLUMNS: dict[r.Resource, tuple[list[str], Any]] = {
    r.NAMESPACES: (["Name", "Status", "Age"],
                   lambda o: [o["metadata"]["name"], o.get("status", {}).get("phase", "Active"), _age(o)]),
    r.PODS: (["Name", "Ready", "Status", "Restarts", "Age"], _pod_row),
    r.DEPLOYMENTS: (["Name", "Ready", "Up-to-date", "Available", "Age"], _deployment_row),
    r.SERVICES: (["Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age"], _service_row),
    r.PEER_AUTHENTICATIONS: (["Name", "Mode", "Age"],
                             lambda o: [o["metadata"]["name"],
                                        ((o.get("spec") or {}).get("mtls") or {}).get("mode", ""), _age(o)]),
}


def table(res: r.Resource, objects: list[dict[str, Any]], resource_version: str) -> dict[str, Any]:
    names, row = COLUMNS.get(res, (["Name", "Age"], lambda o: [o["metadata"]["name"], _age(o)]))
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [_column(n) for n in names],
        "rows": [
            {
                "cells": row(obj),
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                           "metadata": obj["metadata"]},
            }
            for obj in objects
        ],
    }
