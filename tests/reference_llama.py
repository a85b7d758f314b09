"""A textbook Llama forward pass in float64, written independently of minipipe's code paths.

No KV cache, no fused weights, no per-row kernels: the whole sequence is recomputed with a
causal mask each time. It is the oracle for "does minipipe compute a Llama at all"; exactness
between minipipe's own paths is tested elsewhere, bit for bit.
"""

from __future__ import annotations

import numpy as np

from minipipe.config import ModelConfig


def _inv_freq(c: ModelConfig) -> np.ndarray:
    hd = c.head_dim
    inv = 1.0 / c.rope.theta ** (np.arange(0, hd, 2) / hd)
    r = c.rope
    if r.rope_type == "linear":
        inv = inv / r.factor
    elif r.rope_type == "llama3":
        wavelen = 2 * np.pi / inv
        low, high = r.original_max_positions / r.low_freq_factor, r.original_max_positions / r.high_freq_factor
        out = []
        for f, w in zip(inv, wavelen):
            if w < high:
                out.append(f)
            elif w > low:
                out.append(f / r.factor)
            else:
                s = (r.original_max_positions / w - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
                out.append((1 - s) * f / r.factor + s * f)
        inv = np.array(out)
    return inv


def logits(c: ModelConfig, t: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits for every position of `ids`.  -> [T, V]"""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    T, hd = len(ids), c.head_dim
    x = t["model.embed_tokens.weight"][ids]

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + c.norm_eps) * w

    def lin(v, name):
        out = v @ t[name + ".weight"].T
        return out + t[name + ".bias"] if name + ".bias" in t else out

    angles = np.arange(T)[:, None] * _inv_freq(c)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)

    def rope(v):  # [T, heads, hd]
        a, b = v[..., : hd // 2], v[..., hd // 2:]
        cc, ss = cos[:, None, :], sin[:, None, :]
        return np.concatenate([a * cc - b * ss, b * cc + a * ss], -1)

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])
        q = rope(lin(h, p + "self_attn.q_proj").reshape(T, c.n_heads, hd))
        k = rope(lin(h, p + "self_attn.k_proj").reshape(T, c.n_kv_heads, hd))
        v = lin(h, p + "self_attn.v_proj").reshape(T, c.n_kv_heads, hd)
        heads = []
        for head in range(c.n_heads):
            kv = head // (c.n_heads // c.n_kv_heads)
            s = q[:, head] @ k[:, kv].T / np.sqrt(hd) + mask
            w = np.exp(s - s.max(-1, keepdims=True))
            heads.append((w / w.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + lin(np.concatenate(heads, -1), p + "self_attn.o_proj")
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        g = lin(h, p + "mlp.gate_proj")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return norm(x, t["model.norm.weight"]) @ head.T
