"""`minipipe doctor`: check the exactness contract on this machine and report the kernel policy.

Checks (each on several random models: MHA, GQA and MQA; odd sizes; optionally a checkpoint):

1. **row position** — a linear layer's row gives the same bits alone, at any place in a batch,
   and at any memory alignment.
2. **chain** — k tokens decoded one at a time give the same logits, bit for bit, as the same k
   tokens verified in one speculative batch.
3. **tree** — two branches sharing a prefix, verified together in one batch (rows interleaved,
   each branch in its own sequence), give each branch's sequential logits.
4. **threads** — a decode GEMV (`x @ W` over the [IN, OUT] row-slot weight, on the padded
   width) gives the same bits on 1 thread as on 2, 3, 4, 8 and every core's worth of threads
   (`generate --threads N`): split into column ranges at multiples of 16 on minipipe's threads,
   and on OpenBLAS's own threads where the padded width is a multiple of 16 x N; and split at
   a random multiple of 16; for every linear shape of the models (and a checkpoint's) and for
   odd shapes. It also counts how often OpenBLAS's own threads would have given other bits on
   the unpadded widths, which is why minipipe does not let them split any GEMV.
5. **row-batched GEMV** — several rows through one linear layer walk the weight in column
   tiles (`kernels.gemv_tiles`), every row's GEMV over a tile before the next: each row gets
   the bits of its own single-row GEMV, for every linear shape of the models (and a
   checkpoint's) and odd shapes, 2, 3 and 8 rows, at the configured tile size, at 16-column
   tiles and at a random size, on one thread and on two threads' column ranges. It also
   counts how often splitting a GEMV with IN <= 48 wider than 16384 columns would change its
   bits here (OpenBLAS's SkylakeX kernel depends on the width there), which is why such GEMVs
   are never split, and checks that they are not.
6. **layout** — attention gives the same bits whatever the memory layout of its operands (a
   slice of the cache, a gathered copy, misaligned or strided copies), for the models' head
   shapes and for tiny head dims; it also counts how often the same products computed straight
   on those layouts (no canonical copy) would differ, which is why the kernels copy.

Then it measures the policy's cost: a forward pass of M rows through the exact kernels
(one GEMV per row, row-batched in column tiles) against the same pass through plain batched
GEMM, and linear layers and an LM head streamed from memory with and without the tiles.
"""

from __future__ import annotations

import os
import time

import numpy as np

from . import blas, kernels
from .batch import Batch
from .greedy import prefill
from .model import StageModel, load_stage
from .synthetic import random_model

MODEL_SHAPES = [  # (name, config kwargs)
    ("MHA", dict(dim=40, ffn_dim=72, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=101)),
    ("GQA", dict(dim=48, ffn_dim=100, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=97, attention_bias=True)),
    ("MQA", dict(dim=36, ffn_dim=60, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=14, vocab_size=75,
                 rope_type="llama3", tie_embeddings=True)),
]


def check_linear_rows(rng: np.random.Generator, n_in: int, n_out: int, n_rows: int = 9) -> bool:
    w = kernels.linear_weight([rng.standard_normal((n_out, n_in)).astype(np.float32)])  # [IN, OUT]
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    alone = [kernels.linear_rows(x[i:i + 1].copy(), w)[0] for i in range(n_rows)]
    batched = kernels.linear_rows(x, w)
    ok = all(np.array_equal(alone[i], batched[i]) for i in range(n_rows))
    buf = np.empty(n_rows * n_in + 16, dtype=np.float32)
    for offset in range(1, 16, 3):  # shift the batch by 4-byte steps: misaligned rows
        shifted = buf[offset: offset + n_rows * n_in].reshape(n_rows, n_in)
        shifted[:] = x
        ok &= all(np.array_equal(alone[i], r) for i, r in enumerate(kernels.linear_rows(shifted, w)))
    wide = np.zeros((n_rows, 2 * n_in), dtype=np.float32)  # every other float: a strided batch
    wide[:, ::2] = x
    ok &= all(np.array_equal(alone[i], r) for i, r in enumerate(kernels.linear_rows(wide[:, ::2], w)))
    return ok


