"""The KV multibuffer manager: sequence ids for speculation in flight, and the edits that move
cells between them (docs/kvcache.md; PipeInfer's "pipelined KV cache multibuffering").

Terms:

* **committed sequence** — the request's committed text, in every stage's cache: the first id
  of the request's block (`base`; 0 for a single request).
* **partition** — a group of `width` sequence ids (one per tree branch) lent to one speculative
  run while it is in flight. Runs write only to their own partition, so many runs can be in
  flight at once, each with its own view of the cache, and no K/V is ever copied.
* **view** — a partition's sequences see the cells of another sequence over a position range
  (the committed prefix, or the previous run of a speculation chain).
* **commit** — the committed sequence adopts a sequence's cells over a position range: the
  accepted branch.
* **release** — a partition's sequences forget all their cells (cells nobody sees any more are
  free) and the partition returns to the free list; used for accepted, rejected and cancelled
  runs alike.

The manager never touches a cache itself: every method returns KV edits (`KVRemove`, `KVCopy`)
for the head to send down the pipeline, where they travel on the same rings as the runs and are
applied by every stage in the same order relative to the runs.

Sequence ids: `base`, then partition k holds ids `base + 1 + k·width ... base + (k+1)·width`.
"""

from __future__ import annotations

from collections import deque

from .transport.messages import KVCopy, KVRemove

Partition = tuple[int, ...]


class KVMultiBuffer:
    def __init__(self, n_partitions: int = 32, width: int = 1, base: int = 0):
        assert n_partitions >= 1 and width >= 1
        self.n_partitions, self.width, self.base = n_partitions, width, base
        self.free: deque[Partition] = deque(self.partition(k) for k in range(n_partitions))
        self.in_use: set[Partition] = set()

    @property
    def n_seqs(self) -> int:
        """Sequence ids the manager uses: the committed sequence and every partition."""
        return 1 + self.n_partitions * self.width

    def partition(self, k: int) -> Partition:
        first = self.base + 1 + k * self.width
        return tuple(range(first, first + self.width))

    def acquire(self) -> Partition | None:
        """A free partition, or None if all are in flight."""
        if not self.free:
            return None
        part = self.free.popleft()
        self.in_use.add(part)
        return part

    def release(self, part: Partition) -> list:
        """The partition forgets its cells and is free again."""
        assert part in self.in_use, f"partition {part} is not in use"
        self.in_use.remove(part)
        self.free.append(part)
        return [KVRemove(seq) for seq in part]

    def view(self, src: int, part: Partition | tuple[int, ...], p0: int, p1: int | None) -> list:
        """Every sequence of `part` sees `src`'s cells in [p0, p1) (instead of its own there)."""
        edits: list = []
        for seq in part:
            edits += [KVRemove(seq, p0, p1), KVCopy(src, seq, p0, p1)]
        return edits

    def commit(self, seq: int, p0: int, p1: int) -> list:
        """The committed sequence adopts `seq`'s cells in [p0, p1)."""
        return [KVRemove(self.base, p0, p1), KVCopy(seq, self.base, p0, p1)]
