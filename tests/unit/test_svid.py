"""One row per X.509-SVID rule (../shared/SPIFFE.md section 2), with real certificates."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy import svid
from proxy.bundle import Bundle
from proxy.devcerts import Issued, issue_ca, issue_svid, leaf_key_usage
from proxy.errors import SvidError
from proxy.spiffe_id import SpiffeId, TrustDomain
from proxy.trust import TrustStore

NOW = dt.datetime.now(dt.UTC)  # at import: the fixed validity windows of the rows


def _now() -> dt.datetime:
    """When a chain is verified: the leaves are issued during the tests, valid from five
    minutes before that, which may be more than five minutes after NOW in a long run."""
    return dt.datetime.now(dt.UTC)


A = TrustDomain("a.org")
B = TrustDomain("b.org")
C = TrustDomain("c.org")


class World:
    def __init__(self) -> None:
        self.root_a = issue_ca("a.org")
        self.int_a = issue_ca("a.org", parent=self.root_a, common_name="a.org intermediate")
        self.root_b = issue_ca("b.org")
        self.root_sha1 = issue_ca("c.org", signature_hash="sha1")
        self.store = TrustStore(
            {
                A: Bundle(A, (self.root_a.cert,)),
                B: Bundle(B, (self.root_b.cert,)),
                C: Bundle(C, (self.root_sha1.cert,)),
            }
        )

    def chain(self, issued: Issued) -> list[x509.Certificate]:
        return [issued.cert, *issued.parents]


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def good(w: World) -> Issued:
    return issue_svid(w.int_a, ["spiffe://a.org/ns/prod/sa/web"])


ACCEPT: list[tuple[str, Callable[[World], Issued], str]] = [
    ("via_intermediate", good, "spiffe://a.org/ns/prod/sa/web"),
    ("direct_from_root", lambda w: issue_svid(w.root_a, ["spiffe://a.org/x"]), "spiffe://a.org/x"),
    (
        "other_sans_ignored",
        lambda w: issue_svid(w.root_a, ["spiffe://a.org/x"], dns=["x.example"]),
        "spiffe://a.org/x",
    ),
    (
        "federated_domain_own_ca",
        lambda w: issue_svid(w.root_b, ["spiffe://b.org/pay"]),
        "spiffe://b.org/pay",
    ),
]


def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


ACCEPT += [
    (
        "rsa_2048_leaf",
        lambda w: issue_svid(w.int_a, ["spiffe://a.org/x"], key=rsa_key(2048)),
        "spiffe://a.org/x",
    ),
    (
        "sha384_signature",
        lambda w: issue_svid(w.int_a, ["spiffe://a.org/x"], signature_hash="sha384"),
        "spiffe://a.org/x",
    ),
    # A trust anchor's self-signature proves nothing, so its hash does not matter.
    (
        "anchor_self_signed_with_sha1",
        lambda w: issue_svid(w.root_sha1, ["spiffe://c.org/x"]),
        "spiffe://c.org/x",
    ),
]


def _ca_without_key_usage(subject: str, issuer: Issued | None) -> Issued:
    """A CA (root when ``issuer`` is None) with basicConstraints but no keyUsage."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )
    return Issued(cert, key)


