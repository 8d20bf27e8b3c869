"""``spiffe-pep check``: everything ``spiffe-pep run`` would refuse, found without
starting. A runtime configuration is checked with its policy and the files it names (the
SVID, key and bundles, the assertion key, the log files); a policy on its own with the
runtime configuration that names it (given, or found beside it), or with a note of the
checks that needed one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from proxy import canonical, tls, yamlsrc
from proxy.app import load_signer, read_config, read_policy
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy


@dataclass
class Report:
    """What ``check`` found: errors (each a line with its file, and line and column when
    there is one), the summary of a file that passed, and the checks it could not run."""

    errors: list[str] = field(default_factory=list)
    summary: str = ""
    skipped: list[str] = field(default_factory=list)


def is_policy(path: Path) -> bool:
    """A policy file has a top-level ``routes`` key; a runtime configuration has not."""
    try:
        doc, _ = yamlsrc.load(path.read_bytes(), str(path))
    except (OSError, ConfigError):
        return False
    return isinstance(doc, dict) and "routes" in doc


def _lines(exc: ConfigError) -> list[str]:
    return [str(e) for e in getattr(exc, "errors", [exc])]


def _add(report: Report, errors: list[str]) -> None:
    """Errors found against several configurations are reported once."""
    report.errors += [e for e in errors if e not in report.errors]


def refused_tests(policy: Policy, rules: canonical.Rules | None) -> list[str]:
    """Test cases expecting ``allow`` whose request the proxy refuses before the policy
    (canonicalised with the proxy's own function and, given a config, its rules)."""
    out = []
    for case in policy.tests:
        if case.expect != "allow":
            continue
        got = canonical.build(
            case.method.encode(), case.path.encode(), [(b"host", case.host.encode())],
            rules or canonical.Rules(),
        )  # fmt: skip
        if isinstance(got, canonical.Refusal):
            out.append(
                f"{case.location}: {case.method} {case.host} {case.path} expects allow, but the "
                f"proxy refuses it before the policy ({got.status} {got.reason})"
            )
    return out


def _log_file(config: Config, key: str, target: str) -> str | None:
    """Why the proxy could not open a log destination for appending, or None. Nothing is
    created: the file, or the directory it would be made in, must be writable."""
    if target in ("stdout", "stderr"):
        return None
    path = Path(target)
    where = f"{config.source}: {key} {target}"
    if path.is_dir():
        return f"{where}: is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{where}: the file is not writable"
    if not path.parent.is_dir():
        return f"{where}: the directory {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"{where}: the file cannot be created in {path.parent} (permission denied)"
    return None


def check_config(path: Path, files: bool = True) -> Report:
    """A runtime configuration, its policy and (unless ``files`` is off) every file it
    names. Raises ConfigError when the configuration itself cannot be read."""
    config = read_config(path)
    report = Report()
    try:
        policy: Policy | None = read_policy(config)
    except ConfigError as exc:
        report.errors += _lines(exc)
        policy = None
    if policy is not None:
        report.errors += refused_tests(policy, config.canonical_rules())
    if files:
        if config.tls.workload_api is not None:
            report.skipped.append(
                f"the SVID and its key: they come from the Workload API "
                f"({config.tls.workload_api}), which check does not contact"
            )
        report.errors += [str(e) for e in tls.check_files(config.tls)]
        if config.assertion_key is not None:
            try:
                load_signer(config, "spiffe-pep")
            except ConfigError as exc:
                report.errors.append(str(exc))
        for key, target in log_destinations(config):
            problem = _log_file(config, key, target)
            if problem:
                report.errors.append(problem)
        if policy is not None and policy.drift_configs and config.drift_store is not None:
            problem = _log_file(config, "drift_store", str(config.drift_store))
            if problem:
                report.errors.append(problem)
    else:
        report.skipped.append(
            "the files the configuration names (SVID, key, bundles, assertion key, log "
            "files): --no-files"
        )
    if policy is not None:
        report.summary = (
            f"ok: {path} and {config.policy_path} ({len(policy.routes)} routes, "
            f"policy sha256 {policy.sha256})"
        )
    return report


def log_destinations(config: Config) -> list[tuple[str, str]]:
    """The configuration's log destinations by key (``stdout``, ``stderr`` or a path)."""
    return [("decision_log", config.decision_log), ("event_log", config.event_log)]


def configs_beside(policy: Path) -> list[Config]:
    """The runtime configurations in the policy's directory whose ``policy`` is this file."""
    target = policy.resolve()
    out = []
    for candidate in sorted([*policy.parent.glob("*.yaml"), *policy.parent.glob("*.yml")]):
        if candidate.resolve() == target or is_policy(candidate):
            continue
        try:
            config = read_config(candidate)
        except ConfigError:
            continue  # not a runtime configuration (or a broken one: not this policy's)
        if config.policy_path.resolve() == target:
            out.append(config)
    return out


def check_policy(path: Path, config: str | None = None) -> Report:
    """A policy: its own rules, and against the runtime configuration ``config`` (or every
    one beside it that names it) the upstream names and the request rules of its tests."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the policy: {exc.strerror}") from exc
    configs = [read_config(Path(config))] if config else configs_beside(path)
    report = Report()
    if not configs:
        report.skipped.append(
            "upstream names and the configuration's request rules: no runtime "
            "configuration beside it names this policy (give one with --config)"
        )
        try:
            policy = load_policy(data, str(path))
        except ConfigError as exc:
            report.errors += _lines(exc)
            return report
        report.errors += refused_tests(policy, None)
        against = ""
    else:
        for cfg in configs:
            folded = {name for name, u in cfg.upstreams.items() if u.case_insensitive}
            try:
                policy = load_policy(data, str(path), set(cfg.upstreams), folded)
            except ConfigError as exc:
                _add(report, _lines(exc))
                continue
            _add(report, refused_tests(policy, cfg.canonical_rules()))
        against = " (upstreams checked against " + ", ".join(c.source for c in configs) + ")"
    if not report.errors:
        report.summary = (
            f"ok: {path}: {len(policy.routes)} routes, {len(policy.tests)} tests, "
            f"sha256 {policy.sha256}{against}"
        )
    return report
