"""Peers that hold slots: clients that stop reading, bodies trickled a byte at a time,
sockets that never start TLS, and connections kept alive for ever. Each holds nothing
for longer than its limit, and a legitimate client is served meanwhile."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import trio

from tests.conftest import Pki
from tests.integration.harness import (
    curl,
    raw_exchange,
    start,
    statuses,
    tls_client,
    wait_until,
)


def _gauge(metrics: str, name: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


async def test_clients_that_stop_reading_are_cut_off(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(nursery, tmp_path, pki, timeouts="timeouts: {client_write: 1s}\n")
    ctx = tls_client(pki)
    stalled: list[ssl.SSLSocket] = []

    def stall() -> None:
        s = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5),
            server_hostname="localhost",
        )
        stalled.append(s)
        s.sendall(b"GET /bytes/33554432 HTTP/1.1\r\nHost: localhost\r\n\r\n")

    try:
        for _ in range(20):  # each asks for 32 MB and reads nothing
            await trio.to_thread.run_sync(stall)
        # A new client is served while they exist.
        assert (await curl(proxy, "/orders")).status == 200
        # Within the write timeout (plus slack) every stalled one is cut and logged.
        await wait_until(
            lambda: sum(d["reason"] == "client_write_timeout" for d in proxy.decisions()) == 20,
            timeout=10,
        )
        await wait_until(lambda: proxy.rt.open_connections == 0, timeout=5)
    finally:
        for s in stalled:
            s.close()
    lines = [d for d in proxy.decisions() if d["reason"] == "client_write_timeout"]
    assert {d["status"] for d in lines} == {200}  # the head went out; the body was cut
    assert all(0 < d["bytes_out"] < 33554432 for d in lines)
    assert _gauge(await proxy.metrics(), "spiffe_pep_open_connections") == 0


async def test_trickled_body_is_cut_with_408(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # One byte every 0.3 s resets no deadline: with a 1 s grace and 1 KiB/s minimum the
    # body is cut after about a second, long before the 60 s idle timeout.
    proxy = await start(
        nursery,
        tmp_path,
        pki,
        timeouts="timeouts: {request_head: 1s}\nlimits: {min_body_rate: 1KiB}\n",
    )
    head = b"POST /orders HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n"
    t0 = time.monotonic()
    out, closed = await raw_exchange(proxy, head, *[b"x"] * 12, pause=0.3)
    assert statuses(out) == [408] and closed
    assert time.monotonic() - t0 < 6
    await wait_until(proxy.decisions)
    assert proxy.decisions()[-1]["reason"] == "request_body_timeout"


async def test_fast_large_upload_is_not_cut_by_the_rate_rule(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(
        nursery,
        tmp_path,
        pki,
        timeouts="timeouts: {request_head: 1s}\nlimits: {min_body_rate: 1KiB}\n",
    )
    body = tmp_path / "body"
    body.write_bytes(b"x" * 20_000_000)
    r = await curl(proxy, "/upload", "--data-binary", f"@{body}")
    assert r.status == 200 and r.json()["body_bytes"] == 20_000_000


def _idle_sockets(port: int, sources: list[str]) -> list[socket.socket]:
    out = []
    for source in sources:
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        out.append(s)
    return out


async def test_pre_tls_sockets_from_one_address_cannot_lock_out_others(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # 20 sockets from 127.0.0.2 that never send a byte, with a 10 s handshake timeout
    # and room for 10 connections in all: a client from 127.0.0.1 is served at once.
    limits = "limits: {max_connections: 10, max_handshakes: 8, max_handshakes_per_source: 5}\n"
    proxy = await start(nursery, tmp_path, pki, timeouts="timeouts: {handshake: 10s}\n" + limits)
    idle = _idle_sockets(proxy.port, ["127.0.0.2"] * 20)
    try:
        await wait_until(lambda: proxy.rt.handshakes == 5)
        t0 = time.monotonic()
        assert (await curl(proxy, "/orders")).status == 200
        assert time.monotonic() - t0 < 3
        metrics = await proxy.metrics()
        assert (
            'spiffe_pep_handshakes_refused_total{limit="max_handshakes_per_source"} 15.0' in metrics
        )
    finally:
        for s in idle:
            s.close()


async def test_handshakes_in_flight_have_a_global_cap(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    limits = "limits: {max_handshakes: 4, max_handshakes_per_source: 2}\n"
    proxy = await start(nursery, tmp_path, pki, timeouts="timeouts: {handshake: 10s}\n" + limits)
    idle = _idle_sockets(proxy.port, [f"127.0.0.{i}" for i in range(2, 12)])
    try:
        await wait_until(lambda: proxy.rt.handshakes == 4)
        with trio.fail_after(5):
            while 'limit="max_handshakes"} 6.0' not in await proxy.metrics():
                await trio.sleep(0.05)
    finally:
        for s in idle:
            s.close()
    # Once they are gone, handshakes are admitted again.
    await wait_until(lambda: proxy.rt.handshakes == 0)
    assert (await curl(proxy, "/orders")).status == 200


async def test_max_connection_age_closes_after_the_request_in_progress(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(nursery, tmp_path, pki, timeouts="timeouts: {max_connection_age: 1s}\n")
    get = b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n"
    out, closed = await raw_exchange(proxy, get, get, pause=1.3)
    assert statuses(out) == [200, 200] and closed
    first, second = out.split(b"HTTP/1.1 ")[1:]
    assert b"connection: close" not in first.lower()
    assert b"connection: close" in second.lower()


async def test_sockets_that_never_finish_tls_are_cut_at_the_handshake_timeout(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # One sends nothing, one half a ClientHello: each is closed once the 1 s handshake
    # timeout passed (checked by the deadline sweeper, within a tick), and logged.
    proxy = await start(nursery, tmp_path, pki, timeouts="timeouts: {handshake: 1s}\n")
    silent, partial = _idle_sockets(proxy.port, ["127.0.0.1", "127.0.0.1"])
    partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    t0 = time.monotonic()

    def closed_after(s: socket.socket) -> float:
        s.settimeout(10)
        with s:
            assert s.recv(4096) == b""
        return time.monotonic() - t0

    for s in (silent, partial):
        assert 0.8 < await trio.to_thread.run_sync(closed_after, s) < 3
    await wait_until(
        lambda: sum(e.get("reason") == "handshake_timeout" for e in proxy.events()) == 2
    )
    assert (await curl(proxy, "/orders")).status == 200


async def test_idle_keepalive_connection_is_closed_after_the_idle_timeout(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(nursery, tmp_path, pki, timeouts="timeouts: {idle: 1s}\n")
    ctx = tls_client(pki)

    def served_then_closed() -> tuple[bytes, float]:
        with ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10),
            server_hostname="localhost",
        ) as s:
            s.sendall(b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n")
            first = s.recv(65536)
            t0 = time.monotonic()
            while s.recv(65536):  # the rest of the response, then the close
                pass
            return first, time.monotonic() - t0

    first, idle_for = await trio.to_thread.run_sync(served_then_closed)
    assert first.startswith(b"HTTP/1.1 200")
    assert 0.8 < idle_for < 3
    await wait_until(lambda: proxy.rt.open_connections == 0)
    assert len(proxy.decisions()) == 1  # an idle close is no request: no line


async def test_endless_empty_lines_before_a_head_are_cut_at_request_head(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # Empty lines before a request line are skipped (RFC 9112 section 2.2), so they never
    # reach max_header_bytes; sent faster than the proxy reads them, the socket always
    # has bytes and the read never blocks. request_head must still end it.
    proxy = await start(nursery, tmp_path, pki, timeouts="timeouts: {request_head: 1s}\n")
    ctx = tls_client(pki)

    def flood() -> float:
        t0 = time.monotonic()
        with ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10),
            server_hostname="localhost",
        ) as s:
            try:
                while time.monotonic() - t0 < 8:
                    s.sendall(b"\r\n" * 8192)
            except (OSError, ssl.SSLError):
                pass
        return time.monotonic() - t0

    assert await trio.to_thread.run_sync(flood) < 4
    await wait_until(proxy.decisions)
    assert proxy.decisions()[-1]["reason"] == "request_head_timeout"
