"""Shared test fixtures: hypothesis profiles, the shipped model pair, and the reference
checkpoints (stories260k and its draft) that the development machine keeps in a folder beside the
repository. A clone lacks them: the tests that use them skip, saying so, and also run on the
shipped pair."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
SHIPPED_MODELS = REPO / "models"

settings.register_profile(
    "default", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "slow", deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("MINIPIPE_HYPOTHESIS_PROFILE", "default"))


def shared_model(name: str) -> Path:
    """A reference checkpoint beside the repository, or skip the test (saying why) where it is absent."""
    path = SHARED_MODELS / name
    if not (path / "config.json").is_file():
        pytest.skip(f"reference checkpoint {name} is not beside this checkout (a clone lacks it; "
                    "the shipped pair covers the same test)")
    return path


@pytest.fixture
def stories260k() -> Path:
    return shared_model("stories260k")


@dataclass(frozen=True)
class ReferencePair:
    """A real target with a real draft that shares its tokenizer, and a prompt for both."""

    name: str
    target: Path
    draft: Path
    prompt: tuple[int, ...]  # token ids, BOS included
    eos: tuple[int, ...]
    max_positions: int


def reference_pair(name: str) -> ReferencePair:
    if name == "tinybard":  # shipped in models/: always there
        return ReferencePair(name, SHIPPED_MODELS / "tinybard", SHIPPED_MODELS / "tinybard-draft",
                             (1, 1889, 28, 201), (2,), 512)  # "ROMEO:\n"
    return ReferencePair(name, shared_model("stories260k"), shared_model("stories260k-draft"),
                         (1, 403, 407, 261, 378), (2,), 512)  # "Once upon a time"


@pytest.fixture(params=["tinybard", "stories260k"])
def pair(request) -> ReferencePair:
    """Each real target/draft pair: the shipped tinybard pair, and stories260k where present."""
    return reference_pair(request.param)
