"""Peer verification with a cache, shared by the handshake and by re-verification of
open connections after a trust change."""

from __future__ import annotations

import datetime as dt
import time

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import svid
from proxy.errors import SvidError
from proxy.tls import Credentials

_PEER_CACHE_TTL = 300.0


Presented = tuple[bytes, ...]  # a presented chain, as DER: what a connection keeps of it


def parse_chain(der: tuple[bytes, ...] | list[bytes]) -> list[x509.Certificate]:
    """DER certificates parsed; one that does not parse is ``svid.MALFORMED``."""
    try:
        return [x509.load_der_x509_certificate(d) for d in der]
    except ValueError as exc:
        raise SvidError(svid.MALFORMED, f"cannot parse a certificate of the chain: {exc}") from exc


def verified_peer(creds: Credentials, chain: list[x509.Certificate]) -> svid.PeerSvid:
    """``svid.verify_peer`` through the cache (see ``verify_presented``)."""
    return verify_presented(creds, [c.public_bytes(Encoding.DER) for c in chain])[0]


def reverify(creds: Credentials, presented: Presented) -> svid.PeerSvid:
    """A chain kept as DER, verified against ``creds`` (after a trust change)."""
    return verify_presented(creds, list(presented))[0]


def verify_presented(creds: Credentials, der: list[bytes]) -> tuple[svid.PeerSvid, Presented]:
    """``svid.verify_peer`` on a chain given as DER (leaf first), remembered for a chain
    seen before: clients reconnect with the same SVID over and over, and path validation
    is the dearest part of a handshake after the key exchange; a chain seen before is not
    even parsed. An entry is only used with the trust store it was verified against (the
    cache belongs to the credentials), within the validity of every certificate of the
    chain, and for at most five minutes; revocation and expiry stay per request. An
    unparsable certificate is refused as ``svid.MALFORMED``."""
    now = time.time()
    key = tuple(der)
    hit = creds.peer_cache.get(key)
    if hit is not None:
        peer, valid_until, shared = hit
        if now < valid_until and peer.not_before.timestamp() <= now:
            # The cache's own key: connections with the same chain share one copy.
            return peer, shared
        del creds.peer_cache[key]
    chain = parse_chain(key)
    peer = svid.verify_peer(chain, creds.trust, dt.datetime.fromtimestamp(now, dt.UTC))
    valid_until = min(now + _PEER_CACHE_TTL, *(c.not_valid_after_utc.timestamp() for c in chain))
    if len(creds.peer_cache) >= svid.PEERS_KEPT:
        del creds.peer_cache[next(iter(creds.peer_cache))]  # the oldest entry
    creds.peer_cache[key] = (peer, valid_until, key)
    return peer, key
