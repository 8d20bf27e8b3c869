"""Command line: ``spiffe-pep run|dev|check|explain|test|reach``. Parses arguments and
maps errors to exit codes (0 ok, 1 a policy test failed, 2 bad configuration or policy);
no logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from proxy import __version__, canonical, cpus, devcerts, yamlsrc
from proxy.app import build_runtime, read_config, read_policy, run_until_signalled
from proxy.audit_sink import JsonLines, python_output_as_events
from proxy.config import AUTO_WORKERS
from proxy.errors import ConfigError, SpiffeIdError
from proxy.policy import tools
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from proxy.supervisor import Supervisor, make_workdir

EXIT_CONFIG = 2


def _fail(exc: ConfigError) -> int:
    print(f"spiffe-pep: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def _startup_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError a start-up failure inside the event loop is (an address in use),
    out of the exception groups trio's nurseries wrap it in; None for anything else."""
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(ConfigError)
        if match is not None and rest is None:
            return _startup_error(match.exceptions[0])
    return None


def _serve(fn: Callable[..., Awaitable[object]], *args: object) -> int:
    """``trio.run`` for a server: a ConfigError raised once the loop runs is one line
    and exit 2, like those raised before it."""
    try:
        result = trio.run(fn, *args)
    except (ConfigError, BaseExceptionGroup) as exc:
        error = _startup_error(exc)
        if error is None:
            raise
        return _fail(error)
    return result if isinstance(result, int) else 0


def _workers_option(value: str | None) -> int | None:
    """``--workers``: auto or a whole number of at least 1, as the configuration's key."""
    if value is None:
        return None
    if value == "auto":
        return AUTO_WORKERS
    if not value.isdigit() or int(value) < 1:
        raise ConfigError("--workers", f"expected auto or an integer >= 1, got {value!r}")
    return int(value)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        override = _workers_option(args.workers)
        config = read_config(Path(args.config))
        workers = config.workers if override is None else override
        if workers == AUTO_WORKERS:
            workers = cpus.available_cpus()
        if workers > 1:  # the supervisor validates everything, then starts the workers
            config = dataclasses.replace(config, workers=workers)
            workdir = make_workdir(workers)
            try:
                rt = build_runtime(config)
            except ConfigError:
                shutil.rmtree(workdir, ignore_errors=True)
                raise
            python_output_as_events(rt.events)  # from here on, stderr is JSON events only
            return _serve(Supervisor(rt, Path(args.config), workers, workdir).run)
        rt = build_runtime(config)
    except ConfigError as exc:
        return _fail(exc)
    python_output_as_events(rt.events)
    return _serve(run_until_signalled, rt)


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker under a supervisor: its port, no admin listener, the shared key, the
    policy its supervisor accepted. Everything it writes to stderr is a JSON event naming
    it (its index and pid), its start-up errors and Python's own output included."""
    events = JsonLines("stderr", fields={"worker": args.worker_id, "pid": os.getpid()})
    python_output_as_events(events)
    try:
        config = dataclasses.replace(
            read_config(Path(args.config)),
            listen_port=args.port,
            admin=None,
            workers=1,
            assertion_key=Path(args.assertion_key) if args.assertion_key else None,
        )
        rt = build_runtime(
            config,
            events,
            policy_source=Path(args.policy_copy) if args.policy_copy else None,
            status_fd=args.status_fd,
        )
    except ConfigError as exc:
        errors = [str(e) for e in getattr(exc, "errors", [exc])]
        events.event("worker_start_failed", location=exc.location, error=exc.message, errors=errors)
        return EXIT_CONFIG
    try:
        trio.run(functools.partial(run_until_signalled, rt, worker_of=args.supervisor))
    except (ConfigError, BaseExceptionGroup) as exc:
        error = _startup_error(exc)
        if error is None:
            raise
        events.event("worker_start_failed", location=error.location, error=error.message)
        return EXIT_CONFIG
    return 0


def _errors(exc: ConfigError) -> int:
    for err in getattr(exc, "errors", [exc]):
        print(f"{err}", file=sys.stderr)
    return EXIT_CONFIG


def _is_policy(path: Path) -> bool:
    """A policy file has a top-level ``routes`` key; a runtime configuration has not."""
    try:
        doc, _ = yamlsrc.load(path.read_bytes(), str(path))
    except (OSError, ConfigError):
        return False
    return isinstance(doc, dict) and "routes" in doc


def _load_policy_file(path: Path, config: str | None) -> Policy:
    """A policy from its own file (upstream names checked against ``config`` if given)."""
    return _load_with_rules(path, config)[0]


def _load_with_rules(
    path: Path, config: str | None
) -> tuple[Policy, canonical.Rules | None, dict[str, canonical.UpstreamRules] | None]:
    """The policy, and the configuration's request rules when ``config`` is given (so
    ``explain`` and ``test`` canonicalise requests exactly as the proxy will)."""
    cfg = read_config(Path(config)) if config else None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the policy: {exc.strerror}") from exc
    if cfg is None:
        return load_policy(data, str(path)), None, None
    folded = {name for name, u in cfg.upstreams.items() if u.case_insensitive}
    policy = load_policy(data, str(path), set(cfg.upstreams), folded)
    return policy, cfg.canonical_rules(), cfg.upstream_rules()


def _refused_tests(policy: Policy, rules: canonical.Rules | None) -> list[str]:
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


def cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        if _is_policy(path):
            policy, rules, _ = _load_with_rules(path, args.config)
            refused = _refused_tests(policy, rules)
            for line in refused:
                print(line, file=sys.stderr)
            if refused:
                return EXIT_CONFIG
            print(
                f"ok: {path}: {len(policy.routes)} routes, {len(policy.tests)} tests, "
                f"sha256 {policy.sha256}"
            )
        else:
            config = read_config(path)
            policy = read_policy(config)
            refused = _refused_tests(policy, config.canonical_rules())
            for line in refused:
                print(line, file=sys.stderr)
            if refused:
                return EXIT_CONFIG
            print(
                f"ok: {path} and {config.policy_path} ({len(policy.routes)} routes, "
                f"policy sha256 {policy.sha256})"
            )
    except ConfigError as exc:
        return _errors(exc)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        policy, rules, upstreams = _load_with_rules(Path(args.policy), args.config)
        decision = tools.decide(
            policy,
            args.id,
            args.method,
            args.host,
            args.path,
            args.audience,
            fingerprint=args.sha256 or "",
            rules=rules,
            upstreams=upstreams,
        )
    except ConfigError as exc:
        return _errors(exc)
    except SpiffeIdError as exc:
        print(f"spiffe-pep: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(tools.explain(policy, decision))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    try:
        policy, rules, upstreams = _load_with_rules(Path(args.policy), args.config)
    except ConfigError as exc:
        return _errors(exc)
    if not policy.tests:
        print(
            f"{args.policy}: no test cases (add a 'tests:' list beside 'routes:')", file=sys.stderr
        )
        return 1
    results = tools.run_tests(policy, rules, upstreams)
    for result in results:
        print(result.line())
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_reach(args: argparse.Namespace) -> int:
    try:
        policy = _load_policy_file(Path(args.policy), args.config)
    except ConfigError as exc:
        return _errors(exc)
    for line in tools.reach(policy):
        print(line)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """Dev certificates (made on first run), the demo upstream and the example policy."""
    from proxy import demo_upstream

    root = Path(args.root).resolve()
    certs = root / "certs_dev"
    if not devcerts.dev_set_present(certs):
        for path in devcerts.write_dev_set(certs):
            print(f"spiffe-pep dev: wrote {path.relative_to(root)}", file=sys.stderr)
    try:
        rt = build_runtime(read_config(root / "config" / "dev.yaml"))
    except ConfigError as exc:
        return _fail(exc)
    upstream = rt.config.upstreams["demo"]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(demo_upstream.serve, upstream.host, upstream.port)
            await run_until_signalled(rt)
            nursery.cancel_scope.cancel()

    print(
        "spiffe-pep dev: listening on https://localhost:8443 (demo upstream on "
        f"{upstream.url}). Try:\n"
        "  curl --cacert certs_dev/bundle.pem --cert certs_dev/client.pem "
        "--key certs_dev/client_key.pem https://localhost:8443/hello\n"
        "  curl --cacert certs_dev/bundle.pem --cert certs_dev/denied.pem "
        "--key certs_dev/denied_key.pem https://localhost:8443/hello",
        file=sys.stderr,
        flush=True,
    )
    return _serve(main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spiffe-pep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"spiffe-pep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy with a configuration file")
    run.add_argument("-c", "--config", required=True, help="the runtime configuration (YAML)")
    run.add_argument(
        "--workers",
        help="worker processes sharing the port (N or auto: one per CPU the process may "
        "use, its cgroup's CPU limit included); overrides the configuration's 'workers'",
    )
    run.set_defaults(func=cmd_run)
    worker = sub.add_parser("_worker")  # started by the supervisor, not by people
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--supervisor", type=int, required=True)
    worker.add_argument("--worker-id", type=int, default=0)
    worker.add_argument("--assertion-key")
    worker.add_argument("--policy-copy")
    worker.add_argument("--status-fd", type=int)
    worker.set_defaults(func=cmd_worker)
    check = sub.add_parser(
        "check",
        help="validate a policy, or a runtime configuration and its policy; print "
        "every error with file:line:column",
    )
    check.add_argument("file", help="a policy or a runtime configuration (YAML)")
    check.add_argument("--config", help="with a policy: also check its upstream names")
    check.set_defaults(func=cmd_check)
    explain = sub.add_parser("explain", help="the decision for one request, and why")
    explain.add_argument("policy", help="the policy file")
    explain.add_argument("--id", required=True, help="the caller's SPIFFE ID")
    explain.add_argument("--method", default="GET")
    explain.add_argument("--host", default="")
    explain.add_argument(
        "--path", default="/", help="the request target as sent (path and query, undecoded)"
    )
    explain.add_argument("--audience", help="present a valid JWT-SVID for this audience")
    explain.add_argument("--sha256", help="the client certificate's SHA-256 (revocation)")
    explain.add_argument("--config", help="the runtime configuration, to check upstreams")
    explain.set_defaults(func=cmd_explain)
    test = sub.add_parser("test", help="run the test cases written in the policy file")
    test.add_argument("policy")
    test.add_argument("--config", help="the runtime configuration, to check upstreams")
    test.set_defaults(func=cmd_test)
    reach = sub.add_parser("reach", help="every route each identity pattern can reach")
    reach.add_argument("policy")
    reach.add_argument("--config", help="the runtime configuration, to check upstreams")
    reach.set_defaults(func=cmd_reach)
    dev = sub.add_parser("dev", help="run on the embedded dev setup (certs, demo upstream)")
    dev.add_argument("--root", default=".", help="the project checkout (default: .)")
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
