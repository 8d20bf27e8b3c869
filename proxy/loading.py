"""Loading what the proxy runs on: the configuration, the policy, the credentials (waiting
for SVID files spiffe-helper has not written yet), the log files, the upstream pools and
the assertion signer, and the Runtime built from them. Errors are ConfigErrors naming the
file (or the address, for listeners)."""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

from proxy.assertion import AssertionSigner
from proxy.audit_sink import JsonLines
from proxy.config import Config, TlsFiles, load_config
from proxy.deadlines import Sweeper
from proxy.errors import ConfigError
from proxy.forward import PROTOCOL_VIOLATION, UpstreamPool, ViolationHook
from proxy.metrics import Metrics
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from proxy.runtime import Runtime
from proxy.tls import Credentials, load_credentials


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def config_bytes(path: Path, source: Path | None = None) -> bytes:
    """The configuration file's bytes: from ``source`` (a worker's copy of the last
    configuration a worker ran), else from ``path``; a ConfigError names ``path``."""
    try:
        return (source or path).read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the configuration: {exc.strerror}") from exc


def read_config(path: Path, data: bytes | None = None) -> Config:
    """The configuration of file ``path`` (its relative paths are read from its
    directory, its errors name it): from ``data`` if given, else read from the file."""
    return load_config(config_bytes(path) if data is None else data, str(path), path.parent)


def publish(path: Path, data: bytes) -> None:
    """Write ``path`` whole for other processes: a complete file renamed into place (a
    temporary name of this process's own), so a reader never sees half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_policy(config: Config, data: bytes | None = None, source: Path | None = None) -> Policy:
    """The policy of ``config``: from ``data``, else read from ``source`` (a worker's copy
    of what its supervisor accepted), else from its file; named after its file."""
    path = config.policy_path
    if data is None:
        try:
            data = (source or path).read_bytes()
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the policy: {exc.strerror}") from exc
    folded = {name for name, u in config.upstreams.items() if u.case_insensitive}
    return load_policy(data, str(path), set(config.upstreams), folded)


def load_tls(config: Config, events: JsonLines | None = None) -> tuple[Credentials, Any]:
    """The proxy's credentials, from files or from the Workload API (then also the source).
    Either way start-up waits up to ``tls.wait_for_svid`` for a first SVID."""
    if config.tls.workload_api is None:
        return wait_for_credentials(config.tls, events), None
    from proxy.workload_api import WorkloadApiSource  # grpc is only loaded when used

    source = WorkloadApiSource(config.tls)
    return source.credentials(), source


def wait_for_credentials(
    files: TlsFiles, events: JsonLines | None = None, poll: float = 0.2
) -> Credentials:
    """The credentials from their files. Files that are not there yet (spiffe-helper
    starts beside the proxy and writes them once the agent answers) are waited for, up to
    ``files.wait_for_svid``, with one ``waiting_for_svid`` event; once they have all
    appeared, a set that does not load yet (the writer is between two files) is tried
    again until the same deadline. Files present from the start are loaded at once, so a
    broken file fails start-up without waiting."""
    deadline = time.monotonic() + files.wait_for_svid
    missing = [str(p) for p in files.files if not p.exists()]
    if not missing or files.wait_for_svid <= 0:
        return load_credentials(files)
    if events is not None:
        events.event("waiting_for_svid", missing=missing, timeout_s=files.wait_for_svid)
    if events is None or events.is_file:
        # Whoever started it watches the terminal: a wait of up to wait_for_svid with
        # nothing there looks like a hang (a mistyped path, or the agent not answering).
        print(
            f"spiffe-pep: waiting up to {files.wait_for_svid:g}s for the SVID files "
            f"(tls.wait_for_svid): {', '.join(missing)}",
            file=sys.stderr,
            flush=True,
        )
    while True:
        if all(p.exists() for p in files.files) or time.monotonic() >= deadline:
            try:
                return load_credentials(files)
            except ConfigError as exc:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        exc.location,
                        f"{exc.message} (after waiting {files.wait_for_svid:g}s for the "
                        "SVID files: tls.wait_for_svid)",
                    ) from exc
        time.sleep(poll)


def listen_error(exc: OSError, what: str, host: str, port: int) -> ConfigError:
    """A listener that cannot be opened (the address in use, not local, a name that does
    not resolve) as one line: ``listen 127.0.0.1:8443: Address already in use``."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ConfigError(f"{what} {address}", exc.strerror or str(exc))


