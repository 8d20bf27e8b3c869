"""How many CPUs this process may use: ``workers: auto`` runs one worker per CPU.

A container's CPU limit is not the node's CPU count: Kubernetes (and docker ``--cpus``)
set a CFS quota on the container's cgroup, ``cpu.max`` (cgroup v2: ``"<quota> <period>"``
in microseconds, or ``"max <period>"``) or ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
(cgroup v1, quota ``-1`` for none). Eight workers on a two-CPU quota only get throttled, so
the answer is the smallest of: the CPUs the scheduler lets this process run on, and the
quota divided by the period of this cgroup and of every cgroup above it, rounded down
(at least 1), as Go's automaxprocs does.

The cgroup files are read where a container sees them (``/sys/fs/cgroup``, the path from
``/proc/self/cgroup``); ``root`` moves both, for tests.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

V1_CPU_MOUNTS = ("cpu,cpuacct", "cpuacct,cpu", "cpu")


def available_cpus(root: Path = Path("/")) -> int:
    """CPUs this process may use: its CPU affinity, capped by its cgroup's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroup and its ancestors, or
    None when there is none (or no cgroup file can be read)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[float | None] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[2]:
            continue
        _, controllers, path = fields
        if controllers == "":  # cgroup v2: the unified hierarchy
            base = root / "sys/fs/cgroup"
            limits += (_v2(base / p) for p in _ancestors(path))
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's hierarchy
            for name in V1_CPU_MOUNTS:
                base = root / "sys/fs/cgroup" / name
                if base.is_dir():
                    limits += (_v1(base / p) for p in _ancestors(path))
                    break
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def _ancestors(path: str) -> list[str]:
    """``/a/b`` -> ``["a/b", "a", ""]``: the cgroup and every one above it, relative to the
    mount. Inside a container's cgroup namespace the path is ``/`` and the mount's root
    is the container's own cgroup."""
    p = PurePosixPath(path)
    chain = [p, *p.parents]
    return [str(q).lstrip("/") for q in chain]


def _v2(directory: Path) -> float | None:
    try:
        quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
    except OSError:
        return None
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(quota) / int(period)


def _v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period
