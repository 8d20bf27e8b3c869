"""The command line as a user runs it: start-up errors name file:line, and the README's
``spiffe-pep dev`` serves the dev client certificate and refuses the denied one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from proxy import devcerts
from proxy.devcerts import issue_ca, issue_svid
from tests.conftest import Pki
from tests.integration.harness import write_config

ROOT = Path(__file__).resolve().parents[2]


def spiffe_pep(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_check_accepts_the_shipped_dev_config(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    # Before `spiffe-pep dev` made the certificates, run would refuse the config: so does check.
    done = spiffe_pep("check", str(tmp_path / "config" / "dev.yaml"))
    assert done.returncode == 2
    assert f"{tmp_path}/config/../certs_dev/server.pem: cannot read the SVID" in done.stderr
    devcerts.write_dev_set(tmp_path / "certs_dev")
    done = spiffe_pep("check", str(tmp_path / "config" / "dev.yaml"))
    assert done.returncode == 0, done.stderr
    assert "routes" in done.stdout


def _not_a_cert(d: Path, pki: Pki) -> str:
    (d / "svid.pem").write_bytes((pki.dir / "server_key.pem").read_bytes())
    return str(d / "svid.pem")


# (what to replace in the config, by what (a callable of the test dir and PKI), and
# the message both ``run`` and ``check`` give)
CHECKS = [
    pytest.param(
        "{pki}/server.pem",
        lambda d, p: str(d / "nope.pem"),
        "nope.pem: cannot read the SVID: No such file",
        id="svid_missing",
    ),
    pytest.param(
        "{pki}/server.pem",
        lambda d, p: str(d),
        ": cannot read the SVID: Is a directory",
        id="svid_unreadable",
    ),
    pytest.param(
        "{pki}/server.pem",
        _not_a_cert,
        "svid.pem: not a certificate: no PEM CERTIFICATE block",
        id="svid_not_a_certificate",
    ),
    pytest.param(
        "{pki}/server_key.pem",
        lambda d, p: str(p.dir / "client_key.pem"),
        "client_key.pem: the private key does not match the SVID certificate",
        id="key_does_not_match",
    ),
    pytest.param(
        "{pki}/partner.spiffe.json",
        lambda d, p: str(d / "gone.json"),
        "gone.json: cannot read the bundle of partner.org",
        id="bundle_missing",
    ),
]


@pytest.mark.parametrize(("old", "new", "message"), CHECKS)
def test_check_refuses_what_run_refuses(
    tmp_path: Path, pki: Pki, old: str, new: object, message: str
) -> None:
    cfg = write_config(tmp_path, pki, 9)
    cfg.write_text(cfg.read_text().replace(old.format(pki=pki.dir), new(tmp_path, pki)))  # type: ignore[operator]
    for command in (["check", str(cfg)], ["run", "-c", str(cfg)]):
        done = spiffe_pep(*command)
        assert done.returncode == 2, (command, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (command, done.stderr)


def test_check_names_every_bad_file_and_a_log_directory_that_is_missing(
    tmp_path: Path, pki: Pki
) -> None:
    cfg = write_config(tmp_path, pki, 9)
    text = cfg.read_text().replace(f"{pki.dir}/server.pem", str(tmp_path / "nope.pem"))
    text = text.replace(pki.bundle, str(tmp_path / "gone.pem"))
    text = text.replace(f"{tmp_path}/decisions.jsonl", f"{tmp_path}/no/such/dir/d.jsonl")
    cfg.write_text(text)
    done = spiffe_pep("check", str(cfg))
    assert done.returncode == 2
    errors = done.stderr.splitlines()
    assert any("nope.pem: cannot read the SVID" in e for e in errors), errors
    assert any("gone.pem: cannot read the bundle of example.org" in e for e in errors), errors
    assert any(
        f"decision_log {tmp_path}/no/such/dir/d.jsonl: the directory {tmp_path}/no/such/dir does not exist"
        in e
        for e in errors
    ), errors
    # Checked away from where it runs: the files are skipped, and it says so.
    done = spiffe_pep("check", str(cfg), "--no-files")
    assert done.returncode == 0, done.stderr
    assert "skipped: the files the configuration names" in done.stdout


def test_check_of_a_policy_alone_uses_the_config_beside_it(tmp_path: Path, pki: Pki) -> None:
    cfg = write_config(
        tmp_path,
        pki,
        9,
        policy="routes:\n  - {name: a, upstream: billing, allow: []}\n",
    )
    done = spiffe_pep("check", str(tmp_path / "policy.yaml"))
    assert done.returncode == 2
    assert "routes[0].upstream: unknown upstream 'billing'" in done.stderr, done.stderr
    (tmp_path / "policy.yaml").write_text("routes:\n  - {name: a, upstream: app, allow: []}\n")
    done = spiffe_pep("check", str(tmp_path / "policy.yaml"))
    assert done.returncode == 0, done.stderr
    assert f"upstreams checked against {cfg}" in done.stdout
    # Alone in its directory: what needed a runtime configuration is named as skipped.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "policy.yaml").write_text("routes:\n  - {name: a, upstream: billing, allow: []}\n")
    done = spiffe_pep("check", str(lone / "policy.yaml"))
    assert done.returncode == 0, done.stderr
    assert "skipped: upstream names" in done.stdout and "--config" in done.stdout


@pytest.mark.parametrize(
    ("mutate", "where", "message"),
    [
        (
            lambda c, p: c.replace("decision_log:", "decision_logs:"),
            ("decision_logs:", 1),
            "unknown key 'decision_logs'",
        ),
        (
            lambda c, p: c.replace("listen: 127.0.0.1:0", "listen: 127.0.0.1"),
            ("listen:", 9),
            "expected host:port",
        ),
        (
            lambda c, p: c + "timeouts: {idle: 60}\n",
            ("timeouts: {idle: 60}", 18),
            "duration with a unit",
        ),
        (
            lambda c, p: c.replace("example.org: ", "Example.org: "),
            ("Example.org:", 5),
            "invalid trust domain",
        ),
    ],
    ids=["unknown_key", "listen_without_port", "duration_without_unit", "bad_trust_domain"],
)
def test_config_errors_stop_startup_with_file_line(
    tmp_path: Path, pki: Pki, mutate: object, where: tuple[str, int], message: str
) -> None:
    cfg = write_config(tmp_path, pki, 9)
    text = mutate(cfg.read_text(), pki)  # type: ignore[operator]
    cfg.write_text(text)
    needle, column = where
    line = next(i for i, t in enumerate(text.splitlines(), 1) if needle in t)
    done = spiffe_pep("run", "-c", str(cfg))
    assert done.returncode == 2
    assert f"{cfg}:{line}:{column}: " in done.stderr and message in done.stderr, done.stderr


def test_policy_error_stops_startup_with_file_line(tmp_path: Path, pki: Pki) -> None:
    cfg = write_config(
        tmp_path,
        pki,
        9,
        policy=textwrap.dedent("""\
        routes:
          - name: a
            upstream: app
            allow: ["spiffe://example.org/ns/*/x*"]
        """),
    )
    done = spiffe_pep("run", "-c", str(cfg))
    assert done.returncode == 2
    assert f"{tmp_path}/policy.yaml:4:13: routes[0].allow[0]" in done.stderr, done.stderr


def test_mismatched_key_stops_startup(tmp_path: Path, pki: Pki) -> None:
    cfg = write_config(tmp_path, pki, 9)
    other = issue_svid(issue_ca("example.org"), ["spiffe://example.org/x"])
    (tmp_path / "other_key.pem").write_bytes(other.key_pem())
    cfg.write_text(
        cfg.read_text().replace(f"{pki.dir}/server_key.pem", str(tmp_path / "other_key.pem"))
    )
    done = spiffe_pep("run", "-c", str(cfg))
    assert done.returncode == 2
    assert "other_key.pem: the private key does not match" in done.stderr


def test_missing_bundle_file_stops_startup(tmp_path: Path, pki: Pki) -> None:
    cfg = write_config(tmp_path, pki, 9)
    cfg.write_text(
        cfg.read_text()
        .replace(pki.partner_bundle, str(tmp_path / "nope.json"))
        .replace("tls:\n", "tls:\n  wait_for_svid: 0s\n")  # no waiting for spiffe-helper
    )
    done = spiffe_pep("run", "-c", str(cfg))
    assert (
        done.returncode == 2 and "nope.json: cannot read the bundle of partner.org" in done.stderr
    )


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(not all(_port_free(p) for p in (8443, 8081, 9901)), reason="dev ports in use")
async def test_readme_dev_command_serves_client_and_refuses_denied(tmp_path: Path) -> None:
    # A fresh checkout: config/ only, no certs_dev/ yet.
    shutil.copytree(ROOT / "config", tmp_path / "config")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "proxy", "dev", "--root", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        certs = tmp_path / "certs_dev"
        base = [
            "curl",
            "-sS",
            "--cacert",
            str(certs / "bundle.pem"),
            "--max-time",
            "10",
            "-w",
            " %{http_code}",
        ]
        with trio.fail_after(20):
            while True:
                r = await trio.run_process(
                    [
                        *base,
                        "--cert",
                        str(certs / "client.pem"),
                        "--key",
                        str(certs / "client_key.pem"),
                        "https://localhost:8443/hello",
                    ],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                if r.returncode == 0:
                    break
                await trio.sleep(0.2)
        assert r.stdout.endswith(b" 200")
        assert b"spiffe://example.org/ns/prod/sa/client" in r.stdout
        r = await trio.run_process(
            [
                *base,
                "--cert",
                str(certs / "denied.pem"),
                "--key",
                str(certs / "denied_key.pem"),
                "https://localhost:8443/hello",
            ],
            capture_stdout=True,
        )
        assert r.stdout.endswith(b" 403") and b'"error": "forbidden"' in r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            code = await proc.wait()
    assert code == 0
    assert proc.stderr is not None
    err = (await proc.stderr.receive_some(1 << 20)).decode()
    # Said once it listens, with commands that work from here (the root is elsewhere).
    banner = err.index("spiffe-pep dev: listening on https://localhost:8443")
    assert err.index('"event":"listening"') < banner
    assert f"--cert {certs / 'client.pem'} --key {certs / 'client_key.pem'}" in err[banner:]


def test_dev_with_the_demo_upstream_port_taken_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """An operator's mistake (a second ``dev``, or anything on 8081), not a traceback."""
    import socket

    shutil.copytree(ROOT / "config", tmp_path / "config")
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", 8081))
        except OSError:
            pytest.skip("port 8081 in use")
        taken.listen()
        done = spiffe_pep("dev", "--root", str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert "spiffe-pep: the demo upstream 127.0.0.1:8081: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr and "listening on" not in done.stderr


def test_kubernetes_example_config_and_policy_are_valid(tmp_path: Path) -> None:
    import yaml

    docs = list(
        yaml.safe_load_all((ROOT / "config" / "kubernetes" / "legacy-billing.yaml").read_text())
    )
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service"]
    data = docs[0]["data"]
    (tmp_path / "spiffe-pep.yaml").write_text(data["spiffe-pep.yaml"])
    (tmp_path / "policy.yaml").write_text(data["policy.yaml"])
    # The SVID files exist only in the pod: checked without them.
    done = spiffe_pep("check", str(tmp_path / "spiffe-pep.yaml"), "--no-files")
    assert done.returncode == 0, done.stderr


def test_dev_outside_a_checkout_fails_before_writing_files(tmp_path: Path) -> None:
    done = spiffe_pep("dev", "--root", str(tmp_path))
    assert done.returncode == 2
    assert "not a spiffe-pep checkout (no config/dev.yaml)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no certs_dev/ left behind
    done = spiffe_pep("dev", cwd=tmp_path)  # the default root: the current directory
    assert done.returncode == 2 and list(tmp_path.iterdir()) == []


def test_help_is_whole_sentences_and_hides_the_internal_worker_command() -> None:
    import argparse

    from proxy.cli import build_parser

    def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        out = [parser]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    out += parsers(sub)
        return out

    root = build_parser()
    texts = [root.description or ""]
    for parser in parsers(root):
        texts.append(parser.description or "")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                texts += [choice.help or "" for choice in action._choices_actions]
            else:
                texts.append(action.help or "")  # every option has a help text
    for text in texts:
        assert text[:1].isupper() and text.endswith("."), repr(text)
    outputs = [spiffe_pep("--help").stdout]
    outputs += [spiffe_pep(c, "--help").stdout for c in ("run", "check", "reach", "dev")]
    assert all("_worker" not in out for out in outputs)
    assert "Run the proxy with a runtime configuration." in outputs[0]
    assert "_worker" not in spiffe_pep("nope").stderr


def _config_without_svid(tmp_path: Path, pki: Pki, wait: str, extra: str = "") -> tuple[Path, Path]:
    """A configuration whose SVID file spiffe-helper never wrote, waited for ``wait``;
    the config file and the missing SVID's path."""
    cfg = write_config(tmp_path, pki, 9)
    missing = tmp_path / "spiffe" / "svid.pem"
    cfg.write_text(
        cfg.read_text()
        .replace(f"{pki.dir}/server.pem", str(missing))
        .replace("tls:\n", f"tls:\n  wait_for_svid: {wait}\n")
        + extra
    )
    return cfg, missing


def test_svid_files_not_written_are_waited_for_then_fail_in_one_line(
    tmp_path: Path, pki: Pki
) -> None:
    """spiffe-helper never wrote the SVID: start-up waits tls.wait_for_svid (bounded),
    logs that it waits, then stops with one line naming the file."""
    import time

    cfg, missing = _config_without_svid(tmp_path, pki, "1500ms")
    started = time.monotonic()
    done = spiffe_pep("run", "-c", str(cfg), "--workers", "1")
    assert done.returncode == 2
    assert time.monotonic() - started >= 1.5
    waiting, error = done.stderr.splitlines()
    assert '"event":"waiting_for_svid"' in waiting and str(missing) in waiting
    assert error == (
        f"spiffe-pep: {missing}: cannot read the SVID: No such file or directory "
        "(after waiting 1.5s for the SVID files: tls.wait_for_svid)"
    )


def test_waiting_for_svid_files_is_said_on_the_terminal_when_events_go_to_a_file(
    tmp_path: Path, pki: Pki
) -> None:
    """With the event log in a file, the terminal would show nothing for up to
    tls.wait_for_svid (a mistyped path looked like a hang): one plain line says it waits."""
    cfg, missing = _config_without_svid(
        tmp_path, pki, "500ms", f"event_log: {tmp_path}/events.jsonl\n"
    )
    done = spiffe_pep("run", "-c", str(cfg))
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == (
        f"spiffe-pep: waiting up to 0.5s for the SVID files (tls.wait_for_svid): {missing}"
    )
    assert '"event":"waiting_for_svid"' in (tmp_path / "events.jsonl").read_text()


def test_unwritable_tmpdir_for_workers_is_one_line_naming_it(tmp_path: Path, pki: Pki) -> None:
    """Where no mount namespace can make / read-only (test_kubernetes_example.py does):
    the same error path with a TMPDIR the supervisor cannot create its directory in."""
    cfg = write_config(tmp_path, pki, 9)
    gone = tmp_path / "no-such-dir"
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(gone)},
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"spiffe-pep: {gone}: not writable (No such file or directory): 2 workers share "
        "their metrics through a directory there; mount a writable volume there (an emptyDir "
        "in Kubernetes), set TMPDIR to one, or run with workers: 1"
    ]


