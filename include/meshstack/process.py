"""Start and stop the lab, a real Prometheus, Postgres and `airflow standalone` as child processes, on loopback and
free ports.

Used by the tests, the demo, the rehearsal and the benchmarks: nothing assumes a service that it did not start.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "include" / "prometheus" / "prometheus.yml"


class ProcessError(RuntimeError):
    """A child process that did not come up; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    """Stop a child started in its own session, and everything it started (Airflow forks workers)."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class LabProcess:
    """`meshlab serve` in a child process; `.state` has the API servers, kubeconfigs and metrics URL."""

    def __init__(self, topology: str | Path, workdir: Path | None = None, *, extra_args: list[str] | None = None,
                 metrics_port: int = 0) -> None:
        self.topology = Path(topology)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="meshlab-"))
        self.extra_args = extra_args or []
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.state: dict[str, Any] = {}

    @property
    def log_path(self) -> Path:
        return self.workdir / "meshlab.log"

    def start(self, timeout: float = 60) -> LabProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        state_file = self.workdir / "state.json"
        state_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "meshlab", "serve", "--topology", str(self.topology),
               "--kubeconfig-dir", str(self.workdir / "kube"), "--state-file", str(state_file),
               "--metrics-port", str(self.metrics_port), *self.extra_args]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not state_file.exists():
            if self.proc.poll() is not None:
                raise ProcessError(f"meshlab exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(f"meshlab did not start in {timeout}s:\n{_tail(self.log_path)}")
            time.sleep(0.1)
        self.state = json.loads(state_file.read_text())
        return self

    def kubeconfig(self, cluster: str | None = None) -> str:
        cluster = cluster or next(iter(self.state["clusters"]))
        return self.state["clusters"][cluster]["kubeconfig"]

    @property
    def metrics_target(self) -> str:
        return f"127.0.0.1:{self.state['metrics_port']}"

    @property
    def admin_url(self) -> str:
        return self.state["admin"]

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.admin_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def outage(self, cluster: str, seconds: float) -> dict[str, Any]:
        """Make one cluster's API server unreachable for `seconds` from now (0 ends an outage); its data plane and
        the other clusters keep running. Returns the outage's status (`down`, `seconds_left`, `port`)."""
        return self.admin("POST", f"/clusters/{cluster}/outage", {"seconds": seconds})

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> LabProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise ProcessError("prometheus is not installed: run `make setup` (it installs the distribution's package)")
    return found


