"""Reading the proxy's SVID, key and trust bundles from files; building the TLS context.

The server context requires a client certificate and leaves its verification to the
connection's :data:`ChainCheck`: the X.509-SVID rules, including "the chain must end in
the bundle of the leaf's own trust domain", applied by ``svid.verify_peer`` (go-spiffe
does the same with ``RequireAnyClientCert`` plus ``VerifyPeerCertificate``). The check
runs inside OpenSSL's verify callback, on the chain OpenSSL built from what the client
sent, so a refused client gets the TLS alert matching the reason during the handshake
(``bad_certificate``, ``unknown_ca``, ``certificate_expired``), as nginx's or Envoy's
clients do, instead of a connection closed without a word.

TLS policy (both the server context and the client context used towards upstreams):

- TLS 1.2 and 1.3 only. TLS 1.2 offers only ECDHE key exchange with AEAD suites
  (AES-GCM, ChaCha20-Poly1305): no CBC, no SHA-1 MAC, no static RSA or finite-field DH.
  TLS 1.3 keeps OpenSSL's default suites, all of them AEAD with (EC)DHE.
- No session resumption, so every connection is a full handshake whose client chain
  goes through ``svid.verify_peer`` (a resumed session presents no chain, and its
  verification would be the one done when the session was made, maybe by old bundles).
  ``OP_NO_TICKET`` stops stateless tickets (TLS 1.2 and 1.3): the server keeps no ticket
  key to decrypt one. With it, OpenSSL's TLS 1.3 tickets are stateful: an ID looked up
  in the server's session cache, and ``SESS_CACHE_OFF`` keeps that cache (and TLS 1.2
  session IDs) empty, so any ticket or session ID offered finds nothing and the
  handshake is a full one. TLS 1.3 servers still send such (useless) tickets after the
  handshake: turning that off needs ``SSL_CTX_set_num_tickets(ctx, 0)``, which neither
  pyOpenSSL (26.x) nor cryptography's bindings expose. The client side never offers a
  saved session (no ``set_session``) and keeps no session cache either.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL, crypto

from proxy import bundle as bundle_mod
from proxy import svid
from proxy.bundle import Bundle
from proxy.config import TlsFiles
from proxy.errors import BundleError, ConfigError, SvidError
from proxy.spiffe_id import SpiffeId, TrustDomain
from proxy.trust import TrustStore

# OpenSSL as pyOpenSSL itself binds it (the same library and objects).
_ffi, _lib = Binding.ffi, Binding.lib


@dataclass(frozen=True)
class Credentials:
    """Everything TLS needs, loaded together so a swap is atomic."""

    context: SSL.Context
    own_id: SpiffeId | None
    own_not_after: dt.datetime
    trust: TrustStore
    jwt_authorities: dict[TrustDomain, dict[str, bundle_mod.PublicKey]]
    client_context: SSL.Context  # for mTLS to upstreams, presenting the same SVID
    loaded_at: dt.datetime = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.UTC))
    # Verified peer SVIDs by the exact DER chain presented (see peer.verify_presented). It
    # lives and dies with these credentials, so a bundle change empties it.
    peer_cache: dict[tuple[bytes, ...], tuple[Any, float, tuple[bytes, ...]]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the {what}: {exc.strerror or exc}") from exc


def load_bundles(files: Mapping[TrustDomain, Path]) -> dict[TrustDomain, Bundle]:
    out = {}
    for td, path in files.items():
        try:
            out[td] = bundle_mod.parse(td, _read(path, f"bundle of {td}"), str(path))
        except BundleError as exc:
            raise ConfigError(str(path), str(exc)) from exc
    return out


def _accept_any(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    return True  # verification happens in svid.verify_peer, per trust domain


# A connection's verification of its client's chain (leaf first, as OpenSSL built it from
# what the client sent, each certificate DER-encoded): None to accept, else the reason code
# that refuses it. Set on the server-side ``SSL.Connection`` with ``set_app_data``;
# without one, any chain passes.
ChainCheck = Callable[[list[bytes]], "str | None"]

# The TLS alert a refused client gets, by reason: OpenSSL sends the alert it maps the
# verify error to (``ssl_x509err2alert``). Any other reason: bad_certificate.
_ALERT_BY_REASON = {
    svid.EXPIRED: "X509_V_ERR_CERT_HAS_EXPIRED",  # certificate_expired
    svid.UNTRUSTED: "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY",  # unknown_ca
    svid.NO_BUNDLE: "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
    svid.EMPTY_BUNDLE: "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
    svid.BAD_SIGNING_CERT: "X509_V_ERR_INVALID_CA",  # unknown_ca
    svid.SIGNING_NO_KEY_USAGE: "X509_V_ERR_INVALID_CA",
}
_BAD_CERTIFICATE = "X509_V_ERR_CERT_REJECTED"


def alert_error(reason: str) -> int:
    """OpenSSL's verify error for ``reason``: the one it turns into the matching alert."""
    return int(getattr(_lib, _ALERT_BY_REASON.get(reason, _BAD_CERTIFICATE)))


