"""The admin page (``/ui``) as HTML. Pure: values in, one HTML string out.

Every value that came from a certificate, a request, a log line or the policy goes
through ``html.escape`` (``_e``) on its way into the page; the identity map's SVG comes
from Graphviz, fed labels escaped for DOT (``identity_map.quote``). The page needs
nothing from the network: one inline stylesheet, an inline SVG, no script (the
listener's Content-Security-Policy forbids any).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from cryptography import x509

from proxy import identity_map
from proxy.errors import SpiffeIdError
from proxy.identity_map import NO_ROUTE, Graph
from proxy.policy.patterns import IdentityPattern
from proxy.recent import Credential, Decision, name_text
from proxy.spiffe_id import SpiffeId

ROWS = 200  # rows per decisions table
DENIALS = ("deny", "error")
SOON = dt.timedelta(days=1)  # an expiry nearer than this is shown as a warning


def _e(value: object) -> str:
    """Text for HTML, attribute values included."""
    return html.escape("" if value is None else str(value), quote=True)


# --- filters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """The decision filters of the query string: ``identity`` (a substring of the SPIFFE
    ID, or an identity pattern with ``*``), ``route`` (a name, or ``(no route)``) and
    ``reason`` (exact)."""

    identity: str = ""
    route: str = ""
    reason: str = ""

    @classmethod
    def from_query(cls, query: bytes | str) -> Filters:
        text = query.decode("ascii", "replace") if isinstance(query, bytes) else query
        try:
            q = parse_qs(text, keep_blank_values=False, max_num_fields=20)
        except ValueError:  # more fields than any form of the page sends
            q = {}

        def one(name: str) -> str:
            return q.get(name, [""])[0].strip()[:300]

        return cls(one("identity"), one("route"), one("reason"))

    @property
    def active(self) -> bool:
        return bool(self.identity or self.route or self.reason)

    def _identity_matches(self, spiffe_id: str | None) -> bool:
        if "*" in self.identity:
            try:
                pattern = IdentityPattern.parse(self.identity)
                return spiffe_id is not None and pattern.matches(SpiffeId.parse(spiffe_id))
            except SpiffeIdError:
                return False
        return self.identity in (spiffe_id or "")

    def matches(self, d: Decision) -> bool:
        if self.identity and not self._identity_matches(d.spiffe_id):
            return False
        if self.route and (d.route or NO_ROUTE) != self.route:
            return False
        return not self.reason or d.reason == self.reason

    def query(self, **change: str) -> str:
        """This query string with ``change`` applied (empty values left out)."""
        values = {"identity": self.identity, "route": self.route, "reason": self.reason}
        values.update(change)
        return urlencode({k: v for k, v in values.items() if v})


# --- the page's values -------------------------------------------------------------------


@dataclass(frozen=True)
class Expiry:
    kind: str  # "own SVID", "bundle CA", "client"
    name: str  # a SPIFFE ID or a trust domain
    subject: str  # RFC 4514, as in the certificate
    not_after: dt.datetime | None


@dataclass(frozen=True)
class PolicyInfo:
    file: str
    sha256: str
    routes: int
    loaded_at: str
    note: str = ""


@dataclass(frozen=True)
class PageData:
    now: dt.datetime
    version: str
    served_by: str  # "this process (pid N)" or "the supervisor of N workers"
    own_id: str
    decisions: Sequence[Decision]
    counters: Sequence[tuple[str, str, str]]  # label, value, css class
    expiries: Sequence[Expiry]
    policy: PolicyInfo
    reloads: Sequence[Mapping[str, Any]]
    drift: Sequence[Mapping[str, Any]]
    graph: Graph
    map_svg: str | None  # None: Graphviz is missing or failed, the map is a table
    map_note: str = ""
    notes: Sequence[str] = field(default_factory=tuple)


def parse_time(text: object) -> dt.datetime | None:
    """An ISO 8601 time from a log line (``Z`` or an offset), as aware UTC; None if not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def expiries(
    own_id: str,
    own_not_after: dt.datetime | None,
    bundles: Mapping[str, Iterable[x509.Certificate]],
    credentials: Iterable[Credential],
) -> list[Expiry]:
    """Every certificate the page watches, the nearest expiry first."""
    rows = [Expiry("own SVID", own_id, "", own_not_after)]
    for td, cas in bundles.items():
        rows += [
            Expiry("bundle CA", td, name_text(ca.subject), ca.not_valid_after_utc) for ca in cas
        ]
    rows += [Expiry("client", c.spiffe_id, c.subject, parse_time(c.not_after)) for c in credentials]
    far = dt.datetime.max.replace(tzinfo=dt.UTC)
    return sorted(rows, key=lambda r: (r.not_after or far, r.kind, r.name))


