"""The atheris targets in tests/fuzz run on their seeds and on random bytes here, so the
harness for long fuzzing runs cannot rot between those runs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import examples
from tests.fuzz.targets import SEEDS, TARGETS


def test_every_target_has_seeds() -> None:
    assert set(SEEDS) == set(TARGETS)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_accepts_its_seeds(name: str) -> None:
    for seed in SEEDS[name]:
        TARGETS[name](seed)


@pytest.mark.parametrize("name", sorted(TARGETS))
@examples(200)
@given(data=st.data())
def test_target_survives_mutated_seeds(name: str, data: st.DataObject) -> None:
    target: Callable[[bytes], None] = TARGETS[name]
    seed = data.draw(st.sampled_from(SEEDS[name]))
    cut = data.draw(st.integers(0, len(seed)))
    target(seed[:cut] + data.draw(st.binary(max_size=20)) + seed[cut:])
