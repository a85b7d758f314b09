"""The KV cache of one stage: a pool of cells, each visible to a set of sequences.

Terms:

* **cell** — one slot holding the K and V of one token for every layer the stage owns, the
  token's **position**, and the sequences that may see it.
* **sequence** — a numbered view of the cache. Each request's committed text is one sequence;
  speculative runs and tree branches use other ids (their own partition), so many runs of many
  requests can be in flight at once, each seeing its own cells plus the shared prefix, without
  copying any K/V.
* **visibility rule** — a row of a batch that belongs to sequences S and sits at position p
  attends to cell j iff some sequence of S sees j and `pos(j) <= p` (llama.cpp's rule, which
  PipeInfer builds on). Visible cells are always returned in ascending position order.
* **one cell per (sequence, position)** — no sequence may see two cells at the same position;
  `alloc` and `seq_cp` refuse an edit that would break this, so a query's visible cells are
  exactly one token per position (the committed prefix plus its own branch).

Memory layout (C cells, L layers of this stage):

    k, v        float32 [L, KVH, C, HD]   K/V of every cell
    cell_pos    int64   [C]               position of each cell's token; -1 marks a free cell
    cell_refs   int32   [C]               how many sequences see each cell (0: free)
    seq_cells   {seq: int64 [P]}          per sequence in use, the cell it sees at each
                                          position (-1: none); P grows with the positions seen

Indexing by sequence and position makes every operation cost what it touches: a row's
visibility is its sequences' arrays up to its position (the length of its context, not the
number of cells or sequences in the cache), an edit costs its position range, and sequences
that see nothing take no memory. So one cache holds the cells of many requests and of trees
with many branches.

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

NONE = -1  # "no cell" in a sequence's position array


class KVCache:
    """Cells with positions and sequence sets, plus their K/V for a stage's layers."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_seqs: int = 1, capacity: int = 64):
        """`n_seqs` bounds the sequence ids (0 .. n_seqs - 1); ids cost nothing until used."""
        self.n_layers, self.n_kv_heads, self.head_dim, self.n_seqs = n_layers, n_kv_heads, head_dim, n_seqs
        capacity = max(1, capacity)
        self.k = np.zeros((n_layers, n_kv_heads, capacity, head_dim), dtype=np.float32)  # [L, KVH, C, HD]
        self.v = np.zeros_like(self.k)  # [L, KVH, C, HD]
        self.cell_pos = np.full(capacity, -1, dtype=np.int64)  # [C]
        self.cell_refs = np.zeros(capacity, dtype=np.int32)  # [C]
        self.seq_cells: dict[int, np.ndarray] = {}  # seq -> [P] cell per position, NONE where none

    # ------------------------------------------------------------------------------------------
    # inspection

    @property
    def capacity(self) -> int:
        return self.cell_pos.shape[0]

    @property
    def n_used(self) -> int:
        return int(np.count_nonzero(self.cell_pos >= 0))

    def seqs_in_use(self) -> list[int]:
        """Sequences that see at least one cell, ascending."""
        return sorted(self.seq_cells)

    def positions(self, seq: int) -> list[int]:
        """Positions sequence `seq` sees, ascending."""
        row = self.seq_cells.get(self._seq(seq))
        return [] if row is None else np.flatnonzero(row >= 0).tolist()

    def cells(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """(cell, position, sequences) for every used cell: a readable dump for teaching."""
        seen: dict[int, list[int]] = {}
        for seq in sorted(self.seq_cells):
            for cell in self.seq_cells[seq][self.seq_cells[seq] >= 0]:
                seen.setdefault(int(cell), []).append(seq)
        return [(cell, int(self.cell_pos[cell]), tuple(seen[cell])) for cell in sorted(seen)]

    def visible(self, seq_ids: Iterable[int], pos: int) -> np.ndarray:
        """Cells a row of sequences `seq_ids` at position `pos` attends to, ascending position.  -> [N]

        The row's sequences must agree on the history: seeing two cells at one position is an
        error.
        """
        rows = [self.seq_cells[s][: pos + 1] for s in {self._seq(s) for s in seq_ids} if s in self.seq_cells]
        if not rows:
            return np.zeros(0, dtype=np.int64)
        if len(rows) == 1:
            return rows[0][rows[0] >= 0]
        stacked = np.full((len(rows), max(r.shape[0] for r in rows)), NONE, dtype=np.int64)  # [seqs, P]
        for i, r in enumerate(rows):
            stacked[i, : r.shape[0]] = r
        seen = stacked >= 0
        highest = stacked.max(axis=0)  # [P] the cell seen at each position, if only one
        lowest = np.where(seen, stacked, np.iinfo(np.int64).max).min(axis=0)  # [P]
        if np.any(seen.any(axis=0) & (lowest != highest)):
            raise KVCacheError(f"a row of sequences {sorted(set(seq_ids))} would see two cells at one position: "
                               "its sequences disagree about the history")
        return highest[highest >= 0]

    def gather(self, layer: int, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K and V of `cells` for one layer, copied into fresh canonical arrays.  -> [KVH, N, HD] each

        Always a copy, never a view of the cache: a view's strides would depend on the cache's
        capacity and on where the cells happen to lie, and BLAS may round differently for other
        layouts (the exactness policy in `minipipe.kernels`). K and V share one aligned
        allocation (each starting on a 64-byte boundary): one allocation instead of two.

        One `np.take` per array, whatever the cells: copying contiguous runs of cells with one
        slice copy each was measured no faster here, neither for a few dozen cells (the calls'
        fixed costs dominate: about 6 us per gather) nor for hundreds (the copy is bound by
        memory either way).
        """
        shape = (self.n_kv_heads, len(cells), self.head_dim)
        size = shape[0] * shape[1] * shape[2]
        stride = -(-size // kernels.LANE) * kernels.LANE  # v starts 64-byte aligned too
        kv = kernels.aligned_empty(stride + size)  # one fresh allocation for both
        k, v = kv[:size].reshape(shape), kv[stride:].reshape(shape)  # [KVH, N, HD] each, C-contiguous
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
        rows = [(int(pos), sorted({self._seq(s) for s in seqs})) for pos, seqs in zip(positions, seq_ids)]
        taken: set[tuple[int, int]] = set()  # (sequence, position) pairs this batch claims
        for pos, seqs in rows:
            if pos < 0 or not seqs:
                raise KVCacheError(f"a row needs a position >= 0 and at least one sequence, got {pos}, {seqs}")
            claims = {(s, pos) for s in seqs}
            if claims & taken or any(self._cell_at(s, pos) != NONE for s in seqs):
                raise KVCacheError(f"position {pos} already has a cell in sequence(s) {seqs}")
            taken |= claims
        free = np.flatnonzero(self.cell_pos < 0)
        if free.shape[0] < T:
            self._grow(self.n_used + T)
            free = np.flatnonzero(self.cell_pos < 0)
        cells = free[:T]
        for cell, (pos, seqs) in zip(cells, rows):
            self.cell_pos[cell] = pos
            self.cell_refs[cell] = len(seqs)
            for s in seqs:
                self._row(s, pos + 1)[pos] = cell
        return cells

    def write(self, layer: int, cells: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store one layer's K/V for a batch's cells.  k, v: [T, KVH, HD]"""
        self.k[layer][:, cells, :] = k.transpose(1, 0, 2)  # [T, KVH, HD] -> [KVH, T, HD]
        self.v[layer][:, cells, :] = v.transpose(1, 0, 2)

    def seq_cp(self, src: int, dst: int, p0: int = 0, p1: int | None = None) -> None:
        """Make cells of `src` with p0 <= pos < p1 visible to `dst` as well."""
        s, d = self._seq(src), self._seq(dst)
        if s not in self.seq_cells or s == d:
            return
        source = self.seq_cells[s]
        lo, hi = max(p0, 0), source.shape[0] if p1 is None else min(p1, source.shape[0])
        if lo >= hi:
            return
        chosen = source[lo:hi]  # [n]
        target = self._row(d, hi)[lo:hi]  # [n] (a view: writes go to dst's array)
        has = chosen >= 0
        if np.any(has & (target >= 0) & (target != chosen)):
            raise KVCacheError(f"seq_cp({src} -> {dst}) would give sequence {dst} two cells at one position")
        new = has & (target < 0)
        target[new] = chosen[new]
        self.cell_refs[chosen[new]] += 1  # one sequence sees each cell once: no repeated indices
        if not (self.seq_cells[d] >= 0).any():  # nothing was there to copy
            del self.seq_cells[d]

    def seq_rm(self, seq: int | None, p0: int = 0, p1: int | None = None) -> None:
        """Sequence `seq` (None: every sequence) stops seeing cells with p0 <= pos < p1."""
        for s in list(self.seq_cells) if seq is None else [self._seq(seq)]:
            row = self.seq_cells.get(s)
            if row is None:
                continue
            span = row[max(p0, 0): row.shape[0] if p1 is None else max(p1, 0)]  # a view into the row
            dropped = span[span >= 0]
            self.cell_refs[dropped] -= 1
            span[:] = NONE
            freed = dropped[self.cell_refs[dropped] == 0]
            self.cell_pos[freed] = -1
            if not (row >= 0).any():
                del self.seq_cells[s]

    def clear(self) -> None:
        self.cell_pos[:] = -1
        self.cell_refs[:] = 0
        self.seq_cells.clear()

    # ------------------------------------------------------------------------------------------
    # helpers

    def _seq(self, seq: int) -> int:
        if not 0 <= int(seq) < self.n_seqs:
            raise KVCacheError(f"sequence id {seq} is outside 0..{self.n_seqs - 1}")
        return int(seq)

    def _cell_at(self, seq: int, pos: int) -> int:
        row = self.seq_cells.get(seq)
        return NONE if row is None or pos >= row.shape[0] else int(row[pos])

    def _row(self, seq: int, length: int) -> np.ndarray:
        """Sequence `seq`'s position array, created or grown to hold `length` positions."""
        row = self.seq_cells.get(seq)
        if row is None or row.shape[0] < length:
            grown = np.full(max(16, 1 << max(0, int(length) - 1).bit_length()), NONE, dtype=np.int64)
            if row is not None:
                grown[: row.shape[0]] = row
            self.seq_cells[seq] = row = grown
        return row

    def _grow(self, needed: int) -> None:
        old = self.capacity
        new = max(2 * old, needed)
        shape = (self.n_layers, self.n_kv_heads, new, self.head_dim)
        for name in ("k", "v"):
            grown = np.zeros(shape, dtype=np.float32)
            grown[:, :, :old, :] = getattr(self, name)
            setattr(self, name, grown)
        self.cell_pos = np.concatenate([self.cell_pos, np.full(new - old, -1, dtype=np.int64)])
        self.cell_refs = np.concatenate([self.cell_refs, np.zeros(new - old, dtype=np.int32)])
