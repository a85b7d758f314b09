"""Shared test fixtures: hypothesis profiles, the reference checkpoints beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"

settings.register_profile(
    "default", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "slow", deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("MINIPIPE_HYPOTHESIS_PROFILE", "default"))


def shared_model(name: str) -> Path:
    """A reference checkpoint from ../shared/models, or skip the test where it is absent."""
    path = SHARED_MODELS / name
    if not (path / "config.json").is_file():
        pytest.skip(f"reference checkpoint {path} is not available")
    return path


@pytest.fixture
def stories260k() -> Path:
    return shared_model("stories260k")
