"""Sequential decoding in one process: the oracle every other strategy must reproduce token for token.

    prefill:  the prompt, in the canonical chunks of `kernels.prefill_chunks`, through all layers
    decode:   repeat: next = argmax(logits of the last row) — or, when sampling, the Gumbel-max
              sample keyed by (seed, position) (`minipipe.sampling`); run `next` as a one-row batch

Generation stops by the rules of `generation.TokenSink` (eos, token budget, context).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import kernels
from .batch import Batch
from .generation import Generation, TokenSink, check_prompt
from .kvcache import KVCache
from .model import StageModel
from .sampling import GREEDY, Sampling

__all__ = ["Generation", "check_prompt", "generate_greedy", "prefill"]


def prefill(model: StageModel, cache: KVCache, prompt_ids: Sequence[int], seq_ids: tuple[int, ...] = (0,)) -> np.ndarray:
    """Run the prompt in canonical chunks; return the logits of its last token.  -> [V]"""
    n = len(prompt_ids)
    logits = None
    for start, end in kernels.prefill_chunks(n):
        batch = Batch.chain(prompt_ids[start:end], start, seq_ids, want_logits="last" if end == n else "none",
                            prefill=True)
        logits = model.forward(cache, batch)
    return logits[-1]


def generate_greedy(model: StageModel, prompt_ids: Sequence[int], max_new_tokens: int,
                    eos_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None,
                    sampling: Sampling | None = None) -> Generation:
    """Sequential decoding of `max_new_tokens` at most: greedy, or sampled with `sampling` (the
    token at position p from the logits and the noise keyed by (seed, p)); `on_token` is called
    with each new id. The oracle of every strategy."""
    choose = (GREEDY if sampling is None else sampling).choose
    c = model.config
    prompt = check_prompt(prompt_ids, c.vocab_size, c.max_positions)
    sink = TokenSink(len(prompt), max_new_tokens, eos_ids, c.max_positions, on_token)
    sink.metrics.start()
    if not sink.done:
        cache = model.new_cache(capacity=min(len(prompt) + max_new_tokens, c.max_positions))
        logits = prefill(model, cache, prompt)
        while not sink.add([choose(logits, sink.n_prompt + len(sink.tokens))]):
            logits = model.forward(cache, Batch.chain([sink.tokens[-1]], sink.next_position))[0]
    return sink.result()
