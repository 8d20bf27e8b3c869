"""Compiled matchers, so a decision is never a linear scan of patterns or routes.

``IdentityMatcher``: a trie per trust domain keyed by path segment, with a ``*`` edge for
single-segment wildcards; each node records the lowest index of a pattern ending there
exactly and of a pattern ending there with a tail (one or more further segments).
Matching walks the ID's segments once per wildcard branch and returns the FIRST matching
pattern (lowest index), so the rule a decision names is the one an admin reads first.

``RouteIndex``: a trie of path segments. Prefix routes sit on the node of their prefix,
exact routes on the node of their path, glob and path-less routes are always candidates.
A lookup gathers candidates along the request's path and checks them in policy order
with the full match; the first that matches decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.policy.patterns import WILDCARD, IdentityPattern
from proxy.spiffe_id import SpiffeId

_NONE = 1 << 62


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    star: _Node | None = None
    end: int = _NONE  # a pattern ends here: the ID must end here too
    tail: int = _NONE  # a pattern ends here with "/*": the ID must go on


class IdentityMatcher:
    """The first of ``patterns`` that matches an ID, in time independent of their number."""

    __slots__ = ("_roots", "patterns")

    def __init__(self, patterns: Sequence[IdentityPattern]) -> None:
        self.patterns = tuple(patterns)
        self._roots: dict[str, _Node] = {}
        for i, p in enumerate(self.patterns):
            node = self._roots.setdefault(p.trust_domain.name, _Node())
            for seg in p.segments:
                if seg == WILDCARD:
                    node.star = node.star or _Node()
                    node = node.star
                else:
                    node = node.children.setdefault(seg, _Node())
            if p.tail:
                node.tail = min(node.tail, i)
            else:
                node.end = min(node.end, i)

    def first(self, spiffe_id: SpiffeId) -> int:
        """Index of the first matching pattern, or -1."""
        root = self._roots.get(spiffe_id.trust_domain.name)
        if root is None:
            return -1
        segs = spiffe_id.segments
        n = len(segs)
        best = _NONE
        stack = [(root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == n:
                best = min(best, node.end)
                continue
            best = min(best, node.tail)
            child = node.children.get(segs[depth])
            if child is not None:
                stack.append((child, depth + 1))
            if node.star is not None:
                stack.append((node.star, depth + 1))
        return -1 if best == _NONE else best


@dataclass
class _PathNode:
    children: dict[str, _PathNode] = field(default_factory=dict)
    prefix: list[int] = field(default_factory=list)
    exact: list[int] = field(default_factory=list)


class RouteIndex:
    """Candidate routes for a path, in policy order."""

    def __init__(self, paths: Sequence[tuple[str, str] | None]) -> None:
        """``paths[i]`` is ``(kind, value)`` of route i's path match, or None."""
        self._root = _PathNode()
        self._always: list[int] = []
        for i, spec in enumerate(paths):
            if spec is None or spec[0] == "glob":
                self._always.append(i)
                continue
            kind, value = spec
            segs = value.rstrip("/").split("/")[1:] if kind == "prefix" else value.split("/")[1:]
            node = self._root
            for seg in segs:
                node = node.children.setdefault(seg, _PathNode())
            (node.prefix if kind == "prefix" else node.exact).append(i)

    def candidates(self, path: str) -> list[int]:
        found = list(self._always)
        node: _PathNode | None = self._root
        segs = path.split("/")[1:] if path.startswith("/") else []
        found += self._root.prefix
        # "/a/b/" is a candidate for an exact "/a/b" too (the route decides if it matches).
        last = len(segs) - 1 if len(segs) > 1 and segs[-1] == "" else -1
        for k, seg in enumerate(segs):
            if k == last and node is not None:
                found += node.exact
            node = node.children.get(seg) if node else None
            if node is None:
                break
            found += node.prefix
        else:
            if node is not None:
                found += node.exact
        found.sort()
        return found
