"""SPIFFE bundle parsing (../shared/SPIFFE.md section 4) and PEM bundles."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import bundle
from proxy.devcerts import issue_ca, issue_svid
from proxy.errors import BundleError
from proxy.spiffe_id import TrustDomain

TD = TrustDomain("example.org")
CA = issue_ca("example.org")
CA2 = issue_ca("example.org", common_name="second")
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
EC_KEY = ec.generate_private_key(ec.SECP384R1()).public_key()


def doc(keys: Any, **extra: Any) -> bytes:
    return json.dumps({"keys": keys, **extra}).encode()


def x509_entry(cert: Any = CA.cert, **over: Any) -> dict[str, Any]:
    entry = json.loads(bundle.spiffe_bundle_json([cert]))["keys"][0]
    entry.update(over)
    return {k: v for k, v in entry.items() if v is not None}


def test_round_trip_with_jwt_keys() -> None:
    text = bundle.spiffe_bundle_json(
        [CA.cert, CA2.cert], {"k1": RSA_KEY, "k2": EC_KEY}, sequence=7, refresh_hint=300
    )
    parsed = bundle.parse(TD, text.encode())
    assert parsed.x509_authorities == (CA.cert, CA2.cert)
    assert set(parsed.jwt_authorities) == {"k1", "k2"}
    assert parsed.sequence == 7 and parsed.refresh_hint == 300


def test_pem_bundle() -> None:
    parsed = bundle.parse(TD, CA.cert_pem() + CA2.cert_pem())
    assert parsed.x509_authorities == (CA.cert, CA2.cert)


IGNORED = [
    ("missing_use", {k: v for k, v in x509_entry().items() if k != "use"}),
    ("unknown_use", x509_entry(use="wit-svid")),
    ("use_is_case_sensitive", x509_entry(use="X509-SVID")),
    ("empty_x5c", x509_entry(x5c=[])),
    ("missing_x5c", x509_entry(x5c=None)),
    ("unknown_kty_jwt", {"use": "jwt-svid", "kid": "k", "kty": "OKP", "crv": "Ed25519", "x": "AA"}),
    # Trust Domain and Bundle section 4.2.1: an entry whose kty is missing or unknown is
    # ignored, even when its x5c holds a certificate that would parse.
    ("missing_kty_x509", x509_entry(kty=None, crv=None, x=None, y=None)),
    ("unknown_kty_x509", x509_entry(kty="XYZ")),
    ("okp_kty_x509", x509_entry(kty="OKP", crv="Ed25519", x="AA", y=None)),
    ("kty_is_case_sensitive_x509", x509_entry(kty="ec")),
    ("kty_not_a_string_x509", x509_entry(kty=["EC"])),
]


@pytest.mark.parametrize("entry", [r[1] for r in IGNORED], ids=[r[0] for r in IGNORED])
def test_entries_ignored(entry: dict[str, Any]) -> None:
    parsed = bundle.parse(TD, doc([entry, x509_entry(CA2.cert)]))
    assert parsed.x509_authorities == (CA2.cert,)
    assert not parsed.jwt_authorities


def test_extra_x5c_values_use_the_first() -> None:
    second = base64.b64encode(CA2.cert.public_bytes(Encoding.DER)).decode()
    entry = x509_entry()
    entry["x5c"].append(second)
    assert bundle.parse(TD, doc([entry])).x509_authorities == (CA.cert,)


def test_empty_keys_means_revoked() -> None:
    assert bundle.parse(TD, doc([])).x509_authorities == ()


REJECTED = [
    ("not_json", b"{not json", "not valid JSON"),
    ("not_object", b"[]", "must be a JSON object"),
    ("keys_missing", b'{"spiffe_sequence": 1}', "no authorities found"),
    ("keys_not_list", b'{"keys": {}}', "no authorities found"),
    (
        "jwt_without_kid",
        doc([{"use": "jwt-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]),
        "needs a kid",
    ),
    (
        "key_mismatch",
        doc([x509_entry(x=x509_entry(CA2.cert)["x"], y=x509_entry(CA2.cert)["y"])]),
        "do not match",
    ),
    (
        "leaf_in_bundle",
        doc([x509_entry(issue_svid(CA, ["spiffe://example.org/w"]).cert)]),
        "not a CA",
    ),
    ("bad_base64", doc([x509_entry(x5c=["%%%"])]), "keys[0]"),
    ("bad_sequence", doc([], spiffe_sequence=-1), "spiffe_sequence"),
    ("pem_garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "PEM"),
]


@pytest.mark.parametrize(
    ("data", "message"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED]
)
def test_rejected(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message.replace("[", r"\[")):
        bundle.parse(TD, data, "b.json")
