"""`meshwave plan propose`: arguments, the clusters and Prometheus checked before anything is read, and the files
written only once everything is known (a bad input leaves nothing half-written)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshwave.names import rfc1123_label
from meshwave.prometheus import PrometheusError, PrometheusSource, validate_window, window_seconds

if TYPE_CHECKING:
    from meshwave.kube import MeshKube


CONN_FORM = "CLUSTER=KUBERNETES_CONN_ID,PROMETHEUS_CONN_ID"
EXCLUDE_FORM = "CLUSTER/NAMESPACE/WORKLOAD=REASON"
PROMETHEUS_TIMEOUT = 20  # seconds: a fleet's lookback queries are heavier than a check's


class ProposeError(Exception):
    """Bad input or an unreachable cluster or Prometheus: the message says what and where."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conn", action="append", metavar=CONN_FORM,
                        help="a cluster and its Airflow connections, looked up as Airflow does (the secrets backend, "
                             "AIRFLOW_CONN_<ID>, the metastore) and written to the plan as given; once per cluster, "
                             "instead of --kubeconfig and --prometheus")
    parser.add_argument("--kubeconfig", action="append", metavar="CLUSTER=PATH",
                        help="a cluster's name and its kubeconfig; once per cluster")
    parser.add_argument("--prometheus", action="append", metavar="URL|CLUSTER=URL",
                        help="the Prometheus for every cluster (series split by their `cluster` label), or one per "
                             "cluster")
    parser.add_argument("--exclude", action="append", default=[], metavar=EXCLUDE_FORM,
                        help="a workload its team knows cannot take a sidecar: not planned, and its callees stay "
                             "PERMISSIVE with the reason next to them; once per workload")
    parser.add_argument("--lookback", default="10m", help="how far back the telemetry is read (default 10m)")
    parser.add_argument("--max-wave", type=int, default=20, help="services per wave at most (default 20)")
    parser.add_argument("--max-batch", type=int, help="services in parallel: the plan's batch_size and the pilot "
                                                      "wave's size (default: --defaults-from's batch_size, else 3)")
    parser.add_argument("--out", type=Path, required=True, help="the plan file to write")
    parser.add_argument("--migration", help="the plan's migration name (default: the file's name)")
    parser.add_argument("--conn-prefix", default="meshwave", help="Airflow connection ids are <prefix>_<cluster> and "
                        "<prefix>_prometheus_<cluster>, '-' as '_' (default meshwave)")
    parser.add_argument("--sidecar-memory-mi", type=float,
                        help="the sidecar's expected working set, what undersized proxies are sized for (the seed "
                             "measured 150-300 MB; default: --defaults-from's sidecar.expected_memory_mi, else 150)")
    parser.add_argument("--hop-latency-ms", default="35-50", help="latency a proxy adds per hop, LOW-HIGH or one "
                                                                   "number (the seed measured 35-50)")
    parser.add_argument("--defaults-from", type=Path, metavar="PLAN",
                        help="carry the defaults a plan sets (soaks, thresholds, timeouts) into this one, e.g. the "
                             "plan proposed again; --max-batch and --sidecar-memory-mi, when given, override its "
                             "batch_size and sidecar.expected_memory_mi")
    parser.add_argument("--idle-in-order", action="store_true", help="plan services with no observed traffic like "
                        "the others (default: a last wave, strict: false)")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        result, options = _propose(args)
        written = _write(args.out, result)
    except ProposeError as exc:
        print(f"meshwave plan propose: {exc}; nothing written", file=sys.stderr)
        return 2
    waves = result.proposal.waves
    services = [s for w in waves for s in w.services]
    print(f"{args.out}: {len(waves)} waves, {len(services)} services ({sum(s.strict for s in services)} STRICT), "
          f"{len(result.proposal.excluded)} not planned, {len(result.proposal.idle)} idle, "
          f"{len(result.proposal.unmeshable_callers)} callers that cannot be meshed; "
          f"{result.cost.fleet.sidecars} sidecars added; {time.monotonic() - started:.1f} s")
    for path in written:
        print(f"  wrote {path}")
    return 0


def _propose(args: argparse.Namespace) -> tuple[Any, Any]:
    from meshwave.propose.inventory import NotInInventory
    from meshwave.propose.run import Options, propose

    options = _options(args)
    kubes, sources, connections, how = _reach(args)
    # One line that differs between two proposals of the same fleet: when, and how the clusters were reached.
    header = [f"Proposed by `meshwave plan propose` at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from "
              f"{', '.join(sorted(kubes))} ({how}), telemetry of the last {options.lookback}: a proposal to review, "
              "not a decision."]
    try:
        return propose(kubes, sources, connections, Options(**options.__dict__), header), options
    except (PrometheusError, NotInInventory) as exc:
        raise ProposeError(str(exc)) from None
    except ValueError as exc:  # a plan the schema refuses: a bug here, never a file on disk
        raise ProposeError(f"the proposed plan does not validate: {exc}") from None