def _built_chain(store_ctx: Any) -> list[bytes]:
    """The chain OpenSSL built, as DER: a chain seen before is then recognised without
    parsing it (peer.verify_presented), a third of the cost of a conversion to
    ``cryptography`` objects."""
    stack = _lib.X509_STORE_CTX_get1_chain(store_ctx)
    if stack == _ffi.NULL:
        return []
    try:
        # get1: every certificate was up-referenced; pyOpenSSL's X509 frees its own.
        return [
            crypto.dump_certificate(
                crypto.FILETYPE_ASN1, crypto.X509._from_raw_x509_ptr(_lib.sk_X509_value(stack, i))
            )
            for i in range(_lib.sk_X509_num(stack))
        ]
    finally:
        _lib.sk_X509_free(stack)


def _verify(ok: int, store_ctx: Any) -> int:
    """OpenSSL's verify callback of the server context. OpenSSL has no trust anchors here,
    so it reports errors on the way (accepted: the SVID rules decide, per trust domain);
    its last call is for the leaf with ``ok`` set, once the chain is built. There the
    connection's :data:`ChainCheck` runs, and a refusal sets the verify error whose alert
    matches its reason. pyOpenSSL's own ``set_verify`` wrapper cannot set that error, so
    this is registered with ``SSL_CTX_set_verify`` directly (pinned by a test)."""
    try:
        if ok and _lib.X509_STORE_CTX_get_error_depth(store_ctx) == 0:
            index = _lib.SSL_get_ex_data_X509_STORE_CTX_idx()
            ssl = _lib.X509_STORE_CTX_get_ex_data(store_ctx, index)
            conn = SSL.Connection._reverse_mapping.get(ssl)
            check = conn.get_app_data() if conn is not None else None
            if check is not None:
                reason = check(_built_chain(store_ctx))
                if reason is not None:
                    _lib.X509_STORE_CTX_set_error(store_ctx, alert_error(reason))
                    return 0
        _lib.X509_STORE_CTX_set_error(store_ctx, _lib.X509_V_OK)
        return 1
    except Exception:  # never let an exception cross into OpenSSL: refuse (fail closed)
        _lib.X509_STORE_CTX_set_error(store_ctx, alert_error(""))
        return 0


# Module-level: OpenSSL keeps calling it for as long as any context lives.
_verify_callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", _verify)


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# TLS 1.2 suites: ECDHE key exchange and AEAD only (TLS 1.3 suites are set apart).
TLS12_CIPHERS = b":".join(
    (
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    )
)


