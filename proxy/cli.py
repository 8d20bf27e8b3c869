"""Command line: ``spiffe-pep run|dev|check``. Parses arguments and maps errors to exit
codes (0 ok, 1 a check failed, 2 bad configuration); no logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from proxy import __version__, devcerts
from proxy.app import build_runtime, read_config, read_policy, run_until_signalled
from proxy.errors import ConfigError

EXIT_CONFIG = 2


def _fail(exc: ConfigError) -> int:
    print(f"spiffe-pep: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_run(args: argparse.Namespace) -> int:
    try:
        rt = build_runtime(read_config(Path(args.config)))
    except ConfigError as exc:
        return _fail(exc)
    trio.run(run_until_signalled, rt)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = read_config(Path(args.config))
        policy = read_policy(config)
    except ConfigError as exc:
        return _fail(exc)
    print(
        f"ok: {args.config} and {config.policy_path} ({len(policy.routes)} routes, "
        f"policy sha256 {policy.sha256})"
    )
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
    trio.run(main)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spiffe-pep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"spiffe-pep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy with a configuration file")
    run.add_argument("-c", "--config", required=True, help="the runtime configuration (YAML)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a configuration and its policy, then exit")
    check.add_argument("config", help="the runtime configuration (YAML)")
    check.set_defaults(func=cmd_check)
    dev = sub.add_parser("dev", help="run on the embedded dev setup (certs, demo upstream)")
    dev.add_argument("--root", default=".", help="the project checkout (default: .)")
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
