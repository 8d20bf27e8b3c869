"""config/kubernetes/legacy-billing.yaml runs as written: its spiffe-pep container, with
the manifest's volumes, uid, fsGroup, read-only root file system and CPU limit, starts
before spiffe-helper has written the SVID, waits for it, then serves through the app.

The "container" is a process in its own mount and network namespaces (tests/integration/
containers.py): the example's addresses (0.0.0.0:8443, 0.0.0.0:9901, the app on
127.0.0.1:8080) are used as written, and clients run in that network namespace."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from proxy.config import Config, load_config, parse_address
from tests.conftest import Pki
from tests.integration import containers
from tests.integration.containers import Container, cpu_max, inside
from tests.integration.harness import ROOT

MANIFEST = ROOT / "config" / "kubernetes" / "legacy-billing.yaml"

needs_namespaces = pytest.mark.skipif(
    containers.unavailable() is not None, reason=str(containers.unavailable())
)


@dataclass
class Example:
    data: dict[str, str]  # the ConfigMap
    pod: dict[str, Any]  # the Deployment's pod spec

    def container(self, name: str) -> dict[str, Any]:
        return next(c for c in self.pod["containers"] if c["name"] == name)

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod["volumes"] if v["name"] == name)

    @property
    def pep_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.data["spiffe-pep.yaml"])  # type: ignore[no-any-return]

    def helper_conf(self) -> dict[str, str]:
        """spiffe-helper.conf's ``key = value`` lines (HCL, as far as this one uses it)."""
        pairs = re.findall(r"^\s*(\w+)\s*=\s*(.+?)\s*$", self.data["spiffe-helper.conf"], re.M)
        return {k: v.strip('"') for k, v in pairs}


def load_example() -> Example:
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    return Example(docs["ConfigMap"]["data"], docs["Deployment"]["spec"]["template"]["spec"])


def make_volumes(ex: Example, tmp: Path) -> dict[str, Path]:
    """A directory per volume of spiffe-pep's container, as the kubelet makes it: a
    ConfigMap's keys as files; an emptyDir 0777, and with the pod's fsGroup owned by that
    group with the setgid bit, so files created in it belong to the group."""
    fs_group = ex.pod.get("securityContext", {}).get("fsGroup")
    out = {}
    for mount in ex.container("spiffe-pep")["volumeMounts"]:
        name = mount["name"]
        spec = ex.volume(name)
        d = tmp / f"volume-{name}"
        d.mkdir()
        if "configMap" in spec:
            for key, text in ex.data.items():
                (d / key).write_text(text)
            d.chmod(0o755)
        else:
            assert "emptyDir" in spec, f"volume {name}: the test knows emptyDir and configMap"
            if fs_group is not None:
                os.chown(d, 0, fs_group)
            d.chmod(0o2777 if fs_group is not None else 0o777)
        out[name] = d
    return out


def write_like_spiffe_helper(ex: Example, svids: Path, pki: Pki) -> None:
    """The files spiffe-helper writes: its names and modes from the example's
    spiffe-helper.conf, owned by its container's uid (the group comes from the fsGroup
    directory), key before bundle as it does."""
    conf = ex.helper_conf()
    uid = ex.container("spiffe-helper").get("securityContext", {}).get("runAsUser", 0)
    cert_mode = int(conf.get("cert_file_mode", "0644"), 8)
    key_mode = int(conf.get("key_file_mode", "0600"), 8)
    files = [
        (conf["svid_file_name"], (pki.dir / "server.pem").read_bytes(), cert_mode),
        (conf["svid_key_file_name"], (pki.dir / "server_key.pem").read_bytes(), key_mode),
        (conf["svid_bundle_file_name"], Path(pki.bundle).read_bytes(), cert_mode),
    ]
    for name, data, mode in files:
        path = svids / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        os.chown(path, uid, -1)


