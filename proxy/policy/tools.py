"""Policy as code: explain a decision, run the test cases written beside a policy, and
show each identity's reach. Pure: returns text and results; the CLI prints them.

A request is evaluated for a synthetic caller: the SPIFFE ID given, a certificate that
is a minute old and lives ``lifetime`` (one hour unless told). With an audience, a real
JWT-SVID for that audience and subject is minted with a throwaway key and validated as
the proxy would.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from proxy import canonical
from proxy.decide import Verdict
from proxy.decide import decide as decide_request
from proxy.policy.model import WRITE_METHODS, Policy, PolicyTest, Route
from proxy.policy.patterns import WILDCARD, IdentityPattern
from proxy.spiffe_id import SpiffeId

WHY = {
    "allowed": "the caller matches an allow pattern of the first route that matches",
    "no_matching_route": "no route matches this host, path and method (default deny)",
    "identity_not_allowed": "the first matching route allows none of the caller's patterns",
    "identity_denied": "a deny pattern of the route matches the caller (deny wins)",
    "spiffe_id_revoked": "the SPIFFE ID is on the policy's revoked list",
    "certificate_revoked": "the certificate's SHA-256 is on the policy's revoked list",
    "certificate_expired": "the client certificate has expired",
    "certificate_lifetime_too_long": "the certificate lives longer than max_cert_lifetime",
    "jwt_missing": "the route needs a JWT-SVID for one of its audiences and none was sent",
    "jwt_subject_mismatch": "the JWT-SVID's subject is not the mTLS caller",
    "jwt_wrong_audience": "the JWT-SVID is for none of the route's audiences",
}


@dataclass(frozen=True)
class SyntheticCaller:
    spiffe_id: SpiffeId
    fingerprint: str
    not_before: dt.datetime
    not_after: dt.datetime


def decide(
    policy: Policy,
    spiffe_id: str,
    method: str,
    host: str,
    target: str,
    audience: str | None = None,
    lifetime: dt.timedelta = dt.timedelta(hours=1),
    fingerprint: str = "",
    rules: canonical.Rules | None = None,
    upstreams: Mapping[str, canonical.UpstreamRules] | None = None,
) -> Verdict | canonical.Refusal:
    """The live proxy's verdict on ``METHOD host target``: the request is canonicalised
    by the same function, with the configuration's rules when given."""
    request = canonical.build(
        method.encode("ascii", "replace"),
        target.encode("ascii", "replace"),
        [(b"host", host.encode("ascii", "replace"))] if host else [],
        rules or canonical.Rules(),
    )
    if isinstance(request, canonical.Refusal):
        return request
    now = dt.datetime.now(dt.UTC)
    sid = SpiffeId.parse(spiffe_id)
    caller = SyntheticCaller(
        sid,
        fingerprint,
        now - dt.timedelta(hours=1),
        now - dt.timedelta(hours=1) + lifetime + dt.timedelta(hours=1),
    )
    token = None
    authorities = None
    if audience is not None:
        key = ec.generate_private_key(ec.SECP256R1())
        token = jwt.encode(
            {"sub": spiffe_id, "aud": audience, "exp": int(now.timestamp()) + 300},
            key,
            algorithm="ES256",
            headers={"kid": "explain"},
        )
        authorities = {sid.trust_domain: {"explain": key.public_key()}}
    return decide_request(
        policy, caller, request, now, token=token, authorities=authorities, upstreams=upstreams
    )


def explain(policy: Policy, result: Verdict | canonical.Refusal) -> str:
    if isinstance(result, canonical.Refusal):
        return "\n".join(
            [
                f"decision: refuse ({result.status}, before the policy)",
                f"reason:   {result.reason}: {result.detail or 'see proxy/canonical.py'}",
                f"policy:   {policy.source} sha256 {policy.sha256}",
            ]
        )
    decision = result.decision
    verdict = "allow" if decision.allowed else "deny"
    if result.refusal is not None:
        verdict = f"refuse ({result.refusal.status}: {result.refusal.reason})"
    if decision.audit:
        verdict += " (audit mode: forwarded anyway)" if not decision.allowed else " (audit mode)"
    lines = [
        f"decision: {verdict}",
        f"reason:   {decision.reason}: {WHY.get(decision.reason, 'the JWT-SVID is not valid')}",
    ]
    route = decision.route
    if route:
        lines.append(f"route:    {route.name} ({route.location}): {route.match.describe()}")
        if decision.rule:
            lines.append(f"rule:     {decision.rule}")
        if decision.reason == "identity_not_allowed":
            allowed = ", ".join(p.text for p in route.allow) or "nobody (allow: [])"
            lines.append(f"allows:   {allowed}")
        if route.audiences:
            lines.append(f"requires: a JWT-SVID for one of {', '.join(route.audiences)}")
    elif decision.rule:
        lines.append(f"rule:     {decision.rule}")
    lines.append(f"policy:   {policy.source} sha256 {policy.sha256}")
    return "\n".join(lines)


def outcome(result: Verdict | canonical.Refusal) -> tuple[str, str | None, str]:
    """(allow or deny, the route, the reason) as the live proxy would log it: a request
    refused before or after the policy is a deny."""
    if isinstance(result, canonical.Refusal):
        return "deny", None, result.reason
    d = result.decision
    if result.refusal is not None:
        return "deny", d.route_name, result.refusal.reason
    return ("allow" if d.allowed else "deny"), d.route_name, d.reason


