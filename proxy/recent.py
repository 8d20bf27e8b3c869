"""What the admin page (``/ui``) shows of the recent past: the last decisions, the
client credentials seen, reload history and drift alerts. Bounded, in memory, no I/O.

The request path pays one ``deque.append`` of its decision line, already encoded
(``add_line``, from ``session._log``; the admin page parses the lines it shows), and a
connection one dictionary lookup for its client certificate (``seen``; the first time,
a few attribute reads for its subject). Operational events reach ``event`` through the
event log's tap (``JsonLines.tap``). The supervisor of ``--workers`` builds one from its
workers' log files instead (``from_logs``), so ``/ui`` renders from the same object
either way.
"""

from __future__ import annotations

import json
import operator
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography import x509

from proxy.audit import iso
from proxy.svid import PEERS_KEPT, PeerSvid

DECISIONS = 1000  # decisions kept
EVENTS = 100  # reload events kept, and drift alerts
# Client credentials kept, the oldest first seen forgotten first: as many as the peer
# cache keeps verified chains (proxy.peer), so a fleet that fits there is announced once.
CREDENTIALS = PEERS_KEPT

# What a decision line contributes, in the order of ``Decision``'s fields.
FIELDS = (
    "time",
    "worker",
    "spiffe_id",
    "peer_addr",
    "method",
    "host",
    "path",
    "route",
    "decision",
    "mode",
    "reason",
    "status",
    "leaf_sha256",
    "leaf_not_after",
)
_pick = operator.itemgetter(*FIELDS)


def row_of(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """A decision line's ``FIELDS``, as ``Recent.recent_decisions`` reads them."""
    return _pick(record)  # type: ignore[no-any-return]


RELOAD_EVENTS = frozenset(
    {
        "policy_reloaded",
        "policy_reload_failed",
        "config_reloaded",
        "config_reload_failed",
        "config_restart_required",
        "credentials_reloaded",
        "credentials_reload_failed",
    }
)
DRIFT_EVENT = "identity_drift"
CREDENTIAL_EVENT = "peer_credential_seen"


def name_text(name: x509.Name) -> str:
    """A certificate name as ``openssl x509 -subject`` orders it (``CN=..., O=...`` in
    the certificate's order), its values exactly as in the certificate: no RFC 4514
    backslashes, so escape it where it is shown."""
    parts = []
    for attr in name:
        value = attr.value if isinstance(attr.value, str) else attr.value.hex()
        parts.append(f"{attr.rfc4514_attribute_name}={value}")
    return ", ".join(parts)


class Decision(NamedTuple):
    """One decision line, as kept (``FIELDS``)."""

    time: str
    worker: int | None
    spiffe_id: str | None
    peer_addr: str
    method: str
    host: str
    path: str
    route: str | None
    decision: str
    mode: str
    reason: str
    status: int
    leaf_sha256: str | None
    leaf_not_after: str | None


@dataclass(frozen=True)
class Credential:
    """A client certificate seen: its SPIFFE ID, SHA-256, subject and issuer (``name_text``:
    exactly as in the certificate, to escape when shown) and expiry."""

    spiffe_id: str
    sha256: str
    subject: str
    issuer: str
    not_after: str  # ISO 8601, UTC, as in the decision line


class Recent:
    """The bounded recent past of one process (or, ``from_logs``, of all workers)."""

    def __init__(self) -> None:
        # A decision line as written (``add_line``) or its ``FIELDS`` (``add_record``)
        self.decisions: deque[str | tuple[Any, ...]] = deque(maxlen=DECISIONS)
        self.reloads: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self.drift: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self.credentials: dict[str, Credential] = {}
        # Called with a new credential's fields; the runtime logs them as an event (so a
        # supervisor reading the event log learns subjects too).
        self.announce: Callable[[Credential], None] | None = None

    def add_line(self, line: str) -> None:
        """One decision line, as written to the decision log (the request path: keep it
        cheap)."""
        self.decisions.append(line)

    def seen(self, peer: PeerSvid) -> None:
        """The client credential of a connection (once per connection, not per request)."""
        if peer.fingerprint not in self.credentials:
            self._learn(
                Credential(
                    str(peer.spiffe_id),
                    peer.fingerprint,
                    name_text(peer.leaf.subject),
                    name_text(peer.leaf.issuer),
                    iso(peer.not_after),
                ),
                announce=True,
            )

    def _learn(self, credential: Credential, announce: bool = False) -> None:
        if len(self.credentials) >= CREDENTIALS:
            del self.credentials[next(iter(self.credentials))]
        self.credentials[credential.sha256] = credential
        if announce and self.announce is not None:
            self.announce(credential)

    def add_record(self, record: Mapping[str, Any]) -> None:
        """A decision line read back from the log (``from_logs``)."""
        self.decisions.append(tuple(record.get(k) for k in FIELDS))
        sha = record.get("leaf_sha256")
        if sha and sha not in self.credentials:
            self._learn(
                Credential(
                    str(record.get("spiffe_id") or ""),
                    sha,
                    "",
                    "",
                    str(record.get("leaf_not_after") or ""),
                )
            )

    def event(self, record: Mapping[str, Any]) -> None:
        """An operational event (the event log's tap): kept if the page shows its kind."""
        kind = record.get("event")
        if kind in RELOAD_EVENTS:
            self.reloads.append(dict(record))
        elif kind == DRIFT_EVENT:
            self.drift.append(dict(record))
        elif kind == CREDENTIAL_EVENT:
            sha = str(record.get("leaf_sha256") or "")
            if sha and sha not in self.credentials:
                self._learn(
                    Credential(
                        str(record.get("spiffe_id") or ""),
                        sha,
                        str(record.get("subject") or ""),
                        str(record.get("issuer") or ""),
                        str(record.get("not_after") or ""),
                    )
                )

    def recent_decisions(self) -> list[Decision]:
        """The decisions kept, oldest first."""
        return [
            Decision._make(row_of(json.loads(d)) if isinstance(d, str) else d)
            for d in self.decisions
        ]

    def copy(self) -> Recent:
        """A copy to read in another thread while this one goes on changing."""
        other = Recent()
        other.decisions.extend(self.decisions)
        other.reloads.extend(self.reloads)
        other.drift.extend(self.drift)
        other.credentials = dict(self.credentials)
        return other

    @classmethod
    def from_logs(
        cls, decisions: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]]
    ) -> Recent:
        """The recent past as the workers' log lines tell it (events first, so a
        credential's subject from its event wins over the bare decision line)."""
        recent = cls()
        for e in events:
            recent.event(e)
        for d in decisions:
            if d.get("event") == "request":
                recent.add_record(d)
        return recent
