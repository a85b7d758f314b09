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

**One canonical layout for every BLAS call.** BLAS results depend on more than the values:
the memory layout of the operands picks the code path (a strided view and a gathered copy of
the same keys took different OpenBLAS kernels and gave different bits, with one query head per
KV head and head_dim 4), and some BLAS libraries (MKL without its reproducibility mode) change
summation order with the alignment of the data. So every operand a decode-path BLAS call sees
is put into one layout that depends only on its shape, never on the batch, the order of the
cache's cells or the cache's history:

    GEMV rows     each input row and each output row is C-contiguous and starts on a
                  64-byte boundary (`row_slots`: one aligned slot per row)
    attention     q [KVH, G, HD], the gathered keys and values [KVH, N, HD], the scores
                  and the probabilities [KVH, G, N]: C-contiguous, 64-byte aligned,
                  freshly gathered (`canonical`, `KVCache.gather`), never views of the cache
    weights       C-contiguous; a float32 checkpoint is mapped as it lies in the file (the
                  same offsets in every process), everything converted or fused is 64-byte
                  aligned (`aligned_empty`)

`minipipe doctor` checks on the running machine that these layouts give the same bits whatever
the batch, and shows which other layouts (slices of the cache, misaligned or strided copies)
would not.

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


ALIGN_BYTES = 64  # every canonical BLAS operand starts on a 64-byte boundary (a cache line)


def aligned_empty(shape, dtype=f32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n_bytes + ALIGN_BYTES, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN_BYTES
    return raw[start: start + n_bytes].view(dtype).reshape(shape)


def is_canonical(a: np.ndarray) -> bool:
    """C-contiguous float32 starting on a 64-byte boundary."""
    return a.dtype == f32 and a.flags.c_contiguous and a.ctypes.data % ALIGN_BYTES == 0


def canonical(a: np.ndarray) -> np.ndarray:
    """`a` itself if it is canonical, else a canonical copy (same values, same shape)."""
    if is_canonical(a):
        return a
    out = aligned_empty(a.shape)
    out[...] = a
    return out


def row_slots(n_rows: int, n_cols: int) -> np.ndarray:
    """A [n_rows, n_cols] float32 view whose every row is contiguous and 64-byte aligned
    (rows are padded to a multiple of 16 floats).  -> [n_rows, n_cols]"""
    stride = -(-n_cols // (ALIGN_BYTES // 4)) * (ALIGN_BYTES // 4)  # floats per padded row
    return aligned_empty((n_rows, stride))[:, :n_cols]


def linear_rows(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Batch-invariant linear layer: one GEMV per row, each row in its own aligned slot.

    [T, IN] -> [T, OUT] (a view of aligned row slots: contiguous rows, padded between them)
    """
    T = x.shape[0]
    rows = row_slots(T, x.shape[1])  # [T, IN]
    rows[...] = x
    out = row_slots(T, w.shape[0])  # [T, OUT]
    for i in range(T):
        np.matmul(w, rows[i], out=out[i])  # [OUT, IN] @ [IN] -> [OUT]
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

    Both products run on canonical operands (see the module docstring), so the bits depend on
    the values and the shapes only.
    """
    KVH, G, HD = q.shape
    N = k.shape[1]
    q, k, v = canonical(q), canonical(k), canonical(v)
    scores = aligned_empty((KVH, G, N))
    np.matmul(q, k.transpose(0, 2, 1), out=scores)  # [KVH, G, HD] @ [KVH, HD, N] -> [KVH, G, N]
    probs = canonical(softmax(scores * f32(scale)))  # [KVH, G, N]
    out = aligned_empty((KVH, G, HD))
    np.matmul(probs, v, out=out)  # [KVH, G, N] @ [KVH, N, HD] -> [KVH, G, HD]
    return out


def argmax_rows(logits: np.ndarray) -> np.ndarray:
    """Greedy choice per row; ties go to the lowest token id (NumPy's and torch's rule).  [T, V] -> [T]"""
    return np.argmax(logits, axis=-1)
