"""Revocation reaches every kind of connection, with ``--workers 2``, soon after the
policy file is written: new connections, keep-alive connections already open and
WebSocket tunnels already open, whether the SPIFFE ID or the certificate's SHA-256 is
revoked. Real processes (a supervisor and two workers), real TLS, real file writes.
The bound asserted here is generous (the machine is shared); the figure to expect is
``python -m loadtests.revocation``'s (README, loadtests/RESULTS.md)."""

from __future__ import annotations

import functools
import hashlib
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from loadtests.loadgen import read_response
from proxy import demo_upstream
from tests.conftest import Pki
from tests.integration.harness import POLICY, free_port, tls_client, write_config
from tests.integration.test_websocket import EchoServer

BOUND = 2.0  # seconds from the write
GET = b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n"
WS_ROUTE = """\
routes:
  - name: ws
    match: {path_prefix: /ws}
    upstream: ws
    allow: ["spiffe://example.org/ns/prod/*"]
"""
UPGRADE = (
    b"GET /ws/chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
OPEN = 4  # keep-alive connections and tunnels per round: most likely on both workers


def _policy(ids: list[str], shas: list[str]) -> str:
    revoked = f"revoked: {{ids: {json.dumps(ids)}, cert_sha256: {json.dumps(shas)}}}\n"
    return revoked + POLICY.replace("routes:\n", WS_ROUTE, 1)


class Client:
    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port, self.ctx = port, ctx

    async def tls(self) -> trio.SSLStream[trio.SocketStream]:
        sock = await trio.open_tcp_stream("127.0.0.1", self.port)
        stream = trio.SSLStream(sock, self.ctx, server_hostname="localhost")
        await stream.do_handshake()
        return stream

    async def new_connection(self) -> int:
        stream = await self.tls()
        try:
            await stream.send_all(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            return (await read_response(stream, bytearray()))[0]
        finally:
            await trio.aclose_forcefully(stream)


async def _keepalive(client: Client, written: trio.Event, out: list[float]) -> None:
    """Served before the write; after it, requests back to back until refused."""
    stream = await client.tls()
    buf = bytearray()
    try:
        await stream.send_all(GET)
        assert (await read_response(stream, buf))[0] == 200
        await written.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            try:
                await stream.send_all(GET)
                status = (await read_response(stream, buf))[0]
            except (ConnectionError, trio.BrokenResourceError, ssl.SSLError):
                break
            if status == 403:
                break
            assert status == 200
            await trio.sleep(0.005)
        out.append(time.monotonic() - t0)
    finally:
        await trio.aclose_forcefully(stream)


async def _tunnel(client: Client, written: trio.Event, out: list[float]) -> None:
    stream = await client.tls()
    try:
        await stream.send_all(UPGRADE)
        head = await stream.receive_some(65536)
        assert head.startswith(b"HTTP/1.1 101 "), head
        await written.wait()
        t0 = time.monotonic()
        with trio.move_on_after(10):
            try:
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, ssl.SSLError):
                pass
        out.append(time.monotonic() - t0)
    finally:
        await trio.aclose_forcefully(stream)


async def _new_connections(client: Client, written: trio.Event, out: list[float]) -> None:
    """After the write, new connections until 5 in a row are refused (both workers)."""
    assert await client.new_connection() == 200
    await written.wait()
    t0 = time.monotonic()
    streak, first = 0, 0.0
    while time.monotonic() - t0 < 10 and streak < 5:
        if await client.new_connection() == 403:
            first = first if streak else time.monotonic()
            streak += 1
        else:
            streak = 0
    out.append(first - t0 if streak >= 5 else float("inf"))


def _sha256(pem: Path) -> str:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


async def test_revocation_reaches_every_connection_of_two_workers(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    app = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    echo = EchoServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, echo.handle, 0, host="127.0.0.1")
    )
    ws = listeners[0].socket.getsockname()[1]
    port = free_port()
    cfg = write_config(tmp_path, pki, app, listen=f"127.0.0.1:{port}", policy=_policy([], []))
    text = cfg.read_text().replace("  dead:", f'  ws: {{url: "http://127.0.0.1:{ws}"}}\n  dead:')
    cfg.write_text(text.replace("policy_watch: 200ms", "policy_watch: 50ms"))
    certs = {}
    for kind in ("new", "keepalive", "tunnel"):
        for by in ("id", "sha"):
            name = f"rev_{kind}_{by}"
            sid = f"spiffe://example.org/ns/prod/sa/{name.replace('_', '-')}"
            pem, _ = pki.svid(name, [sid])
            certs[kind, by] = (sid, _sha256(Path(pem)), Client(port, tls_client(pki, name)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        warm = certs["new", "id"][2]
        log = tmp_path / "decisions.jsonl"
        with trio.fail_after(30):  # both workers serve
            while True:
                try:
                    await warm.new_connection()
                except OSError:
                    await trio.sleep(0.1)
                    continue
                workers = {json.loads(x)["worker"] for x in log.read_text().splitlines()}
                if len(workers) == 2:
                    break
        await trio.sleep(0.5)  # their file watches are up
        ids: list[str] = []
        shas: list[str] = []
        for by in ("id", "sha"):
            written = trio.Event()
            got: dict[str, list[float]] = {"new": [], "keepalive": [], "tunnel": []}
            async with trio.open_nursery() as clients:
                clients.start_soon(_new_connections, certs["new", by][2], written, got["new"])
                for _ in range(OPEN):
                    clients.start_soon(
                        _keepalive, certs["keepalive", by][2], written, got["keepalive"]
                    )
                    clients.start_soon(_tunnel, certs["tunnel", by][2], written, got["tunnel"])
                await trio.sleep(1)  # all open and served
                for kind in got:
                    sid, sha, _ = certs[kind, by]
                    (ids if by == "id" else shas).append(sid if by == "id" else sha)
                (tmp_path / "policy.yaml").write_text(_policy(ids, shas))
                written.set()
            assert len(got["keepalive"]) == len(got["tunnel"]) == OPEN
            for kind, latencies in got.items():
                assert max(latencies) < BOUND, (by, kind, latencies)
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        reasons = {d["reason"] for d in lines}
        assert {"spiffe_id_revoked", "certificate_revoked"} <= reasons
        served = {
            d["worker"]
            for d in lines
            if d["reason"] in ("spiffe_id_revoked", "certificate_revoked")
        }
        assert len(served) == 2  # both workers refused
    finally:
        proc.terminate()
        await trio.to_thread.run_sync(proc.wait, 30)
