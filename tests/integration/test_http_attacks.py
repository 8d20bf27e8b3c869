"""Hostile HTTP/1.1 over real mTLS, with a recording upstream behind the proxy: every
attack gets the right status, the connection closes where RFC 9112 says it must, and the
upstream never sees a malformed or ambiguous request (it records every byte it gets).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from pathlib import Path

import h11
import pytest
import trio

from proxy.http1 import new_server_connection
from tests.conftest import Pki
from tests.integration.harness import (
    curl,
    raw_exchange,
    start_recording,
    statuses,
    tls_client,
    wait_until,
)

H = b"Host: localhost\r\n"


def get(path: bytes = b"/orders", *extra: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\n" + H + b"".join(extra) + b"\r\n"


CLOSE = b"Connection: close\r\n"

# id, bytes sent, statuses expected, decision-log reason of the first response, and the
# targets the upstream must have received (nothing, for every refused request).
ATTACKS: list[tuple[str, bytes, list[int], str, list[bytes]]] = [
    (
        "cl_te_smuggling",
        b"POST /orders HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
        [400],
        "content_length_with_transfer_encoding",
        [],
    ),
    (
        "te_cl_smuggling",
        b"POST /orders HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n"
        b"\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
        [400],
        "content_length_with_transfer_encoding",
        [],
    ),
    (
        "two_differing_content_lengths",
        b"POST /orders HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        [400],
        "malformed_request",
        [],
    ),
    (
        "content_length_list",
        b"POST /orders HTTP/1.1\r\n" + H + b"Content-Length: 1, 2\r\n\r\nab",
        [400],
        "malformed_request",
        [],
    ),
    (
        "negative_content_length",
        b"POST /orders HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
        [400],
        "malformed_request",
        [],
    ),
    (
        "bad_chunk_size",
        b"POST /orders HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        [400],
        "malformed_request_body",
        [],
    ),
    (
        "chunk_size_with_space_and_sign",
        b"POST /orders HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n+5 \r\nhello\r\n0\r\n\r\n",
        [400],
        "malformed_request_body",
        [],
    ),
    (
        "unknown_transfer_coding",  # RFC 9112 section 6.1: 501 for a coding not understood
        b"POST /orders HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        [501],
        "malformed_request",
        [],
    ),
    (
        "obs_fold",
        get(b"/orders", b"X-A: a\r\n X-Client-Spiffe-Id: spiffe://x/y\r\n"),
        [400],
        "malformed_request",
        [],
    ),
    ("obs_fold_tab", get(b"/orders", b"X-A: a\r\n\tb\r\n"), [400], "malformed_request", []),
    ("bare_lf", b"GET /orders HTTP/1.1\nHost: localhost\n\n", [400], "malformed_request", []),
    ("bare_lf_in_one_line", get(b"/orders", b"X-A: a\nX-B: b\r\n"), [400], "malformed_request", []),
    ("bare_cr_in_value", get(b"/orders", b"X-A: a\rX-B: b\r\n"), [400], "malformed_request", []),
    ("space_in_header_name", get(b"/orders", b"X A: a\r\n"), [400], "malformed_request", []),
    ("space_before_colon", get(b"/orders", b"Host : evil\r\n"), [400], "malformed_request", []),
    ("nul_in_header_name", get(b"/orders", b"X\x00A: a\r\n"), [400], "malformed_request", []),
    ("nul_in_header_value", get(b"/orders", b"X-A: a\x00b\r\n"), [400], "malformed_request", []),
    ("garbage_request_line", b"GARBAGE\r\n\r\n", [400], "malformed_request", []),
    (
        "control_char_in_header_value",
        get(b"/orders", b"X-A: a\x01b\r\n"),
        [400],
        "malformed_request",
        [],
    ),
    ("del_in_header_value", get(b"/orders", b"X-A: a\x7fb\r\n"), [400], "malformed_request", []),
    ("space_in_target", b"GET /ord ers HTTP/1.1\r\n" + H + b"\r\n", [400], "malformed_request", []),
    (
        "oversized_request_line",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n" + H + b"\r\n",
        [431],
        "request_head_too_large",
        [],
    ),
    (
        "oversized_headers",
        get(b"/orders", *[b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70)]),
        [431],
        "request_head_too_large",
        [],
    ),
    ("missing_host", b"GET /orders HTTP/1.1\r\n\r\n", [400], "malformed_request", []),
    ("two_hosts", get(b"/orders", b"Host: evil.example\r\n"), [400], "malformed_request", []),
    (
        "absolute_form_host_disagrees",
        b"GET http://localhost/orders HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        [400],
        "host_does_not_match_target",
        [],
    ),
    (
        "absolute_form_userinfo",
        b"GET http://user@localhost/orders HTTP/1.1\r\n" + H + b"\r\n",
        [400],
        "bad_request_target",
        [],
    ),
    (
        "http_2_request_line",
        b"GET /orders HTTP/2.0\r\n" + H + b"\r\n",
        [505],
        "http_version_not_supported",
        [],
    ),
    (
        "connect_method",
        b"CONNECT localhost:443 HTTP/1.1\r\n" + H + b"\r\n",
        [405],
        "connect_not_supported",
        [],
    ),
    (
        "te_final_coding_not_chunked",
        b"POST /orders HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc",
        [400],
        "malformed_request",
        [],
    ),
    (
        "te_chunked_then_gzip",
        b"POST /orders HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        [400],
        "malformed_request",
        [],
    ),
    (
        "lower_case_method_dispatched_as_post_by_django",
        b"post /orders HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
        [400],
        "method_not_uppercase",
        [],
    ),
    ("tomcat_dotdot_semicolon", get(b"/orders/..;/admin"), [400], "path_parameters_refused", []),
    ("servlet_jsessionid", get(b"/admin;jsessionid=x/users"), [400], "path_parameters_refused", []),
    (
        "host_trailing_dots",
        b"GET /orders HTTP/1.1\r\nHost: localhost..\r\n\r\n",
        [400],
        "malformed_host",
        [],
    ),
    (
        "host_second_colon",
        b"GET /orders HTTP/1.1\r\nHost: localhost:1:2\r\n\r\n",
        [400],
        "malformed_host",
        [],
    ),
    ("overlong_utf8_dots", get(b"/%c0%ae%c0%ae/admin"), [400], "bad_request_target", []),
    # Allowed shapes, for contrast: these reach the upstream, normalized.
    (
        "empty_lines_before_the_request_line",
        b"\r\n\r\n" + get(b"/orders", CLOSE),
        [200],
        "allowed",
        [b"/orders"],
    ),
    (
        "absolute_form_agrees",
        b"GET http://localhost/orders?x=1 HTTP/1.1\r\n" + H + CLOSE + b"\r\n",
        [200],
        "allowed",
        [b"/orders?x=1"],
    ),
    (
        "pipelined_requests",
        get(b"/orders/1") + get(b"/admin") + get(b"/orders/2", CLOSE),
        [200, 403, 200],
        "allowed",
        [b"/orders/1", b"/orders/2"],
    ),
    (
        "request_in_a_body_is_only_a_body",
        b"POST /orders HTTP/1.1\r\n" + H + CLOSE + b"Content-Length: 32\r\n\r\n"
        b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
        [200],
        "allowed",
        [b"/orders"],
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "expected", "reason", "forwarded"),
    [a[1:] for a in ATTACKS],
    ids=[a[0] for a in ATTACKS],
)
async def test_http_attack(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: Pki,
    request_bytes: bytes,
    expected: list[int],
    reason: str,
    forwarded: list[bytes],
) -> None:
    proxy, upstream = await start_recording(nursery, tmp_path, pki)
    out, closed = await raw_exchange(proxy, request_bytes)
    assert statuses(out) == expected, out[:300]
    assert closed, "the proxy must close the connection"
    if expected[-1] >= 400:
        assert b"connection: close" in out.lower()
        body = json.loads(out.rsplit(b"\r\n\r\n", 1)[1])
        assert body["reason"] not in ("", None) and "request_id" in body
    await wait_until(lambda: len(proxy.decisions()) >= len(expected))
    assert proxy.decisions()[0]["reason"] == reason
    assert [r.target for r in upstream.requests] == forwarded
    if not forwarded:
        assert upstream.raw == b"", "the upstream saw bytes of a refused request"
    for r in upstream.requests:
        assert r.complete and (r.method, r.target) != (b"GET", b"/admin")
    if request_bytes.startswith(b"POST") and forwarded:
        assert upstream.requests[0].body.startswith(b"GET /admin")  # it stayed a body
    # The proxy is unharmed.
    assert (await curl(proxy, "/orders")).status == 200


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(nursery, tmp_path, pki)
    burst = b"".join(get(b"/orders/%d" % i) for i in range(20)) + get(b"/orders/last", CLOSE)
    out, closed = await raw_exchange(proxy, burst)
    assert statuses(out) == [200] * 21 and closed
    assert [r.target for r in upstream.requests] == [b"/orders/%d" % i for i in range(20)] + [
        b"/orders/last"
    ]
    await wait_until(lambda: len(proxy.decisions()) >= 21)
    assert len({d["peer_addr"] for d in proxy.decisions()}) == 1  # one connection


def _request_then_partial_head_then_close_notify(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(get() + b"GET /orders/2 HTTP/1.1\r\nHo")
        time.sleep(0.5)
        out = s.recv(65536)
        with contextlib.suppress(ssl.SSLError, OSError):
            s.unwrap()  # close_notify: the client is done sending
        time.sleep(0.3)
        return out


async def test_pipelined_partial_head_cut_by_eof_is_refused_and_logged(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """A request, then the start of a pipelined one, then end of stream: the second is
    a malformed request (400 and a decision line), not silently dropped between the
    requests as a client that simply left would be."""
    proxy, upstream = await start_recording(nursery, tmp_path, pki)
    out = await trio.to_thread.run_sync(
        _request_then_partial_head_then_close_notify, proxy.port, tls_client(pki)
    )
    assert statuses(out)[:1] == [200]
    await wait_until(lambda: len(proxy.decisions()) >= 2)
    first, second = proxy.decisions()[:2]
    assert (first["path"], first["status"]) == ("/orders", 200)
    assert (second["status"], second["reason"]) == (400, "malformed_request")
    assert [r.target for r in upstream.requests] == [b"/orders"]


async def test_body_error_after_forwarding_starts_aborts_the_upstream_request(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # The head and a good first chunk go upstream; a bad chunk arrives later. The client
    # gets 400 and the upstream's request ends incomplete: it is never a whole request.
    proxy, upstream = await start_recording(nursery, tmp_path, pki)
    head = b"POST /orders HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    out, closed = await raw_exchange(proxy, head, b"zz\r\n", pause=0.3)
    assert statuses(out) == [400] and closed
    await wait_until(lambda: len(proxy.decisions()) >= 1)
    assert proxy.decisions()[0]["reason"] == "malformed_request_body"
    await wait_until(lambda: upstream.requests)
    (seen,) = upstream.requests
    assert seen.body == b"hello" and not seen.complete


@pytest.mark.parametrize(
    ("head", "ok"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", False),
        (b"GET / HTTP/1.1\nHost: x\n\n", False),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: a\r\n b\r\n\r\n",
            False,
        ),
    ],
    ids=["plain", "obs_fold", "bare_lf", "obs_fold_in_trailer"],
)
def test_strict_head_parser_pins_h11_internals(head: bytes, ok: bool) -> None:
    # proxy.http1 hooks h11's private ReceiveBuffer (h11 is pinned below 0.17): this
    # fails loudly if an h11 release changes what the hook relies on.
    conn = new_server_connection(65536)
    conn.receive_data(head)
    try:
        while conn.next_event() not in (h11.NEED_DATA, h11.PAUSED):
            if conn.their_state is h11.DONE:
                break
    except h11.RemoteProtocolError as exc:
        assert not ok and exc.error_status_hint == 400
        return
    assert ok
