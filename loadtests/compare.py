"""spiffe-pep next to nginx as an mTLS reverse proxy, on one machine, in one run.

    python -m loadtests.compare [--reps 3] [--json results.json]

Installs nginx and ApacheBench from Debian's packages if missing, starts a fast upstream
(nginx ``return 200``), nginx as an mTLS reverse proxy (1 worker, upstream keep-alive) and
spiffe-pep (1 worker, the full policy evaluation and decision log on), all on 127.0.0.1.
Then, interleaving the targets over ``--reps`` repetitions: ApacheBench with ``-E`` in
keep-alive and in handshake-per-request mode, and the project's own generator; the p99 of
each at half of spiffe-pep's own maximum rate (each proxy on a core of its own, the
generator and the upstream on the other); RSS per idle mTLS connection over 1,000
idle connections; and spiffe-pep with ``--workers 2``. Proxy CPU per request is the
utime+stime of the proxy's processes over the requests completed. Everything it started
is stopped; every loop is bounded; it finishes in a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.loadgen import Options
from loadtests.loadgen import run as loadgen_run
from proxy.devcerts import Issued, issue_ca, issue_svid

CLIENT_ID = "spiffe://example.org/ns/prod/sa/client"
SERVER_ID = "spiffe://example.org/ns/edge/sa/spiffe-pep"
TICKS = os.sysconf("SC_CLK_TCK")


def ensure_tools() -> None:
    missing = [
        pkg
        for tool, pkg in (("nginx", "nginx"), ("ab", "apache2-utils"))
        if shutil.which(tool) is None
    ]
    if not missing:
        return
    print(f"installing {' '.join(missing)} from Debian's packages", file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (nginx master + worker, a supervisor + workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_seconds(root: int) -> float:
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def _place(root: int, cpus: set[int]) -> None:
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def core_of_its_own(lab: Lab, target: Target) -> Iterator[None]:
    """The target's processes on one CPU; the rest of the lab (the upstream, the other
    targets, this process and the load generator it forks) on the others; all restored
    afterwards. For the latency runs: with the generator, the upstream and the proxy
    sharing two cores, the scheduler's placement, not the proxy, made the tail (nginx's
    p99 at a fixed rate ranged 1.6-2.2 ms, spiffe-pep's 2.4-6.8 ms, in one run)."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        yield
        return
    own_cpu = {min(cpus)}
    rest = cpus - own_cpu
    for proc in lab.procs:
        if proc.poll() is None:
            _place(proc.pid, own_cpu if proc is target.proc else rest)
    os.sched_setaffinity(0, rest)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        for proc in lab.procs:
            if proc.poll() is None:
                _place(proc.pid, cpus)


def rss_bytes(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"


@dataclass
class Lab:
    dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, cmd: list[str], port: int, what: str, **kw: Any) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{what}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs.append(proc)
        wait_port(port, proc, what)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def write_pki(d: Path) -> Issued:
    """CA, server and client SVIDs (and ab's combined PEM) in ``d``; returns the
    intermediate CA, for callers that issue more."""
    root = issue_ca("example.org")
    inter = issue_ca("example.org", parent=root, common_name="example.org intermediate")
    server = issue_svid(inter, [SERVER_ID], dns=["localhost"], ips=["127.0.0.1"])
    client = issue_svid(inter, [CLIENT_ID])
    (d / "root.pem").write_bytes(root.cert_pem())
    (d / "server.pem").write_bytes(server.chain_pem())
    (d / "server_key.pem").write_bytes(server.key_pem())
    (d / "client.pem").write_bytes(client.chain_pem())
    (d / "client_key.pem").write_bytes(client.key_pem())
    (d / "ab.pem").write_bytes(client.chain_pem() + client.key_pem())  # ab -E: cert then key
    return inter


