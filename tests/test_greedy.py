"""Greedy decoding: against an independent float64 implementation, a real checkpoint's golden
text, and its stopping rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minipipe.batch import Batch
from minipipe.config import ModelConfig
from minipipe.errors import InputError
from minipipe.greedy import generate_greedy
from minipipe.model import load_stage
from minipipe.synthetic import hf_config, random_model, random_tensors
from minipipe.tokenizer import Tokenizer

from . import reference_llama
from .conftest import shared_model

VARIANTS = [
    dict(dim=32, ffn_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61),
    dict(dim=40, ffn_dim=72, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=53, tie_embeddings=True),
    dict(dim=36, ffn_dim=60, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=14, vocab_size=47,
         rope_type="llama3", max_positions=64),
    dict(dim=24, ffn_dim=40, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=6, vocab_size=71,
         attention_bias=True, mlp_bias=True, rope_type="linear", rope_theta=500.0),
]


@given(variant=st.integers(0, len(VARIANTS) - 1), prompt=st.lists(st.integers(0, 46), min_size=1, max_size=12),
       n_new=st.integers(1, 16))
def test_greedy_matches_float64_reference(variant, prompt, n_new):
    kwargs = VARIANTS[variant]
    config = ModelConfig.from_hf(hf_config(**kwargs))
    tensors = random_tensors(config, variant)
    model = random_model(seed=variant, **kwargs)
    tokens = generate_greedy(model, prompt, n_new).tokens
    ref = reference_llama.logits(config, tensors, prompt + tokens[:-1])[len(prompt) - 1:]  # [n_new, V]
    for step, token in enumerate(tokens):
        top2 = np.sort(ref[step])[-2:]
        if top2[1] - top2[0] < 1e-3:  # a genuine near-tie: float32 may pick either
            break
        assert token == int(np.argmax(ref[step])), f"step {step}"
    # logits along the generated path agree to float32 accuracy
    cache = model.new_cache()
    ours = model.forward(cache, Batch.chain(prompt + tokens[:-1], 0, want_logits="all", prefill=True))
    np.testing.assert_allclose(ours[len(prompt) - 1:], ref, atol=2e-4 * max(1.0, np.abs(ref).max()))


def test_stories260k_golden_text():
    d = shared_model("stories260k")
    model = load_stage(d)
    tok = Tokenizer(d, model.config.eos_ids)
    ids = tok.encode("Once upon a time")
    assert ids == [1, 403, 407, 261, 378]
    result = generate_greedy(model, ids, 60, tok.eos_ids)
    text = tok.decode(ids + result.tokens)
    assert text.startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
        "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily")


def test_stop_reasons():
    model = random_model(seed=0, **VARIANTS[0])
    free = generate_greedy(model, [3, 4], 12)
    assert free.stop_reason == "length" and len(free.tokens) == 12
    eos = free.tokens[5]
    stopped = generate_greedy(model, [3, 4], 12, eos_ids=[eos])
    first = free.tokens.index(eos)
    assert stopped.tokens == free.tokens[: first + 1] and stopped.stop_reason == "eos"
    small = random_model(seed=0, **{**VARIANTS[0], "max_positions": 6})
    full = generate_greedy(small, [3, 4], 12)
    assert full.stop_reason == "context" and len(full.tokens) == 5  # positions 2..5 filled, 5 tokens known
    assert full.tokens == free.tokens[:5]
    assert generate_greedy(model, [3], 0).tokens == []


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt is empty"),
    ([3, 61], "token id 61 is outside the vocabulary"),
    ([-1], "token id -1"),
    (list(range(3, 40)) * 8, "the model's context holds 256"),
])
def test_bad_prompts(prompt, message):
    model = random_model(seed=0, **VARIANTS[0])
    with pytest.raises(InputError, match=message):
        generate_greedy(model, prompt, 4)


def test_decode_threads_do_not_change_the_bits():
    """--threads: decode GEMVs on 2 BLAS threads give the bits of 1 (prefill always uses 1)."""
    from minipipe import blas

    if not blas.info().controllable:
        pytest.skip("BLAS thread count not controllable here")
    model = random_model(seed=3, dim=512, ffn_dim=2048, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=4096)
    prompt = list(range(3, 40))
    runs = []
    for threads in (1, 2):
        blas.set_threads(threads)
        try:
            cache = model.new_cache()
            from minipipe.greedy import prefill

            logits = [prefill(model, cache, prompt)]
            for i, t in enumerate((5, 9, 11)):
                logits.append(model.forward(cache, Batch.chain([t], len(prompt) + i))[0])
            runs.append(logits)
        finally:
            blas.set_threads(1)
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
