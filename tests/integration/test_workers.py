"""--workers: processes sharing the port, a supervisor that replaces a dead worker,
forwards SIGHUP, aggregates metrics, and drains on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from proxy import demo_upstream
from tests.conftest import Pki
from tests.integration.harness import POLICY, free_port, tls_client, wait_until, write_config


async def _requests_counted(admin: int) -> float:
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(f"http://127.0.0.1:{admin}/metrics")).text
    return sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("spiffe_pep_requests_total{")
    )


async def _status(admin: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"http://127.0.0.1:{admin}/status")).json()  # type: ignore[no-any-return]


async def _ready(proc: subprocess.Popen[bytes], admin: int, err_path: Path) -> dict[str, Any]:
    """Until /readyz is 200 (every worker serving); then /status."""
    with trio.fail_after(30):
        while True:
            assert proc.poll() is None, err_path.read_text()
            try:
                async with httpx.AsyncClient() as c:
                    if (await c.get(f"http://127.0.0.1:{admin}/readyz")).status_code == 200:
                        return await _status(admin)
            except httpx.HTTPError:
                pass
            await trio.sleep(0.1)


async def _get(pki: Pki, port: int, path: str) -> int:
    async with httpx.AsyncClient(verify=tls_client(pki)) as c:  # a new connection each time
        return (await c.get(f"https://localhost:{port}{path}")).status_code


@dataclass
class _Supervised:
    """``spiffe-pep run --workers 2`` on ``write_config``'s file (with an admin port), its
    stderr (JSON events) in ``err_path``."""

    proc: subprocess.Popen[bytes]
    cfg: Path
    port: int
    admin: int
    err_path: Path

    @classmethod
    async def start(
        cls,
        nursery: trio.Nursery,
        tmp_path: Path,
        pki: Pki,
        policy_watch: str,
        edit: Callable[[str], str] = lambda text: text,
    ) -> _Supervised:
        """``edit``: a change to the config file's text before start."""
        upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
        port, admin = free_port(), free_port()
        cfg = write_config(
            tmp_path, pki, upstream, listen=f"127.0.0.1:{port}", policy_watch=policy_watch
        )
        cfg.write_text(
            edit(cfg.read_text().replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{admin}"))
        )
        err_path = tmp_path / "supervisor.err"
        with err_path.open("wb") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "2"],
                stdout=subprocess.DEVNULL,
                stderr=err_file,
            )
        return cls(proc, cfg, port, admin, err_path)

    async def ready(self) -> dict[str, Any]:
        return await _ready(self.proc, self.admin, self.err_path)

    def count(self, event: str) -> int:
        return self.err_path.read_text().count(f'"event":"{event}"')

    async def kill_and_replace(self, victim: int) -> dict[str, Any]:
        """SIGKILL worker ``victim``; /status once its replacement serves."""
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(30):
            while True:
                status = await self.ready()
                if victim not in {w["pid"] for w in status["workers"]}:
                    return status
                await trio.sleep(0.1)

    async def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(self.proc.wait, 30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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
                        all(w["alive"] and w["serving"] for w in status["workers"])
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
        # Every request, counted across workers: each writes its counts out every second.
        with trio.fail_after(5):
            while await _requests_counted(admin) < len(codes) + 1:
                await trio.sleep(0.1)

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


SUPERVISOR_EVENTS = {
    "supervising",
    "policy_reloaded",
    "policy_reload_failed",
    "stopping",
    "stopped",
}


def _check_event_stream(err: str) -> list[dict[str, Any]]:
    """Every line is a JSON event; every line a worker wrote names it (index and pid, as
    the supervisor's worker_started line does); the rest are the supervisor's own."""
    events = [json.loads(line) for line in err.splitlines()]  # no plain-text line
    started = {e["pid"]: e["worker"] for e in events if e["event"] == "worker_started"}
    for e in events:
        if e["event"] in ("worker_started", "worker_exited"):
            continue
        if "worker" in e:
            assert started.get(e["pid"]) == e["worker"], e
        else:
            assert e["event"] in SUPERVISOR_EVENTS, e
    return events


async def test_workers_agree_on_the_last_good_policy(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """A bad policy edit is refused once (one event, one count), not once per worker; a
    worker restarted after it serves the last good policy instead of exiting in a loop;
    /status shows the policy the workers serve, before and after a good edit; the
    supervisor's stderr holds JSON events only, each worker's naming it."""
    sup = await _Supervised.start(nursery, tmp_path, pki, policy_watch="200ms")
    port, admin, err_path, ready = sup.port, sup.admin, sup.err_path, sup.ready

    def failed_lines() -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for line in err_path.read_text().splitlines()
            if '"event":"policy_reload_failed"' in line
        ]

    try:
        status = await ready()
        good = status["policy"]["sha256"]
        assert [w["policy_sha256"] for w in status["workers"]] == [good, good]

        # A bad edit: refused, logged and counted once.
        (tmp_path / "policy.yaml").write_text("routes: [\n")
        await wait_until(lambda: failed_lines(), timeout=10)
        await trio.sleep(1)  # time for any worker to (wrongly) log it too
        (line,) = failed_lines()
        assert "worker" not in line and line["kept_sha256"] == good
        async with httpx.AsyncClient() as c:
            metrics = (await c.get(f"http://127.0.0.1:{admin}/metrics")).text
        assert 'spiffe_pep_policy_reloads_total{result="failed"} 1.0' in metrics

        # A worker dies while the file is bad: its replacement serves the last good one.
        status = await sup.kill_and_replace(status["workers"][0]["pid"])
        assert [w["policy_sha256"] for w in status["workers"]] == [good, good]
        assert status["policy"]["sha256"] == good
        assert {await _get(pki, port, f"/g{i}") for i in range(8)} == {200}

        # A good edit reaches every worker, and /status says so.
        denied = POLICY.replace('allow: ["spiffe://example.org/ns/prod/*"]\n', "allow: []\n")
        (tmp_path / "policy.yaml").write_text(denied)
        with trio.fail_after(15):
            while True:
                status = await _status(admin)
                shas = {w["policy_sha256"] for w in status["workers"]}
                if status["policy"]["sha256"] != good and shas == {status["policy"]["sha256"]}:
                    break
                await trio.sleep(0.1)
        assert {await _get(pki, port, f"/d{i}") for i in range(8)} == {403}
        async with httpx.AsyncClient() as c:
            metrics = (await c.get(f"http://127.0.0.1:{admin}/metrics")).text
        assert 'spiffe_pep_policy_reloads_total{result="ok"} 1.0' in metrics
        assert len(failed_lines()) == 1
        await sup.stop()
    finally:
        sup.kill()
    events = _check_event_stream(err_path.read_text())
    assert sum(e["event"] == "worker_started" for e in events) == 3
    assert not [e for e in events if e["event"] == "worker_start_failed"]


async def test_worker_restarted_after_a_bad_config_edit_runs_the_last_good_one(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """The runtime configuration, which each worker reloads on SIGHUP: after a good edit
    (the decision log moves) and a bad one (refused by every worker), a worker that dies
    is replaced by one running the last good configuration, not one failing to start in a
    loop on the bad file."""
    sup = await _Supervised.start(nursery, tmp_path, pki, policy_watch="off")
    try:
        await sup.ready()
        sup.cfg.write_text(sup.cfg.read_text().replace("decisions.jsonl", "decisions2.jsonl"))
        sup.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: sup.count("config_reloaded") == 2, timeout=10)
        sup.cfg.write_text(sup.cfg.read_text() + "timeouts: [\n")  # YAML that does not parse
        sup.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: sup.count("config_reload_failed") == 2, timeout=10)

        status = await sup.ready()
        status = await sup.kill_and_replace(status["workers"][0]["pid"])
        pids = {w["pid"] for w in status["workers"]}
        log = tmp_path / "decisions2.jsonl"
        # New connections, spread by the kernel: the new worker serves some of them, and
        # logs them where the last good configuration says.
        with trio.fail_after(30):
            while True:
                assert await _get(pki, sup.port, "/after") == 200
                served = {json.loads(line)["worker"] for line in log.read_text().splitlines()}
                if pids <= served:
                    break
        assert sup.count("worker_start_failed") == 0
        assert sup.count("worker_config_refused") == 1  # the file, then the copy
        assert sup.count("worker_started") == 3
        await sup.stop()
    finally:
        sup.kill()


