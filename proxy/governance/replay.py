"""``spiffe-pep replay``: every logged request judged again under a candidate policy,
and the verdicts that would change (allow -> deny, deny -> allow), grouped by identity
and route with counts and examples. A CI pipeline gates a policy change on
``breaks``: something allowed today would be denied.

The logged verdict is the baseline (whatever policy version wrote it); lines refused
before any policy judged them (``decision: error``) have no verdict to compare and are
counted apart. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.governance import records as R
from proxy.governance.judge import ALLOW, DENY, Judge
from proxy.governance.report import Table

ALLOW_TO_DENY = "allow->deny"
DENY_TO_ALLOW = "deny->allow"


@dataclass
class Flip:
    """Requests of one identity whose verdict changes the same way between the same
    routes."""

    direction: str
    spiffe_id: str
    origin: str | None
    old_route: str | None
    new_route: str | None
    requests: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # the new verdict's reasons
    examples: list[tuple[int, str]] = field(default_factory=list)  # (count, request)
    first: str = ""
    last: str = ""
    notes: set[str] = field(default_factory=set)

    def add(self, g: R.RequestGroup, reason: str, note: str, keep: int) -> None:
        self.requests += g.count
        self.reasons[reason] = self.reasons.get(reason, 0) + g.count
        self.examples.append((g.count, f"{g.method} {g.host or '-'} {g.path}"))
        if len(self.examples) > 4 * keep:
            self.examples = _top(self.examples, keep)
        self.first = min(self.first or g.first, g.first)
        self.last = max(self.last, g.last)
        if note:
            self.notes.add(note)

    def to_json(self, keep: int) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "spiffe_id": self.spiffe_id,
            "origin_spiffe_id": self.origin,
            "old_route": self.old_route,
            "new_route": self.new_route,
            "requests": self.requests,
            "new_reasons": self.reasons,
            "examples": [{"request": r, "count": n} for n, r in _top(self.examples, keep)],
            "first": self.first,
            "last": self.last,
            "notes": sorted(self.notes),
        }


def _top(examples: list[tuple[int, str]], keep: int) -> list[tuple[int, str]]:
    merged: dict[str, int] = {}
    for n, r in examples:
        merged[r] = merged.get(r, 0) + n
    return sorted(((n, r) for r, n in merged.items()), key=lambda x: (-x[0], x[1]))[:keep]


@dataclass
class ReplayResult:
    stats: R.InputStats
    policy: str
    judged: int = 0  # decision lines judged again
    unchanged: int = 0
    flips: list[Flip] = field(default_factory=list)
    evaluated: int = 0  # calls to the decision function
    examples: int = 3

    @property
    def breaks(self) -> int:
        """Requests allowed when logged that the candidate policy denies."""
        return sum(f.requests for f in self.flips if f.direction == ALLOW_TO_DENY)

    @property
    def opens(self) -> int:
        return sum(f.requests for f in self.flips if f.direction == DENY_TO_ALLOW)

    def summary(self) -> str:
        return (
            f"{self.judged:,} requests judged again under {self.policy}: "
            f"{self.breaks:,} allow->deny, {self.opens:,} deny->allow, "
            f"{self.unchanged:,} unchanged"
        )

    def tables(self) -> list[Table]:
        rows = []
        for f in self.flips:
            reasons = sorted(f.reasons.items(), key=lambda x: (-x[1], x[0]))
            rows.append(
                (
                    f.direction,
                    f.spiffe_id + (f" (origin {f.origin})" if f.origin else ""),
                    f.old_route,
                    f.new_route,
                    f.requests,
                    [r for r, _ in reasons],
                    [r for _, r in _top(f.examples, self.examples)],
                )
            )
        columns = ("change", "identity", "route was", "route now", "requests", "now")
        return [
            Table(
                "Decisions that would change",
                (*columns, "examples"),
                rows,
                empty="(none: every logged request keeps its verdict)",
            )
        ]

    def notes(self) -> list[str]:
        out = [self.summary(), self.stats.summary()]
        for note in sorted({n for f in self.flips for n in f.notes}):
            out.append(f"note: {note}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "judged": self.judged,
            "unchanged": self.unchanged,
            "allow_to_deny": self.breaks,
            "deny_to_allow": self.opens,
            "decisions_evaluated": self.evaluated,
            "flips": [f.to_json(self.examples) for f in self.flips],
            "input": self.stats.to_json(),
        }


def replay(
    groups: Iterable[R.RequestGroup],
    judge: Judge,
    stats: R.InputStats,
    examples: int = 3,
) -> ReplayResult:
    result = ReplayResult(stats, judge.policy.source, examples=examples)
    flips: dict[tuple[str, str, str | None, str | None, str | None], Flip] = {}
    for g in groups:
        if g.decision not in (ALLOW, DENY):
            stats.skip(R.SKIP_REFUSED, g.count)
            continue
        judged = judge.judge(g)
        if judged is None:
            stats.skip(R.SKIP_INCOMPLETE, g.count)
            continue
        result.judged += g.count
        if judged.outcome == g.decision:
            result.unchanged += g.count
            continue
        direction = ALLOW_TO_DENY if g.decision == ALLOW else DENY_TO_ALLOW
        assert g.spiffe_id is not None  # judged: complete
        key = (direction, g.spiffe_id, g.origin, g.route, judged.route)
        flip = flips.get(key)
        if flip is None:
            flip = flips[key] = Flip(direction, g.spiffe_id, g.origin, g.route, judged.route)
        flip.add(g, judged.reason, judged.note, examples)
    result.flips = sorted(
        flips.values(),
        key=lambda f: (f.direction != ALLOW_TO_DENY, -f.requests, f.spiffe_id, f.old_route or ""),
    )
    result.evaluated = judge.evaluated
    return result
