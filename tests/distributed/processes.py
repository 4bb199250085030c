"""The distributed shape, natively: Postgres and Redis from the distribution's packages, and Airflow's
components (api-server, scheduler, dag-processor, triggerer, Celery workers) as separate processes.

Everything listens on 127.0.0.1 and free ports; each process runs in its own session so that it (and
whatever it forked) can be stopped, or killed like a lost machine, as one process group.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from meshstack.process import AirflowProcess, ProcessError, _stop, _tail, _wait, free_port

# The settings the compose file and this native stack share (tests/distributed/test_compose.py checks them).
# Why each one is there: docs/distributed.md, "A lost worker: the settings that matter".
SHARED_SETTINGS: dict[str, str] = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__AUTH_MANAGER":
        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    # Every task, branches and outcome included, survives a lost worker: its try fails on the heartbeat
    # timeout and runs again elsewhere (every step reads before it writes).
    "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "2",
    "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "10",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    # A message a worker took but never started (lost with it) stays queued: re-queued after this.
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "30",
    "AIRFLOW__CELERY__TASK_ACKS_LATE": "True",
    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
    # Above the longest task run (waits are deferred, so tasks take seconds), or Redis redelivers a live task.
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "900",
    "AIRFLOW__TRIGGERER__CAPACITY": "1000",
}
# Only the native test: a killed worker's taken-but-not-started task is re-queued within the test's time. In
# production a task may wait longer than this for a free worker slot (docs/distributed.md, "Sizing").
TEST_ONLY_SETTINGS: dict[str, str] = {
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "90",
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
}
WORKER_CONCURRENCY = 2


class RedisProcess:
    """redis-server on a free loopback port, with a password, no persistence."""

    def __init__(self) -> None:
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self.workdir = Path(tempfile.mkdtemp(prefix="meshwave-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> RedisProcess:
        binary = shutil.which("redis-server")
        if not binary:
            raise ProcessError("redis-server not found: run `make setup` (it installs the redis-server package)")
        self.port = free_port()
        log = self.workdir / "redis.log"
        cmd = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--requirepass", self.password,
               "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(self._ping, self.proc, log, "redis-server", timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                                    socket_timeout=2).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fernet_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


class CeleryAirflow(AirflowProcess):
    """Airflow distributed: `airflow db migrate` (the init role), then the api-server, scheduler, dag-processor,
    triggerer and Celery workers as separate processes, on Postgres and Redis. The REST client is AirflowProcess's.
    """

    COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")

    def __init__(self, home: Path, connections: dict[str, dict[str, Any]], database: str, broker: str,
                 env: dict[str, str] | None = None, workers: int = 2) -> None:
        super().__init__(home, connections, env, database=database)
        self.broker = broker
        self.worker_names = [f"worker{i + 1}" for i in range(workers)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._password = secrets.token_urlsafe(12)
        self._secrets = {"AIRFLOW__CORE__FERNET_KEY": fernet_key(),
                         "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
                         "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32)}

    @property
    def password(self) -> str:
        return self._password

    @property
    def passwords_file(self) -> Path:
        return self.home / "passwords.json"

    def environment(self) -> dict[str, str]:
        return {
            **super().environment(),
            **SHARED_SETTINGS,
            **TEST_ONLY_SETTINGS,
            **self._secrets,
            "AIRFLOW__CELERY__BROKER_URL": self.broker,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.database}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            # Free ports for the triggerer's log server: other Airflow stacks may run on this machine.
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            **self.extra_env,
        }

    def log_of(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self.log_of(name).open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "airflow", *args], stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.home, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 240) -> CeleryAirflow:
        self.home.mkdir(parents=True, exist_ok=True)
        self.passwords_file.write_text(json.dumps({"admin": self._password}))
        env = self.environment()
        try:
            migrate = self._spawn("init", ["db", "migrate"], env)
            migrate.wait(timeout)
            if migrate.returncode != 0:
                raise ProcessError(f"airflow db migrate failed:\n{_tail(self.log_of('init'))}")
            for component in self.COMPONENTS:
                self._spawn(component, [component, "--skip-serve-logs"] if component == "triggerer"
                            else [component], env)
            for name in self.worker_names:
                self.start_worker(name, env)
            self._wait_healthy(timeout)
            self._warm_up()
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self._spawn(name, ["celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency",
                                  str(WORKER_CONCURRENCY), "--skip-serve-logs"], env or self.environment())

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                if name != "init" and proc.poll() is not None:
                    raise ProcessError(f"{name} exited with {proc.returncode}:\n{_tail(self.log_of(name))}")
            health = self._health()
            if health and all(health.get(c, {}).get("status") == "healthy"
                              for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")):
                return
            if time.monotonic() > deadline:
                raise ProcessError(f"airflow not healthy in {timeout}s ({health}):\n"
                                   f"{_tail(self.log_of('api-server'))}")
            time.sleep(1)

    def _warm_up(self) -> None:
        """The api-server builds its versioned Execution API on the first call (10-40 s of CPU here, the server
        answering nothing else meanwhile): do it now rather than in the first task's start."""
        with urllib.request.urlopen(f"{self.url}/execution/health", timeout=180) as resp:
            resp.read()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """AirflowProcess's client; a read that timed out (a busy api-server on 2 shared cores) is tried again."""
        for attempt in range(3):
            try:
                return super().api(method, path, body)
            except TimeoutError:
                if method != "GET" or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def worker_of(self, pid: int) -> str | None:
        """The worker whose process tree runs `pid` (a task's supervisor or task process)."""
        roots = {proc.pid: name for name, proc in self.procs.items() if name in self.worker_names}
        try:
            chain = [psutil.Process(pid), *psutil.Process(pid).parents()]
        except psutil.NoSuchProcess:
            return None
        return next((roots[p.pid] for p in chain if p.pid in roots), None)

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker and everything under it at once, like a machine lost mid-task."""
        proc = self.procs[name]
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Everything at once (SIGTERM, then SIGKILL after 20 s): each component in its own thread."""
        with ThreadPoolExecutor(len(self.procs) or 1) as pool:
            list(pool.map(lambda proc: _stop(proc, timeout=20), self.procs.values()))
