"""Wiring: listen, serve connections, serve the admin endpoints, run the reloaders
(``proxy.reload``) and stop cleanly on SIGTERM/SIGINT (a grace period, then a drain).
Loading lives in ``proxy.loading``; both are re-exported here."""

from __future__ import annotations

import datetime as dt
import functools
import os
import signal
import socket

import trio

from proxy import __version__, admin, ui
from proxy.config import Config
from proxy.loading import (
    _iso,
    build_runtime,
    listen_error,
    load_signer,
    load_tls,
    open_log,
    protocol_violation_hook,
    read_config,
    read_policy,
    upstream_pools,
    wait_for_credentials,
)
from proxy.metrics import CONTENT_TYPE
from proxy.reload import (
    ConfigReloader,
    CredentialReloader,
    PolicyReloader,
    follow_credentials,
    on_signals,
    reopen_logs,
)
from proxy.runtime import Runtime
from proxy.server import handle_connection

# Re-exported: the loading and reloading parts used to live here.
__all__ = [
    "ConfigReloader",
    "CredentialReloader",
    "PolicyReloader",
    "admin_routes",
    "build_runtime",
    "follow_credentials",
    "listen_error",
    "load_signer",
    "load_tls",
    "on_signals",
    "open_listeners",
    "open_log",
    "protocol_violation_hook",
    "read_config",
    "read_policy",
    "reopen_logs",
    "run_until_signalled",
    "serve",
    "start_admin",
    "upstream_pools",
    "wait_for_credentials",
]


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


def admin_routes(rt: Runtime) -> dict[bytes, admin.Route]:
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

    routes: dict[bytes, admin.Route] = {
        b"/metrics": metrics,
        b"/healthz": admin.json_handler(healthz),
        b"/readyz": admin.json_handler(readyz),
        b"/status": admin.json_handler(status),
        b"/ui": ui.local_page(rt),
    }
    signer = rt.signer
    if signer is not None:
        routes[b"/.well-known/jwks.json"] = admin.json_handler(lambda: (200, signer.jwks()))
    return routes


async def start_admin(
    nursery: trio.Nursery,
    address: tuple[str, int],
    cfg: Config,
    routes: dict[bytes, admin.Route],
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
    "reloader": PolicyReloader, "credentials": CredentialReloader, "config":
    ConfigReloader}``."""
    cfg = rt.config
    try:
        listeners = await open_listeners(cfg.listen_host, cfg.listen_port, reuse_port)
    except OSError as exc:
        raise listen_error(exc, "listen", cfg.listen_host, cfg.listen_port) from exc
    bound = [tuple(lst.socket.getsockname()[:2]) for lst in listeners]
    reloader = PolicyReloader(rt)
    config_reloader = ConfigReloader(rt)
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
                policy=str(cfg.policy_path.absolute()),
                policy_sha256=rt.policy.sha256,
                trust_domains=sorted(str(td) for td in rt.credentials.trust.bundles),
            )
            if rt.policy_source is not None:  # a worker: its supervisor watches the file
                services.start_soon(reloader.follow_supervisor)
            elif cfg.policy_watch:
                services.start_soon(reloader.watch, cfg.policy_watch)
            follow_credentials(services, rt, creds_reloader)
            services.start_soon(rt.drift.run, lambda: rt.changed, lambda: rt.policy)
            services.start_soon(rt.sweeper.run)
            services.start_soon(rt.metrics.flusher)
            # Before the proxy says it serves: a SIGHUP sent once /readyz is 200 is handled.
            await services.start(on_signals, config_reloader, reloader, creds_reloader)

            # A partial, not a closure: an idle connection's task keeps one coroutine
            # frame less.
            handler = functools.partial(_connection, rt)

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
                            "config": config_reloader,
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
                rt.sweeper.end_idle()  # idle keep-alive connections close now
                rt.events.event(
                    "draining", connections=rt.open_connections, deadline_s=cfg.timeouts.drain
                )
                connections.cancel_scope.deadline = trio.current_time() + cfg.timeouts.drain
            rt.events.event("drained", cut_connections=rt.open_connections)
            services.cancel_scope.cancel()
    finally:
        rt.metrics.flush()  # requests tallied since the last flush
        rt.drift.flush()  # what was learned and not yet written
        rt.drift.close()
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


async def run_until_signalled(
    rt: Runtime,
    *,
    worker_of: int | None = None,
    task_status: trio.TaskStatus[dict[str, object]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve; the first SIGTERM/SIGINT drains gracefully, a second one stops at once.
    ``worker_of``: the supervisor's pid (worker mode: SO_REUSEPORT, exit with it).
    ``task_status`` gets what ``serve`` reports once it serves."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def run(
                task_status: trio.TaskStatus[dict[str, object]] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                await serve(rt, reuse_port=worker_of is not None, task_status=task_status)
                nursery.cancel_scope.cancel()

            task_status.started(await nursery.start(run))
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
