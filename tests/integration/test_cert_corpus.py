"""The certificate corpus: one row per kind of client certificate, each presented in a
real mTLS handshake to a running proxy, with the expected outcome (served, or refused
before any HTTP), the reason the proxy logs for it and the TLS alert the client gets.

The client is the stdlib TLS stack at OpenSSL security level 0, so weak keys and SHA-1
signatures reach the proxy instead of being refused by the client itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy import svid
from proxy.devcerts import Issued, issue_ca, issue_svid, leaf_key_usage
from tests.conftest import CLIENT_ID, PARTNER_ID, Pki
from tests.der_edit import non_minimal_validity, x400_in_san
from tests.integration.harness import Proxy, start

NOW = dt.datetime.now(dt.UTC)
ID = CLIENT_ID
SERVED = "served"
# Valid as an extension (one bit set), wrong for an SVID: no digitalSignature.
KEY_AGREEMENT_ONLY = leaf_key_usage(digital_signature=False, key_agreement=True)


def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def self_signed(_: Pki) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "me")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(leaf_key_usage(), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ID)]), False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def two_intermediates(p: Pki) -> Issued:
    lower = issue_ca("example.org", parent=p.intermediate, common_name="example.org issuing")
    return issue_svid(lower, [ID])


def leaf_only(p: Pki) -> Issued:
    issued = issue_svid(p.intermediate, [ID])
    return Issued(issued.cert, issued.key)  # the intermediate is not sent


CORPUS: list[tuple[str, Callable[[Pki], Issued], str]] = [
    ("valid_via_intermediate", lambda p: issue_svid(p.intermediate, [ID]), SERVED),
    ("valid_direct_from_root", lambda p: issue_svid(p.root, [ID]), SERVED),
    ("chain_through_two_intermediates", two_intermediates, SERVED),
    ("federated_domain_own_ca", lambda p: issue_svid(p.partner_root, [PARTNER_ID]), SERVED),
    ("rsa_2048_key", lambda p: issue_svid(p.intermediate, [ID], key=rsa_key(2048)), SERVED),
    ("intermediate_not_sent", leaf_only, svid.UNTRUSTED),
    (
        "expired",
        lambda p: issue_svid(
            p.intermediate,
            [ID],
            not_before=NOW - dt.timedelta(days=2),
            not_after=NOW - dt.timedelta(days=1),
        ),
        svid.EXPIRED,
    ),
    (
        "not_yet_valid",
        lambda p: issue_svid(p.intermediate, [ID], not_before=NOW + dt.timedelta(hours=1)),
        svid.NOT_YET_VALID,
    ),
    ("leaf_with_ca_true", lambda p: issue_svid(p.intermediate, [ID], ca=True), svid.LEAF_IS_CA),
    (
        "leaf_without_digital_signature",
        lambda p: issue_svid(p.intermediate, [ID], key_usage=KEY_AGREEMENT_ONLY),
        svid.LEAF_NO_DIGITAL_SIGNATURE,
    ),
    (
        "leaf_with_key_cert_sign",
        lambda p: issue_svid(p.intermediate, [ID], key_usage=leaf_key_usage(cert_sign=True)),
        svid.LEAF_KEY_CERT_SIGN,
    ),
    (
        "leaf_without_key_usage",
        lambda p: issue_svid(p.intermediate, [ID], key_usage=None),
        svid.LEAF_NO_KEY_USAGE,
    ),
    (
        "no_uri_san",
        lambda p: issue_svid(p.intermediate, [], dns=["client.example.org"]),
        svid.NO_URI_SAN,
    ),
    (
        "two_uri_sans",
        lambda p: issue_svid(p.intermediate, [ID, "spiffe://example.org/ns/prod/sa/other"]),
        svid.MULTIPLE_URI_SANS,
    ),
    (
        "non_spiffe_uri",
        lambda p: issue_svid(p.intermediate, ["https://example.org/ns/prod/sa/client"]),
        svid.INVALID_SPIFFE_ID,
    ),
    (
        "upper_case_trust_domain",
        lambda p: issue_svid(p.intermediate, ["spiffe://Example.org/ns/prod/sa/client"]),
        svid.INVALID_SPIFFE_ID,
    ),
    (
        "percent_encoded_id",
        lambda p: issue_svid(p.intermediate, ["spiffe://example.org/ns/prod/sa/%63lient"]),
        svid.INVALID_SPIFFE_ID,
    ),
    (
        "dot_segment_id",
        lambda p: issue_svid(p.intermediate, ["spiffe://example.org/ns/dev/../prod/sa/client"]),
        svid.INVALID_SPIFFE_ID,
    ),
    (
        "trust_domain_id_without_path",
        lambda p: issue_svid(p.intermediate, ["spiffe://example.org"]),
        svid.ID_WITHOUT_PATH,
    ),
    (
        "federation_confusion",  # partner.org's CA, trusted for partner.org only
        lambda p: issue_svid(p.partner_root, [ID]),
        svid.UNTRUSTED,
    ),
    (
        "unknown_trust_domain",
        lambda p: issue_svid(issue_ca("evil.org"), ["spiffe://evil.org/x"]),
        svid.NO_BUNDLE,
    ),
    (
        "rogue_ca_with_the_same_name",
        lambda p: issue_svid(issue_ca("example.org"), [ID]),
        svid.UNTRUSTED,
    ),
    ("self_signed_leaf", self_signed, svid.UNTRUSTED),
    (
        "rsa_1024_key",
        lambda p: issue_svid(p.intermediate, [ID], key=rsa_key(1024)),
        svid.WEAK_KEY,
    ),
    (
        "sha1_signature",
        lambda p: issue_svid(p.intermediate, [ID], signature_hash="sha1"),
        svid.WEAK_SIGNATURE,
    ),
    (
        "sha1_signed_intermediate",
        lambda p: issue_svid(
            issue_ca(
                "example.org", parent=p.root, signature_hash="sha1", common_name="old issuing CA"
            ),
            [ID],
        ),
        svid.WEAK_SIGNATURE,
    ),
]


# The TLS alert a refused client gets (OpenSSL's text for it), by the reason logged.
ALERTS = {
    svid.EXPIRED: "alert certificate expired",
    svid.UNTRUSTED: "alert unknown ca",
    svid.NO_BUNDLE: "alert unknown ca",
}


def alert(reason: str) -> str:
    return ALERTS.get(reason, "alert bad certificate")


def _exchange(port: int, cert: Path, key: Path, cafile: str) -> tuple[int | None, str]:
    """One handshake and one request; (status, "") if served, (None, error) if not."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"GET /orders HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = s.recv(65536)
    except (ssl.SSLError, OSError) as exc:
        return None, str(exc)
    if not data:
        return None, "closed without a response"
    return int(data.split(b" ", 2)[1]), ""


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    return await start(nursery, tmp_path, pki)


