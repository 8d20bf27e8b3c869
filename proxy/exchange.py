"""The forward stage: one allowed request to its upstream and the response back, or an
``Upgrade`` tunnel. The upstream's head comes from ``rewrite.upstream_head``; this
module only moves bytes (pooled upstream connections, body pumps both ways).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
import trio

from proxy import audit, headers, http1, rewrite
from proxy.canonical import CanonicalRequest
from proxy.errors import ClientGone, HttpError, UpstreamError
from proxy.forward import TIMEOUT, UpstreamConnection
from proxy.policy.evaluate import Decision
from proxy.policy.model import Policy, Route
from proxy.tls_stream import BROKEN

if TYPE_CHECKING:
    from proxy.session import HttpSession

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# A body's Data event is sent on as it was received (h11 writes only its bytes, not its
# chunk boundaries), not rebuilt per piece; the end of a message is ``http1.END``.


def upgrade_protocol(request: CanonicalRequest) -> bytes | None:
    """The protocol a request asks to switch to (``Connection: upgrade`` + ``Upgrade``)."""
    if b"upgrade" not in request.connection:
        return None
    return next((v for n, v in request.headers if n == b"upgrade"), None)


@dataclass(slots=True)
class Forward:
    """One allowed request on its way upstream."""

    client: HttpSession
    request: CanonicalRequest
    decision: Decision
    ex: audit.Exchange
    hop: rewrite.Origin
    policy: Policy

    @property
    def route(self) -> Route:
        assert self.decision.route is not None
        return self.decision.route

    def head(self, strip: frozenset[bytes] = frozenset()) -> headers.HeaderList:
        rt = self.client.rt
        upstream = rt.config.upstreams[self.route.upstream]
        fwd = rewrite.Forwarding(
            request_id=self.ex.request_id,
            peer_ip=self.client.peer_ip,
            origin=self.hop.spiffe_id,
            inbound_xfcc=self.hop.xfcc,
            policy_sha256=self.policy.sha256,
            now=time.time(),
        )
        return rewrite.upstream_head(
            self.request, self.client.identity, self.route, upstream, fwd, rt.signer, strip
        )


async def forward(f: Forward) -> bool:
    """Send the request and its body, relay the response; return whether the client
    connection may carry another request."""
    client, request, ex, route = f.client, f.request, f.ex, f.route
    rt = client.rt
    pool = rt.pools[route.upstream]
    ex.upstream = route.upstream
    creds = rt.credentials
    # The legacy app must not be able to replay the caller's JWT-SVID.
    strip = (
        frozenset({f.policy.jwt_header.encode("ascii")})
        if route.audiences and not route.keep_token
        else frozenset()
    )
    # ``_parsed``: h11's own path for its parser, which skips re-validating the headers
    # (two regex checks per header). Only for headers h11 validated on the way in, or
    # that the proxy made from validated values.
    up_req = h11.Request(
        method=request.method.encode("ascii"),
        target=request.target,
        headers=f.head(strip),
        _parsed=True,
    )
    # Body bytes that came with the head are parsed before anything goes upstream: a
    # malformed start of a body (a bad chunk size) is refused without the upstream
    # ever seeing the request.
    first = client.buffered_body_event() if request.has_body else None
    if client.h.client_is_waiting_for_100_continue:
        await client.send(
            h11.InformationalResponse(status_code=100, reason=b"Continue", headers=[])
        )
    conn = await pool.acquire(creds)
    try:
        try:
            await _send_request(client, conn, up_req, ex, first)
            response = await _response_head(client, conn)
        except UpstreamError as exc:
            # A pooled connection the upstream closed just as we reused it fails before
            # any response byte. Retry once on a fresh connection, but only when that
            # cannot repeat a side effect: an idempotent method and no body (RFC 9110
            # section 9.2.2). Never after a timeout: the upstream has the request and is
            # working on it (a second copy would double its load, and the wait).
            retryable = request.method in IDEMPOTENT and not request.has_body
            if not (retryable and conn.reused) or exc.reason == TIMEOUT:
                raise
            await conn.aclose()
            conn = await pool.connect(creds)
            await conn.send(up_req)
            await conn.send(http1.END)
            response = await _response_head(client, conn)
        ex.upstream_status = ex.status = response.status_code
        back = headers.downstream_response_headers(http1.header_list(response), ex.request_id)
        if client.closing:  # max_connection_age or shutting down: the connection's last
            back.append((b"connection", b"close"))
        client.queue(
            h11.Response(
                status_code=response.status_code,
                reason=headers.reason_phrase(response.status_code, response.reason),
                headers=back,
                _parsed=True,
            )
        )
        timeout = rt.config.timeouts.upstream_response
        while True:
            try:
                # Bytes already here are buffered; waiting for more flushes them first.
                event = await conn.next_event(timeout, client.flush)
            except UpstreamError as exc:
                # The head is committed: the only honest signal left is to cut the
                # connection.
                ex.reason = exc.reason
                client.truncated = True
                raise ClientGone("upstream broke mid-response") from exc
            if isinstance(event, h11.Data):
                ex.bytes_out += len(event.data)
                if client.queue(event):
                    await client.flush()
            elif isinstance(event, h11.EndOfMessage):
                await client.send(http1.END)
                break
            else:
                raise ClientGone(f"unexpected upstream event {event!r}")
    except BaseException:
        await conn.aclose()
        raise
    await pool.release(conn)
    return client.h.our_state is h11.DONE


async def _send_request(
    client: HttpSession,
    conn: UpstreamConnection,
    up_req: h11.Request,
    ex: audit.Exchange,
    first: h11.Event | None = None,
) -> None:
    """Send the head, then stream the client's body (``first`` is its first event,
    already read) to the upstream."""
    await conn.send(up_req)
    limit = client.rt.config.limits.max_body_bytes
    while True:
        # What is here already is taken without waiting (a bodiless request's end).
        event = first if first is not None else client.buffered_body_event()
        first = None
        if event is None:
            event = await client.next_body_event()
        if isinstance(event, h11.Data):
            ex.bytes_in += len(event.data)
            if limit is not None and ex.bytes_in > limit:
                raise HttpError(413, "request_body_too_large")
            await conn.send(event)
        elif isinstance(event, h11.EndOfMessage):
            await conn.send(http1.END)
            return
        else:
            raise HttpError(400, "malformed_request_body", repr(event))


async def _response_head(client: HttpSession, conn: UpstreamConnection) -> h11.Response:
    """The upstream's final response head. A ``103 Early Hints`` before it is relayed
    (hop-by-hop headers removed; not to an HTTP/1.0 client, RFC 9110 section 15.2); other
    1xx interim responses are the proxy's own business (it answers ``100-continue``)."""
    while True:
        event = await conn.next_event(client.rt.config.timeouts.upstream_response)
        if isinstance(event, h11.Response):
            return event
        if not isinstance(event, h11.InformationalResponse):
            raise UpstreamError(502, "upstream_bad_response", repr(event))
        if event.status_code == 103 and client.h.their_http_version != b"1.0":
            await client.send(
                h11.InformationalResponse(
                    status_code=103,
                    reason=headers.reason_phrase(103, event.reason),
                    headers=headers.strip_hop_by_hop(event.headers),
                )
            )


