"""Every numerically relevant operation of minipipe, in one place (DESIGN.md §2).

The exactness contract says a token's bits must not depend on which other tokens share its
batch or where it sits in the batch: a token decoded alone and the same token inside a batch of
speculative rows (same context) must give bit-identical hidden states and logits. BLAS does not
promise that for matrix-matrix products (a GEMM of M >= 2 rows takes other code paths than a
single-row GEMV, and M changes which), so the kernels follow one policy, `row-gemv`:

* **Decode rows** (greedy steps, speculative and tree rows): every linear layer is one
  matrix-vector product per row (`W @ x[i]`); a row's result depends on that row alone.
* **Attention** for one query gathers exactly its visible keys (ascending position) and reduces
  over them with the same calls whatever the batch; no -inf mask over a superset of keys.
* **Norms, RoPE, SwiGLU, softmax** are elementwise or reduce along the last axis of C-contiguous
  arrays, which NumPy computes row by row.
* **Prefill** uses batched GEMM (`X @ W.T`) over one canonical chunking of the prompt
  (`prefill_chunks`): every strategy prefills the same prompt through the same calls, so the
  committed prompt KV is identical everywhere, while long prompts stay fast.

One BLAS thread per process is the default (see `minipipe.blas`); prefill GEMMs always use one,
because their bits depend on the thread count, while decode GEMVs may use more (`minipipe
generate --threads`; `minipipe doctor` checks that GEMV bits do not depend on the thread count).
`minipipe doctor` checks the policy on the running machine and measures what it costs against
plain GEMM.

Shapes use the glossary in `minipipe.config`.
"""

from __future__ import annotations

import numpy as np

from . import blas  # noqa: F401  (importing it pins BLAS to one thread)
from .config import RopeConfig

POLICY = "row-gemv"
POLICY_DESCRIPTION = ("decode rows: one GEMV per row per linear layer; attention per query over gathered "
                      "visible keys; prefill: GEMM over canonical chunks of "
                      "{chunk} rows")
PREFILL_CHUNK = 128  # rows per prefill chunk: part of the exactness contract, change with care

f32 = np.float32


def prefill_chunks(n_tokens: int, chunk: int = PREFILL_CHUNK) -> list[tuple[int, int]]:
    """The canonical split of a prompt into [start, end) chunks that every strategy uses."""
    return [(s, min(s + chunk, n_tokens)) for s in range(0, n_tokens, chunk)]


# ----------------------------------------------------------------------------------------------
# linear layers


def linear_rows(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Batch-invariant linear layer: one GEMV per row.  [T, IN] -> [T, OUT]"""
    T = x.shape[0]
    out = np.empty((T, w.shape[0]), dtype=f32)  # [T, OUT]
    for i in range(T):
        np.matmul(w, x[i], out=out[i])  # [OUT, IN] @ [IN] -> [OUT]
    if b is not None:
        out += b
    return out


def linear_prefill(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Batched linear layer for prompt chunks (GEMM; rows are NOT independent).  [T, IN] -> [T, OUT]

    Always one BLAS thread: OpenBLAS's GEMM gives other bits with other thread counts, and the
    prompt's K/V must be the same in every process (GEMV, used for decode rows, does not vary).
    """
    with blas.threads(1):
        out = x @ w.T  # [T, IN] @ [IN, OUT] -> [T, OUT]
    if b is not None:
        out += b
    return out


# ----------------------------------------------------------------------------------------------
# elementwise and last-axis ops


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm in float32: x / sqrt(mean(x², last axis) + eps) · w.  [T, D] -> [T, D]"""
    variance = np.add.reduce(x * x, axis=-1, keepdims=True) / f32(x.shape[-1])  # [T, 1]  (np.mean, minus its overhead)
    return x * (f32(1.0) / np.sqrt(variance + f32(eps))) * w  # [T, D]


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """SwiGLU [arxiv/2002.05202, eq. 5]: silu(gate) · up, with silu(g) = g · sigmoid(g).  [T, 2F] -> [T, F]"""
    F = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :F], gate_up[:, F:]  # [T, F], [T, F]
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for g << 0, giving silu = -0
        return gate / (f32(1.0) + np.exp(-gate)) * up  # [T, F]


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32.  [..., N] -> [..., N]"""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# rotary position embedding (Hugging Face "rotate half" convention, LLAMA.md)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies for each rotated pair, with the config's scaling.  -> [HD/2]"""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)  # [HD/2]
    inv_freq = f32(1.0) / (f32(rope.theta) ** exponents)  # [HD/2]
    if rope.rope_type == "linear":
        inv_freq = inv_freq / f32(rope.factor)
    elif rope.rope_type == "llama3":
        old_len = f32(rope.original_max_positions)
        low_wavelen = old_len / f32(rope.low_freq_factor)
        high_wavelen = old_len / f32(rope.high_freq_factor)
        wavelen = f32(2 * np.pi) / inv_freq  # [HD/2]
        # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept
        scaled = np.where(wavelen > low_wavelen, inv_freq / f32(rope.factor), inv_freq)
        smooth = (old_len / wavelen - f32(rope.low_freq_factor)) / f32(rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (f32(1) - smooth) * scaled / f32(rope.factor) + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    elif rope.rope_type != "default":
        raise ValueError(f"unknown RoPE type {rope.rope_type!r}")
    return inv_freq.astype(f32)


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of each position's angles, computed per position.  [T] -> [T, HD/2] each"""
    angles = positions.astype(f32)[:, None] * inv_freq[None, :]  # [T, 1] · [1, HD/2] -> [T, HD/2]
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each head's halves: [x1, x2] -> [x1·c - x2·s, x2·c + x1·s].  [T, heads, HD] -> same"""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, heads, HD/2] each
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, HD/2]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)  # [T, heads, HD]


# ----------------------------------------------------------------------------------------------
# attention


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Attention of one query over exactly its visible keys (ascending position).

    q: [KVH, G, HD] (the query's heads, grouped by the KV head they read)
    k, v: [KVH, N, HD] (the N visible cells)
    returns [KVH, G, HD]
    """
    scores = np.matmul(q, k.transpose(0, 2, 1)) * f32(scale)  # [KVH, G, HD] @ [KVH, HD, N] -> [KVH, G, N]
    return np.matmul(softmax(scores), v)  # [KVH, G, N] @ [KVH, N, HD] -> [KVH, G, HD]


def argmax_rows(logits: np.ndarray) -> np.ndarray:
    """Greedy choice per row; ties go to the lowest token id (NumPy's and torch's rule).  [T, V] -> [T]"""
    return np.argmax(logits, axis=-1)
