"""Every numerically relevant operation of minipipe, in one place (docs/exactness.md).

The exactness contract says a token's bits must not depend on which other tokens share its
batch or where it sits in the batch: a token decoded alone and the same token inside a batch of
speculative rows (same context) must give bit-identical hidden states and logits. BLAS does not
promise that for matrix-matrix products (a GEMM of M >= 2 rows takes other code paths than a
single-row GEMV, and M changes which), so the kernels follow one policy, `row-gemv`:

* **Decode rows** (greedy steps, speculative and tree rows): every linear layer is one
  vector-matrix product per row (`x[i] @ W`, W stored [IN, OUT]); a row's result depends on
  that row alone. Several rows walk W together in column tiles (`gemv_tiles`), each row's
  GEMV over a tile before the next tile, so W comes from memory about once for all of them;
  a tile is a column range at multiples of 16, where a column keeps its bits.
* **Attention** for one query gathers exactly its visible keys (ascending position) and reduces
  over them with the same calls whatever the batch; no -inf mask over a superset of keys.
* **Norms, RoPE, SwiGLU, softmax** are elementwise or reduce along the last axis of C-contiguous
  arrays, which NumPy computes row by row.
* **Prefill** uses batched GEMM (`X @ W`) over one canonical chunking of the prompt
  (`prefill_chunks`): every strategy prefills the same prompt through the same calls, so the
  committed prompt KV is identical everywhere, while long prompts stay fast.

**One canonical layout for every BLAS call.** BLAS results depend on more than the values:
the memory layout of the operands picks the code path (a strided view and a gathered copy of
the same keys took different OpenBLAS kernels and gave different bits, with one query head per
KV head and head_dim 4), and some BLAS libraries (MKL without its reproducibility mode) change
summation order with the alignment of the data. So every operand a decode-path BLAS call sees
is put into one layout that depends only on its shape, never on the batch, the order of the
cache's cells or the cache's history:

    GEMV rows     each input row and each output row is contiguous and starts on a 64-byte
                  boundary (`row_slots`: one aligned slot per row, padded to 16 floats)
    weights       linear layers transposed to [IN, OUT] row slots (`linear_weight`): every
                  weight row contiguous, 64-byte aligned, its padding up to a multiple of 16
                  columns zero; built at load time (a copy, not a view of the file)
    GEMV width    every decode GEMV runs on the padded width, a multiple of 16 columns (the
                  padding's outputs are dropped); threads and the tiles of a row-batched GEMV
                  split it only at multiples of 16 columns (`column_chunks`, `gemv_tiles`),
                  where a column's bits do not change; a GEMV with IN <= 48 wider than 16384
                  columns is never split (`splittable`)
    attention     q [KVH, G, HD], the gathered keys and values [KVH, N, HD], the scores
                  and the probabilities [KVH, G, N]: C-contiguous, 64-byte aligned,
                  freshly gathered (`canonical`, `KVCache.gather`), never views of the cache

Why `x @ W` over [IN, OUT] and not `W @ x` over the checkpoint's [OUT, IN]: OpenBLAS streams
the former about 1.6x faster on one core (19-20 GB/s against 12 here), and decode is GEMV-bound.

`minipipe doctor` checks on the running machine that these layouts give the same bits whatever
the batch, and shows which other layouts (slices of the cache, misaligned or strided copies)
would not.

BLAS runs on one thread (see `minipipe.blas`) except inside decode GEMVs with
`set_gemv_threads(n)` (`minipipe generate --threads`): prefill GEMMs' bits depend on the thread
count. A decode GEMV on n threads keeps the bits of one thread: OpenBLAS's own threads run it
when its padded width is a multiple of 16·n (they split it evenly, so at multiples of 16),
minipipe's threads run column ranges split at multiples of 16 otherwise (`column_chunks`), and
`minipipe doctor` checks both. `minipipe doctor` checks the policy on the running machine and
measures what it costs against plain GEMM.

Shapes use the glossary in `minipipe.config`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading

import numpy as np

from . import blas  # noqa: F401  (importing it pins BLAS to one thread)
from .config import RopeConfig

POLICY = "row-gemv"
POLICY_DESCRIPTION = ("decode rows: one GEMV per row per linear layer (x @ W, W as [in, out] aligned row "
                      "slots; several rows walk W together in column tiles at multiples of 16); attention per "
                      "query over gathered visible keys; prefill: GEMM over canonical chunks of {chunk} rows")
PREFILL_CHUNK = 128  # rows per prefill chunk: part of the exactness contract, change with care

f32 = np.float32


def prefill_chunks(n_tokens: int, chunk: int = PREFILL_CHUNK) -> list[tuple[int, int]]:
    """The canonical split of a prompt into [start, end) chunks that every strategy uses."""
    return [(s, min(s + chunk, n_tokens)) for s in range(0, n_tokens, chunk)]


# ----------------------------------------------------------------------------------------------
# canonical layouts


ALIGN_BYTES = 64  # every canonical BLAS operand starts on a 64-byte boundary (a cache line)
LANE = ALIGN_BYTES // 4  # float32s per 64 bytes
COLUMN_BLOCK = LANE  # threads split a GEMV's output columns at multiples of this (see `column_chunks`)


def address(a: np.ndarray) -> int:
    """The address of a's first byte (through ctypes' buffer view when it can: `a.ctypes.data`
    costs a few microseconds, which add up on the decode path)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError, BufferError):  # read-only, not contiguous, empty
        return a.ctypes.data


