"""``spiffe-pep check|explain|test|reach`` run as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def spiffe_pep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


POLICY = textwrap.dedent("""\
    routes:
      - name: invoices-read
        match: {hosts: [billing.internal], path_prefix: /api/invoices, methods: [GET]}
        upstream: demo
        allow: ["spiffe://example.org/ns/prod/*"]
        deny: ["spiffe://example.org/ns/prod/sa/batch"]
      - name: invoices-write
        match: {path_prefix: /api/invoices, methods: [POST]}
        upstream: demo
        allow: ["spiffe://example.org/ns/prod/sa/checkout"]
        audiences: ["spiffe://example.org/billing"]
      - name: uploads
        match: {path_prefix: /upload}
        upstream: demo
        allow: ["spiffe://example.org/*"]
    tests:
      - {id: "spiffe://example.org/ns/prod/sa/web", request: "GET billing.internal /api/invoices/7", expect: allow}
      - {id: "spiffe://example.org/ns/prod/sa/batch", request: "GET billing.internal /api/invoices/7", expect: deny}
      - {id: "spiffe://example.org/ns/prod/sa/checkout", request: "POST billing.internal /api/invoices", expect: allow, audience: "spiffe://example.org/billing"}
      - {id: "spiffe://example.org/ns/prod/sa/checkout", request: "POST billing.internal /api/invoices", expect: deny}
