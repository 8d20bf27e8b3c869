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
}
SHELL = {
    "tls",
    "tls_stream",
    "forward",
    "server",
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
    "filewatch",
    "drift_store",
}


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_no_io(module: str) -> None:
    tree = ast.parse((PROXY / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "proxy":
            names = [f"proxy.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{module} imports {name}"
            if top == "proxy":
                assert name.split(".")[1] not in SHELL, f"{module} imports the shell: {name}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", f"{module} calls open()"
