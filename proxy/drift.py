"""Subject drift: a workload identity that behaves unlike itself, judged against what
the proxy learned of it. Pure: no I/O, no clock (callers pass ``now``, Unix seconds).

Per SPIFFE ID the proxy learns *facts*: the networks it connects from (the peer
address's /24 or /64; for an origin behind a trusted hop, ``via <hop ID>``), its
credentials (leaf SHA-256, with the peer that last used it and when it expires), the
CAs that issued them (by issuer name, so a CA that rotates its key under the same name
is the same CA) and the longest credential lifetime it used. An observation (one
connection, or one origin behind a trusted hop) drifts when:

- ``new_network``: it comes from a network the ID never used, once the ID's learning
  period is over (from its first sighting); with ``networks`` given, from outside them,
  with no learning;
- ``concurrent_credentials``: another credential of the ID, unexpired, was used from
  another peer within ``live`` (two copies of an identity at once);
- ``new_issuer``: its leaf was issued by a CA the ID never used;
- ``lifetime``: its leaf lives more than ``lifetime_factor`` times the longest the ID
  used before.

What an observation teaches (``facts_of``) is learned unless a ``deny`` drift setting
refuses it, so a refused network or credential never becomes normal.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.schema import Reader
from proxy.svid import PeerSvid
from proxy.yamlsrc import Path

NEW_NETWORK = "new_network"
CONCURRENT = "concurrent_credentials"
NEW_ISSUER = "new_issuer"
LIFETIME = "lifetime"
KINDS = (NEW_NETWORK, CONCURRENT, NEW_ISSUER, LIFETIME)
REASON_PREFIX = "identity_drift_"  # + kind: the reason of a refused request
ALERT, DENY = "alert", "deny"

# Fact kinds: what is learned of an ID.
NETWORK_FACT, CREDENTIAL_FACT, ISSUER_FACT, LIFETIME_FACT = (
    "network",
    "credential",
    "issuer",
    "lifetime",
)
EXPIRED_KEPT = 3600.0  # an expired credential is forgotten this long after its expiry
_LISTED = 8  # known networks/issuers listed in evidence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Prefixes:
    """How a peer address becomes the network that is learned."""

    ipv4: int = 24
    ipv6: int = 64


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """``drift:`` of a policy or a route. ``networks`` given: the allowed networks, no
    learning for them."""

    mode: str = ALERT
    learn: float = 86400.0
    networks: tuple[Network, ...] = ()
    kinds: frozenset[str] = frozenset(KINDS)
    lifetime_factor: float = 4.0
    live: float = 300.0
    location: str = ""


@dataclass(frozen=True, slots=True)
class Observation:
    """One sighting of an ID. ``peer``: the peer's address, or for an origin behind a
    trusted hop the hop's SPIFFE ID; ``address``: the peer's parsed address (None for an
    origin, or an address that is not one)."""

    spiffe_id: str
    peer: str
    network: str
    at: float
    address: Address | None = None
    sha256: str | None = None
    issuer: str | None = None
    lifetime: float | None = None
    not_after: float | None = None


@dataclass(frozen=True, slots=True)
class Fact:
    """One thing learned of an ID, with when it was first and last seen. ``peer`` and
    ``expires`` are a credential's; ``value`` is a lifetime in seconds."""

    spiffe_id: str
    kind: str
    key: str
    first_seen: float
    last_seen: float
    peer: str = ""
    value: float = 0.0
    expires: float | None = None

    @property
    def ident(self) -> tuple[str, str]:
        return self.kind, self.key


Known = Mapping[tuple[str, str], Fact]  # what is known of one ID, by (kind, key)


@dataclass(frozen=True, slots=True)
class Finding:
    """One kind of drift, with the evidence for it."""

    kind: str
    evidence: dict[str, Any] = field(default_factory=dict)


def network_of(address: Address, prefixes: Prefixes) -> str:
    """The network an address is learned as (an IPv4-mapped IPv6 address as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = prefixes.ipv4 if address.version == 4 else prefixes.ipv6
    return str(ipaddress.ip_network((address, bits), strict=False))


def observe_peer(peer: PeerSvid, ip: str, prefixes: Prefixes, now: float) -> Observation:
    """What one connection shows of its peer's identity."""
    address: Address | None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return Observation(
        spiffe_id=str(peer.spiffe_id),
        peer=str(address) if address is not None else ip,
        network=network_of(address, prefixes) if address is not None else ip,
        at=now,
        address=address,
        sha256=peer.fingerprint,
        issuer=peer.leaf.issuer.rfc4514_string(),
        lifetime=(peer.not_after - peer.not_before).total_seconds(),
        not_after=peer.not_after.timestamp(),
    )


