"""Wiring: load everything, listen, serve connections, reload the policy on change or
SIGHUP, reopen the log files on SIGUSR1 or SIGHUP, serve the admin endpoints, stop
cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from proxy import __version__, admin, filewatch, ui
from proxy.assertion import AssertionSigner
from proxy.audit_sink import JsonLines
from proxy.config import Config, TlsFiles, load_config
from proxy.errors import ConfigError
from proxy.forward import PROTOCOL_VIOLATION, UpstreamPool, ViolationHook
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from proxy.runtime import Runtime
from proxy.server import handle_connection
from proxy.tls import Credentials, load_credentials


def read_config(path: Path) -> Config:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the configuration: {exc.strerror}") from exc
    return load_config(data, str(path), path.parent)


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
    status_fd: int | None = None,
) -> Runtime:
    """Read every file the proxy needs; raise ConfigError naming the first bad one.
    ``file_config``: the configuration as its file says, when ``config`` overrides some
    of it (a worker's); ``policy_source`` and ``status_fd``: a worker's (see ``Runtime``)."""
    events = events or open_log(config.event_log, "event log")
    credentials, source = load_tls(config, events)
    policy = read_policy(config, source=policy_source)
    metrics = Metrics()
    metrics.set_policy(policy.sha256)
    metrics.set_credentials(credentials)
    rt = Runtime(
        config,
        credentials,
        policy,
        upstream_pools(config, {}, protocol_violation_hook(metrics, events)),
        open_log(config.decision_log, "decision log"),
        events,
        metrics,
        load_signer(config, str(credentials.own_id) if credentials.own_id else "spiffe-pep"),
        source,
        file_config,
        policy_source=policy_source,
        status_fd=status_fd,
    )
    rt.drift.activate(policy, starting=True)  # what was learned, before the first request
    return rt


def upstream_pools(
    config: Config, pools: dict[str, UpstreamPool], on_violation: ViolationHook | None
) -> dict[str, UpstreamPool]:
    """A pool per upstream of ``config``: those of ``pools`` whose upstream, timeouts and
    limit are unchanged are kept (with their idle connections), the others are new."""
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
            out[name] = UpstreamPool(up, config.timeouts, limit, on_violation)
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


def _polling(rt: Runtime, files: str, reason: str) -> None:
    rt.events.event("file_watch_polling", files=files, reason=reason)


class CredentialReloader:
    """Swaps in new SVID, key and bundles when their files change or on SIGHUP. New
    handshakes use the new ones; established connections keep theirs. A half-written or
    mismatched set is rejected, logged and counted, and the old credentials keep serving.

    ``quiet``: no events (a supervisor follows the credentials only for its own /status
    and /readyz; each worker logs its own reloads)."""

    def __init__(self, rt: Runtime, *, quiet: bool = False) -> None:
        self.rt = rt
        self.quiet = quiet

    def reload(self, trigger: str) -> bool:
        rt = self.rt
        try:
            if rt.x509_source is not None:
                creds = rt.x509_source.credentials()
            else:
                creds = load_credentials(rt.config.tls)
        except ConfigError as exc:
            rt.metrics.credential_reloads.labels(result="failed").inc()
            if self.quiet:
                return False
            rt.events.event(
                "credentials_reload_failed",
                trigger=trigger,
                location=exc.location,
                error=exc.message,
                kept_not_after=_iso(rt.credentials.own_not_after),
            )
            return False
        old = rt.credentials
        rt.credentials = creds
        rt.trust_changed()
        rt.metrics.credential_reloads.labels(result="ok").inc()
        rt.metrics.set_credentials(creds)
        if self.quiet:
            return True
        rt.events.event(
            "credentials_reloaded",
            trigger=trigger,
            spiffe_id=str(creds.own_id) if creds.own_id else None,
            old_not_after=_iso(old.own_not_after),
            not_after=_iso(creds.own_not_after),
            trust_domains=sorted(str(td) for td in creds.trust.bundles),
        )
        return True


class PolicyReloader:
    """Swaps in a new policy when its file changes or on SIGHUP, atomically: a request
    reads ``rt.policy`` once and keeps that policy to its end. A bad edit is rejected,
    logged with file:line:column and counted; the last good policy keeps serving.

    The file watch (``filewatch.watch``: kernel notifications, else polling) reloads
    once the file has held still for ``policy_watch``, so an editor's half-written save
    is not even tried; one that still fails to parse is rejected and tried again on the
    next change.

    Under a supervisor the supervisor alone reads the policy file, validates each edit and
    logs and counts it once; ``on_accept`` (its hook) gets every accepted file's bytes and
    hands them to the workers (a copy each worker reads, ``rt.policy_source``), so a
    worker never sees a bad edit, and one restarted after it serves the last good
    policy. A worker's reloads are logged (they name the worker) but not counted.
    """

    def __init__(self, rt: Runtime, on_accept: Callable[[bytes], object] | None = None) -> None:
        self.rt = rt
        self.on_accept = on_accept
        self._rejected: str | None = None
        self._failing = False  # the last reload failed: a fixed file is then logged

    def reload(self, trigger: str) -> bool:
        rt = self.rt
        path = rt.config.policy_path
        try:
            data = (rt.policy_source or path).read_bytes()
        except OSError as exc:
            return self._failed(trigger, str(path), f"cannot read the policy: {exc.strerror}")
        sha = hashlib.sha256(data).hexdigest()
        if sha == rt.policy.sha256:
            if self._failing:  # fixed back to what serves: say so, or the last word is an error
                self._failing, self._rejected = False, None
                rt.metrics.policy_reloads.labels(result="ok").inc()
                rt.events.event(
                    "policy_reloaded",
                    trigger=trigger,
                    policy=str(path),
                    old_sha256=sha,
                    policy_sha256=sha,
                    routes=len(rt.policy.routes),
                    unchanged=True,
                )
                return True
            return False
        if trigger == "watch" and sha == self._rejected:
            return False
        try:
            policy = read_policy(rt.config, data)
        except ConfigError as exc:
            self._rejected = sha
            errors = [str(e) for e in getattr(exc, "errors", [exc])]
            return self._failed(trigger, exc.location, exc.message, sha256=sha, errors=errors)
        if self.on_accept is not None:
            try:
                self.on_accept(data)
            except OSError as exc:  # the supervisor's directory: full, or gone
                return self._failed(
                    trigger,
                    str(path),
                    f"cannot hand the policy to the workers: {exc.strerror}",
                    sha256=sha,
                )
        old = rt.policy
        rt.policy = policy
        rt.trust_changed()
        rt.policy_loaded_at = dt.datetime.now(dt.UTC)
        self._rejected, self._failing = None, False
        if rt.policy_source is None:  # a worker's reloads are its supervisor's to count
            rt.metrics.policy_reloads.labels(result="ok").inc()
        rt.metrics.set_policy(policy.sha256)
        rt.events.event(
            "policy_reloaded",
            trigger=trigger,
            policy=str(path),
            old_sha256=old.sha256,
            policy_sha256=policy.sha256,
            routes=len(policy.routes),
        )
        rt.report()
        return True

    def _failed(self, trigger: str, location: str, message: str, **fields: object) -> bool:
        self._failing = True
        if self.rt.policy_source is None:
            self.rt.metrics.policy_reloads.labels(result="failed").inc()
        self.rt.events.event(
            "policy_reload_failed",
            trigger=trigger,
            location=location,
            error=message,
            kept_sha256=self.rt.policy.sha256,
            **fields,
        )
        return False

    async def watch(self, quiet: float) -> None:
        await filewatch.watch(
            lambda: [self.rt.config.policy_path],
            quiet,
            lambda: self.reload("watch"),
            functools.partial(_polling, self.rt, "policy"),
        )

    async def follow_supervisor(self) -> None:
        """A worker: reload as soon as the supervisor replaced its copy of the policy (it
        renames a complete file into place, so hardly any waiting for a writer): kernel
        notifications, so a revocation reaches every worker within milliseconds."""
        source = self.rt.policy_source
        assert source is not None
        await filewatch.watch(
            lambda: [source],
            0.005,
            lambda: self.reload("supervisor"),
            functools.partial(_polling, self.rt, "policy copy"),
        )


def follow_credentials(nursery: trio.Nursery, rt: Runtime, reloader: CredentialReloader) -> None:
    """Reload the credentials when their files change (``tls.watch``) or the Workload
    API sends an update."""
    if rt.config.tls.watch:
        nursery.start_soon(
            filewatch.watch,
            lambda: rt.config.tls.files,  # a configuration reload may name other files
            rt.config.tls.watch,
            lambda: reloader.reload("watch"),
            functools.partial(_polling, rt, "tls"),
        )
    if rt.x509_source is not None:
        rt.x509_source.follow(lambda: reloader.reload("workload_api"))


# What a running process cannot change (its sockets, processes and start-up choices): an
# edit of these is logged as needing a restart, and the rest of the edit applies.
_RESTART_ONLY: dict[str, Callable[[Config], object]] = {
    "listen": lambda c: (c.listen_host, c.listen_port),
    "workers": lambda c: c.workers,
    "admin": lambda c: c.admin,
    "admin_hosts": lambda c: c.admin_hosts,
    "assertion_key": lambda c: c.assertion_key,
    "policy_watch": lambda c: c.policy_watch,
    "tls.watch": lambda c: c.tls.watch,
    "tls.workload_api": lambda c: (c.tls.workload_api, c.tls.wait_for_svid),
    "drift_store": lambda c: c.drift_store,
}


def _live_part(new: Config, running: Config) -> Config:
    """``new``, but with what needs a restart as it runs (with the Workload API, the
    whole ``tls`` section: the agent's stream was opened with it)."""
    if running.tls.workload_api is not None or new.tls.workload_api is not None:
        tls = running.tls
    else:
        tls = dataclasses.replace(new.tls, watch=running.tls.watch)
    return dataclasses.replace(
        new,
        listen_host=running.listen_host,
        listen_port=running.listen_port,
        workers=running.workers,
        admin=running.admin,
        admin_hosts=running.admin_hosts,
        assertion_key=running.assertion_key,
        policy_watch=running.policy_watch,
        tls=tls,
        drift_store=running.drift_store,
    )


def _open_log(config: Config, key: str, target: str) -> JsonLines:
    try:
        return JsonLines(target)
    except OSError as exc:
        raise ConfigError(config.source, f"{key} {target}: cannot open: {exc.strerror}") from exc


@dataclass
class _Staged:
    """Everything a new configuration needs, built before anything is swapped."""

    policy: Policy
    credentials: Credentials | None = None
    decisions: JsonLines | None = None
    events: JsonLines | None = None

    @classmethod
    def build(cls, rt: Runtime, config: Config) -> _Staged:
        """Raise ConfigError (naming the file, line and column) if ``config`` cannot serve."""
        policy = read_policy(config)  # upstream names, case folding: checked against it
        if rt.signer is None:
            for name, up in config.upstreams.items():
                if up.assertion_header:
                    raise ConfigError(
                        config.source,
                        f"upstream {name!r} asks for signed assertions: the signing key is "
                        "made at start, so this needs a restart",
                    )
        staged = cls(policy)
        if config.tls != rt.config.tls:
            staged.credentials = load_credentials(config.tls)
        try:
            if config.decision_log != rt.config.decision_log:
                staged.decisions = _open_log(config, "decision_log", config.decision_log)
            if config.event_log != rt.config.event_log:
                staged.events = _open_log(config, "event_log", config.event_log)
        except ConfigError:
            if staged.decisions is not None:
                staged.decisions.close()
            raise
        return staged


class ConfigReloader:
    """Re-reads the runtime configuration on SIGHUP. What can change live changes:
    upstreams (their pools are rebuilt; unchanged ones keep their idle connections),
    identity headers, timeouts, limits, the ``http`` rules, ``proxy_protocol``, the log
    files, the policy and TLS file paths; the policy is compiled again against the new
    upstreams. What cannot (``_RESTART_ONLY``: listen address, workers, ...) is logged as
    needing a restart. A bad edit is rejected, logged with file:line:column and counted;
    the last good configuration keeps serving."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.file = rt.file_config or rt.config  # what the file said when last applied

    async def reload(self, trigger: str) -> bool:
        try:
            return await self._reload(trigger)
        except Exception as exc:  # a bug must not take the proxy down with a SIGHUP
            self.rt.metrics.config_reloads.labels(result="failed").inc()
            self.rt.events.event(
                "config_reload_failed",
                trigger=trigger,
                error=repr(exc),
                traceback=traceback.format_exc(),
                kept=self.rt.config.source,
            )
            return False

    async def _reload(self, trigger: str) -> bool:
        rt = self.rt
        path = Path(rt.config.source)
        try:
            new = read_config(path)
        except ConfigError as exc:
            return self._failed(trigger, exc)
        if new == self.file:
            return False
        restart = [name for name, get in _RESTART_ONLY.items() if get(new) != get(self.file)]
        if new.tls != self.file.tls and rt.config.tls.workload_api is not None:
            restart.append("tls")
        old = rt.config
        live = _live_part(new, old)
        changed = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name != "source" and getattr(live, f.name) != getattr(old, f.name)
        ]
        try:
            staged = _Staged.build(rt, live)
        except ConfigError as exc:
            return self._failed(trigger, exc)
        self.file = new
        if restart:
            rt.events.event(
                "config_restart_required",
                trigger=trigger,
                config=str(path),
                settings=restart,
                detail="these settings take effect when the proxy is restarted",
            )
        await self._apply(trigger, live, staged, changed)
        return True

    async def _apply(
        self, trigger: str, config: Config, staged: _Staged, changed: list[str]
    ) -> None:
        rt = self.rt
        old_pools, old_policy = rt.pools, rt.policy
        old_sinks = []
        if staged.decisions is not None:
            old_sinks.append(rt.decisions)
            rt.decisions = staged.decisions
        if staged.events is not None:
            old_sinks.append(rt.events)
            rt.events = staged.events
            rt.events.tap = rt.recent.event
        rt.set_config(config)
        rt.pools = upstream_pools(config, old_pools, protocol_violation_hook(rt.metrics, rt.events))
        if staged.credentials is not None:
            rt.credentials = staged.credentials
            rt.metrics.set_credentials(staged.credentials)
        rt.policy = staged.policy
        rt.policy_loaded_at = dt.datetime.now(dt.UTC)
        rt.metrics.set_policy(staged.policy.sha256)
        rt.trust_changed()
        rt.metrics.config_reloads.labels(result="ok").inc()
        rt.events.event(
            "config_reloaded",
            trigger=trigger,
            config=config.source,
            changed=changed,
            policy_sha256=staged.policy.sha256,
        )
        if staged.policy.sha256 != old_policy.sha256:  # ``policy:`` names another file
            rt.metrics.policy_reloads.labels(result="ok").inc()
            rt.events.event(
                "policy_reloaded",
                trigger="config",
                policy=str(config.policy_path),
                old_sha256=old_policy.sha256,
                policy_sha256=staged.policy.sha256,
                routes=len(staged.policy.routes),
            )
        for sink in old_sinks:
            sink.close()
        kept = set(map(id, rt.pools.values()))
        for pool in old_pools.values():
            if id(pool) not in kept:
                with trio.CancelScope(shield=True):
                    await pool.aclose()

    def _failed(self, trigger: str, exc: ConfigError) -> bool:
        rt = self.rt
        rt.metrics.config_reloads.labels(result="failed").inc()
        rt.events.event(
            "config_reload_failed",
            trigger=trigger,
            location=exc.location,
            error=exc.message,
            errors=[str(e) for e in getattr(exc, "errors", [exc])],
            kept=rt.config.source,
        )
        return False


def reopen_logs(rt: Runtime, trigger: str) -> None:
    """Open the decision and event log files again by their paths, so lines go to the
    new file once logrotate (in its default ``create`` mode) renamed the old one. A file
    that cannot be opened is logged and the old one kept."""
    reopened = []
    for key, sink in (("decision_log", rt.decisions), ("event_log", rt.events)):
        if not sink.is_file:
            continue
        try:
            sink.reopen()
        except OSError as exc:
            rt.events.event(
                "log_reopen_failed", trigger=trigger, log=key, path=sink.target, error=exc.strerror
            )
            continue
        reopened.append(sink.target)
    if reopened:
        rt.events.event("logs_reopened", trigger=trigger, files=reopened)


async def on_signals(
    config: ConfigReloader, policy: PolicyReloader, credentials: CredentialReloader
) -> None:
    """SIGUSR1 reopens the log files; SIGHUP reopens them too, and reloads the runtime
    configuration, the credentials and the policy."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR1) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                reopen_logs(policy.rt, "sigusr1")
                continue
            reopen_logs(policy.rt, "sighup")
            await config.reload("sighup")
            credentials.reload("sighup")
            policy.reload("sighup")


async def _connection(rt: Runtime, stream: trio.SocketStream) -> None:
    # Over the limit, refuse before any TLS work: the cheapest possible "no".
    if rt.open_connections >= rt.config.limits.max_connections:
        rt.metrics.connections_refused.inc()
        await stream.aclose()
        return
    rt.open_connections += 1
    try:
        await handle_connection(rt, stream)
    except Exception as exc:  # one bad connection never takes the others down
        rt.events.event("connection_error", error=f"{type(exc).__name__}: {exc}")
    finally:
        rt.open_connections -= 1


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def admin_routes(rt: Runtime) -> dict[bytes, admin.Route]:
    def metrics() -> tuple[int, bytes, bytes]:
        return 200, CONTENT_TYPE.encode(), rt.metrics.exposition()

    def healthz() -> tuple[int, object]:
        return 200, {"status": "ok"}

    def readyz() -> tuple[int, object]:
        """Ready: own SVID loaded and unexpired, a policy loaded, not draining."""
        now = dt.datetime.now(dt.UTC)
        problems = []
        if rt.credentials.own_not_after <= now:
            problems.append("the proxy's SVID has expired")
        if rt.draining or rt.drain_requested.is_set():
            problems.append("draining")
        if problems:
            return 503, {"status": "not ready", "problems": problems}
        return 200, {"status": "ready"}

    def status() -> tuple[int, object]:
        creds, cfg = rt.credentials, rt.config
        return 200, {
            "version": __version__,
            "pid": os.getpid(),
            "spiffe_id": str(creds.own_id) if creds.own_id else None,
            "svid": {"not_after": _iso(creds.own_not_after), "loaded_at": _iso(creds.loaded_at)},
            "bundles": {
                str(td): {
                    "x509_authorities": len(b.x509_authorities),
                    "jwt_authorities": len(creds.jwt_authorities.get(td, {})),
                    "earliest_not_after": _iso(
                        min(c.not_valid_after_utc for c in b.x509_authorities)
                    )
                    if b.x509_authorities
                    else None,
                    "sequence": b.sequence,
                }
                for td, b in creds.trust.bundles.items()
            },
            "policy": {
                "file": str(cfg.policy_path),
                "sha256": rt.policy.sha256,
                "routes": len(rt.policy.routes),
                "loaded_at": _iso(rt.policy_loaded_at),
            },
            "open_connections": rt.open_connections,
            "draining": rt.draining,
        }

    routes: dict[bytes, admin.Route] = {
        b"/metrics": metrics,
        b"/healthz": admin.json_handler(healthz),
        b"/readyz": admin.json_handler(readyz),
        b"/status": admin.json_handler(status),
        b"/ui": ui.local_page(rt),
    }
    signer = rt.signer
    if signer is not None:
        routes[b"/.well-known/jwks.json"] = admin.json_handler(lambda: (200, signer.jwks()))
    return routes


async def start_admin(
    nursery: trio.Nursery,
    address: tuple[str, int],
    cfg: Config,
    routes: dict[bytes, admin.Route],
) -> int:
    """The admin listener in ``nursery``; its port. The Host names it answers to:
    loopback, the address it is reached on, and the configuration's admin_hosts."""
    try:
        port: int = await nursery.start(
            functools.partial(
                admin.serve_admin, allowed_hosts=admin.LOOPBACK_HOSTS | set(cfg.admin_hosts)
            ),
            *address,
            routes,
        )
    except OSError as exc:
        raise listen_error(exc, "admin", *address) from exc
    return port


async def open_listeners(host: str, port: int, reuse_port: bool) -> list[trio.SocketListener]:
    """TCP listeners; with ``reuse_port`` one SO_REUSEPORT socket, so several worker
    processes can each listen on the same port and the kernel spreads connections."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


async def serve(
    rt: Runtime,
    *,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[dict[str, object]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and serve until cancelled, or until ``rt.drain_requested`` is set: then shut
    down the way a load balancer needs (Envoy's drain sequence). For
    ``timeouts.shutdown_grace`` it goes on accepting while ``/readyz`` answers 503
    ``draining`` and every response carries ``Connection: close``, so the balancer takes
    the endpoint out before it stops answering; then it stops accepting, lets requests in
    flight finish (idle keep-alive connections close at once) for at most
    ``timeouts.drain``, and returns. The admin listener and the reloaders live until the
    end. ``task_status`` gets ``{"listen": [(host, port)], "admin": port or None,
    "reloader": PolicyReloader, "credentials": CredentialReloader, "config":
    ConfigReloader}``."""
    cfg = rt.config
    try:
        listeners = await open_listeners(cfg.listen_host, cfg.listen_port, reuse_port)
    except OSError as exc:
        raise listen_error(exc, "listen", cfg.listen_host, cfg.listen_port) from exc
    bound = [tuple(lst.socket.getsockname()[:2]) for lst in listeners]
    reloader = PolicyReloader(rt)
    config_reloader = ConfigReloader(rt)
    creds_reloader = CredentialReloader(rt)
    try:
        async with trio.open_nursery() as services:
            admin_port = None
            if cfg.admin is not None:
                admin_port = await start_admin(services, cfg.admin, cfg, admin_routes(rt))
            rt.events.event(
                "listening",
                version=__version__,
                addresses=[f"{h}:{p}" for h, p in bound],
                admin=f"{cfg.admin[0]}:{admin_port}" if cfg.admin else None,
                spiffe_id=str(rt.credentials.own_id) if rt.credentials.own_id else None,
                policy=str(cfg.policy_path),
                policy_sha256=rt.policy.sha256,
                trust_domains=sorted(str(td) for td in rt.credentials.trust.bundles),
            )
            if rt.policy_source is not None:  # a worker: its supervisor watches the file
                services.start_soon(reloader.follow_supervisor)
            elif cfg.policy_watch:
                services.start_soon(reloader.watch, cfg.policy_watch)
            follow_credentials(services, rt, creds_reloader)
            services.start_soon(rt.drift.run, lambda: rt.changed, lambda: rt.policy)
            services.start_soon(on_signals, config_reloader, reloader, creds_reloader)

            async def handler(stream: trio.SocketStream) -> None:
                await _connection(rt, stream)

            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        functools.partial(
                            trio.serve_listeners, handler, listeners, handler_nursery=connections
                        )
                    )
                    task_status.started(
                        {
                            "listen": bound,
                            "admin": admin_port,
                            "reloader": reloader,
                            "credentials": creds_reloader,
                            "config": config_reloader,
                        }
                    )
                    rt.report(serving=True)
                    await rt.drain_requested.wait()
                    grace = cfg.timeouts.shutdown_grace
                    if grace > 0:
                        rt.events.event(
                            "shutdown_grace", accepting_for_s=grace, connections=rt.open_connections
                        )
                        await trio.sleep(grace)
                    accepting.cancel_scope.cancel()  # stop accepting: the listeners close
                rt.draining = True
                for scope in list(rt.idle_scopes):
                    scope.cancel()
                rt.events.event(
                    "draining", connections=rt.open_connections, deadline_s=cfg.timeouts.drain
                )
                connections.cancel_scope.deadline = trio.current_time() + cfg.timeouts.drain
            rt.events.event("drained", cut_connections=rt.open_connections)
            services.cancel_scope.cancel()
    finally:
        rt.drift.flush()  # what was learned and not yet written
        rt.drift.close()
        for pool in rt.pools.values():
            with trio.CancelScope(shield=True):
                await pool.aclose()
        if rt.x509_source is not None:
            rt.x509_source.close()


async def _exit_with_parent(rt: Runtime, parent: int) -> None:
    """A worker whose supervisor died drains and exits instead of living on orphaned."""
    while os.getppid() == parent:
        await trio.sleep(1)
    rt.events.event("supervisor_gone", parent=parent)
    rt.drain_requested.set()


async def run_until_signalled(rt: Runtime, *, worker_of: int | None = None) -> None:
    """Serve; the first SIGTERM/SIGINT drains gracefully, a second one stops at once.
    ``worker_of``: the supervisor's pid (worker mode: SO_REUSEPORT, exit with it)."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def run() -> None:
                await serve(rt, reuse_port=worker_of is not None)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            if worker_of is not None:
                nursery.start_soon(_exit_with_parent, rt, worker_of)
            async for signum in signals:
                name = signal.Signals(signum).name
                if rt.drain_requested.is_set():
                    rt.events.event("stopping", signal=name, graceful=False)
                    nursery.cancel_scope.cancel()
                    break
                rt.events.event(
                    "stopping",
                    signal=name,
                    graceful=True,
                    shutdown_grace_s=rt.config.timeouts.shutdown_grace,
                )
                rt.drain_requested.set()
