"""Graphviz's ``dot``, run to lay out DOT text as SVG: the one place it is called.

``dot`` comes from the system (Debian's ``graphviz``), not from Python: the layout of a
graph with clusters is what it does best, and no Python package does it as well. Where it
is missing (the slim container image), callers fall back to a table and say why.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess

from proxy.errors import ProxyError

MISSING = (
    "Graphviz's dot is not installed, so the identity map cannot be drawn "
    "(Debian/Ubuntu: apt-get install graphviz)"
)
TIMEOUT = 10.0
_CACHE: dict[str, str] = {}  # SVG by the SHA-256 of its DOT text: refreshes cost nothing
_CACHE_MAX = 8


class GraphvizError(ProxyError):
    """``dot`` is missing, failed or took too long; the message says which."""


def available() -> bool:
    return shutil.which("dot") is not None


def render_svg(dot: str, timeout: float = TIMEOUT) -> str:
    """``dot -Tsvg`` of ``dot``; raise GraphvizError if it cannot be run or fails."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizError(MISSING)
    key = hashlib.sha256(dot.encode()).hexdigest()
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    try:
        proc = subprocess.run(
            [exe, "-Tsvg"], input=dot.encode(), capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise GraphvizError(f"dot took longer than {timeout:g}s to lay out the map") from exc
    except OSError as exc:
        raise GraphvizError(f"cannot run {exe}: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()[:500]
        raise GraphvizError(f"dot failed (exit {proc.returncode}): {err}")
    svg = proc.stdout.decode("utf-8", "replace")
    if len(_CACHE) >= _CACHE_MAX:
        del _CACHE[next(iter(_CACHE))]
    _CACHE[key] = svg
    return svg
