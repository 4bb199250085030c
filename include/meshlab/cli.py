"""`meshlab serve` and `meshlab validate`."""

from __future__ import annotations

import argparse
import asyncio
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(getattr(args, "log_level", "WARNING")).upper(), logging.WARNING))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
