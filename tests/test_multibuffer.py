"""The KV multibuffer manager against a plain-Python model (a hypothesis state machine).

The manager's edits are applied to a real `KVCache`; the model keeps, per sequence, a dict
position -> tag of the row it sees. After every step each sequence must see exactly the model's
rows (checked through the tags written into K), cells no sequence sees must be free, and the
partitions must be exactly split between free and in use.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minipipe.kvcache import KVCache
from minipipe.multibuffer import KVMultiBuffer
from minipipe.transport.messages import KVRemove

N_PARTITIONS, WIDTH, MAX_POS = 3, 2, 8
positions = st.integers(0, MAX_POS)


def apply(cache: KVCache, edits) -> None:
    for e in edits:
        if isinstance(e, KVRemove):
            cache.seq_rm(e.seq, e.p0, e.p1)
        else:
            cache.seq_cp(e.src, e.dst, e.p0, e.p1)


class MultiBufferRules(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.mb = KVMultiBuffer(N_PARTITIONS, WIDTH)
        self.cache = KVCache(1, 1, 1, n_seqs=self.mb.n_seqs, capacity=4)
        self.seen: dict[int, dict[int, int]] = {s: {} for s in range(self.mb.n_seqs)}  # seq -> {pos: tag}
        self.free = [self.mb.partition(k) for k in range(N_PARTITIONS)]
        self.used: list[tuple[int, ...]] = []
        self.tag = 0

    def write(self, seq: int, pos: int) -> None:
        self.tag += 1
        cells = self.cache.alloc(np.array([pos]), [(seq,)])
        self.cache.write(0, cells, np.full((1, 1, 1), self.tag, np.float32), np.zeros((1, 1, 1), np.float32))
        self.seen[seq][pos] = self.tag

    def replace(self, dst: int, src: int, p0: int, p1: int | None) -> None:
        hi = MAX_POS + 1 if p1 is None else p1
        view = self.seen[dst]
        for p in [p for p in view if p0 <= p < hi]:
            del view[p]
        view.update({p: t for p, t in self.seen[src].items() if p0 <= p < hi})

    # --- rules -------------------------------------------------------------------------------

    @rule(pos=positions)
    def write_committed(self, pos):
        if pos not in self.seen[0]:
            self.write(0, pos)

    @rule()
    def acquire(self):
        part = self.mb.acquire()
        if not self.free:
            assert part is None
            return
        assert part == self.free.pop(0)
        self.used.append(part)

    @precondition(lambda self: self.used)
    @rule(data=st.data(), p0=positions, p1=st.one_of(st.none(), positions))
    def view_committed(self, data, p0, p1):
        part = data.draw(st.sampled_from(self.used))
        apply(self.cache, self.mb.view(0, part, p0, p1))
        for seq in part:
            self.replace(seq, 0, p0, p1)

    @precondition(lambda self: self.used)
    @rule(data=st.data(), pos=positions)
    def write_speculative(self, data, pos):
        seq = data.draw(st.sampled_from([s for part in self.used for s in part]))
        if pos not in self.seen[seq]:
            self.write(seq, pos)

    @precondition(lambda self: self.used)
    @rule(data=st.data(), p0=positions, p1=positions)
    def commit(self, data, p0, p1):
        seq = data.draw(st.sampled_from([s for part in self.used for s in part]))
        apply(self.cache, self.mb.commit(seq, p0, p1))
        self.replace(0, seq, p0, p1)

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def chain_view(self, data):
        """A later run builds on an earlier one: its partition sees the earlier branch's cells."""
        src = data.draw(st.sampled_from([s for part in self.used for s in part]))
        part = data.draw(st.sampled_from(self.used))
        if src in part:
            return
        p0 = data.draw(positions)
        apply(self.cache, self.mb.view(src, part, p0, None))
        for seq in part:
            self.replace(seq, src, p0, None)

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def release(self, data):
        part = data.draw(st.sampled_from(self.used))
        apply(self.cache, self.mb.release(part))
        self.used.remove(part)
        self.free.append(part)
        for seq in part:
            self.seen[seq].clear()

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def every_sequence_sees_the_model_rows(self):
        for seq, view in self.seen.items():
            keys, _ = self.cache.gather(0, self.cache.visible([seq], MAX_POS))
            assert keys[0, :, 0].astype(int).tolist() == [view[p] for p in sorted(view)], f"sequence {seq}"

    @invariant()
    def unseen_cells_are_free(self):
        live_tags = {t for view in self.seen.values() for t in view.values()}
        assert self.cache.n_used == len(live_tags)

    @invariant()
    def partitions_are_free_or_in_use(self):
        assert list(self.mb.free) == self.free and self.mb.in_use == set(self.used)


TestMultiBuffer = MultiBufferRules.TestCase
TestMultiBuffer.settings = settings(stateful_step_count=40)
