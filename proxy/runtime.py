"""What every connection reads: the configuration, credentials, policy, pools and
sinks in force. Swapped as a whole on reload, never mutated in place (but for counters).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy import canonical
from proxy.assertion import AssertionSigner
from proxy.audit_sink import JsonLines
from proxy.config import Config
from proxy.drift_store import DriftLearner
from proxy.forward import UpstreamPool
from proxy.metrics import Metrics
from proxy.policy.model import Policy
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
    open_connections: int = 0
    handshakes: int = 0  # TLS handshakes in flight
    handshakes_by_source: dict[str, int] = field(default_factory=dict)
    policy_loaded_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    draining: bool = False
    drain_requested: trio.Event = field(default_factory=trio.Event)
    # Sessions waiting for a next request: cancelled at drain so idle keep-alives close.
    idle_scopes: set[trio.CancelScope] = field(default_factory=set)

    # Set (and replaced) whenever the policy or the credentials change: open tunnels wait
    # on it to re-evaluate their caller.
    changed: trio.Event = field(default_factory=trio.Event)
    rules: canonical.Rules = field(init=False)
    upstream_rules: dict[str, canonical.UpstreamRules] = field(init=False)
    # What subject-drift detection learned (``proxy.drift_store``).
    drift: DriftLearner = field(init=False)

    def __post_init__(self) -> None:
        self.set_config(self.config)
        self.drift = DriftLearner(
            self.config.drift_store, self.metrics, lambda name, **f: self.events.event(name, **f)
        )

    def set_config(self, config: Config) -> None:
        """Swap in ``config`` and what is derived from it (the request rules). The caller
        swaps the pools and the policy built for it, then calls ``trust_changed``."""
        self.config = config
        self.rules = config.canonical_rules()
        self.upstream_rules = config.upstream_rules()

    def trust_changed(self) -> None:
        """The policy or the credentials were swapped: wake whoever re-evaluates."""
        changed, self.changed = self.changed, trio.Event()
        changed.set()
