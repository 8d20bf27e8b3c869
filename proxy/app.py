"""Wiring: load everything, listen, serve connections, reload the policy on change or
SIGHUP, serve the admin endpoints, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from proxy import __version__, admin
from proxy.assertion import AssertionSigner
from proxy.audit_sink import JsonLines
from proxy.config import Config, TlsFiles, load_config
from proxy.errors import ConfigError
from proxy.forward import PROTOCOL_VIOLATION, UpstreamPool, ViolationHook
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from proxy.runtime import Runtime
from proxy.server import handle_connection
from proxy.tls import Credentials, load_credentials


def read_config(path: Path) -> Config:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the configuration: {exc.strerror}") from exc
    return load_config(data, str(path), path.parent)


def read_policy(config: Config, data: bytes | None = None, source: Path | None = None) -> Policy:
    """The policy of ``config``: from ``data``, else read from ``source`` (a worker's copy
    of what its supervisor accepted), else from its file; named after its file."""
    path = config.policy_path
    if data is None:
        try:
            data = (source or path).read_bytes()
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the policy: {exc.strerror}") from exc
    folded = {name for name, u in config.upstreams.items() if u.case_insensitive}
    return load_policy(data, str(path), set(config.upstreams), folded)


def load_tls(config: Config, events: JsonLines | None = None) -> tuple[Credentials, Any]:
    """The proxy's credentials, from files or from the Workload API (then also the source).
    Either way start-up waits up to ``tls.wait_for_svid`` for a first SVID."""
    if config.tls.workload_api is None:
        return wait_for_credentials(config.tls, events), None
    from proxy.workload_api import WorkloadApiSource  # grpc is only loaded when used

    source = WorkloadApiSource(config.tls)
    return source.credentials(), source


def wait_for_credentials(
    files: TlsFiles, events: JsonLines | None = None, poll: float = 0.2
) -> Credentials:
    """The credentials from their files. Files that are not there yet (spiffe-helper
    starts beside the proxy and writes them once the agent answers) are waited for, up to
    ``files.wait_for_svid``, with one ``waiting_for_svid`` event; once they have all
    appeared, a set that does not load yet (the writer is between two files) is tried
    again until the same deadline. Files present from the start are loaded at once, so a
    broken file fails start-up without waiting."""
    deadline = time.monotonic() + files.wait_for_svid
    missing = [str(p) for p in files.files if not p.exists()]
    if not missing or files.wait_for_svid <= 0:
        return load_credentials(files)
    if events is not None:
        events.event("waiting_for_svid", missing=missing, timeout_s=files.wait_for_svid)
    while True:
        if all(p.exists() for p in files.files) or time.monotonic() >= deadline:
            try:
                return load_credentials(files)
            except ConfigError as exc:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        exc.location,
                        f"{exc.message} (after waiting {files.wait_for_svid:g}s for the "
                        "SVID files: tls.wait_for_svid)",
                    ) from exc
        time.sleep(poll)


def listen_error(exc: OSError, what: str, host: str, port: int) -> ConfigError:
    """A listener that cannot be opened (the address in use, not local, a name that does
    not resolve) as one line: ``listen 127.0.0.1:8443: Address already in use``."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ConfigError(f"{what} {address}", exc.strerror or str(exc))


def open_log(target: str, what: str) -> JsonLines:
    """A JSON-lines log; a path that cannot be opened is a ConfigError naming it."""
    try:
        return JsonLines(target)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        parent = Path(target).parent
        if not parent.is_dir():
            reason += f" (the directory {parent} does not exist)"
        raise ConfigError(target, f"cannot open the {what}: {reason}") from exc


