"""The decision log as a contract, and the values the governance commands read from it.

A decision line is one JSON object with ``"event": "request"`` (``proxy/audit.py``
writes it). The commands read logs of any proxy version: a field is only ever added,
never renamed or given another meaning, and a field a line lacks reads as null. Each
command says below which fields it needs; a line lacking one is skipped and counted,
never guessed. Lines of other kinds (operational events, text that is not JSON) are
skipped and counted.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.canonical import Refused, normalize_path


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    meaning: str
    used_by: tuple[str, ...] = ()


INVENTORY, UNUSED, SUGGEST, REPLAY = "inventory", "unused", "suggest", "replay"
_ALL = (INVENTORY, UNUSED, SUGGEST, REPLAY)

# Every field the governance commands read. README.md "Decision log" lists the same
# (tests/unit/test_governance.py keeps the two and proxy/audit.py in step).
FIELDS: tuple[Field, ...] = (
    Field("time", "start of the request, UTC, ISO 8601 with microseconds and Z", _ALL),
    Field("event", '"request" on a decision line; anything else is another kind of line', _ALL),
    Field("peer_addr", "the peer's address:port ([v6]:port), after a PROXY header", (INVENTORY,)),
    Field("spiffe_id", "the mTLS peer's SPIFFE ID", _ALL),
    Field("origin_spiffe_id", "the origin a trusted hop named in its XFCC, else null", _ALL),
    Field("origin_sha256", "that XFCC element's Hash (the origin's leaf), else null", _ALL),
    Field("leaf_sha256", "SHA-256 of the peer's leaf certificate", (INVENTORY, UNUSED, REPLAY)),
    Field("leaf_not_before", "the leaf's notBefore", (INVENTORY, UNUSED, REPLAY)),
    Field("leaf_not_after", "the leaf's notAfter", (INVENTORY, UNUSED, REPLAY)),
    Field("leaf_issuer", "the leaf's issuer DN (RFC 4514)", (INVENTORY,)),
    Field("method", "the canonical method", (UNUSED, SUGGEST, REPLAY)),
    Field("host", "the canonical host (lower case, no port)", (UNUSED, SUGGEST, REPLAY)),
    Field("path", "the canonical path the policy judged (no query)", (UNUSED, SUGGEST, REPLAY)),
    Field("route", "the route that decided, else null", (INVENTORY, SUGGEST, REPLAY)),
    Field("decision", "allow, deny (the policy's verdict) or error (refused before it)", _ALL),
    Field("mode", "enforce, or audit (forwarded whatever the verdict)", (SUGGEST,)),
    Field("reason", "the verdict's reason code", (REPLAY,)),
    Field("upstream", "the upstream the request went to", (SUGGEST,)),
    Field("jwt_presented", "a bearer token was sent, valid or not", (UNUSED, SUGGEST, REPLAY)),
    Field("jwt_sub", "the validated JWT-SVID's subject, else null", (UNUSED, SUGGEST, REPLAY)),
    Field("jwt_aud", "the validated JWT-SVID's audiences (a list), else null", _ALL[1:]),
)
READ: tuple[str, ...] = tuple(f.name for f in FIELDS)

# What a decision line must carry to be judged again (unused, replay) or to be evidence
# (suggest); ``inventory`` reads whatever is there.
NEEDED = ("time", "spiffe_id", "method", "path", "decision")

# Kinds of input line, as counted.
REQUEST = "request"
OTHER_EVENT = "other_event"  # valid JSON, another kind of line (start-up, handshakes)
UNREADABLE = "unreadable"  # not JSON, not an object, or without an "event"
OUTSIDE_WINDOW = "outside_window"  # a decision line older than --since

# Why a decision line was left out of a command's result.
SKIP_REFUSED = "refused_before_policy"  # decision "error": no policy verdict to compare
SKIP_INCOMPLETE = "lacks_needed_fields"
SKIP_NOT_FORWARDED = "not_forwarded"  # suggest: denied in enforce mode


@dataclass
class InputStats:
    """What was read: lines by kind, and decision lines left out by reason."""

    kinds: dict[str, int]
    skipped: dict[str, int]

    @classmethod
    def of(cls, kinds: Mapping[str, int]) -> InputStats:
        return cls(dict(kinds), {})

    @property
    def lines(self) -> int:
        return sum(self.kinds.values())

    @property
    def requests(self) -> int:
        return self.kinds.get(REQUEST, 0)

    def skip(self, reason: str, n: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def summary(self) -> str:
        other = self.kinds.get(OTHER_EVENT, 0)
        bad = self.kinds.get(UNREADABLE, 0)
        out = [
            f"{self.lines:,} lines: {self.requests:,} decision lines, {other:,} other events, "
            f"{bad:,} unreadable"
        ]
        if self.kinds.get(OUTSIDE_WINDOW):
            out[0] += f", {self.kinds[OUTSIDE_WINDOW]:,} before the window"
        if self.skipped:
            parts = ", ".join(f"{n:,} {why}" for why, n in sorted(self.skipped.items()))
            out.append(f"left out: {parts}")
        return "; ".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"lines": self.lines, "kinds": self.kinds, "skipped": self.skipped}


@dataclass(frozen=True, slots=True)
class RequestGroup:
    """Decision lines that are one request for a policy: the same caller, canonical
    request, credential class and JWT facts, and the same logged verdict. ``leaf_*`` and
    ``time`` are those of the group's latest line (a representative credential)."""

    spiffe_id: str | None
    origin: str | None
    origin_sha256: str | None
    method: str | None
    host: str
    path: str | None
    jwt_presented: bool
    jwt_sub: str | None
    jwt_aud: tuple[str, ...]
    decision: str | None
    reason: str | None
    route: str | None
    mode: str | None
    upstream: str | None
    count: int
    first: str
    last: str
    leaf_sha256: str | None
    leaf_not_before: str | None
    leaf_not_after: str | None
    time: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RequestGroup:
        rep = row.get("rep") or [None, None, None, row["last"]]
        jwt_sub = row.get("jwt_sub")
        reason = row.get("reason")
        return cls(
            spiffe_id=row.get("spiffe_id"),
            origin=row.get("origin_spiffe_id"),
            origin_sha256=row.get("origin_sha256"),
            method=row.get("method"),
            host=row.get("host") or "",
            path=row.get("path"),
            jwt_presented=presented(row.get("jwt_presented"), jwt_sub, reason),
            jwt_sub=jwt_sub,
            jwt_aud=audiences(row.get("jwt_aud")),
            decision=row.get("decision"),
            reason=reason,
            route=row.get("route"),
            mode=row.get("mode"),
            upstream=row.get("upstream"),
            count=int(row["n"]),
            first=row["first"],
            last=row["last"],
            leaf_sha256=rep[0],
            leaf_not_before=rep[1],
            leaf_not_after=rep[2],
            time=rep[3] or row["last"],
        )

    @property
    def complete(self) -> bool:
        """Carries what judging it again needs."""
        return bool(self.spiffe_id and self.method and self.path and self.time)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Decision lines of one identity with one credential, from one address, on one
    route, with one verdict (the unit ``inventory`` aggregates from)."""

    spiffe_id: str | None
    origin: str | None
    origin_sha256: str | None
    leaf_sha256: str | None
    leaf_issuer: str | None
    leaf_not_before: str | None
    leaf_not_after: str | None
    peer_ip: str | None
    route: str | None
    decision: str | None
    count: int
    first: str
    last: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> UsageRow:
        return cls(
            row.get("spiffe_id"),
            row.get("origin_spiffe_id"),
            row.get("origin_sha256"),
            row.get("leaf_sha256"),
            row.get("leaf_issuer"),
            row.get("leaf_not_before"),
            row.get("leaf_not_after"),
            row.get("peer_ip"),
            row.get("route"),
            row.get("decision"),
            int(row["n"]),
            row["first"],
            row["last"],
        )


def presented(value: Any, jwt_sub: str | None, reason: str | None) -> bool:
    """Whether a bearer token was sent. Logs older than ``jwt_presented`` tell it by a
    validated subject, or a JWT reason other than ``jwt_missing``."""
    if value is not None:
        return value is True or str(value).lower() == "true"
    if jwt_sub:
        return True
    return bool(reason and reason.startswith("jwt_") and reason != "jwt_missing")


def audiences(value: Any) -> tuple[str, ...]:
    """``jwt_aud`` as read: null, a JSON list (as text or a list), or one string."""
    if value is None or value == "":
        return ()
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    text = str(value)
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            return (text,)
        if isinstance(items, list):
            return tuple(str(v) for v in items)
    return (text,)


def parse_time(text: str) -> dt.datetime:
    """A logged time (``2026-11-23T18:42:44.206835Z``) as an aware UTC datetime."""
    t = dt.datetime.fromisoformat(text)
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def iso(t: dt.datetime) -> str:
    """The log's own time format, so times compare as text."""
    return t.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def trust_domain(spiffe_id: str) -> str:
    return spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


def network(ip: str | None, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    """The network a peer address belongs to (``10.1.2.0/24``), ``unknown`` if none."""
    if not ip:
        return "unknown"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "unknown"
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def lifetime(not_before: str | None, not_after: str | None) -> float | None:
    """A certificate's lifetime in seconds, None when a bound is not logged."""
    if not not_before or not not_after:
        return None
    return (parse_time(not_after) - parse_time(not_before)).total_seconds()


def human_duration(seconds: float | None) -> str:
    """``90d``, ``36h``, ``45m``: the largest unit that divides it, else hours or seconds."""
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds:.0f}s"


def join(values: Sequence[str], limit: int = 4) -> str:
    """``a, b, c (+5 more)``."""
    shown = ", ".join(values[:limit])
    return shown + (f" (+{len(values) - limit} more)" if len(values) > limit else "")


def canonical_path(path: str) -> str | None:
    """A logged path as a request is matched now: a log written before a change of the
    canonical form (``/users/%40me``, now ``/users/@me``) is read as it would be now;
    None for a path such a request could not have now (it would be refused)."""
    try:
        return normalize_path(path.encode("ascii"))
    except (UnicodeEncodeError, Refused):
        return None
