"""One client connection: an optional PROXY header, the TLS handshake and the
X.509-SVID check; a verified peer's connection then goes to ``session.HttpSession``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import trio
from cryptography import x509
from OpenSSL import SSL, crypto

from proxy import proxyproto, svid
from proxy.deadlines import INF, Deadline, clock
from proxy.errors import SvidError
from proxy.peer import Presented, verify_presented
from proxy.runtime import Runtime
from proxy.session import HttpSession
from proxy.tls import Credentials
from proxy.tls_stream import TLSError, TLSStream

__all__ = ["Runtime", "handle_connection"]

_NO_CLIENT_CERT_REASONS = ("peer did not return a certificate", "certificate required")


def _peer_addr(stream: trio.SocketStream) -> tuple[str, str]:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "unknown", "unknown"
    host = str(addr[0])
    return host, (f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}")


def _tls_reason(detail: str) -> str:
    if any(r in detail for r in _NO_CLIENT_CERT_REASONS):
        return svid.NO_CERTIFICATE
    return "tls_" + "_".join(detail.lower().replace("(", " ").replace(")", " ").split())[:60]


async def _read_proxy_header(
    rt: Runtime, stream: trio.SocketStream, peer_addr: str
) -> tuple[proxyproto.ProxyHeader, bytes] | None:
    """The PROXY protocol header an L4 balancer puts before the TLS bytes, and whatever
    arrived after it (the start of the ClientHello)."""
    data = b""
    try:
        with trio.fail_after(rt.config.timeouts.handshake):
            while True:
                header = proxyproto.parse(data)
                if header is not None:
                    return header, data[header.length :]
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise proxyproto.ProxyProtocolError("connection closed before the header")
                data += chunk
    except proxyproto.ProxyProtocolError as exc:
        _handshake_failed(rt, "proxy_protocol_invalid", peer_addr, detail=exc.reason)
    except trio.TooSlowError:
        _handshake_failed(rt, "proxy_protocol_timeout", peer_addr)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        _handshake_failed(rt, "connection_broken", peer_addr, detail=str(exc))
    return None


@contextlib.contextmanager
def _handshake_slot(rt: Runtime, source: str) -> Iterator[bool]:
    """Whether this connection may start its handshake: a cap on handshakes in flight,
    in all and per source address, below ``max_connections``, so clients that never
    finish TLS cannot lock out the ones that do for a whole handshake timeout."""
    limits = rt.config.limits
    limit = None
    if rt.handshakes >= limits.max_handshakes:
        limit = "max_handshakes"
    elif source and rt.handshakes_by_source.get(source, 0) >= limits.max_handshakes_per_source:
        limit = "max_handshakes_per_source"
    if limit is not None:
        rt.metrics.handshakes_refused.labels(limit=limit).inc()
        yield False
        return
    rt.handshakes += 1
    rt.handshakes_by_source[source] = rt.handshakes_by_source.get(source, 0) + 1
    try:
        yield True
    finally:
        rt.handshakes -= 1
        left = rt.handshakes_by_source[source] - 1
        if left:
            rt.handshakes_by_source[source] = left
        else:
            del rt.handshakes_by_source[source]


async def handle_connection(rt: Runtime, stream: trio.SocketStream) -> None:
    peer_ip, peer_addr = _peer_addr(stream)
    # Behind a PROXY-protocol balancer every socket comes from the balancer: only the
    # global cap applies there.
    source = "" if rt.config.proxy_protocol else peer_ip
    # The deadline of whatever this connection waits for (handshake, request, the client
    # taking a response), checked by rt.sweeper while the connection lives.
    deadline = Deadline()
    rt.sweeper.add(deadline)
    try:
        with _handshake_slot(rt, source) as admitted:
            verified = await _open(rt, stream, peer_ip, peer_addr, deadline) if admitted else None
        if verified is None:
            await stream.aclose()
            return
        tls, peer, chain, creds, peer_ip, peer_addr = verified
        rt.metrics.open_connections.inc()
        try:
            session = HttpSession(rt, tls, peer, peer_ip, peer_addr, chain, creds, deadline)
            await session.run()
            if session.truncated:
                await tls.abort()
        finally:
            rt.metrics.open_connections.dec()
            await tls.aclose(deadline=deadline)
    finally:
        rt.sweeper.discard(deadline)


async def _open(
    rt: Runtime, stream: trio.SocketStream, peer_ip: str, peer_addr: str, deadline: Deadline
) -> tuple[TLSStream, svid.PeerSvid, Presented, Credentials, str, str] | None:
    """PROXY header (if configured), TLS handshake and SVID check: the verified
    connection, or None (logged, and the TLS side closed). (TCP_NODELAY, without which
    a client that leaves Nagle on waits for a delayed ACK, trio's SocketStream sets
    already: tests/unit/test_sockets.py.)"""
    early = b""
    if rt.config.proxy_protocol:
        got = await _read_proxy_header(rt, stream, peer_addr)
        if got is None:
            return None
        header, early = got
        if header.source is not None:  # LOCAL/UNKNOWN: the balancer itself, keep the socket's
            peer_ip, port = header.source
            peer_addr = f"[{peer_ip}]:{port}" if ":" in peer_ip else f"{peer_ip}:{port}"
    creds = rt.credentials
    conn = SSL.Connection(creds.context, None)
    conn.set_accept_state()
    check = _PeerCheck(creds)
    conn.set_app_data(check)  # run by OpenSSL's verify callback (tls.ChainCheck)
    if early:
        conn.bio_write(early)
    tls = TLSStream(stream, conn)
    try:
        verified = await _handshake(rt, check, tls, peer_addr, deadline)
    except BaseException:
        await tls.aclose()
        raise
    if verified is None:
        await tls.aclose()
        return None
    peer, chain = verified
    # Verified: the check is done with. A shared stand-in that refuses takes its place
    # (renegotiation is off; should OpenSSL ever verify again, it fails closed), so an
    # open connection keeps neither the check nor the parsed chain.
    conn.set_app_data(_verified_already)
    return tls, peer, chain, creds, peer_ip, peer_addr


def _verified_already(chain: list[bytes]) -> str:
    return "verified_already"


_PLAIN_HTTP_BODY = b"This port speaks HTTPS and requires a client certificate.\n"
_PLAIN_HTTP_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


class _PeerCheck:
    """The X.509-SVID check of one connection's client chain (a ``tls.ChainCheck``): run
    by OpenSSL during the handshake, so a refused client gets the matching TLS alert; the
    verified peer, or the refusal, stays here for ``_handshake`` to use and log."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self.chain: list[bytes] = []  # as presented, DER
        self.peer: svid.PeerSvid | None = None
        self.presented: Presented = ()
        self.error: SvidError | None = None

    def __call__(self, chain: list[bytes]) -> str | None:
        self.chain = chain
        try:
            self.peer, self.presented = verify_presented(self.creds, chain)
        except SvidError as exc:
            self.error = exc
            return exc.reason
        return None


