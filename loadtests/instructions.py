"""Instructions per request of spiffe-pep and the floor forwarder, counted by valgrind.

    python -m loadtests.instructions [--requests 100 600] [--http10] [--handshake]

CPU time per request moves by ±10% between runs on a shared VM; the number of
instructions a process executes for the same requests does not. Each target runs under
``valgrind --tool=callgrind`` (no cache simulation) twice, serving N1 and then N2
requests sent one after another on one keep-alive connection (``--handshake``: a new
mTLS connection per request); (total(N2) - total(N1)) / (N2 - N1) is the cost of one
request, start-up and shutdown cancelling out. Sequential requests leave out what
concurrency changes (batching, cache contention): a deterministic view of the request
path, beside ``loadtests.compare``'s CPU time under load. About 90 s on 2 cores.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests import compare as c

REQUEST_11 = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n"
)
# ab's own request: HTTP/1.0 with keep-alive (what compare's keep-alive ratio measures)
REQUEST_10 = (
    b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: 127.0.0.1\r\n"
    b"User-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n"
)
REQUEST_CLOSE = b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: ApacheBench/2.3\r\n\r\n"
WARM_UP = 20  # requests before the counted ones in every run (pools, caches)


def callgrind_total(text: str) -> int:
    """The instruction total of a callgrind output file."""
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if m is None:
        raise ValueError("no summary or totals line in the callgrind output")
    return int(m.group(1))


def per_request(total_small: int, total_large: int, small: int, large: int) -> float:
    return (total_large - total_small) / (large - small)


def _response(s: ssl.SSLSocket, keep_alive: bool) -> bytes:
    buf = b""
    while True:
        data = s.recv(65536)
        if not data:
            return buf
        buf += data
        if keep_alive and buf.endswith(b"ok"):  # the upstream's body
            return buf


def _requests(lab: c.Lab, port: int, n: int, request: bytes, handshake: bool) -> None:
    ctx = ssl.create_default_context(cafile=str(lab.dir / "root.pem"))
    ctx.load_cert_chain(lab.dir / "client.pem", lab.dir / "client_key.pem")

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=120)
        return ctx.wrap_socket(raw, server_hostname="localhost")

    s = None if handshake else connect()
    for i in range(n):
        conn = connect() if s is None else s
        conn.sendall(request)
        got = _response(conn, s is not None)
        if i == 0 and b" 200 " not in got[:16]:
            raise SystemExit(f"unexpected answer: {got[:200]!r}")
        if s is None:
            conn.close()
    if s is not None:
        s.close()


def count(lab: c.Lab, kind: str, upstream: int, n: int, request: bytes, handshake: bool) -> int:
    """Instructions of one run of ``kind`` ("floor" or "spiffe-pep") serving n requests."""
    port = c.free_port()
    cfg = c.pep_config(lab.dir, f"{kind}-vg", port, {"app": upstream}, 1)
    if kind == "floor":
        cmd = [sys.executable, "-m", "loadtests.floor", "-c", str(cfg), "--allow", c.CLIENT_ID]
    else:
        cmd = [sys.executable, "-m", "proxy", "run", "-c", str(cfg)]
    out = lab.dir / f"callgrind-{kind}-{n}.out"
    valgrind = ["valgrind", "--tool=callgrind", "--cache-sim=no", "--branch-sim=no"]
    with open(lab.dir / f"{kind}-vg.log", "wb") as log:
        proc = subprocess.Popen(
            [*valgrind, f"--callgrind-out-file={out}", *cmd], stdout=log, stderr=subprocess.STDOUT
        )
        lab.procs.append(proc)
        c.wait_port(port, proc, f"{kind} under valgrind", seconds=120)  # a slow start
        _requests(lab, port, WARM_UP + n, request, handshake)
        proc.send_signal(signal.SIGINT if kind == "floor" else signal.SIGTERM)
        proc.wait(300)
    return callgrind_total(out.read_text(errors="replace"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtests.instructions", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--requests", type=int, nargs=2, default=[100, 600], metavar=("N1", "N2"))
    ap.add_argument("--http10", action="store_true", help="ab's HTTP/1.0 keep-alive request")
    ap.add_argument("--handshake", action="store_true", help="a new connection per request")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    small, large = args.requests
    request = REQUEST_CLOSE if args.handshake else REQUEST_10 if args.http10 else REQUEST_11
    c.ensure_tools()
    lab = c.Lab(Path(tempfile.mkdtemp(prefix="spiffe-pep-instructions-")))
    c.write_pki(lab.dir)
    try:
        upstream, nginx, pep = c.start_all(lab)
        lab.stop(pep.proc)
        lab.stop(nginx.proc)
        got = {}
        for kind in ("floor", "spiffe-pep"):
            a = count(lab, kind, upstream, small, request, args.handshake)
            b = count(lab, kind, upstream, large, request, args.handshake)
            got[kind] = per_request(a, b, small, large)
            print(f"{kind}: {got[kind] / 1000:,.1f} k instructions per request", flush=True)
        print(f"spiffe-pep / floor: {got['spiffe-pep'] / got['floor']:.3f}x")
    finally:
        lab.stop_all()
        shutil.rmtree(lab.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
