"""Upstream connections: dial, a keep-alive pool per upstream, and h11 on the client side.

Transport errors are translated here, at one seam, into :class:`UpstreamError` (502 for
an upstream that cannot be reached or broke, 504 for one that did not answer in time), so
nothing above sees a trio or socket exception from the upstream side.

Pool isolation: a connection is shared by every identity the proxy serves, so bytes an
upstream sent beyond the response it was asked for (a body on a HEAD, 204 or 304 answer,
a body longer than its Content-Length, a response nobody asked for on an idle
connection) must never be read as the answer to the next request. A connection goes back
to the pool only when its response ended exactly at the end of the bytes received (h11's
trailing data empty, nothing more readable without waiting), and is taken from the pool
only if nothing arrived while it was idle. Otherwise it is closed, and surplus bytes are
reported to ``on_violation`` (``upstream_protocol_violation``).
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
from proxy.deadlines import Deadline, Sweeper, clock
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
PROTOCOL_VIOLATION = "upstream_protocol_violation"
# Kinds of protocol violation: bytes past the end of a response, and bytes that arrived
# on a pooled connection while no request was outstanding.
BYTES_AFTER_RESPONSE = "bytes_after_response"
BYTES_WHILE_IDLE = "bytes_while_idle"

# What sending to or reading from an upstream raises when it is gone or broke the
# connection: a socket error, or over mTLS a TLS error (a bad record, an alert).
_GONE = (TLSError, SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError, OSError)

# on_violation(upstream name, kind, the surplus bytes read): the pool closed a connection.
ViolationHook = Callable[[str, str, bytes], None]


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
        self,
        sock: trio.SocketStream,
        sweeper: Sweeper,
        stream: ByteStream | None = None,
        reused: bool = False,
    ) -> None:
        self.sock = sock
        self.stream: ByteStream = stream or sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = reused
        self.idle_since = 0.0
        self.sweeper = sweeper
        self.deadline = Deadline()  # of a wait for the upstream's answer

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except _GONE as exc:
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
            # A deadline the sweeper checks, not a cancel scope (proxy.deadlines): this
            # runs for every read of every response.
            deadline = self.deadline
            deadline.arm(clock() + timeout, self.sock.socket)
            self.sweeper.add(deadline)
            try:
                data = await self.stream.receive_some(_CHUNK)
            except _GONE as exc:
                if deadline.expired:
                    raise UpstreamError(504, TIMEOUT, "no answer in time") from None
                raise UpstreamError(502, BROKEN, str(exc) or type(exc).__name__) from exc
            finally:
                self.sweeper.discard(deadline)
            try:
                self.h11.receive_data(data)
            except RuntimeError as exc:  # data after the upstream closed
                raise UpstreamError(502, BAD_RESPONSE, str(exc)) from exc

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def surplus(self) -> bytes | None:
        """Bytes the upstream sent beyond the responses it was asked for, without waiting
        for any: ``b""`` when there are none (the connection may carry another request);
        some of them when there are; ``None`` when the connection is unusable for another
        reason (the upstream closed or broke it)."""
        leftover, closed = self.h11.trailing_data
        if leftover:
            return leftover
        if closed:
            return None
        try:
            if isinstance(self.stream, TLSStream):
                return await self.stream.receive_ready(_CHUNK)
            if not self.sock.socket.is_readable():
                return b""
            return await self.sock.receive_some(_CHUNK) or None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, TLSError):
            return None

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


class UpstreamPool:
    """Idle keep-alive connections to one upstream, most recently used first.

    ``on_violation`` is called (upstream name, kind, surplus bytes) whenever a connection
    is closed because the upstream sent more than the responses asked of it."""

    def __init__(
        self,
        upstream: Upstream,
        timeouts: Timeouts,
        max_idle: int,
        sweeper: Sweeper,
        on_violation: ViolationHook | None = None,
    ) -> None:
        self.upstream = upstream
        self.sweeper = sweeper
        self.timeouts = timeouts
        self.max_idle = max_idle
        self.on_violation = on_violation
        self._idle: list[UpstreamConnection] = []
        self.closed = False  # replaced by a reload: connections coming back are closed

    async def _surplus(self, conn: UpstreamConnection, kind: str) -> bytes | None:
        """``conn.surplus()``, reported when there is some; ``conn`` is closed if this is
        cancelled."""
        try:
            surplus = await conn.surplus()
        except BaseException:
            await conn.aclose()
            raise
        if surplus and self.on_violation is not None:
            self.on_violation(self.upstream.name, kind, surplus)
        return surplus

    async def acquire(self, creds: Credentials) -> UpstreamConnection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            # A pooled connection the upstream closed, or wrote to unasked, is not reused.
            if (
                now - conn.idle_since < self.timeouts.idle
                and await self._surplus(conn, BYTES_WHILE_IDLE) == b""
            ):
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
            return UpstreamConnection(stream, self.sweeper)
        try:
            return UpstreamConnection(stream, self.sweeper, await self._mtls(stream, creds))
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
        except _GONE as exc:
            raise UpstreamError(502, TLS_FAILED, str(exc)) from exc
        try:
            # OpenSSL reads some encodings cryptography refuses (BER lengths): such a
            # chain is an invalid SVID, not an internal error.
            chain = conn.get_peer_cert_chain(as_cryptography=True) or []
            peer = svid.verify_peer(chain, creds.trust, dt.datetime.now(dt.UTC))
        except SvidError as exc:
            raise UpstreamError(502, SVID_INVALID, str(exc)) from exc
        except ValueError as exc:
            raise UpstreamError(502, SVID_INVALID, f"unreadable certificate: {exc}") from exc
        if not any(p.matches(peer.spiffe_id) for p in up.expect):
            expected = ", ".join(p.text for p in up.expect)
            raise UpstreamError(
                502, IDENTITY_MISMATCH, f"upstream presented {peer.spiffe_id}, expected {expected}"
            )
        return tls

    async def release(self, conn: UpstreamConnection) -> None:
        """Return ``conn`` to the pool when its exchange finished cleanly and its response
        ended exactly at the end of the bytes received; else close it."""
        if (
            conn.reusable
            and not self.closed
            and await self._surplus(conn, BYTES_AFTER_RESPONSE) == b""
            and len(self._idle) < self.max_idle
        ):
            conn.h11.start_next_cycle()
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            await conn.aclose()

    async def aclose(self) -> None:
        self.closed = True
        while self._idle:
            await self._idle.pop().aclose()
