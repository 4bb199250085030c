"""Prometheus access for meshwave: instant queries, and the PromQL templates of include/promql/queries.yaml.

No Airflow imports. Everything is synchronous (triggers call it through asyncio.to_thread) and fails fast:
no retries inside (the deferrable sensor that calls it re-polls), a few seconds to connect, and an
exception that says which URL failed and how. Template values are validated before they reach PromQL.

`BatchingSource` serves the per-workload queries of many gates (one trigger per service, all in one
triggerer process) from one query per (Prometheus, template, cluster, window, time bucket), aggregated by
namespace and workload and split per workload: the queries of a batch do not grow with its services.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import requests
import yaml
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from meshwave.names import rfc1123_label

QUERIES_PATH = Path(__file__).resolve().parents[2] / "include" / "promql" / "queries.yaml"
QUERIES_ENV = "MESHWAVE_PROMQL_QUERIES"  # an operator's own copy of queries.yaml
CONNECT_TIMEOUT = 3.0  # seconds: a dead or unreachable Prometheus must not hold a trigger for minutes

# Prometheus' own duration grammar (model.ParseDuration): units in this order, each at most once.
DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
DURATION_SECONDS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
PLACEHOLDERS = frozenset({"namespace", "workload", "window", "cluster"})
BATCH_PLACEHOLDERS = frozenset({"window", "cluster"})
BUCKET_SECONDS = 2.0  # a batched answer serves every gate polling in the same bucket (evaluated at its start)
BUCKET_ENV = "MESHWAVE_QUERY_BUCKET_SECONDS"
SELECTOR = re.compile(r"\{[^{}]*\}")


class PrometheusError(Exception):
    """A query that could not be answered."""


class PrometheusUnavailable(PrometheusError):
    """Prometheus could not be reached or did not answer properly (refused, timeout, 5xx, not its API)."""


class PrometheusQueryError(PrometheusError):
    """Prometheus rejected the query itself (HTTP 400 bad_data, 422 execution error)."""


# ---- values -----------------------------------------------------------------------------------------
def encode_float(value: float | None) -> float | str | None:
    """JSON has no NaN/Inf: write them as Prometheus does ("NaN", "+Inf", "-Inf")."""
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def decode_float(value: float | str | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector. NaN and +-Inf are kept as floats; `finite` flags them."""

    labels: dict[str, str]
    value: float
    timestamp: float | None = None
    finite: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "finite", math.isfinite(self.value))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "value": encode_float(self.value), "timestamp": self.timestamp,
                "finite": self.finite}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        return cls(dict(data["labels"]), float(data["value"]), data.get("timestamp"))


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and its (timestamp, value) points in time order."""

    labels: dict[str, str]
    points: list[tuple[float, float]]


class Source(Protocol):
    """What the checks need from Prometheus (PrometheusSource, or a fake in tests)."""

    cluster: str | None

    def instant(self, query: str) -> list[Sample]: ...


# ---- the client ---------------------------------------------------------------------------------------
class _HTTPStatus(Exception):
    def __init__(self, status: int, error_type: str, error: str) -> None:
        super().__init__(status, error_type, error)
        self.status, self.error_type, self.error = status, error_type, error


def _check_status(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
    """Response hook: PrometheusConnect folds every non-200 into one exception type; keep the status apart."""
    if response.status_code == 200:
        return response
    try:
        body = response.json()
        error_type, error = str(body.get("errorType", "")), str(body.get("error", ""))
    except ValueError:
        error_type, error = "", response.text[:300].strip()
    raise _HTTPStatus(response.status_code, error_type, error)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _cause(exc: requests.RequestException) -> str:
    """The useful end of a requests/urllib3 error chain, e.g. '[Errno 111] Connection refused'."""
    inner: Any = exc.args[0] if exc.args else exc
    if isinstance(inner, MaxRetryError) and inner.reason is not None:
        inner = inner.reason
    text = str(inner)
    return text.split(": ", 1)[-1] if "Failed to establish" in text else text


class PrometheusSource:
    """Instant queries against one Prometheus, on prometheus-api-client's PrometheusConnect.

    `cluster`: the `cluster` label value the checks add to every selector (None: no cluster matcher).
    `verify`: requests' TLS verification of an https URL: True (the system's CAs), False (none), or a CA bundle path.
    One instance per trigger: its requests.Session may hop threads between calls but is not meant for
    concurrent calls.
    """

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 10,
                 cluster: str | None = None, verify: bool | str = True) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout: must be positive, got {timeout!r}")
        self.url = url.rstrip("/")
        self.cluster = validate_label("cluster", cluster) if cluster is not None else None
        # Who may share answers with whom (BatchingSource): same URL, headers and TLS verification (an unverified
        # answer is not one a verifying source may use); a digest, never the token.
        self.identity = (self.url, hashlib.sha256(repr((sorted((headers or {}).items()), verify)).encode()).hexdigest())
        self.timeout = float(timeout)
        self.connect_timeout = min(CONNECT_TIMEOUT, self.timeout)
        session = requests.Session()
        session.hooks["response"].append(_check_status)
        # PrometheusConnect ignores its disable_ssl when given a session, and sends every request with
        # verify=session.verify: so it is set here (a bool or a CA bundle path, as requests takes it).
        session.verify = verify
        # The library's default retries 3 times with back-off, on connection errors and 5xx: none here.
        # read=False re-raises a read timeout as itself (else urllib3 wraps it and requests calls it a
        # connection error).
        retry = Retry(total=0, read=False, redirect=0)
        self._client = PrometheusConnect(url=self.url, headers=headers, retry=retry,
                                         session=session, timeout=(self.connect_timeout, self.timeout))  # type: ignore[arg-type]

    def __repr__(self) -> str:  # never the headers: they may carry a token
        return f"PrometheusSource({_redact(self.url)!r}, cluster={self.cluster!r})"

    def instant(self, query: str, at: float | None = None) -> list[Sample]:
        """Run an instant query (at `at`, epoch seconds, or now); a vector (or scalar) result as samples."""
        # Prometheus' own evaluation timeout, so a heavy query ends there rather than in our read timeout.
        params = {"timeout": f"{self.timeout:g}s", **({"time": f"{at:.3f}"} if at is not None else {})}
        where = _redact(self.url)
        return _samples(self._ask(lambda: self._client.custom_query(query, params=params), query), query, where)

    def range(self, query: str, start: float, end: float, step: float) -> list[Series]:
        """Run a range query over [start, end] (epoch seconds) every `step` seconds: one Series per label set."""
        params = {"timeout": f"{self.timeout:g}s"}
        result = self._ask(lambda: self._client.custom_query_range(
            query, start_time=_utc(start), end_time=_utc(end), step=f"{step:g}", params=params), query)
        return _series(result, query, _redact(self.url))

    def _ask(self, call: Any, query: str) -> Any:
        """One request; every way it can fail as a PrometheusError that names the URL and the query."""
        where = _redact(self.url)
        try:
            return call()
        except _HTTPStatus as exc:
            detail = f"{exc.error_type}: {exc.error}" if exc.error_type else exc.error
            if exc.status in (400, 422):
                raise PrometheusQueryError(f"Prometheus at {where} rejected the query (HTTP {exc.status} {detail}); "
                                           f"query: {query}") from None
            raise PrometheusUnavailable(f"Prometheus at {where} answered HTTP {exc.status}: {detail}") from None
        except requests.ConnectTimeout:
            raise PrometheusUnavailable(f"Prometheus at {where}: no connection within {self.connect_timeout:g}s "
                                        "(connect timeout)") from None
        except requests.Timeout:
            raise PrometheusUnavailable(f"Prometheus at {where}: no answer within {self.timeout:g}s "
                                        "(read timeout)") from None
        except requests.ConnectionError as exc:
            raise PrometheusUnavailable(f"Prometheus at {where}: cannot connect: {_cause(exc)}") from None
        except requests.RequestException as exc:
            raise PrometheusUnavailable(f"Prometheus at {where}: request failed: {_cause(exc)}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise PrometheusUnavailable(f"Prometheus at {where} did not answer with the query API's JSON: "
                                        f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PrometheusSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _samples(result: Any, query: str, where: str) -> list[Sample]:
    """custom_query returns data.result only: a list of {metric, value} for a vector, [ts, "v"] for a scalar."""
    if isinstance(result, list) and len(result) == 2 and not isinstance(result[0], dict):
        return [_sample({}, result, query, where)]
    samples = []
    for item in result or []:
        if not isinstance(item, dict) or "value" not in item:
            raise PrometheusQueryError(f"Prometheus at {where}: the query does not return an instant vector "
                                       f"(a range vector?); query: {query}")
        samples.append(_sample(item.get("metric", {}), item["value"], query, where))
    return samples


def _series(result: Any, query: str, where: str) -> list[Series]:
    """custom_query_range returns data.result: a list of {metric, values: [[ts, "v"], ...]} (a matrix)."""
    found = []
    for item in result or []:
        if not isinstance(item, dict) or "values" not in item:
            raise PrometheusQueryError(f"Prometheus at {where}: the range query does not return a matrix; "
                                       f"query: {query}")
        samples = [_sample(item.get("metric", {}), pair, query, where) for pair in item["values"]]
        found.append(Series(dict(item.get("metric", {})), [(s.timestamp or 0.0, s.value) for s in samples]))
    return found


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _sample(metric: Any, pair: Any, query: str, where: str) -> Sample:
    """One [timestamp, "value"] pair. Anything else (null, a pair of the wrong length, a value that is no number)
    is a broken answer: reading it as no series would pass the checks that prove a zero by its absence."""
    try:
        ts, value = pair
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise TypeError(f"value {value!r} is not a number")
        return Sample(dict(metric), float(value), float(ts))
    except (TypeError, ValueError) as exc:
        raise PrometheusUnavailable(f"Prometheus unavailable: malformed answer from {where}: sample {pair!r} "
                                    f"of {metric!r} ({exc}); query: {query}") from None


def _same_prometheus(url: str) -> str:
    """A URL as a key for "the same Prometheus": no credentials, case-insensitive scheme and host, no trailing /."""
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rsplit("@", 1)[-1].lower()
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), parts.query, ""))


def shared_without_cluster(connections: dict[str, tuple[str, str | None]]) -> list[str]:
    """The clusters (sorted) whose Prometheus URL another cluster also uses while one of them has no `cluster` extra.

    `connections` maps each plan cluster to (its Prometheus URL, its connection's `cluster` extra or None). Without
    the extra every check of such a cluster sums the same-named workloads of all the clusters behind that
    Prometheus: a failure in one is diluted by the others (fail-open; safety review finding 20).
    """
    by_url: dict[str, list[str]] = {}
    for cluster, (url, _) in connections.items():
        by_url.setdefault(_same_prometheus(url), []).append(cluster)
    refused = [cluster for clusters in by_url.values() if len(clusters) > 1
               and any(not connections[c][1] for c in clusters) for cluster in clusters]
    return sorted(refused)


# ---- validation -----------------------------------------------------------------------------------------
def validate_label(name: str, value: object) -> str:
    """An RFC 1123 label (namespace, workload, cluster), else ValueError naming the field."""
    return rfc1123_label(value, name)


def validate_window(value: object, name: str = "window") -> str:
    """A Prometheus duration such as '30s', '5m', '1h30m' (an int is taken as seconds), else ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"{value}s"
    if not isinstance(value, str) or not value or not DURATION.match(value) or window_seconds(value) <= 0:
        raise ValueError(f"{name}: {value!r} is not a positive Prometheus duration such as '30s', '5m' or '1h30m'")
    return value


def window_seconds(window: str) -> float:
    match = DURATION.match(window)
    if not match:
        raise ValueError(f"window: {window!r} is not a Prometheus duration")
    return sum(int(n) * unit for n, unit in zip(match.groups(), DURATION_SECONDS, strict=True) if n)


# ---- templates --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSpec:
    """The batched form of a per-workload template: no $namespace/$workload, aggregated by the two labels that
    name the workload, `labels` being what a per-workload answer carries (the rest is dropped by the split)."""

    promql: str
    namespace_label: str
    workload_label: str
    labels: tuple[str, ...] = ()

    def render(self, *, window: str | int, cluster: str | None = None) -> str:
        return Template(self.promql).substitute(
            window=validate_window(window),
            cluster=f', cluster="{validate_label("cluster", cluster)}"' if cluster is not None else "")

    def split(self, samples: list[Sample]) -> dict[tuple[str, str], list[Sample]]:
        """The batched answer per (namespace, workload), each sample with the per-workload answer's labels."""
        found: dict[tuple[str, str], list[Sample]] = {}
        for s in samples:
            key = (s.labels.get(self.namespace_label, ""), s.labels.get(self.workload_label, ""))
            labels = {k: v for k, v in s.labels.items() if k in self.labels}
            found.setdefault(key, []).append(Sample(labels, s.value, s.timestamp))
        return found


@dataclass(frozen=True)
class QueryTemplate:
    name: str
    promql: str
    unit: str
    about: str
    no_series: str
    batch: BatchSpec | None = None

    def render(self, *, namespace: str, workload: str, window: str | int, cluster: str | None = None) -> str:
        values = {"namespace": validate_label("namespace", namespace), "workload": validate_label("workload", workload),
                  "window": validate_window(window),
                  "cluster": f', cluster="{validate_label("cluster", cluster)}"' if cluster is not None else ""}
        return Template(self.promql).substitute(values)


def queries_path() -> Path:
    return Path(os.environ.get(QUERIES_ENV) or QUERIES_PATH)


def load_queries(path: str | Path | None = None) -> dict[str, QueryTemplate]:
    """The templates, checked: known placeholders only, and every selector ends with `$cluster}`."""
    path = Path(path) if path is not None else queries_path()
    return _load(path.resolve(), path.stat().st_mtime_ns)


def _check_promql(where: str, promql: str, allowed: frozenset[str]) -> None:
    template = Template(promql)
    if not template.is_valid() or set(template.get_identifiers()) - allowed:
        raise ValueError(f"{where}: placeholders must be among ${', $'.join(sorted(allowed))}")
    for selector in SELECTOR.findall(promql):
        if not selector.endswith("$cluster}"):
            raise ValueError(f"{where}: selector {selector} must end with $cluster")


def _batch_spec(where: str, spec: object) -> BatchSpec | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("promql"), str) or \
            not all(isinstance(spec.get(k), str) for k in ("namespace_label", "workload_label")):
        raise ValueError(f"{where}: needs 'promql', 'namespace_label' and 'workload_label' strings")
    _check_promql(where, spec["promql"], BATCH_PLACEHOLDERS)
    return BatchSpec(spec["promql"].strip(), spec["namespace_label"], spec["workload_label"],
                     tuple(str(label) for label in spec.get("labels") or ()))


@lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int) -> dict[str, QueryTemplate]:  # mtime in the key: an edit is picked up
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("queries"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'queries' mapping")
    templates = {}
    for name, spec in data["queries"].items():
        where = f"{path}: queries.{name}"
        if not isinstance(spec, dict) or not isinstance(spec.get("promql"), str):
            raise ValueError(f"{where}: needs a 'promql' string")
        _check_promql(where, spec["promql"], PLACEHOLDERS)
        templates[name] = QueryTemplate(name, spec["promql"].strip(), str(spec.get("unit", "")),
                                        str(spec.get("about", "")).strip(), str(spec.get("no_series", "")).strip(),
                                        _batch_spec(f"{where}.batch", spec.get("batch")))
    return templates


def template(name: str, path: str | Path | None = None) -> QueryTemplate:
    templates = load_queries(path)
    if name not in templates:
        raise ValueError(f"query: unknown query {name!r} (known: {', '.join(sorted(templates))})")
    return templates[name]


def render(name: str, *, namespace: str, workload: str, window: str | int, cluster: str | None = None,
           path: str | Path | None = None) -> str:
    """One query from queries.yaml with validated values; ValueError names a bad field or an unknown query."""
    return template(name, path).render(namespace=namespace, workload=workload, window=window, cluster=cluster)


# ---- batching: one query for many workloads -----------------------------------------------------------------
class _Entry:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: dict[tuple[str, str], list[Sample]] = {}
        self.error: PrometheusError | None = None


def _as_prometheus_error(exc: BaseException, query: str) -> PrometheusError:
    """What the gates sharing a batch see when its owner failed: a PrometheusError, whatever the owner hit (a
    malformed answer, a bug in `split`, an interrupted thread), so every gate reads an error, never no series."""
    if isinstance(exc, PrometheusError):
        return exc
    return PrometheusUnavailable(f"Prometheus unavailable: the batched query failed with {type(exc).__name__}: "
                                 f"{exc}; query: {query}")


class SharedBatches:
    """Batched answers shared by every BatchingSource of a process (the triggerer's gates), single-flight:
    the first gate asking for a (Prometheus, query, bucket) runs it, the others wait for its answer.

    Whatever the owner's fetch raises is the error of every gate waiting on it; the entry is dropped (a failure
    is not cached: a later gate asks again and gets its own answer or error, never an empty one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, str, float], _Entry] = {}
        self.queries = 0  # batched queries actually sent (for tests and benchmarks)

    def get(self, key: tuple[Any, str, float], fetch: Any, wait: float) -> dict[tuple[str, str], list[Sample]]:
        with self._lock:
            entry = self._entries.get(key)
            owner = entry is None
            if owner:
                entry = self._entries[key] = _Entry()
                self._prune(key[2])
        if owner:
            self._fetch(key, entry, fetch)
        elif not entry.done.wait(wait):
            raise PrometheusUnavailable(f"no batched answer within {wait:g}s (query: {key[1]})")
        if entry.error is not None:
            raise type(entry.error)(str(entry.error))  # a fresh exception per thread
        return entry.value

    def _fetch(self, key: tuple[Any, str, float], entry: _Entry, fetch: Any) -> None:
        try:
            entry.value = fetch()
            with self._lock:
                self.queries += 1
        except BaseException as exc:
            entry.error = _as_prometheus_error(exc, key[1])
            with self._lock:
                self._entries.pop(key, None)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: the waiters got their error, the owner stops
        finally:
            entry.done.set()

    def _prune(self, at: float) -> None:
        for key in [k for k in self._entries if k[2] < at - 60]:
            del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.queries = 0


SHARED = SharedBatches()


def bucket_seconds(poke_interval: float | None = None) -> float:
    """The bucket width: MESHWAVE_QUERY_BUCKET_SECONDS (default 2 s), never wider than the poke interval."""
    width = float(os.environ.get(BUCKET_ENV) or BUCKET_SECONDS)
    return max(0.5, min(width, poke_interval) if poke_interval else width)


class BatchingSource:
    """A Source whose per-workload queries (`workload_query`) are answered from the shared batched queries.

    A template without a `batch` form, or a batched query that Prometheus rejects, falls back to the
    per-workload query. The values are those of the per-workload query evaluated at the bucket's start.
    """

    def __init__(self, inner: PrometheusSource, bucket: float | None = None, shared: SharedBatches = SHARED,
                 path: str | Path | None = None) -> None:
        self.inner = inner
        self.cluster = inner.cluster
        self.bucket = bucket or bucket_seconds()
        self.shared = shared
        self.path = path

    def instant(self, query: str, at: float | None = None) -> list[Sample]:
        return self.inner.instant(query, at=at)

    def workload_query(self, name: str, query: str, *, namespace: str, workload: str, window: str | int,
                       cluster: str | None) -> list[Sample]:
        spec = template(name, self.path).batch
        if spec is None:
            return self.inner.instant(query)
        batch = spec.render(window=window, cluster=cluster)
        at = math.floor(time.time() / self.bucket) * self.bucket
        key = (getattr(self.inner, "identity", id(self.inner)), batch, at)
        try:
            split = self.shared.get(key, lambda: spec.split(self.inner.instant(batch, at=at)),
                                    wait=getattr(self.inner, "timeout", 10) + CONNECT_TIMEOUT + 5)
        except PrometheusQueryError:
            return self.inner.instant(query)  # an operator's batch form Prometheus refuses: the plain query
        return split.get((namespace, workload), [])

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> BatchingSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
