"""Revocation latency: from the write of the policy file with an identity under
``revoked`` until that identity's connections are refused, for each kind of connection,
against a real spiffe-pep with ``--workers 2``.

    python -m loadtests.revocation [--revocations 50] [--workers 2] [--json out.json]

It starts spiffe-pep (a supervisor and its workers) on 127.0.0.1 with fresh
certificates, an HTTP upstream and a WebSocket upstream (both in this process), and
for each kind of connection revokes ``--revocations`` identities, one at a time, each
with its own certificate, alternating ``revoked.ids`` (the SPIFFE ID) and
``revoked.cert_sha256`` (the leaf's SHA-256). The policy file is rewritten in place
(truncated, then written, as an editor saves), and the clock starts when the write
returns. Kinds:

- ``new``: a new connection (full mTLS handshake) and one request, again and again,
  until ``STREAK`` in a row are refused with 403: with two workers, that means both
  refuse. The latency is the first refusal of that streak.
- ``keepalive``: a connection opened and served before the write sends requests back to
  back until one is refused (403) or the connection is closed.
- ``tunnel``: a WebSocket tunnel opened before the write, until the proxy closes it.

Prints p50/p99/max per kind (and per way of revoking) and writes JSON on request. Every
loop is bounded (``--timeout`` per revocation); only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import ssl
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.serialization import Encoding

from loadtests.compare import Lab, free_port, pep_config, write_pki
from loadtests.loadgen import read_response
from proxy import demo_upstream
from proxy.devcerts import issue_svid

KINDS = ("new", "keepalive", "tunnel")
STREAK = 10  # new connections refused in a row before "refused everywhere"
PAUSE = 0.1  # between revocations
GET = b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n"
UPGRADE = (
    b"GET /ws/chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


@dataclass
class Subject:
    """One identity to revoke: its certificate's TLS context, ID and leaf SHA-256."""

    kind: str
    index: int
    spiffe_id: str
    sha256: str
    ctx: ssl.SSLContext

    @property
    def by(self) -> str:
        return "id" if self.index % 2 == 0 else "cert_sha256"


def subjects(d: Path, count: int) -> dict[str, list[Subject]]:
    inter = write_pki(d)
    out: dict[str, list[Subject]] = {}
    for kind in KINDS:
        for i in range(count):
            sid = f"spiffe://example.org/ns/bench/sa/{kind}-{i}"
            issued = issue_svid(inter, [sid])
            cert, key = d / f"{kind}-{i}.pem", d / f"{kind}-{i}_key.pem"
            cert.write_bytes(issued.chain_pem())
            key.write_bytes(issued.key_pem())
            ctx = ssl.create_default_context(cafile=str(d / "root.pem"))
            ctx.load_cert_chain(cert, key)
            sha = hashlib.sha256(issued.cert.public_bytes(Encoding.DER)).hexdigest()
            out.setdefault(kind, []).append(Subject(kind, i, sid, sha, ctx))
    return out


def policy(ids: list[str], shas: list[str]) -> str:
    return (
        "revoked:\n"
        f"  ids: {json.dumps(ids)}\n"
        f"  cert_sha256: {json.dumps(shas)}\n"
        + textwrap.dedent("""\
        routes:
          - name: ws
            match: {path_prefix: /ws}
            upstream: ws
            allow: ["spiffe://example.org/ns/bench/*"]
          - name: all
            match: {path_prefix: /}
            upstream: app
            allow: ["spiffe://example.org/*"]
        """)
    )


async def ws_upstream(stream: trio.SocketStream) -> None:
    """Answers an upgrade with 101, then echoes bytes until the proxy closes."""
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            head += chunk
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        while chunk := await stream.receive_some(65536):
            await stream.send_all(chunk)
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await stream.aclose()


