"""``--workers N``: a supervisor and N worker processes sharing the listening port.

The supervisor validates the configuration, holds the port (a bound, never-listening
SO_REUSEPORT socket, so a restarted worker gets the same port even when it was 0), starts
the workers (``spiffe-pep _worker``), each listening on the port with SO_REUSEPORT so the
kernel spreads connections across them, and restarts any that dies (with backoff when one
keeps dying). It forwards SIGHUP and SIGUSR1 (reopening its own log files too); on
SIGTERM/SIGINT it asks every worker to drain and waits
for them (a second signal kills them). It serves the admin listener itself: metrics are
aggregated across workers with prometheus-client's multiprocess mode (each worker writes
to a shared directory), and one assertion key is shared so every worker's assertions verify
against the one JWKS.

The policy is the supervisor's: it watches the file (and reloads it on SIGHUP), validates
every edit, logs and counts it once, and publishes the accepted file in its directory,
which the workers read at start and follow. A worker restarted after a bad edit thus
serves the last good policy. The runtime configuration is each worker's own (each
reloads it on SIGHUP), but a worker that runs one (at start or after a reload) copies
the file's bytes into the directory, and a restarted worker that cannot start from the
file starts from that copy: a bad edit every running worker refused does not keep a
restarted one from starting, and a fixed file is picked up at the next restart.

Each worker reports on a pipe when it serves and which policy it serves; ``/status`` and
``/readyz`` are built from those reports.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from proxy.app import (
    CredentialReloader,
    PolicyReloader,
    admin_routes,
    follow_credentials,
    listen_error,
    read_policy,
    reopen_logs,
    start_admin,
)
from proxy.errors import ConfigError
from proxy.loading import config_bytes, publish, read_config
from proxy.metrics import CONTENT_TYPE
from proxy.runtime import Runtime


@dataclass
class Worker:
    index: int
    process: trio.Process | None = None
    started: float = 0.0
    restarts: int = 0
    serving: bool = False  # it said it listens (on its status pipe)
    policy_sha256: str | None = None  # the policy it said it serves

    @property
    def alive(self) -> bool:
        return bool(self.process and self.process.returncode is None)


@dataclass
class Supervisor:
    rt: Runtime  # the supervisor's own view of config, credentials and policy
    config_path: Path
    count: int
    workdir: Path
    workers: list[Worker] = field(default_factory=list)
    stopping: int = 0  # 1: draining, 2: a second signal came

    @property
    def policy_copy(self) -> Path:
        """The policy file the workers read: the last one this supervisor accepted."""
        return self.workdir / "policy.yaml"

    @property
    def config_copy(self) -> Path:
        """The configuration a worker starts from when it cannot start from the file:
        the file as validated at start, then the last one a worker ran (``cmd_worker``,
        ``ConfigReloader``)."""
        return self.workdir / "config.yaml"

    def _publish_policy(self, data: bytes) -> None:
        """Hand an accepted policy to the workers (``publish``: a reader, at start or
        following it, never sees half of one)."""
        publish(self.policy_copy, data)

    def _first_config(self) -> None:
        """The first copy of the configuration for the workers (``cmd_worker``): the file
        read again, parsed (a bad edit since start-up stops it here, not in the workers)."""
        data = config_bytes(self.config_path)
        read_config(self.config_path, data)
        publish(self.config_copy, data)

    def _first_policy(self) -> None:
        """The policy the workers start with: the file as validated at start (read again,
        and validated again if it changed since)."""
        cfg = self.rt.config
        try:
            data = cfg.policy_path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                str(cfg.policy_path), f"cannot read the policy: {exc.strerror}"
            ) from exc
        if hashlib.sha256(data).hexdigest() != self.rt.policy.sha256:
            self.rt.policy = read_policy(cfg, data)
        self._publish_policy(data)

    def _hold_port(self) -> socket.socket:
        cfg = self.rt.config
        family = socket.AF_INET6 if ":" in cfg.listen_host else socket.AF_INET
        try:
            hold = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise listen_error(exc, "listen", cfg.listen_host, cfg.listen_port) from exc
        try:
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            hold.bind((cfg.listen_host, cfg.listen_port))
        except OSError as exc:
            hold.close()
            raise listen_error(exc, "listen", cfg.listen_host, cfg.listen_port) from exc
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
            status_r, status_w = os.pipe()  # the worker tells what it serves, a JSON line each
            try:
                proc = await trio.lowlevel.open_process(
                    [*cmd, "--worker-id", str(worker.index), "--status-fd", str(status_w)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    pass_fds=(status_w,),
                    # A forwarded SIGHUP or SIGUSR1 must not kill a worker still starting
                    # up (their default action): ignored dispositions survive exec, and the
                    # worker's own handler takes over once it serves (it opened the files
                    # fresh anyway).
                    preexec_fn=_ignore_reload_signals,
                )
            except BaseException:
                os.close(status_r)
                raise
            finally:
                os.close(status_w)
            worker.process = proc
            self.rt.events.event("worker_started", worker=worker.index, pid=proc.pid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_status, worker, status_r)
                code = await proc.wait()
            worker.serving, worker.policy_sha256 = False, None
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

    async def _read_status(self, worker: Worker, fd: int) -> None:
        """A worker's status lines until it exits: ``serving``, the policy it serves."""
        pending = b""
        async with trio.lowlevel.FdStream(fd) as stream:
            while data := await stream.receive_some(4096):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    try:
                        state = json.loads(line)
                    except ValueError:
                        continue
                    worker.serving = worker.serving or bool(state.get("serving"))
                    worker.policy_sha256 = state.get("policy_sha256", worker.policy_sha256)

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
            # Policy reloads are the supervisor's to count (once per edit, not per worker).
            registry.register(self.rt.metrics.policy_reloads)
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
                    "alive": w.alive,
                    "serving": w.alive and w.serving,
                    "policy_sha256": w.policy_sha256 if w.alive else None,
                    "restarts": w.restarts,
                }
                for w in self.workers
            ]
            return code, doc

        def readyz() -> tuple[int, object]:
            code, doc = base_ready()
            serving = sum(w.alive and w.serving for w in self.workers)
            if code == 200 and serving < self.count:
                return 503, {
                    "status": "not ready",
                    "problems": [f"{serving}/{self.count} workers serving"],
                }
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
        try:
            hold = self._hold_port()
            try:
                await self._supervise(hold.getsockname()[1])
            finally:
                hold.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return 0

    async def _supervise(self, port: int) -> None:
        cfg = self.rt.config
        metrics_dir = self.workdir / "metrics"
        metrics_dir.mkdir()
        self._first_config()
        self._first_policy()
        policy = PolicyReloader(self.rt, on_accept=self._publish_policy)
        credentials = CredentialReloader(self.rt, quiet=True)  # for /status and /readyz
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
            "--policy-copy",
            str(self.policy_copy),
            "--config-copy",
            str(self.config_copy),
        ]
        key = self._assertion_key()
        if key is not None:
            cmd += ["--assertion-key", str(key)]
        self.workers = [Worker(i) for i in range(self.count)]
        async with trio.open_nursery() as nursery:
            admin_port = None
            if cfg.admin is not None:  # before any worker: a busy address stops start-up
                admin_port = await start_admin(nursery, cfg.admin, cfg, self._routes(metrics_dir))
            for w in self.workers:
                nursery.start_soon(self._run_worker, w, cmd, env)
            if cfg.policy_watch:
                nursery.start_soon(policy.watch, cfg.policy_watch)
            follow_credentials(nursery, self.rt, credentials)
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
                    if signum == signal.SIGUSR1:
                        reopen_logs(self.rt, "sigusr1")
                        self._signal_all(signum)
                        continue
                    if signum == signal.SIGHUP:
                        reopen_logs(self.rt, "sighup")
                        # Validate (log, count) the policy here first, so the workers find
                        # the accepted copy when SIGHUP makes them look.
                        credentials.reload("sighup")
                        policy.reload("sighup")
                        self._signal_all(signal.SIGHUP)
                        continue
                    if self.stopping == 1:
                        # A second signal: every worker gets a second one too and stops at
                        # once, logging the requests it cuts (proxy_stopped); one that
                        # hangs is killed after two seconds, or at a third signal.
                        self.stopping = 2
                        self._signal_all(signal.SIGTERM)
                        nursery.start_soon(self._await_workers, nursery, 2.0)
                        continue
                    if self.stopping:
                        self._signal_all(signal.SIGKILL)
                        break
                    self.stopping = 1
                    self.rt.drain_requested.set()  # /readyz: 503 draining from now on
                    self.rt.events.event(
                        "stopping",
                        signal=signal.Signals(signum).name,
                        graceful=True,
                        shutdown_grace_s=cfg.timeouts.shutdown_grace,
                    )
                    self._signal_all(signal.SIGTERM)
                    deadline = cfg.timeouts.shutdown_grace + cfg.timeouts.drain + 5
                    nursery.start_soon(self._await_workers, nursery, deadline)
            nursery.cancel_scope.cancel()

    async def _await_workers(self, nursery: trio.Nursery, deadline: float) -> None:
        with trio.move_on_after(deadline):
            for w in self.workers:
                if w.process is not None:
                    await w.process.wait()
        self._signal_all(signal.SIGKILL)
        self.rt.events.event("stopped", workers=self.count)
        nursery.cancel_scope.cancel()


def make_workdir(workers: int) -> Path:
    """The supervisor's private directory (metrics shared by the workers, the assertion
    key), under ``$TMPDIR`` or ``/tmp``. Not writable there (a read-only root file system
    without a volume on ``/tmp``): a ConfigError naming the directory."""
    parent = Path(os.environ.get("TMPDIR") or "/tmp")
    try:
        return Path(tempfile.mkdtemp(prefix="spiffe-pep-", dir=parent))
    except OSError as exc:
        raise ConfigError(
            str(parent),
            f"not writable ({exc.strerror}): {workers} workers share their metrics through "
            "a directory there; mount a writable volume there (an emptyDir in Kubernetes), "
            "set TMPDIR to one, or run with workers: 1",
        ) from exc


def _ignore_reload_signals() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _json_fn(handler: admin.Route) -> Callable[[], tuple[int, object]]:
    assert not isinstance(handler, admin.Page)

    def call() -> tuple[int, object]:
        status, _, body = handler()
        return status, json.loads(body)

    return call
