"""``/ui`` on the admin listener: gathers what the page shows and serves it (the shell
around the pure ``ui_page``, ``identity_map`` and ``recent``).

Where the data comes from:

- one process (``workers: 1``): its own memory. The session feeds ``Runtime.recent``
  (the last decisions, the client credentials seen) and the event log's tap feeds it
  the reload and drift events; counters come from its metrics registry.
- ``--workers N``: the supervisor serves the admin listener but serves no requests, so
  it reads the tail of the workers' decision log and event log files (their paths are
  in the configuration; stdout or stderr cannot be read back, and the page says so),
  the policy file (the last version that loads) and the credentials files, and the
  counters aggregated across workers.

The page is built off the event loop, in a thread (laying out the map runs ``dot``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from proxy import __version__, admin, graphviz, identity_map, ui_page
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.policy.model import Policy
from proxy.recent import DECISIONS, Recent
from proxy.runtime import Runtime
from proxy.tls import Credentials, load_credentials

CONTENT_TYPE = b"text/html; charset=utf-8"
# Nothing but the page's own stylesheet may load or run; no framing, no referrer.
HEADERS = [
    (b"content-security-policy", ui_page.CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
DECISION_TAIL = 2 * 1024 * 1024  # bytes of the decision log read back (supervisor)
EVENT_TAIL = 1024 * 1024  # bytes of the event log read back (supervisor)
LOG_TARGETS = ("stdout", "stderr")


@dataclass
class Inputs:
    """Everything the page shows, gathered (copies: built in another thread)."""

    recent: Recent
    own_id: str
    own_not_after: dt.datetime | None
    bundles: dict[str, tuple[x509.Certificate, ...]]
    policy: Policy
    policy_info: ui_page.PolicyInfo
    samples: list[ui_page.Sample]
    served_by: str
    notes: list[str] = field(default_factory=list)


def samples(registry: Any) -> list[ui_page.Sample]:
    """(name, labels, value) of every sample of a prometheus-client registry."""
    return [(s.name, s.labels, s.value) for fam in registry.collect() for s in fam.samples]


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _credentials_view(
    creds: Credentials,
) -> tuple[str, dt.datetime, dict[str, tuple[x509.Certificate, ...]]]:
    bundles = {str(td): tuple(b.x509_authorities) for td, b in creds.trust.bundles.items()}
    return (str(creds.own_id) if creds.own_id else "", creds.own_not_after, bundles)


def build_page(inputs: Inputs, query: bytes, now: dt.datetime | None = None) -> str:
    """The page's HTML (runs ``dot``: call it off the event loop)."""
    decisions = inputs.recent.recent_decisions()
    traffic = (identity_map.Traffic(d.spiffe_id, d.route, d.decision, d.reason) for d in decisions)
    graph = identity_map.build(inputs.policy, traffic)
    svg, note = None, ""
    try:
        svg = graphviz.render_svg(identity_map.to_dot(graph, ui_page.node_link))
    except graphviz.GraphvizError as exc:
        note = f"{exc}: the map is shown as a table of its edges."
    data = ui_page.PageData(
        now=now or dt.datetime.now(dt.UTC),
        version=__version__,
        served_by=inputs.served_by,
        own_id=inputs.own_id,
        decisions=decisions,
        counters=ui_page.counters(inputs.samples),
        expiries=ui_page.expiries(
            inputs.own_id,
            inputs.own_not_after,
            inputs.bundles,
            inputs.recent.credentials.values(),
        ),
        policy=inputs.policy_info,
        reloads=list(inputs.recent.reloads),
        drift=list(inputs.recent.drift),
        graph=graph,
        map_svg=svg,
        map_note=note,
        notes=inputs.notes,
    )
    return ui_page.render(data, ui_page.Filters.from_query(query))


def page(gather: Callable[[], Inputs], in_thread: bool = False) -> admin.Page:
    """The ``/ui`` route: ``gather`` runs on the event loop (it copies what changes
    there) unless ``in_thread``; the page is built in a thread, one at a time."""
    limiter: list[trio.CapacityLimiter] = []

    async def render(query: bytes) -> admin.Response:
        if not limiter:
            limiter.append(trio.CapacityLimiter(1))
        if in_thread:
            body = await trio.to_thread.run_sync(
                lambda: build_page(gather(), query), limiter=limiter[0]
            )
        else:
            body = await trio.to_thread.run_sync(build_page, gather(), query, limiter=limiter[0])
        return 200, CONTENT_TYPE, body.encode(), list(HEADERS)

    return admin.Page(render)


