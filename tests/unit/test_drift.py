"""Subject drift (proxy.drift): what counts as drift given what was learned and an
observation, one row per rule; networks; learning; the ``drift:`` setting."""

from __future__ import annotations

import ipaddress
import textwrap
from typing import Any

import pytest

from proxy import drift
from proxy.drift import (
    CONCURRENT,
    CREDENTIAL_FACT,
    ISSUER_FACT,
    LIFETIME,
    LIFETIME_FACT,
    NETWORK_FACT,
    NEW_ISSUER,
    NEW_NETWORK,
    DriftConfig,
    Fact,
    Learned,
    Observation,
    Prefixes,
)
from proxy.errors import PolicyError
from proxy.policy import load_policy

NOW = 1_800_000_000.0
DAY = 86400.0
ID = "spiffe://example.org/ns/prod/sa/web"
SHA_X, SHA_Y = "aa" * 32, "bb" * 32


def obs(
    ip: str = "127.0.0.2",
    sha: str = SHA_X,
    issuer: str = "CN=intermediate",
    lifetime: float = 3600.0,
    at: float = NOW,
) -> Observation:
    address = ipaddress.ip_address(ip)
    return Observation(
        ID,
        ip,
        drift.network_of(address, Prefixes()),
        at,
        address,
        sha,
        issuer,
        lifetime,
        at + lifetime / 2,
    )


def learned_from(*observations: Observation) -> dict[tuple[str, str], Fact]:
    learned = Learned()
    for o in observations:
        learned.learn(drift.facts_of(o))
    return learned.known(ID)


# What was seen over two days, from 127.0.0.2, by one credential of one CA, 1 h certs.
HISTORY = (obs(at=NOW - 2 * DAY), obs(at=NOW - 60))
LEARNING = (obs(at=NOW - 3600),)  # first seen an hour ago: still learning (24h)

