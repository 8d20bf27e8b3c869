"""The client side of one verified connection, as bytes and h11 events: reading a
request head and body within their deadlines, queueing and writing a response, HTTP/1.0
keep-alive (which h11 does not do), and the proxy's own error replies. What a request
means is ``session.HttpSession``'s business.
"""

from __future__ import annotations

import json

import h11
import trio

from proxy import headers, http1
from proxy.deadlines import INF, Deadline, clock
from proxy.errors import ClientGone, HttpError
from proxy.runtime import Runtime
from proxy.tls_stream import BROKEN, TLSStream

# What an idle keep-alive connection holds instead of an h11 connection (one for all):
# never sent to or read from, replaced as soon as a next request's bytes arrive.
NO_REQUEST = h11.Connection(h11.SERVER)
_OUT_HIGH_WATER = 64 * 1024  # buffered response bytes are written out at least this often


def _json_body(error: str, reason: str, request_id: str) -> bytes:
    return json.dumps({"error": error, "reason": reason, "request_id": request_id}).encode()


_ERRORS = {
    400: ("bad_request", "the request is malformed"),
    401: ("unauthorized", "a valid JWT-SVID for this route is required"),
    403: ("forbidden", "the caller is not authorized for this request"),
    405: ("method_not_allowed", "this method is not supported"),
    408: ("request_timeout", "the request was not received in time"),
    500: ("internal_error", "the proxy failed to serve this request"),
    413: ("payload_too_large", "the request body is too large"),
    431: ("request_header_fields_too_large", "the request head is too large"),
    501: ("not_implemented", "the request uses an unsupported feature"),
    502: ("bad_gateway", "the upstream service is unavailable"),
    504: ("gateway_timeout", "the upstream service did not answer in time"),
    505: ("http_version_not_supported", "only HTTP/1.1 and HTTP/1.0 are served"),
}


