"""An mTLS HTTP/1.1 load generator for spiffe-pep and its peers.

    python -m loadtests https://127.0.0.1:8443/hello --cert c.pem --key k.pem --cacert ca.pem \\
        -c 32 -d 10 [--mode keepalive|handshake] [--rate 2000] [--processes 2] [--json out.json]

Each process runs ``concurrency / processes`` connections on trio with the stdlib TLS
client; ``--mode handshake`` makes a new connection and a full mTLS handshake for every
request. With ``--rate`` requests are paced to that total rate and latency is measured from
when each request was due, not when it was sent, so a server that falls behind cannot hide
its queueing (coordinated omission). Progress prints every second; at the end: requests/s,
latency p50/p90/p99/max, errors by kind, status codes, and a JSON file on request.
Only loopback targets are accepted, and every run is bounded by a duration or a count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass
class Options:
    url: str
    cert: str | None
    key: str | None
    cacert: str | None
    concurrency: int
    duration: float | None
    requests: int | None
    mode: str
    rate: float | None
    processes: int
    timeout: float = 10.0


WARM_UP_ERROR = "warm_up_connect"  # a keep-alive connection not opened before the clock


@dataclass
class Result:
    latencies_us: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def _ssl_context(o: Options) -> ssl.SSLContext:
    ctx = (
        ssl.create_default_context(cafile=o.cacert)
        if o.cacert
        else ssl._create_unverified_context()
    )
    if o.cert:
        ctx.load_cert_chain(o.cert, o.key)
    return ctx


async def read_response(stream: trio.abc.Stream, buf: bytearray) -> tuple[int, bool]:
    """Read one response; return (status, keep-alive). ``buf`` keeps leftover bytes."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    version, status = head[0].split(" ", 2)[:2]
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    keep = headers.get("connection") != "close" and not (
        version == "HTTP/1.0" and headers.get("connection") != "keep-alive"
    )
    if "content-length" in headers:
        need = int(headers["content-length"])
        while len(buf) < need:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            buf += chunk
        del buf[:need]
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            while (i := buf.find(b"\r\n")) < 0:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError("closed inside a chunk")
                buf += chunk
            size = int(bytes(buf[:i]).split(b";")[0], 16)
            while len(buf) < i + 2 + size + 2:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError("closed inside a chunk")
                buf += chunk
            del buf[: i + 2 + size + 2]
            if size == 0:
                break
    else:
        while await stream.receive_some(65536):
            pass
        keep = False
    return int(status), keep


