"""Serving the lab: one API port per cluster, one port for `/metrics` and `/admin`, all on loopback.

A cluster's API server can be taken away for a while (`POST /admin/clusters/<cluster>/outage`), as a control-plane
upgrade or a crashed API server looks to a client: its port refuses connections and the open ones are reset. Only
the control plane goes: the cluster's pods, proxies and telemetry keep running (they never depend on the API server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshlab.apiserver import ApiServer
from meshlab.lab import Lab
from meshlab.textformat import TextRenderer
from meshlab.topology import TopologyError

log = logging.getLogger(__name__)
# On stop, an open watch (kubectl rollout status, an informer) would hold aiohttp's shutdown for its default 60 s;
# a stopping kube-apiserver ends its watches too, and clients re-list when it is back.
SHUTDOWN_SECONDS = 1.0
HOST = "127.0.0.1"  # the lab, its admin endpoint included, listens on loopback unless told (a container: --host)


class Exposition:
    """The `/metrics` body. A fleet up to the seed's size renders it fresh for each scrape, its counters first
    brought up to the scrape's moment (a tick): a real proxy's counters are current when scraped, and counters as of
    the last tick, up to a tick old (longer on a loaded machine), read as every edge's rate jittering by a few
    percent at once. The seed (~30,700 samples) renders in 0.05-0.1 s with textformat's renderer (0.6-0.8 s with
    generate_latest, which kept it off the request path); its first rendering builds every series' line prefix and
    may be slower, which leaves the next scrape a tick old once. A large fleet (thousands of services: seconds to
    render, longer than a scrape timeout) renders it after each tick while it is being scraped, and a scrape gets
    the latest rendering at once: a tick old, never a timeout."""

    INLINE_SECONDS = 0.25  # a rendering slower than this moves off the request path
    SCRAPED_RECENTLY = 10.0  # seconds after a scrape during which the ticks keep rendering

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.renderer = TextRenderer()  # what generate_latest would write, its series' line prefixes kept
        self.body: bytes | None = None
        self.render_seconds = 0.0
        self.scraped_at = float("-inf")

    def render(self) -> None:
        started = time.monotonic()
        self.body = self.renderer.render(self.lab.telemetry.exposed(self.lab.metric_sources()))
        self.render_seconds = time.monotonic() - started

    def for_scrape(self) -> bytes:
        self.scraped_at = time.monotonic()
        if self.body is None or self.render_seconds < self.INLINE_SECONDS:
            self.lab.tick()
            self.render()
        assert self.body is not None
        return self.body

    def after_tick(self) -> None:
        if self.render_seconds >= self.INLINE_SECONDS and time.monotonic() - self.scraped_at < self.SCRAPED_RECENTLY:
            self.render()


class ControlPlane:
    """One cluster's API server on its own port, which an outage closes and then opens again on the same port."""

    MAX_OUTAGE_SECONDS = 24 * 3600

    def __init__(self, cluster: str, runner: web.AppRunner, host: str, port: int = 0) -> None:
        self.cluster = cluster
        self.runner = runner
        self.host = host
        self.port = port
        self.site: web.SockSite | None = None
        self.until = 0.0  # time.monotonic() at which an outage ends
        self.outages = 0
        self._restore: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen (again) on the cluster's port; the first start picks the port when it was 0."""
        sock = _bind(self.port, self.host)
        self.port = sock.getsockname()[1]
        self.site = web.SockSite(self.runner, sock)
        await self.site.start()
        return self.port

    @property
    def down(self) -> bool:
        return self.site is None

    def status(self) -> dict[str, Any]:
        left = max(0.0, self.until - time.monotonic()) if self.down else 0.0
        return {"cluster": self.cluster, "port": self.port, "down": self.down, "seconds_left": round(left, 1),
                "outages": self.outages}

    async def outage(self, seconds: float) -> dict[str, Any]:
        """Unreachable for `seconds` from now (a running outage is extended or shortened to that); 0 ends it."""
        if not 0 <= seconds <= self.MAX_OUTAGE_SECONDS:
            raise ValueError(f"seconds must be between 0 and {self.MAX_OUTAGE_SECONDS}, not {seconds}")
        self.until = time.monotonic() + seconds
        if seconds == 0:
            if self._restore is not None:
                self._restore.cancel()
            await self._up()
        elif not self.down:
            await self._go_down()
            self._restore = asyncio.create_task(self._up_when_over())
        return self.status()

    def close(self) -> None:
        """The lab stops: no outage left to end."""
        if self._restore is not None:
            self._restore.cancel()

    async def _go_down(self) -> None:
        assert self.site is not None
        await self.site.stop()  # the listening socket is closed: new connections are refused
        self.site = None
        self.outages += 1
        server = self.runner.server
        for handler in server.connections if server is not None else []:
            _reset(handler.transport)  # kept-alive connections and watches end as a dying server ends them
        log.warning("cluster %s: API server unreachable for %.0fs (port %s closed)", self.cluster,
                    self.until - time.monotonic(), self.port)

    async def _up_when_over(self) -> None:
        while (left := self.until - time.monotonic()) > 0:
            await asyncio.sleep(left)
        await self._up()

    async def _up(self) -> None:
        """Back on the same port (the kubeconfigs name it); retried while something else holds the port."""
        while self.down:
            try:
                await self.start()
                log.warning("cluster %s: API server back on port %s", self.cluster, self.port)
            except OSError as exc:
                log.warning("cluster %s: cannot listen on port %s again (%s): retrying", self.cluster, self.port, exc)
                await asyncio.sleep(0.5)


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close a connection with a TCP reset (SO_LINGER 0), not a clean FIN: the peer's next read fails at once."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


