"""The migration plan: which services move onto the mesh, in which waves, gated by which checks.

A plan is YAML validated with pydantic at DAG parse time from the local file only (no network, no
database). A mistake is reported with the file, the field path and the problem, e.g.
``include/plans/demo.yaml: waves[0].services[2].namespace: 'Shop' is not a valid RFC 1123 label``.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meshwave.names import rfc1123_label

CONN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class PlanError(ValueError):
    """A plan that cannot be used; the message names the file, the field and the problem."""


def _conn_id(value: str) -> str:
    if not CONN_ID.match(value):
        raise ValueError(f"{value!r} is not a valid Airflow connection id (letters, digits, '_', '.', '-')")
    return value


def _cron(value: str | None) -> str | None:
    from croniter import croniter  # a dependency of Airflow itself

    if value is not None and not croniter.is_valid(value):
        raise ValueError(f"{value!r} is not a valid cron expression")
    return value


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not a known IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
    return value


Seconds = Annotated[int, Field(ge=1, le=7 * 24 * 3600)]


class Strict(BaseModel):
    """Every plan model: unknown keys are refused (a misspelled key is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterConfig(Strict):
    """Where a cluster's Kubernetes API and Prometheus are: Airflow connection ids, never URLs in the plan."""

    kubernetes_conn_id: str = Field(description="The Airflow connection (type kubernetes) that reaches the cluster's "
                                    "API server: letters, digits, '_', '.', '-'.")
    prometheus_conn_id: str = Field(description="The Airflow connection (type meshwave_prometheus or http, the "
                                    "Prometheus URL as its host) that reads the cluster's Istio and application "
                                    "metrics: letters, digits, '_', '.', '-'.")
    root_namespace: str = Field("istio-system", description="Istio's root namespace (an RFC 1123 label): its "
                                "mesh-wide PeerAuthentication and the sidecar injector's ConfigMap are read there.")
    revision: str | None = Field(None, description="The Istio revision (or tag) new sidecars come from: 'default' "
                                 "or a revision such as '1-24-0'. Unset: meshwave finds it from the injection "
                                 "webhooks, and refuses to guess between several revisions without a default.")

    _conn = field_validator("kubernetes_conn_id", "prometheus_conn_id")(_conn_id)
    _root = field_validator("root_namespace")(rfc1123_label)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        # a label value (istio.io/rev), and Istio's own rule for revision names: an RFC 1123 label
        return None if value is None else rfc1123_label(value)


class Thresholds(Strict):
    """What the gates compare against the service's baseline (its metrics before the change); a breach confirmed
    `breaches_to_fail` polls in a row is a rollback."""

    max_success_drop: float = Field(0.02, ge=0, le=1, description="Absolute drop of the success rate allowed below "
                                    "the baseline, as a fraction (0.02: 99 % may fall to 97 %).")
    max_p99_increase_ms: float = Field(250, ge=0, description="Milliseconds the p99 latency may rise over the "
                                       "baseline; the p99 fails only when both this and `max_p99_ratio` are "
                                       "exceeded.")
    max_p99_ratio: float = Field(2.0, ge=1, description="How many times the baseline p99 latency the p99 may reach; "
                                 "the p99 fails only when both this and `max_p99_increase_ms` are exceeded.")
    max_restarts: int = Field(0, ge=0, description="Container restarts allowed per container over the soak so far; "
                              "an OOMKilled restart always fails.")
    min_inbound_ratio: float = Field(0.5, ge=0, le=1, description="After STRICT, the inbound request rate must stay "
                                     "at least this fraction of the rate before STRICT.")
    max_traffic_drop: float = Field(0.2, ge=0, le=1, description="In the soak, fraction of the baseline request "
                                                                 "rate that may go missing before it is a rollback.")
    sidecar_memory_limit_mi: float | None = Field(None, gt=0, description="Ceiling of the istio-proxy container's "
                                                  "working set, in MiB (Mi); unset: the working set is only "
                                                  "recorded.")


class Sidecar(Strict):
    """Sidecar sizing: `expected_memory_mi` drives the headroom preflight; the rest become pod annotations."""

    expected_memory_mi: float = Field(128, gt=0, description="Memory one sidecar is expected to use, in MiB (Mi): "
                                      "the headroom preflight checks the nodes and the namespace's quota and "
                                      "limits can take it for every replica.")
    cpu: str | None = Field(None, description="The sidecar's CPU request, a Kubernetes quantity such as '100m' "
                            "(annotation sidecar.istio.io/proxyCPU); unset: Istio's default.")
    memory: str | None = Field(None, description="The sidecar's memory request, a Kubernetes quantity such as "
                               "'128Mi' (annotation sidecar.istio.io/proxyMemory); unset: Istio's default.")
    cpu_limit: str | None = Field(None, description="The sidecar's CPU limit (annotation "
                                  "sidecar.istio.io/proxyCPULimit); unset: Istio's default.")
    memory_limit: str | None = Field(None, description="The sidecar's memory limit (annotation "
                                     "sidecar.istio.io/proxyMemoryLimit); unset: Istio's default.")

    @property
    def annotations(self) -> dict[str, str]:
        keys = {"cpu": "proxyCPU", "memory": "proxyMemory", "cpu_limit": "proxyCPULimit",
                "memory_limit": "proxyMemoryLimit"}
        return {f"sidecar.istio.io/{k}": getattr(self, f) for f, k in keys.items() if getattr(self, f)}


class Probe(Strict):
    """The plaintext probe that proves STRICT is in force: a short-lived pod without a sidecar runs curl
    against the workload's Service; only a connection reset by the workload's proxy (curl exit 56) proves it."""

    image: str = Field("curlimages/curl:8.11.1", min_length=1,
                       description="An image with curl; mirror it where clusters cannot pull from Docker Hub.")
    timeout_seconds: Annotated[int, Field(ge=5, le=600)] = Field(90, description="Seconds the probe pod may take "
                                                                 "(scheduling, image pull, curl) before the probe "
                                                                 "counts as failed.")


class NotifyEvent(StrEnum):
    """What a notification target may be told about (notify.py sends them)."""

    ROLLED_BACK = "rolled_back"          # a service was rolled back
    HELD = "held"                        # a service was held for lack of data
    FAILED = "failed"                    # a service failed (its state may be unknown)
    FROZEN = "frozen"                    # a service stopped by the freeze
    CIRCUIT_BREAKER = "circuit_breaker"  # the wave's remaining batches were skipped
    WAVE_FAILED = "wave_failed"          # the wave's run failed
    UNDO_GAVE_UP = "undo_gave_up"        # an undo (back to PERMISSIVE, sidecar removal) ran out of retries
    APPROVAL_NEEDED = "approval_needed"  # a batch waits for a person's approval before STRICT
    EMERGENCY_STARTED = "emergency_started"
    EMERGENCY_FINISHED = "emergency_finished"


class NotifyTarget(Strict):
    """Where notifications go: an Airflow connection and which events. `email`: an SMTP connection (the SMTP
    provider's SmtpNotifier) and `to`; `webhook`: a Slack-compatible incoming webhook (the Slack provider's
    SlackWebhookNotifier; the connection's password is the webhook URL or token)."""

    channel: Literal["email", "webhook"] = Field(description="email (SMTP connection, needs `to`) or webhook (a "
                                                "Slack-compatible incoming webhook; no `to`).")
    conn_id: str = Field(description="The Airflow connection that sends: letters, digits, '_', '.', '-'.")
    to: list[str] = Field(default_factory=list, description="email: the recipients (required for email, refused "
                                                            "for webhook)")
    events: list[NotifyEvent] = Field(default_factory=lambda: list(NotifyEvent),
                                      description="which events (default: all)", min_length=1)

    _conn = field_validator("conn_id")(_conn_id)

    @model_validator(mode="after")
    def _recipients(self) -> NotifyTarget:
        if self.channel == "email" and not self.to:
            raise ValueError("an email target needs `to` (one or more addresses)")
        if self.channel == "webhook" and self.to:
            raise ValueError("`to` is for email targets; a webhook posts to its connection's URL")
        return self


Criticality = Literal["critical", "high", "medium", "low"]


class Approval(Strict):
    """A person confirms STRICT: after the STRICT gates of a batch pass, one approval task per batch (Airflow's
    human-in-the-loop) lists the services of these criticalities that are ready, with their evidence; the approver
    chooses which to flip. The others, and all of them when nobody answers in `timeout_seconds`, stay PERMISSIVE
    ("not approved"). Set per wave or in `defaults`."""

    before_strict: list[Criticality] | Literal["all"] = Field(
        default_factory=list, description="the criticalities that need a person's approval before STRICT, or 'all'")
    timeout_seconds: Seconds = Field(3600, description="how long the approval waits for an answer; none in time is "
                                                       "'not approved' (the services stay PERMISSIVE)")

    @field_validator("before_strict", mode="before")
    @classmethod
    def _criticalities(cls, value: object) -> object:
        """One clear message instead of the union's two."""
        known = get_args(Criticality)
        if value == "all":
            return value
        if not isinstance(value, list) or any(v not in known for v in value):
            raise ValueError(f"{value!r}: give 'all' or a list of criticalities ({', '.join(known)})")
        return value

    def required(self, criticality: str) -> bool:
        return self.before_strict == "all" or criticality in self.before_strict

    @property
    def asked(self) -> bool:
        """Some service may wait for an approval (and its batch-mates with it)."""
        return bool(self.before_strict)


class Canary(Strict):
    """Part of the replicas first: a copy of the Deployment with the sidecar and the same selector labels takes its
    share of the Service's traffic for `soak_seconds`, judged against the primary's live metrics over the same
    window; then it is removed, and the primary is injected only if it passed (canary.py)."""

    replicas: Annotated[int, Field(ge=1, le=100)] = Field(1, description="pods of the canary copy")
    soak_seconds: Seconds = Field(300, description="how long the canary takes traffic before it is judged")


class Settings(Strict):
    """Knobs every service inherits from `defaults` unless it sets its own (`approval`: per wave or default)."""

    injection: Literal["workload", "namespace"] = Field("workload", description="How the sidecar is injected: "
                                                        "workload (the Deployment's pod template label) or namespace "
                                                        "(the namespace's label, then a restart).")
    soak_seconds: Seconds = Field(300, description="Seconds the injected service is watched against its baseline "
                                  "before STRICT; at least `query_window_seconds`.")
    # 20 s, not 30: a breach must stay in the 60 s window for breaches_to_fail (3) polls to be confirmed
    poke_interval_seconds: Seconds = Field(20, description="Seconds between two polls of the gates' Prometheus "
                                           "queries.")
    query_window_seconds: Annotated[int, Field(ge=10, le=3600)] = Field(60, description="The PromQL range window, "
                                                                        "in seconds; at least `breaches_to_fail` x "
                                                                        "`poke_interval_seconds`, or a breach leaves "
                                                                        "the window before it is confirmed.")
    rollout_timeout_seconds: Seconds = Field(600, description="Seconds a Deployment's rollout (injection, undo, "
                                             "canary) may take before it counts as failed.")
    verify_seconds: Seconds = Field(120, description="Seconds STRICT is verified after the flip (its gates and the "
                                    "plaintext probe); at least `query_window_seconds`.")
    strict_gate_timeout_seconds: Seconds = Field(600, description="Seconds the STRICT gates (no plaintext caller "
                                                 "left) may wait to pass before the service stays PERMISSIVE.")
    # How long past its own deadlines a run may take to confirm or undo a change before mesh_reconcile undoes it
    # (a paused wave, a broken plan file, an undo out of retries): see pending.py.
    reconcile_grace_seconds: Seconds = Field(600, description="Seconds past a run's own deadlines before "
                                             "mesh_reconcile undoes a change the run neither confirmed nor undid "
                                             "(a paused wave, a broken plan file, an undo out of retries).")
    breaches_to_fail: Annotated[int, Field(ge=1, le=100)] = Field(3, description="Polls in a row that must see a "
                                                                  "breach before it is a rollback.")
    min_requests: Annotated[int, Field(ge=0)] = Field(10, description="Requests per query window below which "
                                                      "success rate and latency are no data, never a pass.")
    on_no_data: Literal["hold", "rollback"] = Field("hold", description="What a stage whose gates saw only no "
                                                    "data or errors until its deadline does: hold (the sidecar "
                                                    "stays, PERMISSIVE, and counts against `max_failures`) or "
                                                    "rollback (the sidecar is removed).")
    thresholds: Thresholds = Field(default_factory=Thresholds, description="What the gates compare against the "
                                   "baseline.")
    sidecar: Sidecar = Field(default_factory=Sidecar, description="The sidecar's sizing.")
    probe: Probe = Field(default_factory=Probe, description="The plaintext probe that proves STRICT.")
    notify: list[NotifyTarget] = Field(default_factory=list, description="who is told about this service's "
                                       "rollbacks, holds, failures and freezes (defaults: the wave's events too)")
    canary: Canary | None = Field(None, description="a sidecar tried on a canary copy of the Deployment first "
                                                    "(none: the primary is injected directly)")
    approval: Approval = Field(default_factory=Approval, description="a person's approval before STRICT: per wave or "
                                                                     "default, never per service (a batch waits for "
                                                                     "its one approval task together)")


def timing_problems(settings: Settings) -> list[str]:
    """What is wrong with a (defaults or effective) settings' timing, as "field: problem"; [] when sound.

    - a breach is seen in one query window, so it is seen by `query_window / poke` polls: fewer than
      `breaches_to_fail` and it can never be confirmed (restarts and OOMs at the old defaults, review finding 11);
    - a soak or a verification shorter than the window judges mostly data from before the change (finding 19).
    """
    s, problems = settings, []
    polls = s.breaches_to_fail * s.poke_interval_seconds
    if s.query_window_seconds < polls:
        problems.append(f"query_window_seconds: {s.query_window_seconds} is shorter than breaches_to_fail "
                        f"{s.breaches_to_fail} x poke_interval_seconds {s.poke_interval_seconds} = {polls}: a breach "
                        "would leave the window before enough polls saw it to confirm it")
    soaks = [("soak_seconds", s.soak_seconds), ("verify_seconds", s.verify_seconds)]
    if s.canary is not None:
        soaks.append(("canary.soak_seconds", s.canary.soak_seconds))
    for name, seconds in soaks:
        if seconds < s.query_window_seconds:
            problems.append(f"{name}: {seconds} is shorter than query_window_seconds "
                            f"{s.query_window_seconds}: its judgement would rest mostly on data from before the change")
    return problems


class Defaults(Settings):
    """The plan's settings every service inherits, plus the wave-wide ones only the defaults set."""

    batch_size: Annotated[int, Field(ge=1, le=500)] = Field(5, description="Services migrated in parallel, one "
                                                            "batch after another.")
    max_failures: Annotated[int, Field(ge=1)] = Field(2, description="Rollbacks, holds and failures in a wave before "
                                                      "the circuit breaker skips its remaining batches.")
    schedule: str | None = Field(None, description="A cron expression for every wave's scheduled runs (a wave may "
                                 "set its own); unset: waves start by hand, at a window or after another wave.")

    _schedule = field_validator("schedule")(_cron)


_OVERRIDABLE = tuple(f for f in Settings.model_fields if f != "approval")


def _own(name: str) -> str:
    """A service's override of a default: the default's own description, said once (in Settings)."""
    own = f"The service's own `{name}` over `defaults.{name}` (unset: inherit)."
    return f"{own} {Settings.model_fields[name].description}"


class ServicePlan(Strict):
    """One workload to move onto the mesh; any of the defaults' settings but `approval` may be set here too."""

    cluster: str = Field(description="One of the plan's `clusters` (its name).")
    namespace: str = Field(description="The workload's namespace (an RFC 1123 label).")
    workload: str = Field(description="The Deployment's name (an RFC 1123 label).")
    criticality: Criticality = Field("medium", description="How critical the service is: decides which approval "
                                     "it needs (`approval.before_strict`) and is shown in reports.")
    strict: bool = Field(True, description="Flip the workload to STRICT mTLS once its gates pass; false: it gets "
                         "the sidecar and stays PERMISSIVE.")
    exclude_inbound_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=list, description="Inbound ports the sidecar does not intercept (Istio's "
                                          "excludeInboundPorts annotation), 1-65535.")
    exclude_outbound_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=list, description="Outbound ports the sidecar does not intercept (Istio's "
                                          "excludeOutboundPorts annotation), e.g. a database outside the mesh.")
    # Per-service overrides of the defaults (None: inherit).
    injection: Literal["workload", "namespace"] | None = Field(None, description=_own("injection"))
    soak_seconds: Seconds | None = Field(None, description=_own("soak_seconds"))
    poke_interval_seconds: Seconds | None = Field(None, description=_own("poke_interval_seconds"))
    query_window_seconds: Annotated[int, Field(ge=10, le=3600)] | None = Field(
        None, description=_own("query_window_seconds"))
    rollout_timeout_seconds: Seconds | None = Field(None, description=_own("rollout_timeout_seconds"))
    verify_seconds: Seconds | None = Field(None, description=_own("verify_seconds"))
    strict_gate_timeout_seconds: Seconds | None = Field(None, description=_own("strict_gate_timeout_seconds"))
    reconcile_grace_seconds: Seconds | None = Field(None, description=_own("reconcile_grace_seconds"))
    breaches_to_fail: Annotated[int, Field(ge=1, le=100)] | None = Field(None, description=_own("breaches_to_fail"))
    min_requests: Annotated[int, Field(ge=0)] | None = Field(None, description=_own("min_requests"))
    on_no_data: Literal["hold", "rollback"] | None = Field(None, description=_own("on_no_data"))
    thresholds: Thresholds | None = Field(None, description="The service's own thresholds, replacing the defaults' "
                                          "as a whole (unset: inherit).")
    sidecar: Sidecar | None = Field(None, description="The service's own sidecar sizing, replacing the defaults' "
                                    "as a whole (unset: inherit).")
    probe: Probe | None = Field(None, description="The service's own plaintext probe, replacing the defaults' "
                                "(unset: inherit).")
    notify: list[NotifyTarget] | None = Field(None, description="The service's own notification targets, "
                                              "replacing the defaults' list (unset: inherit).")
    canary: Canary | Literal[False] | None = Field(None, description="its own canary, or false: none though the "
                                                                     "defaults set one")

    _names = field_validator("cluster", "namespace", "workload")(rfc1123_label)

    @model_validator(mode="before")
    @classmethod
    def _no_own_approval(cls, data: object) -> object:
        if isinstance(data, dict) and "approval" in data:
            raise ValueError("approval: set it per wave or in defaults, not per service (a batch waits for one "
                             "approval together)")
        return data

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.workload}"

    def settings(self, defaults: Settings, approval: Approval | None = None) -> Settings:
        """The effective settings: the service's own values over the plan's defaults; `approval`: its wave's, over
        the defaults'."""
        own = {f: getattr(self, f) for f in _OVERRIDABLE if getattr(self, f) is not None}
        if own.get("canary") is False:
            own["canary"] = None
        return Settings(**{**{f: getattr(defaults, f) for f in _OVERRIDABLE}, **own},
                        approval=approval or defaults.approval)


