"""Policy evaluation: deterministic, default deny, no side effects.

The first route whose host, path and method match decides. If the peer's SPIFFE ID
matches one of that route's ``allow`` patterns, the request is allowed and the
decision names the pattern; otherwise it is denied. No matching route means deny.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.policy.model import Policy, Route
from proxy.spiffe_id import SpiffeId

ALLOWED = "allowed"
NO_ROUTE = "no_matching_route"
NOT_ALLOWED = "identity_not_allowed"


@dataclass(frozen=True, slots=True)
class Request:
    """What the policy sees of a request: normalized method, host (no port) and path."""

    method: str
    host: str
    path: str


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    route: Route | None = None
    rule: str | None = None

    @property
    def route_name(self) -> str | None:
        return self.route.name if self.route else None


def evaluate(policy: Policy, peer: SpiffeId, request: Request) -> Decision:
    for route in policy.routes:
        if route.matches_request(request.method, request.host, request.path):
            for i, pattern in enumerate(route.allow):
                if pattern.matches(peer):
                    return Decision(True, ALLOWED, route, f"allow[{i}] {pattern.text}")
            return Decision(False, NOT_ALLOWED, route, None)
    return Decision(False, NO_ROUTE)
