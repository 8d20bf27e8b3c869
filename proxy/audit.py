"""The decision record: one JSON object per request. Pure: builds, never writes or decides."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from proxy.policy.evaluate import Decision
from proxy.svid import PeerSvid, PerPeer

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


PID = os.getpid()


def iso(t: dt.datetime) -> str:
    """UTC, microseconds, ``Z`` (isoformat is several times cheaper than strftime)."""
    if t.utcoffset():
        t = t.astimezone(dt.UTC)
    return t.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_second: list[object] = [None, ""]  # the last second formatted, and its text


def iso_wall(t: float) -> str:
    """``iso`` of a ``time.time()`` value, the date and time formatted once per second."""
    sec, frac = divmod(t, 1.0)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    # str() of a 7-digit number, not a format spec: int formatting's code is one more
    # piece of C the request path would pull into the CPU's caches.
    return f"{_second[1]}.{str(us + 1_000_000)[1:]}Z"


def duration_text(seconds: float) -> str:
    """A duration as the decision line's ``duration_ms``: milliseconds rounded to the
    microsecond, as JSON writes ``duration_us(seconds) / 1000`` (``repr`` of that
    float), built from integers: ``round(x, 3)`` and float ``repr`` run CPython's
    correctly rounded decimal conversion twice (with a ``snprintf`` between), several
    thousand instructions of code nothing else on the request path uses."""
    ms, frac = divmod(round(seconds * 1e6), 1000)
    if not frac:
        return f"{ms}.0"
    return f"{ms}.{str(frac + 1000)[1:].rstrip('0')}"


def build_record(
    ex: Exchange, peer: PeerSvid | None, policy_sha256: str, started: dt.datetime, duration_s: float
) -> dict[str, Any]:
    """One decision line. Its fields are a contract (README, "Decision log"): the
    governance commands (``proxy/governance/``) read logs of every version, so a field
    is only ever added, never renamed or given another meaning."""
    d = ex.decision
    jwt = d.jwt if d else None
    return {
        "time": iso(started),
        "event": "request",
        "worker": PID,
        "request_id": ex.request_id,
        "peer_addr": ex.peer_addr,
        "spiffe_id": str(peer.spiffe_id) if peer else None,
        "origin_spiffe_id": ex.origin,
        "origin_sha256": ex.origin_sha256,
        "leaf_sha256": peer.fingerprint if peer else None,
        "leaf_not_before": iso(peer.not_before) if peer else None,
        "leaf_not_after": iso(peer.not_after) if peer else None,
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
        "duration_ms": round(duration_s * 1e6) / 1000,
        "drift": list(ex.drift) if ex.drift else None,
    }


_enc = json.encoder.encode_basestring_ascii  # what json.dumps does with a str
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _s(value: str | None) -> str:
    return "null" if value is None else _enc(value)


class LineFormat:
    """Decision lines of one peer, encoded as ``json.dumps(build_record(...),
    separators=(",", ":"))`` would, byte for byte (tested), but with the peer's fields
    encoded once and no dict built per request (building and encoding the dict was the
    largest part of the proxy's own work per request). ``for_peer`` shares one between
    the connections of a peer (the peer cache hands them one ``PeerSvid``)."""

    __slots__ = ("_after_id", "_after_origin", "_routes", "peer")

    def __init__(self, peer: PeerSvid | None) -> None:
        self.peer = peer
        self._after_id = f',"spiffe_id":{_s(str(peer.spiffe_id) if peer else None)}'
        self._after_origin = (
            f',"leaf_sha256":{_s(peer.fingerprint if peer else None)}'
            f',"leaf_not_before":{_s(iso(peer.not_before) if peer else None)}'
            f',"leaf_not_after":{_s(iso(peer.not_after) if peer else None)}'
            f',"leaf_issuer":{_s(peer.issuer if peer else None)}'
        )
        # "route" .. "reason" for the (decision, outcome, reason) seen on this connection
        self._routes: dict[tuple[int, str, str], tuple[Decision | None, str]] = {}

    def _route_part(self, ex: Exchange) -> str:
        d = ex.decision
        key = (id(d), ex.outcome, ex.reason)
        hit = self._routes.get(key)
        if hit is not None and hit[0] is d:  # the entry holds d: its id is not reused
            return hit[1]
        if len(self._routes) >= 64:
            self._routes.clear()
        part = (
            f',"route":{_s(d.route_name if d else None)},"rule":{_s(d.rule if d else None)}'
            f',"decision":{_enc(ex.outcome)}'
            f',"mode":"{"audit" if d and d.audit else "enforce"}"'
            f',"reason":{_enc(ex.reason)}'
        )
        self._routes[key] = (d, part)
        return part

    def encode(
        self,
        ex: Exchange,
        policy_sha256: str,
        time: str,
        duration_s: float,
        extra: dict[str, str] | None = None,
    ) -> str:
        """The line (no newline); ``time`` is ``_iso`` of when the request started."""
        d = ex.decision
        jwt = d.jwt if d else None
        if jwt is None:
            jwt_part = ',"jwt_sub":null,"jwt_kid":null,"jwt_aud":null'
        else:
            jwt_part = (
                f',"jwt_sub":{_enc(str(jwt.subject))},"jwt_kid":{_s(jwt.kid)}'
                f',"jwt_aud":{_dumps(list(jwt.audience))}'
            )
        line = (
            f'{{"time":{_enc(time)},"event":"request","worker":{PID}'
            f',"request_id":{_enc(ex.request_id)},"peer_addr":{_enc(ex.peer_addr)}'
            f"{self._after_id}"
            f',"origin_spiffe_id":{_s(ex.origin)},"origin_sha256":{_s(ex.origin_sha256)}'
            f"{self._after_origin}"
            f',"method":{_enc(ex.method)},"host":{_enc(ex.host)},"path":{_enc(ex.path)}'
            f"{self._route_part(ex)}"
            f',"jwt_presented":{"true" if ex.jwt_presented else "false"}{jwt_part}'
            f',"policy_sha256":{_enc(policy_sha256)},"status":{ex.status}'
            f',"upstream":{_s(ex.upstream)},"upstream_status":'
            f"{'null' if ex.upstream_status is None else ex.upstream_status}"
            f',"bytes_in":{ex.bytes_in},"bytes_out":{ex.bytes_out}'
            f',"duration_ms":{duration_text(duration_s)}'
            f',"drift":{_dumps(list(ex.drift)) if ex.drift else "null"}'
        )
        if extra:
            line += "".join(f",{_enc(k)}:{_enc(v)}" for k, v in extra.items())
        return line + "}"


_SHARED: PerPeer[LineFormat] = PerPeer()


def for_peer(peer: PeerSvid) -> LineFormat:
    """The ``LineFormat`` of ``peer``, shared by all its connections."""
    return _SHARED.get(peer) or _SHARED.put(peer, LineFormat(peer))