class Occurrence(Strict):
    """One explicit maintenance window: [start, end). Naive times are in the window's time zone."""

    start: datetime = Field(description="When the window opens (ISO 8601; naive: in the window's time zone).")
    end: datetime = Field(description="When it closes (exclusive); after `start`.")

    @model_validator(mode="after")
    def _ordered(self) -> Occurrence:
        if self.end <= self.start:
            raise ValueError(f"end {self.end.isoformat()} is not after start {self.start.isoformat()}")
        return self


class Window(Strict):
    """When a wave may change things: a cron start + duration, or explicit dates; in a time zone."""

    cron: str | None = Field(None, description="When each occurrence starts (a cron expression, in `timezone`); "
                             "with `duration_minutes`, not with `dates`.")
    duration_minutes: Annotated[int, Field(ge=1, le=7 * 24 * 60)] | None = Field(
        None, description="How long each cron occurrence stays open, in minutes (at most a week).")
    dates: list[Occurrence] = Field(default_factory=list, description="Explicit windows instead of a cron.")
    timezone: str = Field("UTC", description="An IANA time zone (e.g. 'Europe/Berlin') for the cron and for naive "
                          "dates.")

    _cron = field_validator("cron")(_cron)
    _tz = field_validator("timezone")(_timezone)

    @model_validator(mode="after")
    def _one_kind(self) -> Window:
        if bool(self.cron) == bool(self.dates):
            raise ValueError("give either cron + duration_minutes, or dates (a list of {start, end})")
        if self.cron and not self.duration_minutes:
            raise ValueError("a cron window needs duration_minutes")
        if self.dates and self.duration_minutes:
            raise ValueError("duration_minutes goes with cron; explicit dates have their own end")
        return self

    def _aware(self, moment: datetime) -> datetime:
        tz = ZoneInfo(self.timezone)
        return moment.replace(tzinfo=tz) if moment.tzinfo is None else moment

    def occurrences(self) -> list[tuple[datetime, datetime]]:
        """The explicit windows, time-zone aware, in order."""
        return sorted((self._aware(o.start), self._aware(o.end)) for o in self.dates)

    def open_at(self, now: datetime) -> tuple[datetime, datetime] | None:
        """The window occurrence that contains `now` (aware), or None when the window is closed."""
        if self.cron:
            from croniter import croniter

            local = now.astimezone(ZoneInfo(self.timezone))
            start = croniter(self.cron, local + timedelta(seconds=1)).get_prev(datetime)
            end = start + timedelta(minutes=self.duration_minutes or 0)
            return (start, end) if start <= now < end else None
        return next(((s, e) for s, e in self.occurrences() if s <= now < e), None)

    def next_open(self, now: datetime) -> datetime | None:
        """When the window opens next after `now` (None: no explicit date left)."""
        if self.cron:
            from croniter import croniter

            return croniter(self.cron, now.astimezone(ZoneInfo(self.timezone))).get_next(datetime)
        return next((s for s, _ in self.occurrences() if s > now), None)

    def describe(self) -> str:
        if self.cron:
            return f"cron '{self.cron}' ({self.timezone}) for {self.duration_minutes} min"
        return ", ".join(f"{s.isoformat()} to {e.isoformat()}" for s, e in self.occurrences())


