"""The benchmarks keep working (they are run small here; timing is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_policy_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.bench_policy",
            "--routes",
            "30",
            "--patterns",
            "12",
            "--decisions",
            "300",
            "--naive-decisions",
            "50",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["decisions"] == 300 and 0.5 < result["allowed_fraction"] < 0.9
    assert "median" in done.stdout
