"""Exactness whatever the memory layout: the canonical-layout rule of `minipipe.kernels`.

BLAS may round differently when the same numbers lie in memory another way (a strided view of
the cache instead of a gathered copy, another alignment, other strides). The kernels put every
operand in one canonical layout, so:

* `attend` and `linear_rows` give the same bits for every layout of the same values;
* every strategy equals greedy decoding on models where that matters most: one query head per
  KV head (MHA), tiny head dims, and an LM head whose rows come in near-tied pairs (two tokens
  whose logits differ in the last bit, so any rounding difference flips the argmax).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from minipipe import kernels
from minipipe.config import ModelConfig
from minipipe.draft import OracleDraft
from minipipe.greedy import generate_greedy
from minipipe.model import StageModel
from minipipe.runtime import LocalPipeline, split_layers
from minipipe.strategies import PipeInferStrategy, SpecPipeStrategy, SpeculativeStrategy, TreeStrategy, generate
from minipipe.synthetic import TensorDict, hf_config, random_tensors
from minipipe.weights import load_stage_weights

from .test_runtime import DrawChooser


def layouts(a: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The same values of a 3-D array laid out in memory in several ways."""
    n0, n1, n2 = a.shape
    big = np.zeros((n0, n1 + 7, n2), dtype=np.float32)  # a slice of a bigger cache
    big[:, 3:3 + n1] = a
    flat = np.zeros(a.size + 16, dtype=np.float32)  # misaligned by 4 bytes
    shifted = flat[1:1 + a.size].reshape(a.shape)
    shifted[...] = a
    wide = np.zeros((n0, n1, 2 * n2), dtype=np.float32)  # every other float
    wide[:, :, ::2] = a
    return {"contiguous": a.copy(), "slice of a cache": big[:, 3:3 + n1], "misaligned": shifted,
            "gathered": big[:, np.arange(3, 3 + n1)], "strided": wide[:, :, ::2], "fortran": np.asfortranarray(a)}


@given(kv_heads=st.integers(1, 8), groups=st.integers(1, 4), head_dim=st.integers(1, 16), n=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_attention_bits_do_not_depend_on_layout(kv_heads, groups, head_dim, n, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((kv_heads, groups, head_dim)).astype(np.float32)
    k = rng.standard_normal((kv_heads, n, head_dim)).astype(np.float32)
    v = rng.standard_normal((kv_heads, n, head_dim)).astype(np.float32)
    expected = kernels.attend(q, k, v, 0.5)
    for (name_k, k2), (name_v, v2), (name_q, q2) in zip(layouts(k, rng).items(), layouts(v, rng).items(),
                                                        layouts(q, rng).items()):
        got = kernels.attend(q2, k2, v2, 0.5)
        assert np.array_equal(got, expected), (name_k, name_v, name_q)


@given(n_in=st.integers(1, 80), n_out=st.integers(1, 80), rows=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_linear_rows_bits_do_not_depend_on_layout(n_in, n_out, rows, seed):
    rng = np.random.default_rng(seed)
    w = kernels.linear_weight([rng.standard_normal((n_out, n_in)).astype(np.float32)])  # [IN, OUT]
    x = rng.standard_normal((1, rows, n_in)).astype(np.float32)
    alone = [kernels.linear_rows(x[0, i:i + 1].copy(), w)[0] for i in range(rows)]
    for name, x2 in layouts(x, rng).items():
        got = kernels.linear_rows(x2[0], w)
        assert all(np.array_equal(alone[i], got[i]) for i in range(rows)), name


# ------------------------------------------------------------------------------------------------
# every strategy on models with tiny heads and near-tied LM heads


def near_tied_tensors(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Random weights whose LM head rows come in pairs one ulp apart: tokens 2i and 2i+1 have
    logits that differ only in the last bits, so a rounding difference anywhere flips greedy."""
    t = random_tensors(config, seed)
    head = t["lm_head.weight"]  # [V, D]
    head[1::2] = np.nextafter(head[0::2][: head[1::2].shape[0]], np.float32(np.inf))
    return t


@given(data=st.data())
def test_strategies_equal_greedy_on_tiny_heads_and_near_ties(data):
    kv_heads = data.draw(st.sampled_from([1, 2, 4, 8]), label="kv heads")
    groups = data.draw(st.sampled_from([1, 1, 2, 4]), label="query heads per kv head")  # MHA most often
    head_dim = data.draw(st.sampled_from([2, 4, 6, 8, 16]), label="head_dim")
    raw = hf_config(dim=32, ffn_dim=40, n_layers=2, n_heads=kv_heads * groups, n_kv_heads=kv_heads,
                    head_dim=head_dim, vocab_size=64, max_positions=96)
    config = ModelConfig.from_hf(raw)
    seed = data.draw(st.integers(0, 3), label="seed")
    source = TensorDict(near_tied_tensors(config, seed))
    prompt = data.draw(st.lists(st.integers(0, 63), min_size=1, max_size=6), label="prompt")
    n = data.draw(st.integers(4, 40), label="tokens")
    whole = StageModel(load_stage_weights(source, config))
    truth = generate_greedy(whole, prompt, n).tokens
    draft = OracleDraft(truth + [0] * 30, data.draw(st.sampled_from([0.3, 0.6, 0.9]), label="p"), 64, seed=seed)
    name = data.draw(st.sampled_from(["speculative", "tree", "pipeinfer", "specpipe"]), label="strategy")
    strategy = {"speculative": lambda: SpeculativeStrategy(draft, k=4),
                "tree": lambda: TreeStrategy(draft, schedule=(2, 2, 1)),
                "pipeinfer": lambda: PipeInferStrategy(draft, p_accept=0.0, n_draft=3, branches=2, max_inflight=4),
                "specpipe": lambda: SpecPipeStrategy(draft, width=3)}[name]()
    n_stages = data.draw(st.integers(1, 2), label="stages")
    models = [StageModel(load_stage_weights(source, config, lo, hi)) for lo, hi in split_layers(2, n_stages)]
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    pipe = LocalPipeline(models, n_seqs=strategy.n_seqs, chooser=chooser)
    assert generate(strategy, pipe, prompt, n, max_positions=96).tokens == truth