class Wave(Strict):
    """Services migrated by one DAG, batch by batch; it starts at its window, after an earlier wave, on its own
    schedule or by hand."""

    name: str = Field(description="The wave's name (an RFC 1123 label, unique in the plan); the DAG id is "
                      "meshwave_<migration>_<name> with '-' as '_'.")
    description: str = Field("", description="Free text shown in the DAG's documentation.")
    schedule: str | None = Field(None, description="A cron expression for the wave's runs (over "
                                 "`defaults.schedule`); not with `window` or `after`.")
    window: Window | None = Field(None, description="When the wave may change things: it starts when the window "
                                  "opens, and no service starts once it has closed.")
    after: str | None = Field(None, description="Start when this wave (of the same plan) ended within its budget.")
    approval: Approval | None = Field(None, description="a person's approval before STRICT for this wave's services "
                                                        "(unset: the defaults')")
    services: list[ServicePlan] = Field(min_length=1, description="The wave's services, in order (at least one); "
                                       "batches of `defaults.batch_size`.")

    _name = field_validator("name")(rfc1123_label)
    _schedule = field_validator("schedule")(_cron)

    @model_validator(mode="after")
    def _one_schedule(self) -> Wave:
        if self.schedule and (self.window or self.after):
            raise ValueError("schedule: a wave with a window starts at the window, a chained wave after its "
                             "predecessor: drop `schedule`")
        return self