Sample = tuple[str, Mapping[str, str], float]  # metric sample: name, labels, value


def counters(samples: Iterable[Sample]) -> list[tuple[str, str, str]]:
    """The live counters from Prometheus samples: (label, value, css class)."""
    sums: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    for name, labels, value in samples:
        base = name.removesuffix("_total")
        if base == "spiffe_pep_requests":
            add("requests " + labels.get("decision", ""), value)
        elif base in ("spiffe_pep_policy_reloads", "spiffe_pep_config_reloads"):
            add(base.split("_")[2] + " reloads " + labels.get("result", ""), value)
        elif base == "spiffe_pep_credential_reloads":
            add("credential reloads " + labels.get("result", ""), value)
        elif base == "spiffe_pep_tls_handshake_failures":
            add("handshake failures", value)
        elif base == "spiffe_pep_open_connections":
            add("open connections", value)
        elif base == "spiffe_pep_connections_refused":
            add("connections refused", value)
    rows = [
        ("requests allowed", "requests allow", ""),
        ("requests denied", "requests deny", "bad"),
        ("requests refused as malformed", "requests error", "bad"),
        ("open connections", "open connections", ""),
        ("TLS handshakes failed", "handshake failures", "bad"),
        ("connections refused (limit)", "connections refused", "bad"),
        ("policy reloads", "policy reloads ok", ""),
        ("policy reloads failed", "policy reloads failed", "bad"),
        ("config reloads failed", "config reloads failed", "bad"),
        ("credential reloads failed", "credential reloads failed", "bad"),
    ]
    return [
        (label, f"{sums.get(key, 0):g}", css if sums.get(key) else "") for label, key, css in rows
    ]


_RELOAD_WHAT = {
    "policy_reloaded": ("policy", True),
    "policy_reload_failed": ("policy", False),
    "config_reloaded": ("configuration", True),
    "config_reload_failed": ("configuration", False),
    "config_restart_required": ("configuration: restart required", True),
    "credentials_reloaded": ("credentials", True),
    "credentials_reload_failed": ("credentials", False),
}


@dataclass(frozen=True)
class ReloadRow:
    time: str
    what: str
    ok: bool
    detail: str
    location: str
    errors: tuple[str, ...]
    count: int = 1  # the same event from several workers at once


