"""WebSocket through the proxy: Upgrade after the policy allowed it, identity headers on
the upgrade request, then a byte stream both ways (wsproto on both ends)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    RejectConnection,
    Request,
    TextMessage,
)

from tests.conftest import CLIENT_ID, Pki
from tests.integration.harness import Proxy, serve, tls_client, wait_until, write_config


class EchoServer:
    """A WebSocket echo upstream that remembers the upgrade request's headers."""

    def __init__(self) -> None:
        self.handshakes: list[dict[str, str]] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        self.handshakes.append(
                            {n.decode().lower(): v.decode() for n, v in event.extra_headers}
                        )
                        await stream.send_all(ws.send(AcceptConnection()))
                    elif isinstance(event, Message):
                        await stream.send_all(
                            ws.send(
                                type(event)(
                                    data=event.data, message_finished=event.message_finished
                                )
                            )
                        )
                    elif isinstance(event, CloseConnection):
                        await stream.send_all(ws.send(event.response()))
                        return


async def _client(port: int, pki: Pki, cert: str, messages: list[Any]) -> list[Any]:
    """Handshake, then each message and its echo, then a clean close."""
    ctx = tls_client(pki, cert)
    stream = await trio.open_ssl_over_tcp_stream("localhost", port, ssl_context=ctx)
    ws = WSConnection(ConnectionType.CLIENT)
    got: list[Any] = []

    async def next_event() -> Any:
        while True:
            for event in ws.events():
                return event
            data = await stream.receive_some(65536)
            if not data:
                return None
            ws.receive_data(data)

    async with stream:
        with trio.fail_after(10):
            await stream.send_all(ws.send(Request(host="localhost", target="/ws/chat")))
            event = await next_event()
            if isinstance(event, RejectConnection):
                return [("rejected", event.status_code)]
            assert isinstance(event, AcceptConnection), event
            got.append("accepted")
            for message in messages:
                await stream.send_all(ws.send(message))
                parts = []
                while True:  # a large message may arrive in fragments
                    event = await next_event()
                    assert isinstance(event, TextMessage | BytesMessage), event
                    parts.append(event.data)
                    if event.message_finished:
                        break
                got.append(parts[0][:0].join(parts))
            await stream.send_all(ws.send(CloseConnection(code=1000)))
            event = await next_event()
            assert isinstance(event, CloseConnection), event
    return got


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> tuple[Proxy, EchoServer]:
    echo = EchoServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, echo.handle, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    cfg = write_config(tmp_path, pki, port)
    return await serve(nursery, cfg, pki, port), echo


async def test_websocket_echo_through_the_proxy(proxy: tuple[Proxy, EchoServer], pki: Pki) -> None:
    px, echo = proxy
    got = await _client(
        px.port, pki, "client", [TextMessage(data="hello"), BytesMessage(data=b"\x00\x01" * 40_000)]
    )
    assert got[:3] == ["accepted", "hello", b"\x00\x01" * 40_000]
    (handshake,) = echo.handshakes
    assert handshake["x-client-spiffe-id"] == CLIENT_ID
    assert f"URI={CLIENT_ID}" in handshake["x-forwarded-client-cert"]
    await wait_until(px.decisions)  # logged when the tunnel closes, after the client's close
    rec = px.decisions()[-1]
    assert rec["status"] == 101 and rec["decision"] == "allow"
    assert rec["bytes_in"] > 80_000 and rec["bytes_out"] > 80_000


async def test_denied_caller_never_upgrades(proxy: tuple[Proxy, EchoServer], pki: Pki) -> None:
    px, echo = proxy
    got = await _client(px.port, pki, "denied", [TextMessage(data="hello")])
    assert got == [("rejected", 403)]
    assert echo.handshakes == []
