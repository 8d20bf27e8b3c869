"""Upstream connections: dial, a keep-alive pool per upstream, and h11 on the client side.

Transport errors are translated here, at one seam, into :class:`UpstreamError` (502 for
an upstream that cannot be reached or broke, 504 for one that did not answer in time), so
nothing above sees a trio or socket exception from the upstream side.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import h11
import trio
from OpenSSL import SSL

from proxy import svid
from proxy.config import Timeouts, Upstream
from proxy.errors import SvidError, UpstreamError
from proxy.tls import Credentials
from proxy.tls_stream import TLSError, TLSStream

_CHUNK = 64 * 1024
UNREACHABLE = "upstream_unreachable"
TIMEOUT = "upstream_timeout"
BROKEN = "upstream_connection_broken"
BAD_RESPONSE = "upstream_bad_response"
TLS_FAILED = "upstream_tls_failed"
SVID_INVALID = "upstream_svid_invalid"
IDENTITY_MISMATCH = "upstream_identity_mismatch"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ByteStream(Protocol):
    async def send_all(self, data: bytes) -> None: ...
    async def receive_some(self, max_bytes: int = ...) -> bytes: ...
    async def aclose(self) -> None: ...


class UpstreamConnection:
    """One HTTP/1.1 connection to an upstream, in plain TCP or mTLS (``stream`` is then a
    TLSStream over ``sock``)."""

    def __init__(
        self, sock: trio.SocketStream, stream: ByteStream | None = None, reused: bool = False
    ) -> None:
        self.sock = sock
        self.stream: ByteStream = stream or sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = reused
        self.idle_since = 0.0

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamError(502, BROKEN, str(exc) or type(exc).__name__) from exc

    async def next_event(
        self, timeout: float, before_wait: Callable[[], Awaitable[None]] | None = None
    ) -> h11.Event:
        """The next event from the upstream; waits at most ``timeout`` seconds for bytes.
        ``before_wait`` runs before any wait (the caller flushes what it buffered)."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError(502, BAD_RESPONSE, str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            if before_wait is not None:
                await before_wait()
            try:
                with trio.fail_after(timeout):
                    data = await self.stream.receive_some(_CHUNK)
            except trio.TooSlowError as exc:
                raise UpstreamError(504, TIMEOUT, "no answer in time") from exc
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamError(502, BROKEN, str(exc) or type(exc).__name__) from exc
            try:
                self.h11.receive_data(data)
            except RuntimeError as exc:  # data after the upstream closed
                raise UpstreamError(502, BAD_RESPONSE, str(exc)) from exc

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

    async def acquire(self, creds: Credentials) -> UpstreamConnection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            # A pooled connection the upstream closed (or wrote to unasked) is readable.
            if now - conn.idle_since < self.timeouts.idle and not conn.sock.socket.is_readable():
                conn.reused = True
                return conn
            await conn.aclose()
        return await self.connect(creds)

    async def connect(self, creds: Credentials) -> UpstreamConnection:
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
        if not up.tls:
            return UpstreamConnection(stream)
        try:
            return UpstreamConnection(stream, await self._mtls(stream, creds))
        except BaseException:
            with contextlib.suppress(Exception):
                await stream.aclose()
            raise

    async def _mtls(self, stream: trio.SocketStream, creds: Credentials) -> TLSStream:
        """Handshake presenting our SVID; the upstream's SVID must pass the X.509-SVID rules
        against its own trust domain's bundle and match ``expect``."""
        up = self.upstream
        conn = SSL.Connection(creds.client_context, None)
        conn.set_connect_state()
        name = up.server_name or (None if _is_ip(up.host) else up.host)
        if name:
            conn.set_tlsext_host_name(name.encode("idna"))
        tls = TLSStream(stream, conn)
        try:
            with trio.fail_after(self.timeouts.upstream_connect):
                await tls.do_handshake()
        except trio.TooSlowError as exc:
            raise UpstreamError(504, TIMEOUT, "TLS handshake with the upstream timed out") from exc
        except (TLSError, trio.BrokenResourceError, OSError) as exc:
            raise UpstreamError(502, TLS_FAILED, str(exc)) from exc
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        try:
            peer = svid.verify_peer(chain, creds.trust, dt.datetime.now(dt.UTC))
        except SvidError as exc:
            raise UpstreamError(502, SVID_INVALID, str(exc)) from exc
        if not any(p.matches(peer.spiffe_id) for p in up.expect):
            expected = ", ".join(p.text for p in up.expect)
            raise UpstreamError(
                502, IDENTITY_MISMATCH, f"upstream presented {peer.spiffe_id}, expected {expected}"
            )
        return tls

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
