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
