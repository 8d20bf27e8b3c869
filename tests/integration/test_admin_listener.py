"""The admin listener over real sockets: DNS rebinding (a foreign Host) gets 421 and
nothing of /status or /metrics; only GET and HEAD are answered."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from tests.conftest import Pki
from tests.integration.harness import Proxy, start


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    return await start(nursery, tmp_path, pki)


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


async def admin_request(proxy: Proxy, method: str, path: str, host: str | None) -> bytes:
    """One request with ``Connection: close``; the whole raw response."""
    head = f"{method} {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host else "")
    request = (head + "Connection: close\r\n\r\n").encode()
    assert proxy.admin_port is not None
    return await trio.to_thread.run_sync(_exchange, proxy.admin_port, request)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("path", ["/status", "/metrics", "/healthz", "/readyz", "/ui"])
@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "localhost.evil.example"])
async def test_dns_rebinding_host_gets_nothing(proxy: Proxy, path: str, host: str) -> None:
    r = await admin_request(proxy, "GET", path, host.format(port=proxy.admin_port))
    assert status_of(r) == 421
    body = r.split(b"\r\n\r\n", 1)[1]
    assert b"spiffe" not in body and b"version" not in body and b"status" not in body


async def test_request_without_host_gets_nothing(proxy: Proxy) -> None:
    assert proxy.admin_port is not None
    r = await trio.to_thread.run_sync(_exchange, proxy.admin_port, b"GET /status HTTP/1.0\r\n\r\n")
    assert status_of(r) == 421 and b"spiffe" not in r


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "localhost"]
)
async def test_loopback_hosts_are_answered(proxy: Proxy, host: str) -> None:
    r = await admin_request(proxy, "GET", "/status", host.format(port=proxy.admin_port))
    assert status_of(r) == 200 and b'"version"' in r


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
async def test_only_get_and_head_are_answered(proxy: Proxy, method: str) -> None:
    r = await admin_request(proxy, method, "/metrics", "127.0.0.1")
    head = r.split(b"\r\n\r\n", 1)[0].lower()
    assert status_of(r) == 405 and b"\r\nallow: get, head" in head
    assert b"spiffe_pep" not in r


async def test_head_is_answered_without_a_body(proxy: Proxy) -> None:
    r = await admin_request(proxy, "HEAD", "/metrics", "127.0.0.1")
    assert status_of(r) == 200 and r.endswith(b"\r\n\r\n")


async def test_configured_admin_hosts_are_answered(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(nursery, tmp_path, pki, extra="admin_hosts: [pep-admin.internal]\n")
    assert (
        status_of(await admin_request(proxy, "GET", "/healthz", "PEP-admin.internal:9901")) == 200
    )
    assert status_of(await admin_request(proxy, "GET", "/healthz", "evil.example")) == 421
