"""What the proxy relies on trio's sockets to do for it."""

from __future__ import annotations

import socket

import trio


async def test_accepted_connections_have_nagle_off() -> None:
    # Without TCP_NODELAY, a response written after a request from a client that leaves
    # Nagle on (ab) waits for that client's delayed ACK: 40 ms stalls. trio's
    # SocketStream sets it; the proxy no longer sets it again on every connection.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    assert isinstance(server, trio.SocketStream)
    assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    for s in (client, server, *listeners):
        await s.aclose()
