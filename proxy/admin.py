"""The admin listener (plain HTTP, loopback by default): ``/metrics``, ``/healthz``,
``/status``, the admin page ``/ui``.

Kept apart from the mTLS listener so that scraping and probing never need an SVID and
never go through the policy.

It answers only GET and HEAD (405 with ``Allow`` otherwise), and only requests whose
``Host`` names it: a loopback name (``127.0.0.1``, ``[::1]``, ``localhost``, with or
without a port), a name in ``allowed_hosts``, or the IP address the connection arrived
on (what a kubelet probe or a scraper that dials an address sends). Anything else gets
``421`` and no content. This is the defence against DNS rebinding: a page on
``evil.example`` whose name re-resolves to 127.0.0.1 can make a browser send requests
here, but they carry ``Host: evil.example``, so ``/status`` and ``/metrics`` never reach
that page's script. (An IP-literal Host is only sent by a page whose origin is that very
address, so allowing the connection's own address opens nothing.)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import h11
import trio

from proxy.headers import reason_phrase

Handler = Callable[[], tuple[int, bytes, bytes]]  # status, content type, body
Response = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]  # ... and more headers


@dataclass(frozen=True)
class Page:
    """A route answered by a coroutine that reads the query string (the bytes after
    ``?``) and may add headers: the HTML page."""

    render: Callable[[bytes], Awaitable[Response]]


Route = Handler | Page

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
ALLOWED_METHODS = (b"GET", b"HEAD")


def host_name(value: bytes) -> str | None:
    """The name in a ``Host`` value (``name``, ``name:port``, ``[v6]``, ``[v6]:port``),
    lower-cased and without brackets; None when the value has none of those shapes."""
    try:
        text = value.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        name, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port[:1] == ":" and port[1:].isdigit())):
            return None
    else:
        name, colon, port = text.partition(":")
        if colon and not port.isdigit():  # also a second colon: a bare IPv6 address
            return None
    return name or None


def _same_address(name: str, address: str | None) -> bool:
    if address is None:
        return False
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(address)
    except ValueError:
        return False


def host_allowed(
    host: bytes | None, allowed: Iterable[str], local_address: str | None = None
) -> bool:
    """Whether a request with this ``Host`` value (None: absent) is for this listener:
    its name is one of ``allowed`` (compared without case or brackets) or is the IP
    address the connection arrived on."""
    name = host_name(host) if host is not None else None
    if name is None:
        return False
    names = {a.strip("[]").lower() for a in allowed}
    return name in names or _same_address(name, local_address)


def _answer(status: int, error: str) -> tuple[int, bytes, bytes]:
    return status, b"application/json", json.dumps({"error": error}).encode()


async def _serve_one(
    stream: trio.SocketStream, routes: dict[bytes, Route], allowed_hosts: frozenset[str]
) -> None:
    conn = h11.Connection(h11.SERVER)
    local_address = str(stream.socket.getsockname()[0])
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
            path, _, query = event.target.partition(b"?")
            handler = routes.get(path)
            hosts = [v for n, v in event.headers if n == b"host"]
            extra: list[tuple[bytes, bytes]] = []
            if len(hosts) != 1 or not host_allowed(hosts[0], allowed_hosts, local_address):
                status, ctype, body = _answer(421, "misdirected_request")
                extra.append((b"connection", b"close"))
            elif event.method not in ALLOWED_METHODS:
                status, ctype, body = _answer(405, "method_not_allowed")
                extra.append((b"allow", b", ".join(ALLOWED_METHODS)))
            elif handler is None:
                status, ctype, body = _answer(404, "not_found")
            elif isinstance(handler, Page):
                try:
                    status, ctype, body, more = await handler.render(query)
                    extra += more
                except Exception as exc:  # a page's bug must not take the listener down
                    status, ctype, body = _answer(500, f"internal_error: {type(exc).__name__}")
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
                    reason=reason_phrase(status),
                    headers=[
                        (b"content-type", ctype),
                        (b"content-length", b"%d" % len(body)),
                        *extra,
                    ],
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
    routes: dict[bytes, Route],
    *,
    allowed_hosts: Iterable[str] = LOOPBACK_HOSTS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` on ``host``:``port`` to requests whose Host is in
    ``allowed_hosts`` (or the address they arrived on); ``task_status`` gets the port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    hosts = frozenset(allowed_hosts)

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, routes, hosts)

    await trio.serve_listeners(handler, listeners)