async def test_workers_that_cannot_start_pick_up_the_fixed_file(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """Every worker died and none can start (the decision log's directory went away):
    once the file is fixed, the next restart starts from it, though no running worker
    applied it; the copy then holds it."""
    (tmp_path / "logs").mkdir()
    sup = await _Supervised.start(
        nursery,
        tmp_path,
        pki,
        policy_watch="off",
        edit=lambda text: text.replace(
            f"{tmp_path}/decisions.jsonl", f"{tmp_path}/logs/decisions.jsonl"
        ),
    )
    try:
        status = await sup.ready()
        shutil.rmtree(tmp_path / "logs")
        for w in status["workers"]:
            os.kill(w["pid"], signal.SIGKILL)
        await wait_until(lambda: sup.count("worker_start_failed") >= 2, timeout=20)
        sup.cfg.write_text(
            sup.cfg.read_text().replace("logs/decisions.jsonl", "decisions-new.jsonl")
        )
        await sup.ready()
        assert await _get(pki, sup.port, "/fixed") == 200
        log = tmp_path / "decisions-new.jsonl"
        await wait_until(lambda: log.exists() and log.read_text(), timeout=5)
        await sup.stop()
    finally:
        sup.kill()


async def test_a_config_copy_that_cannot_be_written_does_not_fail_the_reload(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """The copy a restarted worker falls back to is a convenience: when it cannot be
    written (here a directory stands where the file was), each worker still applies the
    good edit, says so in a ``config_copy_failed`` event with the path, and serves."""
    sup = await _Supervised.start(nursery, tmp_path, pki, policy_watch="off")
    try:
        status = await sup.ready()
        argv = Path(f"/proc/{status['workers'][0]['pid']}/cmdline").read_bytes().split(b"\0")
        copy = Path(argv[argv.index(b"--config-copy") + 1].decode())
        copy.unlink()
        copy.mkdir()
        sup.cfg.write_text(sup.cfg.read_text().replace("decisions.jsonl", "decisions2.jsonl"))
        sup.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: sup.count("config_copy_failed") == 2, timeout=10)
        assert sup.count("config_reloaded") == 2
        assert f'"path":"{copy}"' in sup.err_path.read_text()
        assert await _get(pki, sup.port, "/after") == 200
        log = tmp_path / "decisions2.jsonl"
        await wait_until(lambda: log.exists() and "/after" in log.read_text(), timeout=5)
        await sup.stop()
    finally:
        sup.kill()
