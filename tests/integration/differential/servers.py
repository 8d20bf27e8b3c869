"""Real upstream servers on 127.0.0.1 for the differential tests, each a child process
with its configuration or app source from ``apps/`` and every file it writes in the
test's directory, and the real proxy (``spiffe-pep run``) in front of one of them.

A server that is not installed raises :class:`Unavailable` with the reason; ``.ci/run``
installs them all (Debian's nginx, tomcat10-common, nodejs, a JDK; Flask and gunicorn
from the ``test`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import Pki
from tests.integration.harness import free_port, write_config

APPS = Path(__file__).parent / "apps"
TOMCAT_HOME = Path("/usr/share/tomcat10")  # Debian's tomcat10-common


class Unavailable(Exception):
    """The server is not installed here: the tests that need it are skipped."""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Process:
    """A child process and the ports it serves on, by server name."""

    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path

    def stop(self) -> None:
        _stop(self.proc)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def _spawn(
    cmd: list[str],
    d: Path,
    name: str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``cmd`` with its output in ``d/<name>.log``."""
    log = d / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )
    return proc, log


def _get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def wait_serving(process: Process, timeout: float = 30) -> None:
    """Until every port of ``process`` answers ``GET /`` with 200 (Tomcat and gunicorn
    listen before their applications are ready)."""
    deadline = time.monotonic() + timeout
    for port in process.ports.values():
        while True:
            if process.proc.poll() is not None:
                raise RuntimeError(f"exited {process.proc.returncode}:\n{process.log_tail()}")
            try:
                if _get(port).startswith(b"HTTP/1.1 200"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                process.stop()
                raise RuntimeError(
                    f"not serving on {port} after {timeout} s:\n{process.log_tail()}"
                )
            time.sleep(0.05)


def start_nginx(d: Path) -> Process:
    """One nginx process in the foreground: ``nginx`` (defaults) and ``nginx-underscores``
    (``underscores_in_headers on``) on two ports."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        raise Unavailable("nginx is not installed (Debian package nginx; .ci/run installs it)")
    d.mkdir(parents=True, exist_ok=True)
    ports = {"nginx": free_port(), "nginx-underscores": free_port()}
    conf = (
        (APPS / "nginx.conf")
        .read_text()
        .replace("@DIR@", str(d))
        .replace("@PORT_UNDERSCORES@", str(ports["nginx-underscores"]))
        .replace("@PORT@", str(ports["nginx"]))
    )
    (d / "nginx.conf").write_text(conf)
    shutil.copy(APPS / "nginx-locations.conf", d / "locations.conf")
    # -e: the error log before the configuration is read (the default is under /var/log).
    proc, log = _spawn(
        [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")], d, "nginx"
    )
    process = Process(proc, ports, log)
    wait_serving(process)
    return process


def start_gunicorn(d: Path) -> Process:
    """The Flask app under gunicorn (one sync worker, gunicorn's defaults otherwise)."""
    for module in ("flask", "gunicorn"):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} is not installed (pip install -e '.[test]')")
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(d)}  # gunicorn >= 25's control socket
    cmd = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    cmd += ["--chdir", str(APPS), "flask_app:app"]
    proc, log = _spawn(cmd, d, "gunicorn", env=env)
    process = Process(proc, {"gunicorn": port}, log)
    wait_serving(process)
    return process


def start_node(d: Path) -> Process:
    """The node app (node's http module); it listens on a port of its choosing and prints it."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        raise Unavailable("node is not installed (Debian package nodejs; .ci/run installs it)")
    d.mkdir(parents=True, exist_ok=True)
    with (d / "node.log").open("wb") as err:
        proc = subprocess.Popen(
            [node, str(APPS / "node_app.js")],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(f"node did not start: {line!r} {(d / 'node.log').read_text()}")
    process = Process(proc, {"node": int(line.split()[1])}, d / "node.log")
    wait_serving(process)
    return process


def start_tomcat(d: Path) -> Process:
    """Tomcat 10 from Debian's tomcat10-common with a CATALINA_BASE in ``d``: the servlet
    compiled here with javac, the default host's app and the admin.internal host's."""
    bootstrap = TOMCAT_HOME / "bin" / "bootstrap.jar"
    java, javac = shutil.which("java"), shutil.which("javac")
    if not bootstrap.exists():
        raise Unavailable(f"no {bootstrap} (Debian package tomcat10-common; .ci/run installs it)")
    if java is None or javac is None:
        raise Unavailable("java/javac not installed (a JDK; .ci/run installs one)")
    base = d / "catalina_base"
    for sub in ("conf", "logs", "temp", "work", "lib"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    src = APPS / "tomcat"
    servlet_api = TOMCAT_HOME / "lib" / "servlet-api.jar"
    sources = [str(src / "Probe.java"), str(src / "InvoicesPost.java")]
    subprocess.run(
        [javac, "-nowarn", "-d", str(base / "lib"), "-cp", str(servlet_api), *sources],
        check=True,
        capture_output=True,
    )
    port = free_port()
    (base / "conf" / "server.xml").write_text(
        (src / "server.xml").read_text().replace("@PORT@", str(port))
    )
    shutil.copy(src / "context.xml", base / "conf" / "context.xml")
    for app_base, web_xml in (("webapps", "web.xml"), ("admin-webapps", "admin-web.xml")):
        web_inf = base / app_base / "ROOT" / "WEB-INF"
        web_inf.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / web_xml, web_inf / "web.xml")
    cmd = [
        java,
        "-XX:TieredStopAtLevel=1",  # start-up over peak speed
        "-XX:+UseSerialGC",
        "-Xmx256m",
        f"-Dcatalina.home={TOMCAT_HOME}",
        f"-Dcatalina.base={base}",
        f"-Djava.io.tmpdir={base / 'temp'}",
        "-cp",
        f"{TOMCAT_HOME / 'bin' / 'bootstrap.jar'}:{TOMCAT_HOME / 'bin' / 'tomcat-juli.jar'}",
        "org.apache.catalina.startup.Bootstrap",
        "start",
    ]
    proc, log = _spawn(cmd, d, "tomcat", cwd=base)
    process = Process(proc, {"tomcat": port}, log)
    wait_serving(process, timeout=60)
    return process


STARTERS = {
    "nginx": start_nginx,
    "nginx-underscores": start_nginx,
    "gunicorn": start_gunicorn,
    "node": start_node,
    "tomcat": start_tomcat,
}


@dataclass
class ProxyProcess:
    """``spiffe-pep run`` in front of one server, with its decision log."""

    proc: subprocess.Popen[bytes]
    port: int
    dir: Path

    def decision(self, request_id: str, timeout: float = 5) -> dict[str, object]:
        """The decision line of ``request_id`` (written just after the answer)."""
        deadline = time.monotonic() + timeout
        path = self.dir / "decisions.jsonl"
        while True:
            if path.exists():
                for line in path.read_text().splitlines(keepends=True):
                    if not line.endswith("\n"):
                        break  # the line being written: read it whole next time
                    record = json.loads(line)
                    if record.get("request_id") == request_id:
                        return dict(record)
            if time.monotonic() > deadline:
                raise AssertionError(f"no decision logged for request {request_id}")
            time.sleep(0.01)

    def stop(self) -> None:
        _stop(self.proc)


def start_proxy(d: Path, pki: Pki, upstream_port: int, policy: str) -> ProxyProcess:
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = write_config(d, pki, upstream_port, listen=f"127.0.0.1:{port}", policy=policy)
    proc, log = _spawn(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "1"], d, "proxy"
    )
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"spiffe-pep exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    return ProxyProcess(proc, port, d)