def test_python_output_becomes_json_events() -> None:
    """What Python would print as text (a warning, a library's log record, a crash in a
    thread, an uncaught exception) reaches stderr as JSON events naming the worker."""
    code = textwrap.dedent("""\
        import logging, threading, warnings
        from proxy.audit_sink import JsonLines, python_output_as_events
        python_output_as_events(JsonLines("stderr", fields={"worker": 3, "pid": 42}))
        warnings.warn("careful", RuntimeWarning)
        logging.getLogger("spiffe").error("agent gone")
        t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join()
        raise SystemError("boom")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [e["event"] for e in events] == ["warning", "log", "crashed", "crashed"]
    assert all(e["worker"] == 3 and e["pid"] == 42 for e in events)
    assert events[1]["message"] == "agent gone" and events[1]["logger"] == "spiffe"
    assert events[2]["error"] == "ZeroDivisionError: division by zero"
    assert events[3]["error"] == "SystemError: boom" and "Traceback" in events[3]["traceback"]


def _busy_port() -> socket.socket:
    """A port some other program listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


STARTUP_ERRORS = {
    # id: (how the config changes (text, tmp, busy port) -> text, extra args, the one line)
    "listen_in_use": (
        lambda c, t, p: re.sub(r"listen: \S+", f"listen: 127.0.0.1:{p}", c),
        ["--workers", "1"],
        "spiffe-pep: listen 127.0.0.1:{port}: Address already in use",
    ),
    "listen_in_use_with_workers": (
        lambda c, t, p: re.sub(r"listen: \S+", f"listen: 127.0.0.1:{p}", c),
        ["--workers", "2"],
        "spiffe-pep: listen 127.0.0.1:{port}: Address already in use",
    ),
    "admin_in_use": (
        lambda c, t, p: c.replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{p}"),
        ["--workers", "1"],
        "spiffe-pep: admin 127.0.0.1:{port}: Address already in use",
    ),
    "admin_in_use_with_workers": (
        lambda c, t, p: c.replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{p}"),
        ["--workers", "2"],
        "spiffe-pep: admin 127.0.0.1:{port}: Address already in use",
    ),
    "decision_log_directory_missing": (
        lambda c, t, p: c.replace(f"{t}/decisions.jsonl", f"{t}/gone/decisions.jsonl"),
        ["--workers", "1"],
        "spiffe-pep: {tmp}/gone/decisions.jsonl: cannot open the decision log: No such file or "
        "directory (the directory {tmp}/gone does not exist)",
    ),
    "config_not_utf8": (
        lambda c, t, p: c.replace("policy: policy.yaml", "policy: caf\xff.yaml"),
        [],
        "spiffe-pep: {cfg}:{policy_line}:12: not UTF-8 (byte 0xff): save the file as UTF-8",
    ),
    "workers_abc": (
        lambda c, t, p: c,
        ["--workers", "abc"],
        "spiffe-pep: --workers: expected auto or an integer >= 1, got 'abc'",
    ),
    "workers_0": (
        lambda c, t, p: c,
        ["--workers", "0"],
        "spiffe-pep: --workers: expected auto or an integer >= 1, got '0'",
    ),
    "workers_negative": (
        lambda c, t, p: c,
        ["--workers=-1"],
        "spiffe-pep: --workers: expected auto or an integer >= 1, got '-1'",
    ),
    "bundle_error_names_the_path_once": (
        lambda c, t, p: c,  # replaced below: the partner bundle by a JSON without keys
        ["--workers", "1"],
        'spiffe-pep: {tmp}/bad.json: no authorities found ("keys" must be a list)',
    ),
    "empty_certificate": (
        lambda c, t, p: c,  # replaced below: the SVID by an empty file
        ["--workers", "1"],
        "spiffe-pep: no certificate in {tmp}/empty.pem",
    ),
}


@pytest.mark.parametrize("case", list(STARTUP_ERRORS), ids=list(STARTUP_ERRORS))
def test_startup_errors_are_one_line(tmp_path: Path, pki: Pki, case: str) -> None:
    """An operator's mistake stops start-up with exit 2 and one line naming the file
    (and line) or the address: never a traceback."""
    mutate, args, expected = STARTUP_ERRORS[case]
    cfg = write_config(tmp_path, pki, 9)
    busy = _busy_port()
    port = busy.getsockname()[1]
    text = mutate(cfg.read_text(), str(tmp_path), port)
    if case == "bundle_error_names_the_path_once":
        (tmp_path / "bad.json").write_text('{"keys": 5}')
        text = text.replace(pki.partner_bundle, str(tmp_path / "bad.json"))
    if case == "empty_certificate":
        (tmp_path / "empty.pem").write_bytes(b"")
        text = text.replace(f"{pki.dir}/server.pem", str(tmp_path / "empty.pem"))
    cfg.write_bytes(text.encode("latin-1") if case == "config_not_utf8" else text.encode())
    policy_line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("policy:"))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "run", "-c", str(cfg), *args],
            capture_output=True,
            text=True,
            timeout=60,
            errors="replace",
        )
    finally:
        busy.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        expected.format(port=port, tmp=tmp_path, cfg=cfg, policy_line=policy_line)
    ]
