"""Policy evaluation: deterministic, default deny, no side effects.

In order: a revoked SPIFFE ID or certificate is denied everywhere; an expired client
certificate, or one that lives longer than ``max_cert_lifetime``, is denied; then the
first route whose host, path and method match decides: its ``deny`` patterns win, then
one of its ``allow`` patterns must match, then (with ``audiences``) a valid JWT-SVID for
one of them whose subject is the peer. No matching route means deny. A route in audit
mode is forwarded whatever the verdict; the verdict is still reported.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from proxy.jwtsvid import JwtAuthorities, JwtSvid, JwtSvidError, validate
from proxy.policy.model import AUDIT, Policy, Route
from proxy.spiffe_id import SpiffeId

ALLOWED = "allowed"
NO_ROUTE = "no_matching_route"
NOT_ALLOWED = "identity_not_allowed"
DENIED = "identity_denied"
REVOKED_ID = "spiffe_id_revoked"
REVOKED_CERT = "certificate_revoked"
CERT_EXPIRED = "certificate_expired"
CERT_TOO_LONG = "certificate_lifetime_too_long"
ORIGIN_MISSING = "origin_missing"
ORIGIN_NOT_ALLOWED = "origin_not_allowed"
ORIGIN_DENIED = "origin_denied"
JWT_MISSING = "jwt_missing"
JWT_SUBJECT_MISMATCH = "jwt_subject_mismatch"


class Caller(Protocol):
    """What the policy knows of the mTLS peer (``svid.PeerSvid`` is one)."""

    @property
    def spiffe_id(self) -> SpiffeId: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def not_before(self) -> dt.datetime: ...
    @property
    def not_after(self) -> dt.datetime: ...


@dataclass(frozen=True, slots=True)
class Request:
    """What the policy sees of a request: normalized method, host (no port) and path,
    and the bearer token when one was sent."""

    method: str
    host: str
    path: str
    token: str | None = None
    origin: SpiffeId | None = None  # from a trusted forwarder's XFCC, never from anyone else
    origin_sha256: str | None = None  # the Hash of that XFCC element (the origin's leaf)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    route: Route | None = None
    rule: str | None = None
    audit: bool = False
    jwt: JwtSvid | None = None

    @property
    def route_name(self) -> str | None:
        return self.route.name if self.route else None

    @property
    def forward(self) -> bool:
        """Whether the request goes upstream: allowed, or denied on an audit-mode route."""
        return self.route is not None and (self.allowed or self.audit)


def _lifetime(caller: Caller) -> float:
    return (caller.not_after - caller.not_before).total_seconds()


def evaluate(
    policy: Policy,
    caller: Caller,
    request: Request,
    now: dt.datetime,
    jwt_authorities: JwtAuthorities | None = None,
) -> Decision:
    peer = caller.spiffe_id
    origin = request.origin
    if policy.revoked_ids and (
        str(peer) in policy.revoked_ids or (origin and str(origin) in policy.revoked_ids)
    ):
        return Decision(False, REVOKED_ID, rule="revoked.ids")
    if policy.revoked_sha256:
        if caller.fingerprint in policy.revoked_sha256:
            return Decision(False, REVOKED_CERT, rule="revoked.cert_sha256")
        if request.origin_sha256 in policy.revoked_sha256:
            return Decision(False, REVOKED_CERT, rule="revoked.cert_sha256 (origin)")
    if now > caller.not_after:
        return Decision(False, CERT_EXPIRED)
    route = policy.route_for(request.method, request.host, request.path)
    if route is None:
        return Decision(False, NO_ROUTE)
    audit = route.mode == AUDIT

    def deny(reason: str, rule: str | None = None, jwt: JwtSvid | None = None) -> Decision:
        return Decision(False, reason, route, rule, audit, jwt)

    limit = route.max_cert_lifetime or policy.max_cert_lifetime
    if limit is not None and _lifetime(caller) > limit:
        where = "route" if route.max_cert_lifetime else "policy"
        return deny(CERT_TOO_LONG, f"max_cert_lifetime ({where})")
    i = route.deny_matcher.first(peer)
    if i >= 0:
        return deny(DENIED, f"deny[{i}] {route.deny[i].text}")
    i = route.allow_matcher.first(peer)
    if i < 0:
        return deny(NOT_ALLOWED)
    rule = f"allow[{i}] {route.allow[i].text}"
    if origin is not None:
        i = route.deny_matcher.first(origin)
        if i >= 0:
            return deny(ORIGIN_DENIED, f"deny[{i}] {route.deny[i].text}")
    if route.origin:
        if origin is None:
            return deny(ORIGIN_MISSING, rule)
        i = route.origin_matcher.first(origin)
        if i < 0:
            return deny(ORIGIN_NOT_ALLOWED, rule)
        rule += f"; origin[{i}] {route.origin[i].text}"
    jwt = None
    if route.audiences:
        if not request.token:
            return deny(JWT_MISSING, rule)
        try:
            jwt = validate(
                request.token, jwt_authorities or {}, route.audiences, now, policy.jwt_leeway
            )
        except JwtSvidError as exc:
            return deny(exc.reason, rule)
        if route.jwt_subject == "peer" and jwt.subject != peer:
            return deny(JWT_SUBJECT_MISMATCH, rule, jwt)
    return Decision(True, ALLOWED, route, rule, audit, jwt)
