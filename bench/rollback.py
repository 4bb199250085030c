"""Item 4: detection to rollback. A STRICT service breaks a caller; how long from the breach being visible in
Prometheus to PERMISSIVE applied, and to the caller's success rate recovered.

    .venv/bin/python -m bench.rollback

The e2e fleet (tests/e2e/topology.yaml) and a one-service wave of `reviews` with the e2e shop plan's
settings (poke 5 s, window 15 s, breaches_to_fail 2, verify 45 s). `reporting` calls reviews over mTLS;
once reviews is STRICT, reporting sends port 8080 around its sidecar (plaintext: reset by STRICT, 503 in
reporting's own success rate), as tests/e2e/test_wave.py does.

Timestamps: the breach and the recovery are Prometheus' own (a range query of reporting's success rate
over the plan's window, step 0.5 s); PERMISSIVE applied is the change record in the back_to_permissive
task's XCom (second resolution), checked against the lab's PeerAuthentication polled every 0.25 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from bench.airflow_stack import Stack, dag_ids, retried, stack, stamp, wait_loaded
from bench.common import PY, ROOT, Figure, emit, load_average, log

E2E = ROOT / "tests" / "e2e"
NS, WORKLOAD, CALLER = "shop", "reviews", "reporting"
THRESHOLD = 1 - 0.02  # the caller's success rate before (1.0) minus max_success_drop
SUCCESS = ('sum(rate(http_requests_total{{namespace="{ns}", app="{app}", code!~"5.."}}[{w}])) / '
           'sum(rate(http_requests_total{{namespace="{ns}", app="{app}"}}[{w}]))')


def plan() -> dict[str, Any]:
    shop = yaml.safe_load((E2E / "plans" / "shop.yaml").read_text())
    [wave] = shop["waves"]
    reviews = next(s for s in wave["services"] if s["workload"] == WORKLOAD)
    return {**shop, "migration": "bench-rollback", "waves": [{"name": "main", "services": [reviews]}]}


def apis(s: Stack) -> tuple[client.AppsV1Api, client.CustomObjectsApi, client.CoreV1Api]:
    api = config.new_client_from_config(config_file=s.lab.kubeconfig("lab"))
    return client.AppsV1Api(api), client.CustomObjectsApi(api), client.CoreV1Api(api)


def pa_mode(s: Stack) -> str | None:
    items = apis(s)[1].list_namespaced_custom_object("security.istio.io", "v1", NS, "peerauthentications")["items"]
    found = [p for p in items if p["metadata"]["name"] == f"meshwave-{WORKLOAD}"]
    return found[0]["spec"]["mtls"]["mode"] if found else None


def until(check: Any, timeout: float, interval: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def patch_reporting(s: Stack, labels: dict | None = None, annotations: dict | None = None) -> None:
    meta = {k: v for k, v in (("labels", labels), ("annotations", annotations)) if v}
    apis(s)[0].patch_namespaced_deployment(CALLER, NS, {"spec": {"template": {"metadata": meta}}})


def proxied(s: Stack) -> bool:
    pods = apis(s)[2].list_namespaced_pod(NS, label_selector=f"app={CALLER}").items
    return bool(pods) and all(any(c.name == "istio-proxy" for c in p.spec.containers) for p in pods)


def success_series(s: Stack, start: float, end: float, window: str) -> list[tuple[float, float]]:
    query = urllib.parse.urlencode({"query": SUCCESS.format(ns=NS, app=CALLER, w=window), "start": f"{start:.3f}",
                                    "end": f"{end:.3f}", "step": "0.5"})
    with urllib.request.urlopen(f"{s.prometheus.url}/api/v1/query_range?{query}", timeout=30) as resp:
        result = json.loads(resp.read())["data"]["result"]
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


def applied_at(s: Stack, dag_id: str, run_id: str) -> tuple[float | None, dict[str, Any]]:
    tis = retried(lambda: s.airflow.task_instances(dag_id, run_id))
    ti = next((t for t in tis.values() if t["task_id"].endswith(".back_to_permissive")), None)
    if ti is None or ti["state"] != "success":
        return None, {"back_to_permissive": ti["state"] if ti else "absent"}
    result = retried(lambda: s.airflow.ti_xcom(ti))
    changes = [c for c in result.get("changes", []) if c.get("applied")]
    info = {"ti_start": stamp(ti["start_date"]), "ti_end": stamp(ti["end_date"]), "changes": changes}
    return (stamp(changes[-1]["timestamp"]) if changes else None), info


def measure() -> dict[str, Any]:
    p = plan()
    [dag_id] = dag_ids(p)
    window = f"{p['defaults']['query_window_seconds']}s"
    with tempfile.TemporaryDirectory(prefix="bench-rollback-") as tmp, stack(Path(tmp), E2E / "topology.yaml", p,
                                                                              "lab") as s:
        patch_reporting(s, labels={"sidecar.istio.io/inject": "true"})
        until(lambda: proxied(s), 90, 1, "reporting injected")
        wait_loaded(s, dag_id)
        time.sleep(20)  # a window of mTLS traffic from reporting before the wave
        load = load_average()
        run_id = s.airflow.trigger(dag_id)
        until(lambda: pa_mode(s) == "STRICT", 900, 0.5, "reviews STRICT")
        strict_seen = time.time()
        patch_reporting(s, annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "8080"})
        fault = time.time()
        # meshwave created reviews' policy (none existed before it): undoing STRICT deletes it
        permissive_seen = until(lambda: pa_mode(s) is None and time.time(), 180, 0.25,
                                "reviews back to PERMISSIVE (its policy deleted)")
        until(lambda: (v := success_series(s, time.time() - 2, time.time(), window)) and v[-1][1] >= 1.0, 120, 1,
              "reporting recovered")
        state = retried(lambda: s.airflow.wait_for_run(dag_id, run_id, timeout=600))
        series = success_series(s, strict_seen - 5, time.time(), window)
        applied, info = applied_at(s, dag_id, run_id)
        outcome = next(t for t in retried(lambda: s.airflow.task_instances(dag_id, run_id)).values()
                       if t["task_id"].endswith(".outcome"))
        record = retried(lambda: s.airflow.ti_xcom(outcome, key="record"))
    breach = next((t for t, v in series if t >= fault and v < THRESHOLD), None)
    applied = applied or permissive_seen
    back = next((t for t, v in series if t >= applied and v >= THRESHOLD), None)
    full = next((t for t, v in series if t >= applied and v >= 1.0), None)
    return {"state": state, "outcome": record.get("outcome"), "reason": record.get("reason"), "fault": fault,
            "breach_visible": breach, "permissive_applied_xcom": applied, "permissive_seen_poll": permissive_seen,
            "recovered_threshold": back, "recovered_full": full, "window": window, "load": load,
            "detection_seconds": round(applied - breach, 1) if breach else None,
            "detection_seconds_poll": round(permissive_seen - breach, 1) if breach else None,
            "recovery_seconds": round(back - breach, 1) if breach and back else None,
            "recovery_full_seconds": round(full - breach, 1) if breach and full else None, **info}


def figures(r: dict[str, Any], command: str) -> list[Figure]:
    poke, breaches = 5, 2
    compare = ("Flagger: interval x threshold = 60 s x 1 by default (interval >= 10 s; failures accumulate); Argo "
               "Rollouts: a failed measurement aborts at the next interval with failureLimit 0, but no data or "
               f"errors only after 5 errors x interval (consecutiveErrorLimit 4). meshwave: poke {poke} s, "
               f"breaches_to_fail {breaches} in a row, window {r['window']}")
    load = r["load"]
    return [
        Figure("4 rollback", "breach visible in Prometheus -> PERMISSIVE applied", r["detection_seconds"], "s",
               f"<= one poke interval + 10 s = {poke + 10} s", r["detection_seconds"] is not None
               and r["detection_seconds"] <= poke + 10, command, load,
               f"applied = the change record in back_to_permissive's XCom (1 s resolution); seen by polling the "
               f"lab: {r['detection_seconds_poll']} s; outcome {r['outcome']}: {r['reason']}; {compare}"),
        Figure("4 rollback", "breach visible -> caller's success rate back over its floor (0.98)",
               r["recovery_seconds"], "s", command=command, load=load,
               notes=f"the plan's {r['window']} rate window must first drop the failed requests"),
        Figure("4 rollback", "breach visible -> caller's success rate back to 1.0", r["recovery_full_seconds"], "s",
               command=command, load=load),
    ]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    result = measure()
    log(json.dumps(result))
    emit(figures(result, f"{PY} -m bench.rollback"), rows=[result])


if __name__ == "__main__":
    main()