class Bench:
    def __init__(self, d: Path, port: int, timeout: float) -> None:
        self.dir = d
        self.port = port
        self.timeout = timeout
        self.revoked_ids: list[str] = []
        self.revoked_shas: list[str] = []

    async def tls(self, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
        sock = await trio.open_tcp_stream("127.0.0.1", self.port)
        stream = trio.SSLStream(sock, ctx, server_hostname="localhost")
        await stream.do_handshake()
        return stream

    async def request(self, ctx: ssl.SSLContext) -> int:
        """One request on a new connection; its status."""
        stream = await self.tls(ctx)
        try:
            await stream.send_all(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            return (await read_response(stream, bytearray()))[0]
        finally:
            await trio.aclose_forcefully(stream)

    def revoke(self, s: Subject) -> float:
        """Write the policy with ``s`` revoked (in place); the time the write returned."""
        if s.by == "id":
            self.revoked_ids.append(s.spiffe_id)
        else:
            self.revoked_shas.append(s.sha256)
        with open(self.dir / "policy.yaml", "w") as f:
            f.write(policy(self.revoked_ids, self.revoked_shas))
        return time.perf_counter()

    async def new(self, s: Subject) -> float:
        if await self.request(s.ctx) != 200:
            raise RuntimeError(f"{s.spiffe_id} refused before its revocation")
        t0 = self.revoke(s)
        streak, first = 0, 0.0
        while time.perf_counter() - t0 < self.timeout:
            status = await self.request(s.ctx)
            if status == 403:
                if streak == 0:
                    first = time.perf_counter()
                streak += 1
                if streak >= STREAK:
                    return first - t0
            else:
                streak = 0
        raise TimeoutError

    async def keepalive(self, s: Subject) -> float:
        stream = await self.tls(s.ctx)
        buf = bytearray()
        try:
            await stream.send_all(GET)
            if (await read_response(stream, buf))[0] != 200:
                raise RuntimeError(f"{s.spiffe_id} refused before its revocation")
            t0 = self.revoke(s)
            while time.perf_counter() - t0 < self.timeout:
                try:
                    await stream.send_all(GET)
                    status = (await read_response(stream, buf))[0]
                except (ConnectionError, trio.BrokenResourceError, ssl.SSLError):
                    return time.perf_counter() - t0  # closed
                if status == 403:
                    return time.perf_counter() - t0
            raise TimeoutError
        finally:
            await trio.aclose_forcefully(stream)

    async def tunnel(self, s: Subject) -> float:
        stream = await self.tls(s.ctx)
        try:
            await stream.send_all(UPGRADE)
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            if not head.startswith(b"HTTP/1.1 101 "):
                raise RuntimeError(f"{s.spiffe_id}: no tunnel: {head[:40]!r}")
            t0 = self.revoke(s)
            with trio.move_on_after(self.timeout):
                try:
                    while await stream.receive_some(65536):
                        pass
                except (trio.BrokenResourceError, ssl.SSLError):
                    pass
                return time.perf_counter() - t0
            raise TimeoutError
        finally:
            await trio.aclose_forcefully(stream)

    async def workers_ready(self, ctx: ssl.SSLContext, workers: int, log: Path) -> None:
        """Until every worker served a request (its decision lines name it)."""
        with trio.fail_after(30):
            while True:
                for _ in range(4):
                    await self.request(ctx)
                pids = {json.loads(line)["worker"] for line in log.read_text().splitlines()}
                if len(pids) >= workers:
                    return
                await trio.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank (of 50 samples, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    if not ms:
        return {}
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }


async def measure(count: int, workers: int, timeout: float, d: Path, lab: Lab) -> dict[str, Any]:
    people = subjects(d, count)
    (d / "policy.yaml").write_text(policy([], []))
    port = free_port()
    async with trio.open_nursery() as nursery:
        app = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, ws_upstream, 0, host="127.0.0.1")
        )
        ws = listeners[0].socket.getsockname()[1]
        cfg = pep_config(d, "revocation", port, {"app": app, "ws": ws}, workers,
                         extra=f"event_log: {d}/events.jsonl\n")  # fmt: skip
        cmd = [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", str(workers)]
        await trio.to_thread.run_sync(functools.partial(lab.start, cmd, port, "revocation"))
        bench = Bench(d, port, timeout)
        warm = people["new"][0].ctx
        await bench.workers_ready(warm, workers, d / "revocation.jsonl")
        await trio.sleep(0.5)  # every worker's file watch is up
        results: dict[str, list[tuple[str, float]]] = {k: [] for k in KINDS}
        failures: dict[str, int] = dict.fromkeys(KINDS, 0)
        for kind in KINDS:
            for s in people[kind]:
                try:
                    latency = await getattr(bench, kind)(s)
                except TimeoutError:
                    failures[kind] += 1
                else:
                    results[kind].append((s.by, latency))
                print(f"{kind} {s.index + 1}/{count}", end="\r", file=sys.stderr, flush=True)
                await trio.sleep(PAUSE)
        print(file=sys.stderr)
        nursery.cancel_scope.cancel()
    reloads = [
        json.loads(line)
        for line in (d / "events.jsonl").read_text().splitlines()
        if '"policy_reload' in line
    ]
    return {
        "workers": workers,
        "revocations_per_kind": count,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "timeout_s": timeout,
        "kinds": {
            kind: {
                "all": summary([v for _, v in results[kind]]),
                "by_id": summary([v for by, v in results[kind] if by == "id"]),
                "by_cert_sha256": summary([v for by, v in results[kind] if by != "id"]),
                "timeouts": failures[kind],
            }
            for kind in KINDS
        },
        "reload_failures": sum(r["event"] == "policy_reload_failed" for r in reloads),
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"revocation latency, spiffe-pep --workers {r['workers']}, "
        f"{r['revocations_per_kind']} revocations per kind (from the policy write)",
        f"{'kind':<10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8} {'timeouts':>9}",
    ]
    for kind, k in r["kinds"].items():
        a = k["all"] or {"p50_ms": 0, "p99_ms": 0, "max_ms": 0, "mean_ms": 0}
        lines.append(
            f"{kind:<10} {a['p50_ms']:>8} {a['p99_ms']:>8} {a['max_ms']:>8} {a['mean_ms']:>8} "
            f"{k['timeouts']:>9}"
        )
    lines.append(f"policy reloads that failed (half-written file tried): {r['reload_failures']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.revocation", description=__doc__)
    parser.add_argument("--revocations", type=int, default=50, help="per kind (default 50)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="per revocation, seconds")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="spiffe-pep-revocation-"))
    lab = Lab(d)
    try:
        result = trio.run(measure, args.revocations, args.workers, args.timeout, d, lab)
    finally:
        lab.stop_all()
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not any(k["timeouts"] for k in result["kinds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
