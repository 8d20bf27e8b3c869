"""``--workers N``: a supervisor and N worker processes sharing the listening port.

The supervisor validates the configuration, holds the port (a bound, never-listening
SO_REUSEPORT socket, so a restarted worker gets the same port even when it was 0), starts
the workers (``spiffe-pep _worker``), each listening on the port with SO_REUSEPORT so the
kernel spreads connections across them, and restarts any that dies (with backoff when one
keeps dying). It forwards SIGHUP and SIGUSR1 (reopening its own log files too); on
SIGTERM/SIGINT it asks every worker to drain and waits for them (a second signal kills
them). It serves the admin listener itself: metrics are aggregated across workers with
prometheus-client's multiprocess mode (each worker writes to a shared directory), and one
assertion key is shared so every worker's assertions verify against the one JWKS.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from proxy import __version__, admin, ui
from proxy.app import admin_routes, read_policy, reopen_logs
from proxy.metrics import CONTENT_TYPE
from proxy.runtime import Runtime


@dataclass
class Worker:
    index: int
    process: trio.Process | None = None
    started: float = 0.0
    restarts: int = 0


@dataclass
class Supervisor:
    rt: Runtime  # the supervisor's own view of config, credentials and policy
    config_path: Path
    count: int
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spiffe-pep-")))
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False

    def _hold_port(self) -> socket.socket:
        cfg = self.rt.config
        family = socket.AF_INET6 if ":" in cfg.listen_host else socket.AF_INET
        hold = socket.socket(family, socket.SOCK_STREAM)
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hold.bind((cfg.listen_host, cfg.listen_port))
        return hold

    def _assertion_key(self) -> Path | None:
        if self.rt.config.assertion_key is not None:
            return self.rt.config.assertion_key
        if self.rt.signer is None:
            return None
        path = self.workdir / "assertion_key.pem"  # one key for all workers, 0600
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.rt.signer.private_pem())
        return path

    async def _run_worker(self, worker: Worker, cmd: list[str], env: dict[str, str]) -> None:
        backoff = 0.5
        while not self.stopping:
            worker.started = time.monotonic()
            proc = await trio.lowlevel.open_process(
                [*cmd, "--worker-id", str(worker.index)],
                env=env,
                stdin=subprocess.DEVNULL,
                # A forwarded SIGHUP or SIGUSR1 must not kill a worker still starting up
                # (their default action): ignored dispositions survive exec, and the
                # worker's own handler takes over once it serves (it opened the files
                # fresh anyway).
                preexec_fn=_ignore_reload_signals,
            )
            worker.process = proc
            self.rt.events.event("worker_started", worker=worker.index, pid=proc.pid)
            code = await proc.wait()
            mark_process_dead(proc.pid, env["PROMETHEUS_MULTIPROC_DIR"])  # type: ignore[no-untyped-call]
            if self.stopping:
                return
            worker.restarts += 1
            lived = time.monotonic() - worker.started
            backoff = 0.5 if lived > 10 else min(backoff * 2, 10.0)
            self.rt.events.event(
                "worker_exited", worker=worker.index, pid=proc.pid, code=code, restart_in_s=backoff
            )
            await trio.sleep(backoff)

    def _signal_all(self, signum: int) -> None:
        for w in self.workers:
            if w.process is not None and w.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.process.send_signal(signum)

    def _routes(self, metrics_dir: Path) -> dict[bytes, admin.Route]:
        routes = admin_routes(self.rt)

        def registry() -> CollectorRegistry:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
            return registry

        def metrics() -> tuple[int, bytes, bytes]:
            return 200, CONTENT_TYPE.encode(), bytes(generate_latest(registry()))

        def status() -> tuple[int, object]:
            code, doc = base_status()
            assert isinstance(doc, dict)
            doc["workers"] = [
                {
                    "index": w.index,
                    "pid": w.process.pid if w.process else None,
                    "alive": bool(w.process and w.process.returncode is None),
                    "restarts": w.restarts,
                }
                for w in self.workers
            ]
            return code, doc

        def readyz() -> tuple[int, object]:
            code, doc = base_ready()
            alive = sum(bool(w.process and w.process.returncode is None) for w in self.workers)
            if code == 200 and alive < self.count:
                return 503, {"status": "not ready", "problems": [f"{alive}/{self.count} workers"]}
            return code, doc

        base_status = _json_fn(routes[b"/status"])
        base_ready = _json_fn(routes[b"/readyz"])
        routes[b"/metrics"] = metrics
        routes[b"/status"] = admin.json_handler(status)
        routes[b"/readyz"] = admin.json_handler(readyz)
        # /ui from the workers' log files (the supervisor serves no requests itself).
        view = ui.WorkersView(self.rt, self.count, lambda: ui.samples(registry()), read_policy)
        routes[b"/ui"] = view.page()
        return routes

    async def run(self) -> int:
        cfg = self.rt.config
        hold = self._hold_port()
        port = hold.getsockname()[1]
        metrics_dir = self.workdir / "metrics"
        metrics_dir.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        cmd = [
            sys.executable,
            "-m",
            "proxy",
            "_worker",
            "-c",
            str(self.config_path),
            "--port",
            str(port),
            "--supervisor",
            str(os.getpid()),
        ]
        key = self._assertion_key()
        if key is not None:
            cmd += ["--assertion-key", str(key)]
        self.workers = [Worker(i) for i in range(self.count)]
        try:
            async with trio.open_nursery() as nursery:
                for w in self.workers:
                    nursery.start_soon(self._run_worker, w, cmd, env)
                admin_port = None
                if cfg.admin is not None:
                    admin_port = await nursery.start(
                        functools.partial(
                            admin.serve_admin,
                            allowed_hosts=admin.LOOPBACK_HOSTS | set(cfg.admin_hosts),
                        ),
                        *cfg.admin,
                        self._routes(metrics_dir),
                    )
                self.rt.events.event(
                    "supervising",
                    version=__version__,
                    workers=self.count,
                    address=f"{cfg.listen_host}:{port}",
                    admin_port=admin_port,
                )
                with trio.open_signal_receiver(
                    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1
                ) as signals:
                    async for signum in signals:
                        if signum in (signal.SIGHUP, signal.SIGUSR1):
                            reopen_logs(self.rt, signal.Signals(signum).name.lower())
                            self._signal_all(signum)
                            continue
                        if self.stopping:  # a second signal: stop now
                            self._signal_all(signal.SIGKILL)
                            break
                        self.stopping = True
                        self.rt.events.event(
                            "stopping", signal=signal.Signals(signum).name, graceful=True
                        )
                        self._signal_all(signal.SIGTERM)
                        nursery.start_soon(self._await_workers, nursery, cfg.timeouts.drain + 5)
                nursery.cancel_scope.cancel()
        finally:
            hold.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return 0

    async def _await_workers(self, nursery: trio.Nursery, deadline: float) -> None:
        with trio.move_on_after(deadline):
            for w in self.workers:
                if w.process is not None:
                    await w.process.wait()
        self._signal_all(signal.SIGKILL)
        self.rt.events.event("stopped", workers=self.count)
        nursery.cancel_scope.cancel()


def _ignore_reload_signals() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _json_fn(handler: admin.Route) -> Callable[[], tuple[int, object]]:
    assert not isinstance(handler, admin.Page)

    def call() -> tuple[int, object]:
        status, _, body = handler()
        return status, json.loads(body)

    return call
