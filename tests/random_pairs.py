"""A seeded random target and draft sharing a vocabulary, for the strategy tests.

`RandomPair` gives the target split into stages (cached), the greedy continuation that every
strategy must reproduce (the oracle), and draft sources from always wrong to always right.
"""

from __future__ import annotations

from functools import lru_cache

from minipipe.draft import DraftModel, MergedDraft, NgramDraft, OracleDraft, self_draft_model
from minipipe.greedy import generate_greedy
from minipipe.runtime import split_layers
from minipipe.synthetic import random_model

ORACLE_P = {"never": 0.0, "always": 1.0, "half": 0.5, "mostly": 0.85}
DRAFT_KINDS = ["model", "ngram", "self", "merged", *ORACLE_P]


class RandomPair:
    def __init__(self, target: dict, draft: dict, draft_seed: int):
        self.target, self.draft, self.draft_seed = target, draft, draft_seed
        self.stage_models = lru_cache(maxsize=None)(self._stage_models)
        self.truth = lru_cache(maxsize=None)(self._truth)
        self.draft_model = lru_cache(maxsize=None)(self._draft_model)

    @property
    def vocab_size(self) -> int:
        return self.target["vocab_size"]

    @property
    def max_positions(self) -> int:
        return self.target["max_positions"]

    def _stage_models(self, seed: int, n_stages: int):
        return [random_model(seed=seed, lo=lo, hi=hi, **self.target)
                for lo, hi in split_layers(self.target["n_layers"], n_stages)]

    def _truth(self, seed: int, prompt: tuple[int, ...], n: int) -> list[int]:
        """Greedy decoding of the whole target: the oracle."""
        return generate_greedy(random_model(seed=seed, **self.target), list(prompt), n).tokens

    def _draft_model(self, seed: int):
        return random_model(seed=self.draft_seed + seed, **self.draft)

    def self_draft(self, seed: int, n_stages: int = 1, k: int = 1):
        """Self-speculation: the target's own first k layers (sharing the stage models' arrays)."""
        return DraftModel(self_draft_model(self.stage_models(seed, n_stages), k))

    def make_draft(self, kind: str, seed: int, prompt, n: int, n_stages: int = 1):
        """A draft source: a random draft model, prompt lookup, the target's own first layers
        ("self"), several merged ("merged": model + self + n-gram), or an oracle right with some p."""
        if kind == "model":
            return DraftModel(self.draft_model(seed))
        if kind == "ngram":
            return NgramDraft()
        if kind == "self":
            return self.self_draft(seed, n_stages, k=1 + seed % (self.target["n_layers"] - 1))
        if kind == "merged":
            return MergedDraft([DraftModel(self.draft_model(seed)), self.self_draft(seed, n_stages), NgramDraft()])
        return OracleDraft(self.truth(seed, tuple(prompt), n) + [0] * 30, ORACLE_P[kind], self.vocab_size,
                           seed=seed)
