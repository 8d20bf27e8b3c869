"""Live changes: the credential, policy and runtime-configuration reloaders, the file
watches that drive them, SIGHUP/SIGUSR1 handling and log reopening. Each reload is
validated whole and swapped atomically; a bad edit is logged and counted and the last
good state keeps serving."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy import filewatch
from proxy.audit_sink import JsonLines
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.loading import (
    _iso,
    config_bytes,
    protocol_violation_hook,
    publish,
    read_config,
    read_policy,
    upstream_pools,
)
from proxy.policy.model import Policy
from proxy.runtime import Runtime
from proxy.tls import Credentials, load_credentials


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
        self._failing = False  # the last reload failed: a file fixed back is then logged

    async def reload(self, trigger: str) -> bool:
        try:
            return await self._reload(trigger)
        except Exception as exc:  # a bug must not take the proxy down with a SIGHUP
            self._failing = True
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
            data = config_bytes(path)
            new = read_config(path, data)
        except ConfigError as exc:
            return self._failed(trigger, exc)
        if new == self.file:
            if not self._failing:
                return False
            # Fixed back to what serves: say so, or the log's last word is an error.
            self._failing = False
            rt.metrics.config_reloads.labels(result="ok").inc()
            rt.events.event(
                "config_reloaded",
                trigger=trigger,
                config=rt.config.source,
                changed=[],
                policy_sha256=rt.policy.sha256,
                unchanged=True,
            )
            return True
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
        if rt.config_copy is not None:
            try:
                publish(rt.config_copy, data)
            except OSError as exc:
                rt.events.event("config_copy_failed", path=str(rt.config_copy), error=str(exc))
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
        rt.pools = upstream_pools(
            config, old_pools, protocol_violation_hook(rt.metrics, rt.events), rt.sweeper
        )
        if staged.credentials is not None:
            rt.credentials = staged.credentials
            rt.metrics.set_credentials(staged.credentials)
        rt.policy = staged.policy
        rt.policy_loaded_at = dt.datetime.now(dt.UTC)
        rt.metrics.set_policy(staged.policy.sha256)
        rt.trust_changed()
        self._failing = False
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
        self._failing = True
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
    config: ConfigReloader,
    policy: PolicyReloader,
    credentials: CredentialReloader,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGUSR1 reopens the log files; SIGHUP reopens them too, and reloads the runtime
    configuration, the credentials and the policy. Started (``nursery.start``) once the
    handlers are in place: a worker ignores both signals until then."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGUSR1) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGUSR1:
                reopen_logs(policy.rt, "sigusr1")
                continue
            reopen_logs(policy.rt, "sighup")
            await config.reload("sighup")
            credentials.reload("sighup")
            policy.reload("sighup")
