"""Trust bundles: one per trust domain, from PEM or SPIFFE bundle JSON (a JWK Set).

Rules (SPIFFE Trust Domain and Bundle spec sections 4-5, X509-SVID section 6,
JWT-SVID section 6): ``keys`` must be present; an empty ``keys`` means the trust
domain revoked every key; entries with a missing or unknown ``use``, or a missing or
unknown ``kty`` (section 4.2.1; known here: ``RSA`` and ``EC``), are ignored, never
used: an ``x509-svid`` entry's certificate counts only when its JWK members name a key
type whose match with it can be checked; ``x509-svid`` entries carry a CA certificate
in ``x5c[0]`` (standard base64 DER) whose key must match the JWK members; ``jwt-svid``
entries need a ``kid``. No I/O here: callers pass bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from proxy.errors import BundleError
from proxy.spiffe_id import TrustDomain

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_CURVE_NAMES = {c.name: n for n, c in _CURVES.items()}
_CURVE_SIZES = {"P-256": 32, "P-384": 48, "P-521": 66}
KEY_TYPES = ("RSA", "EC")  # the JWK kty values this module reads; others are ignored


@dataclass(frozen=True)
class Bundle:
    """The authorities of one trust domain."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_authorities: Mapping[str, PublicKey] = field(default_factory=dict)
    sequence: int | None = None
    refresh_hint: int | None = None


def parse(trust_domain: TrustDomain, data: bytes, source: str = "<bundle>") -> Bundle:
    """Parse a bundle, sniffing the format: JSON when it starts with ``{`` or ``[``, else PEM."""
    if data.lstrip()[:1] in (b"{", b"["):
        return parse_spiffe_json(trust_domain, data, source)
    return parse_pem(trust_domain, data, source)


def parse_pem(trust_domain: TrustDomain, data: bytes, source: str = "<bundle>") -> Bundle:
    """A PEM bundle: one or more CA certificates of ``trust_domain``."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise BundleError(f"no certificate in {source}")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BundleError(f"{source}: no PEM certificate could be read ({exc})") from exc
    for cert in certs:
        _check_authority(cert, source)
    return Bundle(trust_domain, tuple(certs))


def _check_authority(cert: x509.Certificate, source: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise BundleError(f"{source}: certificate {cert.subject.rfc4514_string()!r} is not a CA")


def _b64url_int(value: Any, what: str) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a base64url string")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    return int.from_bytes(raw, "big")


def jwk_public_key(entry: Mapping[str, Any]) -> PublicKey | None:
    """The public key of a JWK, or None for a ``kty`` this proxy does not know."""
    kty = entry.get("kty")
    if kty == "RSA":
        return rsa.RSAPublicNumbers(
            _b64url_int(entry.get("e"), "e"), _b64url_int(entry.get("n"), "n")
        ).public_key()
    if kty == "EC":
        crv = entry.get("crv")
        if crv not in _CURVES:
            raise ValueError(f"unsupported EC curve {crv!r}")
        return ec.EllipticCurvePublicNumbers(
            _b64url_int(entry.get("x"), "x"), _b64url_int(entry.get("y"), "y"), _CURVES[crv]
        ).public_key()
    return None


def _same_key(a: Any, b: Any) -> bool:
    fmt = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return bool(a.public_bytes(*fmt) == b.public_bytes(*fmt))


def parse_spiffe_json(trust_domain: TrustDomain, data: bytes, source: str = "<bundle>") -> Bundle:
    """A SPIFFE bundle: a JWK Set with ``use`` of ``x509-svid`` or ``jwt-svid``."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise BundleError(f"{source}: a SPIFFE bundle must be a JSON object")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise BundleError(f'{source}: no authorities found ("keys" must be a list)')
    sequence = doc.get("spiffe_sequence")
    refresh = doc.get("spiffe_refresh_hint")
    if sequence is not None and (not isinstance(sequence, int) or sequence < 0):
        raise BundleError(f"{source}: spiffe_sequence must be a non-negative integer")
    if refresh is not None and not isinstance(refresh, int):
        raise BundleError(f"{source}: spiffe_refresh_hint must be an integer")
    x509s: list[x509.Certificate] = []
    jwts: dict[str, PublicKey] = {}
    for i, entry in enumerate(keys):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: each key must be a JSON object")
        use = entry.get("use")
        if use in ("x509-svid", "jwt-svid") and entry.get("kty") not in KEY_TYPES:
            continue  # a missing or unknown kty: the entry is ignored, as the spec requires
        try:
            if use == "x509-svid":
                cert = _x509_entry(entry, where)
                if cert is not None:
                    x509s.append(cert)
            elif use == "jwt-svid":
                kid = entry.get("kid")
                if not isinstance(kid, str) or not kid:
                    raise BundleError(f"{where}: a jwt-svid key needs a kid")
                key = jwk_public_key(entry)
                if key is None:  # not reached: kty was checked above
                    continue
                if kid in jwts:
                    raise BundleError(f"{where}: duplicate kid {kid!r}")
                jwts[kid] = key
            # Any other use (or none) is ignored, as the spec requires.
        except (ValueError, binascii.Error) as exc:
            raise BundleError(f"{where}: {exc}") from exc
    return Bundle(trust_domain, tuple(x509s), jwts, sequence, refresh)