def nginx_conf(d: Path, name: str, body: str) -> Path:
    conf = d / f"{name}.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        daemon off;
        worker_processes 1;
        pid {d}/{name}.pid;
        error_log {d}/{name}-error.log warn;
        worker_rlimit_nofile 8192;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            keepalive_requests 1000000;
            keepalive_timeout 120s;
        """)
        + textwrap.indent(body, "    ")
        + "}\n"
    )
    return conf


def start_all(lab: Lab, workers: int = 1) -> tuple[int, Target, Target]:
    d = lab.dir
    up = free_port()
    conf = nginx_conf(
        d, "upstream", f"server {{ listen 127.0.0.1:{up}; location / {{ return 200 'ok'; }} }}\n"
    )
    lab.start(
        ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "upstream-error.log")],
        up,
        "upstream",
    )
    ng = free_port()
    conf = nginx_conf(
        d,
        "nginx-mtls",
        textwrap.dedent(f"""\
        upstream app {{ server 127.0.0.1:{up}; keepalive 64; }}
        server {{
            listen 127.0.0.1:{ng} ssl;
            ssl_certificate {d}/server.pem;
            ssl_certificate_key {d}/server_key.pem;
            ssl_client_certificate {d}/root.pem;
            ssl_verify_client on;
            ssl_verify_depth 3;
            access_log {d}/nginx-access.log;
            location / {{
                proxy_pass http://app;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header X-Forwarded-For $remote_addr;
            }}
        }}
        """),
    )
    nginx = lab.start(
        ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "nginx-error.log")], ng, "nginx-mtls"
    )
    pep = spiffe_pep(lab, up, workers)
    return up, Target("nginx", ng, nginx), pep


def pep_config(
    d: Path, name: str, port: int, upstreams: dict[str, int], workers: int, extra: str = ""
) -> Path:
    """``d/<name>.yaml``: spiffe-pep on 127.0.0.1:``port`` with ``write_pki``'s SVID and
    bundle, ``d/policy.yaml``, plain-HTTP upstreams on loopback ports, its decision log at
    ``d/<name>.jsonl``, no admin listener; ``extra`` is more YAML."""
    ups = "".join(f'\n  {n}: {{url: "http://127.0.0.1:{p}"}}' for n, p in upstreams.items())
    cfg = d / f"{name}.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        listen: 127.0.0.1:{port}
        tls:
          svid: {d}/server.pem
          key: {d}/server_key.pem
          bundles: {{example.org: {d}/root.pem}}
        decision_log: {d}/{name}.jsonl
        policy: policy.yaml
        admin: off
        workers: {workers}
        """)
        + f"upstreams:{ups}\n"
        + extra
    )
    return cfg


def spiffe_pep(lab: Lab, upstream: int, workers: int) -> Target:
    d = lab.dir
    port = free_port()
    (d / "policy.yaml").write_text(
        textwrap.dedent("""\
        routes:
          - name: health
            match: {path: /healthz}
            upstream: app
            allow: ["spiffe://example.org/*"]
          - name: all
            match: {path_prefix: /}
            upstream: app
            allow: ["spiffe://example.org/ns/prod/*"]
            deny: ["spiffe://example.org/ns/prod/sa/batch"]
        """)
    )
    cfg = pep_config(d, f"spiffe-pep-{workers}", port, {"app": upstream}, workers)
    proc = lab.start(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg)], port, f"spiffe-pep-{workers}"
    )
    return Target(f"spiffe-pep x{workers}" if workers > 1 else "spiffe-pep", port, proc)


def floor(lab: Lab, upstream: int) -> Target:
    """The floor forwarder (``loadtests/floor.py``) on the same TLS files and upstream."""
    port = free_port()
    cfg = pep_config(lab.dir, "floor", port, {"app": upstream}, 1)
    proc = lab.start(
        [sys.executable, "-m", "loadtests.floor", "-c", str(cfg), "--allow", CLIENT_ID],
        port,
        "floor",
    )
    return Target("floor", port, proc)


AB_PATTERNS = {
    "rps": r"Requests per second:\s+([\d.]+)",
    "complete": r"Complete requests:\s+(\d+)",
    "failed": r"Failed requests:\s+(\d+)",
    "keepalive": r"Keep-Alive requests:\s+(\d+)",
    "p50": r"^\s+50%\s+(\d+)",
    "p99": r"^\s+99%\s+(\d+)",
}


