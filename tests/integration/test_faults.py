"""Faults on both sides of the proxy, with real peers: an upstream that refuses, hangs or
resets mid-response; a client that vanishes mid-upload; TLS garbage and plain HTTP on the
TLS port; a thousand concurrent handshakes with bad certificates while valid clients keep
being served. Refused (502) and hanging (504) upstreams are in test_proxy.py.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import Pki
from tests.integration.harness import (
    ROOT,
    curl,
    start,
    start_recording,
    tls_client,
    wait_until,
)


async def test_upstream_reset_mid_response_cuts_the_client_off_and_is_logged(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(nursery, tmp_path, pki)
    r = await curl(proxy, "/reset/1")
    # The head (200, Content-Length: 1000) was already sent: the client sees a short body
    # and an error (curl 18: partial file, or 56: receive failure), never a complete one.
    assert r.status == 200 and r.returncode in (18, 56), (r.returncode, r.stderr)
    assert r.body == b"0123456789"
    await wait_until(proxy.decisions, timeout=10)
    (rec,) = proxy.decisions()
    assert rec["decision"] == "allow" and rec["reason"] == "upstream_connection_broken"
    assert rec["upstream_status"] == 200 and rec["bytes_out"] == 10
    # The proxy and its pool are fine: the next request is served on a new connection.
    assert (await curl(proxy, "/orders")).status == 200
    assert [r.target for r in upstream.requests] == [b"/reset/1", b"/orders"]


def _truncated_tls_read(port: int, ctx: ssl.SSLContext) -> tuple[bytes, str]:
    """Read a response until the connection ends; how it ended."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as s,
    ):
        s.sendall(b"GET /reset/2 HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ssl.SSLEOFError:
            return data, "eof_without_close_notify"
        return data, "close_notify"


async def test_truncated_response_never_ends_with_close_notify(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # An HTTP/1.0 client reading to the end of the connection must be able to tell a cut
    # response from a whole one: TLS ends without close_notify.
    proxy, _ = await start_recording(nursery, tmp_path, pki)
    data, how = await trio.to_thread.run_sync(_truncated_tls_read, proxy.port, tls_client(pki))
    assert data.endswith(b"0123456789") and how == "eof_without_close_notify"


def _upload_then_vanish(port: int, ctx: ssl.SSLContext) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(b"POST /orders HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n")
    s.sendall(b"x" * 20000)
    time.sleep(0.3)  # the proxy forwards what it got
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # gone, mid-body, with a TCP reset


async def test_client_vanishing_mid_upload_aborts_the_upstream_request(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(nursery, tmp_path, pki)
    await trio.to_thread.run_sync(_upload_then_vanish, proxy.port, tls_client(pki))
    await wait_until(proxy.decisions, timeout=10)
    (rec,) = proxy.decisions()
    assert rec["reason"] == "client_gone" and 0 < rec["bytes_in"] < 1_000_000
    (seen,) = upstream.requests
    assert not seen.complete and len(seen.body) == rec["bytes_in"]  # aborted, not finished
    assert (await curl(proxy, "/orders")).status == 200


async def _send_raw_tcp(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    out = b""
    with trio.move_on_after(5):
        while chunk := await stream.receive_some(65536):
            out += chunk
    await stream.aclose()
    return out


async def test_plain_http_on_the_tls_port_gets_a_plain_400(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(nursery, tmp_path, pki)
    out = await _send_raw_tcp(proxy.port, b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"requires a client certificate" in out
    (event,) = [e for e in proxy.events() if e["event"] == "tls_handshake_failed"]
    assert event["reason"] == "tls_http_request"
    assert (await curl(proxy, "/orders")).status == 200


async def test_tls_garbage_is_refused_and_logged(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(nursery, tmp_path, pki)
    garbage = [
        b"\x16\x03\x01\xff\xff" + b"\x00" * 64,  # a handshake record with a huge length
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a ClientHello cut to nothing
        b"\x17\x03\x03\x00\x10" + b"A" * 16,  # application data before any handshake
        bytes(range(256)) * 4,
    ]
    for data in garbage:
        out = await _send_raw_tcp(proxy.port, data)
        assert b"HTTP/" not in out
    await wait_until(
        lambda: len([e for e in proxy.events() if e["event"] == "tls_handshake_failed"]) == 4,
        timeout=10,
    )
    assert proxy.decisions() == []
    assert (await curl(proxy, "/orders")).status == 200


async def test_thousand_bad_handshakes_do_not_disturb_valid_clients(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # One source address here, so the per-source handshake cap (tested on its own in
    # test_slow_peers.py) is lifted: this is about 1,000 handshakes that do complete.
    limits = "limits: {max_handshakes_per_source: 2000, max_handshakes: 2000}\n"
    proxy = await start(nursery, tmp_path, pki, timeouts=limits)
    report = tmp_path / "bad.json"
    # The project's load generator, in its own processes: 1,000 connections at once, each
    # a full handshake with an SVID from a CA the proxy does not trust.
    bad = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loadtests",
            f"https://localhost:{proxy.port}/orders",
            "--cert",
            str(pki.dir / "untrusted.pem"),
            "--key",
            str(pki.dir / "untrusted_key.pem"),
            "--cacert",
            pki.bundle,
            "-c",
            "1000",
            "-n",
            "1000",
            "--mode",
            "handshake",
            "--processes",
            "2",
            "--timeout",
            "60",
            "--json",
            str(report),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    statuses: list[int] = []

    async def valid_client() -> None:
        while bad.poll() is None or len(statuses) < 6:
            statuses.append((await curl(proxy, "/orders")).status)

    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                for _ in range(3):
                    n.start_soon(valid_client)
    finally:
        if bad.poll() is None:
            bad.kill()
        bad.wait()
    assert statuses and set(statuses) == {200}, statuses
    result = json.loads(report.read_text())
    assert sum(result["errors"].values()) == 1000 and not result["statuses"]
    refused = [e for e in proxy.events() if e["event"] == "tls_handshake_failed"]
    assert len(refused) == 1000
    assert {e["reason"] for e in refused} == {"chain_not_verified"}


async def test_a_bug_while_serving_is_answered_500_and_logged(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the rewrite stage fails as a bug would. The client still gets an
    # answer, the decision log a line, the event log the traceback; the proxy lives on.
    from proxy import rewrite

    real = rewrite.upstream_head

    def broken(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.path == "/bug":
            raise RuntimeError("injected fault")
        return real(request, *args, **kwargs)

    monkeypatch.setattr(rewrite, "upstream_head", broken)
    proxy, upstream = await start_recording(nursery, tmp_path, pki)
    r = await curl(proxy, "/bug")
    assert r.status == 500 and r.json()["error"] == "internal_error"
    await wait_until(proxy.decisions)
    (line,) = proxy.decisions()
    assert (line["decision"], line["status"], line["reason"]) == ("allow", 500, "internal_error")
    (event,) = [e for e in proxy.events() if e["event"] == "internal_error"]
    assert "injected fault" in event["traceback"] and event["request_id"] == line["request_id"]
    assert upstream.requests == []
    assert (await curl(proxy, "/orders")).status == 200


async def test_no_decision_line_says_allow_with_status_0(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # A client that sends an allowed request and vanishes before the answer: the line
    # says what happened (499, client_gone), not "allow" with status 0.
    proxy, _ = await start_recording(nursery, tmp_path, pki)
    ctx = tls_client(pki, "client")

    def send_and_vanish() -> None:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"POST /orders HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nab")
            time.sleep(0.3)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    await trio.to_thread.run_sync(send_and_vanish)
    await wait_until(proxy.decisions)
    (line,) = proxy.decisions()
    assert line["reason"] == "client_gone" and line["status"] == 499
