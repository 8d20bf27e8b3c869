"""Identity end to end: two spiffe-pep processes chained over mTLS, XFCC from trusted and
untrusted peers, RFC 9440 headers, upstream identity checks, signed assertions."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import demo_upstream, xfcc
from proxy.devcerts import issue_ca, issue_svid
from tests.conftest import CLIENT_ID, Pki
from tests.integration.harness import (
    POLICY,
    Proxy,
    curl,
    free_port,
    serve,
    start,
    start_recording,
    upstream_headers,
    wait_listening,
)

EDGE_ID = "spiffe://example.org/ns/edge/sa/edge-pep"
INNER_ID = "spiffe://example.org/ns/mesh/sa/inner-pep"
FORGED = "By=spiffe://evil;Hash=00;URI=spiffe://example.org/ns/prod/sa/admin"


def _config(
    d: Path, pki: Pki, name: str, port: int, upstream: str, identity: str, policy: str
) -> Path:
    (d / f"{name}-policy.yaml").write_text(policy)
    cfg = d / f"{name}.yaml"
    text = [
        f"listen: 127.0.0.1:{port}",
        "tls:",
        f"  svid: {pki.dir}/{name}.pem",
        f"  key: {pki.dir}/{name}_key.pem",
        f"  bundles: {{example.org: {pki.bundle}}}",
        "upstreams:",
        textwrap.indent(upstream, "  "),
        "identity_headers:",
        textwrap.indent(identity, "  "),
        f"decision_log: {d}/{name}-decisions.jsonl",
        f"policy: {name}-policy.yaml",
        "admin: off",
    ]
    cfg.write_text("\n".join(text) + "\n")
    return cfg


def _decisions(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def _wait_decisions(path: Path, count: int) -> list[dict[str, Any]]:
    """A proxy process logs a request just after its response: wait for the line."""
    with trio.fail_after(5):
        while not path.exists() or len(_decisions(path)) < count:
            await trio.sleep(0.02)
    return _decisions(path)


async def test_two_proxies_chained_over_mtls(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    pki.write("edge", issue_svid(pki.intermediate, [EDGE_ID], dns=["localhost"], ips=["127.0.0.1"]))
    pki.write(
        "inner", issue_svid(pki.intermediate, [INNER_ID], dns=["localhost"], ips=["127.0.0.1"])
    )
    echo = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    edge_port, inner_port = free_port(), free_port()
    inner_cfg = _config(
        tmp_path,
        pki,
        "inner",
        inner_port,
        f'app: {{url: "http://127.0.0.1:{echo}"}}',
        f'xfcc: append_forward\ntrusted_forwarders: ["{EDGE_ID}"]',
        textwrap.dedent(f"""\
                            routes:
                              - name: via-edge
                                match: {{path_prefix: /}}
                                upstream: app
                                allow: ["{EDGE_ID}"]
                                origin: ["spiffe://example.org/ns/prod/*"]
                            """),
    )
    edge_cfg = _config(
        tmp_path,
        pki,
        "edge",
        edge_port,
        f'inner: {{url: "https://localhost:{inner_port}", tls: {{expect: "{INNER_ID}"}}}}',
        "xfcc: sanitize_set",
        textwrap.dedent("""\
                           routes:
                             - name: prod
                               match: {path_prefix: /}
                               upstream: inner
                               allow: ["spiffe://example.org/ns/prod/*"]
                           """),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(c)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for c in (inner_cfg, edge_cfg)
    ]
    try:
        await wait_listening(inner_port, procs[0])
        await wait_listening(edge_port, procs[1])
        base = [
            "curl",
            "-sS",
            "--max-time",
            "20",
            *pki.client_args(),
            "-H",
            f"X-Forwarded-Client-Cert: {FORGED}",
            "-H",
            "X-Client-Spiffe-Id: spiffe://example.org/ns/prod/sa/admin",
        ]
        # Client -> edge -> inner (mTLS, pooled) -> echo, twice on one client connection.
        r = await trio.run_process(
            [
                *base,
                f"https://localhost:{edge_port}/orders/1",
                f"https://localhost:{edge_port}/orders/2",
            ],
            capture_stdout=True,
        )
        bodies = [json.loads(b) for b in r.stdout.replace(b"}{", b"}\n{").splitlines()]
        assert [b["target"] for b in bodies] == ["/orders/1", "/orders/2"]
        seen = dict(bodies[0]["headers"])
        elements = xfcc.parse(seen["x-forwarded-client-cert"])
        # Element 1 (edge): the original caller. Element 2 (inner): the edge as its peer.
        assert [xfcc.first_uri(e) for e in elements] == [CLIENT_ID, EDGE_ID]
        assert dict(elements[0])["By"] == EDGE_ID and dict(elements[1])["By"] == INNER_ID
        assert seen["x-client-spiffe-id"] == CLIENT_ID  # the origin, asserted via a trusted hop
        assert "evil" not in r.stdout.decode() and "sa/admin" not in r.stdout.decode()
        inner_log = await _wait_decisions(tmp_path / "inner-decisions.jsonl", 2)
        assert inner_log[0]["spiffe_id"] == EDGE_ID
        assert inner_log[0]["origin_spiffe_id"] == CLIENT_ID
        assert inner_log[0]["rule"] == (
            f"allow[0] {EDGE_ID}; origin[0] spiffe://example.org/ns/prod/*"
        )
        assert len({d["peer_addr"] for d in inner_log}) == 1  # edge reused its mTLS connection

        # The client straight to the inner proxy, forging an XFCC that names a prod origin:
        # it is not a trusted forwarder, so its XFCC never counts.
        r = await trio.run_process(
            [*base, "-w", " %{http_code}", f"https://localhost:{inner_port}/x"], capture_stdout=True
        )
        assert r.stdout.endswith(b" 403")
        last = (await _wait_decisions(tmp_path / "inner-decisions.jsonl", 3))[-1]
        assert last["origin_spiffe_id"] is None and last["reason"] == "identity_not_allowed"
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    return await start(nursery, tmp_path, pki)


async def test_all_xfcc_fields_and_rfc9440_headers(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    px = await start(
        nursery,
        tmp_path,
        pki,
        identity_headers="xfcc_fields: [By, Hash, Cert, Chain, Subject, URI, DNS]",
        app_options="client_cert_headers: true, ",
    )
    r = await curl(
        px, "/x", "-H", "Client-Cert: :AAAA:", "-H", f"X-Forwarded-Client-Cert: {FORGED}"
    )
    h = upstream_headers(r)
    (element,) = xfcc.parse(h["x-forwarded-client-cert"][0])
    fields = dict(element)
    client_pem = (pki.dir / "client.pem").read_text()
    leaf = x509.load_pem_x509_certificates(client_pem.encode())[0]
    assert urllib.parse.unquote(fields["Cert"]) == leaf.public_bytes(Encoding.PEM).decode()
    assert urllib.parse.unquote(fields["Chain"]) == client_pem
    assert fields["Subject"] == leaf.subject.rfc4514_string()
    assert fields["URI"] == CLIENT_ID
    # RFC 9440: the leaf and the intermediate as structured-field byte sequences.
    (cc,) = h["client-cert"]
    assert base64.b64decode(cc.strip(":")) == leaf.public_bytes(Encoding.DER)
    (chain,) = h["client-cert-chain"]
    assert base64.b64decode(chain.strip(":")) == pki.intermediate.cert.public_bytes(Encoding.DER)


async def test_appended_rogue_ca_is_not_forwarded_as_the_verified_chain(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # The client's chain verifies (leaf + intermediate), with a self-signed CA of the
    # attacker's appended: the upstream must see the path that was verified, not the
    # certificates the client chose to send.
    rogue = issue_ca("example.org", common_name="rogue appended CA")
    (pki.dir / "rogue_tail.pem").write_bytes(
        (pki.dir / "client.pem").read_bytes() + rogue.cert_pem()
    )
    (pki.dir / "rogue_tail_key.pem").write_bytes((pki.dir / "client_key.pem").read_bytes())
    px, upstream = await start_recording(
        nursery,
        tmp_path,
        pki,
        identity_headers="xfcc_fields: [By, Hash, Cert, Chain, URI]",
        app_options="client_cert_headers: true, ",
    )
    assert (await curl(px, "/x", cert="rogue_tail")).status == 200
    (req,) = upstream.requests
    h = {n.decode(): v.decode() for n, v in req.headers}
    (element,) = xfcc.parse(h["x-forwarded-client-cert"])
    assert urllib.parse.unquote(dict(element)["Chain"]) == (pki.dir / "client.pem").read_text()
    assert [
        base64.b64decode(sf.strip().strip(":")) for sf in h["client-cert-chain"].split(",")
    ] == [pki.intermediate.cert.public_bytes(Encoding.DER)]
    rogue_b64 = base64.b64encode(rogue.cert.public_bytes(Encoding.DER))[:64]
    assert rogue_b64 not in urllib.parse.unquote_to_bytes(bytes(upstream.raw))
    assert rogue_b64.replace(b"+", b"%2B").replace(b"/", b"%2F") not in upstream.raw


@pytest.mark.parametrize(
    ("mode", "expected"), [("sanitize", None), ("forward_only", None), ("append_forward", "own")]
)
async def test_untrusted_peer_xfcc_never_counts(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, mode: str, expected: str | None
) -> None:
    px = await start(
        nursery,
        tmp_path,
        pki,
        identity_headers=f'xfcc: {mode}\ntrusted_forwarders: ["spiffe://example.org/ns/mesh/*"]',
    )
    r = await curl(px, "/x", "-H", f"X-Forwarded-Client-Cert: {FORGED}")
    h = upstream_headers(r)
    if expected is None:
        assert "x-forwarded-client-cert" not in h
    else:
        (value,) = h["x-forwarded-client-cert"]
        assert "evil" not in value and xfcc.first_uri(xfcc.parse(value)[0]) == CLIENT_ID


async def test_trusted_forwarder_malformed_xfcc_is_400(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    px = await start(
        nursery,
        tmp_path,
        pki,
        identity_headers='xfcc: append_forward\ntrusted_forwarders: ["spiffe://example.org/ns/prod/*"]',
    )
    r = await curl(px, "/x", "-H", 'X-Forwarded-Client-Cert: URI="unterminated')
    assert r.status == 400 and px.decisions()[-1]["reason"] == "malformed_xfcc"
    r = await curl(
        px, "/x", "-H", "X-Forwarded-Client-Cert: By=a;URI=spiffe://example.org/ns/prod/sa/o"
    )
    assert r.status == 200
    assert upstream_headers(r)["x-client-spiffe-id"] == ["spiffe://example.org/ns/prod/sa/o"]
    assert px.decisions()[-1]["origin_spiffe_id"] == "spiffe://example.org/ns/prod/sa/o"


async def test_upstream_identity_mismatch_is_502(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # The "upstream" is another proxy presenting the server SVID, not the expected ID.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = await start(nursery, other_dir, pki)
    px = await start(nursery, tmp_path, pki)
    cfg = (
        (tmp_path / "spiffe-pep.yaml")
        .read_text()
        .replace(
            f'app: {{url: "http://127.0.0.1:{px.upstream_port}"}}',
            f'app: {{url: "https://localhost:{other.port}", tls: {{expect: "spiffe://example.org/ns/mesh/*"}}}}',
        )
    )
    (tmp_path / "spiffe-pep.yaml").write_text(cfg)
    bad = await serve(nursery, tmp_path / "spiffe-pep.yaml", pki, 0)
    r = await curl(bad, "/x")
    assert r.status == 502
    assert bad.decisions()[-1]["reason"] == "upstream_identity_mismatch"


async def test_signed_assertion_verifies_with_served_jwks(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    px = await start(
        nursery,
        tmp_path,
        pki,
        identity_headers="xfcc: sanitize_set",
        app_options="assertion: {header: X-Spiffe-Pep-Assertion, ttl: 30s}, ",
    )
    r = await curl(px, "/orders/9", "-H", "X-Spiffe-Pep-Assertion: forged.by.client")
    (token,) = upstream_headers(r)["x-spiffe-pep-assertion"]
    assert token != "forged.by.client"
    async with httpx.AsyncClient() as client:
        jwks = (await client.get(f"http://127.0.0.1:{px.admin_port}/.well-known/jwks.json")).json()
    # What an app does: any JWT library, the JWKS, and its own name as the audience.
    keys = jwt.PyJWKSet.from_dict(jwks)
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims = jwt.decode(token, key, algorithms=["ES256"], audience="app")
    rec = px.decisions()[-1]
    assert claims["sub"] == CLIENT_ID and claims["request_id"] == rec["request_id"]
    assert claims["method"] == "GET" and claims["path"] == "/orders/9"
    assert len(claims["jti"]) >= 22 and claims["jti"] != rec["request_id"]
    assert claims["route"] == "prod" and claims["policy_sha256"] == rec["policy_sha256"]
    assert claims["iss"] == "spiffe://example.org/ns/edge/sa/spiffe-pep"
    assert 0 < claims["exp"] - claims["iat"] <= 60

    header, payload, sig = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["sub"] = "spiffe://example.org/ns/prod/sa/admin"
    tampered = ".".join(
        [header, base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode(), sig]
    )
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tampered, key, algorithms=["ES256"], audience="app")
    assert px.rt.signer is not None
    old = px.rt.signer.sign(
        subject=CLIENT_ID,
        audience="app",
        request_id="r",
        route="prod",
        policy_sha256="0",
        now=time.time() - 120,
        ttl=30,
    )
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(old, key, algorithms=["ES256"], audience="app")
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key, algorithms=["ES256"], audience="another-app")


async def test_assertion_replayed_to_another_path_or_method_is_detectable(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # Two requests with the same client-chosen request id: each assertion names its own
    # method and path and carries its own jti, so one cannot stand in for the other.
    px = await start(
        nursery,
        tmp_path,
        pki,
        app_options="assertion: {header: X-Spiffe-Pep-Assertion, ttl: 30s}, ",
    )
    seen = []
    for args in (["/orders/1"], ["/orders/2", "-X", "DELETE"]):
        r = await curl(px, args[0], "-H", "X-Request-Id: same-id", *args[1:])
        (token,) = upstream_headers(r)["x-spiffe-pep-assertion"]
        seen.append(jwt.decode(token, options={"verify_signature": False}))
    assert [(c["method"], c["path"]) for c in seen] == [
        ("GET", "/orders/1"),
        ("DELETE", "/orders/2"),
    ]
    assert seen[0]["request_id"] == seen[1]["request_id"] == "same-id"
    assert seen[0]["jti"] != seen[1]["jti"]


async def test_revoked_origin_certificate_behind_a_trusted_hop_is_denied(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # The origin's leaf is revoked by fingerprint; it must not get through by being
    # relayed by a trusted hop (whose own leaf is fine).
    revoked = "ab" * 32
    policy = POLICY.replace("routes:", f'revoked: {{cert_sha256: ["{revoked}"]}}\nroutes:', 1)
    px = await start(
        nursery,
        tmp_path,
        pki,
        policy=policy,
        identity_headers='xfcc: append_forward\ntrusted_forwarders: ["spiffe://example.org/ns/prod/*"]',
    )
    origin = "spiffe://example.org/ns/prod/sa/o"
    r = await curl(px, "/x", "-H", f"X-Forwarded-Client-Cert: Hash={revoked.upper()};URI={origin}")
    assert r.status == 403
    assert px.decisions()[-1]["reason"] == "certificate_revoked"
    assert px.decisions()[-1]["rule"] == "revoked.cert_sha256 (origin)"
    r = await curl(px, "/x", "-H", f"X-Forwarded-Client-Cert: Hash={'cd' * 32};URI={origin}")
    assert r.status == 200