def aligned_empty(shape, dtype=f32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    if dtype is f32:  # the hot path (canonical copies, gathered keys): fewer NumPy calls
        n = shape if type(shape) is int else math.prod(shape)
        raw = np.empty(n + LANE, dtype=f32)  # 4-byte aligned at least: the offset is whole floats
        start = (-address(raw) % ALIGN_BYTES) >> 2
        return raw[start: start + n].reshape(shape)
    dtype = np.dtype(dtype)
    n_bytes = math.prod((shape,) if isinstance(shape, int) else shape) * dtype.itemsize
    raw = np.empty(n_bytes + ALIGN_BYTES, dtype=np.uint8)
    start = -address(raw) % ALIGN_BYTES
    return raw[start: start + n_bytes].view(dtype).reshape(shape)


def is_canonical(a: np.ndarray) -> bool:
    """C-contiguous float32 starting on a 64-byte boundary."""
    return a.dtype == f32 and a.flags.c_contiguous and address(a) % ALIGN_BYTES == 0


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
    stride = -(-n_cols // LANE) * LANE  # floats per padded row
    return aligned_empty((n_rows, stride))[:, :n_cols]


def has_row_slots(a: np.ndarray) -> bool:
    """2-D float32 whose every row is contiguous and starts on a 64-byte boundary (the layout
    `row_slots` makes: GEMV rows, and the rows of a linear layer's [IN, OUT] weight)."""
    return (a.ndim == 2 and a.dtype == f32 and (a.shape[1] <= 1 or a.strides[1] == 4)
            and (a.shape[0] <= 1 or a.strides[0] % ALIGN_BYTES == 0) and a.size > 0
            and address(a[0]) % ALIGN_BYTES == 0)


def padded_width(n_cols: int) -> int:
    """Columns of a row slot: n_cols rounded up to a multiple of 16 floats (64 bytes)."""
    return -(-n_cols // LANE) * LANE


class WeightArena:
    """One aligned allocation holding many linear weights, handed out in order as row slots.

    A stage's weights lie in the order a decode step reads them, in one allocation big enough
    for NumPy to ask the kernel for transparent huge pages (fewer TLB misses while streaming
    them: a few percent of GEMV time here). Pages are touched only when a weight is written.
    """

    def __init__(self, shapes: list[tuple[int, int]]):
        self._buf = aligned_empty(max(1, sum(n_in * padded_width(n_out) for n_in, n_out in shapes)))  # float32
        self._used = 0

    def row_slots(self, n_in: int, n_out: int) -> np.ndarray:
        """The next [n_in, n_out] row slots (each matrix starts 64-byte aligned: widths are
        multiples of 16 floats)."""
        width = padded_width(n_out)
        view = self._buf[self._used: self._used + n_in * width]
        assert view.shape[0] == n_in * width, "the arena was sized for other shapes"
        self._used += n_in * width
        return view.reshape(n_in, width)[:, :n_out]


def linear_weight(parts: list[np.ndarray], arena: WeightArena | None = None) -> np.ndarray:
    """The canonical weight of a linear layer from checkpoint matrices [OUT_i, IN] stacked along
    OUT (one part, or q/k/v, or gate/up): transposed into [IN, OUT] row slots, so that a decode
    row is `x @ W` with every weight row contiguous and 64-byte aligned, and each row's padding
    (up to a multiple of 16 columns) zero. In the next slots of `arena` when given.
    -> [IN, sum OUT_i]"""
    n_in = parts[0].shape[1]
    n_out = sum(p.shape[0] for p in parts)
    w = row_slots(n_in, n_out) if arena is None else arena.row_slots(n_in, n_out)  # [IN, OUT]
    _padded(w)[:, n_out:] = 0
    col = 0
    for p in parts:
        for r in range(0, n_in, 256):  # in blocks of rows: a transposing copy that stays in the caches
            w[r: r + 256, col: col + p.shape[0]] = p[:, r: r + 256].T
        col += p.shape[0]
    return w


def is_linear_weight(w: np.ndarray) -> bool:
    """[IN, OUT] row slots as `linear_weight` makes them (rows exactly padded_width(OUT) apart)."""
    return has_row_slots(w) and w.strides[0] == padded_width(w.shape[1]) * 4


def _padded(a: np.ndarray) -> np.ndarray:
    """[R, C] row slots -> [R, padded_width(C)]: the same rows with their padding columns."""
    width = padded_width(a.shape[1])
    if width == a.shape[1]:
        return a
    return np.lib.stride_tricks.as_strided(a, shape=(a.shape[0], width), strides=(a.strides[0], 4))


# ----------------------------------------------------------------------------------------------
# linear layers


SPLIT_MIN_BYTES = 1024 * 1024  # a GEMV is split only into column ranges of at least this much weight
CALLER_SHARE = 1.25  # the calling thread's range, relative to a worker's (workers start late: a wake-up)
# Weight per column tile of a row-batched GEMV (`gemv_tiles`), so a tile read from memory for the
# first row is still cached for the others. Measured on the 2-core development machine (1 MB of
# L2 per core, 32 MB of L3; docs/exactness.md): SmolLM2's head, 4 and 8 rows, costs least with
# tiles of 2-4 MB; narrower tiles lose to more calls and short strided rows, and the layers'
# matrices (1.3-7 MB) gain nothing from tiles under 4 MB (they stay in L3 between rows anyway).
TILE_BYTES = 4 * 1024 * 1024
# OpenBLAS's SkylakeX GEMV takes another kernel (one FMA chain over IN instead of groups of 8)
# when IN <= 48 (IN != 4) and the width is <= 16384: a column of such a GEMV wider than 16384
# changes bits when computed in a range of 16384 columns or fewer. Such GEMVs are never split.
SMALL_IN_MAX, SMALL_KERNEL_MAX_WIDTH = 48, 16384


def splittable(n_in: int, n_out: int) -> bool:
    """Whether a decode GEMV of this shape may be split into column ranges (threads, tiles):
    on its padded width, a column's bits are then those of the whole GEMV in any range that
    starts at a multiple of 16 and is a multiple of 16 wide. Not for IN <= 48 wider than 16384
    columns, where OpenBLAS picks its kernel by the range's width (`SMALL_IN_MAX`)."""
    return n_in > SMALL_IN_MAX or padded_width(n_out) <= SMALL_KERNEL_MAX_WIDTH


def column_chunks(n_in: int, n_out: int, n_threads: int) -> list[tuple[int, int]]:
    """How a GEMV's columns are split over `n_threads` threads: [start, end) ranges of the padded
    width (`padded_width(n_out)`), with boundaries at multiples of COLUMN_BLOCK (16 floats, 64
    bytes). The first range is the calling thread's.

    Every decode GEMV runs on the padded width, a multiple of 16 columns (the padding columns
    of the weight are zero and their outputs are dropped). On that width a column's bits do not
    depend on the split: OpenBLAS computes every column the same way whether it is called on
    all columns or on any range starting at a multiple of 16 (`minipipe doctor` and the tests
    check it, for the model's shapes and for odd ones). On a width that is not a multiple of 16
    they do change (the kernel treats the tail differently), and OpenBLAS's own threads split
    at other places (960 columns on 8 threads: every 120) where they change too, so minipipe
    never lets OpenBLAS thread a GEMV: its own threads each run a one-thread GEMV on a range.

    Since the bits do not depend on the split, the split is free to follow speed: a small GEMV
    is not split (ranges under SPLIT_MIN_BYTES of weight cost more to hand over than they save)
    and the caller's range is CALLER_SHARE times a worker's.

    One exception makes `--threads` fast: OpenBLAS splits a GEMV's columns evenly over its
    threads (and runs small ones on one), so when the padded width is a multiple of 16 x the
    thread count every boundary falls on a multiple of 16 and its threads give the bits of one
    thread too (thousands of random shapes checked for 2, 3, 4, 8 and 16 threads; `minipipe
    doctor` checks the model's). Its threads wait for work spinning, which hands a GEMV over in
    a microsecond or two instead of the tens a sleeping Python thread takes to wake, so
    `gemv_rows` uses them for such widths (all of SmolLM2's on 2 threads) and minipipe's own
    column ranges for the others.
    """
    blocks = padded_width(n_out) // COLUMN_BLOCK
    n = max(1, min(n_threads, blocks, n_in * padded_width(n_out) * 4 // SPLIT_MIN_BYTES))
    if not splittable(n_in, n_out):
        n = 1
    if n == 1:
        return [(0, blocks * COLUMN_BLOCK)]
    weights = [CALLER_SHARE] + [1.0] * (n - 1)
    total, acc, bounds = sum(weights), 0.0, [0]
    for w in weights[:-1]:
        acc += w
        bounds.append(min(blocks - 1, max(bounds[-1] + 1, round(blocks * acc / total))))
    bounds.append(blocks)
    return [(a * COLUMN_BLOCK, b * COLUMN_BLOCK) for a, b in zip(bounds, bounds[1:]) if b > a]


class _Gemv:
    """How decode GEMVs use threads: `team` is None (the caller's thread only) or a
    `blas.ColumnTeam`; `use_blas_threads`: let OpenBLAS's own threads run a GEMV whose padded
    width is a multiple of 16 x the thread count (see `column_chunks`)."""

    team: "blas.ColumnTeam | None" = None
    use_blas_threads: bool = True


def set_gemv_threads(n: int, blas_threads: bool = True) -> None:
    """Run decode-row GEMVs on `n` threads (1: the calling thread only). `blas_threads=False`:
    never OpenBLAS's own threads, only minipipe's column ranges (doctor checks both).

    Process-wide, like OpenBLAS's thread count, which `gemv_rows` raises around a GEMV: meant
    for one decoding thread (`minipipe generate --threads`), not for forward passes running
    concurrently in several Python threads of one process."""
    if n < 1:
        raise ValueError(f"GEMV threads must be >= 1, got {n}")
    _Gemv.use_blas_threads = blas_threads and blas.info().controllable
    if _Gemv.team is not None:
        if _Gemv.team.n_threads == n:
            return
        _Gemv.team.close()
        _Gemv.team = None
    if n > 1:
        _Gemv.team = blas.ColumnTeam(n)


def gemv_threads() -> int:
    return 1 if _Gemv.team is None else _Gemv.team.n_threads


def gemv_tiles(n_in: int, n_out: int, a: int = 0, b: int | None = None,
               tile_bytes: int | None = None) -> tuple[tuple[int, int], ...]:
    """The column tiles of a row-batched GEMV over columns [a, b) of an [n_in, n_out] weight
    (default: the whole padded width): [start, end) ranges at multiples of 16 columns, each
    holding about `tile_bytes` of weight (default TILE_BYTES; even sizes), so that a tile read
    from memory for the first row stays in the CPU caches for the others. One tile (the whole
    range) for a GEMV that may not be split (`splittable`) or that fits in one tile.
    -> ((start, end), ...)"""
    if tile_bytes is None:
        return _tiles(n_in, n_out, a, b, TILE_BYTES)
    return _tiles(n_in, n_out, a, b, tile_bytes)


@functools.lru_cache(maxsize=4096)
def _tiles(n_in: int, n_out: int, a: int, b: int | None, tile_bytes: int) -> tuple[tuple[int, int], ...]:
    width = padded_width(n_out)
    b = width if b is None else b
    assert a % COLUMN_BLOCK == 0 and b % COLUMN_BLOCK == 0 and 0 <= a < b <= width, (a, b, width)
    blocks = (b - a) // COLUMN_BLOCK
    n = min(blocks, -(-n_in * (b - a) * 4 // max(1, tile_bytes))) if splittable(n_in, n_out) else 1
    bounds = [a + (blocks * k // n) * COLUMN_BLOCK for k in range(n + 1)]  # even split, multiples of 16
    return tuple(zip(bounds, bounds[1:]))


def _gemv_rows(rows: np.ndarray, w: np.ndarray, out: np.ndarray, a: int, b: int) -> None:
    """out[i, a:b] = rows[i] @ w[:, a:b] for every row (w, out: padded widths).

    One row: one GEMV over [a, b). Several rows: the row-batched GEMV, tile by tile
    (`gemv_tiles`): for each column tile every row's GEMV over that tile, then the next tile,
    so each tile of W comes from memory about once for all the rows. A column's bits are the
    same in every tile split, since every tile starts at a multiple of 16 and is a multiple of
    16 wide (`splittable`)."""
    n_rows = rows.shape[0]
    if a >= b:
        return
    if n_rows == 1:
        wc = w[:, a:b] if a or b != w.shape[1] else w
        np.matmul(rows[0], wc, out=out[0, a:b])  # [IN] @ [IN, b - a] -> [b - a]
        return
    for s, e in _tiles(w.shape[0], w.shape[1], a, b, TILE_BYTES):
        wc, oc = w[:, s:e], out[:, s:e]  # [IN, e - s], [T, e - s]
        for i in range(n_rows):
            np.matmul(rows[i], wc, out=oc[i])  # [IN] @ [IN, e - s] -> [e - s]


def gemv_rows(rows: np.ndarray, w: np.ndarray, out: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """The decode GEMV on canonical operands: out[i] = rows[i] @ w (+ b) for every row.

    rows: [T, IN] and out: [T, OUT] in row slots (`row_slots`); w: [IN, OUT] from
    `linear_weight`. The caller guarantees the layouts (`linear_rows` checks and copies).
    Runs on the padded width. One row: one GEMV (split over the GEMV threads by
    `column_chunks`, or on OpenBLAS's threads). Several rows: the row-batched GEMV
    (`_gemv_rows`: column tiles, every row's GEMV over a tile before the next), on minipipe's
    threads' column ranges when there are GEMV threads. Every row's bits are those of its
    single-row GEMV on one thread.  -> out
    """
    wp, outp = _padded(w), _padded(out)  # [IN, OUT'], [T, OUT']: OUT' a multiple of 16
    team = _Gemv.team
    if team is None:
        if rows.shape[0] == 1:
            np.matmul(rows[0], wp, out=outp[0])  # [IN] @ [IN, OUT'] -> [OUT']
        else:
            _gemv_rows(rows, wp, outp, 0, wp.shape[1])
    elif (rows.shape[0] == 1 and _Gemv.use_blas_threads and wp.shape[1] % (COLUMN_BLOCK * team.n_threads) == 0
          and splittable(w.shape[0], w.shape[1])):
        blas.set_threads(team.n_threads)  # OpenBLAS splits OUT' evenly: at multiples of 16 here
        try:
            np.matmul(rows[0], wp, out=outp[0])
        finally:
            blas.set_threads(1)
    else:
        team.run(_gemv_rows, (rows, wp, outp), column_chunks(w.shape[0], w.shape[1], team.n_threads))
    if b is not None:
        out += b
    return out


def linear_rows(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Batch-invariant linear layer: one GEMV per row, each row in its own aligned slot.

    x: [T, IN]; w: [IN, OUT] from `linear_weight`.
    -> [T, OUT] (a fresh view of aligned row slots: contiguous rows, padded between them)

    The GEMV runs on the padded width (a multiple of 16 columns; see `column_chunks`). With
    `set_gemv_threads(n)` each row's GEMV is split into the column ranges of `column_chunks`,
    run on n threads; the bits are those of one thread.
    """
    if not is_linear_weight(w):
        raise ValueError("linear_rows needs a weight from kernels.linear_weight ([IN, OUT] row slots)")
    T, n_in = x.shape
    if has_row_slots(x):
        rows = x
    else:
        rows = row_slots(T, n_in)  # [T, IN]
        rows[...] = x
    return gemv_rows(rows, w, row_slots(T, w.shape[1]), b)  # [T, OUT]


def linear_prefill(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Batched linear layer for prompt chunks (GEMM; rows are NOT independent).

    x: [T, IN]; w: [IN, OUT] (`linear_weight`).  -> [T, OUT]

    Always one BLAS thread: OpenBLAS's GEMM gives other bits with other thread counts, and the
    prompt's K/V must be the same in every process.
    """
    with blas.threads(1):
        out = x @ w  # [T, IN] @ [IN, OUT] -> [T, OUT]
    if b is not None:
        out += b
    return out


# ----------------------------------------------------------------------------------------------
# elementwise and last-axis ops


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm in float32: x / sqrt(mean(x², last axis) + eps) · w.  [T, D] -> [T, D] (into `out`)"""
    variance = np.add.reduce(x * x, axis=-1, keepdims=True) / f32(x.shape[-1])  # [T, 1]  (np.mean, minus its overhead)
    out = np.multiply(x, f32(1.0) / np.sqrt(variance + f32(eps)), out=out)  # [T, D]
    return np.multiply(out, w, out=out)  # [T, D]


def swiglu(gate_up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """SwiGLU [arxiv/2002.05202, eq. 5]: silu(gate) · up, with silu(g) = g · sigmoid(g).  [T, 2F] -> [T, F]

    Computed as gate / (1 + exp(-gate)) · up, into `out` when given (not overlapping gate_up).
    """
    F = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :F], gate_up[:, F:]  # [T, F], [T, F]
    t = np.negative(gate, out=out)  # [T, F]
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for g << 0, giving silu = -0
        np.exp(t, out=t)
    t += f32(1.0)
    np.divide(gate, t, out=t)
    t *= up
    return t


def rms_norm_rows(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """`rms_norm` with the same IEEE float32 operations in the same order, per row: the
    mean, the epsilon and the reciprocal on float32 scalars instead of [T, 1] arrays (fewer
    NumPy calls for the few rows of a decode step; the square root is taken in float64 and
    rounded, which gives the correctly rounded float32 root).  [T, D] -> out [T, D]"""
    D, E, ONE = f32(x.shape[-1]), f32(eps), f32(1.0)
    for i in range(x.shape[0]):
        r = x[i]
        np.multiply(r, ONE / f32(math.sqrt(np.add.reduce(r * r) / D + E)), out=out[i])
    return np.multiply(out, w, out=out)


def softmax(scores: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis, in float32.  [..., N] -> [..., N] (into `out` when given)"""
    e = np.subtract(scores, np.maximum.reduce(scores, axis=-1, keepdims=True), out=out)  # (ndarray.max's ufunc)
    np.exp(e, out=e)
    e /= np.add.reduce(e, axis=-1, keepdims=True)  # (ndarray.sum's ufunc)
    return e


# ----------------------------------------------------------------------------------------------
# rotary position embedding (Hugging Face "rotate half" convention, docs/model.md)


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


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rotate each head's halves: [x1, x2] -> [x1·c - x2·s, x2·c + x1·s].  [T, heads, HD] -> same

    `out` (same shape, not overlapping x): where to write the result (a fresh array by default).
    """
    half = x.shape[-1] // 2
    if out is None:
        out = np.empty(x.shape, dtype=f32)
    x1, x2 = x[..., :half], x[..., half:]  # [T, heads, HD/2] each
    o1, o2 = out[..., :half], out[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, HD/2]
    np.multiply(x1, c, out=o1)
    o1 -= x2 * s  # x1·c - x2·s
    np.multiply(x2, c, out=o2)
    o2 += x1 * s  # x2·c + x1·s
    return out


def rope_tables(cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of each row's angles laid out for `apply_rope_tables`: [c, c] and [-s, s].
    [T, HD/2] each -> [T, 1, HD] each"""
    return (np.concatenate([cos, cos], axis=-1)[:, None, :],
            np.concatenate([np.negative(sin), sin], axis=-1)[:, None, :])


def apply_rope_tables(x: np.ndarray, cos2: np.ndarray, sin2: np.ndarray, out: np.ndarray,
                      tmp: np.ndarray) -> np.ndarray:
    """`apply_rope` with fewer NumPy calls and the same bits: x·[c, c] + [x2, x1]·[-s, s]
    (x1·c + x2·(-s) is x1·c - x2·s exactly: negation is exact and a - b is a + (-b)).
    x, out, tmp: [T, heads, HD] (out and tmp not overlapping x); cos2, sin2 from `rope_tables`."""
    half = x.shape[-1] // 2
    np.concatenate([x[..., half:], x[..., :half]], axis=-1, out=tmp)  # [x2, x1]
    tmp *= sin2
    np.multiply(x, cos2, out=out)
    out += tmp
    return out


# ----------------------------------------------------------------------------------------------
# attention


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Attention of one query over exactly its visible keys (ascending position).

    q: [KVH, G, HD] (the query's heads, grouped by the KV head they read)
    k, v: [KVH, N, HD] (the N visible cells)
    out: [KVH, G, HD], where to write the result (a fresh array by default)
    returns [KVH, G, HD]

    Both products run on canonical operands (see the module docstring), so the bits depend on
    the values and the shapes only.
    """
    KVH, G, HD = q.shape
    dest = out if out is not None and is_canonical(out) else aligned_empty((KVH, G, HD))
    attend_canonical(canonical(q), canonical(k), canonical(v), scale, dest)
    if out is not None and dest is not out:
        out[...] = dest
    return dest if out is None else out


def attend_canonical(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, out: np.ndarray) -> np.ndarray:
    """`attend` on operands the caller guarantees canonical (q, out: [KVH, G, HD]; k, v:
    [KVH, N, HD]). The scores live in a reused per-thread buffer.  -> out"""
    KVH, G, _ = q.shape
    N = k.shape[1]
    scores = scratch().flat("attention scores", KVH * G * N)[: KVH * G * N].reshape(KVH, G, N)  # canonical
    np.matmul(q, k.transpose(0, 2, 1), out=scores)  # [KVH, G, HD] @ [KVH, HD, N] -> [KVH, G, N]
    scores *= f32(scale)
    probs = softmax(scores, out=scores)  # [KVH, G, N], in place: still canonical
    np.matmul(probs, v, out=out)  # [KVH, G, N] @ [KVH, N, HD] -> [KVH, G, HD]
    return out


# ----------------------------------------------------------------------------------------------
# reused buffers


class Scratch:
    """Aligned buffers reused from one forward step to the next (no allocation on the hot path).

    `rows(name, T, n)`: [T, n] row slots; `flat(name, size)`: a 1-D aligned float32 array of at
    least `size` elements. A buffer's layout depends only on the requested shape (rows: padded
    to 16 floats, every row 64-byte aligned), the canonical layout; buffers grow when asked for
    more, never shrink. A buffer is valid until the next request of the same name and width:
    callers use them within one layer and never hand them out.
    """

    def __init__(self):
        self._rows: dict = {}
        self._flat: dict = {}
        self._rope_key: tuple = (None, None)
        self._rope: tuple = (None, None)

    def rope(self, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`rope_tables(cos, sin)`, computed once per forward pass (while the same cos and sin
        arrays come back, layer after layer) rather than once per layer."""
        if self._rope_key[0] is not cos or self._rope_key[1] is not sin:
            self._rope = rope_tables(cos, sin)
            self._rope_key = (cos, sin)  # held, so the identity test cannot meet a recycled array
        return self._rope

    def rows(self, name: str, n_rows: int, n_cols: int) -> np.ndarray:
        buf = self._rows.get((name, n_cols))
        if buf is None or buf.shape[0] < n_rows:
            buf = row_slots(max(n_rows, 2 * (0 if buf is None else buf.shape[0]), 4), n_cols)
            self._rows[(name, n_cols)] = buf
        return buf[:n_rows]

    def flat(self, name: str, size: int) -> np.ndarray:
        buf = self._flat.get(name)
        if buf is None or buf.shape[0] < size:
            buf = aligned_empty(max(size, 2 * (0 if buf is None else buf.shape[0]), 1024))
            self._flat[name] = buf
        return buf


_local = threading.local()


def scratch() -> Scratch:
    """This thread's reused buffers."""
    s = getattr(_local, "scratch", None)
    if s is None:
        s = _local.scratch = Scratch()
    return s


def argmax_rows(logits: np.ndarray) -> np.ndarray:
    """Greedy choice per row; ties go to the lowest token id (NumPy's and torch's rule).  [T, V] -> [T]"""
    return np.argmax(logits, axis=-1)


# ----------------------------------------------------------------------------------------------
# choosing the next token: greedy, or exact sampling by the Gumbel-max trick
#
# Sampling from softmax(z / T) is the same as taking argmax(z / T + g), g i.i.d. standard Gumbel
# noise over the vocabulary. The noise for the token at position p is a pure function of
# (seed, p): Philox, a counter-based generator, keyed by the pair, its raw 64-bit words turned
# into uniforms in (0, 1) and then into Gumbel noise, all in fixed float64 steps. So the sampled
# token at p depends only on the context (the logits' bits) and the seed — like the greedy
# argmax — and every strategy, batch, process and run chooses the same token. Top-k, top-p and
# min-p restrict the candidates first (in that order, as transformers applies them); the
# argmax then runs over the candidates only. Each row is chosen on its own with the same calls.

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p")  # the columns of a batch's `sampling`


def gumbel_noise(seed: int, position: int, vocab: int) -> np.ndarray:
    """Standard Gumbel noise for the token at `position` of a request seeded `seed`.  -> [V] float32

    Token i's noise comes from word i of Philox4x64 keyed by (seed, position): the words of
    counter block c are tokens 4c .. 4c+3, so any token's noise can also be computed alone
    (`gumbel_noise_at`), with the same bits."""
    key = np.array([int(seed) & 0xFFFFFFFFFFFFFFFF, int(position)], dtype=np.uint64)
    return _gumbel(np.random.Philox(key=key).random_raw(vocab))  # [V] uint64 words, the counter-based stream


def gumbel_noise_at(seed: int, position: int, tokens) -> np.ndarray:
    """`gumbel_noise(seed, position, V)[tokens]` without drawing the whole vocabulary's noise.  -> [n]"""
    key = np.array([int(seed) & 0xFFFFFFFFFFFFFFFF, int(position)], dtype=np.uint64)
    words = [np.random.Philox(key=key, counter=np.array([t // 4, 0, 0, 0], dtype=np.uint64)).random_raw(4)[t % 4]
             for t in (int(t) for t in tokens)]
    return _gumbel(np.array(words, dtype=np.uint64))


def _gumbel(words: np.ndarray) -> np.ndarray:
    """uint64 words -> uniforms in (0, 1) (53 bits, centred in their interval) -> -log(-log(u)).  -> float32"""
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53
    return (-np.log(-np.log(uniform))).astype(f32)


def sampling_candidates(scores: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Tokens a sample may take, from temperature-scaled logits.  [V] -> [V] bool

    top_k > 0: the k highest scores (ties at the k-th kept); top_p < 1: then the smallest set of
    most probable tokens whose probability reaches top_p; min_p > 0: then the tokens at least
    min_p times as probable as the most probable one. At least one token always remains.
    """
    keep = np.ones(scores.shape[0], dtype=bool)
    if 0 < top_k < scores.shape[0]:
        keep = scores >= np.partition(scores, -top_k)[-top_k]
    if top_p < 1.0 or min_p > 0.0:
        masked = np.where(keep, scores, -np.inf).astype(f32)
        probs = softmax(masked[None, :])[0]  # [V]
        if top_p < 1.0:
            order = most_probable_first(probs, top_p)  # ties by token id
            before = np.cumsum(probs[order]) - probs[order]  # probability of the tokens ahead of each
            keep_sorted = before < top_p  # the first token always (before = 0)
            keep = np.zeros_like(keep)
            keep[order[keep_sorted]] = True
            keep &= np.isfinite(masked)
            probs = np.where(keep, probs, 0).astype(f32)
        if min_p > 0.0:
            keep &= probs >= f32(min_p) * probs.max()
    return keep


def most_probable_first(probs: np.ndarray, mass: float) -> np.ndarray:
    """Token ids in descending probability (ties by ascending id), at least as many as it takes
    to reach `mass`: the head of the full sorted order, without sorting the whole vocabulary
    (the m most probable tokens, ties at the boundary included, m growing until they hold
    `mass`). The head is exactly the full sort's head, so cumulative sums over it match.  -> [n]"""
    V, m = probs.shape[0], 64
    while m < V:
        threshold = np.partition(probs, V - m)[V - m]  # the m-th largest probability
        candidates = np.flatnonzero(probs >= threshold)  # ascending ids
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        if np.cumsum(probs[order])[-1] >= mass:
            return order
        m *= 4
    return np.argsort(-probs, kind="stable")


def choose_token(logits: np.ndarray, position: int, seed: int | None = None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> int:
    """The token at `position` after these logits: the argmax when temperature is 0, else the
    Gumbel-max sample keyed by (seed, position).  [V] -> int"""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scores = (logits / f32(temperature)).astype(f32)  # [V]
    keep = sampling_candidates(scores, int(top_k), float(top_p), float(min_p))
    perturbed = np.where(keep, scores + gumbel_noise(seed, position, scores.shape[0]), -np.inf)
    return int(np.argmax(perturbed))


def choose_rows(logits: np.ndarray, positions: np.ndarray, seeds: np.ndarray | None = None,
                sampling: np.ndarray | None = None) -> np.ndarray:
    """Each row's next token: greedy, or sampled with its own seed and settings.

    logits [T, V]; positions [T] (of the tokens being chosen: a row's position + 1); seeds [T]
    uint64 and sampling [T, 4] (`SAMPLING_FIELDS`) per row, or None for greedy.  -> [T] int64
    """
    if sampling is None or not np.any(sampling[:, 0] > 0):
        return np.argmax(logits, axis=-1)
    return np.array([choose_token(logits[i], int(positions[i]), int(seeds[i]), *(float(x) for x in sampling[i]))
                     for i in range(logits.shape[0])], dtype=np.int64)
