"""The dependency rule of ../shared/STYLE.md: the pure core never does I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parents[2] / "proxy"
CORE = [
    "errors",
    "spiffe_id",
    "svid",
    "bundle",
    "policy/model",
    "policy/patterns",
    "policy/evaluate",
    "policy/loader",
    "headers",
    "xfcc",
    "audit",
    "canonical",
    "override",
    "decide",
    "rewrite",
    "yamlsrc",
    "schema",
    "config",
    "proxyproto",
    "jwtsvid",
    "assertion",
    "policy/matcher",
    "policy/tools",
    "governance/records",
    "governance/sql",
    "governance/judge",
    "governance/inventory",
    "governance/unused",
    "governance/suggest",
    "governance/replay",
    "governance/report",
    "recent",
    "identity_map",
    "ui_page",
    "drift",
]
FORBIDDEN = {
    "trio",
    "OpenSSL",
    "socket",
    "ssl",
    "prometheus_client",
    "h11",
    "subprocess",
    "asyncio",
    "duckdb",
}
SHELL = {
    "tls",
    "tls_stream",
    "forward",
    "server",
    "loading",
    "reload",
    "session",
    "exchange",
    "runtime",
    "app",
    "cli",
    "audit_sink",
    "trust",
    "demo_upstream",
    "devcerts",
    "metrics",
    "admin",
    "supervisor",
    "workload_api",
    "check",
    "governance/engine",
    "governance/commands",
    "cpus",
    "ui",
    "graphviz",
    "filewatch",
    "inotify",
    "drift_store",
}


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_no_io(module: str) -> None:
    tree = ast.parse((PROXY / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("proxy"):
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{module} imports {name}"
            if top == "proxy":
                parts = name.split(".")[1:]
                inner = "/".join(parts[:2])
                assert parts[0] not in SHELL and inner not in SHELL, (
                    f"{module} imports the shell: {name}"
                )
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", f"{module} calls open()"