def open_log(target: str, what: str, fields: dict[str, Any] | None = None) -> JsonLines:
    """A JSON-lines log; a path that cannot be opened is a ConfigError naming it."""
    try:
        return JsonLines(target, fields)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        parent = Path(target).parent
        if not parent.is_dir():
            reason += f" (the directory {parent} does not exist)"
        raise ConfigError(target, f"cannot open the {what}: {reason}") from exc


def build_runtime(
    config: Config,
    events: JsonLines | None = None,
    file_config: Config | None = None,
    *,
    policy_source: Path | None = None,
    config_copy: Path | None = None,
    status_fd: int | None = None,
) -> Runtime:
    """Read every file the proxy needs; raise ConfigError naming the first bad one.
    ``file_config``: the configuration as its file says, when ``config`` overrides some
    of it (a worker's); ``policy_source``, ``config_copy`` and ``status_fd``: a worker's
    (see ``Runtime``)."""
    events = events or open_log(config.event_log, "event log")
    credentials, source = load_tls(config, events)
    policy = read_policy(config, source=policy_source)
    metrics = Metrics()
    metrics.set_policy(policy.sha256)
    metrics.set_credentials(credentials)
    sweeper = Sweeper()
    rt = Runtime(
        config,
        credentials,
        policy,
        upstream_pools(config, {}, protocol_violation_hook(metrics, events), sweeper),
        open_log(config.decision_log, "decision log"),
        events,
        metrics,
        load_signer(config, str(credentials.own_id) if credentials.own_id else "spiffe-pep"),
        source,
        file_config,
        policy_source=policy_source,
        config_copy=config_copy,
        status_fd=status_fd,
        sweeper=sweeper,
    )
    rt.drift.activate(policy, starting=True)  # what was learned, before the first request
    return rt


def upstream_pools(
    config: Config,
    pools: dict[str, UpstreamPool],
    on_violation: ViolationHook | None,
    sweeper: Sweeper,
) -> dict[str, UpstreamPool]:
    """A pool per upstream of ``config``: those of ``pools`` whose upstream, timeouts and
    limit are unchanged are kept (with their idle connections), the others are new;
    ``sweeper`` checks their connections' deadlines."""
    limit = config.limits.max_idle_upstream_connections
    out = {}
    for name, up in config.upstreams.items():
        old = pools.get(name)
        if (
            old is not None
            and old.upstream == up
            and old.timeouts == config.timeouts
            and old.max_idle == limit
        ):
            out[name] = old
        else:
            out[name] = UpstreamPool(up, config.timeouts, limit, sweeper, on_violation)
    return out


def protocol_violation_hook(metrics: Metrics, events: JsonLines) -> ViolationHook:
    """What the upstream pools call when they close a connection whose upstream sent more
    than it was asked: one ``upstream_protocol_violation`` event, and a count."""

    def on_violation(upstream: str, kind: str, surplus: bytes) -> None:
        metrics.upstream_violations.labels(upstream=upstream, kind=kind).inc()
        events.event(PROTOCOL_VIOLATION, upstream=upstream, kind=kind, bytes=len(surplus))

    return on_violation


def load_signer(config: Config, issuer: str) -> AssertionSigner | None:
    """The assertion key: from ``assertion_key`` (PEM, EC P-256) or, when an upstream
    wants assertions and no key is configured, a fresh one for this process's life (its
    JWKS is served either way)."""
    if config.assertion_key is not None:
        path = config.assertion_key
        try:
            return AssertionSigner.from_pem(path.read_bytes(), issuer)
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the assertion key: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigError(str(path), str(exc)) from exc
    if any(u.assertion_header for u in config.upstreams.values()):
        return AssertionSigner.generate(issuer)
    return None
