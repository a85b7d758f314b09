"""Greedy decoding in one process: the oracle every other strategy must reproduce token for token.

    prefill:  the prompt, in the canonical chunks of `kernels.prefill_chunks`, through all layers
    decode:   repeat: next = argmax(logits of the last row); run `next` as a one-row batch

Generation stops at an end-of-sequence id (which is emitted), after `max_new_tokens`, or when
the next position would not fit the model's context (`max_position_embeddings`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import kernels
from .batch import Batch
from .errors import InputError
from .kvcache import KVCache
from .metrics import GenerationMetrics
from .model import StageModel


@dataclass
class Generation:
    tokens: list[int]  # generated ids only (an eos that stopped generation is included)
    stop_reason: str  # "eos", "length" (token budget) or "context" (model's context is full)
    metrics: GenerationMetrics


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, max_positions: int) -> list[int]:
    """Validate a prompt for a model; raise InputError with a one-line reason."""
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise InputError("the prompt is empty (give some text or --prompt-ids)")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if len(ids) > max_positions:
        raise InputError(f"the prompt has {len(ids)} tokens but the model's context holds {max_positions}")
    return ids


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
                    eos_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None) -> Generation:
    """Greedy decoding of `max_new_tokens` at most; `on_token` is called with each new id."""
    c = model.config
    prompt = check_prompt(prompt_ids, c.vocab_size, c.max_positions)
    if max_new_tokens < 0:
        raise InputError("--max-new-tokens must be >= 0")
    metrics = GenerationMetrics(n_prompt_tokens=len(prompt))
    metrics.start()
    cache = model.new_cache(capacity=min(len(prompt) + max_new_tokens, c.max_positions))
    tokens: list[int] = []
    stop_reason = "length"
    if max_new_tokens > 0:
        logits = prefill(model, cache, prompt)
        eos = set(eos_ids)
        while True:
            token = int(kernels.argmax_rows(logits[None, :])[0])
            tokens.append(token)
            metrics.token()
            if on_token is not None:
                on_token(token)
            pos = len(prompt) + len(tokens) - 1  # where `token` goes if we continue
            if token in eos:
                stop_reason = "eos"
                break
            if len(tokens) >= max_new_tokens:
                break
            if pos >= c.max_positions:
                stop_reason = "context"
                break
            logits = model.forward(cache, Batch.chain([token], pos))[0]
    metrics.finish()
    return Generation(tokens=tokens, stop_reason=stop_reason, metrics=metrics)