def build_runtime(
    config: Config,
    events: JsonLines | None = None,
    *,
    policy_source: Path | None = None,
    status_fd: int | None = None,
) -> Runtime:
    """Read every file the proxy needs; raise ConfigError naming the first bad one.
    ``policy_source`` and ``status_fd``: a worker's (see ``Runtime``)."""
    events = events or JsonLines("stderr")
    credentials, source = load_tls(config, events)
    policy = read_policy(config, source=policy_source)
    metrics = Metrics()
    metrics.set_policy(policy.sha256)
    metrics.set_credentials(credentials)
    on_violation = protocol_violation_hook(metrics, events)
    pools = {
        name: UpstreamPool(
            up, config.timeouts, config.limits.max_idle_upstream_connections, on_violation
        )
        for name, up in config.upstreams.items()
    }
    return Runtime(
        config,
        credentials,
        policy,
        pools,
        open_log(config.decision_log, "decision log"),
        events,
        metrics,
        load_signer(config, str(credentials.own_id) if credentials.own_id else "spiffe-pep"),
        source,
        policy_source=policy_source,
        status_fd=status_fd,
    )


def protocol_violation_hook(metrics: Metrics, events: JsonLines) -> ViolationHook:
    """What the upstream pools call when they close a connection whose upstream sent more
    than it was asked: one ``upstream_protocol_violation`` event, and a count."""

    def on_violation(upstream: str, kind: str, surplus: bytes) -> None:
        metrics.upstream_violations.labels(upstream=upstream, kind=kind).inc()
        events.event(PROTOCOL_VIOLATION, upstream=upstream, kind=kind, bytes=len(surplus))

    return on_violation


def load_signer(config: Config, issuer: str) -> AssertionSigner | None:
    """The assertion key: from ``assertion_key`` (PEM, EC P-256) or, when an upstream
    wants assertions and no key is configured, a fresh one for this process's life (its
    JWKS is served either way)."""
    if config.assertion_key is not None:
        path = config.assertion_key
        try:
            return AssertionSigner.from_pem(path.read_bytes(), issuer)
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the assertion key: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigError(str(path), str(exc)) from exc
    if any(u.assertion_header for u in config.upstreams.values()):
        return AssertionSigner.generate(issuer)
    return None


