"""``spiffe-pep inventory``: every workload identity the logs saw, and its credentials.

Per identity: trust domain, first and last seen, requests by verdict, routes used, the
networks it came from, its credentials (leaf SHA-256, issuer, notBefore/notAfter and so
the lifetime, first and last use). Origins named by trusted hops (``origin_spiffe_id``)
are listed too, as kind ``origin``, with the hops they came through and the leaf
SHA-256 the hop reported.

Flags:
- ``long_lived_credential``: a credential lives longer than the limit (the policy's
  ``max_cert_lifetime`` or ``--max-lifetime``, the shorter);
- ``several_networks``: seen from more than one network (``/24`` IPv4, ``/64`` IPv6);
- ``concurrent_credentials``: several distinct credentials in use at the same time (use
  intervals overlap: replicas with their own SVIDs, or a copied key);
- ``only_denied``: never allowed, denied at least once.

Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.governance import records as R
from proxy.governance.report import Table

LONG_LIVED = "long_lived_credential"
SEVERAL_NETWORKS = "several_networks"
CONCURRENT = "concurrent_credentials"
ONLY_DENIED = "only_denied"
PEER, ORIGIN = "peer", "origin"


@dataclass
class Credential:
    sha256: str
    issuer: str | None = None
    not_before: str | None = None
    not_after: str | None = None
    first_use: str = ""
    last_use: str = ""
    requests: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def lifetime(self) -> float | None:
        return R.lifetime(self.not_before, self.not_after)

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "issuer": self.issuer,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "lifetime_seconds": self.lifetime,
            "first_use": self.first_use,
            "last_use": self.last_use,
            "requests": self.requests,
            "flags": self.flags,
        }


@dataclass
class Identity:
    spiffe_id: str
    kind: str
    first_seen: str = ""
    last_seen: str = ""
    verdicts: dict[str, int] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=dict)
    networks: dict[str, int] = field(default_factory=dict)
    via: dict[str, int] = field(default_factory=dict)  # origins: the trusted hops
    credentials: dict[str, Credential] = field(default_factory=dict)
    concurrent: int = 0  # most credentials in use at one time
    flags: list[str] = field(default_factory=list)

    @property
    def trust_domain(self) -> str:
        return R.trust_domain(self.spiffe_id)

    def count(self, verdict: str) -> int:
        return self.verdicts.get(verdict, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "spiffe_id": self.spiffe_id,
            "kind": self.kind,
            "trust_domain": self.trust_domain,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "requests": self.verdicts,
            "routes": self.routes,
            "networks": self.networks,
            "via": self.via,
            "credentials": [c.to_json() for c in _sorted_creds(self)],
            "max_concurrent_credentials": self.concurrent,
            "flags": self.flags,
        }


def _sorted_creds(i: Identity) -> list[Credential]:
    return sorted(i.credentials.values(), key=lambda c: (c.first_use, c.sha256))


def _seen(i: Identity, r: R.UsageRow) -> None:
    i.first_seen = min(i.first_seen or r.first, r.first)
    i.last_seen = max(i.last_seen, r.last)
    verdict = r.decision or "unknown"
    i.verdicts[verdict] = i.verdicts.get(verdict, 0) + r.count
    if r.route:
        i.routes[r.route] = i.routes.get(r.route, 0) + r.count


def _use(c: Credential, r: R.UsageRow) -> None:
    c.first_use = min(c.first_use or r.first, r.first)
    c.last_use = max(c.last_use, r.last)
    c.requests += r.count


def max_concurrent(intervals: Iterable[tuple[str, str]]) -> int:
    """The most intervals open at one instant (bounds included: an interval ending
    when another starts overlaps it)."""
    events = []
    for start, end in intervals:
        events.append((start, 0))
        events.append((end, 1))
    best = now = 0
    for _, closing in sorted(events):
        now += -1 if closing else 1
        best = max(best, now)
    return best


@dataclass
class InventoryResult:
    identities: list[Identity]
    stats: R.InputStats
    limit: float | None

    def tables(self) -> list[Table]:
        ids = []
        creds = []
        for i in self.identities:
            via = f" via {R.join(sorted(i.via), 2)}" if i.via else ""
            ids.append(
                (
                    i.spiffe_id,
                    i.kind + via,
                    _short(i.first_seen),
                    _short(i.last_seen),
                    i.count("allow"),
                    i.count("deny"),
                    i.count("error"),
                    R.join(_by_count(i.routes), 3),
                    R.join(_by_count(i.networks), 2),
                    len(i.credentials),
                    i.flags,
                )
            )
            for c in _sorted_creds(i):
                creds.append(
                    (
                        i.spiffe_id,
                        c.sha256[:16],
                        c.issuer,
                        _short(c.not_before),
                        _short(c.not_after),
                        R.human_duration(c.lifetime) if c.not_before else None,
                        _short(c.first_use),
                        _short(c.last_use),
                        c.requests,
                        c.flags,
                    )
                )
        return [
            Table(
                "Workload identities",
                (
                    "identity",
                    "kind",
                    "first seen",
                    "last seen",
                    "allow",
                    "deny",
                    "error",
                    "routes",
                    "networks",
                    "creds",
                    "flags",
                ),
                ids,
            ),
            Table(
                "Credentials",
                (
                    "identity",
                    "leaf sha256",
                    "issuer",
                    "not before",
                    "not after",
                    "lifetime",
                    "first use",
                    "last use",
                    "requests",
                    "flags",
                ),
                creds,
            ),
        ]

    def csv_table(self) -> Table:
        """One row per identity and credential (identity columns repeated)."""
        rows: list[tuple[Any, ...]] = []
        for i in self.identities:
            base = (
                i.spiffe_id,
                i.kind,
                i.trust_domain,
                i.first_seen,
                i.last_seen,
                i.count("allow"),
                i.count("deny"),
                i.count("error"),
                sorted(i.routes),
                sorted(i.networks),
                sorted(i.via),
                i.flags,
            )
            creds: list[Credential | None] = [*_sorted_creds(i)] or [None]
            for c in creds:
                if c is None:
                    rows.append((*base, *(None,) * 9))
                    continue
                rows.append(
                    (
                        *base,
                        *(c.sha256, c.issuer, c.not_before, c.not_after, c.lifetime),
                        *(c.first_use, c.last_use, c.requests, c.flags),
                    )
                )
        columns = (
            "spiffe_id",
            "kind",
            "trust_domain",
            "first_seen",
            "last_seen",
            "allow",
            "deny",
            "error",
            "routes",
            "networks",
            "via",
            "flags",
            "leaf_sha256",
            "issuer",
            "not_before",
            "not_after",
            "lifetime_seconds",
            "first_use",
            "last_use",
            "requests",
            "credential_flags",
        )
        return Table("inventory", columns, rows)

    def notes(self) -> list[str]:
        peers = sum(i.kind == PEER for i in self.identities)
        origins = len(self.identities) - peers
        limit = f"; lifetime limit {R.human_duration(self.limit)}" if self.limit else ""
        return [
            f"{peers} identities, {origins} origins behind trusted hops{limit}",
            self.stats.summary(),
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "identities": [i.to_json() for i in self.identities],
            "lifetime_limit_seconds": self.limit,
            "input": self.stats.to_json(),
        }


def _short(t: str | None) -> str | None:
    """A logged time to the second, for tables."""
    return t[:19] + "Z" if t and len(t) > 19 else t


def _by_count(counts: dict[str, int]) -> list[str]:
    return [k for k, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]


def inventory(
    rows: Iterable[R.UsageRow],
    stats: R.InputStats,
    limits: Iterable[float | None] = (),
    v4_prefix: int = 24,
    v6_prefix: int = 64,
) -> InventoryResult:
    """``limits``: lifetime limits in seconds (the policy's, ``--max-lifetime``); the
    shortest applies."""
    given = [x for x in limits if x is not None]
    limit = min(given) if given else None
    peers: dict[str, Identity] = {}
    origins: dict[str, Identity] = {}
    networks: dict[str | None, str] = {}
    for r in rows:
        if not r.spiffe_id:
            stats.skip(R.SKIP_INCOMPLETE, r.count)
            continue
        peer = peers.get(r.spiffe_id)
        if peer is None:
            peer = peers[r.spiffe_id] = Identity(r.spiffe_id, PEER)
        _seen(peer, r)
        net = networks.get(r.peer_ip)
        if net is None:
            net = networks[r.peer_ip] = R.network(r.peer_ip, v4_prefix, v6_prefix)
        peer.networks[net] = peer.networks.get(net, 0) + r.count
        if r.leaf_sha256:
            cred = peer.credentials.get(r.leaf_sha256)
            if cred is None:
                cred = peer.credentials[r.leaf_sha256] = Credential(
                    r.leaf_sha256, r.leaf_issuer, r.leaf_not_before, r.leaf_not_after
                )
            _use(cred, r)
        if r.origin:
            origin = origins.get(r.origin)
            if origin is None:
                origin = origins[r.origin] = Identity(r.origin, ORIGIN)
            _seen(origin, r)
            origin.via[r.spiffe_id] = origin.via.get(r.spiffe_id, 0) + r.count
            if r.origin_sha256:
                cred = origin.credentials.get(r.origin_sha256)
                if cred is None:
                    cred = origin.credentials[r.origin_sha256] = Credential(r.origin_sha256)
                _use(cred, r)
    for i in [*peers.values(), *origins.values()]:
        _flag(i, limit)
    ordered = sorted(peers.values(), key=lambda i: i.spiffe_id) + sorted(
        origins.values(), key=lambda i: i.spiffe_id
    )
    return InventoryResult(ordered, stats, limit)


def _flag(i: Identity, limit: float | None) -> None:
    long_lived = False
    for c in i.credentials.values():
        life = c.lifetime
        if limit is not None and life is not None and life > limit:
            c.flags.append(LONG_LIVED)
            long_lived = True
    i.concurrent = max_concurrent((c.first_use, c.last_use) for c in i.credentials.values())
    if long_lived:
        i.flags.append(LONG_LIVED)
    if len(i.networks) > 1:
        i.flags.append(SEVERAL_NETWORKS)
    if i.concurrent > 1:
        i.flags.append(f"{CONCURRENT}({i.concurrent})")
    if i.count("allow") == 0 and i.count("deny") > 0:
        i.flags.append(ONLY_DENIED)
