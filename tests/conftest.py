"""Shared fixtures: a PKI written to disk with every certificate the attacks need."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from proxy.bundle import spiffe_bundle_json
from proxy.devcerts import Issued, issue_ca, issue_svid

CLIENT_ID = "spiffe://example.org/ns/prod/sa/client"
DENIED_ID = "spiffe://example.org/ns/dev/sa/denied"
PARTNER_ID = "spiffe://partner.org/ns/payments/sa/api"
SERVER_ID = "spiffe://example.org/ns/edge/sa/spiffe-pep"


@dataclass
class Pki:
    dir: Path
    root: Issued
    intermediate: Issued
    partner_root: Issued

    def write(self, name: str, issued: Issued) -> tuple[str, str]:
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}_key.pem"
        cert.write_bytes(issued.chain_pem())
        key.write_bytes(issued.key_pem())
        return str(cert), str(key)

    def svid(
        self, name: str, uris: list[str], issuer: Issued | None = None, **kwargs: object
    ) -> tuple[str, str]:
        return self.write(name, issue_svid(issuer or self.intermediate, uris, **kwargs))  # type: ignore[arg-type]

    def client_args(self, cert: str = "client") -> list[str]:
        """curl's flags to verify the server against the bundle and present ``cert``."""
        return [
            "--cacert",
            self.bundle,
            "--cert",
            f"{self.dir}/{cert}.pem",
            "--key",
            f"{self.dir}/{cert}_key.pem",
        ]

    @property
    def bundle(self) -> str:
        return str(self.dir / "bundle.pem")

    @property
    def partner_bundle(self) -> str:
        return str(self.dir / "partner.spiffe.json")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    root = issue_ca("example.org")
    intermediate = issue_ca("example.org", parent=root, common_name="example.org intermediate")
    partner_root = issue_ca("partner.org")
    (d / "bundle.pem").write_bytes(root.cert_pem())
    (d / "partner.spiffe.json").write_text(spiffe_bundle_json([partner_root.cert], sequence=1))
    p = Pki(d, root, intermediate, partner_root)
    p.write("server", issue_svid(intermediate, [SERVER_ID], dns=["localhost"], ips=["127.0.0.1"]))
    p.svid("client", [CLIENT_ID])
    p.svid("denied", [DENIED_ID])
    p.svid("partner", [PARTNER_ID], issuer=partner_root)
    # Attacks and malformed SVIDs.
    p.svid("untrusted", [CLIENT_ID], issuer=issue_ca("example.org", common_name="rogue CA"))
    p.svid("confused", [CLIENT_ID], issuer=partner_root)  # partner.org's CA mints example.org
    p.svid("no_uri", [], dns=["client.example.org"])
    now = dt.datetime.now(dt.UTC)
    p.svid(
        "expired",
        [CLIENT_ID],
        not_before=now - dt.timedelta(days=2),
        not_after=now - dt.timedelta(days=1),
    )
    p.svid("leaf_ca", [CLIENT_ID], ca=True)
    return p


# Property-based tests: "ci" (the default) keeps the suite inside its budget with thousands
# of examples in all; HYPOTHESIS_PROFILE=fuzz runs a hundred times more.
FUZZ_FACTOR = 100 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1
settings.register_profile("ci", max_examples=1000, deadline=None, print_blob=True)
settings.register_profile("fuzz", max_examples=100_000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> settings:
    """Settings for a property whose examples are dear: ``n`` under "ci", scaled under "fuzz"."""
    return settings(max_examples=n * FUZZ_FACTOR)
