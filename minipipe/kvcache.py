"""The KV cache of one stage: a pool of cells, each visible to a set of sequences (DESIGN.md §3).

Terms:

* **cell** — one slot holding the K and V of one token for every layer the stage owns, the
  token's **position**, and the **set of sequence ids** that may see it.
* **sequence** — a numbered view of the cache. Sequence 0 is the committed text; speculative
  runs and tree branches use other ids (their own partition), so many runs can be in flight at
  once, each seeing its own cells plus the shared prefix, without copying any K/V.
* **visibility rule** — a row of a batch that belongs to sequences S and sits at position p
  attends to cell j iff `seqs(j) ∩ S ≠ ∅` and `pos(j) <= p` (llama.cpp's rule, which PipeInfer
  builds on). Visible cells are always returned in ascending position order.
* **one cell per (sequence, position)** — no sequence may see two cells at the same position;
  `alloc` and `seq_cp` refuse an edit that would break this, so a query's visible cells are
  exactly one token per position (the committed prefix plus its own branch).

Memory layout (C cells, S sequence ids, L layers of this stage):

    k, v        float32 [L, KVH, C, HD]   K/V of every cell; per layer and KV head the cells of
                                          a contiguous position range are a contiguous block
    cell_pos    int64   [C]               position of each cell's token; -1 marks a free cell
    cell_seqs   bool    [C, S]            cell_seqs[j, s] is True iff sequence s sees cell j

Edits (metadata only; K/V are never copied):

    alloc(positions, seq_ids)  take free cells (lowest index first) for a batch's rows
    seq_cp(src, dst, p0, p1)   cells of src with p0 <= pos < p1 become visible to dst too
    seq_rm(seq, p0, p1)        seq stops seeing cells with p0 <= pos < p1 (seq None: every
                               sequence); a cell no sequence sees is free again

The pool grows (doubling) when it runs out of free cells.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from . import kernels
from .errors import KVCacheError

INF = np.iinfo(np.int64).max


class KVCache:
    """Cells with positions and sequence sets, plus their K/V for a stage's layers."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_seqs: int = 1, capacity: int = 64):
        self.n_layers, self.n_kv_heads, self.head_dim, self.n_seqs = n_layers, n_kv_heads, head_dim, n_seqs
        capacity = max(1, capacity)
        self.k = np.zeros((n_layers, n_kv_heads, capacity, head_dim), dtype=np.float32)  # [L, KVH, C, HD]
        self.v = np.zeros_like(self.k)  # [L, KVH, C, HD]
        self.cell_pos = np.full(capacity, -1, dtype=np.int64)  # [C]
        self.cell_seqs = np.zeros((capacity, n_seqs), dtype=bool)  # [C, S]

    # ------------------------------------------------------------------------------------------
    # inspection

    @property
    def capacity(self) -> int:
        return self.cell_pos.shape[0]

    @property
    def n_used(self) -> int:
        return int(np.count_nonzero(self.cell_pos >= 0))

    def positions(self, seq: int) -> list[int]:
        """Positions sequence `seq` sees, ascending."""
        return sorted(int(p) for p in self.cell_pos[self.cell_seqs[:, self._seq(seq)]])

    def cells(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """(cell, position, sequences) for every used cell: a readable dump for teaching."""
        used = np.flatnonzero(self.cell_pos >= 0)
        return [(int(j), int(self.cell_pos[j]), tuple(int(s) for s in np.flatnonzero(self.cell_seqs[j])))
                for j in used]

    def visible(self, seq_ids: Iterable[int], pos: int) -> np.ndarray:
        """Cells a row of sequences `seq_ids` at position `pos` attends to, ascending position.  -> [N]

        The row's sequences must agree on the history: seeing two cells at one position is an
        error.
        """
        seqs = [self._seq(s) for s in seq_ids]
        mask = self.cell_seqs[:, seqs].any(axis=1) & (self.cell_pos <= pos)  # [C]
        idx = np.flatnonzero(mask)  # cell ids, ascending
        order = np.argsort(self.cell_pos[idx], kind="stable")
        idx, pos_seen = idx[order], self.cell_pos[idx][order]  # ascending position
        if np.any(pos_seen[1:] == pos_seen[:-1]):
            raise KVCacheError(f"a row of sequences {sorted(seqs)} would see two cells at one position: "
                               "its sequences disagree about the history")
        return idx

    def gather(self, layer: int, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K and V of `cells` for one layer, copied into fresh canonical arrays.  -> [KVH, N, HD] each

        Always a copy, never a view of the cache: a view's strides would depend on the cache's
        capacity and on where the cells happen to lie, and BLAS may round differently for other
        layouts (the exactness policy in `minipipe.kernels`).
        """
        shape = (self.n_kv_heads, len(cells), self.head_dim)
        k, v = kernels.aligned_empty(shape), kernels.aligned_empty(shape)
        np.take(self.k[layer], cells, axis=1, out=k, mode="clip")  # indices are valid: no bounds pass
        np.take(self.v[layer], cells, axis=1, out=v, mode="clip")
        return k, v

    # ------------------------------------------------------------------------------------------
    # edits

    def alloc(self, positions: np.ndarray, seq_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Take one free cell per row and label it with the row's position and sequences.  -> [T]

        All or nothing: a batch that would give a sequence two cells at one position is refused
        before any cell is touched.
        """
        T = len(positions)
        if len(seq_ids) != T:
            raise KVCacheError(f"{T} positions but {len(seq_ids)} sequence sets")
        rows = [(int(pos), [self._seq(s) for s in seqs]) for pos, seqs in zip(positions, seq_ids)]
        taken: set[tuple[int, int]] = set()  # (sequence, position) pairs this batch claims
        for pos, cols in rows:
            if pos < 0 or not cols:
                raise KVCacheError(f"a row needs a position >= 0 and at least one sequence, got {pos}, {cols}")
            claims = {(s, pos) for s in cols}
            in_cache = (self.cell_pos == pos) & self.cell_seqs[:, cols].any(axis=1)
            if claims & taken or in_cache.any():
                raise KVCacheError(f"position {pos} already has a cell in sequence(s) {sorted(cols)}")
            taken |= claims
        free = np.flatnonzero(self.cell_pos < 0)
        if free.shape[0] < T:
            self._grow(self.n_used + T)
            free = np.flatnonzero(self.cell_pos < 0)
        cells = free[:T]
        for cell, (pos, cols) in zip(cells, rows):
            self.cell_pos[cell] = pos
            self.cell_seqs[cell, cols] = True
        return cells

    def write(self, layer: int, cells: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store one layer's K/V for a batch's cells.  k, v: [T, KVH, HD]"""
        self.k[layer][:, cells, :] = k.transpose(1, 0, 2)  # [T, KVH, HD] -> [KVH, T, HD]
        self.v[layer][:, cells, :] = v.transpose(1, 0, 2)

    def seq_cp(self, src: int, dst: int, p0: int = 0, p1: int | None = None) -> None:
        """Make cells of `src` with p0 <= pos < p1 visible to `dst` as well."""
        s, d = self._seq(src), self._seq(dst)
        chosen = self.cell_seqs[:, s] & self._in_range(p0, p1)  # [C]
        others = self.cell_seqs[:, d] & ~chosen  # cells dst already sees
        if others.any() and chosen.any():
            taken = np.zeros(int(self.cell_pos.max()) + 1, dtype=bool)  # positions dst already holds
            taken[self.cell_pos[others]] = True
            if taken[self.cell_pos[chosen]].any():
                raise KVCacheError(f"seq_cp({src} -> {dst}) would give sequence {dst} two cells at one position")
        self.cell_seqs[chosen, d] = True

    def seq_rm(self, seq: int | None, p0: int = 0, p1: int | None = None) -> None:
        """Sequence `seq` (None: every sequence) stops seeing cells with p0 <= pos < p1."""
        in_range = self._in_range(p0, p1)
        if seq is None:
            self.cell_seqs[in_range, :] = False
        else:
            self.cell_seqs[in_range, self._seq(seq)] = False
        self.cell_pos[~self.cell_seqs.any(axis=1)] = -1

    def clear(self) -> None:
        self.cell_pos[:] = -1
        self.cell_seqs[:] = False

    # ------------------------------------------------------------------------------------------
    # helpers

    def _seq(self, seq: int) -> int:
        if not 0 <= int(seq) < self.n_seqs:
            raise KVCacheError(f"sequence id {seq} is outside 0..{self.n_seqs - 1}")
        return int(seq)

    def _in_range(self, p0: int, p1: int | None) -> np.ndarray:
        p1 = INF if p1 is None else p1
        return (self.cell_pos >= max(p0, 0)) & (self.cell_pos < p1)  # [C]

    def _grow(self, needed: int) -> None:
        old = self.capacity
        new = max(2 * old, needed)
        shape = (self.n_layers, self.n_kv_heads, new, self.head_dim)
        for name in ("k", "v"):
            grown = np.zeros(shape, dtype=np.float32)
            grown[:, :, :old, :] = getattr(self, name)
            setattr(self, name, grown)
        self.cell_pos = np.concatenate([self.cell_pos, np.full(new - old, -1, dtype=np.int64)])
        self.cell_seqs = np.concatenate([self.cell_seqs, np.zeros((new - old, self.n_seqs), dtype=bool)])