def spiffe_pep_container(ex: Example, tmp: Path, volumes: dict[str, Path]) -> Container:
    pep = ex.container("spiffe-pep")
    security = pep["securityContext"]
    fs_group = ex.pod.get("securityContext", {}).get("fsGroup")
    mounts = [
        (
            volumes[m["name"]],
            m["mountPath"],
            bool(m.get("readOnly")) or "configMap" in ex.volume(m["name"]),
        )
        for m in pep["volumeMounts"]
    ]
    limit = pep.get("resources", {}).get("limits", {}).get("cpu")
    scratch = tmp / "scratch"
    scratch.mkdir()
    return Container(
        scratch,
        [sys.executable, "-m", "proxy", *pep["args"]],
        mounts,
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        cpu_max=cpu_max(str(limit)) if limit else None,
        uid=security.get("runAsUser", 0),
        gid=security.get("runAsGroup", containers.NOGROUP),
        groups=[fs_group] if fs_group is not None else [],
    )


def load_config_of(ex: Example) -> Config:
    """spiffe-pep's configuration as the proxy reads it from the ConfigMap."""
    return load_config(ex.data["spiffe-pep.yaml"].encode(), "spiffe-pep.yaml", Path("/etc"))


def test_kubernetes_example_shutdown_fits() -> None:
    """The pod's shutdown budget: every container gets SIGTERM after its own preStop, so
    the app (preStop sleep) must outlive spiffe-pep's shutdown_grace + drain, and the
    pod's terminationGracePeriodSeconds must cover both (past it, the kubelet kills)."""
    ex = load_example()
    timeouts = load_config_of(ex).timeouts
    assert timeouts.shutdown_grace >= 5  # endpoint removal reaches every node meanwhile
    pep_needs = timeouts.shutdown_grace + timeouts.drain
    assert "lifecycle" not in ex.container("spiffe-pep")  # SIGTERM starts its grace at once
    app_stop = ex.container("app")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert app_stop > pep_needs
    assert ex.pod["terminationGracePeriodSeconds"] > app_stop


async def _wait_for_event(proc: subprocess.Popen[bytes], err: Path, event: str) -> None:
    """Until the process logs ``event``; fail with its stderr if it exits first."""
    with trio.fail_after(30):
        while f'"event":"{event}"'.encode() not in err.read_bytes():
            assert proc.poll() is None, err.read_text()
            await trio.sleep(0.05)


async def _run(pid: int, *argv: str) -> tuple[int, str]:
    done = await trio.run_process(
        inside(pid, *argv), capture_stdout=True, capture_stderr=True, check=False
    )
    return done.returncode, done.stdout.decode()


