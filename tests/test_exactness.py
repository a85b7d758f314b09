"""The exactness contract (docs/exactness.md), property-tested.

A token decoded alone (greedy style, sequence 0) and the same token inside any batch of
speculative rows with the same context must give bit-identical logits and hidden states,
whatever else shares the batch, the rows' order, the cache's cell layout, and the layer split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from hypothesis import given, strategies as st

from minipipe import kernels
from minipipe.batch import Batch
from minipipe.greedy import prefill
from minipipe.synthetic import random_model

SHAPES = [
    dict(dim=32, ffn_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61),
    dict(dim=40, ffn_dim=72, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=53),  # MHA
    dict(dim=36, ffn_dim=60, n_layers=3, n_heads=3, n_kv_heads=1, head_dim=14, vocab_size=47,
         rope_type="llama3", tie_embeddings=True),  # MQA, explicit head_dim
    dict(dim=24, ffn_dim=40, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=6, vocab_size=71,
         attention_bias=True, mlp_bias=True, rope_type="linear"),
]


@lru_cache(maxsize=None)
def model(shape: int, lo: int = 0, hi: int | None = None):
    return random_model(seed=shape, lo=lo, hi=hi, **SHAPES[shape])


def sequential(m, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Logits after each token, decoded one at a time in sequence 0: the oracle."""
    cache = m.new_cache()
    prefill(m, cache, prompt)
    return [m.forward(cache, Batch.chain([t], len(prompt) + i))[0] for i, t in enumerate(tokens)]


@st.composite
def trees(draw, vocab: int, max_nodes: int = 10):
    """A random token tree: parent[i] < i (-1 = child of the prompt's last token)."""
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(-1, i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
    return parents, tokens


def path(parents: list[int], node: int) -> list[int]:
    nodes = []
    while node != -1:
        nodes.append(node)
        node = parents[node]
    return nodes[::-1]


@given(data=st.data())
def test_tree_rows_equal_sequential_decoding(data):
    """Every node of a random tree, verified in one shuffled batch, has its sequential logits."""
    shape = data.draw(st.integers(0, len(SHAPES) - 1), label="shape")
    m = model(shape)
    V = m.config.vocab_size
    prompt = data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=14), label="prompt")
    parents, tokens = data.draw(trees(V), label="tree")
    n = len(parents)
    leaves = [i for i in range(n) if i not in parents]
    # each leaf is a branch with its own sequence id (1, 2, ...); a node belongs to every
    # branch through it, as in PipeInfer's multibuffer
    seqs = {i: tuple(sorted(1 + b for b, leaf in enumerate(leaves) if i in path(parents, leaf))) for i in range(n)}
    cache = m.new_cache(n_seqs=1 + len(leaves) + 1)
    junk_seq = len(leaves) + 1
    # scatter the cache: junk rows of an unrelated sequence, some freed again
    junk = data.draw(st.lists(st.integers(0, V - 1), max_size=5), label="junk")
    if junk:
        m.forward(cache, Batch.chain(junk, 0, seq_ids=(junk_seq,)))
    prefill(m, cache, prompt)
    if junk and data.draw(st.booleans(), label="free junk"):
        cache.seq_rm(junk_seq)
    for b in range(len(leaves)):
        cache.seq_cp(0, 1 + b)
    order = data.draw(st.permutations(range(n)), label="row order")
    depth = {i: len(path(parents, i)) for i in range(n)}
    batch = Batch(tokens=np.array([tokens[i] for i in order], dtype=np.int64),
                  positions=np.array([len(prompt) + depth[i] - 1 for i in order], dtype=np.int64),
                  seq_ids=tuple(seqs[i] for i in order), want_logits=np.ones(n, dtype=bool))
    got = dict(zip(order, m.forward(cache, batch)))
    for leaf in leaves:
        nodes = path(parents, leaf)
        expected = sequential(m, prompt, [tokens[i] for i in nodes])
        for node, logits in zip(nodes, expected):
            assert np.array_equal(got[node], logits), f"node {node} of {parents} differs"


@given(data=st.data())
def test_stage_split_equals_whole_model(data):
    """Running layers [0, s) then [s, L) gives the whole model's bits, for prefill and decode."""
    shape = data.draw(st.integers(0, len(SHAPES) - 1), label="shape")
    whole = model(shape)
    L = whole.config.n_layers
    split = data.draw(st.integers(1, L - 1), label="split")
    first, second = model(shape, 0, split), model(shape, split, L)
    V = whole.config.vocab_size
    prompt = data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=10), label="prompt")
    tokens = data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=4), label="tokens")
    caches = [m.new_cache() for m in (whole, first, second)]
    batches = [Batch.chain(prompt, 0, want_logits="last", prefill=True),
               Batch.chain(tokens, len(prompt))]
    for batch in batches:
        expected = whole.forward(caches[0], batch)
        hidden = first.forward(caches[1], batch)
        got = second.forward(caches[2], batch, hidden=hidden)
        assert np.array_equal(expected, got)


@given(data=st.data())
def test_linear_rows_ignore_batch_and_alignment(data):
    n_in = data.draw(st.integers(1, 200), label="in")
    n_out = data.draw(st.integers(1, 300), label="out")
    n_rows = data.draw(st.integers(1, 9), label="rows")
    offset = data.draw(st.integers(0, 15), label="offset (floats)")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    w = kernels.linear_weight([rng.standard_normal((n_out, n_in)).astype(np.float32)])  # [IN, OUT]
    buf = np.empty(n_rows * n_in + 16, dtype=np.float32)
    x = buf[offset: offset + n_rows * n_in].reshape(n_rows, n_in)
    x[:] = rng.standard_normal((n_rows, n_in))
    got = kernels.linear_rows(x, w)
    for i in range(n_rows):
        alone = kernels.linear_rows(x[i:i + 1].copy(), w)[0]
        assert np.array_equal(got[i], alone)