def admin_app(lab: Lab, exposition: Exposition | None = None,
              control_planes: dict[str, ControlPlane] | None = None) -> web.Application:
    exposition = exposition or Exposition(lab)
    planes = control_planes or {}

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=exposition.for_scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def services(request: web.Request) -> web.Response:
        return web.json_response([lab.describe(key) for key in lab.knobs])

    def _key(request: web.Request) -> tuple[str, str, str]:
        key = (request.match_info["cluster"], request.match_info["namespace"], request.match_info["name"])
        if key not in lab.knobs:
            raise web.HTTPNotFound(text=json.dumps({"error": f"unknown service {'/'.join(key)}"}),
                                   content_type="application/json")
        return key

    async def service(request: web.Request) -> web.Response:
        return web.json_response(lab.describe(_key(request)))

    async def change(request: web.Request) -> web.Response:
        key = _key(request)
        try:
            changes = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be a JSON object of knobs"}, status=400)
        if not isinstance(changes, dict):
            return web.json_response({"error": "the body must be a JSON object of knobs"}, status=400)
        try:
            lab.set_knobs(key, changes)
        except TopologyError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        lab.tick()
        return web.json_response(lab.describe(key))

    def _plane(request: web.Request) -> ControlPlane:
        name = request.match_info["cluster"]
        if name not in planes:
            raise web.HTTPNotFound(text=json.dumps({"error": f"unknown cluster {name} (known: {sorted(planes)})"}),
                                   content_type="application/json")
        return planes[name]

    async def outage_status(request: web.Request) -> web.Response:
        return web.json_response(_plane(request).status())

    async def outage(request: web.Request) -> web.Response:
        plane = _plane(request)
        try:
            body = await request.json()
        except ValueError:
            body = None
        seconds = body.get("seconds") if isinstance(body, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            return web.json_response({"error": 'the body must be {"seconds": N}: the cluster\'s API server is '
                                               "unreachable for N seconds from now (0 ends an outage)"}, status=400)
        try:
            return web.json_response(await plane.outage(float(seconds)))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", lambda request: web.Response(text="ok"))
    app.router.add_get("/admin/services", services)
    app.router.add_get("/admin/services/{cluster}/{namespace}/{name}", service)
    app.router.add_patch("/admin/services/{cluster}/{namespace}/{name}", change)
    app.router.add_get("/admin/clusters/{cluster}/outage", outage_status)
    app.router.add_post("/admin/clusters/{cluster}/outage", outage)
    return app


def _bind(port: int, host: str = HOST) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


KUBECONFIG_MODE = 0o600


def kubeconfig(cluster: str, server: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": cluster, "preferences": {},
        "clusters": [{"name": cluster, "cluster": {"server": server}}],
        "users": [{"name": f"{cluster}-admin", "user": {"token": "meshlab"}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": f"{cluster}-admin",
                                                   "namespace": "default"}}],
    }


