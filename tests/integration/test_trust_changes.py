"""Trust changes reach connections that are already open: a keep-alive connection whose
CA was rotated out, and WebSocket tunnels whose caller is revoked, idle, or asks for a
protocol the proxy does not tunnel. Real handshakes, real clients, real file edits."""

from __future__ import annotations

import datetime as dt
import functools
import socket
import ssl
import time
from pathlib import Path

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from proxy.devcerts import issue_ca, issue_svid
from tests.conftest import CLIENT_ID, Pki
from tests.integration.harness import (
    POLICY,
    Proxy,
    raw_exchange,
    serve,
    statuses,
    tls_client,
    wait_until,
    write_config,
)
from tests.integration.test_websocket import EchoServer


def _read_response(s: ssl.SSLSocket, client: h11.Connection) -> bytes:
    """One whole response on a keep-alive connection, as raw-ish bytes (head + body)."""
    out = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(s.recv(65536))
        elif isinstance(event, h11.Response):
            out += b"HTTP/1.1 %d \r\n" % event.status_code
        elif isinstance(event, h11.Data):
            out += event.data
        elif isinstance(event, h11.EndOfMessage):
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client.start_next_cycle()
            return out
        else:
            return out


def _events(proxy: Proxy, name: str) -> list[dict[str, object]]:
    return [e for e in proxy.events() if e["event"] == name]


async def test_keepalive_connection_from_a_rotated_out_ca_is_closed(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    from proxy import demo_upstream

    # A second example.org CA, trusted at first, then removed from the bundle.
    old_ca = issue_ca("example.org", common_name="retired CA")
    pki.write("retired", issue_svid(old_ca, [CLIENT_ID]))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(pki.bundle).read_bytes() + old_ca.cert_pem())
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    cfg = write_config(tmp_path, pki, upstream)
    text = cfg.read_text().replace(f"example.org: {pki.bundle}", f"example.org: {bundle}")
    cfg.write_text(text.replace("tls:\n", "tls:\n  watch: 200ms\n", 1))
    proxy = await serve(nursery, cfg, pki, upstream)
    ctx = tls_client(pki, "retired")

    def keepalive() -> list[bytes]:
        got = []
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            client = h11.Connection(h11.CLIENT)
            for i in range(2):
                req = h11.Request(
                    method="GET", target=f"/orders/{i}", headers=[("Host", "localhost")]
                )
                s.sendall(client.send(req) + client.send(h11.EndOfMessage()))
                got.append(_read_response(s, client))
                if i == 0:
                    bundle.write_bytes(Path(pki.bundle).read_bytes())  # the rotation
                    deadline = 100
                    while not any(e["event"] == "credentials_reloaded" for e in proxy.events()):
                        deadline -= 1
                        assert deadline, "the bundle change was not picked up"
                        time.sleep(0.05)
            try:
                got.append(s.recv(65536))
            except (ssl.SSLError, OSError):
                got.append(b"")
        return got

    first, second, after = await trio.to_thread.run_sync(keepalive)
    assert statuses(first) == [200]
    assert statuses(second) == [403]
    assert after == b""  # closed
    await wait_until(lambda: _events(proxy, "peer_no_longer_trusted"))
    (event,) = _events(proxy, "peer_no_longer_trusted")
    assert event["spiffe_id"] == CLIENT_ID and event["reason"] == "chain_not_verified"
    assert proxy.decisions()[-1]["reason"] == "peer_no_longer_trusted"
    # A client of the CA still trusted keeps working.
    out, _ = await raw_exchange(
        proxy, b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert statuses(out) == [200]


async def _ws_proxy(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, timeouts: str = ""
) -> tuple[Proxy, EchoServer]:
    echo = EchoServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, echo.handle, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    cfg = write_config(tmp_path, pki, port, policy_watch="100ms", timeouts=timeouts)
    return await serve(nursery, cfg, pki, port), echo


async def _open_tunnel(
    proxy: Proxy, pki: Pki, cert: str = "client"
) -> tuple[trio.SSLStream[trio.SocketStream], WSConnection]:
    stream = await trio.open_ssl_over_tcp_stream(
        "localhost", proxy.port, ssl_context=tls_client(pki, cert)
    )
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="localhost", target="/ws/chat")))
    ws.receive_data(await stream.receive_some(65536))
    assert isinstance(next(ws.events()), AcceptConnection)
    await stream.send_all(ws.send(TextMessage(data="hello")))
    ws.receive_data(await stream.receive_some(65536))
    assert isinstance(next(ws.events()), TextMessage)
    return stream, ws


async def _closed_within(stream: trio.SSLStream[trio.SocketStream], seconds: float) -> bool:
    with trio.move_on_after(seconds):
        try:
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, ssl.SSLError):
            pass
        return True
    return False


