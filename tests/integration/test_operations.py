"""Operations: slowloris, connection and body limits, graceful drain on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from proxy import demo_upstream
from tests.conftest import Pki
from tests.integration.harness import (
    Proxy,
    curl,
    free_port,
    raw,
    start,
    statuses,
    tls_client,
    wait_listening,
    wait_until,
    write_config,
)

LIMITS = "timeouts: {request_head: 1s, upstream_response: 5s}\nlimits: {max_connections: 3, max_body_bytes: 1KiB}\n"


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    return await start(nursery, tmp_path, pki, timeouts=LIMITS)


async def test_slowloris_gets_408_and_others_are_served(proxy: Proxy) -> None:
    drip = [
        b"GET /orders HTTP/1.1\r\n",
        b"Host: x\r\n",
        b"X-A: 1\r\n",
        b"X-B: 2\r\n",
        b"X-C: 3\r\n",
    ]
    async with trio.open_nursery() as n:
        results: list[bytes] = []

        async def slow() -> None:
            results.append(await raw(proxy, *drip, pause=0.4))  # never finishes its head

        n.start_soon(slow)
        await trio.sleep(0.2)
        assert (await curl(proxy, "/orders")).status == 200
    assert statuses(results[0]) == [408]
    # The 408 is a decision line like any other answer, with a real request id.
    await wait_until(lambda: any(d["status"] == 408 for d in proxy.decisions()))
    (line,) = [d for d in proxy.decisions() if d["status"] == 408]
    assert line["reason"] == "request_head_timeout" and line["decision"] == "error"
    assert line["request_id"] != "-" and line["request_id"].encode() in results[0]


def _open_idle_tls(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw_sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw_sock, server_hostname="localhost")


async def test_max_connections_refused_before_handshake(proxy: Proxy, pki: Pki) -> None:
    ctx = tls_client(pki)
    idle = [await trio.to_thread.run_sync(_open_idle_tls, proxy.port, ctx) for _ in range(3)]
    try:
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            extra = await trio.to_thread.run_sync(_open_idle_tls, proxy.port, ctx)
            extra.close()
        assert "spiffe_pep_connections_refused_total 1.0" in await proxy.metrics()
    finally:
        for s in idle:
            s.close()
    with trio.fail_after(5):
        while (await curl(proxy, "/orders")).status != 200:
            await trio.sleep(0.05)


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
async def test_body_over_limit_is_413(proxy: Proxy, chunked: bool) -> None:
    (proxy.dir / "big").write_bytes(b"x" * 2000)
    args = ["--data-binary", f"@{proxy.dir}/big"]
    if chunked:
        args += ["-H", "Transfer-Encoding: chunked"]
    r = await curl(proxy, "/upload", *args)
    assert r.status == 413 and r.json()["error"] == "payload_too_large"
    assert proxy.decisions()[-1]["reason"] == "request_body_too_large"
    (proxy.dir / "small").write_bytes(b"x" * 1000)
    assert (await curl(proxy, "/upload", "--data-binary", f"@{proxy.dir}/small")).status == 200


async def test_sigterm_drains_in_flight_requests(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(
        tmp_path, pki, upstream, listen=f"127.0.0.1:{port}", timeouts="timeouts: {drain: 10s}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = [
            "curl",
            "-sS",
            *pki.client_args(),
            "-w",
            " %{http_code}",
        ]
        with trio.fail_after(15):
            while (
                await trio.run_process(
                    [*base, f"https://localhost:{port}/x"], capture_stdout=True, check=False
                )
            ).returncode:
                await trio.sleep(0.1)
        results: list[bytes] = []

        async def slow() -> None:
            r = await trio.run_process(
                [*base, f"https://localhost:{port}/sleep/1.5"], capture_stdout=True, check=False
            )
            results.append(r.stdout)

        async with trio.open_nursery() as n:
            n.start_soon(slow)
            await trio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            await trio.sleep(0.3)
            # No longer accepting: a new connection is refused.
            with pytest.raises(OSError):
                s2 = await trio.open_tcp_stream("127.0.0.1", port)
                await s2.aclose()
        assert results and results[0].endswith(b" 200"), results  # the in-flight one finished
        code = await trio.to_thread.run_sync(proc.wait, 10)
        assert code == 0
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert '"event":"draining"' in stderr and '"event":"drained"' in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGUSR1, 1), (signal.SIGHUP, 1), (signal.SIGUSR1, 2)],
    ids=["sigusr1", "sighup", "sigusr1_to_the_supervisor_of_2_workers"],
)
async def test_log_files_are_reopened_after_logrotate(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, signum: int, workers: int
) -> None:
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    port = free_port()
    decisions, events = tmp_path / "decisions.jsonl", tmp_path / "events.log"
    cfg = write_config(
        tmp_path, pki, upstream, listen=f"127.0.0.1:{port}", extra=f"event_log: {events}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", str(workers)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"https://localhost:{port}/x"
    try:
        await wait_listening(port, proc)
        await wait_until(
            lambda: sum(e["event"] == "listening" for e in _jsonl(events)) == workers, 15
        )
        assert (await trio.run_process(["curl", "-sS", *pki.client_args(), url])).returncode == 0
        await wait_until(lambda: len(_jsonl(decisions)) == 1)
        # logrotate's default (create): rename the files, create new ones, signal.
        for log in (decisions, events):
            log.rename(log.with_name(log.name + ".1"))
            log.touch()
        proc.send_signal(signum)
        processes = workers + (workers > 1)  # and the supervisor
        await wait_until(
            lambda: sum(e["event"] == "logs_reopened" for e in _jsonl(events)) == processes
        )
        for _ in range(10):  # new connections, spread over the workers
            done = await trio.run_process(["curl", "-sS", *pki.client_args(), url])
            assert done.returncode == 0
        await wait_until(lambda: len(_jsonl(decisions)) == 10)
        assert len(_jsonl(tmp_path / "decisions.jsonl.1")) == 1  # nothing more in the old one
        assert not any(e["event"] == "logs_reopened" for e in _jsonl(tmp_path / "events.log.1"))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(proc.wait, 30)
    assert code == 0, proc.stderr.read().decode() if proc.stderr else ""


@pytest.mark.parametrize("workers", [1, 2], ids=["one_process", "supervisor_and_workers"])
async def test_request_cut_by_a_second_sigterm_is_logged_as_such(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, workers: int
) -> None:
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    port = free_port()
    cfg = write_config(
        tmp_path, pki, upstream, listen=f"127.0.0.1:{port}", timeouts="timeouts: {drain: 30s}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", str(workers)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_listening(port, proc)
        await trio.sleep(0.5 * workers)  # every worker listening
        slow = await trio.lowlevel.open_process(
            ["curl", "-sS", *pki.client_args(), f"https://localhost:{port}/sleep/20"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await trio.sleep(1)  # the request is at the upstream
        proc.send_signal(signal.SIGTERM)  # drains: the request may finish...
        await trio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # ...until the second one stops at once
        code = await trio.to_thread.run_sync(proc.wait, 10)
        with trio.fail_after(10):
            await slow.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0
    (line,) = _jsonl(tmp_path / "decisions.jsonl")
    assert line["path"] == "/sleep/20" and line["decision"] == "allow"
    assert line["reason"] == "proxy_stopped" and line["status"] == 503, line


async def _http(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with httpx.AsyncClient() as c:
        r = await c.get(url)
        return r.status_code, r.json(), dict(r.headers)


@pytest.mark.parametrize("workers", [1, 2], ids=["one_process", "supervisor_and_workers"])
async def test_sigterm_keeps_accepting_for_the_grace_then_drains(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, workers: int
) -> None:
    """Behind a Service: after SIGTERM new connections are still served (with
    Connection: close) for timeouts.shutdown_grace while /readyz says 503 draining, so the
    endpoint is removed before the proxy stops answering; then it stops accepting, and the
    request in flight finishes; /readyz says draining all along."""
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    port, admin = free_port(), free_port()
    cfg = write_config(
        tmp_path,
        pki,
        upstream,
        listen=f"127.0.0.1:{port}",
        timeouts="timeouts: {drain: 10s, shutdown_grace: 1500ms}\n",
    )
    cfg.write_text(cfg.read_text().replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{admin}"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", str(workers)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = ["curl", "-sS", *pki.client_args(), "-D", "-", "-w", "\n%{http_code}"]
    readyz = f"http://127.0.0.1:{admin}/readyz"
    try:
        with trio.fail_after(30):
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                try:
                    ready = (await _http(readyz))[0] == 200
                except httpx.HTTPError:
                    ready = False
                r = await trio.run_process(
                    [*base, f"https://localhost:{port}/x"], capture_stdout=True, check=False
                )
                if ready and r.stdout.endswith(b"\n200"):
                    break
                await trio.sleep(0.1)
        results: list[bytes] = []

        async def slow() -> None:
            r = await trio.run_process(
                [*base, f"https://localhost:{port}/sleep/4"], capture_stdout=True, check=False
            )
            results.append(r.stdout)

        async with trio.open_nursery() as n:
            n.start_soon(slow)
            await trio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            await trio.sleep(0.3)
            # Within the grace: a new connection is served, told to close; not ready.
            r = await trio.run_process(
                [*base, f"https://localhost:{port}/during-grace"], capture_stdout=True, check=False
            )
            assert r.stdout.endswith(b"\n200"), r.stdout
            assert b"\nconnection: close\r\n" in r.stdout.lower()
            status, doc, _ = await _http(readyz)
            assert (status, doc["problems"]) == (503, ["draining"])
            assert (await _http(f"http://127.0.0.1:{admin}/healthz"))[0] == 200
            # After the grace: no longer accepting; still draining the slow request.
            await trio.sleep(1.7)
            with pytest.raises(OSError):
                s2 = await trio.open_tcp_stream("127.0.0.1", port)
                await s2.aclose()
            status, doc, _ = await _http(readyz)
            assert (status, doc["problems"]) == (503, ["draining"])
            assert not results  # the slow request is still in flight
        assert results and results[0].endswith(b"\n200"), results
        code = await trio.to_thread.run_sync(proc.wait, 20)
        assert code == 0
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        for event in ("stopping", "shutdown_grace", "draining", "drained"):
            assert f'"event":"{event}"' in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
