"""Wiring: load everything, listen, serve connections, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from proxy import __version__
from proxy.audit_sink import JsonLines
from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.forward import UpstreamPool
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from proxy.server import Runtime, handle_connection
from proxy.tls import load_credentials


def read_config(path: Path) -> Config:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the configuration: {exc.strerror}") from exc
    return load_config(data, str(path), path.parent)


def read_policy(config: Config) -> Policy:
    path = config.policy_path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the policy: {exc.strerror}") from exc
    return load_policy(data, str(path), set(config.upstreams))


def build_runtime(config: Config, events: JsonLines | None = None) -> Runtime:
    """Read every file the proxy needs; raise ConfigError naming the first bad one."""
    credentials = load_credentials(config.tls)
    policy = read_policy(config)
    pools = {
        name: UpstreamPool(up, config.timeouts, config.limits.max_idle_upstream_connections)
        for name, up in config.upstreams.items()
    }
    return Runtime(
        config,
        credentials,
        policy,
        pools,
        JsonLines(config.decision_log),
        events or JsonLines("stderr"),
    )


async def _connection(rt: Runtime, stream: trio.SocketStream) -> None:
    try:
        await handle_connection(rt, stream)
    except Exception as exc:  # one bad connection never takes the others down
        rt.events.event("connection_error", error=f"{type(exc).__name__}: {exc}")


async def serve(
    rt: Runtime, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen and serve until cancelled. ``task_status`` gets the bound (host, port)s."""
    cfg = rt.config
    listeners = await trio.open_tcp_listeners(cfg.listen_port, host=cfg.listen_host)
    bound = [tuple(lst.socket.getsockname()[:2]) for lst in listeners]
    rt.events.event(
        "listening",
        version=__version__,
        addresses=[f"{h}:{p}" for h, p in bound],
        spiffe_id=str(rt.credentials.own_id) if rt.credentials.own_id else None,
        policy=str(cfg.policy_path),
        policy_sha256=rt.policy.sha256,
        trust_domains=sorted(str(td) for td in rt.credentials.trust.bundles),
    )
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(bound)

            async def handler(stream: trio.SocketStream) -> None:
                await _connection(rt, stream)

            await trio.serve_listeners(handler, listeners, handler_nursery=nursery)
    finally:
        for pool in rt.pools.values():
            with trio.CancelScope(shield=True):
                await pool.aclose()


async def run_until_signalled(rt: Runtime) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            nursery.start_soon(serve, rt)
            async for signum in signals:
                rt.events.event("stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