def reload_rows(events: Iterable[Mapping[str, Any]]) -> list[ReloadRow]:
    """Reload events, newest first; the same event from several workers within two
    seconds is one row with a count."""
    rows: list[ReloadRow] = []
    for ev in events:
        what, ok = _RELOAD_WHAT.get(str(ev.get("event")), (str(ev.get("event")), True))
        if ev.get("event") == "policy_reloaded":
            detail = f"{ev.get('policy', '')} sha256 {str(ev.get('policy_sha256', ''))[:12]}"
            if ev.get("unchanged"):
                detail += " (fixed back to the version in force)"
        elif ev.get("event") == "config_reloaded":
            detail = "changed: " + ", ".join(map(str, ev.get("changed") or [])) or "nothing"
        elif ev.get("event") == "config_restart_required":
            detail = "settings: " + ", ".join(map(str, ev.get("settings") or []))
        elif ev.get("event") == "credentials_reloaded":
            detail = f"{ev.get('spiffe_id') or ''} until {ev.get('not_after', '')}"
        else:
            kept = ev.get("kept_sha256") or ev.get("kept") or ev.get("kept_not_after") or ""
            detail = f"kept {kept}"
        errors = ev.get("errors")
        if not isinstance(errors, list) or not errors:
            errors = [ev["error"]] if ev.get("error") else []
        row = ReloadRow(
            str(ev.get("time", "")),
            what,
            ok,
            detail.strip(),
            str(ev.get("location") or ""),
            tuple(str(e) for e in errors),
        )
        last = rows[-1] if rows else None
        if (
            last is not None
            and (last.what, last.ok, last.detail, last.location, last.errors)
            == (row.what, row.ok, row.detail, row.location, row.errors)
            and _seconds_between(last.time, row.time) <= 2
        ):
            rows[-1] = ReloadRow(**{**last.__dict__, "count": last.count + 1})
            continue
        rows.append(row)
    return rows[::-1]


def _seconds_between(a: str, b: str) -> float:
    ta, tb = parse_time(a), parse_time(b)
    if ta is None or tb is None:
        return float("inf")
    return abs((tb - ta).total_seconds())


# --- rendering ---------------------------------------------------------------------------

STYLE = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0;
  --bad: #cf222e; --bad-bg: #ffebe9; --warn: #9a6700; --warn-bg: #fff8c5; --ok: #1a7f37; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans",
  sans-serif; color: var(--fg); background: #f6f8fa; }
header { background: #24292f; color: #fff; padding: 10px 24px; display: flex;
  flex-wrap: wrap; gap: 4px 24px; align-items: baseline; }