def _stat(paths: list[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


async def watch_files(paths: list[Path], interval: float, on_change: Callable[[], object]) -> None:
    """Call ``on_change`` once the files' (mtime, size, inode) changed and then held still
    for one interval, so a writer's half-done update (spiffe-helper truncates and rewrites
    the SVID, then the key, then the bundle, in place) is not even tried."""
    seen = _stat(paths)
    pending = False
    while True:
        await trio.sleep(interval)
        now = _stat(paths)
        if now != seen:
            seen, pending = now, True
        elif pending:
            pending = False
            on_change()


class CredentialReloader:
    """Swaps in new SVID, key and bundles when their files change or on SIGHUP. New
    handshakes use the new ones; established connections keep theirs. A half-written or
    mismatched set is rejected, logged and counted, and the old credentials keep serving.

    ``quiet``: no events (a supervisor follows the credentials only for its own /status
    and /readyz; each worker logs its own reloads)."""

    def __init__(self, rt: Runtime, *, quiet: bool = False) -> None:
        self.rt = rt
        self.quiet = quiet

    def reload(self, trigger: str) -> bool:
        rt = self.rt
        try:
            if rt.x509_source is not None:
                creds = rt.x509_source.credentials()
            else:
                creds = load_credentials(rt.config.tls)
        except ConfigError as exc:
            rt.metrics.credential_reloads.labels(result="failed").inc()
            if self.quiet:
                return False
            rt.events.event(
                "credentials_reload_failed",
                trigger=trigger,
                location=exc.location,
                error=exc.message,
                kept_not_after=_iso(rt.credentials.own_not_after),
            )
            return False
        old = rt.credentials
        rt.credentials = creds
        rt.trust_changed()
        rt.metrics.credential_reloads.labels(result="ok").inc()
        rt.metrics.set_credentials(creds)
        if self.quiet:
            return True
        rt.events.event(
            "credentials_reloaded",
            trigger=trigger,
            spiffe_id=str(creds.own_id) if creds.own_id else None,
            old_not_after=_iso(old.own_not_after),
            not_after=_iso(creds.own_not_after),
            trust_domains=sorted(str(td) for td in creds.trust.bundles),
        )
        return True


class PolicyReloader:
    """Swaps in a new policy when its file changes or on SIGHUP, atomically: a request
    reads ``rt.policy`` once and keeps that policy to its end. A bad edit is rejected,
    logged with file:line:column and counted; the last good policy keeps serving.

    The file watch polls (mtime, size, inode) and reloads once they have stayed the same
    for one interval, so an editor's half-written save is not even tried.

    Under a supervisor the supervisor alone reads the policy file, validates each edit and
    logs and counts it once; ``on_accept`` (its hook) gets every accepted file's bytes and
    hands them to the workers (a copy each worker reads, ``rt.policy_source``), so a
    worker never sees a bad edit, and one restarted after it serves the last good
    policy. A worker's reloads are logged (they name the worker) but not counted.
    """

    def __init__(self, rt: Runtime, on_accept: Callable[[bytes], object] | None = None) -> None:
        self.rt = rt
        self.on_accept = on_accept
        self._rejected: str | None = None

    def reload(self, trigger: str) -> bool:
        rt = self.rt
        path = rt.config.policy_path
        try:
            data = (rt.policy_source or path).read_bytes()
        except OSError as exc:
            return self._failed(trigger, str(path), f"cannot read the policy: {exc.strerror}")
        sha = hashlib.sha256(data).hexdigest()
        if sha == rt.policy.sha256 or (trigger == "watch" and sha == self._rejected):
            return False
        try:
            policy = read_policy(rt.config, data)
        except ConfigError as exc:
            self._rejected = sha
            errors = [str(e) for e in getattr(exc, "errors", [exc])]
            return self._failed(trigger, exc.location, exc.message, sha256=sha, errors=errors)
        if self.on_accept is not None:
            try:
                self.on_accept(data)
            except OSError as exc:  # the supervisor's directory: full, or gone
                return self._failed(
                    trigger,
                    str(path),
                    f"cannot hand the policy to the workers: {exc.strerror}",
                    sha256=sha,
                )
        old = rt.policy
        rt.policy = policy
        rt.trust_changed()
        rt.policy_loaded_at = dt.datetime.now(dt.UTC)
        self._rejected = None
        if rt.policy_source is None:  # a worker's reloads are its supervisor's to count
            rt.metrics.policy_reloads.labels(result="ok").inc()
        rt.metrics.set_policy(policy.sha256)
        rt.events.event(
            "policy_reloaded",
            trigger=trigger,
            policy=str(path),
            old_sha256=old.sha256,
            policy_sha256=policy.sha256,
            routes=len(policy.routes),
        )
        rt.report()
        return True

    def _failed(self, trigger: str, location: str, message: str, **fields: object) -> bool:
        if self.rt.policy_source is None:
            self.rt.metrics.policy_reloads.labels(result="failed").inc()
        self.rt.events.event(
            "policy_reload_failed",
            trigger=trigger,
            location=location,
            error=message,
            kept_sha256=self.rt.policy.sha256,
            **fields,
        )
        return False

    async def watch(self, interval: float) -> None:
        await watch_files([self.rt.config.policy_path], interval, lambda: self.reload("watch"))

    async def follow_supervisor(self, interval: float = 0.25) -> None:
        """A worker: reload as soon as the supervisor replaced its copy of the policy (it
        renames a complete file into place, so no waiting for the writer)."""
        assert self.rt.policy_source is not None
        seen = _stat([self.rt.policy_source])
        while True:
            await trio.sleep(interval)
            now = _stat([self.rt.policy_source])
            if now != seen:
                seen = now
                self.reload("supervisor")


def follow_credentials(nursery: trio.Nursery, rt: Runtime, reloader: CredentialReloader) -> None:
    """Reload the credentials when their files change (``tls.watch``) or the Workload
    API sends an update."""
    if rt.config.tls.watch:
        nursery.start_soon(
            watch_files, rt.config.tls.files, rt.config.tls.watch, lambda: reloader.reload("watch")
        )
    if rt.x509_source is not None:
        rt.x509_source.follow(lambda: reloader.reload("workload_api"))


async def on_sighup(policy: PolicyReloader, credentials: CredentialReloader) -> None:
    """SIGHUP reloads the policy and the credentials."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            credentials.reload("sighup")
            policy.reload("sighup")


async def _connection(rt: Runtime, stream: trio.SocketStream) -> None:
    # Over the limit, refuse before any TLS work: the cheapest possible "no".
    if rt.open_connections >= rt.config.limits.max_connections:
        rt.metrics.connections_refused.inc()
        await stream.aclose()
        return
    rt.open_connections += 1
    try:
        await handle_connection(rt, stream)
    except Exception as exc:  # one bad connection never takes the others down
        rt.events.event("connection_error", error=f"{type(exc).__name__}: {exc}")
    finally:
        rt.open_connections -= 1


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def admin_routes(rt: Runtime) -> dict[bytes, admin.Handler]:
    def metrics() -> tuple[int, bytes, bytes]:
        return 200, CONTENT_TYPE.encode(), rt.metrics.exposition()

    def healthz() -> tuple[int, object]:
        return 200, {"status": "ok"}

    def readyz() -> tuple[int, object]:
        """Ready: own SVID loaded and unexpired, a policy loaded, not draining."""
        now = dt.datetime.now(dt.UTC)
        problems = []
        if rt.credentials.own_not_after <= now:
            problems.append("the proxy's SVID has expired")
        if rt.draining or rt.drain_requested.is_set():
            problems.append("draining")
        if problems:
            return 503, {"status": "not ready", "problems": problems}
        return 200, {"status": "ready"}

    def status() -> tuple[int, object]:
        creds, cfg = rt.credentials, rt.config
        return 200, {
            "version": __version__,
            "pid": os.getpid(),
            "spiffe_id": str(creds.own_id) if creds.own_id else None,
            "svid": {"not_after": _iso(creds.own_not_after), "loaded_at": _iso(creds.loaded_at)},
            "bundles": {
                str(td): {
                    "x509_authorities": len(b.x509_authorities),
                    "jwt_authorities": len(creds.jwt_authorities.get(td, {})),
                    "earliest_not_after": _iso(
                        min(c.not_valid_after_utc for c in b.x509_authorities)
                    )
                    if b.x509_authorities
                    else None,
                    "sequence": b.sequence,
                }
                for td, b in creds.trust.bundles.items()
            },
            "policy": {
                "file": str(cfg.policy_path),
                "sha256": rt.policy.sha256,
                "routes": len(rt.policy.routes),
                "loaded_at": _iso(rt.policy_loaded_at),
            },
            "open_connections": rt.open_connections,
            "draining": rt.draining,
        }

    routes = {
        b"/metrics": metrics,
        b"/healthz": admin.json_handler(healthz),
        b"/readyz": admin.json_handler(readyz),
        b"/status": admin.json_handler(status),
    }
    signer = rt.signer
    if signer is not None:
        routes[b"/.well-known/jwks.json"] = admin.json_handler(lambda: (200, signer.jwks()))
    return routes


async def start_admin(
    nursery: trio.Nursery,
    address: tuple[str, int],
    cfg: Config,
    routes: dict[bytes, admin.Handler],
) -> int:
    """The admin listener in ``nursery``; its port. The Host names it answers to:
    loopback, the address it is reached on, and the configuration's admin_hosts."""
    try:
        port: int = await nursery.start(
            functools.partial(
                admin.serve_admin, allowed_hosts=admin.LOOPBACK_HOSTS | set(cfg.admin_hosts)
            ),
            *address,
            routes,
        )
    except OSError as exc:
        raise listen_error(exc, "admin", *address) from exc
    return port


async def open_listeners(host: str, port: int, reuse_port: bool) -> list[trio.SocketListener]:
    """TCP listeners; with ``reuse_port`` one SO_REUSEPORT socket, so several worker
    processes can each listen on the same port and the kernel spreads connections."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


async def serve(
    rt: Runtime,
    *,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[dict[str, object]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and serve until cancelled, or until ``rt.drain_requested`` is set: then shut
    down the way a load balancer needs (Envoy's drain sequence). For
    ``timeouts.shutdown_grace`` it goes on accepting while ``/readyz`` answers 503
    ``draining`` and every response carries ``Connection: close``, so the balancer takes
    the endpoint out before it stops answering; then it stops accepting, lets requests in
    flight finish (idle keep-alive connections close at once) for at most
    ``timeouts.drain``, and returns. The admin listener and the reloaders live until the
    end. ``task_status`` gets ``{"listen": [(host, port)], "admin": port or None,
    "reloader": PolicyReloader, "credentials": CredentialReloader}``."""
    cfg = rt.config
    try:
        listeners = await open_listeners(cfg.listen_host, cfg.listen_port, reuse_port)
    except OSError as exc:
        raise listen_error(exc, "listen", cfg.listen_host, cfg.listen_port) from exc
    bound = [tuple(lst.socket.getsockname()[:2]) for lst in listeners]
    reloader = PolicyReloader(rt)
    creds_reloader = CredentialReloader(rt)
    try:
        async with trio.open_nursery() as services:
            admin_port = None
            if cfg.admin is not None:
                admin_port = await start_admin(services, cfg.admin, cfg, admin_routes(rt))
            rt.events.event(
                "listening",
                version=__version__,
                addresses=[f"{h}:{p}" for h, p in bound],
                admin=f"{cfg.admin[0]}:{admin_port}" if cfg.admin else None,
                spiffe_id=str(rt.credentials.own_id) if rt.credentials.own_id else None,
                policy=str(cfg.policy_path),
                policy_sha256=rt.policy.sha256,
                trust_domains=sorted(str(td) for td in rt.credentials.trust.bundles),
            )
            if rt.policy_source is not None:  # a worker: its supervisor watches the file
                services.start_soon(reloader.follow_supervisor)
            elif cfg.policy_watch:
                services.start_soon(reloader.watch, cfg.policy_watch)
            follow_credentials(services, rt, creds_reloader)
            services.start_soon(on_sighup, reloader, creds_reloader)

            async def handler(stream: trio.SocketStream) -> None:
                await _connection(rt, stream)

            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        functools.partial(
                            trio.serve_listeners, handler, listeners, handler_nursery=connections
                        )
                    )
                    task_status.started(
                        {
                            "listen": bound,
                            "admin": admin_port,
                            "reloader": reloader,
                            "credentials": creds_reloader,
                        }
                    )
                    rt.report(serving=True)
                    await rt.drain_requested.wait()
                    grace = cfg.timeouts.shutdown_grace
                    if grace > 0:
                        rt.events.event(
                            "shutdown_grace", accepting_for_s=grace, connections=rt.open_connections
                        )
                        await trio.sleep(grace)
                    accepting.cancel_scope.cancel()  # stop accepting: the listeners close
                rt.draining = True
                for scope in list(rt.idle_scopes):
                    scope.cancel()
                rt.events.event(
                    "draining", connections=rt.open_connections, deadline_s=cfg.timeouts.drain
                )
                connections.cancel_scope.deadline = trio.current_time() + cfg.timeouts.drain
            rt.events.event("drained", cut_connections=rt.open_connections)
            services.cancel_scope.cancel()
    finally:
        for pool in rt.pools.values():
            with trio.CancelScope(shield=True):
                await pool.aclose()
        if rt.x509_source is not None:
            rt.x509_source.close()


async def _exit_with_parent(rt: Runtime, parent: int) -> None:
    """A worker whose supervisor died drains and exits instead of living on orphaned."""
    while os.getppid() == parent:
        await trio.sleep(1)
    rt.events.event("supervisor_gone", parent=parent)
    rt.drain_requested.set()


async def run_until_signalled(rt: Runtime, *, worker_of: int | None = None) -> None:
    """Serve; the first SIGTERM/SIGINT drains gracefully, a second one stops at once.
    ``worker_of``: the supervisor's pid (worker mode: SO_REUSEPORT, exit with it)."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def run() -> None:
                await serve(rt, reuse_port=worker_of is not None)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            if worker_of is not None:
                nursery.start_soon(_exit_with_parent, rt, worker_of)
            async for signum in signals:
                name = signal.Signals(signum).name
                if rt.drain_requested.is_set():
                    rt.events.event("stopping", signal=name, graceful=False)
                    nursery.cancel_scope.cancel()
                    break
                rt.events.event(
                    "stopping",
                    signal=name,
                    graceful=True,
                    shutdown_grace_s=rt.config.timeouts.shutdown_grace,
                )
                rt.drain_requested.set()