def local_page(rt: Runtime) -> admin.Page:
    """``/ui`` of a single process: from its own memory."""

    def gather() -> Inputs:
        own_id, own_not_after, bundles = _credentials_view(rt.credentials)
        rt.metrics.flush()  # the requests tallied since the last scrape
        return Inputs(
            rt.recent.copy(),
            own_id,
            own_not_after,
            bundles,
            rt.policy,
            ui_page.PolicyInfo(
                str(rt.config.policy_path),
                rt.policy.sha256,
                len(rt.policy.routes),
                _iso(rt.policy_loaded_at),
            ),
            samples(rt.metrics.registry),
            f"this process (pid {os.getpid()})",
        )

    return page(gather)


# --- the supervisor: from the workers' log files ---------------------------------------


def read_tail(path: str | Path, max_bytes: int) -> list[dict[str, Any]]:
    """The JSON objects of the last ``max_bytes`` of a JSON-lines file (a line cut by the
    start of that window, and any line that is not JSON, skipped)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - max_bytes)
        f.seek(start)
        data = f.read(max_bytes)
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


class JsonLinesReader:
    """The JSON objects of whole JSON-lines files, one at a time (a log can be large);
    ``skipped`` counts the lines that were not JSON objects."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.paths = list(paths)
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for path in self.paths:
            with open(path, "rb") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        doc = None
                    if isinstance(doc, dict):
                        yield doc
                    else:
                        self.skipped += 1


def read_jsonl(paths: Iterable[str | Path]) -> JsonLinesReader:
    return JsonLinesReader(paths)


class WorkersView:
    """What ``/ui`` shows under a supervisor, read from the files the workers write."""

    def __init__(
        self,
        rt: Runtime,
        workers: int,
        samples: Callable[[], list[ui_page.Sample]],
        read_policy: Callable[[Config, bytes], Policy],
    ) -> None:
        """``rt``: the supervisor's runtime (its configuration, and what it loaded at
        start); ``samples``: the counters aggregated across workers; ``read_policy``:
        how a policy file is loaded against the configuration (``app.read_policy``)."""
        self.rt = rt
        self.workers = workers
        self._samples = samples
        self._read_policy = read_policy
        self.policy = rt.policy
        self.policy_loaded_at = rt.policy_loaded_at

    def _policy(self, config: Config) -> str:
        """The policy file's last version that loads (what the workers serve: they keep
        the last good one too); a note when the file on disk does not load."""
        try:
            data = config.policy_path.read_bytes()
        except OSError as exc:
            return f"cannot read the policy file: {exc.strerror}; shown: the last version read"
        if hashlib.sha256(data).hexdigest() == self.policy.sha256:
            return ""
        try:
            self.policy = self._read_policy(config, data)
        except ConfigError as exc:
            return (
                f"the policy file does not load ({exc}); the workers keep serving the last "
                "version that did, shown here"
            )
        self.policy_loaded_at = dt.datetime.now(dt.UTC)
        return ""

    def gather(self) -> Inputs:
        cfg = self.rt.config
        notes: list[str] = []
        decisions: Iterable[Mapping[str, Any]] = []
        events: Iterable[Mapping[str, Any]] = []
        if cfg.decision_log in LOG_TARGETS:
            notes.append(
                f"decision_log is {cfg.decision_log}: with several workers /ui reads the "
                "workers' decisions back from the decision log file, so none are shown. "
                "Set decision_log to a file path to see them here."
            )
        else:
            try:
                decisions = read_tail(cfg.decision_log, DECISION_TAIL)[-DECISIONS * 2 :]
            except OSError as exc:
                notes.append(f"cannot read the decision log {cfg.decision_log}: {exc.strerror}")
        if cfg.event_log in LOG_TARGETS:
            notes.append(
                f"event_log is {cfg.event_log}: reload history, drift alerts and client "
                "certificate subjects come from the event log file with several workers. "
                "Set event_log to a file path to see them here."
            )
        else:
            try:
                events = read_tail(cfg.event_log, EVENT_TAIL)
            except OSError as exc:
                notes.append(f"cannot read the event log {cfg.event_log}: {exc.strerror}")
        policy_note = self._policy(cfg)
        creds = self.rt.credentials
        if cfg.tls.workload_api is None:
            try:
                creds = load_credentials(cfg.tls)  # the files as the workers see them now
            except ConfigError as exc:
                notes.append(f"the credential files do not load ({exc}); shown as at start")
        own_id, own_not_after, bundles = _credentials_view(creds)
        return Inputs(
            Recent.from_logs(decisions, events),
            own_id,
            own_not_after,
            bundles,
            self.policy,
            ui_page.PolicyInfo(
                str(cfg.policy_path),
                self.policy.sha256,
                len(self.policy.routes),
                _iso(self.policy_loaded_at),
                policy_note,
            ),
            self._samples(),
            f"the supervisor of {self.workers} workers (pid {os.getpid()}), from their log files",
            notes,
        )

    def page(self) -> admin.Page:
        return page(self.gather, in_thread=True)
