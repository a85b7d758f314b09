"""Speculative decoding with a draft chain, pico version (the greedy case).

Paper: Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding"
(ICML 2023), Algorithm 1 (SpeculativeDecodingStep). Under greedy decoding its acceptance test
(keep guess x with probability min(1, p(x) / q(x))) becomes: keep a guess iff it is the target's
argmax. One step, with R = the position of the root, the last committed token (its K/V is not
in the cache yet):

  1. draft     the small model guesses k tokens, one after another (its argmax each time)
  2. verify    ONE target forward pass over [root, guess 1, ..., guess k] at positions R..R+k;
               row i's argmax is the target's own choice after guess i (row 0: after the root)
  3. accept    the guesses up to the first one the target disagrees with, plus the target's
               choice there (the "bonus" token: every step commits at least one token)
  4. roll back the rejected guesses' rows leave the KV cache (seq_rm); the accepted ones stay

Only target argmaxes over the committed text are committed, so the output is greedy decoding's:
the draft decides how many tokens a pass yields, never which.

Simplified compared with minipipe/strategies/speculative.py (SpeculativeStrategy): the stages run
one after another (a verification is one trip through the pipeline; see pipeline.py for the
trip itself); the chain is written straight into sequence 0 and rolled back, where the real
strategy lends it sequence ids of its own (minipipe/multibuffer.py, as tree.py does); a fixed
k, no confidence cutoff, no end-of-text rule.

    python examples/pico/speculative.py
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minipipe import kernels  # noqa: E402
from minipipe.batch import Batch  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.kvcache import KVCache  # noqa: E402
from minipipe.model import StageModel, load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402

K = 4  # guesses per step (the speculation length γ of the paper)
N_STAGES, N_TOKENS = 2, 24  # the demo's knobs


class Draft:
    """The draft model's guesses. Its KV cache holds the last context it was asked about (sequence
    0); for a new context it keeps the common prefix, forgets the rest (seq_rm), runs the new tokens."""

    def __init__(self, model: StageModel):
        self.model, self.cache, self.seen = model, model.new_cache(), []

    def top(self, context: list[int], k: int) -> list[tuple[int, float]]:
        """The k most probable next tokens after `context`, with the draft's probabilities."""
        keep = 0  # positions to keep: the common prefix, but at least the last token is rerun
        while keep < min(len(self.seen), len(context) - 1) and self.seen[keep] == context[keep]:
            keep += 1
        self.cache.seq_rm(0, keep)  # forget positions >= keep
        logits = self.model.forward(self.cache, Batch.chain(context[keep:], keep, want_logits="last"))  # [1, V]
        self.seen = list(context)
        probs = kernels.softmax(logits[0])  # [V]
        best = np.argsort(-probs, kind="stable")[:k]
        return [(int(t), float(probs[t])) for t in best]


def forward(stages: list[StageModel], caches: list[KVCache], batch: Batch) -> np.ndarray:
    """One trip through every stage.  -> logits [T', V] of the rows that want them"""
    hidden = None
    for stage, cache in zip(stages, caches):
        hidden = stage.forward(cache, batch, hidden)  # [T, D] between stages; logits after the last
    return hidden


def generate(stages: list[StageModel], draft_model: StageModel, prompt: list[int], n_new: int, k: int = K,
             counts: Counter | None = None) -> list[int]:
    """`n_new` tokens of greedy decoding, verified k guesses at a time; `counts` counts passes and guesses."""
    counts = Counter() if counts is None else counts
    caches = [stage.new_cache(capacity=len(prompt) + n_new + k) for stage in stages]
    draft = Draft(draft_model)
    for start, end in kernels.prefill_chunks(len(prompt)):  # the prompt, in the canonical chunks
        logits = forward(stages, caches, Batch.chain(prompt[start:end], start, want_logits="last", prefill=True))
    out = [int(kernels.argmax_rows(logits)[-1])]  # the first token: the first root

    while len(out) < n_new:
        context = prompt + out
        root_pos = len(context) - 1
        # 1. draft: up to k guesses, never past the token budget
        guesses: list[int] = []
        for _ in range(min(k, n_new - len(out) - 1)):
            guesses.append(draft.top(context + guesses, 1)[0][0])
        # 2. verify: root and guesses in one pass; row i sees the committed prefix and rows <= i
        batch = Batch.chain([out[-1]] + guesses, root_pos)  # [k + 1] rows, positions R..R+k, sequence 0
        choices = kernels.argmax_rows(forward(stages, caches, batch))  # [k + 1, V] -> [k + 1]
        # 3. accept: the agreeing guesses, then the target's own choice (the bonus token)
        n_ok = 0
        while n_ok < len(guesses) and guesses[n_ok] == choices[n_ok]:
            n_ok += 1
        out += guesses[:n_ok] + [int(choices[n_ok])]
        counts["passes"] += 1
        counts["guesses"] += len(guesses)
        counts["accepted"] += n_ok
        # 4. roll back: the root's and the accepted guesses' K/V stay (positions R..R+n_ok)
        for cache in caches:
            cache.seq_rm(0, root_pos + n_ok + 1)
    return out


def main() -> None:
    """The shipped tinybard pair after "ROMEO:"; the result is checked against greedy decoding."""
    target_dir, draft_dir = resolve_model(None), resolve_model(None, default=DEFAULT_DRAFT)
    tokenizer, whole = Tokenizer(target_dir), load_stage(target_dir)
    L, S = whole.config.n_layers, N_STAGES
    stages = [load_stage(target_dir, L * s // S, L * (s + 1) // S) for s in range(S)]  # layers [lo, hi) per stage
    prompt = tokenizer.encode("ROMEO:")
    counts = Counter()
    tokens = generate(stages, load_stage(draft_dir), prompt, N_TOKENS, counts=counts)
    print(tokenizer.decode(prompt + tokens))
    print(f"\n{len(tokens) - 1} tokens after the first in {counts['passes']} target passes (greedy: one per token); "
          f"{counts['accepted']} of {counts['guesses']} guesses accepted")
    same = tokens == generate_greedy(whole, prompt, N_TOKENS).tokens
    print(f"same as greedy: {same}")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