class PrometheusProcess:
    """A real Prometheus server scraping the given targets with the project's config."""

    def __init__(self, targets: list[str], workdir: Path | None = None, scrape_interval: str = "2s",
                 query_log: bool = False) -> None:
        self.targets = targets
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="prometheus-"))
        self.scrape_interval = scrape_interval
        self.query_log = query_log  # every query Prometheus evaluates, one JSON line each (benchmarks)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"]["scrape_interval"] = self.scrape_interval
        config["global"]["evaluation_interval"] = self.scrape_interval
        config["scrape_configs"][0]["static_configs"] = [{"targets": self.targets}]
        if self.query_log:
            config["global"]["query_log_file"] = str(self.query_log_path)
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, timeout: float = 60) -> PrometheusProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        self.port = free_port()
        log_path = self.workdir / "prometheus.log"
        cmd = [prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
               f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
               "--web.enable-lifecycle", "--log.level=warn"]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ProcessError(f"prometheus exited with {self.proc.returncode}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(f"prometheus not ready in {timeout}s:\n{_tail(log_path)}")
            time.sleep(0.2)

    @property
    def query_log_path(self) -> Path:
        return self.workdir / "queries.log"

    def queries(self) -> list[dict[str, Any]]:
        """The query log's entries (needs query_log=True): params.query, params.start, ts..."""
        if not self.query_log_path.exists():
            return []
        return [json.loads(line) for line in self.query_log_path.read_text().splitlines() if line.strip()]

    def query_api_requests(self) -> float:
        """Prometheus' own count of instant-query API requests (prometheus_http_requests_total), from /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("prometheus_http_requests_total{") and 'handler="/api/v1/query"' in line)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; returns the result vector (raises on a Prometheus error)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise ProcessError(f"query failed: {body}")
        return body["data"]["result"]

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> PrometheusProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(cmd: list[str], user: str | None, **kwargs: Any) -> None:
    result = subprocess.run(cmd, user=user, capture_output=True, text=True, timeout=120, **kwargs)
    if result.returncode != 0:
        raise ProcessError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise ProcessError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise ProcessError(f"{what} not ready in {timeout}s:\n{_tail(log)}")
        time.sleep(0.3)


def postgres_bin(name: str) -> str:
    """A server binary of the newest installed PostgreSQL (Debian keeps them off PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    path = found[-1] if found else shutil.which(name)
    if not path:
        raise ProcessError(f"{name} not found: run `make setup` (it installs the postgresql package)")
    return path


def _unprivileged_user() -> str:
    """The Debian package's `postgres` user, else `nobody`."""
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        return "nobody"


class PostgresProcess:
    """A throwaway cluster (initdb in a temp dir) with one password-protected database for Airflow.

    Postgres refuses to run as root: as root, the cluster belongs to (and runs as) the `postgres` user the
    Debian package creates (`nobody` without it); otherwise to the current user.
    """

    def __init__(self, user: str = "airflow", database: str = "airflow") -> None:
        self.user, self.database = user, database
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self.datadir = Path(tempfile.mkdtemp(prefix="meshwave-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.os_user = _unprivileged_user() if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self, timeout: float = 60) -> PostgresProcess:
        if self.os_user:
            shutil.chown(self.datadir, self.os_user)
        pwfile = self.datadir / "pwfile"
        pwfile.write_text(self.password)
        if self.os_user:
            shutil.chown(pwfile, self.os_user)
        _run([postgres_bin("initdb"), "-D", str(self.datadir / "data"), "-U", self.user, f"--pwfile={pwfile}",
              "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"], self.os_user, cwd=self.datadir)
        self.port = free_port()
        log = self.datadir / "postgres.log"
        # max_connections: every component and task process opens its own pool (docs: Postgres connections).
        cmd = [postgres_bin("postgres"), "-D", str(self.datadir / "data"), "-p", str(self.port), "-h", "127.0.0.1",
               "-k", "", "-c", "max_connections=200", "-c", "fsync=off"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, user=self.os_user,
                                         cwd=self.datadir, start_new_session=True)
        try:
            _wait(self._accepts, self.proc, log, "postgres", timeout)
            self._create_database()
        except Exception:
            self.stop()
            raise
        return self

    def _connect(self, database: str) -> Any:
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=database, connect_timeout=3)

    def _accepts(self) -> bool:
        import psycopg2  # an ImportError must surface, not read as "not ready yet"

        try:
            self._connect("postgres").close()
            return True
        except psycopg2.OperationalError:
            return False

    def _create_database(self) -> None:
        conn = self._connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.database}"')
        conn.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown (SIGTERM waits for clients)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        _stop(self.proc)
        shutil.rmtree(self.datadir, ignore_errors=True)

    def __enter__(self) -> PostgresProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()



def wave_dag_file(plan_file: str, title: str) -> str:
    """The text of a thin DAG file that loads one plan's waves (what dags/seed_fleet.py is for the seed plan): the
    rehearsal and the e2e tests write one beside a plan they add to a stack's plans directory."""
    return (f'"""airflow dag: {title}"""\nfrom meshwave.wave import wave_dags\n\n'
            f'globals().update(wave_dags("{plan_file}"))\n')


class AirflowProcess:
    """`airflow standalone` (scheduler, dag-processor, triggerer, api-server; LocalExecutor) on a free loopback
    port, with this project's dags/ and plugins/, connections from the environment, and a small REST client for
    triggering runs and reading their outcome.

    Its metadata database is SQLite in `home` unless `database` (a SQLAlchemy URL, e.g. a PostgresProcess's) is
    given: the e2e stack runs many DAG runs at once, and SQLite's single writer made its scheduler die on
    "database is locked" as they started."""

    def __init__(self, home: Path, connections: dict[str, dict[str, Any]], env: dict[str, str] | None = None,
                 port: int | None = None, database: str | None = None) -> None:
        self.home = Path(home)
        self.connections = connections
        self.database = database
        self.extra_env = env or {}
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "standalone.log"

    def environment(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # Airflow's default: every DAG file parsed again every 30 s. At 10 s the e2e stack's 15 DAG files kept
            # the dag-processor at 75 % of a core (90 s of CPU in 120 s, idle; 36 s at 30). A new file is still
            # parsed at the next listing (5 s).
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            # SQLite holds 16 task processes at once, not 32 (Airflow's default): at 32 the scheduler dies on
            # "database is locked" (`make bench`, benchmark 7). Kept on Postgres too: 2 cores run no more.
            "AIRFLOW__CORE__PARALLELISM": "16",
            **({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database} if self.database else {}),
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            **{f"AIRFLOW_CONN_{cid.upper()}": json.dumps(c) for cid, c in self.connections.items()},
            **self.extra_env,
        }
        return env

    def start(self, timeout: float = 180) -> AirflowProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], stdout=log,
                                         stderr=subprocess.STDOUT, env=self.environment(), cwd=self.home,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ProcessError(f"airflow standalone exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            health = self._health()
            if health and all(health.get(c, {}).get("status") == "healthy"
                              for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(f"airflow not healthy in {timeout}s ({health}):\n{_tail(self.log_path)}")
            time.sleep(1)

    def _health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    @property
    def password(self) -> str:
        generated = self.home / "simple_auth_manager_passwords.json.generated"
        return json.loads(generated.read_text())["admin"]

    def token(self) -> str:
        """The admin's JWT, as `POST /auth/token` gives it (asked once)."""
        if self._token is None:
            req = urllib.request.Request(f"{self.url}/auth/token", method="POST",
                                         data=json.dumps({"username": "admin", "password": self.password}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                self._token = json.loads(resp.read())["access_token"]
        return self._token

    def api(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(f"{self.url}/api/v2{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token()}"})
        for attempt in range(3 if method == "GET" else 1):  # a read may be retried; a busy machine is slow
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return json.loads(resp.read() or b"null")
            except (TimeoutError, ConnectionResetError):
                if attempt == 2 or method != "GET":
                    raise
                time.sleep(2)
        raise AssertionError("unreachable")

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.api("GET", f"/dags/{dag_id}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404 or time.monotonic() > deadline:
                    errors = self.api("GET", "/importErrors")
                    raise ProcessError(f"DAG {dag_id} not loaded ({exc.code}); import errors: {errors}") from None
            time.sleep(2)

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """A manual run of `dag_id`. The API can answer a 500 while SQLite is busy (a stack starting a dozen runs
        at once): then the run made meanwhile, if any, is taken, else the trigger is sent again (twice at most)."""
        body = {"logical_date": None, "conf": conf or {}}
        for attempt in range(3):
            sent = time.time()
            try:
                return self.api("POST", f"/dags/{dag_id}/dagRuns", body)["dag_run_id"]
            except urllib.error.HTTPError as exc:
                if exc.code != 500 or attempt == 2:
                    raise
            time.sleep(2)
            if made := self._manual_runs_since(dag_id, sent, body["conf"]):
                return made[0]
        raise AssertionError("unreachable")

    def _manual_runs_since(self, dag_id: str, since: float, conf: dict[str, Any]) -> list[str]:
        runs = self.api("GET", f"/dags/{dag_id}/dagRuns?order_by=-run_after&limit=20")["dag_runs"]
        return [r["dag_run_id"] for r in runs if r.get("run_type") == "manual" and r.get("conf") == conf
                and datetime.fromisoformat(r["run_after"].replace("Z", "+00:00")).timestamp() >= since - 1]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        quoted = urllib.parse.quote(run_id, safe="")
        while True:
            state = self.api("GET", f"/dags/{dag_id}/dagRuns/{quoted}")["state"]
            if state in ("success", "failed"):
                return state
            if time.monotonic() > deadline:
                raise ProcessError(f"run {dag_id}/{run_id} still {state} after {timeout}s")
            time.sleep(2)

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        """A run's task instances by task id; a mapped one as `task_id[label]`, its label being the rendered
        map index (a service's key) or, before it ran, the index itself."""
        quoted = urllib.parse.quote(run_id, safe="")
        found: dict[str, dict[str, Any]] = {}
        seen = 0
        while True:  # the API pages at 100 at most
            page = self.api("GET", f"/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=100&offset={seen}")
            seen += len(page["task_instances"])
            found.update({ti_key(ti): ti for ti in page["task_instances"]})
            if not page["task_instances"] or seen >= page["total_entries"]:
                return found

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        quoted = urllib.parse.quote(run_id, safe="")
        entry = self.api("GET", f"/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/xcomEntries/{key}"
                                f"?map_index={map_index}")
        return entry["value"]

    def ti_xcom(self, ti: dict[str, Any], key: str = "return_value") -> Any:
        """The XCom of one task instance as `task_instances` lists it (mapped or not)."""
        return self.xcom(ti["dag_id"], ti["dag_run_id"], ti["task_id"], key, ti.get("map_index", -1))

    def task_log(self, ti: dict[str, Any]) -> str:
        """A task instance's last try as the REST API gives it, as `task_instances` lists it (structured: each event
        and any error's details; the triggerer's lines for a deferred task included)."""
        path = (f"/dags/{ti['dag_id']}/dagRuns/{urllib.parse.quote(ti['dag_run_id'], safe='')}/taskInstances/"
                f"{ti['task_id']}/logs/{ti['try_number']}?map_index={ti.get('map_index', -1)}&full_content=true")
        content = self.api("GET", path)["content"]
        return content if isinstance(content, str) else json.dumps(content)

    def add_connection(self, conn_id: str, conn_type: str, host: str | None = None,
                       extra: dict[str, Any] | None = None) -> None:
        """Create (or replace) a connection through the REST API: tasks read connections at run time."""
        body = {"connection_id": conn_id, "conn_type": conn_type, "host": host,
                "extra": json.dumps(extra) if extra is not None else None}
        try:
            self.api("POST", "/connections", body)
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise
            self.api("PATCH", f"/connections/{urllib.parse.quote(conn_id, safe='')}", body)

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": paused})

    def stop(self) -> None:
        _stop(self.proc, timeout=20)

    def __enter__(self) -> AirflowProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ti_key(ti: dict[str, Any]) -> str:
    """`task_id`, or `task_id[label]` for a mapped task instance (label: its rendered map index or the index)."""
    if ti.get("map_index", -1) < 0:
        return ti["task_id"]
    return f"{ti['task_id']}[{ti.get('rendered_map_index') or ti['map_index']}]"
