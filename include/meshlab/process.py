"""Start and stop the lab and a real Prometheus as child processes, on loopback and free ports.

Used by the tests, the demo and the benchmarks: nothing assumes a service that it did not start.
"""

from __future__ import annotations

import json
import os
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


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
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
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
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

    def __init__(self, targets: list[str], workdir: Path | None = None, scrape_interval: str = "2s") -> None:
        self.targets = targets
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="prometheus-"))
        self.scrape_interval = scrape_interval
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
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
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