def operand_layouts(a: np.ndarray) -> dict[str, np.ndarray]:
    """The same values of a 3-D array in several memory layouts."""
    n0, n1, n2 = a.shape
    cache = np.zeros((n0, n1 + 5, n2), dtype=np.float32)  # a view into a bigger cache
    cache[:, 2:2 + n1] = a
    flat = np.zeros(a.size + 16, dtype=np.float32)  # 4 bytes off any alignment
    shifted = flat[1:1 + a.size].reshape(a.shape)
    shifted[...] = a
    wide = np.zeros((n0, n1, 2 * n2), dtype=np.float32)
    wide[:, :, ::2] = a
    return {"gathered copy": cache[:, np.arange(2, 2 + n1)], "slice of the cache": cache[:, 2:2 + n1],
            "misaligned": shifted, "strided": wide[:, :, ::2], "Fortran order": np.asfortranarray(a)}


def raw_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Attention computed straight on the operands as given (no canonical copies)."""
    scores = np.matmul(q, k.transpose(0, 2, 1)) * np.float32(scale)
    return np.matmul(kernels.softmax(scores), v)


def check_attention_layouts(rng: np.random.Generator, kv_heads: int, groups: int, head_dim: int,
                            lengths=(1, 2, 5, 13, 64, 300)) -> tuple[bool, int, int]:
    """(canonical attention identical for every layout, raw products that differed, cases)."""
    ok, raw_differs, cases = True, 0, 0
    for n in lengths:
        q = rng.standard_normal((kv_heads, groups, head_dim)).astype(np.float32)
        k = rng.standard_normal((kv_heads, n, head_dim)).astype(np.float32)
        v = rng.standard_normal((kv_heads, n, head_dim)).astype(np.float32)
        expected, raw_expected = kernels.attend(q, k, v, 0.125), raw_attend(q, k, v, 0.125)
        for (_, k2), (_, v2) in zip(operand_layouts(k).items(), operand_layouts(v).items()):
            ok &= bool(np.array_equal(kernels.attend(q, k2, v2, 0.125), expected))
            raw_differs += not np.array_equal(raw_attend(q, k2, v2, 0.125), raw_expected)
            cases += 1
    return ok, raw_differs, cases


def sequential_logits(model: StageModel, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Logits after each of `tokens`, decoded one at a time in sequence 0 (the greedy way)."""
    cache = model.new_cache()
    prefill(model, cache, prompt)
    return [model.forward(cache, Batch.chain([t], len(prompt) + i))[0] for i, t in enumerate(tokens)]


def check_chain(model: StageModel, prompt: list[int], tokens: list[int]) -> bool:
    expected = sequential_logits(model, prompt, tokens)
    cache = model.new_cache(n_seqs=2)
    prefill(model, cache, prompt, seq_ids=(0, 1))
    got = model.forward(cache, Batch.chain(tokens, len(prompt), seq_ids=(1,)))
    return all(np.array_equal(e, g) for e, g in zip(expected, got))


def check_tree(model: StageModel, prompt: list[int], branch_a: list[int], branch_b: list[int]) -> bool:
    """Two branches (sequences 1 and 2) after the prompt, interleaved in one batch."""
    cache = model.new_cache(n_seqs=3)
    prefill(model, cache, prompt)
    cache.seq_cp(0, 1)
    cache.seq_cp(0, 2)
    n = len(prompt)
    rows = [(t, n + i, 1) for i, t in enumerate(branch_a)] + [(t, n + i, 2) for i, t in enumerate(branch_b)]
    order = sorted(range(len(rows)), key=lambda r: (rows[r][1], -rows[r][2]))  # interleave by position
    batch = Batch(tokens=np.array([rows[r][0] for r in order]), positions=np.array([rows[r][1] for r in order]),
                  seq_ids=tuple((rows[r][2],) for r in order), want_logits=np.ones(len(rows), dtype=bool))
    got = model.forward(cache, batch)
    by_row = {order[i]: got[i] for i in range(len(order))}
    expected = sequential_logits(model, prompt, branch_a) + sequential_logits(model, prompt, branch_b)
    return all(np.array_equal(expected[r], by_row[r]) for r in range(len(rows)))