def observe_origin(origin: str, hop: str, sha256: str | None, now: float) -> Observation:
    """An origin named by a trusted hop: its network is the hop it came through."""
    return Observation(origin, hop, f"via {hop}", now, sha256=sha256)


def facts_of(obs: Observation) -> list[Fact]:
    """What an observation teaches."""
    at, sid = obs.at, obs.spiffe_id
    out = [Fact(sid, NETWORK_FACT, obs.network, at, at, obs.peer)]
    if obs.sha256:
        out.append(
            Fact(sid, CREDENTIAL_FACT, obs.sha256, at, at, obs.peer, obs.lifetime or 0.0,
                 obs.not_after)
        )  # fmt: skip
    if obs.issuer:
        out.append(Fact(sid, ISSUER_FACT, obs.issuer, at, at))
    if obs.lifetime:
        out.append(Fact(sid, LIFETIME_FACT, "", at, at, value=obs.lifetime))
    return out


def merge(old: Fact | None, new: Fact) -> Fact:
    """Two sightings of one fact as one: the first and last seen, the latest peer, the
    longest lifetime."""
    if old is None:
        return new
    later = new if new.last_seen >= old.last_seen else old
    expires = later.expires if later.expires is not None else old.expires
    return Fact(
        new.spiffe_id,
        new.kind,
        new.key,
        min(old.first_seen, new.first_seen),
        later.last_seen,
        later.peer,
        max(old.value, new.value),
        expires,
    )


class Learned:
    """What was learned, per SPIFFE ID."""

    def __init__(self) -> None:
        self.ids: dict[str, dict[tuple[str, str], Fact]] = {}

    def known(self, spiffe_id: str) -> dict[tuple[str, str], Fact]:
        """A snapshot of what is known of ``spiffe_id`` (empty when never seen)."""
        facts = self.ids.get(spiffe_id)
        return dict(facts) if facts else {}

    def learn(self, facts: Iterable[Fact]) -> list[Fact]:
        """Merge ``facts`` in; return those that changed what is known beyond their last
        sighting (new facts, a longer lifetime, another peer)."""
        changed = []
        for fact in facts:
            known = self.ids.setdefault(fact.spiffe_id, {})
            old = known.get(fact.ident)
            now = merge(old, fact)
            known[fact.ident] = now
            if (
                old is None
                or now.value != old.value
                or now.peer != old.peer
                or now.first_seen != old.first_seen
            ):
                changed.append(now)
        return changed

    def prune(self, now: float) -> None:
        """Forget credentials expired for longer than ``EXPIRED_KEPT``."""
        for known in self.ids.values():
            gone = [
                k
                for k, f in known.items()
                if f.kind == CREDENTIAL_FACT
                and f.expires is not None
                and f.expires < now - EXPIRED_KEPT
            ]
            for k in gone:
                del known[k]


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _keys(known: Known, kind: str) -> list[str]:
    return sorted(k for (fk, k) in known if fk == kind)


def assess(known: Known, obs: Observation, config: DriftConfig, now: float) -> tuple[Finding, ...]:
    """The drift of ``obs`` against what was ``known`` of its ID before it, under
    ``config``. An ID never seen has nothing to drift from (its learning starts)."""
    out: list[Finding] = []
    kinds = config.kinds
    if NEW_NETWORK in kinds:
        finding = _network(known, obs, config, now)
        if finding is not None:
            out.append(finding)
    if not known:
        return tuple(out)
    if CONCURRENT in kinds and obs.sha256:
        for f in known.values():
            if (
                f.kind == CREDENTIAL_FACT
                and f.key != obs.sha256
                and f.peer != obs.peer
                and (f.expires is None or f.expires > now)
                and now - f.last_seen <= config.live
            ):
                out.append(
                    Finding(
                        CONCURRENT,
                        {
                            "sha256": obs.sha256,
                            "peer": obs.peer,
                            "other_sha256": f.key,
                            "other_peer": f.peer,
                            "other_last_seen": _iso(f.last_seen),
                        },
                    )
                )
                break
    if NEW_ISSUER in kinds and obs.issuer:
        issuers = _keys(known, ISSUER_FACT)
        if issuers and obs.issuer not in issuers:
            out.append(
                Finding(NEW_ISSUER, {"issuer": obs.issuer, "known_issuers": issuers[:_LISTED]})
            )
    if LIFETIME in kinds and obs.lifetime:
        usual = known.get((LIFETIME_FACT, ""))
        if (
            usual is not None
            and usual.value > 0
            and obs.lifetime > config.lifetime_factor * usual.value
        ):
            out.append(
                Finding(
                    LIFETIME,
                    {
                        "lifetime_s": round(obs.lifetime),
                        "longest_before_s": round(usual.value),
                        "factor": config.lifetime_factor,
                    },
                )
            )
    return tuple(out)


