"""One client connection: TLS handshake, X.509-SVID check, then an HTTP/1.1 keep-alive
loop where every request is evaluated against the policy in force, rewritten, forwarded
with its body streamed both ways, and logged. The only module joining core and shell.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from proxy import audit, headers, proxyproto, svid, xfcc
from proxy.assertion import AssertionSigner
from proxy.audit_sink import JsonLines
from proxy.config import Config, Upstream
from proxy.errors import HttpError, SpiffeIdError, SvidError, UpstreamError
from proxy.forward import UpstreamConnection, UpstreamPool
from proxy.http1 import new_server_connection
from proxy.metrics import Metrics
from proxy.policy.evaluate import ALLOWED, Request, evaluate
from proxy.policy.model import Policy, Route
from proxy.spiffe_id import SpiffeId
from proxy.target import Target, host_for_matching, parse_target
from proxy.tls import Credentials
from proxy.tls_stream import TLSError, TLSStream

_NO_CLIENT_CERT_REASONS = ("peer did not return a certificate", "certificate required")
_OUT_HIGH_WATER = 64 * 1024  # buffered response bytes are written out at least this often
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass
class Runtime:
    """What every connection reads: swapped as a whole on reload, never mutated in place."""

    config: Config
    credentials: Credentials
    policy: Policy
    pools: dict[str, UpstreamPool]
    decisions: JsonLines
    events: JsonLines
    metrics: Metrics
    signer: AssertionSigner | None = None
    x509_source: Any = None  # a WorkloadApiSource when the SVID comes from a SPIRE agent
    open_connections: int = 0
    policy_loaded_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    draining: bool = False
    drain_requested: trio.Event = field(default_factory=trio.Event)
    # Sessions waiting for a next request: cancelled at drain so idle keep-alives close.
    idle_scopes: set[trio.CancelScope] = field(default_factory=set)

    @property
    def strip_always(self) -> frozenset[bytes]:
        """Headers that only the proxy may set: every inbound copy is dropped."""
        names = {
            self.config.spiffe_id_header.lower().encode("ascii"),
            b"client-cert",
            b"client-cert-chain",
        }
        names |= {
            u.assertion_header.lower().encode("ascii")
            for u in self.config.upstreams.values()
            if u.assertion_header
        }
        return frozenset(names)


class ClientGone(Exception):
    """The client closed or broke the connection; nothing more can be sent to it."""


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


async def handle_connection(rt: Runtime, stream: trio.SocketStream) -> None:
    peer_ip, peer_addr = _peer_addr(stream)
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    early = b""
    if rt.config.proxy_protocol:
        got = await _read_proxy_header(rt, stream, peer_addr)
        if got is None:
            await stream.aclose()
            return
        header, early = got
        if header.source is not None:  # LOCAL/UNKNOWN: the balancer itself, keep the socket's
            peer_ip, port = header.source
            peer_addr = f"[{peer_ip}]:{port}" if ":" in peer_ip else f"{peer_ip}:{port}"
    creds = rt.credentials
    conn = SSL.Connection(creds.context, None)
    conn.set_accept_state()
    if early:
        conn.bio_write(early)
    tls = TLSStream(stream, conn)
    rt.metrics.open_connections.inc()
    try:
        peer = await _handshake(rt, creds, tls, peer_addr)
        if peer is not None:
            session = HttpSession(rt, tls, peer, peer_ip, peer_addr)
            await session.run()
            if session.truncated:
                await tls.abort()
    finally:
        rt.metrics.open_connections.dec()
        await tls.aclose()


_PLAIN_HTTP_BODY = b"This port speaks HTTPS and requires a client certificate.\n"
_PLAIN_HTTP_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


def _handshake_failed(rt: Runtime, reason: str, peer_addr: str, **fields: object) -> None:
    rt.metrics.handshake_failures.labels(reason=reason).inc()
    rt.events.event("tls_handshake_failed", reason=reason, peer_addr=peer_addr, **fields)


async def _handshake(
    rt: Runtime, creds: Credentials, tls: TLSStream, peer_addr: str
) -> svid.PeerSvid | None:
    try:
        with trio.fail_after(rt.config.timeouts.handshake):
            await tls.do_handshake()
    except TLSError as exc:
        reason = _tls_reason(exc.reason)
        _handshake_failed(rt, reason, peer_addr, detail=exc.reason, leaf_sha256=None)
        if reason == "tls_http_request":
            # Plain HTTP on the TLS port (a misconfigured client or health check): say so
            # in plain HTTP, as nginx does, instead of leaving the caller to guess.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await tls.transport.send_all(_PLAIN_HTTP_REPLY)
            await tls.abort()
        return None
    except trio.TooSlowError:
        _handshake_failed(rt, "handshake_timeout", peer_addr)
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        _handshake_failed(rt, "connection_broken", peer_addr, detail=str(exc))
        return None
    leaf = tls.conn.get_peer_certificate(as_cryptography=True)
    chain = [leaf] if leaf is not None else []
    # On the server side OpenSSL's peer chain may or may not repeat the leaf: de-dupe.
    for cert in tls.conn.get_peer_cert_chain(as_cryptography=True) or []:
        if cert not in chain:
            chain.append(cert)
    try:
        return _verified_peer(creds, chain)
    except SvidError as exc:
        _handshake_failed(
            rt,
            exc.reason,
            peer_addr,
            detail=exc.detail,
            leaf_sha256=svid.fingerprint(leaf) if leaf is not None else None,
            claimed_ids=svid.uri_sans(leaf) if leaf is not None else [],
        )
        return None


def _upgrade_protocol(hdrs: headers.Headers) -> bytes | None:
    """The protocol a request asks to switch to (``Connection: upgrade`` + ``Upgrade``)."""
    if b"upgrade" not in headers.connection_tokens(hdrs):
        return None
    return next((v for n, v in hdrs if n == b"upgrade"), None)


def _trusted(event: type[h11.Request] | type[h11.Response], **fields: Any) -> Any:
    """An h11 event whose headers are NOT re-validated (h11's own ``_parsed`` path, used by
    its parser). Only for headers h11 already validated on the way in, or that the proxy
    generated from validated values: it saves two regex checks per header per hop."""
    return event(**fields, _parsed=True)


_PEER_CACHE_MAX = 4096
_PEER_CACHE_TTL = 300.0


def _verified_peer(creds: Credentials, chain: list[x509.Certificate]) -> svid.PeerSvid:
    """``svid.verify_peer``, remembered for a chain seen before: clients reconnect with the
    same SVID over and over, and path validation is the dearest part of a handshake after
    the key exchange. An entry is only used with the trust store it was verified against
    (the cache belongs to the credentials), within the validity of every certificate of
    the chain, and for at most five minutes; revocation and expiry stay per request."""
    now = time.time()
    key = tuple(c.public_bytes(Encoding.DER) for c in chain)
    hit = creds.peer_cache.get(key)
    if hit is not None:
        peer, valid_until = hit
        if now < valid_until and peer.not_before.timestamp() <= now:
            return peer  # type: ignore[no-any-return]
        del creds.peer_cache[key]
    peer = svid.verify_peer(chain, creds.trust, dt.datetime.fromtimestamp(now, dt.UTC))
    valid_until = min(now + _PEER_CACHE_TTL, *(c.not_valid_after_utc.timestamp() for c in chain))
    if len(creds.peer_cache) >= _PEER_CACHE_MAX:
        del creds.peer_cache[next(iter(creds.peer_cache))]  # the oldest entry
    creds.peer_cache[key] = (peer, valid_until)
    return peer


def _bearer_token(hdrs: headers.Headers, name: str) -> str | None:
    """The token from ``Authorization: Bearer <t>``, or the value of a custom header
    (where a ``Bearer`` prefix is optional)."""
    raw = name.encode("ascii")
    for n, v in hdrs:
        if n == raw:
            value = v.decode("ascii", "replace").strip()
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "bearer":
                return rest.strip() or None
            return None if raw == b"authorization" else value or None
    return None


def _json_body(error: str, reason: str, request_id: str) -> bytes:
    return json.dumps({"error": error, "reason": reason, "request_id": request_id}).encode()


_ERRORS = {
    400: ("bad_request", "the request is malformed"),
    403: ("forbidden", "the caller is not authorized for this request"),
    405: ("method_not_allowed", "this method is not supported"),
    408: ("request_timeout", "the request was not received in time"),
    413: ("payload_too_large", "the request body is too large"),
    431: ("request_header_fields_too_large", "the request head is too large"),
    501: ("not_implemented", "the request uses an unsupported feature"),
    502: ("bad_gateway", "the upstream service is unavailable"),
    504: ("gateway_timeout", "the upstream service did not answer in time"),
    505: ("http_version_not_supported", "only HTTP/1.1 and HTTP/1.0 are served"),
}


class HttpSession:
    """The HTTP/1.1 side of one verified client connection."""

    def __init__(
        self, rt: Runtime, tls: TLSStream, peer: svid.PeerSvid, peer_ip: str, peer_addr: str
    ) -> None:
        self.rt = rt
        self.tls = tls
        self.peer = peer
        self.peer_ip = peer_ip
        self.peer_addr = peer_addr
        self.h = new_server_connection(rt.config.limits.max_header_bytes)
        self.id_header = rt.config.spiffe_id_header.lower().encode("ascii")
        self.strip = rt.strip_always
        ident = rt.config.identity
        # Whether this peer's XFCC counts is decided once, from its verified SPIFFE ID.
        self.trusted_forwarder = any(p.matches(peer.spiffe_id) for p in ident.trusted_forwarders)
        self._own_element: xfcc.Element | None = None
        self._own_text: str | None = None
        self._out = bytearray()
        self._hdrs: list[tuple[bytes, bytes]] = []
        self._http10_keepalive = False
        self._reuse_http10 = False
        self._method = b""
        self._client_cert: tuple[tuple[bytes, bytes], ...] | None = None
        # Set when a response was cut short (the upstream broke mid-body): the connection
        # then ends without close_notify, so no client mistakes it for a complete one.
        self.truncated = False

    def own_element(self) -> xfcc.Element:
        """This hop's XFCC element for this peer (the same for every request)."""
        if self._own_element is None:
            creds = self.rt.credentials
            leaf = self.peer.leaf
            chain = self.peer.chain or (leaf,)
            fields = self.rt.config.identity.xfcc_fields
            # Only what the configured fields need: PEM-encoding a chain is not free.
            self._own_element = xfcc.element_for(
                fields,
                by=str(creds.own_id) if creds.own_id else None,
                leaf_sha256=self.peer.fingerprint,
                cert_pem=leaf.public_bytes(Encoding.PEM).decode("ascii")
                if "Cert" in fields
                else "",
                chain_pem="".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in chain)
                if "Chain" in fields
                else "",
                subject=leaf.subject.rfc4514_string() if "Subject" in fields else "",
                uris=[str(self.peer.spiffe_id)] if "URI" in fields else [],
                dns=svid.dns_sans(leaf) if "DNS" in fields else [],
            )
        return self._own_element

    def own_text(self) -> str:
        """This hop's XFCC element, formatted once per connection."""
        if self._own_text is None:
            self._own_text = xfcc.format_element(self.own_element())
        return self._own_text

    def client_cert_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """RFC 9440: ``Client-Cert`` (the leaf) and ``Client-Cert-Chain`` (the
        intermediates presented), each certificate a structured-field byte sequence."""
        if self._client_cert is None:

            def sf(cert: x509.Certificate) -> bytes:
                return b":" + base64.b64encode(cert.public_bytes(Encoding.DER)) + b":"

            out = [(b"client-cert", sf(self.peer.leaf))]
            rest = self.peer.chain[1:]
            if rest:
                out.append((b"client-cert-chain", b", ".join(sf(c) for c in rest)))
            self._client_cert = tuple(out)
        return self._client_cert

    def inbound_origin(self, req: h11.Request) -> tuple[str | None, SpiffeId | None]:
        """A trusted forwarder's XFCC and the origin it names (its first element's URI).
        From any other peer, XFCC never counts: (None, None)."""
        values = [v for n, v in self._hdrs if n == headers.XFCC]
        if not values or not self.trusted_forwarder:
            return None, None
        inbound = ",".join(v.decode("latin-1") for v in values)
        try:
            elements = xfcc.parse(inbound)
        except xfcc.XfccError as exc:
            raise HttpError(400, "malformed_xfcc", str(exc)) from exc
        uri = xfcc.first_uri(elements[0])
        if uri is None:
            return inbound, None
        try:
            return inbound, SpiffeId.parse(uri)
        except SpiffeIdError as exc:
            raise HttpError(400, "xfcc_origin_not_a_spiffe_id", str(exc)) from exc

    # --- client I/O -------------------------------------------------------------------

    async def _receive(self, deadline: float) -> None:
        try:
            with trio.fail_at(deadline):
                data = await self.tls.receive_some()
        except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClientGone(str(exc)) from exc
        self.h.receive_data(data)

    async def _send(self, event: h11.Event, flush: bool = True) -> None:
        """Queue an event's bytes for the client; write them out unless ``flush`` is off.
        A response head and a small body thus leave in one TLS record and one ``send``."""
        data = self.h.send(event)
        if self._http10_keepalive and type(event) is h11.Response:
            data = self._keep_http10_alive(event, data)
        if data:
            self._out += data
        if flush or len(self._out) >= _OUT_HIGH_WATER:
            await self._flush_out()

    async def _flush_out(self) -> None:
        if not self._out:
            return
        data = bytes(self._out)
        self._out.clear()
        try:
            await self.tls.send_all(data)
        except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClientGone(str(exc)) from exc

    def _keep_http10_alive(self, response: h11.Response, data: bytes | None) -> bytes | None:
        """HTTP/1.0 keep-alive, which h11 does not do: an HTTP/1.0 client that asked for it
        (ab -k does) gets it when the response has a length; the next request then gets a
        fresh h11 connection (see ``run``)."""
        if data is None or any(
            n == b"connection" and b"close" in v.lower() for n, v in response.headers
        ):
            return data  # the proxy itself decided to close
        has_length = (
            response.status_code in (204, 304)
            or self._method == b"HEAD"
            or any(n == b"content-length" for n, _ in response.headers)
        )
        if not has_length:
            return data  # close-delimited body: the connection must end
        self._reuse_http10 = True
        return data.replace(b"\r\nConnection: close\r\n", b"\r\nConnection: keep-alive\r\n", 1)

    def _fresh_connection(self) -> None:
        leftover, closed = self.h.trailing_data
        self.h = new_server_connection(self.rt.config.limits.max_header_bytes)
        if leftover:
            self.h.receive_data(leftover)
        if closed:
            self.h.receive_data(b"")

    async def _read_request(self) -> h11.Event | None:
        """The next request head: ``idle`` to start it, ``request_head`` to finish it.
        While idle (no byte of a next request yet) a drain closes the connection."""
        timeouts = self.rt.config.timeouts
        deadline = trio.current_time() + timeouts.idle
        started = False
        while True:
            event = self.h.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            if self.rt.draining and not started:
                return None
            try:
                if started:
                    await self._receive(deadline)
                else:
                    with trio.CancelScope() as idle:
                        self.rt.idle_scopes.add(idle)
                        try:
                            await self._receive(deadline)
                        finally:
                            self.rt.idle_scopes.discard(idle)
                    if idle.cancelled_caught:
                        return None
            except trio.TooSlowError:
                if started:
                    await self._reply_error(408, "request_head_timeout", "-", close=True)
                return None
            if not started:
                started = True
                deadline = trio.current_time() + timeouts.request_head

    async def _next_body_event(self) -> h11.Event:
        deadline = trio.current_time() + self.rt.config.timeouts.idle
        while True:
            event = self.h.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                await self._receive(deadline)
            except trio.TooSlowError as exc:
                raise HttpError(408, "request_body_timeout") from exc

    async def _reply_error(self, status: int, reason: str, request_id: str, close: bool) -> None:
        if self.h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        error, text = _ERRORS.get(status, ("error", "the request failed"))
        body = _json_body(error, text, request_id)
        hdrs = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request_id.encode("ascii")),
        ]
        if close:
            hdrs.append((b"connection", b"close"))
        await self._send(h11.Response(status_code=status, headers=hdrs), flush=False)
        await self._send(h11.Data(data=body), flush=False)
        await self._send(h11.EndOfMessage())

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        with contextlib.suppress(ClientGone):
            while True:
                try:
                    event = await self._read_request()
                except h11.RemoteProtocolError as exc:
                    await self._malformed(exc)
                    return
                if event is None or not isinstance(event, h11.Request):
                    return
                self._http10_keepalive = event.http_version == b"1.0" and (
                    b"keep-alive" in headers.connection_tokens(event.headers)
                )
                self._reuse_http10 = False
                self._method = event.method
                keep = await self.handle(event)
                if (
                    self._reuse_http10
                    and self.h.our_state is h11.MUST_CLOSE
                    and (self.h.their_state in (h11.DONE, h11.MUST_CLOSE))
                ):
                    self._fresh_connection()
                    continue
                if not keep:
                    return
                if self.h.our_state is not h11.DONE or self.h.their_state is not h11.DONE:
                    return
                self.h.start_next_cycle()

    async def _malformed(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        reason = "request_head_too_large" if status == 431 else "malformed_request"
        ex = audit.Exchange(
            request_id=headers.request_id([]),
            peer_addr=self.peer_addr,
            reason=reason,
            status=status,
        )
        await self._reply_error(status, reason, ex.request_id, close=True)
        self._log(
            ex, dt.datetime.now(dt.UTC), time.perf_counter(), self.rt.policy.sha256, detail=str(exc)
        )

    def _log(
        self, ex: audit.Exchange, started: dt.datetime, t0: float, policy_sha256: str, **extra: str
    ) -> None:
        elapsed = time.perf_counter() - t0
        record = audit.build_record(ex, self.peer, policy_sha256, started, elapsed)
        record.update(extra)
        self.rt.decisions.write(record)
        self.rt.metrics.count_request(
            record["route"] or "", ex.outcome, ex.reason, record["mode"], elapsed
        )

    async def handle(self, req: h11.Request) -> bool:
        """Serve one request; return whether the connection may carry another."""
        t0 = time.perf_counter()
        started = dt.datetime.now(dt.UTC)
        # h11's Headers iterates in Python, item by item: read it once per request.
        self._hdrs = hdrs = list(req.headers)
        rid = headers.request_id(hdrs)
        ex = audit.Exchange(
            request_id=rid, peer_addr=self.peer_addr, method=req.method.decode("ascii", "replace")
        )
        policy = self.rt.policy
        has_body = any(
            n in (b"content-length", b"transfer-encoding") and (n != b"content-length" or v != b"0")
            for n, v in hdrs
        )
        try:
            target = self._target(req, ex)
            token = _bearer_token(hdrs, policy.jwt_header)
            inbound_xfcc, origin = self.inbound_origin(req)
            ex.origin = str(origin) if origin else None
            ex.decision = decision = evaluate(
                policy,
                self.peer,
                Request(ex.method, ex.host, ex.path, token, origin),
                started,
                self.rt.credentials.jwt_authorities,
            )
            ex.outcome = audit.ALLOW if decision.allowed else audit.DENY
            ex.reason = decision.reason
            if not decision.forward:
                # Never read the body of a refused request: answer and close if it has one.
                # A bodiless one is complete already; take its end so the connection can
                # carry the next request.
                if not has_body:
                    await self._next_body_event()
                ex.status = 403
                await self._reply_error(403, ex.reason, rid, close=has_body)
                return not has_body
            route = decision.route
            assert route is not None
            upgrade = _upgrade_protocol(hdrs)
            if upgrade is not None:
                await self._upgrade(req, target, route, ex, upgrade, origin, policy.sha256)
                return False
            # The legacy app must not be able to replay the caller's JWT-SVID.
            strip = (
                (policy.jwt_header.encode("ascii"),)
                if route.audiences and not route.keep_token
                else ()
            )
            return await self._forward(
                req,
                target,
                route,
                ex,
                has_body,
                frozenset(strip),
                inbound_xfcc,
                origin,
                policy.sha256,
            )
        except HttpError as exc:
            ex.status = exc.status_hint
            ex.reason = exc.reason
            await self._reply_error(exc.status_hint, exc.reason, rid, close=True)
            return False
        except UpstreamError as exc:
            ex.status = exc.status_hint
            ex.reason = exc.reason
            self.rt.metrics.upstream_errors.labels(
                upstream=ex.upstream or "", reason=exc.reason
            ).inc()
            self.rt.events.event(
                "upstream_error",
                request_id=rid,
                upstream=ex.upstream,
                reason=exc.reason,
                detail=exc.detail,
            )
            await self._reply_error(exc.status_hint, exc.reason, rid, close=True)
            return False
        except ClientGone:
            if ex.reason in ("", ALLOWED):
                ex.reason = "client_gone"
            raise
        finally:
            self._log(ex, started, t0, policy.sha256)

    def _target(self, req: h11.Request, ex: audit.Exchange) -> Target:
        if req.method == b"CONNECT":
            raise HttpError(405, "connect_not_supported")
        if req.http_version not in (b"1.1", b"1.0"):
            raise HttpError(505, "http_version_not_supported")
        names = [n for n, _ in self._hdrs]
        if b"transfer-encoding" in names and b"content-length" in names:
            # RFC 9112 section 6.1 lets a server refuse this; a proxy must, or it smuggles.
            raise HttpError(400, "content_length_with_transfer_encoding")
        size = len(req.target) + sum(len(n) + len(v) + 4 for n, v in self._hdrs)
        if size > self.rt.config.limits.max_header_bytes:
            # h11 bounds only the bytes it buffers while a head is incomplete; a head that
            # arrives whole in one read is measured here.
            raise HttpError(431, "request_head_too_large")
        limit = self.rt.config.limits.max_body_bytes
        if limit is not None:
            length = next((v for n, v in self._hdrs if n == b"content-length"), None)
            if length is not None and int(length) > limit:
                raise HttpError(413, "request_body_too_large")
        target = parse_target(req.method, req.target)
        host = next((v.decode("ascii", "replace") for n, v in self._hdrs if n == b"host"), "")
        # Absolute-form: the target's authority wins (RFC 9112 section 3.2.2), but the
        # upstream gets origin-form and routes on Host, so the two must agree.
        if target.authority is not None and host.strip().lower() != target.authority:
            raise HttpError(400, "host_does_not_match_target")
        ex.host = host_for_matching(host)
        ex.path = target.path
        return target

    async def _forward(
        self,
        req: h11.Request,
        target: Target,
        route: Route,
        ex: audit.Exchange,
        has_body: bool,
        strip: frozenset[bytes],
        inbound_xfcc: str | None,
        origin: SpiffeId | None,
        policy_sha256: str,
    ) -> bool:
        pool = self.rt.pools[route.upstream]
        ex.upstream = route.upstream
        creds = self.rt.credentials
        up_req = _trusted(
            h11.Request,
            method=req.method,
            target=target.forward,
            headers=self._upstream_headers(
                req, route, pool.upstream, ex, strip, inbound_xfcc, origin, policy_sha256
            ),
        )
        # Body bytes that came with the head are parsed before anything goes upstream: a
        # malformed start of a body (a bad chunk size) is refused without the upstream
        # ever seeing the request.
        first = self._buffered_body_event() if has_body else None
        if self.h.client_is_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        conn = await pool.acquire(creds)
        try:
            try:
                await self._send_request(conn, up_req, ex, first)
                response = await self._response_head(conn)
            except UpstreamError:
                # A pooled connection the upstream closed just as we reused it fails before
                # any response byte. Retry once on a fresh connection, but only when that
                # cannot repeat a side effect: an idempotent method and no body (RFC 9110
                # section 9.2.2).
                retryable = req.method in IDEMPOTENT and not has_body
                if not (retryable and conn.reused):
                    raise
                await conn.aclose()
                conn = await pool.connect(creds)
                await conn.send(up_req)
                await conn.send(h11.EndOfMessage())
                response = await self._response_head(conn)
            ex.upstream_status = ex.status = response.status_code
            await self._send(
                _trusted(
                    h11.Response,
                    status_code=response.status_code,
                    reason=response.reason,
                    headers=headers.downstream_response_headers(response.headers, ex.request_id),
                ),
                flush=False,
            )
            timeout = self.rt.config.timeouts.upstream_response
            while True:
                try:
                    # Bytes already here are buffered; waiting for more flushes them first.
                    event = await conn.next_event(timeout, self._flush_out)
                except UpstreamError as exc:
                    # The head is committed: the only honest signal left is to cut the
                    # connection.
                    ex.reason = exc.reason
                    self.truncated = True
                    raise ClientGone("upstream broke mid-response") from exc
                if isinstance(event, h11.Data):
                    ex.bytes_out += len(event.data)
                    await self._send(h11.Data(data=event.data), flush=False)
                elif isinstance(event, h11.EndOfMessage):
                    await self._send(h11.EndOfMessage())
                    break
                else:
                    raise ClientGone(f"unexpected upstream event {event!r}")
        except BaseException:
            await conn.aclose()
            raise
        await pool.release(conn)
        return self.h.our_state is h11.DONE

    def _upstream_headers(
        self,
        req: h11.Request,
        route: Route,
        upstream: Upstream,
        ex: audit.Exchange,
        strip: frozenset[bytes],
        inbound_xfcc: str | None,
        origin: SpiffeId | None,
        policy_sha256: str,
    ) -> headers.HeaderList:
        rt = self.rt
        caller = str(origin or self.peer.spiffe_id)
        extra: list[tuple[bytes, bytes]] = []
        if upstream.client_cert_headers:
            extra += self.client_cert_headers()
        if upstream.assertion_header and rt.signer is not None:
            token = rt.signer.sign(
                subject=caller,
                audience=upstream.name,
                request_id=ex.request_id,
                route=route.name,
                policy_sha256=policy_sha256,
                now=time.time(),
                ttl=upstream.assertion_ttl,
            )
            extra.append((upstream.assertion_header.lower().encode("ascii"), token.encode()))
        forwarded_for = self.peer_ip
        if self.trusted_forwarder:  # a trusted hop's X-Forwarded-For is extended, not reset
            inbound_xff = b", ".join(v for n, v in self._hdrs if n == b"x-forwarded-for")
            if inbound_xff:
                forwarded_for = f"{inbound_xff.decode('latin-1')}, {self.peer_ip}"
        ident = headers.Identity(
            peer_ip=self.peer_ip,
            request_id=ex.request_id,
            spiffe_id=caller,
            id_header=self.id_header,
            xfcc=xfcc.outbound(
                rt.config.identity.xfcc, inbound_xfcc, self.trusted_forwarder, self.own_text()
            ),
            forwarded_for=forwarded_for,
            extra=tuple(extra),
        )
        return headers.upstream_request_headers(self._hdrs, ident, self.strip | strip)

    async def _upgrade(
        self,
        req: h11.Request,
        target: Target,
        route: Route,
        ex: audit.Exchange,
        protocol: bytes,
        origin: SpiffeId | None,
        policy_sha256: str,
    ) -> None:
        """An allowed ``Upgrade`` (WebSocket): the upgrade request goes upstream with the
        identity headers on a fresh connection; on ``101`` both sides become one byte
        stream until either closes. Anything else is relayed as a plain response."""
        pool = self.rt.pools[route.upstream]
        ex.upstream = route.upstream
        inbound_xfcc, _ = self.inbound_origin(req)
        hdrs = self._upstream_headers(
            req, route, pool.upstream, ex, frozenset(), inbound_xfcc, origin, policy_sha256
        )
        hdrs += [(b"connection", b"upgrade"), (b"upgrade", protocol)]
        event = await self._next_body_event()
        if not isinstance(event, h11.EndOfMessage):
            raise HttpError(400, "upgrade_with_body")
        conn = await pool.connect(self.rt.credentials)
        try:
            await conn.send(h11.Request(method=req.method, target=target.forward, headers=hdrs))
            await conn.send(h11.EndOfMessage())
            response = await conn.next_event(self.rt.config.timeouts.upstream_response)
            if isinstance(response, h11.InformationalResponse) and response.status_code == 101:
                ex.status = ex.upstream_status = 101
                back = headers.strip_hop_by_hop(response.headers, frozenset({headers.REQUEST_ID}))
                back += [
                    (b"connection", b"upgrade"),
                    (b"upgrade", protocol),
                    (headers.REQUEST_ID, ex.request_id.encode("ascii")),
                ]
                await self._send(h11.InformationalResponse(status_code=101, headers=back))
                await self._pump(conn, ex)
                return
            if not isinstance(response, h11.Response):
                raise UpstreamError(502, "upstream_bad_response", repr(response))
            # Declined: relay the answer; the connection ends with it.
            ex.status = ex.upstream_status = response.status_code
            await self._send(
                h11.Response(
                    status_code=response.status_code,
                    reason=response.reason,
                    headers=[
                        *headers.downstream_response_headers(response.headers, ex.request_id),
                        (b"connection", b"close"),
                    ],
                )
            )
            while True:
                event = await conn.next_event(self.rt.config.timeouts.upstream_response)
                if isinstance(event, h11.Data):
                    ex.bytes_out += len(event.data)
                    await self._send(h11.Data(data=event.data))
                else:
                    await self._send(h11.EndOfMessage())
                    return
        finally:
            await conn.aclose()

    async def _pump(self, conn: UpstreamConnection, ex: audit.Exchange) -> None:
        """Bytes both ways until either side closes; then both close."""
        client_early, _ = self.h.trailing_data
        upstream_early, _ = conn.h11.trailing_data

        async def up(cancel: trio.CancelScope) -> None:
            with contextlib.suppress(
                TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError
            ):
                if client_early:
                    ex.bytes_in += len(client_early)
                    await conn.stream.send_all(client_early)
                while True:
                    data = await self.tls.receive_some()
                    if not data:
                        break
                    ex.bytes_in += len(data)
                    await conn.stream.send_all(data)
            cancel.cancel()

        async def down(cancel: trio.CancelScope) -> None:
            with contextlib.suppress(
                TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError
            ):
                data = upstream_early
                if data:
                    ex.bytes_out += len(data)
                    await self.tls.send_all(data)
                while True:
                    data = await conn.stream.receive_some(65536)
                    if not data:
                        break
                    ex.bytes_out += len(data)
                    await self.tls.send_all(data)
            cancel.cancel()

        async with trio.open_nursery() as n:
            n.start_soon(up, n.cancel_scope)
            n.start_soon(down, n.cancel_scope)

    def _buffered_body_event(self) -> h11.Event | None:
        """The first body event if its bytes are here already, else None."""
        try:
            event = self.h.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(400, "malformed_request_body", str(exc)) from exc
        return None if event is h11.NEED_DATA else event  # type: ignore[return-value]

    async def _send_request(
        self,
        conn: UpstreamConnection,
        up_req: h11.Request,
        ex: audit.Exchange,
        first: h11.Event | None = None,
    ) -> None:
        """Send the head, then stream the client's body (``first`` is its first event,
        already read) to the upstream."""
        await conn.send(up_req)
        while True:
            if first is not None:
                event, first = first, None
            else:
                try:
                    event = await self._next_body_event()
                except h11.RemoteProtocolError as exc:
                    raise HttpError(400, "malformed_request_body", str(exc)) from exc
            if isinstance(event, h11.Data):
                ex.bytes_in += len(event.data)
                limit = self.rt.config.limits.max_body_bytes
                if limit is not None and ex.bytes_in > limit:
                    raise HttpError(413, "request_body_too_large")
                await conn.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await conn.send(h11.EndOfMessage())
                return
            else:
                raise HttpError(400, "malformed_request_body", repr(event))

    async def _response_head(self, conn: UpstreamConnection) -> h11.Response:
        """The upstream's final response head (1xx interim responses are dropped)."""
        while True:
            event = await conn.next_event(self.rt.config.timeouts.upstream_response)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise UpstreamError(502, "upstream_bad_response", repr(event))
