"""Policy decision speed: 1,000 routes x 100 identity patterns.

    python -m loadtests.bench_policy [--routes 1000] [--patterns 100] [--decisions 20000]

Builds a policy as YAML text, loads it through the real loader (the time is reported),
then times ``evaluate`` one decision at a time over a fixed, seeded mix of requests and
reports the median and p99. The peer in the same run is a naive evaluator (a linear scan
of routes, then of each route's patterns, with the same match semantics), so the figure
to carry to another machine is the ratio. Bounded: a fixed number of decisions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import time
from dataclasses import dataclass

from proxy.policy import Request, evaluate, load_policy
from proxy.policy.model import Policy
from proxy.spiffe_id import SpiffeId

NOW = dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Caller:
    spiffe_id: SpiffeId
    fingerprint: str = ""
    not_before: dt.datetime = NOW - dt.timedelta(minutes=5)
    not_after: dt.datetime = NOW + dt.timedelta(hours=1)


def build_yaml(routes: int, patterns: int, rng: random.Random) -> str:
    lines = ["routes:"]
    for i in range(routes):
        allow = []
        for j in range(patterns):
            kind = j % 4
            if kind == 0:
                allow.append(f"spiffe://td{i % 7}.org/ns/n{j}/sa/s{i}")
            elif kind == 1:
                allow.append(f"spiffe://td{i % 7}.org/ns/p{j}-{i}/*")
            elif kind == 2:
                allow.append(f"spiffe://td{i % 7}.org/ns/*/sa/w{j}-{i}")
            else:
                allow.append(f"spiffe://td{i % 7}.org/team/t{j}/svc/s{i}/*")
        methods = ["GET", "HEAD"] if i % 2 else ["POST", "PUT"]
        lines.append(
            f"  - name: r{i}\n    match: {{path_prefix: /svc{i}/api, methods: "
            f"[{', '.join(methods)}]}}\n    upstream: app\n    allow: {json.dumps(allow)}"
        )
    return "\n".join(lines) + "\n"


def requests(
    n: int, routes: int, patterns: int, rng: random.Random
) -> list[tuple[Caller, Request]]:
    out = []
    for _ in range(n):
        i = rng.randrange(routes)
        j = rng.randrange(patterns)
        method = "GET" if i % 2 else "POST"
        choice = rng.random()
        if choice < 0.4:  # allowed by an exact pattern
            sid = f"spiffe://td{i % 7}.org/ns/n{j - j % 4}/sa/s{i}"
        elif choice < 0.7:  # allowed by a single-segment wildcard
            sid = f"spiffe://td{i % 7}.org/ns/x{j}/sa/w{j - j % 4 + 2}-{i}"
        elif choice < 0.9:  # denied: no pattern matches
            sid = f"spiffe://td{i % 7}.org/ns/nobody/sa/s{j}"
        else:  # no route at all
            sid, i = f"spiffe://td0.org/ns/n0/sa/s{i}", routes + 1
        out.append(
            (Caller(SpiffeId.parse(sid)), Request(method, "app.internal", f"/svc{i}/api/items/{j}"))
        )
    return out


def naive(policy: Policy, caller: Caller, req: Request) -> bool:
    """A linear scan: every route in order, then every pattern."""
    for route in policy.routes:
        if route.match.matches(req.method, req.host, req.path):
            return any(p.matches(caller.spiffe_id) for p in route.allow)
    return False


def timed(fn, cases) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for caller, req in cases:
        t0 = time.perf_counter_ns()
        fn(caller, req)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", type=int, default=1000)
    ap.add_argument("--patterns", type=int, default=100)
    ap.add_argument("--decisions", type=int, default=20000)
    ap.add_argument("--naive-decisions", type=int, default=500)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    rng = random.Random(1)
    text = build_yaml(args.routes, args.patterns, rng)
    t0 = time.perf_counter()
    policy = load_policy(text.encode(), "bench.yaml", {"app"})
    load_s = time.perf_counter() - t0
    cases = requests(args.decisions, args.routes, args.patterns, rng)
    # Sanity: the compiled evaluation and the naive scan agree on every case.
    for caller, req in cases[:2000]:
        assert evaluate(policy, caller, req, NOW).allowed == naive(policy, caller, req)
    allowed = sum(evaluate(policy, c, r, NOW).allowed for c, r in cases)
    fast = timed(lambda c, r: evaluate(policy, c, r, NOW), cases)
    slow = timed(lambda c, r: naive(policy, c, r), cases[: args.naive_decisions])
    result = {
        "routes": args.routes,
        "patterns_per_route": args.patterns,
        "decisions": len(fast),
        "allowed_fraction": round(allowed / len(cases), 3),
        "policy_load_s": round(load_s, 2),
        "median_us": round(statistics.median(fast), 2),
        "p99_us": round(pct(fast, 0.99), 2),
        "naive_median_us": round(statistics.median(slow), 1),
        "naive_p99_us": round(pct(slow, 0.99), 1),
    }
    result["speedup_median"] = round(result["naive_median_us"] / result["median_us"], 1)
    print(f"policy: {args.routes} routes x {args.patterns} patterns, loaded in {load_s:.2f} s")
    print(
        f"compiled evaluate: median {result['median_us']} us, p99 {result['p99_us']} us "
        f"over {len(fast)} decisions ({result['allowed_fraction']:.0%} allowed)"
    )
    print(
        f"naive linear scan: median {result['naive_median_us']} us, p99 "
        f"{result['naive_p99_us']} us over {len(slow)} decisions"
    )
    print(f"compiled / naive: {result['speedup_median']}x faster at the median")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
