"""Soak: mixed valid and hostile traffic against a real spiffe-pep for a set time, while
its RSS and open file descriptors are sampled; fails if either keeps growing after the
warm-up, or if any exchange (valid or hostile) did not end as expected.

    python -m loadtests.soak [--duration 600] [--warmup 60] [--interval 5] [--json out.json]

It starts its own demo upstream and spiffe-pep (one worker under the supervisor, so all
traffic goes through one process; decision log on) on 127.0.0.1 with fresh certificates,
and runs ``--concurrency`` client tasks that take turns at:
valid keep-alive requests, a handshake per request, a denied SVID (403), an upstream that
is down (502), an untrusted CA and an expired SVID (handshake refused), request smuggling
(CL+TE, 400), plain HTTP and TLS garbage on the TLS port, a client that vanishes
mid-upload, an idle connection dropped after its handshake, a client that stops reading
a large response (cut by ``client_write``), a body trickled a byte at a time (408 by
``min_body_rate``) and a socket that never starts TLS (closed by the handshake timeout).
Every loop is bounded by the duration. Not part of the test suite
(tests/test_loadtests.py only runs it for seconds).

Verdict: the samples after the warm-up are cut in thirds; RSS "keeps growing" when the
median of the last third exceeds the first third's by more than max(8 MiB, 10%), file
descriptors when by more than 16. Exit status 1 on growth or on any exchange that did
not end as expected.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import ssl
import statistics
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from loadtests import compare
from loadtests.compare import CLIENT_ID, Lab, free_port, rss_bytes, tree_pids
from loadtests.loadgen import read_response
from proxy.devcerts import issue_ca, issue_svid

DENIED_ID = "spiffe://example.org/ns/dev/sa/denied"
RSS_TOLERANCE = 8 * 1024 * 1024
FD_TOLERANCE = 16


def write_pki(d: Path) -> None:
    """compare's CA, server and client SVIDs, plus the ones hostile traffic presents."""
    inter = compare.write_pki(d)
    now = dt.datetime.now(dt.UTC)
    certs = {
        "denied": issue_svid(inter, [DENIED_ID]),
        "untrusted": issue_svid(issue_ca("example.org", common_name="rogue"), [CLIENT_ID]),
        "expired": issue_svid(
            inter,
            [CLIENT_ID],
            not_before=now - dt.timedelta(days=2),
            not_after=now - dt.timedelta(days=1),
        ),
    }
    for name, issued in certs.items():
        (d / f"{name}.pem").write_bytes(issued.chain_pem())
        (d / f"{name}_key.pem").write_bytes(issued.key_pem())


def write_config(d: Path, port: int, upstream: int) -> Path:
    (d / "policy.yaml").write_text(
        textwrap.dedent("""\
        routes:
          - name: down
            match: {path_prefix: /down}
            upstream: down
            allow: ["spiffe://example.org/ns/prod/*"]
          - name: all
            match: {path_prefix: /}
            upstream: app
            allow: ["spiffe://example.org/ns/prod/*"]
        """)
    )
    return compare.pep_config(
        d,
        "spiffe-pep",
        port,
        {"app": upstream, "down": free_port()},  # nothing listens on "down"
        workers=1,
        extra="timeouts: {idle: 5s, handshake: 2s, request_head: 2s, client_write: 2s}\n"
        "limits: {min_body_rate: 1KiB}\n",
    )


@dataclass
class Tally:
    ok: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    last_error: dict[str, str] = field(default_factory=dict)


