"""The KV cache against a plain-Python model of the same rules (a hypothesis state machine).

The model: a dict of live cells, tag -> [position, set of sequences]. Each allocated row
gets a unique tag written into its K and V, so comparing the tags of the visible cells checks
both which cells are visible and that their K/V travelled with them.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minipipe import kernels
from minipipe.errors import KVCacheError
from minipipe.kvcache import KVCache

N_SEQS = 4
MAX_POS = 8
positions = st.integers(0, MAX_POS)
seqs = st.integers(0, N_SEQS - 1)
seq_sets = st.sets(seqs, min_size=1, max_size=N_SEQS)


class KVCacheRules(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache = KVCache(n_layers=2, n_kv_heads=1, head_dim=2, n_seqs=N_SEQS, capacity=2)
        self.model: dict[int, list] = {}  # tag -> [pos, set of seqs]
        self.next_tag = 1

    # --- the rules, written plainly ----------------------------------------------------------

    def model_has(self, seq: int, pos: int) -> bool:
        return any(p == pos and seq in s for p, s in self.model.values())

    def model_visible(self, row_seqs: set[int], pos: int) -> list[int]:
        cells = [(p, tag) for tag, (p, s) in self.model.items() if s & row_seqs and p <= pos]
        return [tag for _, tag in sorted(cells)]

    # --- edits -------------------------------------------------------------------------------

    @rule(rows=st.lists(st.tuples(positions, seq_sets), min_size=1, max_size=4))
    def alloc(self, rows):
        clash = False
        placed: list[tuple[int, set]] = []
        for pos, row_seqs in rows:
            if any(self.model_has(s, pos) for s in row_seqs) or any(
                    p == pos and s & row_seqs for p, s in placed):
                clash = True
            placed.append((pos, row_seqs))
        pos_arr = np.array([p for p, _ in rows], dtype=np.int64)
        if clash:
            with pytest.raises(KVCacheError):
                self.cache.alloc(pos_arr, [tuple(s) for _, s in rows])
            return  # refused as a whole: nothing changed
        cells = self.cache.alloc(pos_arr, [tuple(s) for _, s in rows])
        tags = np.arange(self.next_tag, self.next_tag + len(rows), dtype=np.float32)
        kv = np.repeat(tags[:, None, None], 2, axis=2)  # [T, KVH=1, HD=2]
        for layer in range(2):
            self.cache.write(layer, cells, kv + layer, kv - layer)
        for tag, (pos, row_seqs) in zip(tags, rows):
            self.model[int(tag)] = [pos, set(row_seqs)]
        self.next_tag += len(rows)

    @rule(src=seqs, dst=seqs, p0=positions, p1=st.one_of(st.none(), positions))
    def seq_cp(self, src, dst, p0, p1):
        hi = MAX_POS + 1 if p1 is None else p1
        chosen = {t for t, (p, s) in self.model.items() if src in s and p0 <= p < hi}
        chosen_pos = {self.model[t][0] for t in chosen}
        clash = any(dst in s and p in chosen_pos for t, (p, s) in self.model.items() if t not in chosen)
        if clash:
            with pytest.raises(KVCacheError):
                self.cache.seq_cp(src, dst, p0, p1)
            return
        self.cache.seq_cp(src, dst, p0, p1)
        for t in chosen:
            self.model[t][1].add(dst)

    @rule(seq=st.one_of(st.none(), seqs), p0=positions, p1=st.one_of(st.none(), positions))
    def seq_rm(self, seq, p0, p1):
        self.cache.seq_rm(seq, p0, p1)
        hi = MAX_POS + 1 if p1 is None else p1
        for t, (p, s) in list(self.model.items()):
            if p0 <= p < hi:
                s.difference_update(set(range(N_SEQS)) if seq is None else {seq})
            if not s:
                del self.model[t]

    # --- observations ------------------------------------------------------------------------

    @precondition(lambda self: self.model)
    @rule(row_seqs=seq_sets, pos=positions, layer=st.integers(0, 1))
    def visible_cells_match(self, row_seqs, pos, layer):
        expected_tags = self.model_visible(row_seqs, pos)
        visible_pos = [self.model[t][0] for t in expected_tags]
        if len(set(visible_pos)) < len(visible_pos):  # the row's sequences disagree on history
            with pytest.raises(KVCacheError):
                self.cache.visible(row_seqs, pos)
            return
        keys, values = self.cache.gather(layer, self.cache.visible(row_seqs, pos))  # [KVH, N, HD]
        expected = np.array(expected_tags, dtype=np.float32)
        assert np.array_equal(keys[0, :, 0], expected + layer)
        assert np.array_equal(values[0, :, 1], expected - layer)

    @invariant()
    def same_cells(self):
        got = sorted((p, tuple(s)) for _, p, s in self.cache.cells())
        want = sorted((p, tuple(sorted(s))) for p, s in self.model.values())
        assert got == want
        assert self.cache.n_used == len(self.model)

    @invariant()
    def every_used_cell_counts_the_sequences_that_see_it(self):
        used = self.cache.cell_pos >= 0
        got = sorted((int(self.cache.cell_pos[j]), int(self.cache.cell_refs[j])) for j in np.flatnonzero(used))
        assert got == sorted((p, len(s)) for p, s in self.model.values())
        assert not self.cache.cell_refs[~used].any()

    @invariant()
    def one_cell_per_sequence_and_position(self):
        for seq in range(N_SEQS):
            pos = self.cache.positions(seq)
            assert len(pos) == len(set(pos))


TestKVCache = KVCacheRules.TestCase
TestKVCache.settings = settings(stateful_step_count=30)  # examples: from the loaded profile


def test_gather_is_canonical_whatever_the_cell_layout():
    """The same visible keys give the same canonical arrays (C-contiguous, 64-byte aligned),
    whether the cells are a contiguous block or scattered after other sequences' cells."""
    block, scattered = KVCache(2, 3, 4, n_seqs=2), KVCache(2, 3, 4, n_seqs=2, capacity=3)
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 5, 3, 4)).astype(np.float32), rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    for p in range(5):
        for cache in (block, scattered):
            if cache is scattered:  # another sequence's cell first: sequence 0's cells are not a block
                cache.alloc(np.array([p]), [(1,)])
            cells = cache.alloc(np.array([p]), [(0,)])
            for layer in range(2):
                cache.write(layer, cells, k[layer, p][None], v[layer, p][None])
    a, b = block.visible([0], 4), scattered.visible([0], 4)
    assert a.tolist() == [0, 1, 2, 3, 4] and b.tolist() != a.tolist()
    for layer in range(2):
        for x, y in zip(block.gather(layer, a), scattered.gather(layer, b)):
            assert kernels.is_canonical(x) and kernels.is_canonical(y)
            assert x.shape == y.shape == (3, 5, 4) and np.array_equal(x, y)


