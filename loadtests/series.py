"""One goal of issue 16 at a time, over many interleaved repetitions (for trying a change,
or for telling the proxy's variance from the host's; the full ``compare`` run is what
RESULTS.md reports):

    python -m loadtests.compare --keepalive-only [--reps 6]
    python -m loadtests.compare --latency-only [--reps 12] [--seconds 4]

The keep-alive series gives the floor's and spiffe-pep's CPU per request under ``ab -k``.
The latency series gives the p99 of nginx, the floor and spiffe-pep at half of
spiffe-pep's maximum rate (each proxy on a core of its own), each repetition's ratios to
nginx, and how many repetitions were over 2x for the floor and for spiffe-pep: the floor
is the least any proxy on this stack does, so a repetition in which it, too, is over
says the tail came from the stack at half load on this host, not from spiffe-pep's work.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.compare import (
    Lab,
    ab,
    core_of_its_own,
    ensure_tools,
    floor,
    median,
    own,
    start_all,
    write_pki,
)

P99_LIMIT = 2.0  # issue 16: p99 at half rate at most 2x nginx's, in every run


def keepalive_ratio(reps: int, n: int) -> dict[str, Any]:
    """The floor and spiffe-pep under ``ab -k``, interleaved ``reps`` times: their CPU per
    request and the ratio of the medians."""
    ensure_tools()
    lab = Lab(Path(tempfile.mkdtemp(prefix="spiffe-pep-compare-")))
    write_pki(lab.dir)
    try:
        up, _nginx, pep = start_all(lab)
        targets = [floor(lab, up), pep]
        for t in targets:
            ab(lab, t, True, 1000)
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        for rep in range(reps):
            for t in targets if rep % 2 == 0 else reversed(targets):
                cpu[t.name].append(ab(lab, t, True, n)["cpu_us"])
    finally:
        lab.stop_all()
        shutil.rmtree(lab.dir, ignore_errors=True)
    return {"cpu_us": cpu, "ratio": median(cpu["spiffe-pep"]) / median(cpu["floor"])}


@dataclass(frozen=True)
class LatencySeries:
    rate: float  # requests/s, half of spiffe-pep's median ab -k rate
    p99_ms: dict[str, list[float]]  # per target, one per repetition
    cpu_us: dict[str, list[float]]  # per target, CPU per request in each repetition

    def ratios(self, name: str) -> list[float]:
        return [p / n for p, n in zip(self.p99_ms[name], self.p99_ms["nginx"], strict=True)]

    def over(self, name: str) -> int:
        return sum(r > P99_LIMIT for r in self.ratios(name))


def latency_series(reps: int, seconds: float, ab_ka: int = 10000) -> LatencySeries:
    """nginx, the floor and spiffe-pep at half of spiffe-pep's maximum rate (the median of
    three ``ab -k`` runs), each on a core of its own, interleaved ``reps`` times."""
    ensure_tools()
    lab = Lab(Path(tempfile.mkdtemp(prefix="spiffe-pep-compare-")))
    write_pki(lab.dir)
    try:
        up, nginx, pep = start_all(lab)
        targets = [nginx, floor(lab, up), pep]
        for t in targets:
            ab(lab, t, True, 500)
        rate = median([ab(lab, pep, True, ab_ka)["rps"] for _ in range(3)]) / 2
        p99: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        for rep in range(reps):
            for t in targets if rep % 2 == 0 else reversed(targets):
                with core_of_its_own(lab, t):
                    got = own(lab, t, "keepalive", seconds, rate=rate)
                p99[t.name].append(got["p99"])
                cpu[t.name].append(got["cpu_us"])
    finally:
        lab.stop_all()
        shutil.rmtree(lab.dir, ignore_errors=True)
    return LatencySeries(rate, p99, cpu)


def latency_report(s: LatencySeries) -> list[str]:
    lines = [
        f"p99 at {s.rate:,.0f} req/s (half of spiffe-pep's max), each proxy on its own core",
        "| rep | nginx ms | floor ms | spiffe-pep ms | floor / nginx | spiffe-pep / nginx |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    floor_r, pep_r = s.ratios("floor"), s.ratios("spiffe-pep")
    for i, (fr, pr) in enumerate(zip(floor_r, pep_r, strict=True)):
        lines.append(
            f"| {i + 1} | {s.p99_ms['nginx'][i]:.2f} | {s.p99_ms['floor'][i]:.2f} | "
            f"{s.p99_ms['spiffe-pep'][i]:.2f} | {fr:.2f}x | {pr:.2f}x |"
        )
    n = len(pep_r)
    lines.append(
        f"over {P99_LIMIT:g}x nginx: the floor in {s.over('floor')} of {n}, spiffe-pep in "
        f"{s.over('spiffe-pep')} of {n}; medians {median(floor_r):.2f}x and "
        f"{median(pep_r):.2f}x"
    )
    return lines
