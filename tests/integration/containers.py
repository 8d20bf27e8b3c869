"""A container, as far as spiffe-pep can tell: a process in its own mount and network
namespaces, chrooted into a read-only copy of this machine's root (an overlay, so mount
points can be made without touching the host), with volumes bind-mounted where the pod
spec puts them, a cgroup file system showing the container's CPU limit, a uid and the
pod's fsGroup. Needs root, ``unshare``, ``nsenter``, ``chroot``, ``setpriv`` and ``ip``;
:func:`unavailable` says why not when one of them is missing or refused."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("unshare", "nsenter", "chroot", "setpriv", "ip", "mount")
NOGROUP = 65534


@functools.cache
def unavailable() -> str | None:
    """Why a container cannot be made here, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (mount namespaces)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    probe = subprocess.run(
        ["unshare", "-m", "-n", "sh", "-c", "mount --make-rprivate / && ip link set lo up"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode:
        return f"mount/network namespaces refused here: {probe.stderr.strip()}"
    return None


def _software() -> list[Path]:
    """The checkout and the Python installation(s) the tests run from, outermost first
    (a directory inside another one listed is left out)."""
    paths = {Path(__file__).resolve().parents[2], Path(sys.prefix), Path(sys.base_prefix)}
    paths = {p.resolve() for p in paths}
    return sorted(p for p in paths if not any(q != p and q in p.parents for q in paths))


def cpu_max(quantity: str) -> str:
    """A Kubernetes CPU quantity ("2", "1500m") as the cgroup v2 ``cpu.max`` the kubelet
    writes for it (period 100 ms)."""
    millis = int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)
    return f"{millis * 100} 100000"


@dataclass
class Container:
    """How to start one process "in a container"; :meth:`start` returns the Popen (its pid
    names the namespaces, for :meth:`inside`)."""

    scratch: Path  # an empty directory of the test's, for the overlay
    argv: list[str]
    mounts: list[tuple[Path, str, bool]] = field(default_factory=list)  # (source, path, ro)
    read_only_root: bool = True
    cpu_max: str | None = None  # the cgroup's cpu.max; None: no limit
    uid: int = 0
    gid: int = NOGROUP
    groups: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def script(self) -> str:
        root = self.scratch / "root"
        q = shlex.quote
        lines = [
            "set -e",
            "mount --make-rprivate /",
            f"mount -t tmpfs tmpfs {q(str(self.scratch))}",
            f"mkdir {q(str(self.scratch / 'upper'))} {q(str(self.scratch / 'work'))} {q(str(root))}",
            f"mount -t overlay overlay -o lowerdir=/,upperdir={q(str(self.scratch / 'upper'))},"
            f"workdir={q(str(self.scratch / 'work'))} {q(str(root))}",
            f"for d in proc dev sys; do mount --rbind /$d {q(str(root))}/$d; done",
            # What a container with its own cgroup namespace sees: its own cgroup at the
            # root of /sys/fs/cgroup, with its CPU limit.
            f"mount -t tmpfs tmpfs {q(str(root))}/sys/fs/cgroup",
        ]
        if self.cpu_max:
            lines.append(f"echo {q(self.cpu_max)} > {q(str(root))}/sys/fs/cgroup/cpu.max")
        # This machine's Python lives under /root (0700); an image has it in /usr/local.
        lines.append(f"chmod o+x {q(str(root))}/root")
        for source, path, ro in self.mounts:
            target = q(f"{root}{path}")
            lines += [f"mkdir -p {target}", f"mount --bind {q(str(source))} {target}"]
            if ro:
                lines.append(f"mount -o remount,bind,ro {target}")
        # The software under test (the checkout, its venv, the Python it runs on), read
        # only, at the same paths: wherever the checkout lives (under /tmp, which a volume
        # of the pod hides, or on a file system the root overlay does not include), the
        # image's code is there, as it would be in an image.
        for path in _software():
            target = q(f"{root}{path}")
            lines += [
                f"mkdir -p {target}",
                f"mount --bind {q(str(path))} {target}",
                f"mount -o remount,bind,ro {target}",
            ]
            # Reachable by the container's uid (mktemp -d makes its directory 0700).
            lines += [f"chmod o+x {q(f'{root}{parent}')}" for parent in path.parents[:-1]]
        if self.read_only_root:
            lines.append(f"mount -o remount,ro {q(str(root))}")
        lines.append("ip link set lo up")
        groups = ",".join(map(str, self.groups)) if self.groups else None
        user = [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
        ]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **self.env}
        if "PYTHONPATH" in os.environ:  # the package under test, wherever it is imported from
            env.setdefault("PYTHONPATH", os.environ["PYTHONPATH"])
        env_argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
        lines.append(f"exec chroot {q(str(root))} " + shlex.join([*user, *env_argv, *self.argv]))
        return "\n".join(lines) + "\n"

    def start(self, stdout: Path, stderr: Path) -> subprocess.Popen[bytes]:
        """Start it, its stdout and stderr going to these files."""
        with stdout.open("wb") as out, stderr.open("wb") as err:
            return subprocess.Popen(
                ["unshare", "-m", "-n", "sh", "-c", self.script()], stdout=out, stderr=err
            )


def inside(pid: int, *argv: str) -> list[str]:
    """A command run in the network namespace of process ``pid`` (this machine's files)."""
    return ["nsenter", "-t", str(pid), "-n", *argv]