@given(data=st.data())
def test_gemv_bits_do_not_depend_on_threads_or_column_split(data):
    """`--threads N`: a row's GEMV split into column ranges at multiples of 16, the ranges run on
    N threads, gives the bits of one thread, for any N and any such split (odd shapes included,
    where the weight's rows are padded to 64-byte row slots)."""
    n_in = data.draw(st.integers(1, 700), label="in")
    n_out = data.draw(st.integers(1, 3000), label="out")
    n_rows = data.draw(st.integers(1, 3), label="rows")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    w = kernels.linear_weight([rng.standard_normal((n_out, n_in)).astype(np.float32)])
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    expected = np.stack([kernels.linear_rows(x[i:i + 1].copy(), w)[0] for i in range(n_rows)])  # each row alone
    width = kernels.padded_width(n_out)  # GEMVs run on the padded width, a multiple of 16
    cuts = data.draw(st.lists(st.integers(1, width // kernels.COLUMN_BLOCK), max_size=4), label="cuts (blocks)")
    bounds = sorted({0, width} | {c * kernels.COLUMN_BLOCK for c in cuts})
    rows = kernels.row_slots(n_rows, n_in)
    rows[...] = x
    split = kernels.row_slots(n_rows, n_out)
    for a, b in zip(bounds, bounds[1:]):
        kernels._gemv_rows(rows, kernels._padded(w), kernels._padded(split), a, b)
    assert np.array_equal(split, expected), bounds
    threads = data.draw(st.sampled_from([2, 3, 5, 8]), label="threads")
    min_bytes = kernels.SPLIT_MIN_BYTES
    try:
        for blas_threads in (True, False):  # OpenBLAS's own threads where the width allows / never
            kernels.set_gemv_threads(threads, blas_threads=blas_threads)
            kernels.SPLIT_MIN_BYTES = min_bytes
            assert np.array_equal(kernels.linear_rows(x, w), expected)  # small GEMVs: not split
            kernels.SPLIT_MIN_BYTES = 1  # split every GEMV, however small
            assert np.array_equal(kernels.linear_rows(x, w), expected)
    finally:
        kernels.SPLIT_MIN_BYTES = min_bytes
        kernels.set_gemv_threads(1)


@given(n_in=st.integers(1, 2000), blocks=st.integers(1, 40), threads=st.sampled_from([2, 3, 4, 8]),
       seed=st.integers(0, 2**32 - 1))
def test_openblas_threads_give_one_threads_bits_on_widths_of_16_per_thread(n_in, blocks, threads, seed):
    """`gemv_rows` lets OpenBLAS's own threads run a GEMV whose padded width is a multiple of
    16 x threads (OpenBLAS splits it evenly, so at multiples of 16): same bits as one thread."""
    rng = np.random.default_rng(seed)
    n_out = kernels.COLUMN_BLOCK * threads * blocks
    w = kernels.linear_weight([rng.standard_normal((n_out, n_in)).astype(np.float32)])
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    expected = kernels.linear_rows(x, w).copy()
    try:
        kernels.set_gemv_threads(threads)
        assert np.array_equal(kernels.linear_rows(x, w), expected)
    finally:
        kernels.set_gemv_threads(1)


def test_column_chunks_cover_the_padded_width_at_multiples_of_16():
    for n_in, n_out, threads in ((576, 960, 2), (576, 49152, 16), (37, 131, 3), (1, 1, 4), (2048, 8192, 7)):
        chunks = kernels.column_chunks(n_in, n_out, threads)
        assert chunks[0][0] == 0 and chunks[-1][1] == kernels.padded_width(n_out)
        assert all(a < b and a % 16 == 0 for a, b in chunks) and len(chunks) <= threads
        assert all(b == a2 for (_, b), (a2, _) in zip(chunks, chunks[1:]))
    assert len(kernels.column_chunks(576, 3072, 2)) == 2 and len(kernels.column_chunks(16, 16, 2)) == 1


@given(data=st.data())
def test_decode_row_kernels_give_the_bits_of_the_batched_ones(data):
    """The decode path's per-row RMSNorm and table RoPE are the prefill path's float32 operations
    in the same order: same bits, also for extreme magnitudes."""
    T = data.draw(st.integers(1, 5), label="rows")
    heads = data.draw(st.integers(1, 6), label="heads")
    half = data.draw(st.integers(1, 40), label="head_dim / 2")
    D = data.draw(st.integers(1, 300), label="dim")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    scale = np.float32(10.0 ** data.draw(st.integers(-18, 18), label="log10 scale"))
    x = (rng.standard_normal((T, D)) * scale).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    out = kernels.row_slots(T, D)
    assert np.array_equal(kernels.rms_norm_rows(x, w, 1e-5, out=out), kernels.rms_norm(x, w, 1e-5))
    q = (rng.standard_normal((T, heads, 2 * half)) * scale).astype(np.float32)
    positions = rng.integers(0, 100_000, T)
    inv_freq = (1.0 / (10000.0 ** (np.arange(half) / half))).astype(np.float32)
    cos, sin = kernels.rope_cos_sin(positions, inv_freq)
    got = kernels.apply_rope_tables(q, *kernels.rope_tables(cos, sin), out=np.empty_like(q), tmp=np.empty_like(q))
    assert np.array_equal(got, kernels.apply_rope(q, cos, sin))
