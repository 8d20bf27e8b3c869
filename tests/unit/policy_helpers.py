from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from proxy.spiffe_id import SpiffeId

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class FakeCaller:
    """A verified mTLS peer as the policy sees it (the policy never sees certificates)."""

    spiffe_id: SpiffeId
    fingerprint: str
    not_before: dt.datetime
    not_after: dt.datetime


def caller(
    spiffe_id: str,
    *,
    sha: str = "ab" * 32,
    lifetime: dt.timedelta = dt.timedelta(hours=1),
    age: dt.timedelta = dt.timedelta(minutes=5),
) -> FakeCaller:
    start = NOW - age
    return FakeCaller(SpiffeId.parse(spiffe_id), sha, start, start + lifetime)