def _request(o: Options) -> bytes:
    parts = urlsplit(o.url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn_header = "close" if o.mode == "handshake" else "keep-alive"
    return (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: {conn_header}\r\n"
        "User-Agent: spiffe-pep-loadgen\r\n\r\n"
    ).encode()


async def _worker(
    o: Options,
    ctx: ssl.SSLContext,
    result: Result,
    deadline: float,
    budget: list[int],
    interval: float | None,
    offset: float,
    counter: Any,
    stream: trio.SSLStream[trio.SocketStream] | None = None,
) -> None:
    """Requests on one connection until ``deadline`` or the budget; ``stream``: the
    connection opened before the measurement (keep-alive mode), else opened here."""
    parts = urlsplit(o.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    request = _request(o)
    buf = bytearray()
    due = time.perf_counter() + offset
    while True:
        now = time.perf_counter()
        if now >= deadline or (budget[0] <= 0):
            break
        budget[0] -= 1
        if interval is not None:
            if due > now:
                await trio.sleep(due - now)
            start = due
            due += interval
        else:
            start = time.perf_counter()
        try:
            with trio.fail_after(o.timeout):
                if stream is None:
                    stream = await _open_stream(host, port, ctx)
                    buf.clear()
                await stream.send_all(request)
                status, keep = await read_response(stream, buf)
            result.latencies_us.append((time.perf_counter() - start) * 1e6)
            key = str(status)
            result.statuses[key] = result.statuses.get(key, 0) + 1
            if not 200 <= status < 400:
                result.error(f"status_{status}")
            counter.value += 1
            if not keep or o.mode == "handshake":
                await _close(stream)
                stream = None
        except trio.TooSlowError:
            result.error("timeout")
            await _drop(stream)
            stream = None
        except ssl.SSLError as exc:
            result.error(f"tls_{exc.reason or 'error'}".lower())
            await _drop(stream)
            stream = None
        except (trio.BrokenResourceError, ConnectionError, OSError) as exc:
            result.error("connect_error" if stream is None else "connection_broken")
            del exc
            await _drop(stream)
            stream = None
    if stream is not None:
        await _close(stream)


async def _open_stream(
    host: str, port: int, ctx: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    """A TCP connection and its mTLS handshake; closed again if the handshake fails."""
    stream = trio.SSLStream(await trio.open_tcp_stream(host, port), ctx, server_hostname=host)
    try:
        await stream.do_handshake()
    except BaseException:
        await _drop(stream)
        raise
    return stream


async def _connect(
    o: Options,
    ctx: ssl.SSLContext,
    streams: list[trio.SSLStream[trio.SocketStream] | None],
    i: int,
) -> None:
    """Open ``streams[i]`` and send one request on it, not counted; on failure it stays
    None and the worker tries again, counting the error.

    The request is there for the server's side of the handshake: in TLS 1.3 the client
    is done with its handshake before the server has read, let alone verified, the
    client certificate, so without it the server would still be verifying 32 client
    certificates when the clock starts (for spiffe-pep 20-30 ms of work, the largest
    latencies of a run at a fixed rate)."""
    parts = urlsplit(o.url)
    stream = None
    with contextlib.suppress(
        trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError, OSError, ValueError
    ):
        with trio.fail_after(o.timeout):
            stream = await _open_stream(parts.hostname or "127.0.0.1", parts.port or 443, ctx)
            await stream.send_all(_request(o))
            _status, keep = await read_response(stream, bytearray())
            if keep:
                streams[i], stream = stream, None
    await _drop(stream)


async def _close(stream: trio.SSLStream[trio.SocketStream]) -> None:
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, OSError, ssl.SSLError),
    ):
        await stream.aclose()  # sends close_notify


async def _drop(stream: trio.SSLStream[trio.SocketStream] | None) -> None:
    if stream is not None:
        with trio.move_on_after(0.5):
            with contextlib.suppress(Exception):
                await trio.aclose_forcefully(stream)


def _run_process(
    o: Options, index: int, share: int, requests: int | None, counter: Any, out: Any
) -> None:
    result = Result()
    ctx = _ssl_context(o)

    async def main() -> None:
        # Keep-alive mode measures requests on open connections: the connections are
        # opened (TCP, the mTLS handshake and one request each, see ``_connect``) before
        # the clock starts, so the first requests do not carry a handshake each, queued
        # behind 31 others (at a fixed rate that start-up burst was most of the p99).
        # --mode handshake measures those.
        streams: list[trio.SSLStream[trio.SocketStream] | None] = [None] * share
        if o.mode == "keepalive":
            async with trio.open_nursery() as warm:
                for i in range(share):
                    warm.start_soon(_connect, o, ctx, streams, i)
            # Said, not hidden: a connection that did not open now is opened inside the
            # measurement, its handshake counted as a keep-alive request's time.
            for _ in range(streams.count(None)):
                result.error(WARM_UP_ERROR)
        t0 = time.perf_counter()
        deadline = t0 + (o.duration if o.duration else 1e9)
        budget = [requests if requests is not None else 1 << 62]
        interval = None
        if o.rate:
            per_conn = o.rate / o.concurrency
            interval = 1.0 / per_conn
        async with trio.open_nursery() as n:
            for i in range(share):
                offset = (interval * (index * share + i) / o.concurrency) if interval else 0.0
                n.start_soon(
                    _worker, o, ctx, result, deadline, budget, interval, offset, counter, streams[i]
                )
        result.elapsed = time.perf_counter() - t0

    trio.run(main)
    out.send(result)
    out.close()


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    k = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def run(o: Options, progress: bool = True) -> dict[str, Any]:
    host = urlsplit(o.url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load {host!r}: only 127.0.0.1, ::1 and localhost")
    if o.duration is None and o.requests is None:
        raise SystemExit("give a duration (-d) or a request count (-n): every run is bounded")
    procs = max(1, min(o.processes, o.concurrency))
    counter = mp.get_context("fork").Value("q", 0, lock=False)
    shares = [
        o.concurrency // procs + (1 if i < o.concurrency % procs else 0) for i in range(procs)
    ]
    reqs = (
        [None] * procs
        if o.requests is None
        else [o.requests // procs + (1 if i < o.requests % procs else 0) for i in range(procs)]
    )
    ctx = mp.get_context("fork")
    pipes, workers = [], []
    t0 = time.perf_counter()
    for i in range(procs):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_run_process, args=(o, i, shares[i], reqs[i], counter, send))
        p.start()
        pipes.append(recv)
        workers.append(p)
    last = 0
    while any(p.is_alive() for p in workers) and not all(r.poll() for r in pipes):
        time.sleep(1.0 if progress else 0.2)
        if progress:
            done = counter.value
            print(
                f"  {time.perf_counter() - t0:6.1f}s  {done:>9} requests  {done - last:>7}/s",
                file=sys.stderr,
                flush=True,
            )
            last = done
    results = [r.recv() for r in pipes]
    for p in workers:
        p.join()
    latencies = sorted(x for r in results for x in r.latencies_us)
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    elapsed = max(r.elapsed for r in results)
    completed = len(latencies)
    return {
        "url": o.url,
        "mode": o.mode,
        "concurrency": o.concurrency,
        "processes": procs,
        "rate": o.rate,
        "completed": completed,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(completed / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            k: round(percentile(latencies, p) / 1000, 3)
            for k, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "errors": errors,
        "statuses": statuses,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--cert", help="client SVID (PEM, leaf then intermediates)")
    ap.add_argument("--key", help="client SVID key (PEM)")
    ap.add_argument("--cacert", help="CA bundle to verify the server (default: no check)")
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, help="seconds")
    ap.add_argument("-n", "--requests", type=int, help="total requests")
    ap.add_argument("--mode", choices=["keepalive", "handshake"], default="keepalive")
    ap.add_argument("--rate", type=float, help="fixed total rate, requests per second")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    o = Options(
        args.url,
        args.cert,
        args.key,
        args.cacert,
        args.concurrency,
        args.duration,
        args.requests,
        args.mode,
        args.rate,
        args.processes,
        args.timeout,
    )
    result = run(o)
    lat = result["latency_ms"]
    print(
        f"{result['completed']} requests in {result['elapsed_s']} s: "
        f"{result['requests_per_s']} requests/s ({o.mode}, c={o.concurrency}, "
        f"{result['processes']} processes)"
    )
    print(f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    print(f"statuses: {result['statuses']}  errors: {result['errors'] or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if not result["errors"] else 1
