"""The decision stage: the policy's verdict on a canonical request, and whether the
upstream that verdict picks may be sent it. Pure; the live proxy and ``explain``/``test``
call the same function, so an admin who tests a policy gets the proxy's verdict.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.canonical import CanonicalRequest, Refusal, UpstreamRules, fit_upstream
from proxy.jwtsvid import JwtAuthorities
from proxy.policy.evaluate import Caller, Decision, Request, evaluate
from proxy.policy.model import Policy
from proxy.spiffe_id import SpiffeId


@dataclass(frozen=True, slots=True)
class Verdict:
    """The policy's decision; ``refusal`` when its upstream cannot take the request."""

    decision: Decision
    refusal: Refusal | None = None

    @property
    def forward(self) -> bool:
        return self.refusal is None and self.decision.forward


def decide(
    policy: Policy,
    caller: Caller,
    request: CanonicalRequest,
    now: dt.datetime,
    *,
    token: str | None = None,
    origin: SpiffeId | None = None,
    origin_sha256: str | None = None,
    authorities: JwtAuthorities | None = None,
    upstreams: Mapping[str, UpstreamRules] | None = None,
) -> Verdict:
    decision = evaluate(
        policy,
        caller,
        Request(request.method, request.host, request.path, token, origin, origin_sha256),
        now,
        authorities,
    )
    route = decision.route
    if route is not None and decision.forward:
        rules = (upstreams or {}).get(route.upstream, UpstreamRules())
        refusal = fit_upstream(request, rules)
        if refusal is not None:
            return Verdict(decision, refusal)
    return Verdict(decision)


class VerdictCache:
    """Verdicts remembered for requests without a JWT-SVID, shared by every connection.

    With the same policy object, trust store and upstream rules (``valid_for``), the same
    verified peer object (the peer cache hands all connections of one chain the same
    ``PeerSvid``) and the same canonical request and origin (``key``), ``decide`` gives
    the same verdict until the peer's certificate expires, the only clock it reads then:
    the caller checks that. A change of any of the three empties the cache; it holds at
    most ``limit`` verdicts."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._valid_for: tuple[object, object, object] | None = None
        self._entries: dict[tuple[object, ...], tuple[object, Verdict]] = {}

    def valid_for(self, policy: object, trust: object, rules: object) -> None:
        was = self._valid_for
        if was is None or was[0] is not policy or was[1] is not trust or was[2] is not rules:
            self._entries.clear()
            self._valid_for = (policy, trust, rules)

    def get(self, peer: object, key: tuple[object, ...]) -> Verdict | None:
        hit = self._entries.get((id(peer), *key))
        # The entry holds its peer alive, so the id cannot have been reused.
        return hit[1] if hit is not None and hit[0] is peer else None

    def put(self, peer: object, key: tuple[object, ...], verdict: Verdict) -> None:
        if len(self._entries) >= self.limit:
            self._entries.clear()
        self._entries[(id(peer), *key)] = (peer, verdict)