@needs_namespaces
async def test_kubernetes_example_runs_as_written(tmp_path: Path, pki: Pki) -> None:
    ex = load_example()
    volumes = make_volumes(ex, tmp_path)
    container = spiffe_pep_container(ex, tmp_path, volumes)
    config = ex.pep_config
    _, port = parse_address(config["listen"])
    _, admin = parse_address(config["admin"])
    app_host, app_port = parse_address(
        next(e["value"] for e in ex.container("app")["env"] if e["name"] == "LISTEN_ADDR")
    )
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    proc = container.start(out, err)
    app = None
    code = None
    try:
        # spiffe-helper has written nothing yet: spiffe-pep waits for the files.
        await _wait_for_event(proc, err, "waiting_for_svid")
        await trio.sleep(1)
        assert proc.poll() is None, err.read_text()

        app = subprocess.Popen(
            inside(
                proc.pid,
                sys.executable,
                "-m",
                "proxy.demo_upstream",
                "--host",
                app_host,
                "--port",
                str(app_port),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        write_like_spiffe_helper(ex, volumes["svids"], pki)

        curl = ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", *pki.client_args()]
        url = f"https://localhost:{port}/api/invoices/7"
        with trio.fail_after(60):
            while True:
                _, text = await _run(proc.pid, *curl, url)
                if text.endswith("\n200"):
                    break
                assert proc.poll() is None, err.read_text()
                await trio.sleep(0.3)
        assert "spiffe://example.org/ns/prod/sa/client" in text  # through the app
        _, text = await _run(proc.pid, *curl, "-X", "POST", url.rsplit("/", 1)[0])
        assert text.endswith("\n403")  # only checkout may write

        # workers: auto follows the container's CPU limit; every worker is up.
        limit = ex.container("spiffe-pep")["resources"]["limits"]["cpu"]
        with trio.fail_after(30):
            while True:
                _, text = await _run(proc.pid, "curl", "-sS", f"http://127.0.0.1:{admin}/status")
                status = json.loads(text)
                if all(w["alive"] and w["serving"] for w in status["workers"]):
                    break  # /readyz waits for every worker to serve, not just to exist
                await trio.sleep(0.3)
        assert len(status["workers"]) == min(int(float(limit)), len(os.sched_getaffinity(0)))
        readyz = ["curl", "-sS", "-w", "\n%{http_code}", f"http://127.0.0.1:{admin}/readyz"]
        _, text = await _run(proc.pid, *readyz)
        assert text.endswith("\n200"), text

        # Pod deleted: SIGTERM. For shutdown_grace it still serves, told to close, while
        # /readyz says draining; then it stops accepting and exits once drained.
        grace = load_config_of(ex).timeouts.shutdown_grace
        proc.send_signal(signal.SIGTERM)
        await trio.sleep(0.5)
        _, text = await _run(proc.pid, *readyz)
        assert text.endswith("\n503") and "draining" in text, text
        _, text = await _run(proc.pid, *curl, "-D", "-", url)
        assert text.endswith("\n200") and "\nconnection: close\r\n" in text.lower(), text
        code = await trio.to_thread.run_sync(proc.wait, grace + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if app is not None:
            app.kill()
            app.wait()
    assert code == 0, err.read_text()
    assert "Traceback" not in err.read_text()


@needs_namespaces
async def test_workers_auto_follows_the_cgroup_cpu_limit(tmp_path: Path, pki: Pki) -> None:
    """A CPU limit of 1.5 CPUs on this (at least) 2-CPU machine: one worker, no
    supervisor (rounded down, as automaxprocs does)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with 2 CPUs or more to tell the limit from the CPUs")
    ex = load_example()
    volumes = make_volumes(ex, tmp_path)
    container = spiffe_pep_container(ex, tmp_path, volumes)
    container.cpu_max = cpu_max("1500m")
    write_like_spiffe_helper(ex, volumes["svids"], pki)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    proc = container.start(out, err)
    try:
        await _wait_for_event(proc, err, "listening")
    finally:
        proc.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(proc.wait, 60)
    events = [json.loads(line) for line in err.read_text().splitlines()]
    assert not [e for e in events if e["event"] == "supervising"], events
    assert sum(e["event"] == "listening" for e in events) == 1


@needs_namespaces
async def test_read_only_tmp_is_one_line_naming_it(tmp_path: Path, pki: Pki) -> None:
    """The example as it was (no volume on /tmp) with two workers: one line naming the
    directory, not a traceback."""
    ex = load_example()
    volumes = make_volumes(ex, tmp_path)
    container = spiffe_pep_container(ex, tmp_path, volumes)
    container.mounts = [m for m in container.mounts if m[1] != "/tmp"]
    container.cpu_max = cpu_max("2")
    container.argv += ["--workers", "2"]
    write_like_spiffe_helper(ex, volumes["svids"], pki)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    proc = container.start(out, err)
    code = await trio.to_thread.run_sync(proc.wait, 30)
    assert code == 2
    assert err.read_text().splitlines() == [
        "spiffe-pep: /tmp: not writable (Read-only file system): 2 workers share their "
        "metrics through a directory there; mount a writable volume there (an emptyDir in "
        "Kubernetes), set TMPDIR to one, or run with workers: 1"
    ]
