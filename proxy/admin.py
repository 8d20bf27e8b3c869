"""The admin listener (plain HTTP, loopback by default): ``/metrics`` and ``/healthz``.

Kept apart from the mTLS listener so that scraping and probing never need an SVID and
never go through the policy.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

import h11
import trio

Handler = Callable[[], tuple[int, bytes, bytes]]  # status, content type, body


async def _serve_one(stream: trio.SocketStream, routes: dict[bytes, Handler]) -> None:
    conn = h11.Connection(h11.SERVER)
    with (
        contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError
        ),
        trio.move_on_after(30),
    ):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if not isinstance(event, h11.Request):
                break
            handler = routes.get(event.target.split(b"?")[0])
            if event.method not in (b"GET", b"HEAD"):
                status, ctype, body = 405, b"application/json", b'{"error":"method_not_allowed"}'
            elif handler is None:
                status, ctype, body = 404, b"application/json", b'{"error":"not_found"}'
            else:
                status, ctype, body = handler()
            while True:  # read (and ignore) any request body before answering
                rest = conn.next_event()
                if rest is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif not isinstance(rest, h11.Data):
                    break
            out = conn.send(
                h11.Response(
                    status_code=status,
                    headers=[(b"content-type", ctype), (b"content-length", b"%d" % len(body))],
                )
            )
            out = (out or b"") + (
                conn.send(h11.Data(data=body)) if event.method != b"HEAD" else b""
            )
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)
            if conn.our_state is not h11.DONE:
                break
            conn.start_next_cycle()
    with contextlib.suppress(Exception):
        await stream.aclose()


def json_handler(fn: Callable[[], tuple[int, object]]) -> Handler:
    def handler() -> tuple[int, bytes, bytes]:
        status, doc = fn()
        return status, b"application/json", json.dumps(doc).encode()

    return handler


async def serve_admin(
    host: str,
    port: int,
    routes: dict[bytes, Handler],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, routes)

    await trio.serve_listeners(handler, listeners)