def linear_shapes(model: StageModel) -> set[tuple[int, int]]:
    """The (IN, OUT) shapes of a model's decode GEMVs."""
    w = model.weights
    mats = [a for lw in w.layers for a in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
    return {m.shape for m in mats + ([w.head] if w.head is not None else [])}


def gemv_thread_counts() -> list[int]:
    return sorted({2, 3, 4, 8, max(2, os.cpu_count() or 1)})


def check_gemv_threads(rng: np.random.Generator, shapes, thread_counts) -> tuple[bool, int, int]:
    """(minipipe's split GEMVs equal one thread everywhere, OpenBLAS-threaded GEMVs that
    differed, cases) over `shapes` (IN, OUT) and `thread_counts`."""
    ok, blas_differs, cases = True, 0, 0
    before, min_bytes = kernels.gemv_threads(), kernels.SPLIT_MIN_BYTES
    kernels.SPLIT_MIN_BYTES = 1  # split every GEMV, even those too small to be split in practice
    try:
        for n_in, n_out in sorted(shapes):
            w = kernels.linear_weight([rng.standard_normal((n_out, n_in)).astype(np.float32)])
            x = rng.standard_normal((2, n_in)).astype(np.float32)
            kernels.set_gemv_threads(1)
            one = single_row_gemvs(x, w)
            width = kernels.padded_width(n_out)  # any split at multiples of 16, not only the threads' own
            if kernels.splittable(n_in, n_out):
                cut = int(rng.integers(0, width // kernels.COLUMN_BLOCK + 1)) * kernels.COLUMN_BLOCK
                rows, split = kernels.row_slots(1, n_in), kernels.row_slots(1, n_out)
                rows[...] = x[:1]
                for a, b in ((0, cut), (cut, width)):
                    kernels._gemv_rows(rows, kernels._padded(w), kernels._padded(split), a, b)
                ok &= bool(np.array_equal(split, one[:1]))
            for n in thread_counts:
                for blas_threads in (True, False):  # OpenBLAS's even splits where allowed / minipipe's only
                    kernels.set_gemv_threads(n, blas_threads=blas_threads)
                    ok &= bool(np.array_equal(kernels.linear_rows(x[:1], w), one[:1]))  # one row: one GEMV
                    ok &= bool(np.array_equal(kernels.linear_rows(x, w), one))  # two: the row-batched GEMV
                if blas.info().controllable:  # what OpenBLAS's own threads would give
                    with blas.threads(n):
                        theirs = np.stack([x[i] @ w for i in range(2)])
                    with blas.threads(1):
                        mine = np.stack([x[i] @ w for i in range(2)])
                    blas_differs += not np.array_equal(theirs, mine)
                cases += 1
    finally:
        kernels.SPLIT_MIN_BYTES = min_bytes
        kernels.set_gemv_threads(before)
    return ok, blas_differs, cases


def single_row_gemvs(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each row of x alone through `linear_rows`: one GEMV over the whole width (the oracle of the
    row-batched and threaded GEMVs; call it on one GEMV thread).  -> [T, OUT]"""
    return np.stack([kernels.linear_rows(x[i:i + 1].copy(), w)[0] for i in range(x.shape[0])])


def check_row_batched(rng: np.random.Generator, shapes, row_counts=(2, 3, 8)) -> tuple[bool, int]:
    """(every row of a row-batched GEMV equals its single-row GEMV, cases) over `shapes` (IN, OUT):
    at the configured tile size, at 16-column tiles and at a random tile size, on one thread
    and on two threads' column ranges (every GEMV split, however small)."""
    ok, cases = True, 0
    tile, min_bytes, before = kernels.TILE_BYTES, kernels.SPLIT_MIN_BYTES, kernels.gemv_threads()
    try:
        for n_in, n_out in sorted(shapes):
            w = kernels.linear_weight([rng.standard_normal((n_out, n_in)).astype(np.float32)])
            x = rng.standard_normal((max(row_counts), n_in)).astype(np.float32)
            kernels.set_gemv_threads(1)
            alone = single_row_gemvs(x, w)  # [R, OUT]
            for tile_bytes in (tile, 1, int(rng.integers(16 * 4 * n_in, 4 << 20))):  # 1 byte: 16-column tiles
                for threads in (1, 2):
                    kernels.TILE_BYTES, kernels.SPLIT_MIN_BYTES = tile_bytes, 1 if threads > 1 else min_bytes
                    kernels.set_gemv_threads(threads, blas_threads=False)
                    for r in row_counts:
                        ok &= bool(np.array_equal(kernels.linear_rows(x[:r], w), alone[:r]))
                        cases += 1
    finally:
        kernels.TILE_BYTES, kernels.SPLIT_MIN_BYTES = tile, min_bytes
        kernels.set_gemv_threads(before)
    return ok, cases


def check_narrow_wide(rng: np.random.Generator) -> tuple[bool, int, int]:
    """GEMVs with IN <= 48 wider than 16384 columns: (minipipe never splits them, splits at
    16384 columns that would have changed bits here, cases)."""
    never_split, differs, cases = True, 0, 0
    for n_in in (3, 8, 16, 32, 48):
        for n_out in (16400, 20000):
            width = kernels.padded_width(n_out)
            never_split &= (not kernels.splittable(n_in, n_out) and len(kernels.gemv_tiles(n_in, n_out, 0, width, 1)) == 1
                            and len(kernels.column_chunks(n_in, n_out, 8)) == 1)
            w = kernels.linear_weight([rng.standard_normal((n_out, n_in)).astype(np.float32)])
            rows = kernels.row_slots(1, n_in)
            rows[...] = rng.standard_normal((1, n_in))
            whole, split = kernels.row_slots(1, n_out), kernels.row_slots(1, n_out)
            kernels._gemv_rows(rows, kernels._padded(w), kernels._padded(whole), 0, width)
            for a, b in ((0, kernels.SMALL_KERNEL_MAX_WIDTH), (kernels.SMALL_KERNEL_MAX_WIDTH, width)):
                kernels._gemv_rows(rows, kernels._padded(w), kernels._padded(split), a, b)
            differs += not np.array_equal(whole, split)
            cases += 1
    return never_split, differs, cases


def time_forward(model: StageModel, n_rows: int, exact: bool, repeats: int) -> float:
    """Seconds for one forward pass of n_rows speculative rows after a 32-token context."""
    rng = np.random.default_rng(0)
    prompt = list(rng.integers(0, model.config.vocab_size, 32))
    tokens = list(rng.integers(0, model.config.vocab_size, n_rows))
    best = float("inf")
    for _ in range(repeats):
        cache = model.new_cache(capacity=64)
        prefill(model, cache, prompt)
        batch = Batch.chain(tokens, len(prompt), want_logits="all", prefill=not exact)
        t = time.perf_counter()
        model.forward(cache, batch)
        best = min(best, time.perf_counter() - t)
    return best


def time_linears(rng: np.random.Generator, n_rows: int, n_mats: int, repeats: int,
                 n_in: int = 576, n_out: int = 1536) -> tuple[float, float, float]:
    """Seconds per matrix for n_rows rows through n_mats [n_in, n_out] matrices (too many to stay
    cached): the exact kernel (row-batched in column tiles), the same GEMVs untiled (each row
    over the whole matrix in turn), and plain GEMM."""
    mats = [kernels.linear_weight([rng.standard_normal((n_out, n_in), dtype=np.float32)]) for _ in range(n_mats)]
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    best = {}
    tile = kernels.TILE_BYTES
    try:
        for name, fn, tile_bytes in (("exact", kernels.linear_rows, tile), ("untiled", kernels.linear_rows, 1 << 62),
                                     ("gemm", kernels.linear_prefill, tile)):
            kernels.TILE_BYTES = tile_bytes
            best[name] = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for w in mats:
                    fn(x, w)
                best[name] = min(best[name], (time.perf_counter() - t) / n_mats)
    finally:
        kernels.TILE_BYTES = tile
    return best["exact"], best["untiled"], best["gemm"]


def run_doctor(model_dir: str | None = None, quick: bool = False) -> int:
    rng = np.random.default_rng(1234)
    info = blas.info()
    print("minipipe doctor")
    print(f"  BLAS            {info.name}")
    print(f"  BLAS threads    {blas.get_threads() if info.controllable else 'unknown (not OpenBLAS)'}")
    print(f"  kernel policy   {kernels.POLICY}: " + kernels.POLICY_DESCRIPTION.format(chunk=kernels.PREFILL_CHUNK))
    print()
    results: list[tuple[str, bool | None]] = []
    for n_in, n_out in ((64, 48), (37, 131), (576, 1536)):
        results.append((f"linear rows {n_in}->{n_out}", check_linear_rows(rng, n_in, n_out)))
    models = [(name, random_model(seed=i, **kw)) for i, (name, kw) in enumerate(MODEL_SHAPES)]
    if model_dir is not None:
        models.append((f"checkpoint {model_dir}", load_stage(model_dir)))
    for name, model in models:
        V = model.config.vocab_size
        for trial in range(1 if quick else 3):
            prompt = list(rng.integers(0, V, int(rng.integers(1, 20))))
            tokens = list(rng.integers(0, V, int(rng.integers(2, 9))))
            other = list(rng.integers(0, V, int(rng.integers(1, 6))))
            results.append((f"{name} chain of {len(tokens)}", check_chain(model, prompt, tokens)))
            results.append((f"{name} tree {len(tokens)}+{len(other)}", check_tree(model, prompt, tokens, other)))
    odd_shapes = {(64, 48), (37, 131), (576, 1536), (512, 3000), (333, 1001), (7, 100), (1536, 576), (576, 960),
                  (2048, 8192), (960, 49152), (16, 20000), (48, 16400)}  # the last two: never split
    shapes = odd_shapes.union(*(linear_shapes(m) for _, m in models))
    counts = gemv_thread_counts()
    threads_ok, blas_differs, thread_cases = check_gemv_threads(rng, shapes, counts)
    results.append((f"GEMV 1 thread vs {', '.join(map(str, counts))} threads, column splits ({len(shapes)} shapes)",
                    threads_ok))
    tiles_ok, tile_cases = check_row_batched(rng, shapes, (2, 3) if quick else (2, 3, 8))
    never_split, narrow_differs, narrow_cases = check_narrow_wide(rng)
    results.append((f"row-batched GEMV in column tiles vs single rows ({len(shapes)} shapes, {tile_cases} cases)",
                    tiles_ok and never_split))
    head_shapes = {(m.config.n_kv_heads, m.config.n_groups, m.config.head_dim): name for name, m in models}
    for tiny in ((8, 1, 2), (8, 1, 4), (2, 1, 6), (4, 2, 8), (2, 1, 16)):  # tiny heads: where BLAS paths vary most
        head_shapes.setdefault(tiny, "tiny heads")
    raw_notes = []
    for (kv_heads, groups, head_dim), name in head_shapes.items():
        ok, raw_differs, cases = check_attention_layouts(rng, kv_heads, groups, head_dim,
                                                         (1, 5, 64) if quick else (1, 2, 5, 13, 64, 300))
        label = f"attention layouts KVH={kv_heads} G={groups} HD={head_dim} ({name})"
        results.append((label, ok))
        if raw_differs:
            raw_notes.append(f"KVH={kv_heads} G={groups} HD={head_dim}: {raw_differs} of {cases}")
    width = max(len(n) for n, _ in results)
    for name, ok in results:
        verdict = "skipped" if ok is None else "bit-identical" if ok else "DIFFERENT"
        print(f"  {name:<{width}}  {verdict}")
    failed = [n for n, ok in results if ok is False]
    if raw_notes:
        print("  Why the kernels copy: the same attention products computed straight on those layouts gave")
        print("  other bits here in " + "; ".join(raw_notes) + " cases.")
    else:
        print("  (this BLAS gave the same bits for every layout tried, even without the canonical copies)")
    if narrow_differs:
        print(f"  Why GEMVs with IN <= 48 wider than 16384 columns are never split: a split at 16384 columns gave "
              f"other bits here in {narrow_differs} of {narrow_cases} cases.")
    if blas_differs:
        print(f"  Why OpenBLAS's threads run only widths of 16 x N: on any width they gave other bits here in "
              f"{blas_differs} of {thread_cases} cases.")
    print()
    print("Cost of the policy: M speculative rows, exact kernels (one GEMV per row) vs plain GEMM")
    repeats = 2 if quick else 5
    row_counts = (1, 2, 4, 8) if quick else (1, 2, 4, 8, 16)
    print("  (a) whole forward pass, weights resident in the CPU caches")
    cost_model = models[-1][1] if model_dir is not None else random_model(
        seed=7, dim=576, ffn_dim=1536, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=4096)
    c = cost_model.config
    print(f"      model: D={c.dim} F={c.ffn_dim} layers={c.n_layers} H={c.n_heads} KVH={c.n_kv_heads} "
          f"V={c.vocab_size}, {cost_model.weights.n_bytes / 1e6:.0f} MB")
    print(f"      {'M':>3}  {'exact ms':>9}  {'GEMM ms':>9}  {'exact/GEMM':>10}")
    for m in row_counts:
        exact = time_forward(cost_model, m, True, repeats)
        gemm = time_forward(cost_model, m, False, repeats)
        print(f"      {m:>3}  {exact * 1e3:>9.2f}  {gemm * 1e3:>9.2f}  {exact / gemm:>10.2f}")
    n_mats = 24 if quick else 64
    print(f"  (b) linear layers 576 -> 1536 streamed from memory ({n_mats} matrices, "
          f"{n_mats * 576 * 1536 * 4 / 1e6:.0f} MB, cycled); untiled: each row's GEMV over the whole matrix")
    print(f"      {'M':>3}  {'exact ms':>9}  {'untiled ms':>10}  {'GEMM ms':>9}  {'exact/GEMM':>10}   (per matrix)")
    for m in row_counts:
        exact, untiled, gemm = time_linears(rng, m, n_mats, repeats)
        print(f"      {m:>3}  {exact * 1e3:>9.3f}  {untiled * 1e3:>10.3f}  {gemm * 1e3:>9.3f}  {exact / gemm:>10.2f}")
    print(f"  (c) an LM head 576 -> 49152 (113 MB) from memory, in column tiles of "
          f"{kernels.TILE_BYTES / 2**20:g} MB; untiled: each row's GEMV over the whole matrix")
    print(f"      {'M':>3}  {'exact ms':>9}  {'untiled ms':>10}  {'GEMM ms':>9}  {'untiled/exact':>13}")
    for m in row_counts:
        exact, untiled, gemm = time_linears(rng, m, 1, 2 if quick else 3, 576, 49152)
        print(f"      {m:>3}  {exact * 1e3:>9.2f}  {untiled * 1e3:>10.2f}  {gemm * 1e3:>9.2f}  {untiled / exact:>13.2f}")
    print()
    if failed:
        print(f"FAILED: {len(failed)} check(s) differ; the exactness contract does not hold on this machine "
              f"with this BLAS: {', '.join(failed)}")
        return 1
    print("OK: batch composition and position do not change a token's bits on this machine.")
    return 0
