"""The decision record: one JSON object per request. Pure: builds, never writes or decides."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

from proxy.policy.evaluate import Decision
from proxy.svid import PeerSvid

# Decisions as logged. "error" is a request refused before the policy could judge it
# (malformed); "allow" and "deny" come from the policy.
ALLOW, DENY, ERROR = "allow", "deny", "error"


@dataclass(slots=True)
class Exchange:
    """What the shell learned about one request while serving it."""

    request_id: str
    peer_addr: str
    method: str = ""
    host: str = ""
    path: str = ""
    decision: Decision | None = None
    outcome: str = ERROR
    reason: str = ""
    status: int = 0
    upstream: str | None = None
    origin: str | None = None
    origin_sha256: str | None = None  # the Hash of a trusted hop's XFCC element
    jwt_presented: bool = False  # a bearer token was sent (valid or not)
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    drift: tuple[str, ...] = ()  # kinds of subject drift seen (``proxy.drift``)


_PID = os.getpid()


def _iso(t: dt.datetime) -> str:
    """UTC, microseconds, ``Z`` (isoformat is several times cheaper than strftime)."""
    if t.utcoffset():
        t = t.astimezone(dt.UTC)
    return t.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def build_record(
    ex: Exchange, peer: PeerSvid | None, policy_sha256: str, started: dt.datetime, duration_s: float
) -> dict[str, Any]:
    """One decision line. Its fields are a contract (README, "Decision log"): the
    governance commands (``proxy/governance/``) read logs of every version, so a field
    is only ever added, never renamed or given another meaning."""
    d = ex.decision
    jwt = d.jwt if d else None
    return {
        "time": _iso(started),
        "event": "request",
        "worker": _PID,
        "request_id": ex.request_id,
        "peer_addr": ex.peer_addr,
        "spiffe_id": str(peer.spiffe_id) if peer else None,
        "origin_spiffe_id": ex.origin,
        "origin_sha256": ex.origin_sha256,
        "leaf_sha256": peer.fingerprint if peer else None,
        "leaf_not_before": _iso(peer.not_before) if peer else None,
        "leaf_not_after": _iso(peer.not_after) if peer else None,
        "leaf_issuer": peer.issuer if peer else None,
        "method": ex.method,
        "host": ex.host,
        "path": ex.path,
        "route": d.route_name if d else None,
        "rule": d.rule if d else None,
        "decision": ex.outcome,
        "mode": "audit" if d and d.audit else "enforce",
        "reason": ex.reason,
        "jwt_presented": ex.jwt_presented,
        "jwt_sub": str(jwt.subject) if jwt else None,
        "jwt_kid": jwt.kid if jwt else None,
        "jwt_aud": list(jwt.audience) if jwt else None,
        "policy_sha256": policy_sha256,
        "status": ex.status,
        "upstream": ex.upstream,
        "upstream_status": ex.upstream_status,
        "bytes_in": ex.bytes_in,
        "bytes_out": ex.bytes_out,
        "duration_ms": round(duration_s * 1000, 3),
        "drift": list(ex.drift) if ex.drift else None,
    }
