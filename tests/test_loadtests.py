"""The benchmarks keep working (they are run small here; timing is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from proxy import demo_upstream
from tests.conftest import Pki
from tests.integration.harness import serve, write_config

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


async def test_load_generator_against_a_live_proxy(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """One second of load (and a fixed request count in handshake mode) on a real proxy."""
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    cfg = write_config(tmp_path, pki, upstream)
    port = (await serve(nursery, cfg, pki, upstream)).port
    base = [
        sys.executable,
        "-m",
        "loadtests",
        f"https://127.0.0.1:{port}/orders",
        *pki.client_args(),
        "-c",
        "4",
        "--processes",
        "2",
    ]
    out = tmp_path / "ka.json"
    done = await trio.run_process(
        [*base, "-d", "1", "--json", str(out)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["completed"] > 10 and result["errors"] == {}
    assert result["statuses"] == {"200": result["completed"]} and result["processes"] == 2
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert b"requests/s" in done.stdout and b"requests" in done.stderr  # final line, progress
    # One request per connection before the clock (the server's side of each handshake
    # done by then), not counted: 4 connections, 4 more decision lines than requests.
    warm = (tmp_path / "decisions.jsonl").read_text().splitlines()
    assert len(warm) == result["completed"] + 4
    out = tmp_path / "hs.json"
    await trio.run_process(
        [*base, "-n", "20", "--mode", "handshake", "--json", str(out)],
        capture_stdout=True,
        capture_stderr=True,
        cwd=ROOT,
    )
    result = json.loads(out.read_text())
    assert result["completed"] == 20 and result["mode"] == "handshake"
    lines = (tmp_path / "decisions.jsonl").read_text().splitlines()
    assert len({json.loads(d)["peer_addr"] for d in lines[-20:]}) == 20  # 20 connections


async def test_load_generator_says_when_connections_did_not_open_before_the_clock(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """A keep-alive run whose connections fail to open (here: no client certificate)
    counts each as a warm-up error and exits 1, instead of measuring handshakes as
    keep-alive requests without a word."""
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    cfg = write_config(tmp_path, pki, upstream)
    port = (await serve(nursery, cfg, pki, upstream)).port
    out = tmp_path / "ka.json"
    done = await trio.run_process(
        [sys.executable, "-m", "loadtests", f"https://127.0.0.1:{port}/orders",
         "--cacert", pki.bundle, "-c", "3", "--processes", "1", "-d", "0.5",
         "--timeout", "2", "--json", str(out)],
        capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1
    assert json.loads(out.read_text())["errors"]["warm_up_connect"] == 3
    assert b"warm_up_connect" in done.stdout


def test_load_generator_refuses_remote_targets() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtests", "https://example.com/", "-d", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "only 127.0.0.1" in done.stderr


def test_soak_script_runs_and_judges(tmp_path: Path) -> None:
    """The soak (10 minutes by default, outside the suite) for a few seconds: every kind
    of traffic comes round, ends as expected, and growth is judged from the samples."""
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.soak",
            "--duration",
            "7",
            "--warmup",
            "1",
            "--interval",
            "0.5",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["unexpected"] == {}
    assert set(result["ok"]) == {
        "keepalive", "handshake", "denied", "upstream_down", "untrusted", "expired",
        "smuggling", "plain_http", "garbage", "vanish", "idle", "slow_reader", "trickle",
        "pre_tls",
    }  # fmt: skip
    assert result["verdict"]["judged"] and len(result["samples"]) >= 10
    assert all(s["rss"] > 0 and s["fds"] > 0 for s in result["samples"])


def test_tls_idle_floor_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.tls_idle_floor", "--variant", "pyopenssl",
         "--connections", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) > 0


def test_floor_forwarder_forwards_allowed_ids_with_identity_headers(tmp_path: Path) -> None:
    """The floor spiffe-pep is measured against really forwards, and refuses."""
    from loadtests import compare
    from proxy.devcerts import issue_svid

    inter = compare.write_pki(tmp_path)
    other = issue_svid(inter, ["spiffe://example.org/ns/dev/sa/other"])
    (tmp_path / "other.pem").write_bytes(other.chain_pem())
    (tmp_path / "other_key.pem").write_bytes(other.key_pem())
    lab = compare.Lab(tmp_path)
    try:
        up = compare.free_port()
        lab.start([sys.executable, "-m", "proxy.demo_upstream", "--port", str(up)], up, "up")
        url = f"https://localhost:{compare.floor(lab, up).port}"

        def curl(cert: str) -> str:
            return subprocess.run(
                ["curl", "-sS", "--cacert", str(tmp_path / "root.pem"),
                 "--cert", str(tmp_path / f"{cert}.pem"), "--key", str(tmp_path / f"{cert}_key.pem"),
                 f"{url}/x", f"{url}/y"],
                capture_output=True, text=True, timeout=30,
            ).stdout  # fmt: skip

        allowed = curl("client")  # two requests on one keep-alive connection
        assert allowed.count(f'["x-client-spiffe-id", "{compare.CLIENT_ID}"]') == 2, allowed
        assert allowed.count("x-forwarded-client-cert") == 2
        assert curl("other") == '{"error":"forbidden"}' * 2
    finally:
        lab.stop_all()


def test_decision_log_generator_is_deterministic_and_feeds_the_governance_commands(
    tmp_path: Path,
) -> None:
    """A few thousand lines (the 10 M line measurement is in RESULTS.md): the same seed
    gives the same bytes, and replay/unused/inventory read them."""

    def generate(out: Path) -> None:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtests.gen_decision_log",
                "--lines",
                "4000",
                "--files",
                "2",
                "--out",
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

    generate(tmp_path / "a")
    generate(tmp_path / "b")
    for name in ("decisions.jsonl", "decisions.jsonl.1.gz", "policy.yaml", "policy-tight.yaml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    logs = [str(tmp_path / "a" / n) for n in ("decisions.jsonl.1.gz", "decisions.jsonl")]

    def pep(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = pep("replay", str(tmp_path / "a" / "policy.yaml"), *logs, "--format", "json")
    assert done.returncode == 0 and json.loads(done.stdout)["flips"] == []  # its own verdicts
    done = pep("replay", str(tmp_path / "a" / "policy-tight.yaml"), *logs, "--format", "json")
    reasons = {r for f in json.loads(done.stdout)["flips"] for r in f["new_reasons"]}
    assert done.returncode == 1 and reasons == {
        "certificate_lifetime_too_long",
        "identity_not_allowed",
    }
    done = pep(
        "unused", str(tmp_path / "a" / "policy.yaml"), *logs, "--since", "all", "--format", "json"
    )
    kinds = {(f["kind"], f["route"]) for f in json.loads(done.stdout)["findings"]}
    assert done.returncode == 1 and ("route_never_hit", "legacy-export") in kinds
    done = pep("inventory", *logs, "--format", "json")
    assert done.returncode == 0 and len(json.loads(done.stdout)["identities"]) > 100


def test_revocation_benchmark_runs(tmp_path: Path) -> None:
    """Two revocations per kind of connection against --workers 2 (50 in the real run)."""
    out = tmp_path / "revocation.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.revocation", "--revocations", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["workers"] == 2 and result["reload_failures"] == 0
    for kind in ("new", "keepalive", "tunnel"):
        k = result["kinds"][kind]
        assert k["timeouts"] == 0 and k["all"]["n"] == 2
        assert 0 < k["all"]["p50_ms"] <= k["all"]["max_ms"]
        assert k["by_id"]["n"] == k["by_cert_sha256"]["n"] == 1
    assert "p99 ms" in done.stdout


@pytest.mark.parametrize(
    ("text", "total"),
    [
        ("events: Ir\nsummary: 3029007466\n", 3029007466),
        ("fn=main\n1 5\ntotals: 42\n", 42),
    ],
)
def test_instruction_totals_are_read_from_callgrind_output(text: str, total: int) -> None:
    from loadtests.instructions import callgrind_total, per_request

    assert callgrind_total(text) == total
    assert per_request(1_000, 6_000, 100, 600) == 10.0
    with pytest.raises(ValueError):
        callgrind_total("events: Ir\n")


def test_latency_series_counts_repetitions_over_twice_nginx_for_each_proxy() -> None:
    from loadtests.series import LatencySeries, latency_report

    s = LatencySeries(
        rate=1000.0,
        p99_ms={"nginx": [2.0, 2.0, 1.0], "floor": [3.0, 4.5, 1.5], "spiffe-pep": [4.1, 3.0, 2.0]},
        cpu_us={"nginx": [1.0] * 3, "floor": [1.0] * 3, "spiffe-pep": [1.0] * 3},
    )
    assert s.ratios("spiffe-pep") == [2.05, 1.5, 2.0]
    assert (s.over("floor"), s.over("spiffe-pep")) == (1, 1)  # 2.0x exactly is within
    lines = latency_report(s)
    assert "| 1 | 2.00 | 3.00 | 4.10 | 1.50x | 2.05x |" in lines
    assert lines[-1].startswith("over 2x nginx: the floor in 1 of 3, spiffe-pep in 1 of 3")
