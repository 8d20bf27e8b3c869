"""The shell around ``proxy.drift``: what was learned, kept in SQLite (stdlib) so it
survives restarts and is shared by every worker, and the drift of each connection.

Nothing here blocks a request: a connection judges its peer against the in-memory
``Learned`` once (at its first request; origins behind a trusted hop once per origin),
learns from it at once in memory, and hands the facts to a bounded queue. A writer
task batches them into SQLite in a worker thread; a sync task reads back, every
``SYNC_INTERVAL``, what other workers (and other proxies sharing the file) learned. A
full queue drops facts (counted), never waits.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from proxy import drift
from proxy.drift import DriftConfig, Fact, Finding, Learned, Observation
from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.policy.model import Policy
from proxy.svid import PeerSvid

QUEUE = 4096  # facts waiting for the writer
SYNC_INTERVAL = 1.0  # how often a worker reads what the others learned
SYNC_OVERLAP = 2.0  # re-read rows this much older than the last read (commit skew)
REFRESH = 30.0  # a fact seen again is written again after this long (its last_seen)
TOUCH = 10.0  # a connection in use refreshes its credential's last_seen this often
PRUNE_INTERVAL = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS drift_facts (
    spiffe_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    peer TEXT NOT NULL DEFAULT '',
    value REAL NOT NULL DEFAULT 0,
    expires REAL,
    updated REAL NOT NULL,
    PRIMARY KEY (spiffe_id, kind, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS drift_facts_updated ON drift_facts (updated);
"""
_COLUMNS = "spiffe_id, kind, key, first_seen, last_seen, peer, value, expires"
_UPSERT = f"""
INSERT INTO drift_facts ({_COLUMNS}, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (spiffe_id, kind, key) DO UPDATE SET
    first_seen = min(first_seen, excluded.first_seen),
    peer = CASE WHEN excluded.last_seen >= last_seen THEN excluded.peer ELSE peer END,
    last_seen = max(last_seen, excluded.last_seen),
    value = max(value, excluded.value),
    expires = coalesce(excluded.expires, expires),
    updated = excluded.updated
"""


