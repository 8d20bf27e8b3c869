"""Upstream keep-alive pool against upstreams that close pooled connections."""

from __future__ import annotations

import functools
from pathlib import Path

import h11
import pytest
import trio

from tests.conftest import Pki
from tests.integration.harness import Proxy, curl, serve, write_config


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


async def _start(nursery: trio.Nursery, tmp: Path, pki: Pki, handler: object) -> Proxy:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")  # type: ignore[arg-type]
    )
    port = listeners[0].socket.getsockname()[1]
    cfg = write_config(tmp, pki, port)
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
