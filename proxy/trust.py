"""Per-trust-domain path validation with OpenSSL (the shell side of ``svid.py``).

One ``X509Store`` per trust domain, holding only that domain's X.509 authorities. The
store used for a peer is chosen by the trust domain in the peer's own SPIFFE ID, so a
federated CA can never vouch for an ID outside its own domain (the flaw of one merged
root store). ``PARTIAL_CHAIN`` lets a bundle anchor on an intermediate, as Go's verifier
does. No purpose is set, so, like go-spiffe, EKU is not enforced. Stores have no remove
API, so a bundle change builds a new ``TrustStore``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cryptography import x509
from OpenSSL import crypto

from proxy import svid
from proxy.bundle import Bundle
from proxy.errors import SvidError
from proxy.spiffe_id import TrustDomain


class TrustStore:
    """The trust bundles in force, and path validation against one of them."""

    def __init__(self, bundles: Mapping[TrustDomain, Bundle]) -> None:
        self.bundles = dict(bundles)
        self._stores: dict[TrustDomain, crypto.X509Store] = {}
        for td, bundle in self.bundles.items():
            store = crypto.X509Store()
            for ca in bundle.x509_authorities:
                store.add_cert(crypto.X509.from_cryptography(ca))
            store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
            self._stores[td] = store

    def __call__(
        self,
        trust_domain: TrustDomain,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
    ) -> list[x509.Certificate]:
        bundle = self.bundles.get(trust_domain)
        if bundle is None:
            raise SvidError(
                svid.NO_BUNDLE, f"could not get X509 bundle for trust domain {trust_domain}"
            )
        if not bundle.x509_authorities:
            raise SvidError(
                svid.EMPTY_BUNDLE, f"the bundle of {trust_domain} has no X.509 authorities"
            )
        ctx = crypto.X509StoreContext(
            self._stores[trust_domain],
            crypto.X509.from_cryptography(leaf),
            [crypto.X509.from_cryptography(c) for c in intermediates],
        )
        try:
            verified = ctx.get_verified_chain()
        except crypto.X509StoreContextError as exc:
            raise SvidError(svid.UNTRUSTED, f"could not verify leaf certificate: {exc}") from exc
        return [c.to_cryptography() for c in verified]