class Traffic:
    """The client side: one coroutine per kind of traffic; each checks its own outcome."""

    def __init__(self, d: Path, port: int) -> None:
        self.port = port
        self.contexts = {name: self._ctx(d, name) for name in ("client", "denied", "untrusted")}
        self.contexts["expired"] = self._ctx(d, "expired")
        self.tally = Tally()

    @staticmethod
    def _ctx(d: Path, cert: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(d / "root.pem"))
        ctx.load_cert_chain(d / f"{cert}.pem", d / f"{cert}_key.pem")
        return ctx

    async def _tls(self, cert: str) -> trio.SSLStream[trio.SocketStream]:
        sock = await trio.open_tcp_stream("127.0.0.1", self.port)
        stream = trio.SSLStream(sock, self.contexts[cert], server_hostname="localhost")
        await stream.do_handshake()
        return stream

    @staticmethod
    async def _response(stream: trio.abc.Stream, buf: bytearray | None = None) -> int:
        """The status of one response; ``buf`` keeps what followed it on a kept connection."""
        status, _ = await read_response(stream, bytearray() if buf is None else buf)
        return status

    async def keepalive(self) -> bool:
        stream = await self._tls("client")
        buf = bytearray()
        try:
            for _ in range(20):
                await stream.send_all(b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n")
                if await self._response(stream, buf) != 200:
                    return False
        finally:
            await trio.aclose_forcefully(stream)
        return True

    async def _one(self, cert: str, request: bytes, expect: int) -> bool:
        stream = await self._tls(cert)
        try:
            await stream.send_all(request)
            return await self._response(stream) == expect
        finally:
            await trio.aclose_forcefully(stream)

    async def handshake(self) -> bool:
        req = b"GET /orders HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        return await self._one("client", req, 200)

    async def denied(self) -> bool:
        return await self._one("denied", b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n", 403)

    async def upstream_down(self) -> bool:
        return await self._one("client", b"GET /down HTTP/1.1\r\nHost: localhost\r\n\r\n", 502)

    async def smuggling(self) -> bool:
        req = (
            b"POST /orders HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        return await self._one("client", req, 400)

    async def _refused(self, cert: str) -> bool:
        try:
            stream = await self._tls(cert)
            await stream.send_all(b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await self._response(stream)
        except (ssl.SSLError, trio.BrokenResourceError, ConnectionError, OSError):
            return True
        return False  # it was served

    async def untrusted(self) -> bool:
        return await self._refused("untrusted")

    async def expired(self) -> bool:
        return await self._refused("expired")

    async def _raw(self, data: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        try:
            await stream.send_all(data)
            out = b""
            with trio.move_on_after(5):
                while chunk := await stream.receive_some(65536):
                    out += chunk
            return out
        finally:
            await stream.aclose()

    async def plain_http(self) -> bool:
        out = await self._raw(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return out.startswith(b"HTTP/1.1 400 ")

    async def garbage(self) -> bool:
        return b"HTTP/" not in await self._raw(b"\x16\x03\x01\xff\xff" + os.urandom(300))

    async def vanish(self) -> bool:
        stream = await self._tls("client")
        await stream.send_all(
            b"POST /orders HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n"
            + b"x" * 4000
        )
        await trio.aclose_forcefully(stream)
        return True

    async def idle(self) -> bool:
        stream = await self._tls("client")
        await trio.sleep(0.5)
        await trio.aclose_forcefully(stream)
        return True

    async def slow_reader(self) -> bool:
        """Asks for 16 MiB and reads nothing: the proxy must cut it (client_write)."""
        size = 16 * 2**20
        stream = await self._tls("client")
        got = 0
        try:
            await stream.send_all(b"GET /bytes/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size)
            await trio.sleep(3)
            with trio.move_on_after(10):
                while chunk := await stream.receive_some(65536):
                    got += len(chunk)
        except (ssl.SSLError, trio.BrokenResourceError, OSError):
            pass  # cut without close_notify: what a truncated response looks like
        finally:
            await trio.aclose_forcefully(stream)
        return got < size

    async def trickle(self) -> bool:
        """A body dripped a byte every 0.5 s: 408 from the minimum body rate."""
        stream = await self._tls("client")

        async def drip() -> None:
            with contextlib.suppress(trio.BrokenResourceError, ssl.SSLError, OSError):
                for _ in range(30):
                    await stream.send_all(b"x")
                    await trio.sleep(0.5)

        try:
            await stream.send_all(
                b"POST /orders HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n"
            )
            async with trio.open_nursery() as n:
                n.start_soon(drip)
                status = await self._response(stream)
                n.cancel_scope.cancel()
            return status == 408
        finally:
            await trio.aclose_forcefully(stream)

    async def pre_tls(self) -> bool:
        """A socket that never starts TLS: closed by the handshake timeout."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        try:
            with trio.move_on_after(8) as scope:
                data = await stream.receive_some(1)
            return not scope.cancelled_caught and data == b""
        finally:
            await stream.aclose()

    def kinds(self) -> list[Callable[[], Awaitable[bool]]]:
        # Valid traffic is the bulk; every hostile kind comes round often.
        return [
            self.keepalive,
            self.keepalive,
            self.handshake,
            self.denied,
            self.upstream_down,
            self.untrusted,
            self.expired,
            self.smuggling,
            self.plain_http,
            self.garbage,
            self.vanish,
            self.idle,
            self.keepalive,
            self.slow_reader,
            self.trickle,
            self.pre_tls,
        ]

    async def client(self, offset: int, deadline: float) -> None:
        kinds = self.kinds()
        i = offset
        while time.monotonic() < deadline:
            kind = kinds[i % len(kinds)]
            i += 1
            name = kind.__name__
            try:
                with trio.fail_after(15):
                    good = await kind()
            except (trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError, OSError) as exc:
                good = False
                self.tally.last_error[name] = f"{type(exc).__name__}: {exc}"
            except ConnectionError as exc:
                good = False
                self.tally.last_error[name] = str(exc)
            (self.tally.ok if good else self.tally.unexpected)[name] += 1


def fd_count(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def verdict(samples: list[dict[str, float]], warmup: float) -> dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup]
    if len(after) < 6:
        return {"judged": False, "why": f"only {len(after)} samples after the warm-up"}
    third = len(after) // 3
    first, last = after[:third], after[-third:]
    out: dict[str, Any] = {"judged": True}
    for key, tolerance in (
        ("rss", lambda base: max(RSS_TOLERANCE, 0.10 * base)),
        ("fds", lambda base: FD_TOLERANCE),
    ):
        base = statistics.median(s[key] for s in first)
        end = statistics.median(s[key] for s in last)
        out[key] = {
            "first_third_median": base,
            "last_third_median": end,
            "growth": end - base,
            "tolerance": tolerance(base),
            "growing": end - base > tolerance(base),
        }
    return out


async def soak(args: argparse.Namespace, d: Path, lab: Lab) -> dict[str, Any]:
    up, port = free_port(), free_port()
    lab.start([sys.executable, "-m", "proxy.demo_upstream", "--port", str(up)], up, "demo-upstream")
    cfg = write_config(d, port, up)
    pep = lab.start([sys.executable, "-m", "proxy", "run", "-c", str(cfg)], port, "spiffe-pep")
    traffic = Traffic(d, port)
    samples: list[dict[str, float]] = []
    t0 = time.monotonic()
    deadline = t0 + args.duration

    async def sampler() -> None:
        while True:
            now = time.monotonic()
            sample = {
                "t": round(now - t0, 1),
                "rss": rss_bytes(pep.pid),
                "fds": fd_count(pep.pid),
                "ok": sum(traffic.tally.ok.values()),
                "unexpected": sum(traffic.tally.unexpected.values()),
            }
            samples.append(sample)
            print(
                f"{sample['t']:7.1f}s  rss {sample['rss'] / 2**20:7.1f} MiB  fds {sample['fds']:4d}"
                f"  exchanges {sample['ok']:7d}  unexpected {sample['unexpected']}",
                flush=True,
            )
            if now >= deadline:
                return
            await trio.sleep(min(args.interval, max(0.0, deadline - now)))

    async with trio.open_nursery() as n:
        n.start_soon(sampler)
        for i in range(args.concurrency):
            n.start_soon(traffic.client, i * 3, deadline)
    if pep.poll() is not None:
        raise SystemExit(f"spiffe-pep exited with {pep.returncode} during the soak")
    return {
        "duration": args.duration,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "ok": dict(traffic.tally.ok),
        "unexpected": dict(traffic.tally.unexpected),
        "last_error": traffic.tally.last_error,
        "samples": samples,
        "verdict": verdict(samples, args.warmup),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds not judged (default 60)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    if args.warmup >= args.duration:
        ap.error("--warmup must be shorter than --duration")
    with tempfile.TemporaryDirectory(prefix="spiffe-pep-soak-") as tmp:
        d = Path(tmp)
        write_pki(d)
        lab = Lab(d)
        try:
            result = trio.run(soak, args, d, lab)
        finally:
            lab.stop_all()
    v = result["verdict"]
    print(f"\nexchanges as expected: {result['ok']}")
    print(f"unexpected outcomes:   {result['unexpected'] or 'none'}")
    for kind, error in result["last_error"].items():
        print(f"  last error of {kind}: {error}")
    if v["judged"]:
        for key, unit, scale in (("rss", "MiB", 2**20), ("fds", "", 1)):
            r = v[key]
            base, end = r["first_third_median"] / scale, r["last_third_median"] / scale
            print(
                f"{key}: {base:.1f} -> {end:.1f} {unit} (tolerance {r['tolerance'] / scale:.1f}): "
                + ("GROWING" if r["growing"] else "flat")
            )
    else:
        print(f"growth not judged: {v['why']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    growing = v["judged"] and (v["rss"]["growing"] or v["fds"]["growing"])
    return 1 if growing or result["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
