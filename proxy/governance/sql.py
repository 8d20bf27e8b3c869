"""Every SQL statement the governance commands run, as text: the one place for SQL.

DuckDB runs them (``engine.py``): it reads JSON lines, plain or gzip, straight from the
files in parallel, and the same statements run over Parquet when logs outgrow one
machine (``read_parquet`` in place of ``read_json``). Every field is read as text and
parsed where it is used, so a line of another version (a field missing, or of another
type) never stops a run; a line that is not a JSON object reads as all nulls and is
counted as unreadable. Times compare as text: the log writes them in one fixed format
(``records.iso``).

Pure: builds strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from proxy.governance import records as R


def literal(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _columns() -> str:
    return "{" + ", ".join(f"{literal(name)}: 'VARCHAR'" for name in R.READ) + "}"


def source(plain: Sequence[str], gzipped: Sequence[str]) -> str:
    """The decision lines of every file, one row per line (empty lines are not rows)."""
    parts = []
    for files, compression in ((plain, "none"), (gzipped, "gzip")):
        if files:
            names = ", ".join(literal(f) for f in files)
            parts.append(
                f"SELECT * FROM read_json([{names}], format = 'newline_delimited', "
                f"columns = {_columns()}, ignore_errors = true, "
                f"compression = '{compression}')"
            )
    if not parts:
        raise ValueError("no input files")
    return " UNION ALL ".join(parts)


def kind(cutoff: str | None) -> str:
    """The kind of each line (``records.REQUEST`` ...); decision lines before ``cutoff``
    (an ISO time in the log's format) are outside the window."""
    window = f"WHEN time < {literal(cutoff)} THEN '{R.OUTSIDE_WINDOW}' " if cutoff else ""
    return (
        f"CASE WHEN event IS NULL THEN '{R.UNREADABLE}' "
        f"WHEN event <> 'request' THEN '{R.OTHER_EVENT}' {window}"
        f"ELSE '{R.REQUEST}' END"
    )


def _keep(columns: Iterable[str]) -> str:
    """Columns kept for decision lines only: other lines collapse to one row per kind."""
    return ", ".join(f"CASE WHEN kind = '{R.REQUEST}' THEN {c} END AS {c}" for c in columns)


# One request as a policy sees it (plus the logged verdict and where it went).
REQUEST_KEYS = (
    "spiffe_id",
    "origin_spiffe_id",
    "method",
    "host",
    "path",
    "jwt_presented",
    "jwt_sub",
    "jwt_aud",
    "decision",
    "reason",
    "route",
    "mode",
    "upstream",
)


def _lifetime_seconds() -> str:
    return (
        "epoch(try_cast(leaf_not_after AS TIMESTAMP)) - "
        "epoch(try_cast(leaf_not_before AS TIMESTAMP))"
    )


def request_groups(
    src: str,
    cutoff: str | None = None,
    revoked_sha256: Iterable[str] = (),
    lifetime_limits: Iterable[float] = (),
) -> str:
    """Distinct requests with counts, first and last time, and the credential of the
    latest line. Credentials are grouped into the classes a policy can tell apart:
    revoked (by fingerprint, for the peer and the origin), lifetime against each limit in
    ``lifetime_limits`` (seconds), and expired at the time of the request. Everything
    else of a certificate is invisible to the policy (``proxy/policy/evaluate.py``)."""
    revoked = sorted(set(revoked_sha256))
    if revoked:
        listed = ", ".join(literal(s) for s in revoked)
        peer_class = f"CASE WHEN leaf_sha256 IN ({listed}) THEN leaf_sha256 ELSE '' END"
        origin_class = f"CASE WHEN origin_sha256 IN ({listed}) THEN origin_sha256 ELSE '' END"
    else:
        peer_class = origin_class = "''"
    limits = sorted(set(lifetime_limits))
    if limits:
        life = _lifetime_seconds()
        over = " + ".join(f"CAST(({life}) > {limit!r} AS INTEGER)" for limit in limits)
        bucket = f"coalesce({over}, -1)"
    else:
        bucket = "0"
    expired = "coalesce(time > leaf_not_after, false)"
    classes = (
        f"{peer_class} AS c_revoked, {origin_class} AS origin_sha256, "
        f"{bucket} AS c_lifetime, {expired} AS c_expired"
    )
    return (
        f"SELECT kind, {', '.join(REQUEST_KEYS)}, origin_sha256, c_revoked, c_lifetime, "
        f"c_expired, count(*) AS n, min(time) AS first, max(time) AS last, "
        f"arg_max([leaf_sha256, leaf_not_before, leaf_not_after, time], time) AS rep "
        f"FROM (SELECT kind, {_keep(REQUEST_KEYS)}, {_keep(['origin_sha256'])}, "
        f"CASE WHEN kind = '{R.REQUEST}' THEN c_revoked END AS c_revoked, "
        f"CASE WHEN kind = '{R.REQUEST}' THEN c_lifetime END AS c_lifetime, "
        f"CASE WHEN kind = '{R.REQUEST}' THEN c_expired END AS c_expired, "
        f"time, leaf_sha256, leaf_not_before, leaf_not_after "
        f"FROM (SELECT {kind(cutoff)} AS kind, * EXCLUDE (origin_sha256), {classes} "
        f"FROM ({src}))) "
        f"GROUP BY ALL"
    )


USAGE_KEYS = (
    "spiffe_id",
    "origin_spiffe_id",
    "origin_sha256",
    "leaf_sha256",
    "peer_ip",
    "route",
    "decision",
)


def usage(src: str, cutoff: str | None = None) -> str:
    """Decision lines per identity, credential, address, route and verdict (what
    ``inventory`` reports on), with the credential's facts, counts and first/last use."""
    peer_ip = (
        "CASE WHEN starts_with(peer_addr, '[') "
        "THEN split_part(substr(peer_addr, 2), ']', 1) "
        "ELSE split_part(peer_addr, ':', 1) END"
    )
    return (
        f"SELECT kind, {', '.join(USAGE_KEYS)}, any_value(leaf_issuer) AS leaf_issuer, "
        f"any_value(leaf_not_before) AS leaf_not_before, "
        f"any_value(leaf_not_after) AS leaf_not_after, "
        f"count(*) AS n, min(time) AS first, max(time) AS last "
        f"FROM (SELECT kind, {_keep(USAGE_KEYS)}, leaf_issuer, leaf_not_before, "
        f"leaf_not_after, time "
        f"FROM (SELECT {kind(cutoff)} AS kind, *, {peer_ip} AS peer_ip FROM ({src}))) "
        f"GROUP BY kind, {', '.join(USAGE_KEYS)}"
    )
