"""The command line as a user runs it: start-up errors name file:line, and the README's
``spiffe-pep dev`` serves the dev client certificate and refuses the denied one."""

from __future__ import annotations

import shutil
import signal
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
    cfg.write_text(cfg.read_text().replace(pki.partner_bundle, str(tmp_path / "nope.json")))
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
