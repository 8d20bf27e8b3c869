"""The handshake's SVID check through the cache: chains as DER, parsed only when new."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import peer, svid
from proxy.config import TlsFiles
from proxy.errors import SvidError
from proxy.spiffe_id import TrustDomain
from proxy.tls import load_credentials
from tests.conftest import CLIENT_ID, Pki


def _chain(path: str) -> list[bytes]:
    certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    return [c.public_bytes(Encoding.DER) for c in certs]


def test_a_chain_seen_before_is_not_parsed_again(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = load_credentials(
        TlsFiles(
            svid=pki.dir / "server.pem",
            key=pki.dir / "server_key.pem",
            bundles={TrustDomain("example.org"): Path(pki.bundle)},
        )
    )
    der = _chain(str(pki.dir / "client.pem"))
    first, presented = peer.verify_presented(creds, der)
    assert str(first.spiffe_id) == CLIENT_ID and presented == tuple(der)

    def no_parsing(data: bytes) -> x509.Certificate:
        raise AssertionError("a cached chain was parsed")

    monkeypatch.setattr(x509, "load_der_x509_certificate", no_parsing)
    again, shared = peer.verify_presented(creds, list(der))
    assert again is first and shared is presented  # one copy per chain
    assert peer.reverify(creds, presented) is first


@pytest.mark.parametrize("junk", [b"", b"\x30\x03\x02\x01\x00", b"not a certificate"])
def test_a_certificate_that_does_not_parse_is_malformed_not_a_crash(junk: bytes) -> None:
    with pytest.raises(SvidError) as caught:
        peer.parse_chain([junk])
    assert caught.value.reason == svid.MALFORMED
