"""`meshlab serve`, `meshlab validate`, `meshlab import` and `meshlab rehearse`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from pathlib import Path

from meshlab.controller import Timing
from meshlab.lab import Lab
from meshlab.server import serve
from meshlab.topology import TopologyError, load_topology


def _validate(args: argparse.Namespace) -> int:
    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 1
    deployments = sum(1 for s in topology.services if s.kind == "deployment")
    pods = sum(s.replicas for s in topology.services if s.kind == "deployment")
    print(f"{args.topology}: ok: {len(topology.clusters)} clusters, {deployments} deployments "
          f"({pods} pods), {len(topology.services) - deployments} callers outside Kubernetes")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 1
    timing = Timing(pod_start_seconds=args.pod_start_seconds)
    lab = Lab(topology, timing)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(lab, kubeconfig_dir=args.kubeconfig_dir, state_file=args.state_file,
                    metrics_port=args.metrics_port, tick_seconds=args.tick_seconds, stop=stop,
                    api_ports=dict(args.api_port), host=args.host, advertise_host=args.advertise_host)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"meshlab: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


def _import(args: argparse.Namespace) -> int:
    """A topology from a fleet's inventory and call graph, read with `meshwave plan propose`'s readers."""
    from meshlab.importer import build, read_fleet
    from meshwave.prometheus import PrometheusError, validate_window, window_seconds
    from meshwave.propose.command import ProposeError, clients

    try:
        lookback = validate_window(args.lookback, "--lookback")
        kubes, sources, connections = clients(args.conn, args.kubeconfig, args.prometheus)
        inventory, graph, policies = read_fleet(kubes, sources, lookback, window_seconds(lookback))
        roots = {k.root_namespace for k in kubes.values()}
        imported = build(args.name or args.out.stem, inventory, graph, policies, root_namespace=min(roots))
    except (ProposeError, PrometheusError, ValueError) as exc:
        print(f"meshlab import: {exc}; nothing written", file=sys.stderr)
        return 2
    through = " (their Airflow connections)" if connections is not None else ""
    source = f"clusters {', '.join(sorted(kubes))}{through}, telemetry of the last {lookback}"
    args.out.write_text(imported.text(source))
    services = imported.topology["services"]
    calls = sum(len(s.get("calls", [])) for s in services)
    print(f"{args.out}: {sum(1 for s in services if s.get('kind') != 'external')} deployments, "
          f"{sum(1 for s in services if s.get('kind') == 'external')} callers outside Kubernetes, {calls} calls, "
          f"{len(imported.topology['peer_authentications'])} PeerAuthentications ({source})")
    from meshlab.importer import NOT_CARRIED

    for line in NOT_CARRIED + imported.notes:
        print(f"  not carried / note: {line}")
    return 0


def _rehearse(args: argparse.Namespace) -> int:
    """Every wave of a plan on the lab, a Prometheus and Airflow (meshlab.rehearsal); exit 1 when it failed."""
    from meshlab.rehearsal.plan_copy import RehearsalError
    from meshlab.rehearsal.run import rehearse_on_lab, summary_lines
    from meshstack.process import ProcessError

    try:
        result = rehearse_on_lab(args.plan, args.topology, args.soak_seconds, args.out, args.timeout * 60,
                                 log=functools.partial(print, flush=True))
    except (RehearsalError, ProcessError, TopologyError) as exc:
        print(f"meshlab rehearse: {exc}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line)
    return 0 if result.passed else 1


def _cluster_port(text: str) -> tuple[str, int]:
    cluster, _, port = text.partition("=")
    if not cluster or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected CLUSTER=PORT")
    return cluster, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshlab", description="A simulated Kubernetes + Istio cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a topology file")
    p.add_argument("topology", type=Path)
    p.set_defaults(func=_validate)
    p = sub.add_parser("serve", help="serve the clusters of a topology on loopback")
    p.add_argument("--topology", type=Path, required=True)
    p.add_argument("--kubeconfig-dir", type=Path, default=Path(".meshlab"),
                   help="where to write <cluster>.kubeconfig (default .meshlab)")
    p.add_argument("--state-file", type=Path, help="write the ports and kubeconfig paths here as JSON")
    p.add_argument("--metrics-port", type=int, default=0, help="port of /metrics and /admin (0: any free port)")
    p.add_argument("--tick-seconds", type=float, default=0.5, help="simulation step")
    p.add_argument("--pod-start-seconds", type=float, default=1.0, help="time from pod creation to ready")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; 0.0.0.0 only inside a container's own network)")
    p.add_argument("--advertise-host", help="host name written into the kubeconfigs (default: --host)")
    p.add_argument("--api-port", type=_cluster_port, action="append", default=[], metavar="CLUSTER=PORT",
                   help="a fixed Kubernetes API port for a cluster (default: any free port)")
    p.set_defaults(func=_serve)
    p = sub.add_parser("import", help="write a topology from a fleet's inventory and call graph")
    p.add_argument("--conn", action="append", metavar="CLUSTER=KUBERNETES_CONN_ID,PROMETHEUS_CONN_ID",
                   help="a cluster and its Airflow connections (looked up as Airflow does: the secrets backend, "
                        "AIRFLOW_CONN_<ID>, the metastore); once per cluster, instead of --kubeconfig and "
                        "--prometheus")
    p.add_argument("--kubeconfig", action="append", metavar="CLUSTER=PATH",
                   help="a cluster's name and its kubeconfig; once per cluster")
    p.add_argument("--prometheus", action="append", metavar="URL|CLUSTER=URL",
                   help="the Prometheus for every cluster, or one per cluster")
    p.add_argument("--lookback", default="10m", help="how far back the telemetry is read (default 10m)")
    p.add_argument("--name", help="the topology's name (default: the output file's stem)")
    p.add_argument("--out", type=Path, required=True, help="the topology file to write")
    p.set_defaults(func=_import)
    p = sub.add_parser("rehearse", help="run every wave of a plan on the lab, Prometheus and Airflow, then judge it")
    p.add_argument("plan", type=Path, help="the plan file")
    p.add_argument("--topology", type=Path, required=True, help="the lab topology with the plan's clusters")
    p.add_argument("--soak-seconds", type=int, default=20, help="every soak and verification (default 20)")
    p.add_argument("--out", type=Path, default=Path(".rehearsal"), help="the report and the stack's logs "
                                                                          "(default .rehearsal)")
    p.add_argument("--timeout", type=float, default=120, help="minutes the waves may take in all (default 120)")
    p.set_defaults(func=_rehearse)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(getattr(args, "log_level", "WARNING")).upper(), logging.WARNING))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
