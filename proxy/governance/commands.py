"""The ``spiffe-pep inventory|unused|suggest|replay`` subcommands: arguments, files and
exit statuses (0 fine; ``unused`` 1 when it found something; ``replay`` 1 when something
allowed would be denied; 2 for a file or policy that cannot be read). No logic of their
own: ``engine`` reads, the pure modules decide, ``report`` formats."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.canonical import UpstreamRules
from proxy.errors import ConfigError
from proxy.governance import records as R
from proxy.governance import report
from proxy.governance.inventory import inventory
from proxy.governance.judge import Judge
from proxy.governance.replay import replay
from proxy.governance.suggest import suggest
from proxy.governance.unused import unused
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy

EXIT_FOUND = 1
EXIT_ERROR = 2
_DURATION = re.compile(r"^(\d+)(m|h|d)$")
_UNITS = {"m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30d, 12h or 90m: {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def since(text: str) -> str | None:
    """``--since``: ``all``, a duration back from now (``30d``), or a UTC date or time
    (``2026-11-01``, ``2026-11-01T12:00:00Z``); the cutoff in the log's time format."""
    if text == "all":
        return None
    if _DURATION.match(text):
        return R.iso(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=duration(text)))
    try:
        return R.iso(R.parse_time(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected all, a duration such as 30d, or a date such as 2026-11-01: {text!r}"
        ) from None


def _window(cutoff: str | None) -> str:
    return "in all the logs" if cutoff is None else f"since {cutoff[:19]}Z"


def _policy(path: str, config: str | None) -> tuple[Policy, dict[str, UpstreamRules] | None]:
    """A policy file, with the configuration's upstream names, case folding and path rules
    when ``config`` is given (as ``spiffe-pep test --config``)."""
    from proxy.app import read_config  # the shell's config reader (opens files)

    cfg = read_config(Path(config)) if config else None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, f"cannot read the policy: {exc.strerror}") from exc
    if cfg is None:
        return load_policy(data, path), None
    folded = {name for name, u in cfg.upstreams.items() if u.case_insensitive}
    return load_policy(data, path, set(cfg.upstreams), folded), cfg.upstream_rules()


def _judged_requests(
    args: argparse.Namespace,
) -> tuple[Judge, list[R.RequestGroup], R.InputStats]:
    """``args.policy`` (with ``args.config``) as a Judge, and the distinct requests of
    ``args.logs`` since ``args.since`` it must judge, with the input's statistics: what
    ``unused`` and ``replay`` both start from."""
    from proxy.governance import engine  # DuckDB: loaded by these commands only

    policy, upstreams = _policy(args.policy, args.config)
    judge = Judge(policy, upstreams)
    with engine.inputs(args.logs) as src:
        groups, stats = engine.request_groups(src, args.since, policy.revoked_sha256, judge.limits)
    return judge, groups, stats


def _fail(message: str) -> int:
    print(f"spiffe-pep: {message}", file=sys.stderr)
    return EXIT_ERROR


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from proxy.governance.engine import LogError

        try:
            return fn(args)
        except ConfigError as exc:
            for err in getattr(exc, "errors", [exc]):
                print(f"{err}", file=sys.stderr)
            return EXIT_ERROR
        except LogError as exc:
            return _fail(str(exc))

    return run


def _print(args: argparse.Namespace, tables: Any, data: Any, notes: Any, csv: Any = None) -> None:
    if args.format == "csv" and csv is not None:
        sys.stdout.write(report.csv_text(csv))
        return
    sys.stdout.write(report.render(args.format, tables, data, notes))


@_guard
def cmd_inventory(args: argparse.Namespace) -> int:
    from proxy.governance import engine  # DuckDB: loaded by these commands only

    limits: list[float | None] = [args.max_lifetime]
    if args.policy:
        policy, _ = _policy(args.policy, None)
        limits.append(policy.max_cert_lifetime)
    with engine.inputs(args.logs) as src:
        rows, stats = engine.usage(src, args.since)
    result = inventory(rows, stats, limits, args.ipv4_prefix, args.ipv6_prefix)
    _print(args, result.tables(), result.to_json(), result.notes(), result.csv_table())
    return 0


@_guard
def cmd_unused(args: argparse.Namespace) -> int:
    judge, groups, stats = _judged_requests(args)
    result = unused(groups, judge, stats, _window(args.since), args.few)
    _print(args, result.tables(), result.to_json(), result.notes())
    return EXIT_FOUND if result.findings else 0


