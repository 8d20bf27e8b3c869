"""A logged request judged again, by the live proxy's own decision function.

The request is rebuilt as a ``CanonicalRequest`` from the logged canonical fields
(method, host, path: the logged path is the one the policy judged) and judged by
``proxy.decide.decide`` for a synthetic caller carrying the logged SPIFFE ID, leaf
SHA-256, notBefore and notAfter, at the logged time, with the logged origin and its
SHA-256. A validated JWT-SVID is presented again as a real token for the logged subject
and audiences, signed by a throwaway key that the judge trusts for the subject's trust domain
(so ``jwtsvid.validate`` checks the candidate route's audiences as the proxy would). A
token that was sent but not validated when logged (the route wanted none, or it failed)
cannot be rebuilt: the request is judged without it and the result says so.

Judging is cached, and exactly: the policy sees a request's host and path only through
which routes' host and path matchers they satisfy (``Policy.route_for``), and a
certificate only through whether its fingerprint is revoked, whether it expired and how
its lifetime compares with each ``max_cert_lifetime``. Requests equal in all of that and
in identity, origin, method and token get the same verdict, so ``decide`` runs once for
them (``evaluated`` counts the runs).

Pure: no I/O (the throwaway key is made in memory).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.bundle import PublicKey
from proxy.canonical import CanonicalRequest, UpstreamRules
from proxy.decide import Verdict, decide
from proxy.errors import SpiffeIdError
from proxy.governance import records as R
from proxy.policy.model import Policy
from proxy.policy.tools import SyntheticCaller
from proxy.spiffe_id import SpiffeId, TrustDomain

ALLOW, DENY = "allow", "deny"
KID = "spiffe-pep-replay"
# exp of a rebuilt token: the latest time a JWT may name, so only the audience and the
# subject decide (the token was valid when logged).
_FAR = 253402300799
JWT_UNKNOWN = "a token was sent but not validated when logged: judged without it"


@dataclass(frozen=True, slots=True)
class Judged:
    """A verdict as the log would record it."""

    outcome: str  # allow or deny
    route: str | None
    reason: str
    rule: str | None
    allow_index: int  # the allow pattern that granted it, -1 if none
    note: str = ""


class Judge:
    """Judges logged requests under one policy."""

    def __init__(
        self, policy: Policy, upstreams: Mapping[str, UpstreamRules] | None = None
    ) -> None:
        self.policy = policy
        self.upstreams = upstreams
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        # The throwaway key as the JWT authority of each trust domain a token names.
        self._authorities: dict[TrustDomain, Mapping[str, PublicKey]] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], str] = {}
        self._ids: dict[str, SpiffeId | None] = {}
        self._targets: dict[tuple[str, str], tuple[int, ...]] = {}
        self._cache: dict[tuple[object, ...], Judged] = {}
        limits = {policy.max_cert_lifetime} | {r.max_cert_lifetime for r in policy.routes}
        self.limits = tuple(sorted(x for x in limits if x is not None))
        self.evaluated = 0

    def _id(self, text: str | None) -> SpiffeId | None:
        if text is None:
            return None
        if text not in self._ids:
            try:
                self._ids[text] = SpiffeId.parse(text)
            except SpiffeIdError:
                self._ids[text] = None
        return self._ids[text]

    def target_class(self, host: str, path: str) -> tuple[int, ...]:
        """The routes whose host and path matchers this request satisfies."""
        key = (host, path)
        found = self._targets.get(key)
        if found is None:
            path = R.canonical_path(path) or path  # judged as it would be now
            routes = self.policy.routes
            found = tuple(
                i
                for i in self.policy.index.candidates(path)
                if routes[i].match.matches_target(
                    host, path.lower() if routes[i].fold_case else path
                )
            )
            self._targets[key] = found
        return found

    def _token(self, sub: str, aud: tuple[str, ...]) -> str:
        key = (sub, aud)
        token = self._tokens.get(key)
        if token is None:
            claims = {"sub": sub, "aud": list(aud), "exp": _FAR}
            subject = self._id(sub)
            if subject is not None:
                self._authorities[subject.trust_domain] = {KID: self._key.public_key()}
            token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": KID})
            self._tokens[key] = token
        return token

    def judge(self, g: R.RequestGroup) -> Judged | None:
        """The verdict on ``g`` under the policy; None when ``g`` cannot be judged (a
        field missing, or a logged SPIFFE ID that does not parse)."""
        if not g.complete or g.method is None or g.path is None:
            return None
        peer = self._id(g.spiffe_id)
        origin = self._id(g.origin) if g.origin else None
        if peer is None or (g.origin and origin is None):
            return None
        now = R.parse_time(g.time)
        not_after = R.parse_time(g.leaf_not_after) if g.leaf_not_after else now
        not_before = R.parse_time(g.leaf_not_before) if g.leaf_not_before else not_after
        life = (not_after - not_before).total_seconds() if g.leaf_not_before else None
        revoked = self.policy.revoked_sha256
        rebuilt = bool(g.jwt_sub and g.jwt_aud)
        key = (
            g.spiffe_id,
            g.origin,
            g.origin_sha256 if g.origin_sha256 in revoked else "",
            g.leaf_sha256 if g.leaf_sha256 in revoked else "",
            -1 if life is None else sum(life > limit for limit in self.limits),
            now > not_after,
            g.method,
            self.target_class(g.host, g.path),
            (g.jwt_sub, g.jwt_aud) if rebuilt else g.jwt_presented,
        )
        found = self._cache.get(key)
        if found is not None:
            return found
        token = self._token(g.jwt_sub, g.jwt_aud) if rebuilt and g.jwt_sub else None
        request = CanonicalRequest(
            method=g.method,
            host=g.host,
            port=None,
            path=R.canonical_path(g.path) or g.path,
            query="",
            target=g.path.encode("utf-8", "replace"),
            headers=(),
        )
        caller = SyntheticCaller(peer, g.leaf_sha256 or "", not_before, not_after)
        verdict = decide(
            self.policy,
            caller,
            request,
            now,
            token=token,
            origin=origin,
            origin_sha256=g.origin_sha256,
            authorities=self._authorities,
            upstreams=self.upstreams,
        )
        self.evaluated += 1
        found = _judged(verdict, peer, note=JWT_UNKNOWN if g.jwt_presented and not rebuilt else "")
        self._cache[key] = found
        return found


def _judged(verdict: Verdict, peer: SpiffeId, note: str) -> Judged:
    d = verdict.decision
    allowed = d.allowed and verdict.refusal is None
    reason = verdict.refusal.reason if verdict.refusal else d.reason
    index = d.route.allow_matcher.first(peer) if allowed and d.route else -1
    if not reason.startswith("jwt_"):
        note = ""
    return Judged(ALLOW if allowed else DENY, d.route_name, reason, d.rule, index, note)
