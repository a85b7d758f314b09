"""Where models live: the shipped default pair, the user's cache, and names for both.

* The **default pair** ships with minipipe in `models/` (a target and a much smaller draft that
  share one tokenizer); `minipipe generate` uses it when no `--model` is given.
* **Imported models** (e.g. `minipipe pull smollm2-135m`) are converted into the cache,
  `$MINIPIPE_HOME` (default `~/.cache/minipipe`), one directory per model under `models/`.
* A `--model` argument is a directory, or the name of a shipped or imported model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

DEFAULT_TARGET = "tinybard"
DEFAULT_DRAFT = "tinybard-draft"


def shipped_models_dir() -> Path:
    """`models/` installed as package data (minipipe/models), or of the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "models", here.parent / "models"):
        if candidate.is_dir():
            return candidate
    return here.parent / "models"


def minipipe_home() -> Path:
    return Path(os.environ.get("MINIPIPE_HOME") or Path.home() / ".cache" / "minipipe")


def cache_models_dir() -> Path:
    return minipipe_home() / "models"


def resolve_model(name_or_dir: str | os.PathLike | None, default: str = DEFAULT_TARGET) -> Path:
    """A checkpoint directory for `--model` (None: the shipped default)."""
    if name_or_dir is None:
        name_or_dir = default
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.name == str(name_or_dir):  # a bare name: look it up
        for base in (shipped_models_dir(), cache_models_dir()):
            if (base / path.name / "config.json").is_file():
                return base / path.name
        raise CheckpointError(
            f"no model named {str(name_or_dir)!r} (not a directory, not shipped in {shipped_models_dir()}, "
            f"not imported into {cache_models_dir()}; see `minipipe pull --help`)")
    raise CheckpointError(f"model directory not found: {path}")
