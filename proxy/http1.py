"""The proxy's HTTP/1.1 server parser: h11, with the request head read strictly.

h11 follows RFC 9112's leniencies: it unfolds obs-fold continuation lines and accepts a
bare LF as a line ending. Both are allowed to a server, and both are classic request
smuggling material when two parsers in a chain disagree about them, so a PEP refuses
them with 400 (RFC 9112 sections 2.2 and 5.2 permit that). So are control characters
other than HTAB, which h11 passes through in header values. The check runs on the head
bytes h11 has just cut out of its buffer (request line, headers, trailers): two
``bytes.count`` calls, two ``find`` calls and two regex searches (control characters,
and Transfer-Encoding, whose codings are then read).

It hooks h11's private ``ReceiveBuffer``; h11 is pinned below 0.17 for that reason, and
tests/integration/test_http_attacks.py pins the behaviour.
"""

from __future__ import annotations

import re

import h11
from h11._receivebuffer import ReceiveBuffer

# Control characters other than HTAB, CR and LF. h11 lets them through in field values
# (it only refuses NUL and whitespace); RFC 9110 section 5.5 calls them invalid.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class _StrictReceiveBuffer(ReceiveBuffer):
    _in_head = False

    def maybe_extract_lines(self) -> list[bytearray] | None:
        self._in_head = True
        try:
            return super().maybe_extract_lines()
        finally:
            self._in_head = False

    def _extract(self, count: int) -> bytearray:
        out = super()._extract(count)
        if self._in_head:
            check_head(out)
        return out


# h11's events are immutable: the end of a message the proxy sends (never with trailers:
# a peer's are not relayed) is this one instance, not one built per message.
END = h11.EndOfMessage()

_TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding[ \t]*:([^\r]*)", re.IGNORECASE)


def check_head(head: bytes | bytearray) -> None:
    """Refuse a bare LF line ending, an obs-fold continuation line, a control character
    in a message head, or a Transfer-Encoding whose final coding is not chunked (RFC 9112
    section 6.3: the length cannot be determined, the server MUST answer 400; h11 would
    answer 501 for every coding it does not implement)."""
    if head.count(b"\n") != head.count(b"\r\n"):
        raise h11.LocalProtocolError("bare LF line ending in the request head", 400)
    # find, not ``in``: see canonical.BYTES_IN
    if head.find(b"\n ") >= 0 or head.find(b"\n\t") >= 0:
        raise h11.LocalProtocolError("obsolete line folding in the request head", 400)
    if _CONTROL.search(head):
        raise h11.LocalProtocolError("control character in the request head", 400)
    values = _TRANSFER_ENCODING.findall(head)
    if not values:
        return
    codings = [c.strip().lower() for value in values for c in value.split(b",") if c.strip()]
    if codings and codings[-1] != b"chunked":
        raise h11.LocalProtocolError("the final transfer coding is not chunked", 400)


def header_list(event: h11.Request | h11.Response) -> list[tuple[bytes, bytes]]:
    """An h11 event's headers as a plain list of (lower-case name, value). h11's
    ``Headers`` is a Python Sequence whose iteration calls ``__getitem__`` item by item;
    its private ``_full_items`` is read directly instead (pinned by tests/unit/test_http1.py)."""
    return [(name, value) for _, name, value in event.headers._full_items]


_EMPTY_LINES = re.compile(rb"(?:\r\n)*")


def skip_empty_lines(conn: h11.Connection) -> bool:
    """Drop empty lines buffered before a request line (RFC 9112 section 2.2: a server
    SHOULD ignore at least one). Only while ``conn`` waits for a request. All of them in
    one regex match and one cut: a Python loop per line took 12.6 ms per 64 KiB of empty
    lines (1.5 ms now), CPU a client could make the proxy spend at will.

    True when all that is left is the CR of an empty line whose LF has not arrived (the
    two split between TCP segments): wait for more, since h11 refuses a lone CR as a
    request line. Never once the peer's stream has ended: a CR and then the end would
    otherwise be waited on, without a read to block on, until ``request_head``."""
    buf = conn._receive_buffer
    if buf._data[:1] != b"\r":
        return False  # the usual case: the request line comes first
    empty = _EMPTY_LINES.match(buf._data)  # always matches, maybe nothing
    count = empty.end() if empty is not None else 0
    if count:
        buf._extract(count)
    return buf._data == b"\r" and not conn._receive_buffer_closed


def new_server_connection(max_header_bytes: int) -> h11.Connection:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
    conn._receive_buffer = _StrictReceiveBuffer()
    return conn