@pytest.mark.parametrize(("make", "outcome"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
async def test_client_certificate(
    proxy: Proxy, tmp_path: Path, pki: Pki, make: Callable[[Pki], Issued], outcome: str
) -> None:
    issued = make(pki)
    cert, key = tmp_path / "c.pem", tmp_path / "c_key.pem"
    cert.write_bytes(issued.chain_pem())
    key.write_bytes(issued.key_pem())
    status, error = await trio.to_thread.run_sync(_exchange, proxy.port, cert, key, pki.bundle)
    failures = [e for e in proxy.events() if e["event"] == "tls_handshake_failed"]
    if outcome == SERVED:
        assert status in (200, 403), error  # through the handshake; the policy decides
        assert failures == []
        return
    assert status is None, f"served with {status}"
    assert proxy.decisions() == []  # no HTTP request was read
    (event,) = failures
    assert event["reason"] == outcome, event
    assert event["detail"] and event["leaf_sha256"] == svid.fingerprint(issued.cert)
    assert alert(outcome) in error, error  # the client learns why, as from nginx or Envoy


async def test_curl_and_openssl_clients_see_the_alert(
    proxy: Proxy, tmp_path: Path, pki: Pki
) -> None:
    expired = issue_svid(
        pki.intermediate,
        [ID],
        not_before=NOW - dt.timedelta(days=2),
        not_after=NOW - dt.timedelta(days=1),
    )
    cert, key = tmp_path / "expired.pem", tmp_path / "expired_key.pem"
    cert.write_bytes(expired.chain_pem())
    key.write_bytes(expired.key_pem())
    url = f"https://localhost:{proxy.port}/orders"
    done = await trio.run_process(
        ["curl", "-sS", "--cacert", pki.bundle, "--cert", str(cert), "--key", str(key), url],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode != 0
    assert b"alert certificate expired" in done.stderr, done.stderr
    assert b"Empty reply" not in done.stderr

    rogue = issue_svid(issue_ca("example.org"), [ID])
    cert.write_bytes(rogue.chain_pem())
    key.write_bytes(rogue.key_pem())
    for client_cert, text in [
        (["-cert", str(cert), "-key", str(key)], b"alert unknown ca"),
        ([], b"alert certificate required"),
    ]:
        # -ign_eof: read until the proxy closes, not only until stdin ends.
        cmd = ["openssl", "s_client", "-ign_eof", "-connect", f"127.0.0.1:{proxy.port}"]
        done = await trio.run_process(
            [*cmd, "-CAfile", pki.bundle, *client_cert],
            stdin=b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert text in done.stderr, done.stderr
    reasons = [e["reason"] for e in proxy.events() if e["event"] == "tls_handshake_failed"]
    assert reasons == [svid.EXPIRED, svid.UNTRUSTED, svid.NO_CERTIFICATE]


@pytest.mark.parametrize(
    ("edit_leaf", "edit_intermediate"),
    [
        (x400_in_san, None),
        (None, non_minimal_validity),
        (x400_in_san, non_minimal_validity),
    ],
    ids=["x400_name_in_san", "unparsable_intermediate", "both"],
)
async def test_chains_the_svid_rules_cannot_read_are_refused_and_logged(
    proxy: Proxy,
    tmp_path: Path,
    pki: Pki,
    edit_leaf: Callable[[bytes], bytes] | None,
    edit_intermediate: Callable[[bytes], bytes] | None,
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    issued = issue_svid(pki.intermediate, [ID])
    leaf = issued.cert.public_bytes(Encoding.DER)
    inter = pki.intermediate.cert.public_bytes(Encoding.DER)
    leaf = edit_leaf(leaf) if edit_leaf else leaf
    inter = edit_intermediate(inter) if edit_intermediate else inter
    cert, key = tmp_path / "c.pem", tmp_path / "c_key.pem"
    cert.write_text("".join(ssl.DER_cert_to_PEM_cert(c) for c in (leaf, inter)))
    key.write_bytes(issued.key_pem())
    status, error = await trio.to_thread.run_sync(_exchange, proxy.port, cert, key, pki.bundle)
    assert status is None, f"served with {status}"
    assert proxy.decisions() == []
    (event,) = [e for e in proxy.events() if e["event"] == "tls_handshake_failed"]
    assert event["reason"] == svid.MALFORMED, event
    assert event["leaf_sha256"] == hashlib.sha256(leaf).hexdigest()
    assert not [e for e in proxy.events() if e["event"] == "connection_error"]
    assert "alert bad certificate" in error, error
