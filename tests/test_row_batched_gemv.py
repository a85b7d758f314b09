"""The row-batched decode GEMV (docs/exactness.md): several rows through one linear layer, the
weight walked in column tiles with every row's GEMV over a tile before the next tile, give
each row exactly the bits of its own single-row GEMV on one thread, for any shape, row count,
tile size and thread count; and a decode batch of several rows through a model whose every
GEMV is tiled gives each row the logits of decoding it alone.

Nothing here measures speed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipipe import kernels
from minipipe.batch import Batch
from minipipe.greedy import prefill
from minipipe.synthetic import random_model


def single_row_gemvs(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The oracle: each row alone, one GEMV over the whole padded width, on one thread.  -> [T, OUT]"""
    assert kernels.gemv_threads() == 1
    return np.stack([kernels.linear_rows(x[i:i + 1].copy(), w)[0] for i in range(x.shape[0])])


@pytest.fixture(autouse=True)
def restore_kernel_settings():
    tile, split = kernels.TILE_BYTES, kernels.SPLIT_MIN_BYTES
    yield
    kernels.TILE_BYTES, kernels.SPLIT_MIN_BYTES = tile, split
    kernels.set_gemv_threads(1)


@st.composite
def gemv_shapes(draw):
    """(IN, OUT): mostly ordinary shapes, sometimes a narrow IN with more than 16384 columns
    (where OpenBLAS's SkylakeX kernel depends on the width: such GEMVs must not be split)."""
    if draw(st.integers(0, 5), label="wide narrow GEMV?") == 0:
        return draw(st.integers(1, 64), label="in"), draw(st.integers(16385, 20000), label="out")
    return draw(st.integers(1, 700), label="in"), draw(st.integers(1, 3000), label="out")