class Plan(Strict):
    """A migration plan: the clusters, the settings every service inherits and the waves, one DAG each."""

    migration: str = Field(description="The migration's name (an RFC 1123 label); DAG ids are "
                           "meshwave_<migration>_<wave>.")
    description: str = Field("", description="Free text about the migration.")
    clusters: dict[str, ClusterConfig] = Field(min_length=1, description="The clusters by name (an RFC 1123 label, "
                                               "the mesh's cluster ID); at least one.")
    defaults: Defaults = Field(default_factory=Defaults, description="Settings every service inherits unless it "
                               "sets its own.")
    freeze: bool | str = Field(False, description="true or a reason: no wave of this plan changes anything.")
    waves: list[Wave] = Field(min_length=1, description="The waves in order (at least one); `after` names an "
                              "earlier one.")

    _migration = field_validator("migration")(rfc1123_label)

    @field_validator("clusters")
    @classmethod
    def _cluster_names(cls, clusters: dict[str, ClusterConfig]) -> dict[str, ClusterConfig]:
        for name in clusters:
            try:
                rfc1123_label(name)
            except ValueError as exc:
                raise ValueError(f"cluster name: {exc}") from None
        return clusters

    @model_validator(mode="after")
    def _references(self) -> Plan:
        seen: dict[str, str] = {}
        waves: set[str] = set()
        for w, wave in enumerate(self.waves):
            if wave.name in waves:
                raise ValueError(f"waves[{w}].name: duplicate wave {wave.name!r}")
            waves.add(wave.name)
            for s, svc in enumerate(wave.services):
                where = f"waves[{w}].services[{s}]"
                if svc.cluster not in self.clusters:
                    raise ValueError(f"{where}.cluster: unknown cluster {svc.cluster!r} "
                                     f"(the plan's clusters: {', '.join(sorted(self.clusters))})")
                if svc.key in seen:
                    raise ValueError(f"{where}: {svc.key} is already planned at {seen[svc.key]}")
                seen[svc.key] = where
            if wave.after is not None and wave.after not in waves - {wave.name}:
                raise ValueError(f"waves[{w}].after: {wave.after!r} is not an earlier wave of this plan")
        return self

    @model_validator(mode="after")
    def _timing(self) -> Plan:
        """The defaults, then every service's effective settings (its own values over the defaults)."""
        if problems := timing_problems(self.defaults):
            raise ValueError(f"defaults.{problems[0]}")
        for w, wave in enumerate(self.waves):
            for s, svc in enumerate(wave.services):
                if problems := timing_problems(svc.settings(self.defaults, wave.approval)):
                    raise ValueError(f"waves[{w}].services[{s}].{problems[0]} (the service's settings over the "
                                     "defaults)")
        return self

    def dag_id(self, wave: Wave) -> str:
        return f"meshwave_{self.migration}_{wave.name}".replace("-", "_")

    def settings_of(self, wave: Wave, svc: ServicePlan) -> Settings:
        """A service's effective settings: its own over its wave's approval over the defaults."""
        return svc.settings(self.defaults, wave.approval)

    def wave_of(self, key: str) -> Wave:
        """The wave that plans the service `key` (cluster/namespace/workload)."""
        for wave in self.waves:
            if any(s.key == key for s in wave.services):
                return wave
        raise KeyError(key)

    def wave(self, name: str) -> Wave:
        for wave in self.waves:
            if wave.name == name:
                return wave
        raise KeyError(name)


def format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc + ': ' if loc else ''}{msg}")
    return "\n".join(lines)


def parse_plan(data: object, source: str = "<plan>") -> Plan:
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan must be a mapping, got {type(data).__name__}")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(format_errors(source, exc)) from None


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML: {exc}") from None
    return parse_plan(data, str(path))


def _load_yaml(text: str) -> object:
    """libyaml's safe loader when PyYAML has it (5x faster on a 2,000-service plan, parsed with every DAG file);
    a file it refuses is read again by the pure-Python one, whose error message shows the offending line."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is None:
        return yaml.safe_load(text)
    try:
        return yaml.load(text, Loader=fast)  # noqa: S506 - CSafeLoader is the safe loader
    except yaml.YAMLError:
        return yaml.safe_load(text)