async def upgrade(f: Forward) -> None:
    """An allowed ``Upgrade`` (WebSocket): the upgrade request goes upstream with the
    identity headers on a fresh connection; on ``101`` both sides become one byte
    stream until either closes. Anything else is relayed as a plain response."""
    client, ex, route = f.client, f.ex, f.route
    rt = client.rt
    protocol = upgrade_protocol(f.request)
    assert protocol is not None
    pool = rt.pools[route.upstream]
    ex.upstream = route.upstream
    hdrs = f.head()
    hdrs += [(b"connection", b"upgrade"), (b"upgrade", protocol)]
    event = await client.next_body_event()
    if not isinstance(event, h11.EndOfMessage):
        raise HttpError(400, "upgrade_with_body")
    timeout = rt.config.timeouts.upstream_response
    conn = await pool.connect(rt.credentials)
    try:
        method = f.request.method.encode("ascii")
        await conn.send(h11.Request(method=method, target=f.request.target, headers=hdrs))
        await conn.send(http1.END)
        response = await conn.next_event(timeout)
        if isinstance(response, h11.InformationalResponse) and response.status_code == 101:
            ex.status = ex.upstream_status = 101
            back = headers.strip_hop_by_hop(response.headers, frozenset({headers.REQUEST_ID}))
            back += [
                (b"connection", b"upgrade"),
                (b"upgrade", protocol),
                (headers.REQUEST_ID, ex.request_id.encode("ascii")),
            ]
            await client.send(
                h11.InformationalResponse(
                    status_code=101,
                    reason=headers.reason_phrase(101, response.reason),
                    headers=back,
                )
            )
            await _pump(f, conn)
            return
        if not isinstance(response, h11.Response):
            raise UpstreamError(502, "upstream_bad_response", repr(response))
        # Declined: relay the answer; the connection ends with it.
        ex.status = ex.upstream_status = response.status_code
        await client.send(
            h11.Response(
                status_code=response.status_code,
                reason=headers.reason_phrase(response.status_code, response.reason),
                headers=[
                    *headers.downstream_response_headers(response.headers, ex.request_id),
                    (b"connection", b"close"),
                ],
            )
        )
        while True:
            event = await conn.next_event(timeout)
            if isinstance(event, h11.Data):
                ex.bytes_out += len(event.data)
                await client.send(event)
            else:
                await client.send(http1.END)
                return
    finally:
        await conn.aclose()