""")


def test_shipped_policy_tests_pass() -> None:
    done = spiffe_pep("test", "config/policy.yaml", "--config", "config/dev.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 passed, 0 failed" in done.stdout


def test_policy_tests_pass_and_fail(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    done = spiffe_pep("test", str(policy))
    assert done.returncode == 0, done.stdout
    assert "4 passed, 0 failed" in done.stdout
    policy.write_text(
        POLICY + '  - {id: "spiffe://example.org/ns/dev/sa/x", '
        'request: "GET billing.internal /api/invoices", expect: allow}\n'
    )
    done = spiffe_pep("test", str(policy))
    assert done.returncode == 1
    assert (
        "FAIL  spiffe://example.org/ns/dev/sa/x GET billing.internal /api/invoices: expected "
        "allow, got deny by invoices-read (identity_not_allowed)"
    ) in done.stdout
    assert f"[{policy}:21:5]" in done.stdout and "4 passed, 1 failed" in done.stdout


def test_explain(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    done = spiffe_pep(
        "explain",
        str(policy),
        "--id",
        "spiffe://example.org/ns/prod/sa/batch",
        "--host",
        "billing.internal",
        "--path",
        "/api/invoices/7",
    )
    assert done.returncode == 0
    assert "decision: deny" in done.stdout
    assert "rule:     deny[0] spiffe://example.org/ns/prod/sa/batch" in done.stdout
    assert f"route:    invoices-read ({policy}:2:5)" in done.stdout
    done = spiffe_pep(
        "explain",
        str(policy),
        "--id",
        "spiffe://example.org/ns/prod/sa/checkout",
        "--method",
        "POST",
        "--path",
        "/api/invoices",
        "--audience",
        "spiffe://example.org/billing",
    )
    assert "decision: allow" in done.stdout and "requires: a JWT-SVID" in done.stdout
    done = spiffe_pep("explain", str(policy), "--id", "spiffe://example.org/x", "--path", "/nope")
    assert "no_matching_route" in done.stdout
    done = spiffe_pep("explain", str(policy), "--id", "not-an-id")
    assert done.returncode == 2 and "invalid SPIFFE ID" in done.stderr


def test_reach_and_write_warning(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    done = spiffe_pep("reach", str(policy))
    assert done.returncode == 0
    lines = done.stdout.splitlines()

    def block(pattern: str) -> list[list[str]]:
        start = lines.index(pattern) + 1
        end = next(
            (i for i, line in enumerate(lines[start:], start) if not line.startswith(" ")),
            len(lines),
        )
        return [line.split()[:2] for line in lines[start:end]]

    # checkout is in ns/prod, so it may also reach invoices-read: its blast radius.
    assert block("spiffe://example.org/ns/prod/sa/checkout") == [
        ["every", "identity"],
        ["invoices-read", "GET,HEAD"],
        ["invoices-write", "POST"],
        ["uploads", "ANY"],
    ]
    # Not every identity of ns/prod may reach invoices-read (batch is denied) or
    # invoices-write (it allows checkout only): listed apart, with why.
    assert block("spiffe://example.org/ns/prod/*") == [
        ["every", "identity"],
        ["uploads", "ANY"],
        ["only", "some"],
        ["invoices-read", "GET,HEAD"],
        ["invoices-write", "POST"],
    ]
    some = lines[lines.index("spiffe://example.org/ns/prod/*") + 4 :][:2]
    assert some[0].endswith("[denies spiffe://example.org/ns/prod/sa/batch]")
    assert some[1].endswith("[allows only spiffe://example.org/ns/prod/sa/checkout]")
    assert any(
        line.startswith("WARNING: route uploads") and "any method" in line for line in lines
    ), done.stdout


def test_check_prints_every_error(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent("""\
        routes:
          - {name: a, upstream: demo, allow: ["spiffe://example.org/x*"]}
          - {name: b, upstream: nowhere, allow: []}
          - {name: c, upstream: demo, allow: [], match: {path_prefix: /}}
          - {name: d, upstream: demo, allow: [], match: {path: /x}}
    """)
    )
    done = spiffe_pep("check", str(policy), "--config", "config/dev.yaml")
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 3, errors  # route a is invalid, so it shadows nothing
    assert errors[0].startswith(f"{policy}:2:39: routes[0].allow[0]: invalid identity pattern")
    assert errors[1].startswith(f"{policy}:3:25: routes[1].upstream: unknown upstream 'nowhere'")
    assert errors[2].startswith(f"{policy}:5:5: routes[3]: route 'd' can never match: route 'c'")


def test_check_valid_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    done = spiffe_pep("check", str(policy))
    assert done.returncode == 0 and "3 routes, 4 tests" in done.stdout


def test_check_reports_a_test_the_proxy_would_refuse_before_the_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        POLICY.split("tests:")[0]
        + textwrap.dedent("""\
        tests:
          - {id: "spiffe://example.org/ns/prod/sa/web", request: "GET billing.internal /api/invoices/..;/7", expect: allow}
          - {id: "spiffe://example.org/ns/prod/sa/web", request: "GET billing.internal /api/../admin", expect: deny}
        """)
    )
    done = spiffe_pep("check", str(policy))
    assert done.returncode == 2, done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{policy}:") and "path_parameters_refused" in line
    # explain says the same, and the verdict is the live proxy's: refused before the policy
    done = spiffe_pep(
        "explain", str(policy), "--id", "spiffe://example.org/ns/prod/sa/web",
        "--host", "billing.internal", "--path", "/api/invoices/..;/7",
    )  # fmt: skip
    assert "decision: refuse (400, before the policy)" in done.stdout
    assert "path_parameters_refused" in done.stdout


def _decision_log(path: Path) -> None:
    """A decision log as the proxy writes it (the fields the map reads), one line
    carrying markup where an identity should be (a log is data, not code)."""
    lines = [
        ("spiffe://example.org/ns/prod/sa/web", "invoices-read", "allow", "allowed"),
        ("spiffe://example.org/ns/prod/sa/web", "invoices-read", "allow", "allowed"),
        ("spiffe://example.org/ns/prod/sa/batch", "invoices-read", "deny", "identity_denied"),
        ("spiffe://example.org/ns/dev/sa/x", None, "deny", "no_matching_route"),
        ('spiffe://example.org/"><script>alert(1)</script>', None, "deny", "no_matching_route"),
    ]
    path.write_text(
        "".join(
            json.dumps(
                {"event": "request", "spiffe_id": s, "route": r, "decision": d, "reason": why}
            )
            + "\n"
            for s, r, d, why in lines
        )
        + "not json\n"
    )


def test_reach_format_dot_needs_no_graphviz(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    done = spiffe_pep("reach", str(policy), "--format", "dot")
    assert done.returncode == 0 and done.stdout.startswith("digraph identity_map {")
    assert 'id="pattern:spiffe://example.org/ns/prod/*"' in done.stdout
    assert 'class="granted"' in done.stdout and "unused" not in done.stdout  # no log: unknown


def test_reach_format_svg_with_logs(tmp_path: Path) -> None:
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed (.ci/run installs graphviz)")
    policy, log = tmp_path / "policy.yaml", tmp_path / "decisions.jsonl"
    policy.write_text(POLICY)
    _decision_log(log)
    done = spiffe_pep("reach", str(policy), "--format", "svg", "--log", str(log))
    assert done.returncode == 0, done.stderr
    assert "skipped 1 lines that are not JSON" in done.stderr
    svg = done.stdout
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert svg.count('class="node route"') == 4  # three routes and "(no route)"
    assert 'class="edge used"' in svg and 'class="edge denied"' in svg
    unused = svg.split('class="edge granted unused"', 1)[1].split("</g>", 1)[0]
    assert "stroke-dasharray" in unused  # granted, no request used it: dashed
    assert "<script" not in svg and "&lt;script&gt;alert(1)&lt;/script&gt;" in svg
    # --log once per log (the README's `[--log LOG]...`), before or after the policy.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for args in (
        [str(policy), "--format", "svg", "--log", str(log), "--log", str(empty)],
        ["--log", str(log), "--log", str(empty), "--format", "svg", str(policy)],
    ):
        again = spiffe_pep("reach", *args)
        assert again.returncode == 0 and again.stdout == svg, again.stderr


def test_reach_svg_without_graphviz_says_so(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "reach", str(policy), "--format", "svg"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PATH": str(tmp_path)},  # no dot on it
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "Graphviz's dot is not installed" in done.stderr and "--format dot" in done.stderr


def test_reach_log_needs_a_map_format(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    done = spiffe_pep("reach", str(policy), "--log", str(tmp_path / "x.jsonl"))
    assert done.returncode == 2 and "--format svg" in done.stderr
    done = spiffe_pep("reach", str(policy), "--format", "svg", "--log", str(tmp_path / "nope"))
    assert done.returncode == 2 and "cannot read" in done.stderr