def _write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write `text` to `path` whole (a reader never sees half a file); with `mode`, exactly that mode whatever
    the umask, else the umask's."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    with os.fdopen(fd, "w") as out:
        if mode is not None:
            os.fchmod(out.fileno(), mode)  # a tmp file left by an earlier run keeps its old mode otherwise
        out.write(text)
    os.replace(tmp, path)


async def serve(lab: Lab, *, kubeconfig_dir: Path | None, state_file: Path | None, metrics_port: int = 0,
                api_ports: dict[str, int] | None = None, tick_seconds: float = 0.5,
                stop: asyncio.Event | None = None, host: str = HOST, advertise_host: str | None = None) -> None:
    """Run until `stop` is set (or forever), writing kubeconfigs and the state file once listening.

    `host` is the bind address; `advertise_host` the name written into kubeconfigs and the state (default: host).
    """
    advertise = advertise_host or host
    runners: list[web.AppRunner] = []
    planes: dict[str, ControlPlane] = {}
    state: dict[str, Any] = {"pid": os.getpid(), "clusters": {}}
    try:
        for name, sim in lab.clusters.items():
            runner = web.AppRunner(ApiServer(sim.store).app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
            await runner.setup()
            runners.append(runner)
            planes[name] = ControlPlane(name, runner, host, (api_ports or {}).get(name, 0))
            url = f"http://{advertise}:{await planes[name].start()}"
            state["clusters"][name] = {"server": url}
            if kubeconfig_dir is not None:
                kubeconfig_dir.mkdir(parents=True, exist_ok=True)
                path = kubeconfig_dir / f"{name}.kubeconfig"
                # credentials (the lab's token; the same helper must never spread real ones): owner only
                _write_atomic(path, yaml.safe_dump(kubeconfig(name, url), sort_keys=False), KUBECONFIG_MODE)
                state["clusters"][name]["kubeconfig"] = str(path.resolve())
        exposition = Exposition(lab)
        runner = web.AppRunner(admin_app(lab, exposition, planes), access_log=None,
                                shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
        sock = _bind(metrics_port, host)
        await web.SockSite(runner, sock).start()
        runners.append(runner)
        base = f"http://{advertise}:{sock.getsockname()[1]}"
        state.update(metrics=f"{base}/metrics", admin=f"{base}/admin", metrics_port=sock.getsockname()[1])
        if state_file is not None:
            _write_atomic(state_file, json.dumps(state, indent=2))
        print(json.dumps(state), flush=True)
        await _tick_forever(lab, tick_seconds, stop or asyncio.Event(), exposition)
    finally:
        for plane in planes.values():
            plane.close()
        for runner in runners:
            await runner.cleanup()


async def _tick_forever(lab: Lab, tick_seconds: float, stop: asyncio.Event, exposition: Exposition) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            lab.tick(started)
            exposition.after_tick()
        except Exception:  # a bug in one tick must not take the lab down mid-rehearsal
            log.exception("tick failed")
        spent = time.monotonic() - started
        # A tick longer than the interval (a fleet of thousands) leaves the loop as long again for the API and the
        # scrapes; the counters advance by the real time elapsed, so slower ticks stay exact.
        pause = spent if spent >= tick_seconds else tick_seconds - spent
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(0.01, pause))
