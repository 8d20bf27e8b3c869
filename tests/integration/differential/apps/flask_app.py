"""The Python app of the differential tests, run under gunicorn: Flask routing as Flask
apps do it (``strict_slashes`` default, a POST-only view, host matching for the admin
vhost) and identity read the way apps read it, through ``request.headers`` and the WSGI
environ. Every handler answers what it served and every identity header it saw."""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request

# The headers an app behind the proxy reads; the WSGI environ has one key for both the
# "-" and the "_" spelling of a name (and gunicorn drops the "_" ones by default).
HEADERS = [
    "X-Client-Spiffe-Id",
    "X-Forwarded-Client-Cert",
    "Client-Cert",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "Forwarded",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Real-IP",
    "X-HTTP-Method-Override",
]

app = Flask(__name__, host_matching=True, static_host="static.invalid")
ANY = "<anyhost>"


def probe(resource: str) -> Any:
    seen: dict[str, list[str]] = {}
    for name in HEADERS:
        seen[name.lower()] = request.headers.getlist(name)
        value = request.environ.get("HTTP_" + name.upper().replace("-", "_"))
        seen[name.lower().replace("-", "_")] = [] if value is None else [value]
    return jsonify(
        server="gunicorn",
        resource=resource,
        method=request.method,
        path=request.path,
        host=request.host,
        headers=seen,
    )


@app.route("/", host="admin.internal", defaults={"rest": ""})
@app.route("/<path:rest>", host="admin.internal")
def admin_vhost(rest: str) -> Any:
    return probe("admin-vhost")


@app.route("/admin/", host=ANY, defaults={"rest": ""})
@app.route("/admin/<path:rest>", host=ANY)
def admin(anyhost: str, rest: str) -> Any:
    return probe("admin")


@app.route("/secret", host=ANY)
def secret(anyhost: str) -> Any:
    return probe("secret")


@app.route("/a+b@c", host=ANY)
def plus_at(anyhost: str) -> Any:
    return probe("plus-at")


@app.route("/api/invoices", host=ANY, methods=["POST"])
def invoices_post(anyhost: str) -> Any:
    return probe("invoices-post")


@app.route("/", host=ANY, defaults={"rest": ""})
@app.route("/<path:rest>", host=ANY)
def public(anyhost: str, rest: str) -> Any:
    return probe("public")
