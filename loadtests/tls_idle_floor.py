"""The memory floor of an idle mTLS connection, without any proxy around it.

    python -m loadtests.tls_idle_floor [--connections 1000]

In one process, with no sockets: server-side TLS connections over memory BIOs, each after
a full mTLS handshake (EC P-256, TLS 1.3, no tickets) and one small request/response,
are kept idle while their client side is freed; the RSS growth per connection is what
the TLS library alone costs. Measured for pyOpenSSL (the OpenSSL that cryptography
bundles, the one spiffe-pep uses) with and without ``MODE_RELEASE_BUFFERS``, and for the
standard library's ``ssl`` (the system OpenSSL). Compare with the whole proxy's figure in
``python -m loadtests.compare`` (nginx: about 23 KiB per idle connection).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from proxy import tls as tlsmod
from proxy.devcerts import Issued, issue_ca, issue_svid
from proxy.tls_stream import renew_bios


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def per_connection(make: Callable[[], Any], count: int) -> float:
    keep = [make() for _ in range(50)]  # warm the allocator up
    keep.clear()
    gc.collect()
    before = rss_kib()
    keep = [make() for _ in range(count)]
    gc.collect()
    grown = rss_kib() - before
    del keep
    return grown / count


def _pump(a: SSL.Connection, b: SSL.Connection) -> None:
    moved = True
    while moved:
        moved = False
        for src, dst in ((a, b), (b, a)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            dst.bio_write(data)
            moved = True


def handshake(c: SSL.Connection, s: SSL.Connection) -> None:
    """Client ``c`` and server ``s`` through their handshake, in memory."""
    for _ in range(10):
        for conn in (c, s):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        _pump(c, s)


def pyopenssl(
    server: Issued, client: Issued, release: bool, renew: bool = False
) -> Callable[[], Any]:
    sctx = tlsmod.server_context([server.cert], server.key, "server key")
    cctx = tlsmod.client_context([client.cert], client.key, "client key")
    if not release:
        sctx = SSL.Context(SSL.TLS_METHOD)
        sctx.use_certificate(server.cert)
        sctx.use_privatekey(server.key)
        sctx.set_options(SSL.OP_NO_TICKET)
        sctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        sctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: True)

    def make() -> SSL.Connection:
        s = SSL.Connection(sctx, None)
        s.set_accept_state()
        c = SSL.Connection(cctx, None)
        c.set_connect_state()
        handshake(c, s)
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _pump(c, s)
        s.recv(65536)
        s.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        _pump(s, c)
        c.recv(65536)
        with contextlib.suppress(SSL.WantReadError):
            s.recv(65536)  # idle: waiting for the next request
        if renew:
            renew_bios(s)
        return s

    return make


def stdlib(server: Issued, client: Issued, root: Issued, d: Path) -> Callable[[], Any]:
    def write(name: str, data: bytes) -> str:
        (d / name).write_bytes(data)
        return str(d / name)

    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(write("s.pem", server.chain_pem()), write("sk.pem", server.key_pem()))
    sctx.load_verify_locations(write("ca.pem", root.cert_pem()))
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.options |= ssl.OP_NO_TICKET
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(str(d / "ca.pem"))
    cctx.load_cert_chain(write("c.pem", client.chain_pem()), write("ck.pem", client.key_pem()))
    cctx.check_hostname = False

    def make() -> tuple[Any, ...]:
        si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        s = sctx.wrap_bio(si, so, server_side=True)
        c = cctx.wrap_bio(ci, co)

        def pump() -> None:
            if co.pending:
                si.write(co.read())
            if so.pending:
                ci.write(so.read())

        for _ in range(10):
            for obj in (c, s):
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.do_handshake()
            pump()
        c.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        pump()
        s.read(65536)
        s.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        pump()
        c.read(65536)
        with contextlib.suppress(ssl.SSLWantReadError):
            s.read(65536)
        return s, si, so

    return make


VARIANTS = {
    "pyopenssl-renewed": f"pyOpenSSL, {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}, "
    "MODE_RELEASE_BUFFERS and memory BIOs renewed after the handshake (as spiffe-pep)",
    "pyopenssl": "pyOpenSSL, same OpenSSL, MODE_RELEASE_BUFFERS only",
    "pyopenssl-no-release": "pyOpenSSL, same OpenSSL, without MODE_RELEASE_BUFFERS",
    "stdlib": f"stdlib ssl, {ssl.OPENSSL_VERSION}",
}


def measure(variant: str, count: int) -> float:
    root = issue_ca("example.org")
    server = issue_svid(root, ["spiffe://example.org/server"], dns=["localhost"])
    client = issue_svid(root, ["spiffe://example.org/client"])
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "stdlib":
            make = stdlib(server, client, root, Path(tmp))
        else:
            make = pyopenssl(
                server,
                client,
                release=variant != "pyopenssl-no-release",
                renew=variant == "pyopenssl-renewed",
            )
        return per_connection(make, count)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="measure one, in this process")
    args = ap.parse_args(argv)
    if args.variant:
        print(f"{measure(args.variant, args.connections):.1f}")
        return 0
    # Each variant in a fresh process: memory one freed would be reused by the next.
    print(f"RSS per idle server-side mTLS connection, {args.connections} connections:")
    for variant, name in VARIANTS.items():
        out = subprocess.run(
            [sys.executable, "-m", "loadtests.tls_idle_floor", "--variant", variant,
             "--connections", str(args.connections)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        print(f"  {float(out):6.1f} KiB  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