def test_pool_grows_and_keeps_kv():
    cache = KVCache(1, 1, 2, capacity=1)
    cells = cache.alloc(np.arange(3), [(0,)] * 3)
    cache.write(0, cells, np.ones((3, 1, 2), np.float32) * np.arange(3)[:, None, None], np.zeros((3, 1, 2), np.float32))
    cache.alloc(np.arange(3, 9), [(0,)] * 6)
    assert cache.capacity >= 9
    keys, _ = cache.gather(0, cache.visible([0], 2))
    assert keys[0, :, 0].tolist() == [0, 1, 2]


def test_bad_sequence_id_is_refused():
    cache = KVCache(1, 1, 2, n_seqs=2)
    with pytest.raises(KVCacheError, match="sequence id 2"):
        cache.alloc(np.array([0]), [(2,)])


@pytest.mark.parametrize("kv_heads, head_dim, n", [(3, 64, 30), (1, 2, 7), (2, 6, 1), (4, 5, 13), (1, 3, 0)])
def test_gather_gives_fresh_canonical_copies(kv_heads, head_dim, n):
    """K and V come back as separate canonical arrays (C-contiguous, 64-byte aligned, whatever
    N x HD is), equal to the cells' K/V in the order asked, and never views of the cache."""
    cache = KVCache(2, kv_heads, head_dim, capacity=64)
    cells = cache.alloc(np.arange(40), [(0,)] * 40)
    rng = np.random.default_rng(n)
    cache.k[:] = rng.standard_normal(cache.k.shape)
    cache.v[:] = rng.standard_normal(cache.v.shape)
    chosen = rng.permutation(cells)[:n]
    k, v = cache.gather(1, chosen)
    assert k.shape == v.shape == (kv_heads, n, head_dim)
    if n:
        assert kernels.is_canonical(k) and kernels.is_canonical(v)
    assert np.array_equal(k, cache.k[1][:, chosen]) and np.array_equal(v, cache.v[1][:, chosen])
    assert not np.shares_memory(k, cache.k) and not np.shares_memory(v, cache.v) and not np.shares_memory(k, v)
