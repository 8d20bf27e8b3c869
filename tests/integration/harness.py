"""Run the real proxy and the real demo upstream on loopback inside the test's nursery,
and talk to them with real clients: curl, and a raw TLS socket for malformed input."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import struct
import subprocess
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import trio

from proxy import app, demo_upstream
from proxy.audit_sink import JsonLines
from proxy.runtime import Runtime
from tests.conftest import Pki

ROOT = Path(__file__).resolve().parents[2]

POLICY = textwrap.dedent("""\
    routes:
      - name: partner
        match: {path_prefix: /payments}
        upstream: app
        allow: ["spiffe://partner.org/ns/payments/sa/api"]
      - name: admin
        match: {path_prefix: /admin}
        upstream: app
        allow: []
      - name: dead
        match: {path_prefix: /dead}
        upstream: dead
        allow: ["spiffe://example.org/ns/prod/*"]
      - name: prod
        match: {path_prefix: /}
        upstream: app
        allow: ["spiffe://example.org/ns/prod/*"]
""")


@dataclass
class Proxy:
    port: int
    upstream_port: int
    rt: Runtime
    dir: Path
    pki: Pki
    admin_port: int | None = None
    reloader: Any = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def decisions(self) -> list[dict[str, Any]]:
        return _lines(self.dir / "decisions.jsonl")

    def events(self) -> list[dict[str, Any]]:
        return _lines(self.dir / "events.jsonl")

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{self.admin_port}/metrics")
            r.raise_for_status()
            return r.text


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def write_config(
    d: Path,
    pki: Pki,
    upstream_port: int,
    *,
    listen: str = "127.0.0.1:0",
    timeouts: str = "",
    policy: str = POLICY,
    jwks: str | None = None,
    policy_watch: str = "200ms",
    app_options: str = "",
    identity_headers: str = "",
    extra: str = "",
) -> Path:
    """The proxy's config file (and policy) in ``d``. ``app_options``: more keys of the
    ``app`` upstream's flow mapping (``"client_cert_headers: true, "``);
    ``identity_headers``: the body of an ``identity_headers:`` section; ``extra``: more
    top-level YAML (an ``http:`` section, ``upstreams`` keys are in ``app_options``)."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    (d / "policy.yaml").write_text(policy)
    cfg = d / "spiffe-pep.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        listen: {listen}
        tls:
          svid: {pki.dir}/server.pem
          key: {pki.dir}/server_key.pem
          bundles:
            example.org: {pki.bundle}
            partner.org: {pki.partner_bundle}
        {"  jwt_bundles: {example.org: " + jwks + "}" if jwks else ""}
        upstreams:
          app: {{{app_options}url: "http://127.0.0.1:{upstream_port}"}}
          dead: {{url: "http://127.0.0.1:{dead_port}"}}
        decision_log: {d}/decisions.jsonl
        policy: policy.yaml
        admin: 127.0.0.1:0
        policy_watch: {policy_watch}
        """)
        + timeouts
        + extra
        + (
            "identity_headers:\n" + textwrap.indent(identity_headers, "  ") + "\n"
            if identity_headers
            else ""
        )
    )
    return cfg


async def serve(nursery: trio.Nursery, cfg: Path, pki: Pki, upstream_port: int) -> Proxy:
    """The proxy of config file ``cfg``, in the test's nursery; events go to the file's
    directory, beside the decision log that ``write_config`` puts there."""
    tmp = cfg.parent
    rt = app.build_runtime(app.read_config(cfg), events=JsonLines(str(tmp / "events.jsonl")))
    started = await nursery.start(app.serve, rt)
    return Proxy(
        started["listen"][0][1], upstream_port, rt, tmp, pki, started["admin"], started["reloader"]
    )


async def start(
    nursery: trio.Nursery, tmp: Path, pki: Pki, *, timeouts: str = "", **config: Any
) -> Proxy:
    upstream_port = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    cfg = write_config(tmp, pki, upstream_port, timeouts=timeouts, **config)
    return await serve(nursery, cfg, pki, upstream_port)


@dataclass
class Received:
    """One request as the recording upstream saw it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False  # False: the connection ended before the end of the body


