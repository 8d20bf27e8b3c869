"""The floor: a minimal trio + pyOpenSSL + h11 mTLS forwarder, for comparison only.

What every proxy on this stack must do, and nothing more: the same TLS context and SVID
check per handshake as spiffe-pep (``proxy.tls``, ``proxy.peer``), an allowlist of SPIFFE
IDs (a set lookup, no policy engine), h11 on both sides, XFCC and the SPIFFE ID header,
hop-by-hop headers stripped, the same keep-alive upstream pool (``proxy.forward``), and
HTTP/1.0 keep-alive for ``ab -k``. No canonical request, no decision log, no metrics,
no timeouts beyond the pool's. ``python -m loadtests.compare`` runs it beside nginx and
spiffe-pep; spiffe-pep's CPU per request is measured against it.

    python -m loadtests.floor -c spiffe-pep.yaml --allow spiffe://example.org/ns/prod/sa/client

It reads the listen address, TLS files and the ``app`` upstream of a spiffe-pep config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h11
import trio
from OpenSSL import SSL

from proxy import headers, xfcc
from proxy.app import read_config
from proxy.deadlines import Sweeper, tick_for
from proxy.errors import SvidError, UpstreamError
from proxy.forward import UpstreamPool
from proxy.peer import verified_peer
from proxy.tls import Credentials, load_credentials
from proxy.tls_stream import BROKEN, TLSStream

FORBIDDEN = b'{"error":"forbidden"}'


class Floor:
    def __init__(self, creds: Credentials, pool: UpstreamPool, allow: set[str]) -> None:
        self.creds = creds
        self.pool = pool
        self.allow = allow

    async def connection(self, stream: trio.SocketStream) -> None:
        conn = SSL.Connection(self.creds.context, None)
        conn.set_accept_state()
        tls = TLSStream(stream, conn)
        try:
            with trio.fail_after(10):
                await tls.do_handshake()
            leaf = conn.get_peer_certificate(as_cryptography=True)
            chain = [leaf] if leaf is not None else []
            for cert in conn.get_peer_cert_chain(as_cryptography=True) or []:
                if cert not in chain:
                    chain.append(cert)
            peer = verified_peer(self.creds, chain)
            await self.serve(tls, str(peer.spiffe_id), peer.fingerprint)
        except (SvidError, trio.TooSlowError, *BROKEN):
            pass
        finally:
            await tls.aclose()

    async def serve(self, tls: TLSStream, spiffe_id: str, sha256: str) -> None:
        element = xfcc.format_element([("Hash", sha256), ("URI", spiffe_id)]).encode()
        allowed = spiffe_id in self.allow
        h = h11.Connection(h11.SERVER)
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                data = await tls.receive_some()
                if not data:
                    return
                h.receive_data(data)
                continue
            if not isinstance(event, h11.Request):
                return
            http10 = event.http_version == b"1.0"
            keep10 = http10 and b"keep-alive" in headers.connection_tokens(event.headers)
            out = bytearray()
            framed = True  # the response has a length (else HTTP/1.0 must close)
            if not allowed:
                out += (
                    h.send(
                        h11.Response(
                            status_code=403, headers=[(b"content-length", b"%d" % len(FORBIDDEN))]
                        )
                    )
                    or b""
                )
                out += h.send(h11.Data(data=FORBIDDEN)) or b""
            else:
                up = headers.strip_hop_by_hop(
                    event.headers, frozenset({headers.XFCC, b"x-client-spiffe-id"})
                )
                up += [(headers.XFCC, element), (b"x-client-spiffe-id", spiffe_id.encode())]
                try:
                    body, framed = await self.forward(
                        h, h11.Request(method=event.method, target=event.target, headers=up)
                    )
                    out += body
                except UpstreamError:
                    return
            while True:  # the rest of the request (the floor serves bodiless ones)
                rest = h.next_event()
                if isinstance(rest, h11.EndOfMessage):
                    break
                if rest is h11.NEED_DATA:
                    h.receive_data(await tls.receive_some())
            out += h.send(h11.EndOfMessage()) or b""
            keep10 = keep10 and framed
            if keep10:
                out = bytearray(
                    bytes(out).replace(b"Connection: close\r\n", b"Connection: keep-alive\r\n", 1)
                )
            await tls.send_all(bytes(out))
            if keep10:
                leftover, _ = h.trailing_data
                h = h11.Connection(h11.SERVER)
                if leftover:  # receive_data(b"") would mean end of stream
                    h.receive_data(leftover)
                continue
            if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                return
            h.start_next_cycle()

    async def forward(self, h: h11.Connection, request: h11.Request) -> tuple[bytes, bool]:
        conn = await self.pool.acquire(self.creds)
        try:
            await conn.send(request)
            await conn.send(h11.EndOfMessage())
            out = bytearray()
            framed = False
            while True:
                event = await conn.next_event(30)
                if isinstance(event, h11.Response):
                    hdrs = headers.strip_hop_by_hop(event.headers)
                    framed = any(n == b"content-length" for n, _ in hdrs)
                    out += h.send(h11.Response(status_code=event.status_code, headers=hdrs)) or b""
                elif isinstance(event, h11.Data):
                    out += h.send(h11.Data(data=event.data)) or b""
                elif isinstance(event, h11.EndOfMessage):
                    break
        except BaseException:
            await conn.aclose()
            raise
        await self.pool.release(conn)
        return bytes(out), framed


async def main_async(config: Path, allow: set[str]) -> None:
    cfg = read_config(config)
    creds = load_credentials(cfg.tls)
    # The same pool as spiffe-pep's, its deadlines checked by the same sweeper.
    sweeper = Sweeper(tick_for((cfg.timeouts.upstream_response,)))
    pool = UpstreamPool(
        cfg.upstreams["app"], cfg.timeouts, cfg.limits.max_idle_upstream_connections, sweeper
    )
    floor = Floor(creds, pool, allow)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweeper.run)
        await trio.serve_tcp(floor.connection, cfg.listen_port, host=cfg.listen_host)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", required=True, help="a spiffe-pep config (listen, tls, app)")
    ap.add_argument("--allow", action="append", default=[], help="an allowed SPIFFE ID")
    args = ap.parse_args(argv)
    trio.run(main_async, Path(args.config), set(args.allow))
    return 0


if __name__ == "__main__":
    sys.exit(main())
