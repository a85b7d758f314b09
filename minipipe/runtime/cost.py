"""The local runtime's cost model: virtual seconds for each kind of work, and how to calibrate it.

The local runtime runs the real arithmetic (so tokens, acceptance and cancellations are real) but
charges time from this model, so 8 or more stages can be studied on a 2-core machine:

    one layer of a run on a stage   layer_fixed + layer_per_row · rows      (decode rows)
                                    layer_fixed + prefill_per_row · rows    (prompt rows)
    the LM head on the last stage   head_fixed + head_per_row · wanted rows
    a message crossing one hop      hop_latency + bytes / hop_bandwidth
    a draft forward of r rows       draft_fixed + draft_per_token · r (strategies report their
                                    drafting; one forward per row unless rows were batched)

Two ways to get the numbers:

* `fixed(config, draft_config)` — **the same costs on every machine**, computed from the models'
  shapes on a nominal CPU (`NOMINAL`): a run streams each layer's weights once, and every row
  costs that layer's multiply-adds. Timelines, narrations and counters of the local runtime are
  then identical wherever the command runs (`minipipe generate --runtime local --cost fixed`, the
  default, and every teaching command in the docs).
* `calibrate(model, draft)` — measured on this machine (`--cost calibrated`): for studying what
  this machine would do with more cores.

`with_hop_latency` adds latency to every hop, to mimic a slow interconnect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class CostModel:
    layer_fixed: float = 100e-6
    layer_per_row: float = 50e-6
    prefill_per_row: float = 10e-6
    head_fixed: float = 50e-6
    head_per_row: float = 100e-6
    hop_latency: float = 30e-6
    hop_bandwidth: float = 5e9  # bytes per second
    draft_per_token: float = 100e-6
    draft_fixed: float = 0.0  # per draft forward call (its weights streamed once, its Python overhead)
    kv_edit: float = 5e-6
    submit: float = 10e-6  # the head's cost to encode and send a message

    def layer(self, rows: int, prefill: bool) -> float:
        return self.layer_fixed + (self.prefill_per_row if prefill else self.layer_per_row) * rows

    def head(self, rows: int) -> float:
        return self.head_fixed + self.head_per_row * rows

    def draft(self, rows: int, forwards: int) -> float:
        """Seconds for `rows` draft rows computed in `forwards` forward calls."""
        return self.draft_fixed * forwards + self.draft_per_token * rows

    def hop(self, n_bytes: int) -> float:
        return self.hop_latency + n_bytes / self.hop_bandwidth

    def with_hop_latency(self, extra: float) -> "CostModel":
        return replace(self, hop_latency=self.hop_latency + extra)

    def describe(self) -> str:
        us = 1e6
        return (f"layer {self.layer_fixed * us:.0f} µs + {self.layer_per_row * us:.0f} µs/row "
                f"(prefill {self.prefill_per_row * us:.1f} µs/row); head {self.head_fixed * us:.0f} µs + "
                f"{self.head_per_row * us:.0f} µs/row; hop {self.hop_latency * us:.0f} µs + "
                f"{self.hop_bandwidth / 1e9:.1f} GB/s; draft {self.draft_fixed * us:.0f} µs + "
                f"{self.draft_per_token * us:.0f} µs/row")


# The nominal CPU of `fixed`: it streams weights from memory at WEIGHT_BYTES_PER_S and computes
# FLOPS_PER_S multiply-adds x 2 per second, per core. Round numbers of the order of one core of
# a laptop running NumPy; they only have to be the same everywhere.
NOMINAL = {"weight_bytes_per_s": 10e9, "flops_per_s": 10e9, "per_call_s": 20e-6}


def _layer_params(config) -> int:
    """Weights of one decoder layer (q, k, v, o projections, gate, up, down)."""
    D, F, H, KVH, HD = config.dim, config.ffn_dim, config.n_heads, config.n_kv_heads, config.head_dim
    return D * (H + 2 * KVH) * HD + H * HD * D + 3 * D * F


def _token_cost(config, rows: int = 1) -> float:
    """Nominal seconds for `rows` rows through the whole model (every layer and the head)."""
    layer = config.n_layers * (NOMINAL["per_call_s"] + 4 * _layer_params(config) / NOMINAL["weight_bytes_per_s"]
                               + rows * 2 * _layer_params(config) / NOMINAL["flops_per_s"])
    head = config.dim * config.vocab_size
    return layer + NOMINAL["per_call_s"] + 4 * head / NOMINAL["weight_bytes_per_s"] + \
        rows * 2 * head / NOMINAL["flops_per_s"]


def fixed(config, draft_config=None) -> CostModel:
    """Costs that depend only on the models' shapes (never on this machine): the nominal CPU
    (`NOMINAL`) streams a layer's float32 weights once per run (`layer_fixed`) and computes its
    multiply-adds once per row (`layer_per_row`); prompt rows cost a fifth of that (one GEMM over
    the chunk); the LM head likewise. A draft forward of r rows streams the draft's weights once
    (`draft_fixed`) and adds each row's multiply-adds (`draft_per_token`): one row costs one token
    of the draft model. Without a draft model (n-gram or oracle drafts) the draft is priced as a
    model a tenth of the target's cost: one row a tenth of a target token, and a forward of several
    rows a tenth of the target's fixed and per-row parts. Hops and KV edits keep the defaults of
    `CostModel`. Deterministic: the same command prints the same times on every machine."""
    P, head = _layer_params(config), config.dim * config.vocab_size
    w, f, call = NOMINAL["weight_bytes_per_s"], NOMINAL["flops_per_s"], NOMINAL["per_call_s"]
    if draft_config is None:  # the model-free draft: priced as a model a tenth of the target's cost
        draft_config, scale = config, 0.1
    else:
        scale = 1.0
    draft_row = scale * (_token_cost(draft_config, 2) - _token_cost(draft_config, 1))
    draft_fixed = scale * _token_cost(draft_config, 1) - draft_row
    return CostModel(layer_fixed=call + 4 * P / w, layer_per_row=2 * P / f, prefill_per_row=2 * P / f / 5,
                     head_fixed=call + 4 * head / w, head_per_row=2 * head / f, draft_per_token=draft_row,
                     draft_fixed=draft_fixed)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _fit(xs, ys) -> tuple[float, float]:
    """Least-squares line y = a + b·x, clamped to non-negative."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return max(float(a), 0.0), max(float(b), 0.0)