REJECT: list[tuple[str, Callable[[World], Issued], str]] = [
    (
        "rsa_1024_leaf",
        lambda w: issue_svid(w.int_a, ["spiffe://a.org/x"], key=rsa_key(1024)),
        svid.WEAK_KEY,
    ),
    (
        "rsa_1024_intermediate",
        lambda w: issue_svid(
            issue_ca("a.org", parent=w.root_a, key=rsa_key(1024), common_name="weak int"),
            ["spiffe://a.org/x"],
        ),
        svid.WEAK_KEY,
    ),
    (
        "sha1_leaf_signature",
        lambda w: issue_svid(w.int_a, ["spiffe://a.org/x"], signature_hash="sha1"),
        svid.WEAK_SIGNATURE,
    ),
    (
        "md5_leaf_signature",
        lambda w: issue_svid(
            issue_ca("a.org", parent=w.root_a, key=rsa_key(2048), common_name="rsa int"),
            ["spiffe://a.org/x"],
            signature_hash="md5",
        ),
        svid.WEAK_SIGNATURE,
    ),
    (
        "sha1_intermediate_signature",
        lambda w: issue_svid(
            issue_ca("a.org", parent=w.root_a, signature_hash="sha1", common_name="sha1 int"),
            ["spiffe://a.org/x"],
        ),
        svid.WEAK_SIGNATURE,
    ),
    ("no_uri_san", lambda w: issue_svid(w.int_a, [], dns=["web.a.org"]), svid.NO_URI_SAN),
    (
        "two_uri_sans",
        lambda w: issue_svid(w.int_a, ["spiffe://a.org/x", "spiffe://a.org/y"]),
        svid.MULTIPLE_URI_SANS,
    ),
    ("non_spiffe_uri", lambda w: issue_svid(w.int_a, ["https://a.org/x"]), svid.INVALID_SPIFFE_ID),
    ("invalid_id", lambda w: issue_svid(w.int_a, ["spiffe://A.org/x"]), svid.INVALID_SPIFFE_ID),
    (
        "root_id_without_path",
        lambda w: issue_svid(w.int_a, ["spiffe://a.org"]),
        svid.ID_WITHOUT_PATH,
    ),
    ("leaf_is_ca", lambda w: issue_svid(w.int_a, ["spiffe://a.org/x"], ca=True), svid.LEAF_IS_CA),
    (
        "leaf_key_cert_sign",
        lambda w: issue_svid(
            w.int_a, ["spiffe://a.org/x"], key_usage=leaf_key_usage(cert_sign=True)
        ),
        svid.LEAF_KEY_CERT_SIGN,
    ),
    (
        "leaf_crl_sign",
        lambda w: issue_svid(
            w.int_a, ["spiffe://a.org/x"], key_usage=leaf_key_usage(crl_sign=True)
        ),
        svid.LEAF_CRL_SIGN,
    ),
    (
        "leaf_without_key_usage",
        lambda w: issue_svid(w.int_a, ["spiffe://a.org/x"], key_usage=None),
        svid.LEAF_NO_KEY_USAGE,
    ),
    (
        "leaf_without_digital_signature",
        lambda w: issue_svid(
            w.int_a, ["spiffe://a.org/x"], key_usage=leaf_key_usage(digital_signature=False)
        ),
        svid.LEAF_NO_DIGITAL_SIGNATURE,
    ),
    (
        "expired",
        lambda w: issue_svid(
            w.int_a,
            ["spiffe://a.org/x"],
            not_before=NOW - dt.timedelta(days=2),
            not_after=NOW - dt.timedelta(days=1),
        ),
        svid.EXPIRED,
    ),
    (
        "not_yet_valid",
        lambda w: issue_svid(w.int_a, ["spiffe://a.org/x"], not_before=NOW + dt.timedelta(days=1)),
        svid.NOT_YET_VALID,
    ),
    (
        "unknown_trust_domain",
        lambda w: issue_svid(issue_ca("d.org"), ["spiffe://d.org/x"]),
        svid.NO_BUNDLE,
    ),
    (
        "untrusted_ca_same_domain",
        lambda w: issue_svid(issue_ca("a.org"), ["spiffe://a.org/x"]),
        svid.UNTRUSTED,
    ),
    # Federation confusion: b.org's CA (trusted, but for b.org only) mints an a.org ID.
    (
        "federation_confusion",
        lambda w: issue_svid(w.root_b, ["spiffe://a.org/admin"]),
        svid.UNTRUSTED,
    ),
    # X509-SVID section 4.3: key usage MUST be present on signing certificates too;
    # OpenSSL's path validation reads an absent one as "any use".
    (
        "intermediate_without_key_usage",
        lambda w: issue_svid(_ca_without_key_usage("no-KU int", w.root_a), ["spiffe://a.org/x"]),
        svid.SIGNING_NO_KEY_USAGE,
    ),
    (
        "intermediate_of_other_domain",
        lambda w: issue_svid(issue_ca("b.org", parent=w.root_b), ["spiffe://a.org/admin"]),
        svid.UNTRUSTED,
    ),
]