def _options(args: argparse.Namespace) -> Any:
    from meshwave.propose.plan_file import carried_defaults
    from meshwave.propose.run import Options

    try:
        lookback = validate_window(args.lookback, "--lookback")
        migration = rfc1123_label(args.migration or args.out.stem.replace("_", "-").lower(), "--migration")
        low, _, high = args.hop_latency_ms.partition("-")
        hop = (float(low), float(high or low))
        excluded = _exclusions(args.exclude)
        carried = None if args.defaults_from is None else carried_defaults(args.defaults_from)
    except ValueError as exc:
        raise ProposeError(str(exc)) from None
    max_batch, expected_mi = _sizes(args, carried or {})
    for name, value in (("max_wave", args.max_wave), ("max_batch", max_batch)):
        if value < 1:
            raise ProposeError(f"--{name.replace('_', '-')}: must be at least 1")
    if expected_mi <= 0:
        raise ProposeError("--sidecar-memory-mi: must be positive")
    return Options(migration=migration, lookback=lookback, lookback_seconds=window_seconds(lookback),
                   max_wave=args.max_wave, max_batch=max_batch, expected_memory_mi=expected_mi,
                   per_hop_ms=hop, idle_last=not args.idle_in_order, excluded=excluded, defaults=carried,
                   defaults_from=str(args.defaults_from or ""))


def _sizes(args: argparse.Namespace, carried: dict[str, Any]) -> tuple[int, float]:
    """batch_size and the sidecar's expected memory: the option when given, else the carried plan's, else 3 and 150
    (they shape the proposal itself: the pilot's size, which proxies are undersized)."""
    batch = next(v for v in (args.max_batch, carried.get("batch_size"), 3) if v is not None)
    expected = next(v for v in (args.sidecar_memory_mi, (carried.get("sidecar") or {}).get("expected_memory_mi"), 150)
                    if v is not None)
    return batch, expected


def _exclusions(values: list[str]) -> dict[str, str]:
    """`--exclude CLUSTER/NAMESPACE/WORKLOAD=REASON` as inventory key -> reason."""
    found: dict[str, str] = {}
    for value in values:
        key, _, reason = value.partition("=")
        parts = key.split("/")
        if len(parts) != 3 or not reason.strip():
            raise ValueError(f"--exclude {value!r}: expected {EXCLUDE_FORM}")
        for part, what in zip(parts, ("cluster", "namespace", "workload"), strict=True):
            rfc1123_label(part, f"--exclude {key}: {what}")
        if key in found:
            raise ValueError(f"--exclude: {key} given twice")
        found[key] = reason.strip()
    return found


def clients(conn: list[str] | None, kubeconfig: list[str] | None, prometheus: list[str] | None
            ) -> tuple[dict[str, MeshKube], dict[str, PrometheusSource], dict[str, tuple[str, str]] | None]:
    """The clusters' clients, each reached once: through Airflow connections (`--conn`; with each cluster's
    connection ids), or a kubeconfig per cluster and `--prometheus` (ids None). Also `meshlab import`'s."""
    if conn and (kubeconfig or prometheus):
        raise ProposeError("--conn reads the clusters through Airflow connections, --kubeconfig and --prometheus "
                           "directly: give one or the other, not both")
    if conn:
        from meshwave.propose.airflow_connections import connect_airflow

        return connect_airflow(conn)
    if not kubeconfig or not prometheus:
        raise ProposeError(f"give --conn {CONN_FORM} for each cluster, or --kubeconfig CLUSTER=PATH for each "
                           "cluster and --prometheus")
    return (*connect(kubeconfig, prometheus), None)


def _reach(args: argparse.Namespace) -> tuple[dict[str, MeshKube], dict[str, PrometheusSource],
                                              dict[str, tuple[str, str]], str]:
    """The clients, each cluster's connection ids for the plan, and how they were reached (for the header)."""
    kubes, sources, connections = clients(args.conn, args.kubeconfig, args.prometheus)
    if connections is not None:
        return kubes, sources, connections, "their Airflow connections"
    prefix = args.conn_prefix
    connections = {c: (f"{prefix}_{c.replace('-', '_')}", f"{prefix}_prometheus_{c.replace('-', '_')}")
                   for c in kubes}
    return kubes, sources, connections, f"kubeconfigs; connection ids {prefix}_<cluster> and " \
                                        f"{prefix}_prometheus_<cluster>"


