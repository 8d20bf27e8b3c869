"""Command line: ``spiffe-pep run|dev|check|explain|test|reach``. Parses arguments and
maps errors to exit codes (0 ok, 1 a policy test failed, 2 bad configuration or policy);
no logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import trio

from proxy import __version__, canonical, check, cpus, devcerts, graphviz, identity_map, ui
from proxy.app import build_runtime, open_log, read_config, run_until_signalled
from proxy.audit_sink import JsonLines, python_output_as_events
from proxy.config import AUTO_WORKERS
from proxy.errors import ConfigError, SpiffeIdError
from proxy.loading import config_bytes, listen_error, publish
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
    # What was imported so far (the modules, their classes and constants: most of the
    # process's objects) is never garbage: out of the collector's sight, a full
    # collection while serving scans a fraction of the heap (a ~15 ms pause otherwise,
    # a latency tail under load).
    gc.freeze()
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


def _worker_config_candidates(path: Path, copy: Path | None) -> list[bytes | ConfigError]:
    """What a worker may start from, in order: the configuration file, then (when it
    differs) the copy of the last configuration a worker ran; an unreadable one as its
    ConfigError."""
    out: list[bytes | ConfigError] = []
    for source in (None, copy) if copy is not None else (None,):
        data: bytes | ConfigError
        try:
            data = config_bytes(path, source)
        except ConfigError as exc:
            data = exc
        if not out or data != out[0]:
            out.append(data)
    return out


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker under a supervisor: its port, no admin listener, the shared key, the
    policy its supervisor accepted. Everything it writes to stderr is a JSON event naming
    it (its index and pid), its start-up errors and Python's own output included.

    It starts from the configuration file; if it cannot (a bad edit the running workers
    refused), from the last configuration a worker ran (``--config-copy``), and it writes
    what it runs there: a worker restarted while the file is bad serves like the others,
    and one restarted after the file was fixed picks the fix up."""
    me = {"worker": args.worker_id, "pid": os.getpid()}
    stderr_events = events = JsonLines("stderr", fields=me)
    python_output_as_events(events)
    path = Path(args.config)
    copy = Path(args.config_copy) if args.config_copy else None
    candidates = _worker_config_candidates(path, copy)
    for i, data in enumerate(candidates):
        last = i == len(candidates) - 1
        events = stderr_events
        try:
            if isinstance(data, ConfigError):
                raise data
            started_from = data
            file_config = read_config(path, data)
            config = dataclasses.replace(
                file_config,
                listen_port=args.port,
                admin=None,
                workers=1,
                assertion_key=Path(args.assertion_key) if args.assertion_key else None,
            )
            if config.event_log != "stderr":  # the configured event log, naming this worker
                events = open_log(config.event_log, "event log", fields=me)
            rt = build_runtime(
                config,
                events,
                file_config=file_config,
                policy_source=Path(args.policy_copy) if args.policy_copy else None,
                config_copy=copy,
                status_fd=args.status_fd,
            )
        except ConfigError as exc:
            errors = [str(e) for e in getattr(exc, "errors", [exc])]
            if last:
                events.event(
                    "worker_start_failed", location=exc.location, error=exc.message, errors=errors
                )
                return EXIT_CONFIG
            stderr_events.event(
                "worker_config_refused",
                location=exc.location,
                error=exc.message,
                errors=errors,
                detail="starting from the last configuration a worker ran",
            )
            continue
        if copy is not None and i == 0 and len(candidates) > 1:  # the file, not the copy
            try:
                publish(copy, started_from)
            except OSError as exc:
                events.event("config_copy_failed", path=str(copy), error=str(exc))
        break
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


def cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        if check.is_policy(path):
            report = check.check_policy(path, args.config)
        else:
            report = check.check_config(path, files=not args.no_files)
    except ConfigError as exc:
        return _errors(exc)
    for line in report.errors:
        print(line, file=sys.stderr)
    if report.summary and not report.errors:
        print(report.summary)
    for line in report.skipped:
        print(f"skipped: {line}")
    return EXIT_CONFIG if report.errors else 0


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
    if args.log and args.format == "text":
        print(
            "spiffe-pep: --log draws traffic on the map: use --format svg or dot", file=sys.stderr
        )
        return EXIT_CONFIG
    try:
        policy = _load_policy_file(Path(args.policy), args.config)
    except ConfigError as exc:
        return _errors(exc)
    if args.format == "text":
        for line in tools.reach(policy):
            print(line)
        return 0
    records = ui.read_jsonl(args.log)
    try:
        graph = identity_map.build(policy, identity_map.traffic_of(records) if args.log else None)
    except OSError as exc:
        print(f"spiffe-pep: {exc.filename}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    if records.skipped:
        print(f"spiffe-pep: skipped {records.skipped} lines that are not JSON", file=sys.stderr)
    dot = identity_map.to_dot(graph)
    if args.format == "dot":
        sys.stdout.write(dot)
        return 0
    try:
        sys.stdout.write(graphviz.render_svg(dot))
    except graphviz.GraphvizError as exc:
        print(
            f"spiffe-pep: {exc}; --format dot prints the graph for dot elsewhere", file=sys.stderr
        )
        return EXIT_CONFIG
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """Dev certificates (made on first run), the demo upstream and the example policy."""
    from proxy import demo_upstream

    root = Path(args.root).resolve()
    certs = root / "certs_dev"
    if not (root / "config" / "dev.yaml").is_file():  # before writing anything there
        print(
            f"spiffe-pep dev: {root} is not a spiffe-pep checkout (no config/dev.yaml): run "
            "it in the checkout, or give it with --root",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if not devcerts.dev_set_present(certs):
        for path in devcerts.write_dev_set(certs):
            print(f"spiffe-pep dev: wrote {path.relative_to(root)}", file=sys.stderr)
    try:
        rt = build_runtime(read_config(root / "config" / "dev.yaml"))
    except ConfigError as exc:
        return _fail(exc)
    upstream = rt.config.upstreams["demo"]

    async def proxy(
        nursery: trio.Nursery,
        task_status: trio.TaskStatus[dict[str, object]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await run_until_signalled(rt, task_status=task_status)
        nursery.cancel_scope.cancel()  # the demo upstream too

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(demo_upstream.serve, upstream.host, upstream.port)
            except OSError as exc:
                raise listen_error(exc, "the demo upstream", upstream.host, upstream.port) from exc
            serving = await nursery.start(proxy, nursery)
            print(_dev_banner(certs, serving, upstream.url), file=sys.stderr, flush=True)

    return _serve(main)


def _dev_banner(certs: Path, serving: dict[str, object], upstream_url: str) -> str:
    """What ``dev`` says once it listens: where, and two curl commands to try, with the
    certificate paths as the user can type them from where they are."""
    port = cast(list[tuple[str, int]], serving["listen"])[0][1]
    url = f"https://localhost:{port}/hello"
    here = Path.cwd()
    shown = certs.relative_to(here) if certs.is_relative_to(here) else certs

    def curl(name: str) -> str:
        return (
            f"  curl --cacert {shown / 'bundle.pem'} --cert {shown / name}.pem "
            f"--key {shown / name}_key.pem {url}"
        )

    return (
        f"spiffe-pep dev: listening on https://localhost:{port} (demo upstream on "
        f"{upstream_url}). "
        f"Try:\n{curl('client')}\n{curl('denied')}"
    )


DESCRIPTION = (
    "An mTLS reverse proxy that enforces SPIFFE workload identity in front of services "
    "that cannot be changed."
)
HELP = "Show this help and exit."


def _command(
    sub: Any, name: str, text: str, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A subcommand whose one-line help is also its description (both whole sentences)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=text, description=text, add_help=False
    )
    parser.add_argument("-h", "--help", action="help", help=HELP)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The command line people use (the supervisor's ``_worker`` has its own parser)."""
    parser = argparse.ArgumentParser(prog="spiffe-pep", description=DESCRIPTION, add_help=False)
    parser.add_argument("-h", "--help", action="help", help=HELP)
    parser.add_argument(
        "--version",
        action="version",
        version=f"spiffe-pep {__version__}",
        help="Print the version and exit.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = _command(sub, "run", "Run the proxy with a runtime configuration.", cmd_run)
    run.add_argument("-c", "--config", required=True, help="The runtime configuration file (YAML).")
    run.add_argument(
        "--workers",
        help="How many worker processes share the port: N, or auto for one per CPU the "
        "process may use (its cgroup's CPU limit included). Overrides the configuration's "
        "'workers'.",
    )
    checking = _command(
        sub,
        "check",
        "Find what 'run' would refuse, without starting: every error, with file:line:column.",
        cmd_check,
    )
    checking.add_argument("file", help="A policy or a runtime configuration (YAML).")
    checking.add_argument(
        "--config",
        help="With a policy: the runtime configuration to check its upstream names against "
        "(default: those beside it that name it).",
    )
    checking.add_argument(
        "--no-files",
        action="store_true",
        help="With a runtime configuration: do not read the files it names (SVID, key, "
        "bundles, assertion key, log files), for a configuration checked away from where "
        "it runs.",
    )
    explain = _command(sub, "explain", "Show the decision for one request, and why.", cmd_explain)
    explain.add_argument("policy", help="The policy file.")
    explain.add_argument("--id", required=True, help="The caller's SPIFFE ID.")
    explain.add_argument("--method", default="GET", help="The request method (default: GET).")
    explain.add_argument("--host", default="", help="The Host header (default: none).")
    explain.add_argument(
        "--path",
        default="/",
        help="The request target as a client sends it: path and query, undecoded.",
    )
    explain.add_argument("--audience", help="Present a valid JWT-SVID for this audience.")
    explain.add_argument(
        "--sha256", help="The client certificate's SHA-256, for the revocation list."
    )
    explain.add_argument(
        "--config",
        help="The runtime configuration, for its upstream names and request rules.",
    )
    test = _command(sub, "test", "Run the test cases written in the policy file.", cmd_test)
    test.add_argument("policy", help="The policy file.")
    test.add_argument(
        "--config",
        help="The runtime configuration, for its upstream names and request rules.",
    )
    reach = _command(
        sub,
        "reach",
        "Show, per identity pattern, the routes every identity it matches may reach, and "
        "those only some of them may reach.",
        cmd_reach,
    )
    reach.add_argument("policy", help="The policy file.")
    reach.add_argument("--config", help="The runtime configuration, to check upstream names.")
    reach.add_argument(
        "--format",
        choices=("text", "svg", "dot"),
        default="text",
        help="The output: text (the default), svg (the identity map of the admin page, laid "
        "out by Graphviz's dot) or dot (the same graph as DOT text).",
    )
    reach.add_argument(
        "--log",
        action="append",
        default=[],
        metavar="LOG",
        help="A decision log (JSON lines): its requests draw the used and denied edges, "
        "and grants no request used are dashed. Give --log once per log.",
    )
    dev = _command(
        sub,
        "dev",
        "Run on the embedded dev setup: dev certificates, the demo upstream, the example policy.",
        cmd_dev,
    )
    dev.add_argument(
        "--root", default=".", help="The spiffe-pep checkout to run in (default: the current "
        "directory)."
    )  # fmt: skip
    # Governance over decision logs: inventory, unused, suggest, replay.
    from proxy.governance.commands import add_parsers as add_governance

    add_governance(sub, _command)
    return parser


def worker_parser() -> argparse.ArgumentParser:
    """``spiffe-pep _worker``: started by the supervisor, not by people, so not listed."""
    worker = argparse.ArgumentParser(prog="spiffe-pep _worker")
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--supervisor", type=int, required=True)
    worker.add_argument("--worker-id", type=int, default=0)
    worker.add_argument("--assertion-key")
    worker.add_argument("--policy-copy")
    worker.add_argument("--config-copy")
    worker.add_argument("--status-fd", type=int)
    worker.set_defaults(func=cmd_worker)
    return worker


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_worker"]:
        return int(cmd_worker(worker_parser().parse_args(args[1:])))
    parsed = build_parser().parse_args(args)
    return int(parsed.func(parsed))


if __name__ == "__main__":
    sys.exit(main())