@dataclass(frozen=True)
class TestResult:
    case: PolicyTest
    result: Verdict | canonical.Refusal
    passed: bool

    def line(self) -> str:
        c = self.case
        got, route, reason = outcome(self.result)
        by = f" by {route}" if route else ""
        head = f"{c.spiffe_id} {c.method} {c.host} {c.path}"
        if self.passed:
            return f"ok    {head} -> {got}{by}"
        want = c.expect + (f" by {c.route}" if c.route else "")
        return f"FAIL  {head}: expected {want}, got {got}{by} ({reason}) [{c.location}]"


def run_tests(
    policy: Policy,
    rules: canonical.Rules | None = None,
    upstreams: Mapping[str, canonical.UpstreamRules] | None = None,
) -> list[TestResult]:
    out = []
    for case in policy.tests:
        result = decide(
            policy,
            case.spiffe_id,
            case.method,
            case.host,
            case.path,
            case.audience,
            rules=rules,
            upstreams=upstreams,
        )
        got, route, _ = outcome(result)
        ok = got == case.expect and (case.route is None or route == case.route)
        out.append(TestResult(case, result, ok))
    return out


def _named_patterns(policy: Policy) -> list[IdentityPattern]:
    seen: dict[str, IdentityPattern] = {}
    for route in policy.routes:
        for p in route.allow:
            seen.setdefault(p.text, p)
    return list(seen.values())


@dataclass(frozen=True)
class Reach:
    """What the identities one pattern matches may reach: ``every`` route all of them may
    reach, and the routes only ``some`` of them may reach, each with why not all."""

    pattern: IdentityPattern
    every: tuple[Route, ...]
    some: tuple[tuple[Route, str], ...]


def reach_of(policy: Policy, pattern: IdentityPattern) -> Reach:
    """A route is reached by every identity ``pattern`` matches when one allow pattern
    covers it and no deny pattern or revoked ID takes any of them out; by only some when
    an allow pattern overlaps it (allowing a part) or a deny pattern or revoked ID takes a
    part out; by none when no allow pattern overlaps it or a deny pattern covers it."""
    ids = [SpiffeId.parse(rid) for rid in sorted(policy.revoked_ids)]
    revoked_ids = [sid for sid in ids if pattern.matches(sid)]
    if revoked_ids and not pattern.tail and WILDCARD not in pattern.segments:
        return Reach(pattern, (), ())  # one ID, and it is revoked
    every: list[Route] = []
    some: list[tuple[Route, str]] = []
    for route in policy.routes:
        allows = [a for a in route.allow if a.overlaps(pattern)]
        if not allows or any(d.covers(pattern) for d in route.deny):
            continue
        denies = [d.text for d in route.deny if d.overlaps(pattern)]
        revoked = [
            str(sid)
            for sid in revoked_ids
            if any(a.matches(sid) for a in allows) and not any(d.matches(sid) for d in route.deny)
        ]
        why = []
        if not any(a.covers(pattern) for a in allows):
            why.append("allows only " + ", ".join(a.text for a in allows))
        if denies:
            why.append("denies " + ", ".join(denies))
        if revoked:
            why.append("revoked " + ", ".join(revoked))
        if why:
            some.append((route, "; ".join(why)))
        else:
            every.append(route)
    return Reach(pattern, tuple(every), tuple(some))


def _route_line(route: Route, width: int) -> str:
    methods = ",".join(sorted(route.match.methods)) if route.match.methods else "ANY"
    where = "; ".join(x for x in route.match.describe().split("; ") if not x.startswith("methods"))
    needs = []
    if route.audiences:
        needs.append("with a JWT-SVID for " + ", ".join(route.audiences))
    if route.origin:
        needs.append("for origins " + ", ".join(p.text for p in route.origin))
    suffix = f" ({'; '.join(needs)})" if needs else ""
    return f"    {route.name:<{width}}  {methods:<16} {where or 'any host, any path'}{suffix}"


def reach(policy: Policy) -> Iterator[str]:
    """Per identity pattern the policy allows: the routes every identity it matches may
    reach, then the routes only some of them may reach (and why not all), and warnings
    for whole-trust-domain grants on methods that write.

    Routes earlier in the list may still catch some of those requests first, so this is
    what an identity MAY reach (its blast radius), not where each request goes.
    """
    for pattern in _named_patterns(policy):
        yield pattern.text
        r = reach_of(policy, pattern)
        if not r.every and not r.some:
            yield "  (no route: every match is denied)"
            continue
        width = max(len(route.name) for route in [*r.every, *(x for x, _ in r.some)])
        yield "  every identity it matches may reach:" + ("" if r.every else " no route")
        for route in r.every:
            yield _route_line(route, width)
        if r.some:
            yield "  only some of them may reach:"
            for route, why in r.some:
                yield f"{_route_line(route, width)}  [{why}]"
    for route in policy.routes:
        writes = route.match.methods is None or bool(route.match.methods & WRITE_METHODS)
        for p in route.allow:
            if p.whole_trust_domain and writes:
                methods = (
                    "any method"
                    if route.match.methods is None
                    else ",".join(sorted(route.match.methods & WRITE_METHODS))
                )
                yield (
                    f"WARNING: route {route.name} ({route.location}) lets every workload of "
                    f"{p.trust_domain} ({p.text}) write ({methods})"
                )