async def test_websocket_tunnel_of_a_revoked_caller_is_closed(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, _ = await _ws_proxy(nursery, tmp_path, pki)
    stream, _ws = await _open_tunnel(proxy, pki)
    (tmp_path / "policy.yaml").write_text(f'revoked: {{ids: ["{CLIENT_ID}"]}}\n' + POLICY)
    assert await _closed_within(stream, 5), "the tunnel outlived the revocation"
    await wait_until(lambda: _events(proxy, "tunnel_closed"))
    (event,) = _events(proxy, "tunnel_closed")
    assert event["reason"] == "spiffe_id_revoked"
    await wait_until(proxy.decisions)
    assert proxy.decisions()[-1]["reason"] == "spiffe_id_revoked"


async def test_websocket_tunnel_survives_an_unrelated_policy_change(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, _ = await _ws_proxy(nursery, tmp_path, pki)
    stream, ws = await _open_tunnel(proxy, pki)
    (tmp_path / "policy.yaml").write_text(POLICY + "# an edit\n")
    await wait_until(lambda: any(e["event"] == "policy_reloaded" for e in proxy.events()))
    assert not await _closed_within(stream, 0.5)
    await stream.send_all(ws.send(TextMessage(data="still here")))
    ws.receive_data(await stream.receive_some(65536))
    assert isinstance(next(ws.events()), TextMessage)
    await stream.send_all(ws.send(CloseConnection(code=1000)))


async def test_idle_websocket_tunnel_is_closed(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, _ = await _ws_proxy(nursery, tmp_path, pki, timeouts="timeouts: {tunnel_idle: 500ms}\n")
    stream, _ = await _open_tunnel(proxy, pki)
    assert await _closed_within(stream, 5)
    await wait_until(proxy.decisions)
    assert proxy.decisions()[-1]["reason"] == "tunnel_idle_timeout"


async def test_websocket_tunnel_closes_when_its_certificate_expires(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # A tunnel opened with a certificate that has 2 s left must not outlive it.
    now = dt.datetime.now(dt.UTC)
    pki.write(
        "short", issue_svid(pki.intermediate, [CLIENT_ID], not_before=now - dt.timedelta(minutes=1),
                            not_after=now + dt.timedelta(seconds=2))
    )  # fmt: skip
    proxy, _ = await _ws_proxy(nursery, tmp_path, pki)
    stream, _ = await _open_tunnel(proxy, pki, "short")
    assert await _closed_within(stream, 6)
    await wait_until(proxy.decisions)
    assert proxy.decisions()[-1]["reason"] == "certificate_expired"


async def test_h2c_upgrade_is_refused(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    # h2c would take the connection past the HTTP/1.1 parser that judges each request.
    proxy, echo = await _ws_proxy(nursery, tmp_path, pki)
    for token in (b"h2c", b"websocket, h2c", b"x-custom"):
        out, closed = await raw_exchange(
            proxy,
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: " + token + b"\r\nHTTP2-Settings: AAMAAABkAARAAAAA\r\n\r\n",
        )
        assert statuses(out) == [400] and closed, token
    await wait_until(lambda: len(proxy.decisions()) == 3)
    assert {d["reason"] for d in proxy.decisions()} == {"upgrade_not_allowed"}
    assert echo.handshakes == []


async def test_keepalive_connection_sees_a_revocation_on_its_next_request(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # The per-connection verdict cache must not outlive a policy change.
    from proxy import demo_upstream

    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    proxy = await serve(
        nursery, write_config(tmp_path, pki, upstream, policy_watch="100ms"), pki, upstream
    )
    ctx = tls_client(pki, "client")

    def keepalive() -> list[bytes]:
        got = []
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            client = h11.Connection(h11.CLIENT)
            for i in range(3):
                req = h11.Request(method="GET", target="/orders", headers=[("Host", "localhost")])
                s.sendall(client.send(req) + client.send(h11.EndOfMessage()))
                got.append(_read_response(s, client))
                if i == 1:
                    (tmp_path / "policy.yaml").write_text(
                        f'revoked: {{ids: ["{CLIENT_ID}"]}}\n' + POLICY
                    )
                    deadline = 100
                    while not any(e["event"] == "policy_reloaded" for e in proxy.events()):
                        deadline -= 1
                        assert deadline, "the policy change was not picked up"
                        time.sleep(0.05)
        return got

    got = await trio.to_thread.run_sync(keepalive)
    assert [statuses(g) for g in got] == [[200], [200], [403]]
    assert proxy.decisions()[-1]["reason"] == "spiffe_id_revoked"
    assert len({d["peer_addr"] for d in proxy.decisions()}) == 1  # one connection