def parse_jwks(trust_domain: TrustDomain, data: bytes, source: str = "<jwks>") -> Bundle:
    """A plain JWK Set of JWT-SVID signing keys (``use`` absent, ``sig`` or ``jwt-svid``)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{source}: not valid JSON ({exc})") from exc
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise BundleError(f'{source}: a JWKS needs a "keys" list')
    jwts: dict[str, PublicKey] = {}
    for i, entry in enumerate(keys):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict) or entry.get("use", "sig") not in ("sig", "jwt-svid"):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise BundleError(f"{where}: a JWT signing key needs a kid")
        try:
            key = jwk_public_key(entry)
        except (ValueError, binascii.Error) as exc:
            raise BundleError(f"{where}: {exc}") from exc
        if key is not None:
            jwts[kid] = key
    return Bundle(trust_domain, (), jwts)


def _x509_entry(entry: Mapping[str, Any], where: str) -> x509.Certificate | None:
    x5c = entry.get("x5c")
    if not x5c:
        return None  # spec: an x509-svid entry without a certificate is ignored
    if not isinstance(x5c, list) or not isinstance(x5c[0], str):
        raise BundleError(f"{where}: x5c must be a list of base64 strings")
    cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
    _check_authority(cert, where)
    jwk_key = jwk_public_key(entry)
    if jwk_key is None or not _same_key(jwk_key, cert.public_key()):
        raise BundleError(f"{where}: the JWK key members do not match the x5c certificate")
    return cert


def _b64url(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def jwk_members(key: PublicKey) -> dict[str, str]:
    """The JWK public members of ``key`` (RFC 7518 section 6)."""
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        return {
            "kty": "RSA",
            "n": _b64url(nums.n, (nums.n.bit_length() + 7) // 8),
            "e": _b64url(nums.e, (nums.e.bit_length() + 7) // 8),
        }
    crv = _CURVE_NAMES[key.curve.name]
    ecn = key.public_numbers()
    size = _CURVE_SIZES[crv]
    return {"kty": "EC", "crv": crv, "x": _b64url(ecn.x, size), "y": _b64url(ecn.y, size)}


def spiffe_bundle_json(
    authorities: Sequence[x509.Certificate],
    jwt_authorities: Mapping[str, PublicKey] | None = None,
    *,
    sequence: int | None = None,
    refresh_hint: int | None = None,
) -> str:
    """Serialize authorities as a SPIFFE bundle (the inverse of ``parse_spiffe_json``)."""
    keys: list[dict[str, Any]] = []
    for cert in authorities:
        pub = cert.public_key()
        assert isinstance(pub, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        keys.append(
            {
                "use": "x509-svid",
                **jwk_members(pub),
                "x5c": [base64.b64encode(cert.public_bytes(Encoding.DER)).decode()],
            }
        )
    for kid, key in (jwt_authorities or {}).items():
        keys.append({"use": "jwt-svid", "kid": kid, **jwk_members(key)})
    doc: dict[str, Any] = {"keys": keys}
    if sequence is not None:
        doc["spiffe_sequence"] = sequence
    if refresh_hint is not None:
        doc["spiffe_refresh_hint"] = refresh_hint
    return json.dumps(doc, indent=2)
