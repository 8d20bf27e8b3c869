"""Upstream keep-alive pool against upstreams that close pooled connections."""

from __future__ import annotations

import contextlib
import functools
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.devcerts import issue_svid
from tests.conftest import SERVER_ID, Pki
from tests.der_edit import non_minimal_validity
from tests.integration.harness import Proxy, curl, serve, wait_until, write_config


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> bool:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return False
            conn.receive_data(data)
        elif isinstance(event, h11.EndOfMessage):
            return True


class FlakyUpstream:
    """Answers the first request on each connection with keep-alive, then drops the
    connection on the second without answering: the race a pooled connection can lose."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            if not await _read_request(conn, stream):
                return
            body = b"ok"
            for event in (
                h11.Response(status_code=200, headers=[(b"content-length", b"2")]),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                await stream.send_all(conn.send(event) or b"")
            self.answered += 1
            conn.start_next_cycle()
            await _read_request(conn, stream)  # read the reused request, then just close


async def _start(
    nursery: trio.Nursery,
    tmp: Path,
    pki: Pki,
    handler: object,
    mtls: bool = False,
    timeouts: str = "",
) -> Proxy:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")  # type: ignore[arg-type]
    )
    port = listeners[0].socket.getsockname()[1]
    cfg = write_config(tmp, pki, port, timeouts=timeouts)
    if mtls:
        text = cfg.read_text().replace(
            f'url: "http://127.0.0.1:{port}"',
            f'url: "https://localhost:{port}", tls: {{expect: "{SERVER_ID}"}}',
        )
        cfg.write_text(text)
    return await serve(nursery, cfg, pki, port)


async def test_idempotent_request_retried_when_pooled_connection_dies(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    upstream = FlakyUpstream()
    proxy = await _start(nursery, tmp_path, pki, upstream.handle)
    assert (await curl(proxy, "/one")).status == 200
    r = await curl(proxy, "/two")  # reuses the pooled connection, which dies: retried
    assert r.status == 200 and r.body == b"ok"
    assert upstream.connections == 2 and upstream.answered == 2


@pytest.mark.parametrize(
    "args", [["-X", "POST"], ["-X", "PUT", "--data-binary", "x"]], ids=["post", "put_with_body"]
)
async def test_non_retryable_request_gets_502_not_a_replay(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, args: list[str]
) -> None:
    upstream = FlakyUpstream()
    proxy = await _start(nursery, tmp_path, pki, upstream.handle)
    assert (await curl(proxy, "/one")).status == 200
    r = await curl(proxy, "/two", *args)
    assert r.status == 502
    assert upstream.connections == 1  # never replayed on a new connection


async def test_connection_closed_by_upstream_while_idle_is_not_reused(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    seen = []

    async def close_after_one(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            await _read_request(conn, stream)
            seen.append(1)
            for event in (
                h11.Response(status_code=200, headers=[(b"content-length", b"0")]),
                h11.EndOfMessage(),
            ):
                await stream.send_all(conn.send(event) or b"")
        # closed without "Connection: close": the pool only learns by looking

    proxy = await _start(nursery, tmp_path, pki, close_after_one)
    for _ in range(3):
        r = await curl(proxy, "/x", "-X", "POST")
        assert r.status == 200
        await trio.sleep(0.05)
    assert len(seen) == 3


# An attacker-chosen response, smuggled into the pool to answer someone else's request.
INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: yes\r\n\r\npoisoned"
CLEAN = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean"
# What a misbehaving upstream answers, by path: each response is complete before the
# injected one starts, so a pooled connection that kept the surplus would hand it on.
POISONERS = {
    b"/head-body": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(INJECTED) + INJECTED,
    b"/no-content": b"HTTP/1.1 204 No Content\r\n\r\n" + INJECTED,
    b"/not-modified": b'HTTP/1.1 304 Not Modified\r\nETag: "1"\r\n\r\n' + INJECTED,
    b"/short-length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + INJECTED,
}


class PoisoningUpstream:
    """A raw-socket upstream that writes more than the response it was asked for: in the
    same write (``POISONERS``), or after a pause on the idle connection (``/idle``)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[bytes] = []
        self.tls = tls

    async def handle(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            stream = trio.SSLStream(tcp, self.tls, server_side=True)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # the proxy closed it
                await self._serve(stream)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            target = head.split(b" ")[1]
            self.requests.append(target)
            if target in POISONERS:
                await stream.send_all(POISONERS[target])
            elif target == b"/idle":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await trio.sleep(0.2)
                await stream.send_all(INJECTED)  # unsolicited, on the idle connection
            else:
                await stream.send_all(CLEAN)


@pytest.mark.parametrize("mtls", [False, True], ids=["tcp", "mtls"])
@pytest.mark.parametrize(
    ("path", "args", "kind"),
    [
        ("/head-body", ["-I"], "bytes_after_response"),
        ("/no-content", [], "bytes_after_response"),
        ("/not-modified", [], "bytes_after_response"),
        ("/short-length", [], "bytes_after_response"),
        ("/idle", [], "bytes_while_idle"),
    ],
    ids=[
        "head_response_with_body",
        "no_content_with_body",
        "not_modified_with_body",
        "content_length_shorter_than_body",
        "unsolicited_response_while_idle",
    ],
)
async def test_pool_poisoning_never_reaches_another_identity(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: Pki,
    path: str,
    args: list[str],
    kind: str,
    mtls: bool,
) -> None:
    pki.svid("client_b", ["spiffe://example.org/ns/prod/sa/other"])
    tls = None
    if mtls:  # the upstream presents the proxy's own SVID: expected below
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(pki.dir / "server.pem", pki.dir / "server_key.pem")
    upstream = PoisoningUpstream(tls)
    proxy = await _start(nursery, tmp_path, pki, upstream.handle, mtls=mtls)
    a = await curl(proxy, path, *args)  # identity A
    assert a.status in (200, 204, 304)
    await trio.sleep(0.4)  # the idle connection's unsolicited bytes have arrived
    b = await curl(proxy, "/next", "-i", cert="client_b")  # identity B
    assert b.status == 200
    assert b"injected" not in b.body.lower() and b"poisoned" not in b.body
    assert b.body.endswith(b"clean")
    assert upstream.requests == [path.encode(), b"/next"]
    (event,) = [e for e in proxy.events() if e["event"] == "upstream_protocol_violation"]
    assert event["upstream"] == "app" and event["kind"] == kind and event["bytes"] > 0
    counter = f'spiffe_pep_upstream_protocol_violations_total{{kind="{kind}",upstream="app"}}'
    assert f"{counter} 1.0" in await proxy.metrics()


def _mtls_upstream(
    pki: Pki,
    then: Callable[[trio.SocketStream], Awaitable[None]],
    chain: tuple[Path, Path] | None = None,
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """An mTLS upstream's connection handler: the handshake (presenting ``chain``, a
    certificate and key file, else the PKI's server SVID), one request read, then
    ``then`` on the TCP stream underneath."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*(chain or (pki.dir / "server.pem", pki.dir / "server_key.pem")))

    async def handle(tcp: trio.SocketStream) -> None:
        s = trio.SSLStream(tcp, ctx, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await s.do_handshake()
            await s.receive_some(65536)
            await then(tcp)

    return handle


async def test_upstream_timeout_on_a_pooled_connection_is_not_retried(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # The upstream has the request and is still working on it: a retry would send it a
    # second copy (and double the client's wait) instead of answering 504.
    seen: list[float] = []

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            _, _, buf = buf.partition(b"\r\n\r\n")
            seen.append(time.monotonic())
            if len(seen) > 1:
                await trio.sleep(30)  # hung on every request after the first
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    proxy = await _start(
        nursery, tmp_path, pki, handle, timeouts="timeouts: {upstream_response: 1s}\n"
    )
    assert (await curl(proxy, "/orders")).status == 200  # the connection is pooled
    t0 = time.monotonic()
    r = await curl(proxy, "/orders")  # a GET on the reused connection, never answered
    assert r.status == 504 and time.monotonic() - t0 < 1.9
    assert len(seen) == 2  # one copy reached the upstream
    assert proxy.decisions()[-1]["reason"] == "upstream_timeout"


async def test_silent_mtls_upstream_is_504_on_time(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    async def silent(tcp: trio.SocketStream) -> None:
        await trio.sleep(30)

    handle = _mtls_upstream(pki, silent)
    proxy = await _start(
        nursery, tmp_path, pki, handle, mtls=True, timeouts="timeouts: {upstream_response: 1s}\n"
    )
    t0 = time.monotonic()
    r = await curl(proxy, "/orders")
    assert r.status == 504 and 0.9 < time.monotonic() - t0 < 2.5
    assert proxy.decisions()[-1]["reason"] == "upstream_timeout"


async def test_mtls_upstream_sending_a_bad_record_is_502_not_an_internal_error(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    async def bad_record(tcp: trio.SocketStream) -> None:
        # An application-data record whose MAC cannot be right.
        await tcp.send_all(b"\x17\x03\x03\x00\x10" + b"garbage-garbage!")
        await trio.sleep(5)

    handle = _mtls_upstream(pki, bad_record)
    proxy = await _start(
        nursery, tmp_path, pki, handle, mtls=True, timeouts="timeouts: {upstream_response: 2s}\n"
    )
    r = await curl(proxy, "/orders")
    await wait_until(proxy.decisions)
    assert r.status == 502
    assert proxy.decisions()[-1]["reason"] == "upstream_connection_broken"
    assert not [e for e in proxy.events() if e["event"] == "internal_error"]


async def test_mtls_upstream_with_an_unreadable_certificate_is_502_not_an_internal_error(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # OpenSSL reads the chain (a BER length in the intermediate), cryptography does not.
    issued = issue_svid(pki.intermediate, [SERVER_ID], dns=["localhost"], ips=["127.0.0.1"])
    inter = non_minimal_validity(pki.intermediate.cert.public_bytes(Encoding.DER))
    cert, key = tmp_path / "upstream.pem", tmp_path / "upstream_key.pem"
    cert.write_text(
        "".join(
            ssl.DER_cert_to_PEM_cert(c) for c in (issued.cert.public_bytes(Encoding.DER), inter)
        )
    )
    key.write_bytes(issued.key_pem())

    async def answer(tcp: trio.SocketStream) -> None:
        await trio.sleep(5)  # never reached: the proxy refuses the upstream

    handle = _mtls_upstream(pki, answer, (cert, key))
    proxy = await _start(nursery, tmp_path, pki, handle, mtls=True)
    r = await curl(proxy, "/orders")
    await wait_until(proxy.decisions)
    assert r.status == 502
    assert proxy.decisions()[-1]["reason"] == "upstream_svid_invalid"
    assert not [e for e in proxy.events() if e["event"] == "internal_error"]