ROWS: list[tuple[str, tuple[Observation, ...], Observation, dict[str, Any], list[str]]] = [
    # name, history, observation, config, drift kinds found
    ("same_everything", HISTORY, obs(), {}, []),
    ("never_seen_id_starts_learning", (), obs(ip="10.9.9.9"), {}, []),
    ("new_network_after_learning", HISTORY, obs(ip="127.0.1.3", sha=SHA_X), {}, [NEW_NETWORK]),
    ("new_network_while_learning", LEARNING, obs(ip="127.0.1.3"), {}, []),
    ("same_network_other_address", HISTORY, obs(ip="127.0.0.77"), {}, []),
    ("outside_explicit_networks", (), obs(ip="127.0.0.3"),
     {"networks": (ipaddress.ip_network("127.0.0.2/32"),)}, [NEW_NETWORK]),
    ("inside_explicit_networks", LEARNING, obs(ip="127.0.1.3"),
     {"networks": (ipaddress.ip_network("127.0.0.0/16"),)}, []),
    ("concurrent_credentials_from_another_peer", HISTORY, obs(ip="127.0.0.3", sha=SHA_Y), {},
     [CONCURRENT]),
    ("rotation_from_the_same_peer", HISTORY, obs(sha=SHA_Y), {}, []),
    ("other_credential_no_longer_live", (obs(at=NOW - 2 * DAY), obs(at=NOW - 400)),
     obs(ip="127.0.0.3", sha=SHA_Y), {}, []),
    ("other_credential_expired", (obs(at=NOW - 2 * DAY, lifetime=60), obs(at=NOW - 40, lifetime=60)),
     obs(ip="127.0.0.3", sha=SHA_Y, lifetime=60), {}, []),
    ("new_issuer", HISTORY, obs(issuer="CN=rogue CA"), {}, [NEW_ISSUER]),
    ("lifetime_far_above", HISTORY, obs(lifetime=365 * DAY), {}, [LIFETIME]),
    ("lifetime_a_little_above", HISTORY, obs(lifetime=2 * 3600), {}, []),
    ("lifetime_factor_lowered", HISTORY, obs(lifetime=2 * 3600), {"lifetime_factor": 1.5},
     [LIFETIME]),
    ("kinds_not_judged", HISTORY, obs(ip="10.0.0.1", issuer="CN=rogue CA"),
     {"kinds": frozenset({LIFETIME})}, []),
    ("every_kind_at_once", HISTORY,
     obs(ip="10.0.0.1", sha=SHA_Y, issuer="CN=rogue CA", lifetime=30 * DAY), {},
     [NEW_NETWORK, CONCURRENT, NEW_ISSUER, LIFETIME]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("history", "observation", "config", "expected"),
    [r[1:] for r in ROWS],
    ids=[r[0] for r in ROWS],
)
def test_assess(
    history: tuple[Observation, ...],
    observation: Observation,
    config: dict[str, Any],
    expected: list[str],
) -> None:
    found = drift.assess(learned_from(*history), observation, DriftConfig(**config), NOW)
    assert [f.kind for f in found] == expected


def test_evidence_names_what_differs() -> None:
    found = drift.assess(
        learned_from(*HISTORY),
        obs(ip="127.0.1.3", sha=SHA_Y, issuer="CN=rogue CA", lifetime=30 * DAY),
        DriftConfig(),
        NOW,
    )
    evidence = {f.kind: f.evidence for f in found}
    assert evidence[NEW_NETWORK]["network"] == "127.0.1.0/24"
    assert evidence[NEW_NETWORK]["known_networks"] == ["127.0.0.0/24"]
    assert evidence[CONCURRENT]["other_sha256"] == SHA_X
    assert evidence[CONCURRENT]["other_peer"] == "127.0.0.2"
    assert evidence[NEW_ISSUER] == {"issuer": "CN=rogue CA", "known_issuers": ["CN=intermediate"]}
    assert evidence[LIFETIME]["longest_before_s"] == 3600


NETWORKS = [
    ("ipv4_24", "192.0.2.77", Prefixes(), "192.0.2.0/24"),
    ("ipv6_64", "2001:db8:1:2:3::4", Prefixes(), "2001:db8:1:2::/64"),
    ("ipv4_mapped", "::ffff:192.0.2.77", Prefixes(), "192.0.2.0/24"),
    ("ipv4_16", "192.0.2.77", Prefixes(ipv4=16), "192.0.0.0/16"),
]


@pytest.mark.parametrize(
    ("address", "prefixes", "expected"), [r[1:] for r in NETWORKS], ids=[r[0] for r in NETWORKS]
)
def test_network_of(address: str, prefixes: Prefixes, expected: str) -> None:
    assert drift.network_of(ipaddress.ip_address(address), prefixes) == expected


def test_learning_merges_sightings_and_reports_what_is_new() -> None:
    learned = Learned()
    first = learned.learn(drift.facts_of(obs(at=NOW - 100)))
    assert {f.kind for f in first} == {NETWORK_FACT, CREDENTIAL_FACT, ISSUER_FACT, LIFETIME_FACT}
    again = learned.learn(drift.facts_of(obs(at=NOW)))
    assert again == []  # only seen again: nothing new to write
    known = learned.known(ID)
    net = known[(NETWORK_FACT, "127.0.0.0/24")]
    assert (net.first_seen, net.last_seen) == (NOW - 100, NOW)
    longer = learned.learn(drift.facts_of(obs(at=NOW, lifetime=7200, sha=SHA_Y)))
    assert {f.kind for f in longer} == {CREDENTIAL_FACT, LIFETIME_FACT}
    assert learned.known(ID)[(LIFETIME_FACT, "")].value == 7200
    # A sighting read back from the store out of order keeps first/last straight.
    learned.learn([Fact(ID, NETWORK_FACT, "127.0.0.0/24", NOW - 500, NOW - 400, "127.0.0.9")])
    net = learned.known(ID)[(NETWORK_FACT, "127.0.0.0/24")]
    assert (net.first_seen, net.last_seen, net.peer) == (NOW - 500, NOW, "127.0.0.2")


def test_expired_credentials_are_forgotten() -> None:
    learned = Learned()
    learned.learn(drift.facts_of(obs(at=NOW - 3 * DAY, lifetime=3600)))
    learned.learn(drift.facts_of(obs(at=NOW, sha=SHA_Y)))
    learned.prune(NOW)
    creds = [k for (kind, k) in learned.known(ID) if kind == CREDENTIAL_FACT]
    assert creds == [SHA_Y]
    assert (ISSUER_FACT, "CN=intermediate") in learned.known(ID)  # the rest stays


POLICY = """\
drift: {mode: alert, learn: 12h, ipv4_prefix: 16}
routes:
  - name: strict
    match: {path_prefix: /admin}
    upstream: app
    allow: ["spiffe://example.org/*"]
    drift: {mode: deny, networks: [10.0.0.0/8]}
  - name: quiet
    match: {path_prefix: /health}
    upstream: app
    allow: ["spiffe://example.org/*"]
    drift: off
  - name: rest
    match: {path_prefix: /}
    upstream: app
    allow: ["spiffe://example.org/*"]
"""


def test_route_settings_override_the_policy_and_inherit_the_rest() -> None:
    policy = load_policy(POLICY.encode(), "policy.yaml")
    strict, quiet, rest = policy.routes
    assert policy.drift is not None and policy.drift.learn == 12 * 3600
    assert policy.drift_prefixes == Prefixes(ipv4=16)
    assert strict.drift is not None and strict.drift.mode == drift.DENY
    assert strict.drift.learn == 12 * 3600  # inherited
    assert strict.drift.networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert quiet.drift is None
    assert rest.drift is policy.drift
    assert policy.drift_configs == (policy.drift, strict.drift)
    assert policy.drift_deny == (strict.drift,)
    assert load_policy(POLICY.replace("drift", "# drift").encode()).drift_configs == ()


BAD = [
    ("bad_mode", "drift: {mode: block}", "drift mode must be 'alert' or 'deny'", "1:15"),
    ("bad_kind", "drift: {kinds: [clone]}", "unknown drift kind 'clone'", "1:17"),
    ("bad_network", "drift: {networks: [10.0.0.1/8]}", "host bits set", "1:20"),
    ("bad_factor", "drift: {lifetime_factor: 1}", "expected a number above 1", "1:26"),
    ("bad_learn", "drift: {learn: forever}", "expected a duration", "1:16"),
    ("bad_prefix", "drift: {ipv4_prefix: 33}", "an IPv4 prefix is 8 to 32 bits", "1:22"),
    ("unknown_key", "drift: {window: 1h}", "unknown key 'window'", "1:9"),
]


@pytest.mark.parametrize(
    ("text", "message", "where"), [r[1:] for r in BAD], ids=[r[0] for r in BAD]
)
def test_bad_drift_settings_name_the_place(text: str, message: str, where: str) -> None:
    doc = (
        text
        + "\n"
        + textwrap.dedent("""\
        routes:
          - {name: r, upstream: app, allow: []}
        """)
    )
    with pytest.raises(PolicyError) as err:
        load_policy(doc.encode(), "policy.yaml")
    assert message in str(err.value)
    assert f"policy.yaml:{where}" in str(err.value)


def test_prefixes_only_at_the_top() -> None:
    doc = "routes:\n  - {name: r, upstream: app, allow: [], drift: {ipv4_prefix: 16}}\n"
    with pytest.raises(PolicyError, match="unknown key 'ipv4_prefix'"):
        load_policy(doc.encode(), "policy.yaml")


STORES = [
    # name, config lines, expected drift_store (relative to /etc/pep)
    ("beside_a_file_decision_log", "decision_log: /var/log/pep/decisions.jsonl\n",
     "/var/log/pep/drift.sqlite"),
    ("memory_with_stdout", "decision_log: stdout\n", None),
    ("explicit_path", "drift_store: state/drift.sqlite\n", "/etc/pep/state/drift.sqlite"),
    ("explicit_memory", "decision_log: /var/log/d.jsonl\ndrift_store: memory\n", None),
]  # fmt: skip


@pytest.mark.parametrize(("lines", "expected"), [r[1:] for r in STORES], ids=[r[0] for r in STORES])
def test_drift_store_setting(lines: str, expected: str | None) -> None:
    from pathlib import Path

    from proxy.config import load_config

    doc = (
        textwrap.dedent("""\
        listen: 127.0.0.1:8443
        tls: {svid: s.pem, key: k.pem, bundles: {example.org: b.pem}}
        upstreams: {app: {url: "http://127.0.0.1:8080"}}
        policy: policy.yaml
        """)
        + lines
    )
    config = load_config(doc.encode(), "pep.yaml", Path("/etc/pep"))
    assert config.drift_store == (Path(expected) if expected else None)
