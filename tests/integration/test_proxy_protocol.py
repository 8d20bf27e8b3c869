"""PROXY protocol on the listener: the balancer's client address reaches the decision log
and X-Forwarded-For; a connection without the header is refused."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import pytest
import trio

from proxy import demo_upstream
from proxy.proxyproto import v2_header
from tests.conftest import Pki
from tests.integration.harness import Proxy, curl, serve, tls_client, write_config


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    cfg = write_config(tmp_path, pki, upstream)
    cfg.write_text(cfg.read_text() + "proxy_protocol: true\n")
    return await serve(nursery, cfg, pki, upstream)


async def test_v1_from_curl(proxy: Proxy) -> None:
    # curl's --haproxy-protocol sends a v1 line with its own (loopback) addresses.
    r = await curl(proxy, "/orders", "--haproxy-protocol")
    assert r.status == 200
    rec = proxy.decisions()[-1]
    assert rec["peer_addr"].startswith("127.0.0.1:")


def _v2_request(port: int, ctx: ssl.SSLContext, header: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(header)
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET /orders HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out


async def test_v2_client_address_reaches_log_and_upstream(proxy: Proxy, pki: Pki) -> None:
    header = v2_header(("203.0.113.77", 40123), ("10.0.0.1", 8443))
    out = await trio.to_thread.run_sync(_v2_request, proxy.port, tls_client(pki), header)
    assert out.startswith(b"HTTP/1.1 200")
    seen = dict(json.loads(out.split(b"\r\n\r\n", 1)[1])["headers"])
    assert seen["x-forwarded-for"] == "203.0.113.77"
    assert proxy.decisions()[-1]["peer_addr"] == "203.0.113.77:40123"


async def test_missing_header_is_refused_and_logged(proxy: Proxy) -> None:
    r = await curl(proxy, "/orders")  # plain TLS, no PROXY header
    assert r.returncode != 0
    (event,) = [e for e in proxy.events() if e["event"] == "tls_handshake_failed"]
    assert event["reason"] == "proxy_protocol_invalid"
    assert (await curl(proxy, "/orders", "--haproxy-protocol")).status == 200
