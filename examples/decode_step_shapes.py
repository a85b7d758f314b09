"""Walk through one greedy decode step, layer by layer, printing the shape of every array.

    python examples/decode_step_shapes.py                      # a small random model
    python examples/decode_step_shapes.py --model DIR          # any checkpoint directory

The step is written out with the same kernel calls `minipipe.model.StageModel` makes, one line
per operation, and at the end the logits are compared bit for bit with `StageModel.forward`, so
what you read here is exactly what the engine does. Letters are the glossary of
`minipipe/config.py` (T rows, D dim, H heads, KVH KV heads, G = H/KVH, HD head dim, F ffn dim,
V vocab, N visible keys).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe import kernels  # noqa: E402
from minipipe.batch import Batch  # noqa: E402
from minipipe.greedy import prefill  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.synthetic import random_model  # noqa: E402


def show(label: str, array: np.ndarray, note: str = "") -> None:
    print(f"    {label:<34} {str(list(array.shape)):<16} {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: a random 2-layer GQA model)")
    parser.add_argument("--layers", type=int, default=2, help="how many layers to print in full (default 2)")
    args = parser.parse_args()
    model = load_stage(args.model) if args.model else random_model(
        seed=0, dim=64, ffn_dim=160, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100)
    c = model.config
    H, KVH, G, HD = c.n_heads, c.n_kv_heads, c.n_groups, c.head_dim
    print(f"model: D={c.dim} F={c.ffn_dim} L={c.n_layers} H={H} KVH={KVH} G={G} HD={HD} V={c.vocab_size}")

    prompt = [1, 5, 9, 14, 20][: c.vocab_size]
    cache = model.new_cache()
    next_token = int(np.argmax(prefill(model, cache, prompt)))
    reference_cache = copy.deepcopy(cache)  # for the bit-for-bit check at the end
    pos = len(prompt)
    print(f"prompt of {len(prompt)} tokens prefilled; decoding token {next_token} at position {pos}\n")

    batch = Batch.chain([next_token], pos)
    w = model.weights
    x = w.embed[batch.tokens]
    show("embed[tokens]", x, "[T, D]")
    cells = cache.alloc(batch.positions, batch.seq_ids)
    visible = cache.visible(batch.seq_ids[0], pos)
    cos, sin = kernels.rope_cos_sin(batch.positions, model.inv_freq)
    show("rope cos, sin", cos, "[T, HD/2] each")
    for layer, lw in enumerate(w.layers):
        verbose = layer < args.layers
        if verbose:
            print(f"  layer {w.lo + layer}")
        h = kernels.rms_norm(x, lw.attn_norm, c.norm_eps)
        qkv = kernels.linear_rows(h, lw.wqkv, lw.bqkv)
        q = kernels.apply_rope(qkv[:, : H * HD].reshape(1, H, HD), cos, sin)
        k = kernels.apply_rope(qkv[:, H * HD: (H + KVH) * HD].reshape(1, KVH, HD), cos, sin)
        v = qkv[:, (H + KVH) * HD:].reshape(1, KVH, HD)
        cache.write(layer, cells, k, v)
        keys, values = cache.gather(layer, visible)
        out = kernels.attend(q[0].reshape(KVH, G, HD), keys, values, model.scale)
        attn = out.reshape(1, H * HD)
        x = x + kernels.linear_rows(attn, lw.wo, lw.bo)
        h2 = kernels.rms_norm(x, lw.mlp_norm, c.norm_eps)
        gate_up = kernels.linear_rows(h2, lw.w_gate_up, lw.b_gate_up)
        act = kernels.swiglu(gate_up)
        x = x + kernels.linear_rows(act, lw.w_down, lw.b_down)
        if verbose:
            show("rms_norm(x)", h, "[T, D]")
            show("h @ wqkv  (one GEMV per row)", qkv, "[T, (H + 2·KVH)·HD]")
            show("q after RoPE", q, "[T, H, HD]")
            show("k after RoPE, v", k, "[T, KVH, HD]  -> written to the cache")
            show("visible keys, values", keys, f"[KVH, N, HD]  N = {keys.shape[1]} cells: prompt + itself")
            show("attend(q grouped by KV head)", out, "[KVH, G, HD]")
            show("x + attention @ wo", x, "[T, D]")
            show("rms_norm(x) @ w_gate_up", gate_up, "[T, 2F]")
            show("swiglu", act, "[T, F]")
            show("x + swiglu @ w_down", x, "[T, D]")
    if len(w.layers) > args.layers:
        print(f"  ... {len(w.layers) - args.layers} more layers of the same shapes")
    logits = kernels.linear_rows(kernels.rms_norm(x, w.final_norm, c.norm_eps), w.head)
    show("rms_norm(x) @ head", logits, "[T, V]")
    expected = model.forward(reference_cache, batch)
    same = np.array_equal(logits, expected)
    print(f"\nnext token: {int(np.argmax(logits))}; identical to StageModel.forward bit for bit: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