@pytest.mark.parametrize(("make", "expected"), [r[1:] for r in ACCEPT], ids=[r[0] for r in ACCEPT])
def test_accept(world: World, make: Callable[[World], Issued], expected: str) -> None:
    issued = make(world)
    peer = svid.verify_peer(world.chain(issued), world.store, _now())
    assert peer.spiffe_id == SpiffeId.parse(expected)
    assert peer.fingerprint == svid.fingerprint(issued.cert)
    assert len(peer.fingerprint) == 64


@pytest.mark.parametrize(("make", "reason"), [r[1:] for r in REJECT], ids=[r[0] for r in REJECT])
def test_reject(world: World, make: Callable[[World], Issued], reason: str) -> None:
    issued = make(world)
    with pytest.raises(SvidError) as exc:
        svid.verify_peer(world.chain(issued), world.store, _now())
    assert exc.value.reason == reason


def test_empty_chain(world: World) -> None:
    with pytest.raises(SvidError) as exc:
        svid.verify_peer([], world.store, _now())
    assert exc.value.reason == svid.NO_CERTIFICATE


def test_revoked_domain_with_empty_bundle(world: World) -> None:
    store = TrustStore({A: Bundle(A, ())})
    with pytest.raises(SvidError) as exc:
        svid.verify_peer(world.chain(good(world)), store, _now())
    assert exc.value.reason == svid.EMPTY_BUNDLE


def test_missing_intermediate_fails(world: World) -> None:
    with pytest.raises(SvidError) as exc:
        svid.verify_peer([good(world).cert], world.store, _now())
    assert exc.value.reason == svid.UNTRUSTED


def test_bundle_anchored_on_intermediate(world: World) -> None:
    store = TrustStore({A: Bundle(A, (world.int_a.cert,))})
    peer = svid.verify_peer([good(world).cert], store, _now())
    assert str(peer.spiffe_id) == "spiffe://a.org/ns/prod/sa/web"


def test_signing_cert_with_path_rejected(world: World) -> None:
    # An "intermediate" whose SPIFFE ID has a path breaks rule 9.
    bad = issue_ca("a.org", parent=world.root_a, common_name="rogue")
    leaf = issue_svid(bad, ["spiffe://a.org/x"])
    from cryptography.hazmat.primitives import hashes

    rogue_int = (
        x509.CertificateBuilder()
        .subject_name(bad.cert.subject)
        .issuer_name(world.root_a.cert.subject)
        .public_key(bad.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(bad.cert.not_valid_before_utc)
        .not_valid_after(bad.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(leaf_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://a.org/not-a-ca")]
            ),
            critical=False,
        )
        .sign(world.root_a.key, hashes.SHA256())
    )
    with pytest.raises(SvidError) as exc:
        svid.verify_peer([leaf.cert, rogue_int], world.store, _now())
    assert exc.value.reason == svid.BAD_SIGNING_CERT


@pytest.mark.parametrize(
    ("extra", "anchor_on_intermediate"),
    [("rogue_ca", False), ("stray_intermediate", False), ("rogue_ca", True)],
    ids=["appended_rogue_ca", "appended_stray_intermediate", "bundle_anchored_on_intermediate"],
)
def test_peer_chain_is_the_verified_path_not_what_was_sent(
    world: World, extra: str, anchor_on_intermediate: bool
) -> None:
    issued = good(world)
    appended = (
        issue_ca("a.org", common_name="rogue appended CA").cert
        if extra == "rogue_ca"
        else issue_ca("a.org", parent=world.root_a, common_name="stray").cert
    )
    store = TrustStore({A: Bundle(A, (world.int_a.cert,))}) if anchor_on_intermediate else None
    peer = svid.verify_peer([*world.chain(issued), appended], store or world.store, _now())
    # Leaf, then intermediates up to, not including, the trust anchor.
    expected = (issued.cert,) if anchor_on_intermediate else (issued.cert, world.int_a.cert)
    assert peer.chain == expected


def test_trust_anchor_without_key_usage_rejected() -> None:
    root = _ca_without_key_usage("no-KU root", None)
    store = TrustStore({A: Bundle(A, (root.cert,))})
    with pytest.raises(SvidError) as exc:
        svid.verify_peer([issue_svid(root, ["spiffe://a.org/x"]).cert], store, _now())
    assert exc.value.reason == svid.SIGNING_NO_KEY_USAGE
    assert "no-KU root" in exc.value.detail
