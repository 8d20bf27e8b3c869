"""What every connection reads: the configuration, credentials, policy, pools and
sinks in force. Swapped as a whole on reload, never mutated in place (but for counters).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from proxy import canonical
from proxy.assertion import AssertionSigner
from proxy.audit_sink import JsonLines
from proxy.config import Config
from proxy.deadlines import Sweeper, tick_for
from proxy.decide import VerdictCache
from proxy.drift_store import DriftLearner
from proxy.forward import UpstreamPool
from proxy.metrics import Metrics
from proxy.policy.model import Policy
from proxy.recent import CREDENTIAL_EVENT, Credential, Recent
from proxy.tls import Credentials


@dataclass
class Runtime:
    """What every connection reads: swapped as a whole on reload, never mutated in place."""

    config: Config
    credentials: Credentials
    policy: Policy
    pools: dict[str, UpstreamPool]
    decisions: JsonLines
    events: JsonLines
    metrics: Metrics
    signer: AssertionSigner | None = None
    x509_source: Any = None  # a WorkloadApiSource when the SVID comes from a SPIRE agent
    # The configuration as its file says, before the command line's overrides (a worker's
    # port, no admin listener): what a reload compares an edited file with. None: the
    # same as ``config``.
    file_config: Config | None = None
    # A worker under a supervisor reads the policy its supervisor accepted from this file
    # (named as config.policy_path in every message), and tells it what it serves by
    # writing JSON lines to status_fd.
    policy_source: Path | None = None
    # A worker's copy of the last configuration a worker ran: it writes the file's bytes
    # there when it applied a reload (a restarted worker that cannot start from the file
    # starts from the copy instead of failing in a loop; cli.cmd_worker).
    config_copy: Path | None = None
    status_fd: int | None = None
    # The recent past the admin page shows: decisions, credentials seen, reloads.
    recent: Recent = field(default_factory=Recent)
    open_connections: int = 0
    handshakes: int = 0  # TLS handshakes in flight
    handshakes_by_source: dict[str, int] = field(default_factory=dict)
    policy_loaded_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    draining: bool = False
    drain_requested: trio.Event = field(default_factory=trio.Event)
    # Verdicts for requests without a JWT-SVID, shared by the connections (emptied when
    # the policy, the credentials or the upstream rules are swapped).
    verdicts: VerdictCache = field(default_factory=VerdictCache)
    # The deadlines of the waits on every connection's socket (a drain also ends the
    # waits for a next request through it); its tick follows the configured timeouts.
    sweeper: Sweeper = field(default_factory=Sweeper)

    # Set (and replaced) whenever the policy or the credentials change: open tunnels wait
    # on it to re-evaluate their caller.
    changed: trio.Event = field(default_factory=trio.Event)
    rules: canonical.Rules = field(init=False)
    upstream_rules: dict[str, canonical.UpstreamRules] = field(init=False)
    # What subject-drift detection learned (``proxy.drift_store``).
    drift: DriftLearner = field(init=False)

    def __post_init__(self) -> None:
        self.set_config(self.config)
        self.events.tap = self.recent.event
        self.recent.announce = self._credential_seen
        self.drift = DriftLearner(
            self.config.drift_store, self.metrics, lambda name, **f: self.events.event(name, **f)
        )

    def _credential_seen(self, c: Credential) -> None:
        """A client certificate not seen before (by this process, lately): logged, so
        the supervisor's admin page learns its subject too."""
        self.events.event(
            CREDENTIAL_EVENT,
            spiffe_id=c.spiffe_id,
            leaf_sha256=c.sha256,
            subject=c.subject,
            issuer=c.issuer,
            not_after=c.not_after,
        )

    def set_config(self, config: Config) -> None:
        """Swap in ``config`` and what is derived from it (the request rules). The caller
        swaps the pools and the policy built for it, then calls ``trust_changed``."""
        self.config = config
        t = config.timeouts
        self.sweeper.tick = tick_for(
            (t.handshake, t.request_head, t.idle, t.upstream_response, t.client_write)
        )
        self.rules = config.canonical_rules()
        self.upstream_rules = config.upstream_rules()

    def report(self, **state: Any) -> None:
        """Tell the supervisor (if any) what this worker serves: a JSON line on
        ``status_fd``, with the policy in force and ``state`` (``serving``)."""
        if self.status_fd is None:
            return
        line = json.dumps({"policy_sha256": self.policy.sha256, **state}) + "\n"
        with contextlib.suppress(OSError):  # the supervisor is gone: we exit with it
            os.write(self.status_fd, line.encode())

    def trust_changed(self) -> None:
        """The policy or the credentials were swapped: wake whoever re-evaluates."""
        changed, self.changed = self.changed, trio.Event()
        changed.set()
