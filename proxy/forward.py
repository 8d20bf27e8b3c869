"""Upstream connections: dial, a keep-alive pool per upstream, and h11 on the client side.

Transport errors are translated here, at one seam, into :class:`UpstreamError` (502 for
an upstream that cannot be reached or broke, 504 for one that did not answer in time), so
nothing above sees a trio or socket exception from the upstream side.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import h11
import trio

from proxy.config import Timeouts, Upstream
from proxy.errors import UpstreamError

_CHUNK = 64 * 1024
UNREACHABLE = "upstream_unreachable"
TIMEOUT = "upstream_timeout"
BROKEN = "upstream_connection_broken"
BAD_RESPONSE = "upstream_bad_response"


@contextlib.contextmanager
def _map_errors(reason: str = BROKEN) -> Iterator[None]:
    try:
        yield
    except trio.TooSlowError as exc:
        raise UpstreamError(504, TIMEOUT, "no answer in time") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError(502, reason, str(exc) or type(exc).__name__) from exc
    except h11.RemoteProtocolError as exc:
        raise UpstreamError(502, BAD_RESPONSE, str(exc)) from exc


class UpstreamConnection:
    """One HTTP/1.1 connection to an upstream."""

    def __init__(self, stream: trio.SocketStream, reused: bool = False) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = reused
        self.idle_since = 0.0

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            with _map_errors():
                await self.stream.send_all(data)

    async def next_event(self, timeout: float) -> h11.Event:
        """The next event from the upstream; waits at most ``timeout`` seconds for bytes."""
        while True:
            with _map_errors():
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event  # type: ignore[return-value]
                with trio.fail_after(timeout):
                    data = await self.stream.receive_some(_CHUNK)
                self.h11.receive_data(data)

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


class UpstreamPool:
    """Idle keep-alive connections to one upstream, most recently used first."""

    def __init__(self, upstream: Upstream, timeouts: Timeouts, max_idle: int) -> None:
        self.upstream = upstream
        self.timeouts = timeouts
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []

    async def acquire(self) -> UpstreamConnection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            # A pooled connection the upstream closed (or wrote to unasked) is readable.
            if now - conn.idle_since < self.timeouts.idle and not conn.stream.socket.is_readable():
                conn.reused = True
                return conn
            await conn.aclose()
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        up = self.upstream
        try:
            with trio.fail_after(self.timeouts.upstream_connect):
                stream = await trio.open_tcp_stream(up.host, up.port)
        except trio.TooSlowError as exc:
            raise UpstreamError(504, TIMEOUT, f"connect to {up.host}:{up.port} timed out") from exc
        except OSError as exc:
            raise UpstreamError(
                502, UNREACHABLE, f"{up.host}:{up.port}: {exc.strerror or exc}"
            ) from exc
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        return UpstreamConnection(stream)

    async def release(self, conn: UpstreamConnection) -> None:
        """Return ``conn`` to the pool when its exchange finished cleanly; else close it."""
        if conn.reusable and len(self._idle) < self.max_idle:
            conn.h11.start_next_cycle()
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            await conn.aclose()

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()