def calibrate(model, draft=None, hop_latency: float | None = None, repeats: int = 5) -> CostModel:
    """Measure per-layer, head and draft costs of real models on this machine.

    `model` is a StageModel holding all layers of the target; `draft` an optional draft
    StageModel; `hop_latency` a measured one-way ring latency (benchmarks/bench_ring.py).
    """
    from ..batch import Batch
    from ..greedy import prefill

    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    prompt = list(rng.integers(0, V, 32))
    rows_list, layer_times, head_times = [1, 2, 4, 8], [], []
    for rows in rows_list:
        tokens = list(rng.integers(0, V, rows))

        def one_pass():
            cache = model.new_cache(capacity=64)
            prefill(model, cache, prompt)
            state = model.start(cache, Batch.chain(tokens, len(prompt)), None)
            t = time.perf_counter()
            while not state.done:
                model.run_layer(state)
            t_layers = time.perf_counter() - t
            t = time.perf_counter()
            model.finish(state)
            return t_layers, time.perf_counter() - t

        samples = [one_pass() for _ in range(repeats)]
        layer_times.append(min(s[0] for s in samples) / max(1, model.hi - model.lo))
        head_times.append(min(s[1] for s in samples))
    layer_fixed, layer_per_row = _fit(rows_list, layer_times)
    head_fixed, head_per_row = _fit(rows_list, head_times)
    prompt_rows = list(rng.integers(0, V, 64))
    t_prefill = _best(lambda: prefill(model, model.new_cache(capacity=128), prompt_rows), repeats)
    prefill_per_row = max(t_prefill / max(1, model.hi - model.lo) - layer_fixed, 0.0) / 64
    cost = CostModel(layer_fixed=layer_fixed, layer_per_row=layer_per_row, prefill_per_row=prefill_per_row,
                     head_fixed=head_fixed, head_per_row=head_per_row)
    if draft is not None:  # one forward of r rows (r requests' guesses): fixed + per row
        rows_list, times = [1, 4, 8], []
        for rows in rows_list:
            cache = draft.new_cache(n_seqs=rows, capacity=64 * rows)
            for s in range(rows):
                prefill(draft, cache, prompt, seq_ids=(s,))
            pos = [len(prompt)]

            def draft_step(rows=rows, cache=cache):
                draft.forward(cache, Batch(np.ones(rows, dtype=np.int64), np.full(rows, pos[0], dtype=np.int64),
                                           tuple((s,) for s in range(rows)), np.ones(rows, dtype=bool)))
                pos[0] += 1

            times.append(_best(draft_step, repeats * 2))
        draft_fixed, draft_per_row = _fit(rows_list, times)
        cost = replace(cost, draft_fixed=draft_fixed, draft_per_token=draft_per_row)
    if hop_latency is not None:
        cost = replace(cost, hop_latency=hop_latency)
    return cost