def _handshake_failed(rt: Runtime, reason: str, peer_addr: str, **fields: object) -> None:
    rt.metrics.handshake_failures.labels(reason=reason).inc()
    rt.events.event("tls_handshake_failed", reason=reason, peer_addr=peer_addr, **fields)


async def _handshake(
    rt: Runtime, check: _PeerCheck, tls: TLSStream, peer_addr: str, deadline: Deadline
) -> tuple[svid.PeerSvid, Presented] | None:
    """The verified peer and the chain it presented, or None (logged) on failure."""
    deadline.arm(clock() + rt.config.timeouts.handshake, tls.transport.socket)
    try:
        await tls.do_handshake(deadline)
    except TLSError as exc:
        if check.error is not None:  # refused by the SVID rules; the client got the alert
            _svid_refused(rt, check.error, check.chain, peer_addr)
            return None
        reason = _tls_reason(exc.reason)
        _handshake_failed(rt, reason, peer_addr, detail=exc.reason, leaf_sha256=None)
        if reason == "tls_http_request":
            # Plain HTTP on the TLS port (a misconfigured client or health check): say so
            # in plain HTTP, as nginx does, instead of leaving the caller to guess.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await tls.transport.send_all(_PLAIN_HTTP_REPLY)
            await tls.abort()
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        if deadline.expired:
            _handshake_failed(rt, "handshake_timeout", peer_addr)
        else:
            _handshake_failed(rt, "connection_broken", peer_addr, detail=str(exc))
        return None
    finally:
        deadline.at = INF
    if check.error is not None:  # refused, yet OpenSSL went on: never expected
        _svid_refused(rt, check.error, check.chain, peer_addr)
        return None
    if check.peer is not None:
        return check.peer, check.presented
    # OpenSSL did not run the check (never expected): verify what the peer sent, here.
    leaf = tls.conn.get_peer_certificate()
    chain = [crypto.dump_certificate(crypto.FILETYPE_ASN1, leaf)] if leaf is not None else []
    # On the server side OpenSSL's peer chain may or may not repeat the leaf: de-dupe.
    for cert in tls.conn.get_peer_cert_chain() or []:
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        if der not in chain:
            chain.append(der)
    try:
        return verify_presented(check.creds, chain)
    except SvidError as exc:
        _svid_refused(rt, exc, chain, peer_addr)
        return None


def _svid_refused(rt: Runtime, exc: SvidError, chain: list[bytes], peer_addr: str) -> None:
    """Log a refused chain (DER, leaf first) with what its leaf claimed, when it parses."""
    claimed: list[str] = []
    if chain:
        # Whatever the leaf holds, the refusal is logged: reading what it claims may fail.
        with contextlib.suppress(Exception):
            claimed = svid.uri_sans(x509.load_der_x509_certificate(chain[0]))
    _handshake_failed(
        rt,
        exc.reason,
        peer_addr,
        detail=exc.detail,
        leaf_sha256=hashlib.sha256(chain[0]).hexdigest() if chain else None,
        claimed_ids=claimed,
    )