@dataclass
class RecordingUpstream:
    """A real HTTP/1.1 server (h11 over TCP) that records every byte and request it gets.

    ``GET /reset...`` answers a head promising 1,000 bytes, sends 10 and resets the TCP
    connection; anything else gets ``200 ok`` once its body has arrived."""

    port: int = 0
    raw: bytearray = field(default_factory=bytearray)
    requests: list[Received] = field(default_factory=list)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        current: Received | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    self.raw += data
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    current = Received(event.method, event.target, list(event.headers))
                    self.requests.append(current)
                elif isinstance(event, h11.Data) and current is not None:
                    current.body += event.data
                elif isinstance(event, h11.EndOfMessage) and current is not None:
                    current.complete = True
                    if current.target.startswith(b"/reset"):
                        await stream.send_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"
                        )
                        await trio.sleep(0.05)
                        stream.socket.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        return  # closing with linger 0 sends RST
                    await stream.send_all(
                        conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                        + (b"" if current.method == b"HEAD" else conn.send(h11.Data(data=b"ok")))
                        + (conn.send(h11.EndOfMessage()) or b"")
                    )
                    conn.start_next_cycle()
                    current = None
                else:
                    return
        except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError):
            return
        finally:
            await stream.aclose()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as n:
            task_status.started(self.port)
            await trio.serve_listeners(self._serve_one, listeners, handler_nursery=n)


async def start_recording(
    nursery: trio.Nursery, tmp: Path, pki: Pki, **config: Any
) -> tuple[Proxy, RecordingUpstream]:
    """The proxy in front of a :class:`RecordingUpstream` (as upstream ``app``)."""
    upstream = RecordingUpstream()
    port = await nursery.start(upstream.serve)
    cfg = write_config(tmp, pki, port, **config)
    return await serve(nursery, cfg, pki, port), upstream


@dataclass
class CurlResult:
    returncode: int
    status: int
    body: bytes
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)


async def curl(proxy: Proxy, path: str, *args: str, cert: str | None = "client") -> CurlResult:
    """curl with the SVID named ``cert`` (from the PKI dir), verifying the proxy's SVID."""
    cmd = ["curl", "-sS", "--max-time", "30", "-w", "\n%{http_code}"]
    cmd += proxy.pki.client_args(cert) if cert else ["--cacert", proxy.pki.bundle]
    cmd += [*args, proxy.url + path]
    done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    body, _, code = done.stdout.rpartition(b"\n")
    return CurlResult(done.returncode, int(code or 0), body, done.stderr.decode())


def upstream_headers(result: CurlResult) -> dict[str, list[str]]:
    """The headers the demo upstream received, by lower-case name."""
    out: dict[str, list[str]] = {}
    for name, value in result.json()["headers"]:
        out.setdefault(name, []).append(value)
    return out


def tls_client(pki: Pki, cert: str = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.bundle)
    ctx.load_cert_chain(pki.dir / f"{cert}.pem", pki.dir / f"{cert}_key.pem")
    return ctx


def _raw_exchange(
    port: int, ctx: ssl.SSLContext, payloads: Sequence[bytes], pause: float
) -> tuple[bytes, bool]:
    import time

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        for p in payloads:
            try:
                s.sendall(p)
            except (ssl.SSLError, BrokenPipeError, ConnectionResetError):
                break  # the proxy already answered and closed: read what it said
            if pause:
                time.sleep(pause)
        s.settimeout(3)
        chunks = []
        closed = False
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    closed = True
                    break
                chunks.append(data)
        except (ssl.SSLError, ConnectionResetError):
            closed = True
        except TimeoutError:
            pass
        return b"".join(chunks), closed


async def raw(proxy: Proxy, *payloads: bytes, cert: str = "client", pause: float = 0) -> bytes:
    """Send bytes over a real TLS connection; return everything read until close or 3 s."""
    return (await raw_exchange(proxy, *payloads, cert=cert, pause=pause))[0]


async def raw_exchange(
    proxy: Proxy, *payloads: bytes, cert: str = "client", pause: float = 0
) -> tuple[bytes, bool]:
    """Like :func:`raw`, and whether the proxy closed the connection (within 3 s)."""
    ctx = tls_client(proxy.pki, cert)
    return await trio.to_thread.run_sync(_raw_exchange, proxy.port, ctx, payloads, pause)


async def wait_until(
    predicate: Callable[[], object], timeout: float = 5, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true (a proxy logs a request just after answering
    it, a reload lands after the signal); fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until a proxy process started with ``subprocess`` accepts connections on ``port``."""
    with trio.fail_after(15):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await s.aclose()
            return


def server_fingerprint(port: int, ctx: ssl.SSLContext) -> str:
    """SHA-256 of the certificate the server presents on a new handshake (blocking)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


def statuses(response: bytes) -> list[int]:
    """Status codes of the responses in a raw byte stream (bodies here never hold one)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", response)]
