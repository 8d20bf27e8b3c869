"""200 MB each way through a real ``spiffe-pep run`` process: bodies stream, never
buffered whole (the proxy's peak RSS grows by less than 50 MB)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from proxy import demo_upstream
from tests.conftest import Pki
from tests.integration.harness import free_port, wait_listening, write_config

SIZE = 200 * 1024 * 1024
RSS_BUDGET = 50 * 1024 * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_200mb_each_way_with_bounded_memory(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    upstream_port = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    port = free_port()
    cfg = write_config(tmp_path, pki, upstream_port, listen=f"127.0.0.1:{port}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_listening(port, proc)
        base = [
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "120",
            *pki.client_args(),
        ]
        url = f"https://localhost:{port}"
        await trio.run_process([*base, "-o", "/dev/null", f"{url}/warmup"])
        baseline = _status_kib(proc.pid, "VmRSS")

        payload = tmp_path / "payload"
        with payload.open("wb") as f:
            f.truncate(SIZE)  # sparse: the test itself holds nothing in memory
        for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
            up = await trio.run_process(
                [*base, "-T", str(payload), *extra, f"{url}/upload"], capture_stdout=True
            )
            assert f'"body_bytes": {SIZE}' in up.stdout.decode()
        down = await trio.run_process(
            [*base, "-o", "/dev/null", "-w", "%{size_download}", f"{url}/bytes/{SIZE}"],
            capture_stdout=True,
        )
        assert int(down.stdout) == SIZE

        peak = _status_kib(proc.pid, "VmHWM")
        assert peak - baseline < RSS_BUDGET, f"RSS grew {(peak - baseline) >> 20} MiB"
        with trio.fail_after(5):  # the proxy logs a request just after its response
            while len((tmp_path / "decisions.jsonl").read_text().splitlines()) < 4:
                await trio.sleep(0.02)
        log = (tmp_path / "decisions.jsonl").read_text().splitlines()
        assert f'"bytes_in":{SIZE}' in log[1] and f'"bytes_in":{SIZE}' in log[2]
        assert f'"bytes_out":{SIZE}' in log[3]
    finally:
        proc.terminate()
        proc.wait(10)