@settings(max_examples=150, deadline=None)
@given(shape=gemv_shapes(), n_rows=st.integers(1, 9),
       tile_bytes=st.sampled_from([1, 64, 4096, 30_000, 100_000, 256 * 1024, 1 << 20, 1 << 30]),
       threads=st.sampled_from([1, 1, 2, 3, 5]), blas_threads=st.booleans(), split_all=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_row_batched_gemv_gives_each_rows_single_row_bits(shape, n_rows, tile_bytes, threads, blas_threads,
                                                          split_all, seed):
    n_in, n_out = shape
    rng = np.random.default_rng(seed)
    w = kernels.linear_weight([rng.standard_normal((n_out, n_in)).astype(np.float32)])  # [IN, OUT]
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    tile, split = kernels.TILE_BYTES, kernels.SPLIT_MIN_BYTES
    expected = single_row_gemvs(x, w)
    try:
        kernels.TILE_BYTES = tile_bytes  # 1 byte: a tile per 16 columns; 1 GB: one tile
        kernels.SPLIT_MIN_BYTES = 1 if split_all else split  # threads split even small GEMVs
        kernels.set_gemv_threads(threads, blas_threads=blas_threads)
        got = kernels.linear_rows(x, w)  # [T, OUT]: tiles (within each thread's column range)
    finally:
        kernels.TILE_BYTES, kernels.SPLIT_MIN_BYTES = tile, split
        kernels.set_gemv_threads(1)
    assert np.array_equal(got, expected), (kernels.gemv_tiles(n_in, n_out), kernels.column_chunks(n_in, n_out, threads))


@given(n_in=st.integers(1, 3000), n_out=st.integers(1, 60000), a_blocks=st.integers(0, 4000),
       tile_bytes=st.integers(1, 4 << 20))
def test_gemv_tiles_cover_the_range_at_multiples_of_16(n_in, n_out, a_blocks, tile_bytes):
    width = kernels.padded_width(n_out)
    a = min(a_blocks, width // 16 - 1) * 16
    tiles = kernels.gemv_tiles(n_in, n_out, a, width, tile_bytes)
    assert tiles[0][0] == a and tiles[-1][1] == width
    assert all(s < e and s % 16 == 0 and e % 16 == 0 for s, e in tiles)
    assert all(e == s2 for (_, e), (s2, _) in zip(tiles, tiles[1:]))
    if not kernels.splittable(n_in, n_out):
        assert len(tiles) == 1
    else:  # about tile_bytes each, evenly: no tile more than 16 columns wider than another
        widths = [e - s for s, e in tiles]
        assert max(widths) - min(widths) <= 16
        assert len(tiles) == 1 or max(widths) * n_in * 4 <= tile_bytes + 16 * n_in * 4


def test_narrow_gemvs_wider_than_16384_columns_are_never_split():
    """IN <= 48 and more than 16384 columns: one tile, one thread range (`kernels.splittable`)."""
    assert not kernels.splittable(48, 16385) and kernels.splittable(49, 16385) and kernels.splittable(48, 16384)
    kernels.TILE_BYTES = 1
    assert kernels.gemv_tiles(32, 20000) == ((0, 20000),)
    assert kernels.column_chunks(32, 40000, 4) == [(0, 40000)]
    assert len(kernels.gemv_tiles(64, 20000)) == 20000 // 16


def test_the_decode_path_tiles_every_gemv(monkeypatch):
    """The model's multi-row decode layer and LM head go through the tiled GEMV (not a
    row-at-a-time loop over the whole weight)."""
    m = random_model(seed=3, dim=64, ffn_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300)
    seen = []
    real = kernels._tiles

    def spy(n_in, n_out, a, b, tile_bytes):
        seen.append((n_in, n_out))
        return real(n_in, n_out, a, b, tile_bytes)

    monkeypatch.setattr(kernels, "_tiles", spy)
    cache = m.new_cache(n_seqs=2)
    prefill(m, cache, [1, 2, 3])
    cache.seq_cp(0, 1)
    m.forward(cache, Batch.chain([4, 5], 3, seq_ids=(1,)))
    linear = {(w.shape[0], kernels.padded_width(w.shape[1])) for w in
              (m.weights.layers[0].wqkv, m.weights.layers[0].wo, m.weights.layers[0].w_gate_up,
               m.weights.layers[0].w_down, m.weights.head)}
    assert linear <= set(seen)


SHAPES = [
    dict(dim=64, ffn_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000),
    dict(dim=80, ffn_dim=144, n_layers=2, n_heads=5, n_kv_heads=1, head_dim=16, vocab_size=517,
         tie_embeddings=True),
    dict(dim=36, ffn_dim=60, n_layers=2, n_heads=3, n_kv_heads=3, head_dim=12, vocab_size=301,
         attention_bias=True, mlp_bias=True),
]


@lru_cache(maxsize=None)
def shape_model(shape: int):
    return random_model(seed=10 + shape, **SHAPES[shape])


@settings(max_examples=25, deadline=None)
@given(shape=st.integers(0, len(SHAPES) - 1), n_requests=st.integers(2, 6),
       tile_bytes=st.sampled_from([1, 700, 5000, 1 << 20]), data=st.data())
def test_a_decode_batch_of_several_requests_gives_each_its_own_logits(shape, n_requests, tile_bytes, data):
    """Continuous batching: one decode row per request, each request in its own sequence, with
    every GEMV of the layers and the head tiled: each row's logits equal that request decoded
    alone (one row per forward pass), bit for bit."""
    m = shape_model(shape)
    V = m.config.vocab_size
    prompts = [data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=6), label=f"prompt {r}")
               for r in range(n_requests)]
    steps = data.draw(st.integers(1, 3), label="decode steps")
    tokens = [data.draw(st.lists(st.integers(0, V - 1), min_size=steps, max_size=steps), label=f"tokens {r}")
              for r in range(n_requests)]
    alone = []
    for p, ts in zip(prompts, tokens):
        cache = m.new_cache()
        prefill(m, cache, p)
        alone.append([m.forward(cache, Batch.chain([t], len(p) + i))[0] for i, t in enumerate(ts)])
    cache = m.new_cache(n_seqs=n_requests, capacity=8)
    for r, p in enumerate(prompts):
        prefill(m, cache, p, seq_ids=(r,))
    tile = kernels.TILE_BYTES
    kernels.TILE_BYTES = tile_bytes
    try:
        for i in range(steps):
            batch = Batch(tokens=np.array([ts[i] for ts in tokens]),
                          positions=np.array([len(p) + i for p in prompts]),
                          seq_ids=tuple((r,) for r in range(n_requests)),
                          want_logits=np.ones(n_requests, dtype=bool))
            got = m.forward(cache, batch)  # [R, V]
            for r in range(n_requests):
                assert np.array_equal(got[r], alone[r][i]), (r, i)
    finally:
        kernels.TILE_BYTES = tile
