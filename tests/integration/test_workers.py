"""--workers: processes sharing the port, a supervisor that replaces a dead worker,
forwards SIGHUP, aggregates metrics, and drains on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from proxy import demo_upstream
from tests.conftest import Pki
from tests.integration.harness import POLICY, free_port, tls_client, write_config


async def _status(admin: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"http://127.0.0.1:{admin}/status")).json()  # type: ignore[no-any-return]


async def _get(pki: Pki, port: int, path: str) -> int:
    async with httpx.AsyncClient(verify=tls_client(pki)) as c:  # a new connection each time
        return (await c.get(f"https://localhost:{port}{path}")).status_code


async def test_workers_share_port_restart_reload_and_drain(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    port, admin = free_port(), free_port()
    cfg = write_config(tmp_path, pki, upstream, listen=f"127.0.0.1:{port}", policy_watch="off")
    cfg.write_text(cfg.read_text().replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{admin}"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(20):
            while True:
                try:
                    status = await _status(admin)
                    if (
                        all(w["alive"] for w in status["workers"])
                        and await _get(pki, port, "/x") == 200
                    ):
                        break
                except (httpx.HTTPError, OSError):
                    pass
                await trio.sleep(0.1)
        pids = {w["pid"] for w in status["workers"]}
        assert len(pids) == 2 and proc.pid not in pids

        # Both workers serve (the kernel spreads new connections across their sockets).
        codes = [await _get(pki, port, f"/n{i}") for i in range(40)]
        assert set(codes) == {200}
        log = tmp_path / "decisions.jsonl"
        with trio.fail_after(5):  # each worker logs a request just after its response
            while len(log.read_text().splitlines()) < len(codes) + 1:
                await trio.sleep(0.02)
        served = {
            json.loads(line)["worker"]
            for line in (tmp_path / "decisions.jsonl").read_text().splitlines()
        }
        assert served == pids
        async with httpx.AsyncClient() as c:
            metrics = (await c.get(f"http://127.0.0.1:{admin}/metrics")).text
        total = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("spiffe_pep_requests_total{")
        )
        assert total >= len(codes) + 1  # every request, counted across workers

        # Kill one worker: the supervisor starts a new one; service goes on meanwhile, and
        # goes on until the replacement has served requests itself.
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(20):
            while True:
                status = await _status(admin)
                now = {w["pid"] for w in status["workers"] if w["alive"]}
                assert await _get(pki, port, "/during") == 200
                served = {json.loads(line)["worker"] for line in log.read_text().splitlines()}
                if len(now) == 2 and victim not in now and now <= served:
                    break
                await trio.sleep(0.05)
        assert sum(w["restarts"] for w in status["workers"]) == 1

        # SIGHUP to the supervisor reaches every worker: they reload the policy.
        (tmp_path / "policy.yaml").write_text(
            POLICY.replace('allow: ["spiffe://example.org/ns/prod/*"]\n', "allow: []\n")
        )
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while any([await _get(pki, port, f"/r{i}") != 403 for i in range(6)]):
                await trio.sleep(0.2)

        proc.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(proc.wait, 30)
        assert code == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert '"event":"worker_exited"' in err and '"event":"stopped"' in err
        (tmp_path / "supervisor.err").write_text(err)
        assert err.count('"event":"drained"') >= 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
