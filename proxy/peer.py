"""Peer verification with a cache, shared by the handshake and by re-verification of
open connections after a trust change."""

from __future__ import annotations

import datetime as dt
import time

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import svid
from proxy.tls import Credentials

_PEER_CACHE_TTL = 300.0


Presented = tuple[bytes, ...]  # a presented chain, as DER: what a connection keeps of it


def verified_peer(creds: Credentials, chain: list[x509.Certificate]) -> svid.PeerSvid:
    """``svid.verify_peer`` through the cache (see ``verify_presented``)."""
    return verify_presented(creds, chain)[0]


def reverify(creds: Credentials, presented: Presented) -> svid.PeerSvid:
    """A chain kept as DER, verified against ``creds`` (after a trust change)."""
    return verified_peer(creds, [x509.load_der_x509_certificate(d) for d in presented])


def verify_presented(
    creds: Credentials, chain: list[x509.Certificate]
) -> tuple[svid.PeerSvid, Presented]:
    """``svid.verify_peer``, remembered for a chain seen before: clients reconnect with the
    same SVID over and over, and path validation is the dearest part of a handshake after
    the key exchange. An entry is only used with the trust store it was verified against
    (the cache belongs to the credentials), within the validity of every certificate of
    the chain, and for at most five minutes; revocation and expiry stay per request."""
    now = time.time()
    key = tuple(c.public_bytes(Encoding.DER) for c in chain)
    hit = creds.peer_cache.get(key)
    if hit is not None:
        peer, valid_until, shared = hit
        if now < valid_until and peer.not_before.timestamp() <= now:
            # The cache's own key: connections with the same chain share one copy.
            return peer, shared
        del creds.peer_cache[key]
    peer = svid.verify_peer(chain, creds.trust, dt.datetime.fromtimestamp(now, dt.UTC))
    valid_until = min(now + _PEER_CACHE_TTL, *(c.not_valid_after_utc.timestamp() for c in chain))
    if len(creds.peer_cache) >= svid.PEERS_KEPT:
        del creds.peer_cache[next(iter(creds.peer_cache))]  # the oldest entry
    creds.peer_cache[key] = (peer, valid_until, key)
    return peer, key
