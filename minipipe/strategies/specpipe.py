"""`specpipe`: a dynamic token tree that fills the pipeline one micro-batch per step, with
pruning propagation (SpecPipe / PipeDec, Yin, Xiao et al., arXiv 2504.04104; ALGORITHMS.md §3).

SpecPipe publishes no code; this follows the reconstruction in ALGORITHMS.md §3.2 and §3.4, with
the open choices made below (docs/specpipe.md explains each):

* **The tree.** The root is the last committed token. Every node is a drafted token at the
  position after its parent, with the draft's probability and its path's cumulative
  probability. Each node has its **own sequence id**: when it is created, a KV edit makes its
  sequence see everything its parent's sequence sees (the committed prefix and the ancestors), and
  its row writes only its own sequence — so a node attends to exactly the committed prefix, its
  ancestors and itself, and siblings never see each other. A node created later (a deeper layer)
  still finds its parent's cells, because the edit travels behind the parent's run.
* **One micro-batch per step.** A pipeline step, here, is one answer coming back from the last
  stage. The head keeps `n_stages` micro-batches in flight: at every step it sends one new layer
  into stage 0 — the `width` best children (by cumulative draft probability) of the deepest
  surviving nodes. Every stage then holds one layer, a diagonal wavefront through the pipeline.
* **Verification and commit.** Each step answers the layer holding the **tip** (the newest
  committed node). Its greedy token x is committed. *Hit*: a child of the tip carries x; it
  becomes the tip, its cell is adopted into sequence 0 (committed K/V), and the tip's other
  children are pruned. *Miss*: no child carries x; everything in flight is pruned and the
  pipeline refills from a new root x.
* **Pruning propagation.** A pruned node's id is marked in the shared cancellation map (row ids
  share the run-id space); every stage drops marked rows before computing a run and again
  before forwarding it, so pruned rows stop at the first stage that learns of them and are
  never transmitted further. Their sequences are released by KV edits, freeing their cells.
* **Step order (an open choice).** Stages here never wait for a step barrier: a stage checks the
  marks when it starts a micro-batch (FlowSpec's prune-then-compute) *and* when it has computed
  it (the paper's compute-then-prune-then-send), so whichever way the timing falls, no pruned
  row goes further than the stage that computed it.

Exactness: a token is committed only as the target's argmax at the tip, whose path is the
committed text, and every node's K/V is computed over exactly its ancestors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..batch import Batch
from ..draft import DraftSource
from ..generation import TokenSink
from ..runtime.base import Pipeline
from ..transport.messages import Cancelled, KVCopy, KVRemove, Run
from .base import Strategy


@dataclass(eq=False)
class TreeNode:
    id: int  # row id (shared id space with run ids)
    token: int
    pos: int
    seq: int  # the node's own sequence id
    parent: "TreeNode | None"
    path_prob: float = 1.0
    children: list["TreeNode"] = field(default_factory=list)

    def subtree(self):
        yield self
        for c in self.children:
            yield from c.subtree()


@dataclass
class SpecPipeStats:
    steps: int = 0  # answers that held the tip (one committed token each)
    hits: int = 0  # the target's token was among the tip's children
    misses: int = 0  # ... it was not: the pipeline refilled from a new root
    drafted: int = 0  # tree nodes drafted (roots excluded)
    pruned: int = 0  # tree nodes pruned
    rows_dropped: int = 0  # pruned rows the stages did not compute or forward (from stage stats)
    micro_batches: int = 0

    def to_dict(self) -> dict:
        tried = self.hits + self.misses
        return {
            "steps": self.steps,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / tried, 4) if tried else None,
            "drafted": self.drafted,
            "accepted": self.hits,
            "acceptance_rate": round(self.hits / self.drafted, 4) if self.drafted else None,
            "pruned_nodes": self.pruned,
            "micro_batches": self.micro_batches,
            "tokens_per_step": round(self.steps / self.micro_batches, 4) if self.micro_batches else None,
        }

    def summary(self) -> str:
        d = self.to_dict()
        hit = f"{d['hit_rate']:.0%}" if d["hit_rate"] is not None else "n/a"
        return (f"hit rate {hit} ({self.hits} hits, {self.misses} misses), drafted {self.drafted}, "
                f"pruned {self.pruned}, {d['tokens_per_step']} tokens per micro-batch")


class SpecPipeStrategy(Strategy):
    """SpecPipe. width: nodes per new tree layer (the width budget W); max_nodes: sequence ids
    available to live tree nodes (the pool the stages' caches are sized for)."""

    name = "specpipe"

    def __init__(self, draft: DraftSource, width: int = 4, max_nodes: int = 256, narrate=None):
        self.draft, self.width = draft, width
        self.narrate = narrate  # called with one sentence per decision (examples, teaching)
        self.n_seqs = 1 + max_nodes
        self.stats = SpecPipeStats()
        self.free_seqs = deque(range(1, self.n_seqs))  # sequence ids not held by a live node

    # ------------------------------------------------------------------------------------------

    def decode(self, pipe: Pipeline, prompt: list[int], first_token: int, sink: TokenSink) -> None:
        self.pipe, self.sink = pipe, sink
        self.committed = list(prompt) + [first_token]
        self.free_seqs = deque(range(1, self.n_seqs))
        self.inflight: deque[tuple[int, int, list[TreeNode]]] = deque()  # (run id, epoch, nodes)
        self.epoch = 0  # bumps at every miss: older runs are stale
        self.draft.reset(prompt)
        self.new_root(first_token, len(prompt))
        self.fill()
        while not sink.done:
            answer = pipe.receive()
            run_id, epoch, nodes = self.inflight.popleft()
            assert answer.run_id == run_id
            if epoch == self.epoch and not isinstance(answer, Cancelled):
                self.step(answer)
            self.fill()
        self.finish()
        self.stats.rows_dropped = sum(s.get("rows_pruned", 0) for s in pipe.stats().values())

    def finish(self) -> None:
        """The generation is over: drop the tree (its sequences go back to the pool, its cells are
        freed), cancel what is in flight and wait for those answers (none is used)."""
        if self.tip is not None:
            edits = [edit for node in self.tip.subtree() for edit in self.release_seq(node)]
            self.pipe.submit_edits(edits)
            self.tip = None
        for run_id, _, _ in self.inflight:
            self.pipe.cancel(run_id)
        while self.inflight:
            self.pipe.receive()
            self.inflight.popleft()

    def current_inflight(self) -> int:
        return sum(1 for _, epoch, _ in self.inflight if epoch == self.epoch)

    def fill(self) -> None:
        """Keep one micro-batch per stage in flight."""
        while not self.sink.done and self.current_inflight() < self.pipe.n_stages:
            if not self.grow():
                return

    def step(self, answer) -> None:
        """One answer: if it holds the tip, commit the tip's greedy token; hit or miss."""
        if answer.row_ids is None or self.tip.id not in answer.row_ids:
            return
        token = int(answer.tokens[list(answer.row_ids).index(self.tip.id)])
        self.stats.steps += 1
        self.committed.append(token)
        self.sink.add([token])
        self.pipe.mark(f"commit {token}", "commit")
        child = next((c for c in self.tip.children if c.token == token), None)
        edits: list = []
        if child is not None:
            self.stats.hits += 1
            pruned_before = self.stats.pruned
            for other in self.tip.children:
                if other is not child:
                    edits += self.prune(other)
            self.say(f"hit: the target chose {token} after node {self.tip.id}; node {child.id} is the new tip"
                     + (f"; pruned {self.stats.pruned - pruned_before} node(s) off other branches"
                        if self.stats.pruned > pruned_before else ""))
            edits.append(KVCopy(child.seq, 0, child.pos, child.pos + 1))  # committed K/V
            edits += self.release_seq(self.tip)  # the old tip gets no new children
            self.pipe.submit_edits(edits)
            self.tip = child
            self.tip.parent = None
        else:
            self.stats.misses += 1
            self.pipe.mark("miss: refill", "cancel")
            self.say(f"miss: the target chose {token} after node {self.tip.id}, which no child carries; "
                     f"the wavefront is dropped and {token} becomes a new root")
            for c in self.tip.children:
                edits += self.prune(c)
            self.pipe.submit_edits(edits + self.release_seq(self.tip))
            for run_id, epoch, _ in self.inflight:  # the whole wavefront is stale
                if epoch == self.epoch:
                    self.pipe.cancel(run_id)
            self.epoch += 1
            pos, self.tip = self.tip.pos + 1, None  # the old tip's sequence is released
            if not self.sink.done:
                self.new_root(token, pos)

    # ------------------------------------------------------------------------------------------
    # the tree

    def new_root(self, token: int, pos: int) -> None:
        """A committed token whose K/V is not cached yet: its run opens a new tree."""
        root = TreeNode(self.pipe.new_run_id(), token, pos, self.free_seqs.popleft(), None)
        self.pipe.submit(KVCopy(0, root.seq, 0, pos))  # sees the committed prefix
        self.send([root])
        self.pipe.submit(KVCopy(root.seq, 0, pos, pos + 1))  # and is committed itself
        self.tip = root
        self.say(f"send root node {root.id}={token} at position {pos} (committed; its K/V is not cached yet)")

    def grow(self) -> bool:
        """Send the next layer: the best `width` children of the deepest surviving leaves."""
        limit = min(self.sink.n_prompt + self.sink.max_new_tokens - 2, self.sink.max_positions - 1)
        leaves = [n for n in self.tip.subtree() if not n.children]
        deepest = max(n.pos for n in leaves)
        frontier = [n for n in leaves if n.pos == deepest and n.pos + 1 <= limit]
        if not frontier or len(self.free_seqs) < self.width:
            return False
        candidates = []  # (-path probability, order, parent, token, prob)
        rows_before = self.draft.tokens_computed
        for i, leaf in enumerate(frontier):
            context = self.committed + self.path_tokens(leaf)
            for token, prob in self.draft.top(context, self.width):
                candidates.append((-leaf.path_prob * prob, i, leaf, token, prob))
        self.pipe.draft_work(self.draft.tokens_computed - rows_before)
        candidates.sort(key=lambda c: (c[0], c[1]))
        layer, edits = [], []
        for neg_path_prob, _, parent, token, prob in candidates[: self.width]:
            node = TreeNode(self.pipe.new_run_id(), token, parent.pos + 1, self.free_seqs.popleft(), parent,
                            -neg_path_prob)
            parent.children.append(node)
            edits.append(KVCopy(parent.seq, node.seq, 0, None))  # sees what its parent sees
            layer.append(node)
        if not layer:
            return False
        self.pipe.submit_edits(edits)
        self.stats.drafted += len(layer)
        self.send(layer)
        self.say(f"send a layer at position {layer[0].pos}: " + ", ".join(
            f"node {n.id}={n.token} (under {n.parent.id}, p={n.path_prob:.2f})" for n in layer))
        return True

    def say(self, sentence: str) -> None:
        if self.narrate is not None:
            self.narrate(sentence)

    def path_tokens(self, node: TreeNode) -> list[int]:
        """Tokens from just below the tip down to `node`."""
        out = []
        while node is not None and node is not self.tip:
            out.append(node.token)
            node = node.parent
        return out[::-1]

    def send(self, nodes: list[TreeNode]) -> None:
        batch = Batch(tokens=np.array([n.token for n in nodes], dtype=np.int64),
                      positions=np.array([n.pos for n in nodes], dtype=np.int64),
                      seq_ids=tuple((n.seq,) for n in nodes), want_logits=np.ones(len(nodes), dtype=bool),
                      row_ids=np.array([n.id for n in nodes], dtype=np.int64))
        run_id = self.pipe.new_run_id()
        self.pipe.submit(Run(run_id, batch, speculative=True))
        self.inflight.append((run_id, self.epoch, nodes))
        self.stats.micro_batches += 1

    def prune(self, node: TreeNode) -> list:
        """Drop a node and its subtree everywhere: rows in flight are skipped; returns the KV
        edits that free their cells."""
        edits = []
        for n in node.subtree():
            self.pipe.cancel(n.id)  # stages drop the row wherever it has not gone yet
            edits += self.release_seq(n)
            self.stats.pruned += 1
        node.children = []
        return edits

    def release_seq(self, node: TreeNode) -> list:
        """The KV edit that frees a node's sequence; the id is free for a new node."""
        self.free_seqs.append(node.seq)
        return [KVRemove(node.seq)]