def _network(known: Known, obs: Observation, config: DriftConfig, now: float) -> Finding | None:
    if config.networks and obs.address is not None:
        if any(obs.address in n for n in config.networks):
            return None
        return Finding(
            NEW_NETWORK,
            {
                "network": obs.network,
                "peer": obs.peer,
                "allowed": [str(n) for n in config.networks][:_LISTED],
            },
        )
    if not known or (NETWORK_FACT, obs.network) in known:
        return None
    first = min(f.first_seen for f in known.values())
    if now < first + config.learn:
        return None  # still learning
    return Finding(
        NEW_NETWORK,
        {
            "network": obs.network,
            "peer": obs.peer,
            "known_networks": _keys(known, NETWORK_FACT)[:_LISTED],
            "learned_until": _iso(first + config.learn),
        },
    )


# --- the ``drift:`` setting -------------------------------------------------------------

TOP_ONLY = ("ipv4_prefix", "ipv6_prefix")
KEYS = ("mode", "learn", "networks", "kinds", "lifetime_factor", "live")


def read_prefixes(r: Reader, value: Any, path: Path) -> Prefixes:
    """The prefix lengths of the policy's top-level ``drift:`` (defaults elsewhere)."""
    if not isinstance(value, dict):
        return Prefixes()
    default = Prefixes()
    v4, v6 = default.ipv4, default.ipv6
    if "ipv4_prefix" in value:
        v4 = r.integer(value["ipv4_prefix"], (*path, "ipv4_prefix"), minimum=8)
        if v4 > 32:
            raise r.fail((*path, "ipv4_prefix"), f"an IPv4 prefix is 8 to 32 bits, got {v4}")
    if "ipv6_prefix" in value:
        v6 = r.integer(value["ipv6_prefix"], (*path, "ipv6_prefix"), minimum=16)
        if v6 > 128:
            raise r.fail((*path, "ipv6_prefix"), f"an IPv6 prefix is 16 to 128 bits, got {v6}")
    return Prefixes(v4, v6)


def read_config(
    r: Reader, value: Any, path: Path, base: DriftConfig | None, *, top: bool = False
) -> DriftConfig | None:
    """A ``drift:`` setting; ``off`` (or false) is None. A route's keys it does not set
    come from ``base`` (the policy's)."""
    if value in (False, "off"):
        return None
    keys = (*KEYS, *TOP_ONLY) if top else KEYS
    m = r.mapping(value, path, optional=keys)
    b = base or DriftConfig()
    mode = m.get("mode", b.mode)
    if mode not in (ALERT, DENY):
        raise r.fail((*path, "mode"), f"drift mode must be {ALERT!r} or {DENY!r}, got {mode!r}")
    learn = r.duration(m["learn"], (*path, "learn")) if "learn" in m else b.learn
    live = r.duration(m["live"], (*path, "live")) if "live" in m else b.live
    networks = b.networks
    if "networks" in m:
        where: Path = (*path, "networks")
        items = r.string_list(m["networks"], where, allow_empty=True)
        parsed = []
        for i, text in enumerate(items):
            try:
                parsed.append(ipaddress.ip_network(text))
            except ValueError as exc:
                raise r.fail((*where, i), f"not a network such as 10.0.0.0/8: {exc}") from None
        networks = tuple(parsed)
    kinds = b.kinds
    if "kinds" in m:
        where = (*path, "kinds")
        listed = r.string_list(m["kinds"], where)
        for i, kind in enumerate(listed):
            if kind not in KINDS:
                raise r.fail(
                    (*where, i), f"unknown drift kind {kind!r} (known: {', '.join(KINDS)})"
                )
        kinds = frozenset(listed)
    factor = b.lifetime_factor
    if "lifetime_factor" in m:
        raw = m["lifetime_factor"]
        if isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 1:
            raise r.fail((*path, "lifetime_factor"), f"expected a number above 1, got {raw!r}")
        factor = float(raw)
    return DriftConfig(str(mode), learn, networks, kinds, factor, live, r.source.at(path))
