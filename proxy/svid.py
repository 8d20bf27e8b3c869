"""X.509-SVID verification of a peer's chain (X509-SVID spec sections 2-5, go-spiffe
``x509svid.Verify`` plus the leaf rules go-spiffe only applies to its own SVIDs).

Pure: takes cryptography objects, a path validator for one trust domain and ``now``.
Order of checks: chain present; exactly one URI SAN; a valid SPIFFE ID with a path;
leaf not a CA; key usage present with digitalSignature and without keyCertSign or
cRLSign; leaf valid at ``now``; keys and signatures of the presented chain strong
enough; path validation against the bundle of the trust domain named in the leaf's own
ID (never another trusted bundle); every signing certificate in the verified path
(intermediates and trust anchor) is a CA with a key usage extension (X509-SVID section
4.3: it MUST be present; OpenSSL's path validation takes an absent one as "any use")
holding keyCertSign, whose SPIFFE ID, if any, has no path, and has a strong key.

"Strong enough" is policy beyond the SPIFFE spec, as in every TLS stack's defaults
(OpenSSL security level 2, the CA/Browser Forum): RSA of at least 2048 bits, EC on
P-256, P-384 or P-521, Ed25519 or Ed448; no DSA; no signature over MD5 or SHA-1.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from proxy.errors import SpiffeIdError, SvidError
from proxy.spiffe_id import SpiffeId, TrustDomain

NO_CERTIFICATE = "no_client_certificate"
NO_URI_SAN = "no_uri_san"
MULTIPLE_URI_SANS = "multiple_uri_sans"
INVALID_SPIFFE_ID = "invalid_spiffe_id"
ID_WITHOUT_PATH = "spiffe_id_without_path"
LEAF_IS_CA = "leaf_is_ca"
LEAF_KEY_CERT_SIGN = "leaf_has_key_cert_sign"
LEAF_CRL_SIGN = "leaf_has_crl_sign"
LEAF_NO_KEY_USAGE = "leaf_missing_key_usage"
LEAF_NO_DIGITAL_SIGNATURE = "leaf_missing_digital_signature"
NOT_YET_VALID = "certificate_not_yet_valid"
EXPIRED = "certificate_expired"
MALFORMED = "malformed_certificate"
NO_BUNDLE = "no_bundle_for_trust_domain"
EMPTY_BUNDLE = "bundle_has_no_x509_authorities"
UNTRUSTED = "chain_not_verified"
BAD_SIGNING_CERT = "invalid_signing_certificate"
SIGNING_NO_KEY_USAGE = "signing_certificate_missing_key_usage"
WEAK_KEY = "weak_key"
WEAK_SIGNATURE = "weak_signature_algorithm"

MIN_RSA_BITS = 2048
_STRONG_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)


class PathValidator(Protocol):
    """RFC 5280 path validation of ``leaf`` against ONE trust domain's X.509 authorities.

    Returns the verified chain, leaf first and trust anchor last; raises
    :class:`SvidError` (``NO_BUNDLE``, ``EMPTY_BUNDLE`` or ``UNTRUSTED``).
    """

    def __call__(
        self,
        trust_domain: TrustDomain,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
    ) -> Sequence[x509.Certificate]: ...


@dataclass(frozen=True, slots=True)
class PeerSvid:
    """A verified peer: its SPIFFE ID and the facts about its leaf the log records.

    ``chain`` is the path that validation built: the leaf, then the intermediates up to,
    not including, the trust anchor. Certificates the peer sent that are not on that path
    (an appended self-signed CA, a stray intermediate) are not in it, so nothing forwarded
    from it (XFCC ``Chain``, RFC 9440 ``Client-Cert-Chain``) carries what was not verified.
    """

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    fingerprint: str
    not_before: dt.datetime
    not_after: dt.datetime
    chain: tuple[x509.Certificate, ...] = ()
    issuer: str = ""  # the leaf's issuer DN (RFC 4514), for the decision log


# Verified peers kept by the peer cache (``proxy.peer``), and so the most a per-peer
# memo needs to hold.
PEERS_KEPT = 4096

T = TypeVar("T")


class PerPeer(Generic[T]):
    """Values derived from a verified peer, shared by all its connections (the peer cache
    hands them one ``PeerSvid`` object), remembered by that object's identity. Each entry
    holds its peer, so an ``id`` reused by a later object never matches. At most
    ``PEERS_KEPT`` entries; emptied when full."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[PeerSvid, T]] = {}

    def get(self, peer: PeerSvid) -> T | None:
        hit = self._by_id.get(id(peer))
        return hit[1] if hit is not None and hit[0] is peer else None

    def put(self, peer: PeerSvid, value: T) -> T:
        if len(self._by_id) >= PEERS_KEPT:
            self._by_id.clear()
        self._by_id[id(peer)] = (peer, value)
        return value


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER (Envoy's XFCC ``Hash``)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    # A malformed or duplicated extension, or a name form cryptography cannot represent
    # (an x400Address in the SAN): not an SVID this proxy can read.
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise SvidError(MALFORMED, f"cannot parse certificate extensions: {exc}") from exc


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = _extension(cert, x509.SubjectAlternativeName)
    if not isinstance(san, x509.SubjectAlternativeName):
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def dns_sans(cert: x509.Certificate) -> list[str]:
    san = _extension(cert, x509.SubjectAlternativeName)
    if not isinstance(san, x509.SubjectAlternativeName):
        return []
    return san.get_values_for_type(x509.DNSName)


def leaf_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    """Apply the leaf rules that need no trust anchors; return the claimed SPIFFE ID."""
    uris = uri_sans(leaf)
    if not uris:
        raise SvidError(NO_URI_SAN, "certificate contains no URI SAN")
    if len(uris) > 1:
        raise SvidError(MULTIPLE_URI_SANS, "certificate contains more than one URI SAN")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise SvidError(INVALID_SPIFFE_ID, str(exc)) from exc
    if not spiffe_id.path:
        raise SvidError(ID_WITHOUT_PATH, f"leaf SPIFFE ID {uris[0]!r} has no path")
    bc = _extension(leaf, x509.BasicConstraints)
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        raise SvidError(LEAF_IS_CA, "leaf certificate with CA flag set to true")
    ku = _extension(leaf, x509.KeyUsage)
    if not isinstance(ku, x509.KeyUsage):
        raise SvidError(LEAF_NO_KEY_USAGE, "leaf certificate has no key usage extension")
    if ku.key_cert_sign:
        raise SvidError(LEAF_KEY_CERT_SIGN, "leaf certificate with KeyCertSign key usage")
    if ku.crl_sign:
        raise SvidError(LEAF_CRL_SIGN, "leaf certificate with KeyCrlSign key usage")
    if not ku.digital_signature:
        raise SvidError(
            LEAF_NO_DIGITAL_SIGNATURE, "leaf certificate without DigitalSignature key usage"
        )
    return spiffe_id


def check_validity(cert: x509.Certificate, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise SvidError(
            NOT_YET_VALID,
            f"certificate not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
        )
    if now > cert.not_valid_after_utc:
        raise SvidError(
            EXPIRED, f"certificate expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def check_key(cert: x509.Certificate) -> None:
    """The certificate's public key is of a kind and size still considered safe."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SvidError(MALFORMED, f"cannot read the public key of {_describe(cert)}") from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SvidError(
                WEAK_KEY, f"{_describe(cert)}: RSA key of {key.key_size} bits (< {MIN_RSA_BITS})"
            )
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _STRONG_CURVES):
            raise SvidError(WEAK_KEY, f"{_describe(cert)}: EC key on curve {key.curve.name}")
    elif not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise SvidError(WEAK_KEY, f"{_describe(cert)}: {type(key).__name__} keys are not accepted")


def check_signature_algorithm(cert: x509.Certificate) -> None:
    """The signature over the certificate uses no broken hash (MD5, SHA-1)."""
    try:
        digest = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise SvidError(
            WEAK_SIGNATURE, f"{_describe(cert)}: unsupported signature algorithm"
        ) from exc
    if isinstance(digest, _WEAK_HASHES):
        raise SvidError(WEAK_SIGNATURE, f"{_describe(cert)}: signed with {digest.name.upper()}")


def check_signing_cert(cert: x509.Certificate) -> None:
    """A certificate that signs another in an SVID path must be a CA with a key usage
    extension that has keyCertSign."""
    subject = cert.subject.rfc4514_string()
    bc = _extension(cert, x509.BasicConstraints)
    if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
        raise SvidError(BAD_SIGNING_CERT, f"signing certificate {subject!r} is not a CA")
    ku = _extension(cert, x509.KeyUsage)
    if not isinstance(ku, x509.KeyUsage):
        raise SvidError(
            SIGNING_NO_KEY_USAGE, f"signing certificate {subject!r} has no key usage extension"
        )
    if not ku.key_cert_sign:
        raise SvidError(BAD_SIGNING_CERT, f"signing certificate {subject!r} lacks KeyCertSign")
    for uri in uri_sans(cert):
        if uri.startswith("spiffe://"):
            try:
                ca_id = SpiffeId.parse(uri)
            except SpiffeIdError as exc:
                raise SvidError(BAD_SIGNING_CERT, str(exc)) from exc
            if ca_id.path:
                raise SvidError(
                    BAD_SIGNING_CERT, f"signing certificate has a SPIFFE ID with a path: {uri!r}"
                )


def verify_peer(
    chain: Sequence[x509.Certificate], validate_path: PathValidator, now: dt.datetime
) -> PeerSvid:
    """Verify a peer's chain (leaf first) as an X.509-SVID; return the peer's identity."""
    if not chain:
        raise SvidError(NO_CERTIFICATE, "peer presented no certificate")
    leaf = chain[0]
    spiffe_id = leaf_spiffe_id(leaf)
    check_validity(leaf, now)
    # Key and signature strength of everything presented, before path validation (whose
    # own refusal of a weak chain would only say "not verified"). A self-signed
    # certificate's signature proves nothing either way, so its hash is not judged.
    for cert in chain:
        check_key(cert)
        if cert.issuer != cert.subject:
            check_signature_algorithm(cert)
    verified = validate_path(spiffe_id.trust_domain, leaf, chain[1:])
    for signer in verified[1:]:
        check_signing_cert(signer)
        check_key(signer)
    return PeerSvid(
        spiffe_id,
        leaf,
        fingerprint(leaf),
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
        tuple(verified[:-1]) or (leaf,),
        leaf.issuer.rfc4514_string(),
    )
