"""proxy.cpus: the CPUs ``workers: auto`` counts, from a cgroup tree laid out in a
directory as a container sees it (/proc/self/cgroup and /sys/fs/cgroup)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.cpus import available_cpus, cgroup_cpu_quota

V2_ROOT = "0::/\n"
V2_NESTED = "0::/kubepods/pod1/c1\n"
V1 = "4:memory:/x\n3:cpu,cpuacct:/kubepods/c1\n0::/\n"


def _tree(root: Path, cgroup: str, files: dict[str, str]) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("cgroup", "files", "quota"),
    [
        (V2_ROOT, {"cpu.max": "200000 100000\n"}, 2.0),
        (V2_ROOT, {"cpu.max": "max 100000\n"}, None),
        (V2_ROOT, {"cpu.max": "50000 100000\n"}, 0.5),
        (
            V2_NESTED,
            {
                "kubepods/cpu.max": "max 100000\n",
                "kubepods/pod1/cpu.max": "150000 100000\n",
                "kubepods/pod1/c1/cpu.max": "300000 100000\n",
            },
            1.5,
        ),
        (
            V1,
            {
                "cpu,cpuacct/kubepods/c1/cpu.cfs_quota_us": "250000\n",
                "cpu,cpuacct/kubepods/c1/cpu.cfs_period_us": "100000\n",
                "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            },
            2.5,
        ),
        (V2_ROOT, {}, None),
        ("garbage\n", {"cpu.max": "100000 100000\n"}, None),
        (V2_ROOT, {"cpu.max": "nonsense\n"}, None),
    ],
    ids=[
        "v2_limit",
        "v2_no_limit",
        "v2_half_cpu",
        "v2_tightest_ancestor",
        "v1_quota",
        "no_cpu_max_file",
        "unreadable_proc_cgroup",
        "malformed_cpu_max",
    ],
)
def test_cgroup_cpu_quota(
    tmp_path: Path, cgroup: str, files: dict[str, str], quota: float | None
) -> None:
    assert cgroup_cpu_quota(_tree(tmp_path, cgroup, files)) == quota


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("100000 100000", 1), ("150000 100000", 1), ("50000 100000", 1), ("max 100000", None)],
    ids=["one_cpu", "rounded_down", "at_least_one", "no_limit_is_affinity"],
)
def test_available_cpus_is_capped_by_the_limit(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    got = available_cpus(_tree(tmp_path, V2_ROOT, {"cpu.max": cpu_max}))
    assert got == (expected if expected is not None else len(os.sched_getaffinity(0)))


def test_no_cgroup_files_is_the_affinity(tmp_path: Path) -> None:
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))
