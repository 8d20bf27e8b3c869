"""``proxy.policy.tools.reach_of``: per identity pattern, the routes every identity it
matches may reach, and the routes only some of them may reach (one row per rule)."""

from __future__ import annotations

import textwrap

import pytest

from proxy.policy import load_policy
from proxy.policy.patterns import IdentityPattern
from proxy.policy.tools import reach_of

POLICY = textwrap.dedent("""\
    revoked:
      ids: ["spiffe://example.org/ns/dev/sa/old"]
    routes:
      - {name: prod-only, match: {path: /a}, upstream: app, allow: ["spiffe://example.org/ns/prod/*"]}
      - {name: one-id, match: {path: /b}, upstream: app, allow: ["spiffe://example.org/ns/prod/sa/checkout"]}
      - {name: prod-but-batch, match: {path: /c}, upstream: app, allow: ["spiffe://example.org/ns/prod/*"], deny: ["spiffe://example.org/ns/prod/sa/batch"]}
      - {name: domain, match: {path: /d}, upstream: app, allow: ["spiffe://example.org/*"]}
      - {name: dev-denied, match: {path: /e}, upstream: app, allow: ["spiffe://example.org/*"], deny: ["spiffe://example.org/ns/dev/*"]}
      - {name: partner, match: {path: /f}, upstream: app, allow: ["spiffe://partner.org/*"]}
      - {name: any-sa-web, match: {path: /g}, upstream: app, allow: ["spiffe://example.org/ns/*/sa/web"]}
""")


@pytest.mark.parametrize(
    ("pattern", "every", "some"),
    [
        (  # the case: one-id allows one identity, not the whole namespace
            "spiffe://example.org/ns/prod/*",
            ["prod-only", "domain", "dev-denied"],
            {
                "one-id": "allows only spiffe://example.org/ns/prod/sa/checkout",
                "prod-but-batch": "denies spiffe://example.org/ns/prod/sa/batch",
                "any-sa-web": "allows only spiffe://example.org/ns/*/sa/web",
            },
        ),
        (
            "spiffe://example.org/ns/prod/sa/checkout",
            ["prod-only", "one-id", "prod-but-batch", "domain", "dev-denied"],
            {},
        ),
        ("spiffe://example.org/ns/prod/sa/batch", ["prod-only", "domain", "dev-denied"], {}),
        (
            "spiffe://example.org/ns/dev/*",
            [],
            {
                "domain": "revoked spiffe://example.org/ns/dev/sa/old",
                "any-sa-web": "allows only spiffe://example.org/ns/*/sa/web",
            },
        ),
        ("spiffe://example.org/ns/dev/sa/old", [], {}),
        ("spiffe://partner.org/ns/payments/sa/api", ["partner"], {}),
        (
            "spiffe://example.org/ns/*/sa/web",
            ["domain", "any-sa-web"],
            {
                "prod-only": "allows only spiffe://example.org/ns/prod/*",
                "prod-but-batch": "allows only spiffe://example.org/ns/prod/*",
                "dev-denied": "denies spiffe://example.org/ns/dev/*",
            },
        ),
    ],
    ids=[
        "namespace_pattern",
        "one_id",
        "denied_id",
        "with_a_revoked_id",
        "revoked_id",
        "other_trust_domain",
        "segment_wildcard",
    ],
)
def test_reach_of(pattern: str, every: list[str], some: dict[str, str]) -> None:
    policy = load_policy(POLICY.encode(), "p.yaml", {"app"})
    got = reach_of(policy, IdentityPattern.parse(pattern))
    assert [r.name for r in got.every] == every
    assert {r.name: why for r, why in got.some} == some
