"""``spiffe-pep unused``: the grants of a policy no request used in a window (IAM Access
Analyzer's unused-access findings, for routes).

Every logged request in the window is judged under the policy being reviewed (not the
one that logged it, which may be older), by the live proxy's decision function. Then,
per route and per ``allow`` pattern:

- ``route_never_hit``: no request matched the route;
- ``pattern_unused``: the pattern granted no request (it matched nobody, or everybody it
  matched was denied: a ``deny`` pattern, a missing JWT-SVID, an earlier pattern);
- ``pattern_broad``: a pattern with a wildcard (a whole trust domain, a prefix, a ``*``
  segment) that only a few identities (``few``) used: list them instead.

Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.governance import records as R
from proxy.governance.judge import ALLOW, Judge
from proxy.governance.report import Table
from proxy.policy.patterns import WILDCARD, IdentityPattern

ROUTE_NEVER_HIT = "route_never_hit"
PATTERN_UNUSED = "pattern_unused"
PATTERN_BROAD = "pattern_broad"


@dataclass(frozen=True)
class Finding:
    kind: str
    route: str
    location: str
    pattern: str | None  # "allow[1] spiffe://example.org/ns/prod/*"
    detail: str
    ids: tuple[str, ...] = ()
    requests: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "route": self.route,
            "location": self.location,
            "pattern": self.pattern,
            "detail": self.detail,
            "ids": list(self.ids),
            "requests": self.requests,
        }


@dataclass
class _Use:
    requests: int = 0
    ids: dict[str, int] = field(default_factory=dict)


def is_broad(p: IdentityPattern) -> bool:
    return p.tail or WILDCARD in p.segments


@dataclass
class UnusedResult:
    policy: str
    window: str
    stats: R.InputStats
    findings: list[Finding]
    judged: int
    route_hits: dict[str, int]

    def tables(self) -> list[Table]:
        rows = [(f.kind, f.route, f.pattern or "-", f.detail, f.location) for f in self.findings]
        return [
            Table(
                f"Grants not used {self.window}",
                ("finding", "route", "pattern", "detail", "where"),
                rows,
                empty="(none: every route and allow pattern was used)",
            )
        ]

    def notes(self) -> list[str]:
        return [
            f"{len(self.findings)} findings in {self.policy}; {self.judged:,} requests judged "
            f"in the window",
            self.stats.summary(),
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "window": self.window,
            "judged": self.judged,
            "route_hits": self.route_hits,
            "findings": [f.to_json() for f in self.findings],
            "input": self.stats.to_json(),
        }


def unused(
    groups: Iterable[R.RequestGroup],
    judge: Judge,
    stats: R.InputStats,
    window: str,
    few: int = 2,
) -> UnusedResult:
    policy = judge.policy
    hits = {r.name: 0 for r in policy.routes}
    uses: dict[tuple[str, int], _Use] = {}
    judged_n = 0
    for g in groups:
        if g.decision not in ("allow", "deny"):
            stats.skip(R.SKIP_REFUSED, g.count)
            continue
        judged = judge.judge(g)
        if judged is None:
            stats.skip(R.SKIP_INCOMPLETE, g.count)
            continue
        judged_n += g.count
        if judged.route is None:
            continue
        hits[judged.route] += g.count
        if judged.outcome == ALLOW and judged.allow_index >= 0:
            used = uses.setdefault((judged.route, judged.allow_index), _Use())
            used.requests += g.count
            assert g.spiffe_id is not None
            used.ids[g.spiffe_id] = used.ids.get(g.spiffe_id, 0) + g.count
    findings: list[Finding] = []
    for route in policy.routes:
        if hits[route.name] == 0:
            findings.append(
                Finding(
                    ROUTE_NEVER_HIT,
                    route.name,
                    route.location,
                    None,
                    f"no request matched {route.match.describe()}",
                )
            )
            continue
        for i, p in enumerate(route.allow):
            label = f"allow[{i}] {p.text}"
            use = uses.get((route.name, i))
            if use is None:
                findings.append(
                    Finding(
                        PATTERN_UNUSED,
                        route.name,
                        route.location,
                        label,
                        f"granted no request ({hits[route.name]:,} requests hit the route)",
                    )
                )
            elif is_broad(p) and len(use.ids) <= few:
                ids = tuple(sorted(use.ids))
                findings.append(
                    Finding(
                        PATTERN_BROAD,
                        route.name,
                        route.location,
                        label,
                        f"only {len(ids)} identit{'y' if len(ids) == 1 else 'ies'} used it "
                        f"({use.requests:,} request{'' if use.requests == 1 else 's'}): "
                        f"{', '.join(ids)}",
                        ids,
                        use.requests,
                    )
                )
    return UnusedResult(policy.source, window, stats, findings, judged_n, hits)