def connect(kubeconfigs: list[str], prometheus: list[str]) -> tuple[dict[str, MeshKube],
                                                                    dict[str, PrometheusSource]]:
    """Every cluster of `--kubeconfig CLUSTER=PATH` and its Prometheus (`--prometheus URL|CLUSTER=URL`), each
    reached once: a ProposeError names the first that does not answer (also `meshlab import`'s arguments)."""
    kubes = {cluster: _kube(cluster, path)
             for cluster, path in pairs(kubeconfigs, "--kubeconfig", "CLUSTER=PATH").items()}
    return kubes, _sources(prometheus, sorted(kubes))


def pairs(values: list[str], flag: str, form: str) -> dict[str, str]:
    """`CLUSTER=VALUE` arguments as cluster -> value; a ProposeError for a malformed or repeated cluster."""
    found = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not rest:
            raise ProposeError(f"{flag} {value!r}: expected {form}")
        try:
            rfc1123_label(name, f"{flag} cluster")
        except ValueError as exc:
            raise ProposeError(str(exc)) from None
        if name in found:
            raise ProposeError(f"{flag}: cluster {name} given twice")
        found[name] = rest
    return found


def _kube(cluster: str, path: str) -> MeshKube:
    """A cluster's client, asked for its version first: an unreachable cluster fails before anything is read."""
    from kubernetes import config

    from meshwave.kube import MeshKube
    from meshwave.kube_errors import KubeError

    if not Path(path).is_file():
        raise ProposeError(f"cluster {cluster}: kubeconfig {path} does not exist")
    try:
        kube = MeshKube(config.new_client_from_config(config_file=path), cluster, connect_timeout=3, read_timeout=20)
        kube.ping()
    except KubeError as exc:
        raise ProposeError(f"cluster {cluster} (kubeconfig {path}): {exc}") from None
    except Exception as exc:  # a kubeconfig the client cannot use
        raise ProposeError(f"cluster {cluster}: kubeconfig {path}: {type(exc).__name__}: {exc}") from None
    return kube


def _sources(values: list[str], clusters: list[str]) -> dict[str, PrometheusSource]:
    shared = [v for v in values if "=" not in v.split("://", 1)[0]]
    own = pairs([v for v in values if v not in shared], "--prometheus", "URL or CLUSTER=URL")
    if len(shared) > 1:
        raise ProposeError(f"--prometheus: {len(shared)} URLs for every cluster; give one, or CLUSTER=URL each")
    if unknown := sorted(set(own) - set(clusters)):
        raise ProposeError(f"--prometheus: cluster {unknown[0]} has no --kubeconfig")
    if missing := [c for c in clusters if c not in own and not shared]:
        raise ProposeError(f"--prometheus: no Prometheus for cluster {missing[0]}")
    by_url: dict[str, PrometheusSource] = {}
    found = {}
    for cluster in clusters:
        url = own.get(cluster) or shared[0]
        if url not in by_url:
            users = [c for c in clusters if (own.get(c) or shared[0]) == url]
            by_url[url] = probe(PrometheusSource(url, timeout=PROMETHEUS_TIMEOUT), f"Prometheus for {', '.join(users)}")
        found[cluster] = by_url[url]
    return found


def probe(source: PrometheusSource, what: str) -> PrometheusSource:
    """`source`, once it answered a query; else a ProposeError that starts with `what`."""
    try:
        source.instant("vector(1)")
    except PrometheusError as exc:
        raise ProposeError(f"{what}: {exc}") from None
    return source


def _write(out: Path, result: Any) -> list[Path]:
    """The plan, its markdown summary and picture: written to temporary files, then renamed into place."""
    from meshwave.propose import summary

    out.parent.mkdir(parents=True, exist_ok=True)
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    staged: list[tuple[Path, Path]] = []
    try:
        staged.append((_stage(out, lambda p: p.write_text(result.plan)), out))
        staged.append((_stage(md, lambda p: p.write_text(result.summary)), md))
        staged.append((_stage(png, lambda p: summary.picture(result.graph, result.proposal, p)), png))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    return [final for _, final in staged]


def _stage(final: Path, write: Callable[[Path], Any]) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    # mkstemp's file is private (0600): the plan must stay readable by whoever parses the DAGs, as a file written
    # directly would be (the umask decides)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    write(Path(name))
    return Path(name)