class Store:
    """The SQLite file: blocking calls, made from worker threads (one at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error:
            self._db.close()
            raise

    def write(self, facts: list[Fact], updated: float) -> None:
        rows = [
            (f.spiffe_id, f.kind, f.key, f.first_seen, f.last_seen, f.peer, f.value, f.expires,
             updated)
            for f in facts
        ]  # fmt: skip
        with self._lock, self._db:
            self._db.executemany(_UPSERT, rows)

    def since(self, updated: float) -> list[Fact]:
        """Facts written at or after ``updated`` (every fact: pass 0)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM drift_facts WHERE updated >= ?", (updated,)
            ).fetchall()
        return [Fact(*row) for row in rows]

    def prune(self, now: float) -> None:
        with self._lock, self._db:
            self._db.execute(
                "DELETE FROM drift_facts WHERE kind = ? AND expires < ?",
                (drift.CREDENTIAL_FACT, now - drift.EXPIRED_KEPT),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


Event = Callable[..., None]


class DriftLearner:
    """What this process learned of identities (``learned``), and its way to the store.
    ``path`` None: learning stays in this process's memory. The store is opened once a
    policy with a ``drift:`` setting is in force (``activate``)."""

    def __init__(self, path: Path | None, metrics: Metrics, event: Event) -> None:
        self.path = path
        self.metrics = metrics
        self.event = event
        self.learned = Learned()
        self.store: Store | None = None
        self.active = False
        self._send, self._receive = trio.open_memory_channel[Fact](QUEUE)
        self._written: dict[tuple[str, str, str], float] = {}

    def activate(self, policy: Policy, *, starting: bool = False) -> None:
        """Open the store and load what it holds, if ``policy`` judges drift and this was
        not done yet. At start a store that cannot be opened is a ConfigError; later it
        is logged and learning stays in memory."""
        if self.active or not policy.drift_configs:
            return
        self.active = True
        if self.path is None:
            return
        try:
            self.store = Store(self.path)
            facts = self.store.since(0.0)
        except sqlite3.Error as exc:
            self.store = None
            if starting:
                raise ConfigError(str(self.path), f"cannot open the drift store: {exc}") from exc
            self.event("drift_store_error", path=str(self.path), error=str(exc))
            return
        self.learned.learn(facts)
        self.learned.prune(time.time())

    def learn(self, facts: list[Fact], now: float) -> None:
        """Learn ``facts`` in memory now; queue for the store what it does not hold yet
        (or holds with a last sighting older than ``REFRESH``)."""
        changed = {(f.spiffe_id, *f.ident) for f in self.learned.learn(facts)}
        if self.store is None:
            return
        for f in facts:
            key = (f.spiffe_id, f.kind, f.key)
            if key in changed or now - self._written.get(key, 0.0) >= REFRESH:
                self._written[key] = now
                try:
                    self._send.send_nowait(self.learned.ids[f.spiffe_id][f.ident])
                except trio.WouldBlock:
                    self.metrics.drift_dropped.inc()

    def report(self, subject: str, obs: Observation, finding: Finding, config: DriftConfig,
               **fields: object) -> None:  # fmt: skip
        """One drift: an ``identity_drift`` event and a count."""
        self.metrics.identity_drift.labels(kind=finding.kind, mode=config.mode).inc()
        self.event(
            "identity_drift",
            kind=finding.kind,
            mode=config.mode,
            spiffe_id=obs.spiffe_id,
            subject=subject,
            evidence=finding.evidence,
            setting=config.location,
            **fields,
        )

    async def run(self, changed: Callable[[], trio.Event], policy: Callable[[], Policy]) -> None:
        """Write, read back, prune and follow policy reloads (a policy that starts to
        judge drift opens the store); until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            nursery.start_soon(self._sync)
            while True:
                await changed().wait()
                self.activate(policy())

    def flush(self) -> None:
        """Write what is queued, now (at stop)."""
        batch = []
        while True:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        if batch and self.store is not None:
            self._write(batch)

    def _write(self, batch: list[Fact]) -> None:
        if self.store is None:
            return
        try:
            self.store.write(batch, time.time())
        except sqlite3.Error as exc:
            self.event("drift_store_error", path=str(self.path), error=str(exc))

    async def _writer(self) -> None:
        async for fact in self._receive:
            batch = [fact]
            while len(batch) < QUEUE:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await trio.to_thread.run_sync(self._write, batch)

    async def _sync(self) -> None:
        last = time.time()
        pruned = last
        while True:
            await trio.sleep(SYNC_INTERVAL)
            store = self.store
            if store is None:
                continue
            started = time.time()
            try:
                facts = await trio.to_thread.run_sync(store.since, last - SYNC_OVERLAP)
                if started - pruned > PRUNE_INTERVAL:
                    pruned = started
                    await trio.to_thread.run_sync(store.prune, started)
                    self.learned.prune(started)
                    self._written = {
                        k: t for k, t in self._written.items() if started - t < REFRESH
                    }
            except sqlite3.Error as exc:
                self.event("drift_store_error", path=str(self.path), error=str(exc))
                continue
            self.learned.learn(facts)
            last = started

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


class _Subject:
    """One identity seen on one connection (the peer, or an origin behind it): what was
    known of it before, and its drift under each setting, judged once per setting."""

    __slots__ = ("findings", "known", "learning", "obs", "seen")

    def __init__(self, learner: DriftLearner, obs: Observation, policy: Policy) -> None:
        self.obs = obs
        self.known = learner.learned.known(obs.spiffe_id)
        self.findings: dict[int, tuple[DriftConfig, tuple[Finding, ...]]] = {}
        # Learned unless a refusing setting refuses it: a refused network or credential
        # must not become normal by being tried.
        self.learning = not any(self.judge(c) for c in policy.drift_deny)
        self.seen = obs.at
        if self.learning:
            learner.learn(drift.facts_of(obs), obs.at)

    def judge(self, config: DriftConfig) -> tuple[Finding, ...]:
        hit = self.findings.get(id(config))
        if hit is None or hit[0] is not config:
            hit = (config, drift.assess(self.known, self.obs, config, self.obs.at))
            self.findings[id(config)] = hit
        return hit[1]

    def touch(self, learner: DriftLearner, now: float) -> None:
        """Still in use: refresh its last sighting (what makes a credential live)."""
        if self.learning and now - self.seen >= TOUCH:
            self.seen = now
            learner.learn(drift.facts_of(replace(self.obs, at=now)), now)


_ORIGINS = 32  # origins remembered per connection


class ConnectionDrift:
    """The drift of one connection's peer and of the origins its requests name."""

    def __init__(self, learner: DriftLearner, peer: PeerSvid, peer_ip: str, policy: Policy):
        self.learner = learner
        now = time.time()
        obs = drift.observe_peer(peer, peer_ip, policy.drift_prefixes, now)
        self.peer = _Subject(learner, obs, policy)
        self.origins: dict[tuple[str, str, str | None], _Subject] = {}
        self.told: set[tuple[str, str]] = set()

    def judge(
        self,
        policy: Policy,
        config: DriftConfig,
        origin: tuple[str, str, str | None] | None,
        **fields: Any,
    ) -> tuple[Finding, ...]:
        """The drift of this request under ``config``: its peer's, and its origin's
        (``(origin ID, hop ID, origin leaf SHA-256)``) when a trusted hop names one. A
        drift is reported (event, metric) once per connection, identity and kind."""
        now = time.time()
        self.peer.touch(self.learner, now)
        found = [(self.peer, "peer", f) for f in self.peer.judge(config)]
        if origin is not None:
            subject = self.origins.get(origin)
            if subject is None:
                if len(self.origins) >= _ORIGINS:
                    self.origins.clear()
                obs = drift.observe_origin(origin[0], origin[1], origin[2], now)
                subject = self.origins[origin] = _Subject(self.learner, obs, policy)
            subject.touch(self.learner, now)
            found += [(subject, "origin", f) for f in subject.judge(config)]
        for subject, role, finding in found:
            key = (subject.obs.spiffe_id, finding.kind)
            if key not in self.told:
                self.told.add(key)
                self.learner.report(role, subject.obs, finding, config, **fields)
        return tuple(f for _, _, f in found)