class ClientConnection:
    """Bytes and h11 events to and from one verified client."""

    # Slots: an idle keep-alive connection keeps one of these (no per-instance dict).
    __slots__ = (
        "_body_bytes",
        "_body_started",
        "_http10_keepalive",
        "_method",
        "_out",
        "_reuse_http10",
        "_sock",
        "_write_timeout",
        "deadline",
        "h",
        "opened",
        "rt",
        "tls",
        "truncated",
    )

    def __init__(self, rt: Runtime, tls: TLSStream, deadline: Deadline | None = None) -> None:
        self.rt = rt
        self.tls = tls
        # The deadline of the wait in progress on the client's socket, registered with
        # rt.sweeper for the connection's life (handle_connection does that).
        self.deadline = deadline or Deadline()
        self._sock = tls.transport.socket
        self.opened = clock()
        self._write_timeout = rt.config.timeouts.client_write
        # The body of the request in progress: when it started and what arrived, for
        # limits.min_body_rate.
        self._body_started = 0.0
        self._body_bytes = 0
        self.h = http1.new_server_connection(rt.config.limits.max_header_bytes)
        self._out = bytearray()
        self._http10_keepalive = False
        self._reuse_http10 = False
        self._method = b""
        # Set when a response was cut short (the upstream broke mid-body): the connection
        # then ends without close_notify, so no client mistakes it for a complete one.
        self.truncated = False

    async def _receive(self, at: float) -> None:
        """Read from the client into h11; ``TooSlowError`` past ``at`` (``deadlines.clock``).
        (The wait for a next request, which a drain may cut short, is in ``run``.)"""
        if clock() >= at:
            # The sweeper wakes only a blocked wait: a client whose bytes are always
            # there already (a stream of empty lines before a head) never blocks.
            raise trio.TooSlowError
        deadline = self.deadline
        deadline.arm(at, self._sock)
        try:
            data = await self.tls.receive_some()
        except BROKEN as exc:
            if deadline.expired:
                raise trio.TooSlowError from None
            raise ClientGone(str(exc)) from exc
        finally:
            deadline.at = INF
        self.h.receive_data(data)

    def queue(self, event: h11.Event) -> bool:
        """Queue an event's bytes for the client, without writing; whether enough is
        queued that the caller should ``flush`` now. A response head and a small body
        thus leave in one TLS record and one ``send``."""
        data = self.h.send(event)
        if self._http10_keepalive and type(event) is h11.Response:
            data = self._keep_http10_alive(event, data)
        if data:
            self._out += data
        return len(self._out) >= _OUT_HIGH_WATER

    async def send(self, event: h11.Event, flush: bool = True) -> None:
        """``queue`` the event, then write out what is queued unless ``flush`` is off
        (and not much is queued)."""
        if self.queue(event) or flush:
            await self.flush()

    async def flush(self) -> None:
        if not self._out:
            return
        data = bytes(self._out)
        self._out.clear()
        await self.write(data)

    async def write(self, data: bytes) -> None:
        """Send to the client; a client that takes none of it for ``timeouts.client_write``
        (it stopped reading) is cut off, releasing the upstream connection too."""
        deadline = self.deadline
        deadline.arm(clock() + self._write_timeout, self._sock)
        try:
            await self.tls.send_all(data)
        except BROKEN as exc:
            if deadline.expired:
                self.truncated = True
                raise ClientGone("client_write_timeout") from None
            raise ClientGone(str(exc)) from exc
        finally:
            deadline.at = INF

    @property
    def closing(self) -> bool:
        """Past ``timeouts.max_connection_age``, or shutting down (the grace after
        SIGTERM): this connection's response carries ``Connection: close`` and it ends
        after it, so the client's next request goes through the load balancer again."""
        return (
            clock() - self.opened > self.rt.config.timeouts.max_connection_age
            or self.rt.drain_requested.is_set()
        )

    def _keep_http10_alive(self, response: h11.Response, data: bytes | None) -> bytes | None:
        """HTTP/1.0 keep-alive, which h11 does not do: an HTTP/1.0 client that asked for it
        (ab -k does) gets it when the response has a length; the next request then gets a
        fresh h11 connection (see ``run``)."""
        if data is None:
            return data
        has_length = response.status_code in (204, 304) or self._method == b"HEAD"
        for _, n, v in response.headers._full_items:  # as http1.header_list reads them
            if n == b"content-length":
                has_length = True
            elif n == b"connection" and b"close" in v.lower():
                return data  # the proxy itself decided to close
        if not has_length:
            return data  # close-delimited body: the connection must end
        self._reuse_http10 = True
        return data.replace(b"\r\nConnection: close\r\n", b"\r\nConnection: keep-alive\r\n", 1)

    def _next_cycle(self) -> None:
        """Ready for the next request. With nothing of it buffered the h11 connection is
        let go (an idle keep-alive connection then keeps none; a new one is made when
        bytes arrive); otherwise a fresh one takes the buffered bytes. Also what HTTP/1.0
        keep-alive needs: h11 itself would close after an HTTP/1.0 request."""
        self._method = b""  # a reply to the next head must not take this one's HEAD
        leftover, closed = self.h.trailing_data
        if not leftover and not closed:
            self.h = NO_REQUEST
            return
        self.h = http1.new_server_connection(self.rt.config.limits.max_header_bytes)
        if leftover:
            self.h.receive_data(leftover)
        if closed:
            self.h.receive_data(b"")

    def _head_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event of a request head, or ``h11.NEED_DATA``."""
        if self.h.their_state is h11.IDLE and http1.skip_empty_lines(self.h):
            return h11.NEED_DATA  # half of an empty line: its LF comes in the next segment
        return self.h.next_event()

    def _body_deadline(self) -> float:
        """A body must keep up ``limits.min_body_rate`` on average after a grace of
        ``timeouts.request_head``: a trickle of a byte every few seconds is cut with 408
        instead of resetting a deadline with every byte; a fast upload is never cut."""
        rate = self.rt.config.limits.min_body_rate
        grace = self.rt.config.timeouts.request_head
        allowed = grace + (self._body_bytes / rate if rate else float("inf"))
        idle = clock() + self.rt.config.timeouts.idle
        return min(self._body_started + allowed, idle)

    async def next_body_event(self) -> h11.Event:
        while True:
            try:
                event = self.h.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(400, "malformed_request_body", str(exc)) from exc
            if event is not h11.NEED_DATA:
                if type(event) is h11.Data:
                    self._body_bytes += len(event.data)
                return event  # type: ignore[return-value]
            try:
                await self._receive(self._body_deadline())
            except trio.TooSlowError as exc:
                raise HttpError(408, "request_body_timeout") from exc

    def buffered_body_event(self) -> h11.Event | None:
        """The first body event if its bytes are here already, else None."""
        try:
            event = self.h.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(400, "malformed_request_body", str(exc)) from exc
        if type(event) is h11.Data:
            self._body_bytes += len(event.data)
        return None if event is h11.NEED_DATA else event  # type: ignore[return-value]

    async def reply_error(
        self, status: int, reason: str, request_id: str, close: bool, challenge: bool = False
    ) -> None:
        if self.h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        error, text = _ERRORS.get(status, ("error", "the request failed"))
        body = _json_body(error, text, request_id)
        hdrs = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request_id.encode("ascii")),
        ]
        if challenge:  # RFC 6750 section 3: no error code when no token was sent
            value = b'Bearer realm="spiffe-pep"'
            if reason != "jwt_missing":
                value += b', error="invalid_token"'
            hdrs.append((b"www-authenticate", value))
        if close or self.closing:
            hdrs.append((b"connection", b"close"))
        response = h11.Response(
            status_code=status, reason=headers.reason_phrase(status), headers=hdrs
        )
        self.queue(response)
        if self._method != b"HEAD":  # the head says the length a GET would get; no body
            self.queue(h11.Data(data=body))
        await self.send(http1.END)
