"""Sampling settings: temperature, top-k, top-p, min-p and a seed — exact under every strategy.

Terms:

* **Gumbel-max** — sampling from softmax(z / T) is the same as taking argmax(z / T + g) with g
  i.i.d. standard Gumbel noise over the vocabulary.
* **keyed noise** — the noise for the token at position p is a pure function of (seed, p)
  (`kernels.gumbel_noise`: a counter-based generator keyed by the pair), never drawn from a
  stream that advances with work done. So the token sampled at p is a deterministic function of
  the context and the seed, exactly like the greedy argmax: every strategy verifies drafts
  against the target's *sampled* token and emits exactly the tokens of plain sequential
  sampling with the same seed, under any batching, interleaving or cancellation.
* **filters** — top-k, then top-p, then min-p restrict the candidates before the argmax (the
  order transformers applies them in); temperature 0 is greedy decoding.
* **coupled drafting** — a draft proposes with the *same* noise at the same positions, so when
  draft and target agree in distribution they usually pick the same token.

Defaults come from the checkpoint's `generation_config.json` the way transformers reads it:
sampling only if `do_sample` is true, then its `temperature`, `top_k`, `top_p`, `min_p`.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import kernels
from .errors import InputError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no top-p filter
    min_p: float = 0.0  # 0: no min-p filter
    seed: int = 0

    def __post_init__(self) -> None:
        checks = ((self.temperature, "temperature", 0.0, math.inf), (self.top_p, "top_p", 0.0, 1.0),
                  (self.min_p, "min_p", 0.0, 1.0))
        for value, name, lo, hi in checks:
            if not (isinstance(value, (int, float)) and lo <= value <= hi) or math.isnan(value) \
                    or (name == "temperature" and math.isinf(value)):
                raise InputError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
        if self.top_p == 0.0:
            raise InputError("top_p must be above 0 (1 keeps every token)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 64:
            raise InputError(f"seed must be an integer in 0..2**64-1, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def row(self) -> np.ndarray:
        """The settings as one row of a batch's `sampling` array.  -> [4] float32"""
        return np.array([self.temperature, self.top_k, self.top_p, self.min_p], dtype=np.float32)

    def choose(self, logits: np.ndarray, position: int) -> int:
        """The token at `position` after `logits` ([V]): the argmax, or the keyed Gumbel-max sample."""
        return kernels.choose_token(logits, position, self.seed, self.temperature, self.top_k, self.top_p,
                                    self.min_p)

    def scores(self, logits: np.ndarray, position: int) -> np.ndarray:
        """What a coupled draft ranks by: the perturbed temperature-scaled logits, -inf outside
        the filters (the greedy argmax's own logits when greedy).  [V] -> [V]"""
        if self.greedy:
            return logits
        scaled = (logits / np.float32(self.temperature)).astype(np.float32)
        keep = kernels.sampling_candidates(scaled, self.top_k, self.top_p, self.min_p)
        return np.where(keep, scaled + kernels.gumbel_noise(self.seed, position, scaled.shape[0]), -np.inf)

    def with_seed(self, seed: int | None) -> "Sampling":
        """These settings with `seed`, or a fresh random one when None (reported, so reproducible)."""
        return replace(self, seed=secrets.randbits(63) if seed is None else seed)

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                "seed": self.seed}


GREEDY = Sampling()


def from_generation_config(model_dir: str | Path) -> Sampling:
    """The checkpoint's sampling defaults as transformers reads `generation_config.json`: greedy
    unless `do_sample` is true; then temperature 1, top_k 50, top_p 1 unless the file says otherwise."""
    from .config import read_json

    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return GREEDY
    raw = read_json(path, "generation_config.json")
    if not isinstance(raw, dict) or not raw.get("do_sample", False):
        return GREEDY
    try:
        return Sampling(temperature=float(raw.get("temperature", 1.0)), top_k=int(raw.get("top_k", 50) or 0),
                        top_p=float(raw.get("top_p", 1.0) or 1.0), min_p=float(raw.get("min_p", 0.0) or 0.0))
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: unreadable sampling settings ({e})") from None
