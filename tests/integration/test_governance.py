"""Governance end to end, on real logs: a real proxy in audit mode serves a mixed workload
from several identities (curl, real mTLS, a real JWT-SVID); ``spiffe-pep suggest``
turns its decision log into a policy; the same workload through a proxy enforcing that
policy gets no denial, while an identity or a route never observed is denied;
``unused`` reviews the shipped example policy against the log; ``replay`` of a
tightened policy lists exactly the flips. The commands run as a user runs them."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import trio
import yaml

from proxy.bundle import jwk_members
from tests.conftest import CLIENT_ID, PARTNER_ID, Pki
from tests.integration.harness import POLICY, Proxy, curl, start, wait_until
from tests.jwt_helpers import EC_KEY, claims, mint

ROOT = Path(__file__).resolve().parents[2]
WEB = "spiffe://example.org/ns/prod/sa/web"
BILLING = "spiffe://example.org/ns/prod/sa/billing"
REPORTING = "spiffe://example.org/ns/batch/sa/reporting"
NEWCOMER = "spiffe://example.org/ns/prod/sa/newcomer"
AUD = "spiffe://example.org/billing"

AUDIT_POLICY = textwrap.dedent("""\
    mode: audit
    routes:
      - name: partner
        match: {path_prefix: /payments}
        upstream: app
        allow: ["spiffe://partner.org/ns/payments/sa/api"]
      - name: invoices-write
        match: {path_prefix: /api/invoices, methods: [POST, PUT]}
        upstream: app
        allow: ["spiffe://example.org/ns/prod/sa/billing"]
        audiences: ["spiffe://example.org/billing"]
      - name: reports
        match: {path: /reports/*/pdf}
        upstream: app
        allow: ["spiffe://example.org/ns/prod/*"]
      - name: prod
        match: {path_prefix: /}
        upstream: app
        allow: ["spiffe://example.org/ns/prod/*"]
    """)

# (certificate name, method, path, JWT-SVID audience or None)
WORKLOAD = [
    ("client", "GET", "/hello", None),
    ("client", "GET", "/hello", None),
    ("client", "GET", "/api/invoices/1", None),
    ("client", "GET", "/api/invoices/2", None),
    ("client", "GET", "/api/invoices/3", None),
    ("client", "GET", "/api/invoices/4", None),
    ("gov_web", "GET", "/hello", None),
    ("gov_web", "GET", "/api/invoices/5", None),
    ("gov_web", "GET", "/api/invoices/6", None),
    ("gov_billing", "POST", "/api/invoices", AUD),
    ("gov_billing", "POST", "/api/invoices", AUD),
    ("gov_billing", "PUT", "/api/invoices/7", AUD),
    ("partner", "POST", "/payments/1", None),
    ("partner", "GET", "/payments/2", None),
    # Denied by the audit policy, forwarded anyway: the attempts an admin must decide on.
    ("gov_reporting", "GET", "/reports/2025/pdf", None),
    ("gov_reporting", "GET", "/reports/2026/pdf", None),
    ("gov_reporting", "GET", "/hello", None),
    ("partner", "GET", "/hello", None),
]
AUDIT_DENIED = 4


def spiffe_pep(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=stdin is None,
        input=stdin,
        timeout=120,
        cwd=ROOT,
    )


def identities(pki: Pki) -> None:
    now = dt.datetime.now(dt.UTC)
    short = {"not_before": now - dt.timedelta(minutes=5), "lifetime": dt.timedelta(hours=2)}
    pki.svid("gov_web", [WEB], **short)
    pki.svid("gov_billing", [BILLING], **short)
    pki.svid("gov_newcomer", [NEWCOMER], **short)
    pki.svid("gov_reporting", [REPORTING])  # 30 days: longer than the 24h limit below


async def start_proxy(nursery: trio.Nursery, d: Path, pki: Pki, policy: str) -> Proxy:
    d.mkdir()
    jwks = d / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kid": "k1", **jwk_members(EC_KEY.public_key())}]}))
    return await start(nursery, d, pki, policy=policy, jwks=str(jwks))


async def run(proxy: Proxy, workload: list[tuple[str, str, str, str | None]]) -> list[int]:
    """One curl per identity, reusing its connection; the statuses in workload order."""
    order: dict[str, list[int]] = {}
    for i, (cert, *_) in enumerate(workload):
        order.setdefault(cert, []).append(i)
    statuses = [0] * len(workload)
    before = len(proxy.decisions())
    for cert, indices in order.items():
        cmd = ["curl", "-sS", "--max-time", "30"]
        for n, i in enumerate(indices):
            _, method, path, audience = workload[i]
            if n:
                cmd.append("--next")
            cmd += [*proxy.pki.client_args(cert), "-X", method, "-o", "/dev/null"]
            cmd += ["-w", "%{http_code}\\n"]
            if audience:
                subject = {"gov_billing": BILLING}[cert]
                cmd += ["-H", f"Authorization: Bearer {mint(claims(subject, aud=AUD))}"]
            if method in ("POST", "PUT"):
                cmd += ["--data", "{}"]
            cmd.append(proxy.url + path)
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
        codes = [int(c) for c in done.stdout.split()]
        assert len(codes) == len(indices), done.stderr
        for i, code in zip(indices, codes, strict=True):
            statuses[i] = code
    await wait_until(lambda: len(proxy.decisions()) >= before + len(workload))
    return statuses


async def test_suggest_enforce_unused_replay_end_to_end(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    identities(pki)
    # 1. Audit mode: everything is forwarded; four requests are denied by the policy.
    audit = await start_proxy(nursery, tmp_path / "audit", pki, AUDIT_POLICY)
    assert await run(audit, WORKLOAD) == [200] * len(WORKLOAD)
    audit_log = audit.dir / "decisions.jsonl"
    logged = audit.decisions()
    assert sum(r["decision"] == "deny" and r["mode"] == "audit" for r in logged) == AUDIT_DENIED
    billing = next(r for r in logged if r["spiffe_id"] == BILLING)
    assert billing["jwt_presented"] is True and billing["jwt_aud"] == [AUD]
    assert billing["leaf_not_before"] < billing["time"] < billing["leaf_not_after"]
    assert billing["leaf_issuer"].startswith("CN=example.org intermediate")

    # 2. suggest: a least-privilege policy that passes check and its own tests.
    suggested = tmp_path / "suggested.yaml"
    done = spiffe_pep(
        "suggest", str(audit_log), "--from", str(audit.dir / "policy.yaml"), "-o", str(suggested)
    )
    assert done.returncode == 0, done.stderr
    text = suggested.read_text()
    assert "# 6 requests from 2 identities" in text  # evidence counts: the invoices read
    done = spiffe_pep("check", str(suggested), "--config", str(audit.dir / "spiffe-pep.yaml"))
    assert done.returncode == 0, done.stderr
    done = spiffe_pep("test", str(suggested))
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout
    doc = yaml.safe_load(text)
    routes = {r["name"]: r for r in doc["routes"]}
    invoices_get = next(
        r
        for r in routes.values()
        if r["match"]["path"] == "/api/invoices/*" and r["match"]["methods"] == ["GET"]
    )
    assert sorted(invoices_get["allow"]) == [CLIENT_ID, WEB]
    write = next(r for r in routes.values() if r["match"]["path"] == "/api/invoices")
    assert (
        write["allow"] == [BILLING]
        and write["audiences"] == [AUD]
        and write["match"]["methods"] == ["POST"]
    )
    assert all(
        r["match"]["hosts"] == ["localhost"] and r["upstream"] == "app" for r in routes.values()
    )

    # 3. The same workload through a proxy enforcing the suggestion: no denial.
    enforce = await start_proxy(nursery, tmp_path / "enforce", pki, text)
    assert await run(enforce, WORKLOAD) == [200] * len(WORKLOAD)
    assert {r["decision"] for r in enforce.decisions()} == {"allow"}
    # ... and what was never observed is denied: an identity, a route, a method.
    never = [
        ("gov_newcomer", "GET", "/hello", None),
        ("client", "GET", "/never/seen", None),
        ("client", "DELETE", "/api/invoices/1", None),
        ("gov_web", "GET", "/reports/2026/pdf", None),
    ]
    assert await run(enforce, WORKLOAD + never) == [200] * len(WORKLOAD) + [403] * len(never)
    reasons = [r["reason"] for r in enforce.decisions() if r["decision"] != "allow"]
    assert sorted(reasons) == sorted(
        ["identity_not_allowed", "no_matching_route", "no_matching_route", "identity_not_allowed"]
    )

    # 4. unused: the grants of the shipped example policy this workload did not use.
    done = spiffe_pep("unused", "config/policy.yaml", str(audit_log), "--format", "json")
    assert done.returncode == 1, done.stderr  # something was found
    found = {(f["kind"], f["route"], f["pattern"]) for f in json.loads(done.stdout)["findings"]}
    assert found == {
        ("route_never_hit", "health", None),
        ("pattern_unused", "partner-payments", "allow[1] spiffe://example.org/ns/prod/*"),
        ("route_never_hit", "admin", None),
    }
    done = spiffe_pep("unused", "config/policy.yaml", str(audit_log), "--few", "3")
    assert "pattern_broad" in done.stdout and f"{BILLING}, {CLIENT_ID}, {WEB}" in done.stdout
    assert spiffe_pep("unused", str(suggested), str(audit_log)).returncode == 0  # all used

    # 5. replay: a tightened policy lists exactly the flips, and fails the gate.
    tight_doc = yaml.safe_load(text)
    for r in tight_doc["routes"]:
        if r["name"] == invoices_get["name"]:
            r["allow"] = [CLIENT_ID]
    tight = tmp_path / "tight.yaml"
    tight.write_text(yaml.safe_dump(tight_doc, sort_keys=False))
    done = spiffe_pep(
        "replay", str(tight), str(enforce.dir / "decisions.jsonl"), "--format", "json"
    )
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    flips = [
        (f["direction"], f["spiffe_id"], f["old_route"], f["new_route"], f["requests"])
        for f in result["flips"]
    ]
    name = invoices_get["name"]
    assert flips == [("allow->deny", WEB, name, name, 4)]  # GET /api/invoices/5 and /6, twice
    assert [e["request"] for e in result["flips"][0]["examples"]] == [
        "GET localhost /api/invoices/5",
        "GET localhost /api/invoices/6",
    ]
    assert result["flips"][0]["new_reasons"] == {"identity_not_allowed": 4}
    # The suggestion over the audit log: exactly the four audit denials would be allowed.
    done = spiffe_pep("replay", str(suggested), str(audit_log), "--format", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["allow_to_deny"] == 0 and result["deny_to_allow"] == AUDIT_DENIED
    assert {(f["spiffe_id"], f["old_route"]) for f in result["flips"]} == {
        (REPORTING, "reports"),
        (REPORTING, "prod"),
        (PARTNER_ID, "prod"),
    }
    table = spiffe_pep("replay", str(tight), str(enforce.dir / "decisions.jsonl")).stdout
    assert "allow->deny" in table and "GET localhost /api/invoices/5" in table

    # 6. inventory: every identity, its credential, and the flags.
    done = spiffe_pep("inventory", str(audit_log), "--max-lifetime", "24h", "--format", "json")
    assert done.returncode == 0, done.stderr
    inv = {i["spiffe_id"]: i for i in json.loads(done.stdout)["identities"]}
    assert set(inv) == {CLIENT_ID, WEB, BILLING, REPORTING, PARTNER_ID}
    shas = {r["spiffe_id"]: r["leaf_sha256"] for r in logged}
    for sid, i in inv.items():
        assert [c["sha256"] for c in i["credentials"]] == [shas[sid]]
        assert i["networks"] == {
            "127.0.0.0/24": i["requests"].get("allow", 0) + i["requests"].get("deny", 0)
        }
    assert "long_lived_credential" in inv[REPORTING]["flags"]
    assert "long_lived_credential" not in inv[WEB]["flags"]
    assert inv[REPORTING]["requests"] == {"deny": 3}
    assert "only_denied" in inv[REPORTING]["flags"]


def test_inputs_rotated_gzip_and_stdin_other_lines_counted(tmp_path: Path) -> None:
    line: dict[str, Any] = {
        "time": "2026-11-23T12:00:00.000000Z",
        "event": "request",
        "peer_addr": "[2001:db8::5]:4431",
        "spiffe_id": WEB,
        "leaf_sha256": "ab" * 32,
        "leaf_not_before": "2026-11-23T11:00:00.000000Z",
        "leaf_not_after": "2026-11-23T13:00:00.000000Z",
        "method": "GET",
        "host": "localhost",
        "path": "/hello",
        "route": "prod",
        "decision": "allow",
        "reason": "allowed",
    }
    text = json.dumps(line) + "\n"
    other = '{"time":"2026-11-23T12:00:01.000000Z","event":"handshake_failed","reason":"x"}\n'
    rotated = tmp_path / "decisions.jsonl.1"  # gzip, told by its bytes, not its name
    with gzip.open(rotated, "wt") as f:
        f.write(text * 3 + other + "garbage\n")
    current = tmp_path / "decisions.jsonl"
    current.write_text(text + "\n" + '{"truncated": ')
    done = spiffe_pep(
        "inventory", str(rotated), "-", "--format", "json", stdin=current.read_bytes()
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["input"]["kinds"] == {"request": 4, "other_event": 1, "unreadable": 2}
    (web,) = out["identities"]
    assert web["requests"] == {"allow": 4} and web["networks"] == {"2001:db8::/64": 4}
    csv_out = spiffe_pep("inventory", str(rotated), "--format", "csv")
    assert csv_out.stdout.splitlines()[0].startswith("spiffe_id,kind,trust_domain")
    done = spiffe_pep("inventory", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and "cannot read" in done.stderr
    done = spiffe_pep("unused", str(tmp_path / "nope.yaml"), str(rotated))
    assert done.returncode == 2 and "cannot read the policy" in done.stderr
    done = spiffe_pep("unused", "config/policy.yaml", str(rotated), "--since", "2030-01-01")
    assert done.returncode == 1 and "3 before the window" in done.stdout


async def test_origins_behind_a_trusted_hop_are_inventoried_and_replayed(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    px = await start(
        nursery,
        tmp_path,
        pki,
        policy=POLICY,
        identity_headers='xfcc: append_forward\ntrusted_forwarders: ["spiffe://example.org/ns/prod/*"]',
    )
    origin, sha = "spiffe://example.org/ns/prod/sa/origin", "cd" * 32
    for _ in range(2):
        r = await curl(px, "/x", "-H", f"X-Forwarded-Client-Cert: Hash={sha.upper()};URI={origin}")
        assert r.status == 200
    await wait_until(lambda: len(px.decisions()) == 2)
    rec = px.decisions()[-1]
    assert rec["origin_spiffe_id"] == origin and rec["origin_sha256"] == sha
    log = str(px.dir / "decisions.jsonl")
    done = spiffe_pep("inventory", log, "--format", "json")
    inv = {(i["spiffe_id"], i["kind"]): i for i in json.loads(done.stdout)["identities"]}
    relayed = inv[(origin, "origin")]
    assert relayed["via"] == {CLIENT_ID: 2} and [c["sha256"] for c in relayed["credentials"]] == [
        sha
    ]
    # Revoking the origin's certificate: both relayed requests would now be denied.
    revoking = tmp_path / "revoking.yaml"
    revoking.write_text(
        POLICY.replace("routes:", f'revoked: {{cert_sha256: ["{sha}"]}}\nroutes:', 1)
    )
    done = spiffe_pep("replay", str(revoking), log, "--format", "json")
    assert done.returncode == 1
    (flip,) = json.loads(done.stdout)["flips"]
    assert flip["origin_spiffe_id"] == origin and flip["requests"] == 2
    assert flip["new_reasons"] == {"certificate_revoked": 2} and flip["new_route"] is None