@_guard
def cmd_suggest(args: argparse.Namespace) -> int:
    from proxy.governance import engine  # DuckDB: loaded by these commands only

    source, upstreams = _policy(args.source, args.config) if args.source else (None, None)
    with engine.inputs(args.logs) as src:
        groups, stats = engine.request_groups(src, args.since)
    try:
        result = suggest(
            groups,
            stats,
            source,
            upstreams,
            glob_min=args.glob_min,
            prefix_min=args.prefix_min,
            tests_per_route=args.tests_per_route,
        )
    except ValueError as exc:
        return _fail(str(exc))
    notes = [result.summary(), *result.notes, stats.summary()]
    if args.output:
        Path(args.output).write_text(result.text)
        notes.insert(0, f"wrote {args.output}")
    if args.format == "yaml" and not args.output:
        sys.stdout.write(result.text)
        for note in notes:
            print(f"# {note}", file=sys.stderr)
        return 0
    rows = [
        (d.name, d.hosts or None, f"{d.kind} {d.value}", list(d.methods), d.upstream,
         sorted(d.ids), d.requests)
        for d in result.routes
    ]  # fmt: skip
    table = report.Table(
        "Suggested routes",
        ("route", "hosts", "path", "methods", "upstream", "allow", "requests"),
        rows,
    )
    fmt = "table" if args.format == "yaml" else args.format
    sys.stdout.write(report.render(fmt, [table], result.to_json(), notes))
    return 0


@_guard
def cmd_replay(args: argparse.Namespace) -> int:
    judge, groups, stats = _judged_requests(args)
    result = replay(groups, judge, stats, args.examples)
    _print(args, result.tables(), result.to_json(), result.notes())
    return EXIT_FOUND if result.breaks else 0


def add_parsers(sub: Any, make: Any) -> None:
    """The governance subcommands, on the ``spiffe-pep`` parser's subparsers; ``make`` is
    the CLI's subcommand factory (``make(sub, name, text, func)``)."""

    def command(name: str, text: str, func: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = make(sub, name, text, func)
        return p

    def common(p: argparse.ArgumentParser, default_since: str = "all", formats: Any = None) -> None:
        p.add_argument(
            "logs", nargs="+", metavar="LOG", help="Decision logs (.gz too); - reads stdin."
        )
        p.add_argument(
            "--since",
            type=since,
            default=default_since,  # argparse applies ``since`` to it
            help=f"Only decision lines since: all, a duration back from now (30d), or a UTC "
            f"date (2026-11-01) (default: {default_since}).",
        )
        fmts = formats or report.FORMATS
        p.add_argument(
            "--format",
            choices=fmts,
            default=fmts[0],
            help=f"The output format (default: {fmts[0]}).",
        )

    inv = command(
        "inventory",
        "List every workload identity in decision logs, with its credentials and flags.",
        cmd_inventory,
    )
    common(inv)
    inv.add_argument(
        "--policy", help="Flag credentials living longer than this policy's max_cert_lifetime."
    )
    inv.add_argument(
        "--max-lifetime", type=duration, help="Flag credentials living longer than this (24h)."
    )
    inv.add_argument("--ipv4-prefix", type=int, default=24, help="The network size (default /24).")
    inv.add_argument("--ipv6-prefix", type=int, default=64, help="The network size (default /64).")

    unu = command(
        "unused",
        "List the routes and allow patterns of a policy that no logged request used.",
        cmd_unused,
    )
    unu.add_argument("policy", help="The policy to review.")
    common(unu, "30d")
    unu.add_argument(
        "--few",
        type=int,
        default=2,
        help="A wildcard used by this many IDs or fewer is broad (default: %(default)s).",
    )
    unu.add_argument("--config", help="The runtime configuration (upstream rules).")

    sug = command("suggest", "Write a least-privilege policy from observed traffic.", cmd_suggest)
    common(sug, formats=("yaml", *report.FORMATS))
    sug.add_argument(
        "--from", dest="source", metavar="POLICY", help="Take upstreams and limits from it."
    )
    sug.add_argument("--config", help="The runtime configuration (upstream rules).")
    sug.add_argument("-o", "--output", help="Write the policy here (default: stdout).")
    sug.add_argument(
        "--glob-min",
        type=int,
        default=3,
        help="Sibling segments of one shape that become * (default: %(default)s).",
    )
    sug.add_argument(
        "--prefix-min",
        type=int,
        default=8,
        help="Shapes under one prefix that become a prefix (default: %(default)s).",
    )
    sug.add_argument(
        "--tests-per-route",
        type=int,
        default=2,
        help="The identities tested per route (default: %(default)s).",
    )

    rep = command(
        "replay",
        "Judge logged requests under a candidate policy and list the decisions that change.",
        cmd_replay,
    )
    rep.add_argument("policy", help="The candidate policy.")
    common(rep)
    rep.add_argument("--config", help="The runtime configuration (upstream rules).")
    rep.add_argument(
        "--examples",
        type=int,
        default=3,
        help="Example requests per change (default: %(default)s).",
    )