def ab(lab: Lab, target: Target, keepalive: bool, n: int, c: int = 32) -> dict[str, float]:
    cmd = ["ab", "-q", "-c", str(c), "-n", str(n), "-E", str(lab.dir / "ab.pem")]
    if keepalive:
        cmd.insert(1, "-k")
    cpu0 = cpu_seconds(target.proc.pid)
    out = subprocess.run([*cmd, target.url], capture_output=True, text=True, timeout=240).stdout
    cpu = cpu_seconds(target.proc.pid) - cpu0
    got = {}
    for key, pattern in AB_PATTERNS.items():
        m = re.search(pattern, out, re.M)
        got[key] = float(m.group(1)) if m else float("nan")
    if keepalive and got["keepalive"] < got["complete"] * 0.99:
        print(
            f"  WARNING: {target.name}: only {got['keepalive']:.0f} of {got['complete']:.0f} "
            "requests were keep-alive",
            file=sys.stderr,
        )
    got["cpu_us"] = cpu / max(got["complete"], 1) * 1e6
    return got


def own(
    lab: Lab, target: Target, mode: str, seconds: float, rate: float | None = None, c: int = 32
) -> dict[str, float]:
    o = Options(
        target.url,
        str(lab.dir / "client.pem"),
        str(lab.dir / "client_key.pem"),
        str(lab.dir / "root.pem"),
        c,
        seconds,
        None,
        mode,
        rate,
        1,
    )
    cpu0 = cpu_seconds(target.proc.pid)
    r = loadgen_run(o, progress=False)
    cpu = cpu_seconds(target.proc.pid) - cpu0
    return {
        "rps": r["requests_per_s"],
        "p50": r["latency_ms"]["p50"],
        "p99": r["latency_ms"]["p99"],
        "errors": sum(r["errors"].values()),
        "cpu_us": cpu / max(r["completed"], 1) * 1e6,
    }


