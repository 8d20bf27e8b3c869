"""A small HTTP/1.1 upstream for the dev setup, the tests and load tests (trio + h11).

- ``GET /bytes/N``: N bytes, streamed in 64 KiB chunks, never held whole;
- ``GET /status/N``: an empty response with status N;
- ``GET /sleep/S``: answers after S seconds (to exercise upstream timeouts);
- anything else, any method: reads (and counts) the request body, then answers with
  JSON echoing the method, target, headers and body size: what the app behind the
  proxy sees.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import socket

import h11
import trio

_CHUNK = 64 * 1024
_ZEROS = bytes(_CHUNK)


async def _next(conn: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        conn.receive_data(await stream.receive_some(_CHUNK))


async def _send(conn: h11.Connection, stream: trio.SocketStream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _respond(conn: h11.Connection, stream: trio.SocketStream, req: h11.Request) -> None:
    parts = req.target.decode("ascii", "replace").split("?")[0].split("/")
    size = 0
    digest = hashlib.sha256()
    while True:
        event = await _next(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            digest.update(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
    if len(parts) == 3 and parts[1] == "bytes" and parts[2].isdigit():
        n = int(parts[2])
        await _send(
            conn,
            stream,
            h11.Response(
                status_code=200,
                headers=[
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", b"%d" % n),
                ],
            ),
        )
        if req.method != b"HEAD":
            while n > 0:
                chunk = _ZEROS if n >= _CHUNK else _ZEROS[:n]
                await _send(conn, stream, h11.Data(data=chunk))
                n -= len(chunk)
        await _send(conn, stream, h11.EndOfMessage())
        return
    if len(parts) == 3 and parts[1] == "status" and parts[2].isdigit():
        await _send(
            conn,
            stream,
            h11.Response(status_code=int(parts[2]), headers=[(b"content-length", b"0")]),
        )
        await _send(conn, stream, h11.EndOfMessage())
        return
    if len(parts) == 2 and parts[1] == "early-hints":  # RFC 8297: a 103 first
        await _send(
            conn,
            stream,
            h11.InformationalResponse(
                status_code=103, headers=[(b"link", b"</style.css>; rel=preload; as=style")]
            ),
        )
    if len(parts) == 3 and parts[1] == "sleep":
        await trio.sleep(float(parts[2]))
    body = json.dumps(
        {
            "method": req.method.decode(),
            "target": req.target.decode("ascii", "replace"),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in req.headers],
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
    ).encode()
    await _send(
        conn,
        stream,
        h11.Response(
            status_code=200,
            headers=[
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        ),
    )
    if req.method != b"HEAD":
        await _send(conn, stream, h11.Data(data=body))
    await _send(conn, stream, h11.EndOfMessage())


async def handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    with contextlib.suppress(
        trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError
    ):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        while True:
            event = await _next(conn, stream)
            if not isinstance(event, h11.Request):
                break
            await _respond(conn, stream, event)
            if conn.our_state is not h11.DONE:
                break
            conn.start_next_cycle()
    with contextlib.suppress(Exception):
        await stream.aclose()


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status`` gets the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    print(f"demo upstream on http://{args.host}:{args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.host, args.port)


if __name__ == "__main__":
    main()