async def _pump(f: Forward, conn: UpstreamConnection) -> None:
    """Bytes both ways until either side closes, the tunnel idles past
    ``timeouts.tunnel_idle``, or its caller is no longer allowed; then both close."""
    client, ex = f.client, f.ex
    client_early, _ = client.h.trailing_data
    upstream_early, _ = conn.h11.trailing_data
    last = [trio.current_time()]

    async def up(cancel: trio.CancelScope) -> None:
        with contextlib.suppress(*BROKEN):
            if client_early:
                ex.bytes_in += len(client_early)
                await conn.stream.send_all(client_early)
            while True:
                data = await client.tls.receive_some()
                if not data:
                    break
                last[0] = trio.current_time()
                ex.bytes_in += len(data)
                await conn.stream.send_all(data)
        cancel.cancel()

    async def down(cancel: trio.CancelScope) -> None:
        with contextlib.suppress(ClientGone, *BROKEN):
            data = upstream_early
            if data:
                ex.bytes_out += len(data)
                await client.write(data)
            while True:
                data = await conn.stream.receive_some(65536)
                if not data:
                    break
                last[0] = trio.current_time()
                ex.bytes_out += len(data)
                await client.write(data)
        cancel.cancel()

    async with trio.open_nursery() as n:
        n.start_soon(up, n.cancel_scope)
        n.start_soon(down, n.cancel_scope)
        n.start_soon(_guard, f, last, n.cancel_scope)


async def _guard(f: Forward, last: list[float], cancel: trio.CancelScope) -> None:
    """Re-evaluate a tunnel's caller whenever the policy or the credentials change and
    at its certificate's expiry; close the tunnel when it idles too long."""
    client, rt = f.client, f.client.rt
    idle = rt.config.timeouts.tunnel_idle
    expires = (
        trio.current_time() + (client.peer.not_after - dt.datetime.now(dt.UTC)).total_seconds()
    )
    while True:
        changed = rt.changed
        with trio.move_on_at(min(expires + 0.001, last[0] + idle)):
            await changed.wait()
        reason = client.still_trusted()
        if reason is None:
            policy = rt.policy
            token = headers.bearer_token(f.request.headers, policy.jwt_header)
            verdict = client.verdict(f.request, f.hop, policy, time.time(), token)
            if not verdict.forward:
                reason = verdict.refusal.reason if verdict.refusal else verdict.decision.reason
        if reason is None and trio.current_time() >= last[0] + idle:
            reason = "tunnel_idle_timeout"
        if reason is not None:
            f.ex.reason = reason
            rt.events.event(
                "tunnel_closed",
                request_id=f.ex.request_id,
                spiffe_id=str(client.peer.spiffe_id),
                reason=reason,
                policy_sha256=rt.policy.sha256,
            )
            cancel.cancel()
            return