def idle_rss_per_connection(lab: Lab, target: Target, count: int = 1000) -> float:
    """RSS growth of the proxy over ``count`` idle mTLS connections, each after one request."""
    ctx = ssl.create_default_context(cafile=str(lab.dir / "root.pem"))
    ctx.load_cert_chain(lab.dir / "client.pem", lab.dir / "client_key.pem")
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    time.sleep(0.5)
    before = rss_bytes(target.proc.pid)
    conns = []
    try:
        for _ in range(count):
            s = ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", target.port), timeout=10),
                server_hostname="localhost",
            )
            s.sendall(request)
            s.recv(65536)
            conns.append(s)
        time.sleep(1.0)
        after = rss_bytes(target.proc.pid)
    finally:
        for s in conns:
            s.close()
    return (after - before) / count


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(reps: int, ab_ka: int, ab_hs: int, seconds: float) -> dict[str, Any]:
    ensure_tools()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    lab = Lab(Path(tempfile.mkdtemp(prefix="spiffe-pep-compare-")))
    write_pki(lab.dir)
    results: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    t0 = time.monotonic()
    try:
        up, nginx, pep = start_all(lab)
        targets = [nginx, floor(lab, up), pep]
        for t in targets:  # warm up: first handshakes, pools, imports
            ab(lab, t, True, 500)
        rows: dict[str, dict[str, list[float]]] = {}

        def add(key: str, got: dict[str, float]) -> None:
            for k, v in got.items():
                rows.setdefault(key, {}).setdefault(k, []).append(v)

        for rep in range(reps):  # interleaved, so drift hits both alike
            for t in targets if rep % 2 == 0 else reversed(targets):
                # Two keep-alive samples per repetition, around the handshake run: CPU
                # per request moves by up to 15% between single runs on a shared host,
                # and the ratio is read from the medians.
                add(f"{t.name}|ab keep-alive", ab(lab, t, True, ab_ka))
                add(f"{t.name}|ab handshake", ab(lab, t, False, ab_hs))
                add(f"{t.name}|ab keep-alive", ab(lab, t, True, ab_ka))
            print(
                f"  repetition {rep + 1}/{reps} done ({time.monotonic() - t0:.0f}s)",
                file=sys.stderr,
            )
        for t in targets:
            add(f"{t.name}|own keep-alive", own(lab, t, "keepalive", seconds))
            add(f"{t.name}|own handshake", own(lab, t, "handshake", seconds))
        half = median(rows["spiffe-pep|ab keep-alive"]["rps"]) / 2
        for rep in range(reps):  # p99 must hold in every run: each repetition is kept
            for t in targets if rep % 2 == 0 else reversed(targets):
                with core_of_its_own(lab, t):
                    got = own(lab, t, "keepalive", seconds, rate=half)
                add(f"{t.name}|own at half rate", got)
        memory = {t.name: idle_rss_per_connection(lab, t) for t in targets}
        lab.stop(pep.proc)
        pep2 = spiffe_pep(lab, up, 2)
        ab(lab, pep2, True, 500)
        for _ in range(reps):
            add(f"{pep2.name}|ab keep-alive", ab(lab, pep2, True, ab_ka))
        lab.stop(pep2.proc)
        table = {key: {k: median(v) for k, v in vals.items()} for key, vals in rows.items()}
        # each run's p99 of every target, to tell a slow run of one from a slow machine
        results["p99_ms_at_half_rate"] = {
            t.name: rows[f"{t.name}|own at half rate"]["p99"] for t in targets
        }
        results["keepalive_cpu_us"] = {
            t.name: rows[f"{t.name}|ab keep-alive"]["cpu_us"] for t in targets
        }
        nginx_p99 = rows["nginx|own at half rate"]["p99"]
        pep_p99 = rows["spiffe-pep|own at half rate"]["p99"]
        results["p99_ratios_at_half_rate"] = [
            p / n for p, n in zip(pep_p99, nginx_p99, strict=True)
        ]
        # The floor's too: what the stack alone gets at the same rate in the same run.
        results["floor_p99_ratios_at_half_rate"] = [
            p / n for p, n in zip(rows["floor|own at half rate"]["p99"], nginx_p99, strict=True)
        ]
        results.update(
            table=table,
            idle_rss_bytes_per_connection=memory,
            half_rate=half,
            elapsed_s=round(time.monotonic() - t0, 1),
            reps=reps,
        )
    finally:
        lab.stop_all()
        shutil.rmtree(lab.dir, ignore_errors=True)
    return results


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(r: dict[str, Any]) -> Iterator[str]:
    t = r["table"]
    yield "| target | load | req/s | p50 ms | p99 ms | proxy CPU µs/req |"
    yield "|---|---|---:|---:|---:|---:|"
    for key, v in t.items():
        name, load = key.split("|")
        yield (
            f"| {name} | {load} | {v['rps']:,.0f} | {v['p50']:.1f} | {v['p99']:.1f} | "
            f"{v['cpu_us']:,.0f} |"
        )
    n, p = "nginx", "spiffe-pep"
    ka_n, ka_p = t[f"{n}|ab keep-alive"], t[f"{p}|ab keep-alive"]
    hs_n, hs_p = t[f"{n}|ab handshake"], t[f"{p}|ab handshake"]
    half_n, half_p = t[f"{n}|own at half rate"], t[f"{p}|own at half rate"]
    mem = r["idle_rss_bytes_per_connection"]
    w2 = t.get("spiffe-pep x2|ab keep-alive")
    f = "floor"
    if f"{f}|ab keep-alive" in t:
        ka_f, hs_f = t[f"{f}|ab keep-alive"], t[f"{f}|ab handshake"]
        yield ""
        yield "| target (spiffe-pep / floor forwarder, same run) | measured | goal |"
        yield "|---|---:|---:|"
        samples = r.get("keepalive_cpu_us", {})
        pairs = [a / b for a, b in zip(samples.get(p, []), samples.get(f, []), strict=True)]
        spread = f"; single runs {min(pairs):.2f}-{max(pairs):.2f}x" if pairs else ""
        yield (
            f"| keep-alive CPU/request (median of {len(pairs) or 'the'} runs each) | "
            f"{ka_p['cpu_us']:,.0f} vs {ka_f['cpu_us']:,.0f} µs "
            f"({ratio(ka_p['cpu_us'], ka_f['cpu_us'])}{spread}) | <= 1.2x |"
        )
        yield (f"| handshake req/s (ab, c=32) | {ratio(hs_p['rps'], hs_f['rps'])} | >= 1.0x |")
        yield (
            f"| handshake CPU/request (floor/pep: above 1 is pep cheaper) | "
            f"{hs_f['cpu_us']:,.0f} vs {hs_p['cpu_us']:,.0f} µs "
            f"({ratio(hs_f['cpu_us'], hs_p['cpu_us'])}) | >= 1.0x |"
        )
        floor_each = ", ".join(f"{x:.2f}x" for x in r.get("floor_p99_ratios_at_half_rate", []))
        if floor_each:
            yield (
                f"| the floor's p99 at half rate / nginx's (each run; the stack alone) | "
                f"{floor_each} | (info) |"
            )
        if f in mem:
            yield f"| idle mTLS connection memory (floor) | {mem[f] / 1024:.1f} KiB | (info) |"
    yield ""
    yield "| target (spiffe-pep / nginx, same run) | measured | goal |"
    yield "|---|---:|---:|"
    yield (
        f"| keep-alive throughput per core (CPU/request) | "
        f"{ratio(ka_n['cpu_us'], ka_p['cpu_us'])} | >= 0.25x |"
    )
    yield f"| keep-alive req/s (ab, c=32) | {ratio(ka_p['rps'], ka_n['rps'])} | (info) |"
    yield (
        f"| handshake per request req/s (ab, c=32) | {ratio(hs_p['rps'], hs_n['rps'])} | >= 1.0x |"
    )
    yield (
        f"| handshake CPU/request | {ratio(hs_n['cpu_us'], hs_p['cpu_us'])} (nginx/pep) | (info) |"
    )
    yield (
        f"| idle mTLS connection memory | {mem[p] / 1024:.1f} KiB vs {mem[n] / 1024:.1f} KiB "
        f"({ratio(mem[p], mem[n])}) | <= 1.0x |"
    )
    each = ", ".join(f"{x:.2f}x" for x in r.get("p99_ratios_at_half_rate", []))
    yield (
        f"| p99 at {r['half_rate']:,.0f} req/s (half of pep's max; proxy on its own core) | "
        f"{half_p['p99']:.1f} ms vs "
        f"{half_n['p99']:.1f} ms ({ratio(half_p['p99'], half_n['p99'])}; each run: {each}) "
        "| <= 2x in every run |"
    )
    if w2:
        yield (
            f"| --workers 2 vs 1 (ab keep-alive req/s, ab on the same 2 cores) | "
            f"{ratio(w2['rps'], ka_p['rps'])} | (info) |"
        )
        # Throughput per worker is 1e6 / CPU-per-request when each has a core: two
        # workers give 2 x (1 worker's CPU/request) / (their CPU/request) times one.
        yield (
            f"| --workers 2 vs 1 at a core each (CPU/request {w2['cpu_us']:,.0f} vs "
            f"{ka_p['cpu_us']:,.0f} µs) | {2 * ka_p['cpu_us'] / w2['cpu_us']:.2f}x | >= 1.8x |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtests.compare", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ab-keepalive", type=int, default=10000, help="requests per ab -k run")
    ap.add_argument("--ab-handshake", type=int, default=1500, help="requests per ab run")
    ap.add_argument("--seconds", type=float, default=4.0, help="per run of our generator")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument(
        "--keepalive-only",
        action="store_true",
        help="only the floor and spiffe-pep under ab -k, --reps interleaved runs (about "
        "10 s each): the keep-alive ratio, for trying a change",
    )
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="only the p99 at half of spiffe-pep's max rate, for nginx, the floor and "
        "spiffe-pep, --reps interleaved runs of --seconds each, and how many were over 2x",
    )
    args = ap.parse_args(argv)
    if args.keepalive_only or args.latency_only:
        from loadtests import series  # it builds on this module

        if args.latency_only:
            print("\n".join(series.latency_report(series.latency_series(args.reps, args.seconds))))
            return 0
        quick = series.keepalive_ratio(args.reps, args.ab_keepalive)
        for name, values in quick["cpu_us"].items():
            runs = ", ".join(f"{v:,.0f}" for v in values)
            print(f"{name}: CPU µs/request {runs} (median {median(values):,.0f})")
        print(f"spiffe-pep / floor: {quick['ratio']:.2f}x (goal <= 1.2x)")
        return 0
    result = run(args.reps, args.ab_keepalive, args.ab_handshake, args.seconds)
    for line in report(result):
        print(line)
    print(f"\n({result['reps']} interleaved repetitions, medians; {result['elapsed_s']} s in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
