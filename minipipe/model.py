"""A Llama decoder in NumPy, runnable over any layer range [lo, hi) so a pipeline stage can own a slice.

One decoder layer (docs/model.md; `n1`, `n2` are RMSNorms):

    h = x + o_proj(attention(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
    y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))

The whole model is `logits = head(norm(layers(embed(tokens))))`. A `StageModel` holding layers
[lo, hi) embeds tokens only if it is the first stage (lo == 0) and returns logits only if it is
the last (hi == L); in between it maps hidden states to hidden states. Chaining the stages of a
split gives bit-for-bit the output of one StageModel holding all layers: every op is per row or
per layer, and no stage depends on another's internals.

All arithmetic is delegated to `minipipe.kernels`, which owns the exactness policy. Shapes use
the glossary in `minipipe.config`: T rows, D dim, H heads, KVH KV heads, G = H/KVH, HD head
dim, F ffn dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels
from .batch import Batch
from .config import ModelConfig, load_config
from .errors import InputError
from .kvcache import KVCache
from .weights import Checkpoint, LayerWeights, StageWeights, load_stage_weights


class StageModel:
    """Layers [lo, hi) of a Llama model, plus the embedding (first stage) and head (last stage)."""

    def __init__(self, weights: StageWeights):
        self.weights = weights
        self.config: ModelConfig = weights.config
        self.inv_freq = kernels.rope_inv_freq(self.config.rope, self.config.head_dim)  # [HD/2]
        self.scale = 1.0 / float(np.sqrt(self.config.head_dim))

    @property
    def lo(self) -> int:
        return self.weights.lo

    @property
    def hi(self) -> int:
        return self.weights.hi

    @property
    def is_first(self) -> bool:
        return self.weights.embed is not None

    @property
    def is_last(self) -> bool:
        return self.weights.head is not None

    def new_cache(self, n_seqs: int = 1, capacity: int = 64) -> KVCache:
        c = self.config
        return KVCache(self.hi - self.lo, c.n_kv_heads, c.head_dim, n_seqs=n_seqs, capacity=capacity)

    # ------------------------------------------------------------------------------------------

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids -> embedding rows.  [T] -> [T, D]"""
        V = self.config.vocab_size
        if tokens.size and (tokens.min() < 0 or tokens.max() >= V):
            bad = int(tokens[(tokens < 0) | (tokens >= V)][0])
            raise InputError(f"token id {bad} is outside the vocabulary (0..{V - 1})")
        return self.weights.embed[tokens].astype(np.float32)  # [T, D]

    def forward(self, cache: KVCache, batch: Batch, hidden: np.ndarray | None = None) -> np.ndarray:
        """Run the batch through this stage's layers, storing their K/V in `cache`.

        First stage: takes the batch's tokens; other stages: `hidden` [T, D] from the previous
        stage. Returns hidden states [T, D], or on the last stage the logits [T', V] of the rows
        with `want_logits` (in row order).
        """
        state = self.start(cache, batch, hidden)
        while not state.done:
            self.run_layer(state)
        return self.finish(state)

    # The same forward pass in three steps, so a pipeline stage can stop between layers (early
    # cancellation) and a local runtime can interleave other work there.

    def start(self, cache: KVCache, batch: Batch, hidden: np.ndarray | None = None) -> "ForwardState":
        """Embed (first stage) or take `hidden`, place the rows in the cache, prepare RoPE."""
        x = self.embed(batch.tokens) if self.is_first else np.ascontiguousarray(hidden, dtype=np.float32)
        T, D = x.shape
        assert T == batch.n_rows and D == self.config.dim, f"{x.shape=} for {batch.n_rows} rows"
        cells = cache.alloc(batch.positions, batch.seq_ids)  # [T]
        visible = [cache.visible(s, p) for s, p in zip(batch.seq_ids, batch.positions)]
        cos, sin = kernels.rope_cos_sin(batch.positions, self.inv_freq)  # [T, HD/2] each
        return ForwardState(batch=batch, cache=cache, x=x, cells=cells, visible=visible, cos=cos, sin=sin,
                            n_layers=len(self.weights.layers))

    def run_layer(self, state: "ForwardState") -> None:
        """Run the next layer of a forward pass."""
        linear = kernels.linear_prefill if state.batch.prefill else kernels.linear_rows
        lw = self.weights.layers[state.layer]
        state.x = self._decoder_layer(lw, state.x, state.cache, state.layer, state.cells, state.visible,
                                      state.cos, state.sin, linear)
        state.layer += 1

    def finish(self, state: "ForwardState") -> np.ndarray:
        """Hidden states [T, D] (not the last stage), or logits [T', V] of the wanted rows."""
        assert state.done, f"{state.n_layers - state.layer} layers left"
        if not self.is_last:
            return state.x  # [T, D]
        return self.logits(state.x[state.batch.want_logits])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Final norm and LM head, one GEMV per row (several rows: the row-batched GEMV, so the
        head's weight comes from memory about once for all of them).  [T, D] -> [T, V]"""
        T, D = x.shape
        h = kernels.rms_norm(x, self.weights.final_norm, self.config.norm_eps,
                             out=kernels.scratch().rows("final norm", T, D))  # [T, D], row slots
        return kernels.linear_rows(h, self.weights.head)  # [T, D] @ [D, V] -> [T, V] (fresh: it leaves)

    def _decoder_layer(self, lw: LayerWeights, x: np.ndarray, cache: KVCache, layer: int, cells: np.ndarray,
                       visible: list, cos: np.ndarray, sin: np.ndarray, linear) -> np.ndarray:
        if linear is kernels.linear_rows:
            return self._decode_layer(lw, x, cache, layer, cells, visible, cos, sin)
        c = self.config
        T = x.shape[0]
        H, KVH, G, HD = c.n_heads, c.n_kv_heads, c.n_groups, c.head_dim

        # attention block
        h = kernels.rms_norm(x, lw.attn_norm, c.norm_eps)  # [T, D]
        qkv = linear(h, lw.wqkv, lw.bqkv)  # [T, D] @ [D, (H + 2·KVH)·HD] -> [T, (H + 2·KVH)·HD]
        qk = kernels.row_slots(T, (H + KVH) * HD).reshape(T, H + KVH, HD)  # [T, H + KVH, HD]
        kernels.apply_rope(qkv[:, : (H + KVH) * HD].reshape(T, H + KVH, HD), cos, sin, out=qk)
        q, k = qk[:, :H], qk[:, H:]  # [T, H, HD], [T, KVH, HD]
        v = qkv[:, (H + KVH) * HD:].reshape(T, KVH, HD)  # [T, KVH, HD]
        cache.write(layer, cells, k, v)
        attn = kernels.row_slots(T, H * HD)  # [T, H·HD]
        for i in range(T):  # one query at a time, over exactly its visible cells
            keys, values = cache.gather(layer, visible[i])  # [KVH, N, HD] each, canonical copies
            kernels.attend(q[i].reshape(KVH, G, HD), keys, values, self.scale, out=attn[i].reshape(KVH, G, HD))
        x = x + linear(attn, lw.wo, lw.bo)  # [T, H·HD] @ [H·HD, D] -> [T, D]

        # MLP block
        h = kernels.rms_norm(x, lw.mlp_norm, c.norm_eps)  # [T, D]
        gate_up = linear(h, lw.w_gate_up, lw.b_gate_up)  # [T, D] @ [D, 2F] -> [T, 2F]
        return x + linear(kernels.swiglu(gate_up), lw.w_down, lw.b_down)  # [T, F] @ [F, D] -> [T, D]

    def _decode_layer(self, lw: LayerWeights, x: np.ndarray, cache: KVCache, layer: int, cells: np.ndarray,
                      visible: list, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """One layer for decode rows: the arithmetic of the prefill path (the same float32
        operations in the same order, so the same bits for the same inputs) with one GEMV per
        row (`kernels.gemv_rows`: several rows walk each weight together in column tiles), fewer
        NumPy calls (`rms_norm_rows` for one row, `apply_rope_tables`) and every intermediate in
        reused canonical row slots (`kernels.scratch`); only the returned hidden states are a
        fresh array."""
        c = self.config
        T, D = x.shape
        H, KVH, G, HD = c.n_heads, c.n_kv_heads, c.n_groups, c.head_dim
        QK, F = (H + KVH) * HD, c.ffn_dim
        ws = kernels.scratch()
        h, qkv, qk, tmp, attn, o = (ws.rows("norm", T, D), ws.rows("qkv", T, QK + KVH * HD), ws.rows("qk", T, QK),
                                    ws.rows("rope", T, QK), ws.rows("attention", T, H * HD), ws.rows("o", T, D))
        norm = kernels.rms_norm_rows if T == 1 else kernels.rms_norm  # the same bits; per row is faster for one

        # attention block
        norm(x, lw.attn_norm, c.norm_eps, out=h)  # [T, D]
        kernels.gemv_rows(h, lw.wqkv, qkv, lw.bqkv)  # [T, D] @ [D, (H + 2·KVH)·HD] -> [T, (H + 2·KVH)·HD]
        qk = qk.reshape(T, H + KVH, HD)  # [T, H + KVH, HD]: q and k rotated together, each row's q starts a slot
        kernels.apply_rope_tables(qkv[:, :QK].reshape(T, H + KVH, HD), *ws.rope(cos, sin), out=qk,
                                  tmp=tmp.reshape(T, H + KVH, HD))
        cache.write(layer, cells, qk[:, H:], qkv[:, QK:].reshape(T, KVH, HD))  # k, v: [T, KVH, HD]
        for i in range(T):  # one query at a time, over exactly its visible cells
            keys, values = cache.gather(layer, visible[i])  # [KVH, N, HD] each, canonical copies
            kernels.attend_canonical(qk[i, :H].reshape(KVH, G, HD), kernels.canonical(keys),
                                     kernels.canonical(values), self.scale, attn[i].reshape(KVH, G, HD))
        x = x + kernels.gemv_rows(attn, lw.wo, o, lw.bo)  # [T, H·HD] @ [H·HD, D] -> [T, D]

        # MLP block
        gate_up, act, down = ws.rows("gate_up", T, 2 * F), ws.rows("act", T, F), o
        norm(x, lw.mlp_norm, c.norm_eps, out=h)  # [T, D]
        kernels.gemv_rows(h, lw.w_gate_up, gate_up, lw.b_gate_up)  # [T, D] @ [D, 2F] -> [T, 2F]
        kernels.swiglu(gate_up, out=act)  # [T, F]
        return x + kernels.gemv_rows(act, lw.w_down, down, lw.b_down)  # [T, F] @ [F, D] -> [T, D]


@dataclass
class ForwardState:
    """A batch part-way through a stage: its hidden states and where its rows sit in the cache."""

    batch: Batch
    cache: KVCache
    x: np.ndarray  # [T, D]  hidden states after `layer` layers
    cells: np.ndarray  # [T]  the rows' cache cells
    visible: list  # per row: the cells it attends to, ascending position ([N] cell ids)
    cos: np.ndarray  # [T, HD/2]
    sin: np.ndarray  # [T, HD/2]
    n_layers: int
    layer: int = 0  # layers done (index into the stage's own layers)

    @property
    def done(self) -> bool:
        return self.layer == self.n_layers

    def keep_rows(self, keep: np.ndarray) -> None:
        """Go on with the rows where `keep` is True only (rows cancelled part-way through the stage).

        The dropped rows' cells stay allocated, their K/V written only for the layers done: the
        head never uses them and frees them with KV edits. No kept row attends to a dropped
        row's cell: rows that see each other's cells belong to one request's run and are
        cancelled together.
        """
        self.batch = self.batch.select(keep)
        self.x, self.cells, self.cos, self.sin = self.x[keep], self.cells[keep], self.cos[keep], self.sin[keep]
        self.visible = [v for v, k in zip(self.visible, keep) if k]


def load_stage(model_dir: str | Path, lo: int = 0, hi: int | None = None, progress: bool = False) -> StageModel:
    """Load layers [lo, hi) of the checkpoint in `model_dir` (all layers by default)."""
    config = load_config(model_dir)
    weights = load_stage_weights(Checkpoint(model_dir), config, lo, hi, progress=progress)
    return StageModel(weights)