def _context(chain: Sequence[x509.Certificate], key: PrivateKey, key_source: str) -> SSL.Context:
    """The TLS policy of the module docstring, presenting ``chain`` with ``key``."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.use_certificate(chain[0])
    for cert in chain[1:]:
        ctx.add_extra_chain_cert(cert)
    try:
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise ConfigError(
            key_source, "the private key does not match the SVID certificate"
        ) from exc
    return ctx


def server_context(
    chain: Sequence[x509.Certificate], key: PrivateKey, key_source: str
) -> SSL.Context:
    ctx = _context(chain, key, key_source)
    mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    _lib.SSL_CTX_set_verify(ctx._context, mode, _verify_callback)
    return ctx


def client_context(
    chain: Sequence[x509.Certificate], key: PrivateKey, key_source: str
) -> SSL.Context:
    """For upstream mTLS: presents the proxy's SVID; the upstream's SVID is verified by
    ``svid.verify_peer`` after the handshake (OpenSSL is told to accept any)."""
    ctx = _context(chain, key, key_source)
    ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
    return ctx


def credentials_from(
    chain: Sequence[x509.Certificate],
    key: Any,
    bundles: dict[TrustDomain, Bundle],
    jwt_authorities: dict[TrustDomain, dict[str, bundle_mod.PublicKey]],
    svid_source: str,
    key_source: str,
) -> Credentials:
    """Check and assemble credentials (whatever they came from): the SVID is valid now
    and its key matches; raise ConfigError naming the source otherwise."""
    if not chain:
        raise ConfigError(svid_source, "no certificate")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(key_source, "the private key must be RSA or EC")
    leaf = chain[0]
    now = dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc < now:
        raise ConfigError(svid_source, f"the SVID expired at {leaf.not_valid_after_utc}")
    if leaf.not_valid_before_utc > now:
        raise ConfigError(svid_source, f"the SVID is not valid before {leaf.not_valid_before_utc}")
    ctx = server_context(chain, key, key_source)
    try:
        own_id: SpiffeId | None = svid.leaf_spiffe_id(leaf)
    except SvidError:
        own_id = None  # a plain server certificate: XFCC then carries no By=
    client = client_context(chain, key, key_source)
    return Credentials(
        ctx, own_id, leaf.not_valid_after_utc, TrustStore(bundles), jwt_authorities, client
    )


def jwt_authorities_of(
    bundles: dict[TrustDomain, Bundle], files: Mapping[TrustDomain, Path]
) -> dict[TrustDomain, dict[str, bundle_mod.PublicKey]]:
    out = {td: dict(b.jwt_authorities) for td, b in bundles.items() if b.jwt_authorities}
    for td, path in files.items():
        try:
            jwks = bundle_mod.parse_jwks(td, _read(path, f"JWT bundle of {td}"), str(path))
        except BundleError as exc:
            raise ConfigError(str(path), str(exc)) from exc
        out.setdefault(td, {}).update(jwks.jwt_authorities)
    return out


def _read_chain(path: Path) -> list[x509.Certificate]:
    data = _read(path, "SVID")
    if not data.strip():  # empty, or not written yet
        raise ConfigError(str(path), f"no certificate in {path}")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(str(path), "not a certificate: no PEM CERTIFICATE block in the file")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(str(path), f"a PEM certificate cannot be read: {exc}") from exc


def _read_key(path: Path) -> Any:
    data = _read(path, "SVID key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(path), f"the private key cannot be read: {exc}") from exc


def load_credentials(files: TlsFiles) -> Credentials:
    """Read and check the proxy's SVID, key and bundles; raise ConfigError naming the file."""
    assert files.svid is not None and files.key is not None
    chain = _read_chain(files.svid)
    key = _read_key(files.key)
    bundles = load_bundles(files.bundles)
    return credentials_from(
        chain,
        key,
        bundles,
        jwt_authorities_of(bundles, files.jwt_bundles),
        str(files.svid),
        str(files.key),
    )


def check_files(files: TlsFiles) -> list[ConfigError]:
    """Every reason ``load_credentials`` would refuse these files, each file checked on its
    own (``spiffe-pep check``): missing, unreadable, not a certificate or key, a key that
    does not match the SVID, an SVID not valid now, a bad bundle. Empty: all usable."""
    errors: list[ConfigError] = []

    def attempt(step: Any, *args: Any) -> Any:
        try:
            return step(*args)
        except ConfigError as exc:
            errors.append(exc)
            return None

    chain = attempt(_read_chain, files.svid) if files.svid is not None else None
    key = attempt(_read_key, files.key) if files.key is not None else None
    bundles: dict[TrustDomain, Bundle] = {}
    for td, path in files.bundles.items():
        bundles.update(attempt(load_bundles, {td: path}) or {})
    for td, path in files.jwt_bundles.items():
        attempt(jwt_authorities_of, {}, {td: path})
    if chain is not None and key is not None:
        attempt(credentials_from, chain, key, bundles, {}, str(files.svid), str(files.key))
    return errors
