"""Certificate issuing for development and tests: CAs and X.509-SVIDs with cryptography.

``write_dev_set`` writes the certificates the embedded default configuration uses; the
lower-level ``issue_ca``/``issue_svid`` let tests make every malformed SVID a rule needs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, and the chain above it (issuer first, root excluded)."""

    cert: x509.Certificate
    key: PrivateKey
    parents: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        """Leaf then intermediates, as spiffe-helper writes ``svid.pem``."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.parents)
        )

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _key_usage(
    *, digital_signature: bool, cert_sign: bool, crl_sign: bool, key_agreement: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def issue_ca(
    trust_domain: str,
    *,
    parent: Issued | None = None,
    common_name: str | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key: PrivateKey | None = None,
    signature_hash: str = "sha256",
) -> Issued:
    """A CA for ``trust_domain``: self-signed root, or an intermediate under ``parent``.

    Its URI SAN is the trust domain's own ID, as SPIRE's CAs carry.
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spiffe-pep dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"{trust_domain} CA"),
        ]
    )
    issuer_name = parent.cert.subject if parent else name
    signer = parent.key if parent else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if parent:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
            critical=False,
        )
    cert = _sign(builder, signer, signature_hash)
    # The chain above a CA stops below the root: roots travel in bundles, not chains.
    parents = (parent.cert, *parent.parents) if parent and _is_intermediate(parent) else ()
    return Issued(cert, key, parents)


def issue_svid(
    issuer: Issued,
    uris: Sequence[str] = (),
    *,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    ca: bool = False,
    key_usage: x509.KeyUsage | bool | None = True,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=30),
    key: PrivateKey | None = None,
    signature_hash: str = "sha256",
    subject: x509.Name | None = None,
) -> Issued:
    """An X.509-SVID for ``uris`` (normally exactly one SPIFFE ID) signed by ``issuer``.

    ``key_usage=True`` gives the standard digitalSignature KU, ``None`` omits the
    extension, or pass an explicit ``x509.KeyUsage`` to break the rules on purpose.
    ``key`` and ``signature_hash`` (default: a new P-256 key, SHA-256) make weak ones.
    ``subject``: the subject name (default ``O=SPIRE``, as SPIRE issues them).
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = _now()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    not_before = not_before or now - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            subject or x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")])
        )
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after or not_before + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if key_usage is True:
        key_usage = _key_usage(digital_signature=True, cert_sign=False, crl_sign=False)
    if isinstance(key_usage, x509.KeyUsage):
        builder = builder.add_extension(key_usage, critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = _sign(builder, issuer.key, signature_hash)
    parents = (issuer.cert, *issuer.parents) if _is_intermediate(issuer) else ()
    return Issued(cert, key, parents)


_HASHES: dict[str, hashes.SHA256 | hashes.SHA384 | hashes.SHA512] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


def _sign(builder: x509.CertificateBuilder, key: PrivateKey, digest: str) -> x509.Certificate:
    if digest in _HASHES:
        return builder.sign(key, _HASHES[digest])
    # cryptography refuses to sign with a broken hash; tests need such certificates, so
    # OpenSSL re-signs one (X509_sign also rewrites the signature algorithm in the TBS).
    import warnings

    from OpenSSL import crypto

    cert = crypto.X509.from_cryptography(builder.sign(key, hashes.SHA256()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # X509.sign: what we want here
        cert.sign(crypto.PKey.from_cryptography_key(key), digest)
    return cert.to_cryptography()


def _is_intermediate(issued: Issued) -> bool:
    return issued.cert.issuer != issued.cert.subject


def leaf_key_usage(
    *,
    digital_signature: bool = True,
    cert_sign: bool = False,
    crl_sign: bool = False,
    key_agreement: bool = False,
) -> x509.KeyUsage:
    """A key usage extension for deliberately malformed test SVIDs."""
    return _key_usage(
        digital_signature=digital_signature,
        cert_sign=cert_sign,
        crl_sign=crl_sign,
        key_agreement=key_agreement,
    )


# --- the development set ---------------------------------------------------------------

DEV_TRUST_DOMAIN = "example.org"
DEV_PARTNER_DOMAIN = "partner.org"
DEV_SERVER_ID = "spiffe://example.org/ns/edge/sa/spiffe-pep"
DEV_CLIENT_ID = "spiffe://example.org/ns/prod/sa/client"
DEV_DENIED_ID = "spiffe://example.org/ns/dev/sa/denied"
DEV_PARTNER_ID = "spiffe://partner.org/ns/payments/sa/api"

DEV_FILES = (
    "bundle.pem",
    "partner.spiffe.json",
    "server.pem",
    "server_key.pem",
    "client.pem",
    "client_key.pem",
    "denied.pem",
    "denied_key.pem",
    "partner-client.pem",
    "partner-client_key.pem",
)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def dev_set_present(directory: Path) -> bool:
    return all((directory / f).is_file() for f in DEV_FILES)


def write_dev_set(directory: Path) -> list[Path]:
    """Write a CA per dev trust domain, a server SVID and client SVIDs into ``directory``.

    - ``bundle.pem``: example.org's CA (PEM bundle); ``partner.spiffe.json``: partner.org's
      CA as a SPIFFE bundle (JSON), showing both formats;
    - ``server.pem``/``server_key.pem``: the proxy's SVID (also valid for localhost so
      ``curl --cacert certs_dev/bundle.pem https://localhost:8443`` verifies it);
    - ``client.pem``: an ID the example policy allows; ``denied.pem``: one it refuses;
      ``partner-client.pem``: a federated workload from partner.org.
    """
    from proxy.bundle import spiffe_bundle_json

    directory.mkdir(parents=True, exist_ok=True)
    root = issue_ca(DEV_TRUST_DOMAIN)
    intermediate = issue_ca(DEV_TRUST_DOMAIN, parent=root, common_name="example.org intermediate")
    partner_root = issue_ca(DEV_PARTNER_DOMAIN)
    server = issue_svid(intermediate, [DEV_SERVER_ID], dns=["localhost"], ips=["127.0.0.1", "::1"])
    client = issue_svid(intermediate, [DEV_CLIENT_ID])
    denied = issue_svid(intermediate, [DEV_DENIED_ID])
    partner = issue_svid(partner_root, [DEV_PARTNER_ID])
    written = []
    for name, data, mode in [
        ("bundle.pem", root.cert_pem(), 0o644),
        (
            "partner.spiffe.json",
            spiffe_bundle_json([partner_root.cert], sequence=1).encode(),
            0o644,
        ),
        ("server.pem", server.chain_pem(), 0o644),
        ("server_key.pem", server.key_pem(), 0o600),
        ("client.pem", client.chain_pem(), 0o644),
        ("client_key.pem", client.key_pem(), 0o600),
        ("denied.pem", denied.chain_pem(), 0o644),
        ("denied_key.pem", denied.key_pem(), 0o600),
        ("partner-client.pem", partner.chain_pem(), 0o644),
        ("partner-client_key.pem", partner.key_pem(), 0o600),
    ]:
        _write(directory / name, data, mode)
        written.append(directory / name)
    return written
