"""The strict head check (``proxy.http1.check_head``): what h11 lets through and a PEP
must refuse, each with its own message; a clean head passes."""

from __future__ import annotations

import h11
import pytest

from proxy import http1
from proxy.http1 import check_head

OK = b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "refused"),
    [
        (OK, None),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\tb\r\n\r\n", None),  # HTAB in a value
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare LF"),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", "bare LF"),
        (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", "control character"),
        (b"GET / HTTP/1.1\r\nX: a\x1bb\r\n\r\n", "control character"),
        (b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n", "control character"),
        (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", None),  # a lone CR is h11's to refuse
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "not chunked"),
        (b"POST / HTTP/1.1\r\nTRANSFER-ENCODING: chunked, gzip\r\n\r\n", "not chunked"),
        (b"POST / HTTP/1.1\r\ntRaNsFeR-eNcOdInG : identity\r\n\r\n", "not chunked"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
         "not chunked"),
        (b"GET / HTTP/1.1\r\nX-Note: transfer-encoding: gzip\r\n\r\n", None),  # a value
    ],
)  # fmt: skip
def test_check_head(head: bytes, refused: str | None) -> None:
    if refused is None:
        check_head(head)
        check_head(bytearray(head))
        return
    with pytest.raises(h11.LocalProtocolError, match=refused) as exc:
        check_head(head)
    assert exc.value.error_status_hint == 400


def test_header_list_reads_h11s_private_items() -> None:
    """``header_list`` reads h11's private ``Headers._full_items`` (raw name, lower-case
    name, value): pin it, so an h11 upgrade that changes it fails here."""
    from proxy.http1 import header_list

    event = h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"a"), (b"X-A", b"1")])
    assert header_list(event) == [(b"host", b"a"), (b"x-a", b"1")] == list(event.headers)
    response = h11.Response(status_code=200, headers=[(b"Content-Length", b"0")])
    assert header_list(response) == [(b"content-length", b"0")]


@pytest.mark.parametrize(
    ("data", "left"),
    [
        (b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n"),
        (b"\r\n\r\nGET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n"),
        (b"\r\n" * 100_000, b""),
        (b"\r\n\nGET", b"\nGET"),  # a bare LF is not an empty line: left for h11 to refuse
        (b"\r", b"\r"),  # half of one is left as it is
    ],
)
def test_empty_lines_before_a_request_line_are_skipped(data: bytes, left: bytes) -> None:
    conn = http1.new_server_connection(64 * 1024)
    conn.receive_data(data)
    http1.skip_empty_lines(conn)
    assert bytes(conn._receive_buffer._data) == left


def test_a_flood_of_empty_lines_is_skipped_in_one_cut() -> None:
    # A Python loop of one cut per line took 12.6 ms per 64 KiB of them: CPU a client
    # could make the proxy spend at will. Counted in cuts, not timed.
    conn = http1.new_server_connection(64 * 1024)
    conn.receive_data(b"\r\n" * 32_768)
    cuts = []
    extract = conn._receive_buffer._extract
    conn._receive_buffer._extract = lambda n: cuts.append(n) or extract(n)  # type: ignore[method-assign]
    http1.skip_empty_lines(conn)
    assert cuts == [65_536]