header h1 { font-size: 18px; margin: 0; }
header span { color: #d1d9e0; font-size: 13px; }
nav a { color: #fff; margin-right: 14px; font-size: 13px; }
main { max-width: 1500px; margin: 0 auto; padding: 12px 24px 40px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 12px 16px; margin: 14px 0; }
h2 { font-size: 16px; margin: 0 0 8px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.wrap, td.id { overflow-wrap: anywhere; }
code, td.id, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
tr.bad td { background: var(--bad-bg); }
tr.warn td { background: var(--warn-bg); }
.bad { color: var(--bad); } .ok { color: var(--ok); } .muted { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; min-width: 150px; }
.card b { display: block; font-size: 20px; font-variant-numeric: tabular-nums; }
.card.bad b { color: var(--bad); }
.card span { color: var(--muted); font-size: 12px; }
form { display: flex; flex-wrap: wrap; gap: 8px; align-items: end; margin-bottom: 8px; }
label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
input, select, button { font: inherit; padding: 3px 6px; }
input[name=identity] { width: 28em; }
.map { overflow: auto; border: 1px solid var(--line); border-radius: 6px; padding: 8px;
  background: #fff; }
.map svg { max-width: 100%; height: auto; }
.legend { display: flex; flex-wrap: wrap; gap: 18px; font-size: 12px; color: var(--muted);
  margin-bottom: 6px; }
.legend i { display: inline-block; width: 28px; height: 0; vertical-align: middle;
  margin-right: 4px; border-top: 2px solid #6e7781; }
.legend i.unused { border-top-style: dashed; } .legend i.used { border-color: #1a7f37; }
.legend i.denied { border-color: #cf222e; }
.note { color: var(--warn); background: var(--warn-bg); padding: 4px 8px; border-radius: 4px; }
.empty { color: var(--muted); font-style: italic; }
"""
# The Content-Security-Policy of the page: its one stylesheet by hash, nothing else.
STYLE_HASH = hashlib.sha256(STYLE.encode()).digest()
CSP = (
    f"default-src 'none'; style-src 'sha256-{base64.b64encode(STYLE_HASH).decode()}'; "
    "img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _time(text: str) -> str:
    """``MM-DD HH:MM:SS`` of an ISO time, the full value as its title."""
    short = f"{text[5:10]} {text[11:19]}" if len(text) >= 19 else text
    return f'<span title="{_e(text)}">{_e(short)}</span>'


def _remaining(t: dt.datetime | None, now: dt.datetime) -> str:
    if t is None:
        return "unknown"
    seconds = int((t - now).total_seconds())
    span = abs(seconds)
    if span >= 86400:
        text = f"{span // 86400}d {span % 86400 // 3600}h"
    elif span >= 3600:
        text = f"{span // 3600}h {span % 3600 // 60}m"
    else:
        text = f"{span // 60}m {span % 60}s"
    return f"expired {text} ago" if seconds < 0 else f"in {text}"


def _decision_table(table_id: str, rows: Sequence[Decision], f: Filters, denied: bool) -> str:
    if not rows:
        what = "denials" if denied else "allowed requests"
        return f'<p class="empty" id="{table_id}-empty">No {what} among the recent decisions.</p>'
    head = (
        "<tr><th>time</th><th>identity</th><th>peer</th><th>request</th><th>route</th>"
        "<th>decision</th><th>reason</th><th>status</th></tr>"
    )
    body = []
    for d in rows[:ROWS]:
        route = d.route or NO_ROUTE
        mode = " (audit: forwarded)" if d.mode == "audit" and d.decision == "deny" else ""
        body.append(
            f'<tr class="{"bad" if denied else ""}">'
            f"<td>{_time(d.time or '')}</td>"
            f'<td class="id"><a href="?{_e(f.query(identity=d.spiffe_id or ""))}">'
            f"{_e(d.spiffe_id or '(none)')}</a></td>"
            f'<td class="mono">{_e(d.peer_addr)}</td>'
            f'<td class="wrap"><span class="mono">{_e(d.method)}</span> '
            f'{_e(d.host)}<span class="mono">{_e(d.path)}</span></td>'
            f'<td><a href="?{_e(f.query(route=route))}">{_e(route)}</a></td>'
            f"<td>{_e(d.decision)}{_e(mode)}</td>"
            f'<td><a href="?{_e(f.query(reason=d.reason or ""))}">{_e(d.reason)}</a></td>'
            f'<td class="num">{_e(d.status)}</td></tr>'
        )
    more = (
        f'<p class="muted">and {len(rows) - ROWS} more not shown.</p>' if len(rows) > ROWS else ""
    )
    return (
        f'<table id="{table_id}"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>{more}'
    )


def _options(values: Iterable[str], chosen: str) -> str:
    out = ['<option value="">any</option>']
    for v in sorted(set(values) | ({chosen} if chosen else set())):
        sel = " selected" if v == chosen else ""
        out.append(f'<option value="{_e(v)}"{sel}>{_e(v)}</option>')
    return "".join(out)


def _decisions(data: PageData, f: Filters) -> str:
    newest_first = list(reversed(data.decisions))
    shown = [d for d in newest_first if f.matches(d)]
    denials = [d for d in shown if d.decision in DENIALS]
    allowed = [d for d in shown if d.decision not in DENIALS]
    ids = sorted({d.spiffe_id for d in newest_first if d.spiffe_id})
    routes = {d.route or NO_ROUTE for d in newest_first} | {
        n.label for n in data.graph.nodes if n.kind == identity_map.ROUTE
    }
    reasons = {d.reason for d in newest_first if d.reason}
    datalist = "".join(f'<option value="{_e(i)}">' for i in ids)
    form = (
        '<form method="get" action="" id="filters">'
        "<label>identity (part of the ID, or a pattern with *)"
        f'<input name="identity" list="ids" value="{_e(f.identity)}"></label>'
        f'<datalist id="ids">{datalist}</datalist>'
        f'<label>route<select name="route">{_options(routes, f.route)}</select></label>'
        f'<label>reason<select name="reason">{_options(reasons, f.reason)}</select></label>'
        '<button type="submit">Filter</button>'
        + ('<a href="?">clear filters</a>' if f.active else "")
        + "</form>"
    )
    summary = (
        f"{len(shown)} of the last {len(newest_first)} decisions match"
        if f.active
        else f"the last {len(newest_first)} decisions"
    )
    return (
        f'<section id="decisions"><h2>Recent decisions</h2>{form}'
        f'<p class="muted">{_e(summary)}, newest first; denials first.</p>'
        f"<h3>Denied ({len(denials)})</h3>{_decision_table('denials', denials, f, True)}"
        f"<h3>Allowed ({len(allowed)})</h3>{_decision_table('allowed', allowed, f, False)}"
        "</section>"
    )


def _counters(data: PageData) -> str:
    cards = "".join(
        f'<div class="card {css}"><b>{_e(value)}</b><span>{_e(label)}</span></div>'
        for label, value, css in data.counters
    )
    return f'<section id="counters"><h2>Counters</h2><div class="cards">{cards}</div></section>'


def _map(data: PageData) -> str:
    legend = (
        '<div class="legend">'
        '<span><i class="granted"></i>granted by the policy</span>'
        '<span><i class="unused"></i>granted, unused by recent traffic</span>'
        '<span><i class="used"></i>used (allowed requests)</span>'
        '<span><i class="denied"></i>denied attempts</span>'
        "<span>boxes: policy patterns; ellipses: identities; yellow: routes</span>"
        "</div>"
    )
    notes = []
    if data.graph.omitted:
        notes.append(
            f"{data.graph.omitted} more identities seen in traffic are not drawn "
            "(the map shows the most denied and the busiest first)."
        )
    if data.map_note:
        notes.append(data.map_note)
    note = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    if data.map_svg is not None:
        body = f'<div class="map" id="map-svg">{_svg_body(data.map_svg)}</div>'
    else:
        body = _map_table(data.graph)
    return f'<section id="map"><h2>Identity map</h2>{legend}{note}{body}</section>'


def _svg_body(svg: str) -> str:
    """Graphviz's SVG without its XML prolog, doctype and comments, for inlining."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else ""


def _map_table(graph: Graph) -> str:
    by_key = graph.node_by_key
    rows = []
    for e in graph.edges:
        kind = e.kind + (" (unused)" if e.unused else "")
        css = "bad" if e.kind == identity_map.DENIED else ""
        rows.append(
            f'<tr class="{css}"><td class="id">{_e(by_key[e.source].label)}</td>'
            f"<td>{_e(by_key[e.target].label)}</td><td>{_e(kind)}</td>"
            f'<td class="num">{_e(e.count or "")}</td>'
            f"<td>{_e(e.label if e.kind == identity_map.DENIED else '')}</td></tr>"
        )
    if not rows:
        return '<p class="empty">The policy grants nothing and no traffic was seen.</p>'
    return (
        '<table id="map-table"><thead><tr><th>identity</th><th>route</th><th>edge</th>'
        f"<th>requests</th><th>reasons</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _expiry(data: PageData) -> str:
    rows = []
    for x in data.expiries:
        css = ""
        if x.not_after is not None and x.not_after <= data.now:
            css = "bad"
        elif x.not_after is not None and x.not_after - data.now < SOON:
            css = "warn"
        when = x.not_after.strftime("%Y-%m-%d %H:%M:%SZ") if x.not_after else ""
        rows.append(
            f'<tr class="{css}"><td>{_e(x.kind)}</td><td class="id">{_e(x.name)}</td>'
            f'<td class="wrap">{_e(x.subject)}</td><td>{_e(when)}</td>'
            f"<td>{_e(_remaining(x.not_after, data.now))}</td></tr>"
        )
    return (
        '<section id="expiry"><h2>Certificate expiry</h2>'
        '<p class="muted">The proxy\'s own SVID, the CAs of its trust bundles and the client '
        "credentials seen, the nearest expiry first.</p>"
        '<table id="expiry-table"><thead><tr><th>kind</th><th>identity / trust domain</th>'
        "<th>subject</th><th>not after</th><th>expires</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _policy(data: PageData) -> str:
    p = data.policy
    info = (
        f'<tr><th>file</th><td class="mono">{_e(p.file)}</td></tr>'
        f'<tr><th>version (SHA-256)</th><td class="mono" id="policy-sha">{_e(p.sha256)}</td></tr>'
        f"<tr><th>routes</th><td>{_e(p.routes)}</td></tr>"
        f"<tr><th>loaded</th><td>{_e(p.loaded_at)}</td></tr>"
    )
    note = f'<p class="note">{_e(p.note)}</p>' if p.note else ""
    rows = []
    for r in reload_rows(data.reloads):
        times = f" (x{r.count}: one per process)" if r.count > 1 else ""
        errors = "".join(f"<div>{_e(err)}</div>" for err in r.errors)
        rows.append(
            f'<tr class="{"" if r.ok else "bad"}"><td>{_time(r.time)}</td><td>{_e(r.what)}</td>'
            f'<td class="{"ok" if r.ok else "bad"}">{"ok" if r.ok else "failed"}{_e(times)}</td>'
            f'<td class="mono">{_e(r.location)}</td>'
            f'<td class="wrap">{errors or _e(r.detail)}</td></tr>'
        )
    history = (
        '<table id="reloads"><thead><tr><th>time</th><th>what</th><th>result</th>'
        f"<th>file:line:column</th><th>detail</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p class="empty" id="reloads-empty">No reloads since the proxy started.</p>'
    )
    return (
        f'<section id="policy"><h2>Policy</h2>{note}<table class="kv">{info}</table>'
        f"<h3>Reload history (newest first)</h3>{history}</section>"
    )


def _drift(data: PageData) -> str:
    if not data.drift:
        body = '<p class="empty" id="drift-empty">No identity drift alerts.</p>'
    else:
        rows = []
        for ev in reversed(data.drift):
            evidence = {
                k: v for k, v in ev.items() if k not in ("time", "event", "kind", "spiffe_id")
            }
            text = json.dumps(evidence, sort_keys=True, default=str)
            rows.append(
                f'<tr class="warn"><td>{_time(str(ev.get("time", "")))}</td>'
                f'<td>{_e(ev.get("kind"))}</td><td class="id">{_e(ev.get("spiffe_id"))}</td>'
                f'<td class="mono wrap">{_e(text)}</td></tr>'
            )
        body = (
            '<table id="drift"><thead><tr><th>time</th><th>kind</th><th>identity</th>'
            f"<th>evidence</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    return f'<section id="drift-alerts"><h2>Identity drift alerts</h2>{body}</section>'


def render(data: PageData, filters: Filters) -> str:
    """The whole page."""
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in data.notes)
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (
            ("decisions", "decisions"),
            ("map", "identity map"),
            ("expiry", "expiry"),
            ("policy", "policy"),
            ("drift-alerts", "drift"),
        )
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="refresh" content="30">'
        f"<title>spiffe-pep admin</title><style>{STYLE}</style></head><body>"
        f"<header><h1>spiffe-pep</h1><span>{_e(data.own_id)}</span>"
        f"<span>version {_e(data.version)}; served by {_e(data.served_by)}; "
        f"{_e(data.now.strftime('%Y-%m-%d %H:%M:%SZ'))}</span><nav>{nav}</nav></header>"
        f"<main>{notes}{_counters(data)}{_decisions(data, filters)}{_map(data)}"
        f"{_expiry(data)}{_policy(data)}{_drift(data)}</main></body></html>\n"
    )


def node_link(node: identity_map.Node) -> str:
    """Where a map node leads: the decisions filtered by it."""
    key = "route" if node.kind == identity_map.ROUTE else "identity"
    return f"?{key}={quote(node.label, safe='/:*')}#decisions"
