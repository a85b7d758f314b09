"""`specpipe`: a dynamic token tree that fills the pipeline one micro-batch per step, with
pruning propagation (SpecPipe / PipeDec, Yin, Xiao et al., arXiv 2504.04104).

SpecPipe publishes no code; this follows the paper's description, with the open choices made
below (docs/specpipe.md explains each):

* **The tree.** The root is the last committed token. Every node is a drafted token at the
  position after its parent, with the draft's probability and its path's cumulative
  probability. Each node has its **own sequence id**: when it is created, a KV edit makes its
  sequence see everything its parent's sequence sees (the committed prefix and the ancestors), and
  its row writes only its own sequence — so a node attends to exactly the committed prefix, its
  ancestors and itself, and siblings never see each other. A node created later (a deeper layer)
  still finds its parent's cells, because the edit travels behind the parent's run.
* **One micro-batch per step.** A pipeline step, here, is one answer coming back from the last
  stage. Each request keeps `n_stages` tree layers in flight: at every step it sends one new
  layer into stage 0 — the `width` best children (by cumulative draft probability) of the
  deepest surviving nodes. Every stage then holds one layer, a diagonal wavefront through the
  pipeline.
* **SpecPipe-DB.** With several requests, the engine merges the requests' layers of one step
  into one micro-batch: every stage computes one layer of every request's tree.
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
from ..events import Drafted, Launched, Stepped
from ..transport.messages import KVCopy, KVRemove
from .base import Decoder, Part, Strategy


@dataclass(eq=False)
class TreeNode:
    id: int  # row id: the node's cancellation key (shared id space with parts)
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


class SpecPipeDecoder(Decoder):
    """One request under SpecPipe: its dynamic tree and its wavefront of layers in flight."""

    def __init__(self, strategy: "SpecPipeStrategy", request, seqs, head):
        super().__init__(strategy, request, seqs, head)
        self.open_draft(strategy.draft.fork(request.prompt, request.sampling), calibrate=strategy.calibrate)
        self.free_seqs = deque(seqs[1:])  # sequence ids not held by a live node
        self.tip: TreeNode | None = None  # the newest committed node (its K/V cached or in flight)
        self.epoch = 0  # bumps at every miss: layers launched before it are stale
        self.admitted_at = head.answered()  # the pipeline's steps before this request
        self.rows_sent = 0  # rows this request has launched (roots and tree layers)

    def begin(self) -> None:
        self.new_root(self.committed[-1], len(self.committed) - 1)

    def current_inflight(self) -> int:
        return sum(1 for part in self.inflight if part.info[0] == self.epoch)

    def offer(self) -> bool:
        """Keep `n_stages` layers of this request's tree in flight: one more layer if fewer."""
        if self.done or self.tip is None or self.current_inflight() >= self.head.n_stages:
            return False
        return self.grow()

    def on_answer(self, part: Part, answer) -> None:
        epoch, _ = part.info
        if epoch == self.epoch and not answer.cancelled:
            self.step(part, answer)

    def step(self, part: Part, answer) -> None:
        """One answer: if it holds the tip, commit the tip's greedy token; hit or miss."""
        if self.tip.id not in answer.row_ids:
            return
        token = int(answer.tokens[list(answer.row_ids).index(self.tip.id)])
        self.commit([token], part)
        child = next((c for c in self.tip.children if c.token == token), None)
        if child is not None:  # hit: the child is the new tip, its siblings' subtrees go
            pruned = sum(self.prune(other) for other in self.tip.children if other is not child)
            self.emit(Stepped, token=token, hit=True, pruned=pruned)
            self.edit([KVCopy(child.seq, self.seq, child.pos, child.pos + 1)], "commit")  # committed K/V
            self.release_seq(self.tip)  # the old tip gets no new children
            self.tip = child
            self.tip.parent = None
            scale = child.path_prob or 1.0
            for node in child.subtree():  # path probabilities count from the tip again
                node.path_prob /= scale
        else:  # miss: the whole wavefront is stale; refill from a new root
            pruned = sum(self.prune(c) for c in self.tip.children)
            self.emit(Stepped, token=token, hit=False, pruned=pruned)
            self.release_seq(self.tip)
            self.epoch += 1
            pos, self.tip = self.tip.pos + 1, None
            if not self.done:
                self.new_root(token, pos)

    def release_all(self) -> None:
        if self.tip is not None:
            for node in self.tip.subtree():
                self.release_seq(node)
            self.tip = None

    # ------------------------------------------------------------------------------------------
    # the tree

    def new_root(self, token: int, pos: int) -> None:
        """A committed token whose K/V is not cached yet: its run opens a new tree."""
        root = TreeNode(self.head.new_id(), token, pos, self.free_seqs.popleft(), None)
        self.edit([KVCopy(self.seq, root.seq, 0, pos)], "view")  # sees the committed prefix
        self.send([root], "root")
        self.edit([KVCopy(root.seq, self.seq, pos, pos + 1)], "commit")  # and is committed itself
        self.tip = root

    def frontier(self) -> list[TreeNode]:
        """The deepest surviving leaves, if a new layer may grow under them (within the token
        budget and the context, with sequence ids to spare)."""
        limit = min(self.sink.n_prompt + self.sink.max_new_tokens - 2, self.sink.max_positions - 1)
        leaves = [n for n in self.tip.subtree() if not n.children]
        deepest = max(n.pos for n in leaves)
        frontier = [n for n in leaves if n.pos == deepest and n.pos + 1 <= limit]
        return frontier if len(self.free_seqs) >= self.strategy.width else []

    def draft_needs(self) -> list[list[int]]:
        """The contexts `grow` will ask the draft about and it has not answered yet: one per
        frontier leaf (the engine computes them for every request in one batched forward)."""
        if self.done or self.tip is None or self.current_inflight() >= self.head.n_stages:
            return []
        contexts = [self.committed + self.path_tokens(leaf) for leaf in self.frontier()]
        return [c for c in contexts if not self.draft.knows(c, self.strategy.width)]

    def grow(self) -> bool:
        """Send the next layer: the best children of the deepest surviving leaves, by path
        probability from the tip (the chance each becomes a tip, by the draft's calibrated
        confidence): always the best, and up to `width` in all while their chance is at least
        `min_path` — a row's worth of stage time on every stage is spent on each."""
        s: SpecPipeStrategy = self.strategy
        frontier = self.frontier()
        if not frontier:
            return False
        mark = self.draft_mark()
        answers = self.draft.top_many([self.committed + self.path_tokens(leaf) for leaf in frontier], s.width)
        cost = self.draft_since(mark)
        candidates = sorted(((-leaf.path_prob * prob, i, leaf, token, prob)
                             for i, (leaf, guesses) in enumerate(zip(frontier, answers)) for token, prob in guesses),
                            key=lambda c: (c[0], c[1]))  # (-path probability, order, parent, token, prob)
        chosen = self.worth_a_row(candidates[: s.width])
        layer, edits = [], []
        for neg_path_prob, _, parent, token, prob in chosen:
            node = TreeNode(self.head.new_id(), token, parent.pos + 1, self.free_seqs.popleft(), parent,
                            -neg_path_prob)
            parent.children.append(node)
            edits.append(KVCopy(parent.seq, node.seq, 0, None))  # sees what its parent sees
            layer.append(node)
        if not layer:
            return False
        self.emit(Drafted, tokens=tuple(n.token for n in layer), probs=tuple(n.path_prob for n in layer),
                  **cost)
        self.edit(edits, "view")
        self.send(layer, "tree layer")
        return True

    def worth_a_row(self, candidates: list[tuple]) -> list[tuple]:
        """The candidates (-chance, ...), best first, that join the layer: each while its chance
        of becoming the tip is at least `min_path` (the best is exempt) and at least the load bar
        (`load_bar`); the best always when nothing of this request is in flight."""
        s: SpecPipeStrategy = self.strategy
        bar = self.load_bar()
        chosen: list[tuple] = []
        for candidate in candidates:
            chance = -candidate[0]
            if chance < bar and (chosen or self.current_inflight() > 0):
                break
            if chosen and chance < s.min_path:
                break
            chosen.append(candidate)
        return chosen

    def load_bar(self) -> float:
        """The chance of becoming the tip a row needs once the running requests outnumber the
        stages (SpecPipe-DB under load). With n requests sending rho rows a step each, a step
        costs 1 + row_cost * n * rho fixed costs and yields n * rho * y tokens, where y is this
        request's tokens per row so far; one more row of chance q pays when it adds more to the
        step's tokens than its stage time takes from every request's:

            q  >=  row_cost * n * rho * y / (1 + row_cost * n * rho)

        about y (the average row's yield) under heavy load. rho and y are measured from this
        request's rows and tokens and the pipeline's steps since it was admitted (with a prior of
        one row a step yielding half a token). 0 while n <= n_stages: continuous batching alone
        would leave stages idle then (it makes at most n micro-batches for n_stages stages), so
        speculative rows fill stage time nobody else needs, and the pace is set by a step's
        latency (hops, the head, the draft), not by its rows."""
        s: SpecPipeStrategy = self.strategy
        n = self.head.n_running()
        if n <= self.head.n_stages:
            return 0.0
        prior = 8
        steps = self.head.answered() - self.admitted_at + prior
        rows = self.rows_sent + prior
        tokens = len(self.sink.tokens) + prior / 2
        load = s.row_cost * n * rows / steps
        return load * (tokens / rows) / (1 + load)

    def draft_ahead(self, nodes: list[TreeNode]) -> None:
        """Draft the children of the nodes just sent, on the draft's lane, while they travel: the
        next layer grows under the deepest leaves, and the answer that comes back meanwhile only
        prunes some of them."""
        if len(self.free_seqs) >= self.strategy.width:
            bar = self.load_bar()  # (a child's chance is at most its parent's: none of a node under the bar joins)
            contexts = [self.committed + self.path_tokens(n) for n in nodes if n.path_prob >= bar]
            if contexts:
                self.draft.ahead_questions(contexts, self.strategy.width)

    def path_tokens(self, node: TreeNode) -> list[int]:
        """Tokens from just below the tip down to `node`."""
        out = []
        while node is not None and node is not self.tip:
            out.append(node.token)
            node = node.parent
        return out[::-1]

    def send(self, nodes: list[TreeNode], kind: str) -> None:
        self.rows_sent += len(nodes)
        batch = Batch(tokens=np.array([n.token for n in nodes], dtype=np.int64),
                      positions=np.array([n.pos for n in nodes], dtype=np.int64),
                      seq_ids=tuple((n.seq,) for n in nodes), want_logits=np.ones(len(nodes), dtype=bool))
        self.launch(batch, kind, info=(self.epoch, nodes), row_ids=np.array([n.id for n in nodes], dtype=np.int64))
        self.draft_ahead(nodes)

    def prune(self, node: TreeNode) -> int:
        """Drop a node and its subtree everywhere: stages drop their rows wherever they have not
        gone yet, and the KV edits free their cells. Returns the number of nodes pruned."""
        nodes = list(node.subtree())
        self.cancel([n.id for n in nodes], "pruned")
        for n in nodes:
            self.release_seq(n)
        node.children = []
        return len(nodes)

    def release_seq(self, node: TreeNode) -> None:
        """Free a node's sequence (its cells go unless another sequence sees them); the id is free
        for a new node (the edit travels before anything that reuses it)."""
        self.free_seqs.append(node.seq)
        self.edit([KVRemove(node.seq)], "release")


@dataclass
class SpecPipeStats:
    """SpecPipe's counters, computed from its events."""

    steps: int = 0  # answers that held the tip (one committed token each)
    hits: int = 0  # the target's token was among the tip's children
    misses: int = 0  # ... it was not: the pipeline refilled from a new root
    drafted: int = 0  # tree nodes drafted (roots excluded)
    pruned: int = 0  # tree nodes pruned
    micro_batches: int = 0  # tree layers sent (roots included)

    def observe(self, e) -> None:
        if isinstance(e, Stepped):
            self.steps += 1
            self.hits += e.hit
            self.misses += not e.hit
            self.pruned += e.pruned
        elif isinstance(e, Launched) and e.kind in ("root", "tree layer"):
            self.micro_batches += 1
            self.drafted += len(e.tokens) if e.kind == "tree layer" else 0

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
    """SpecPipe. width: most nodes per new tree layer (the width budget W); min_path: a node
    beyond the best of its layer joins only if its chance of becoming the tip (its path
    probability from the tip, by calibrated confidence) is at least this; max_nodes: sequence
    ids available to one request's live tree nodes; calibrate: see `minipipe.drafter`;
    row_cost: one more row's stage time as a fraction of a micro-batch's fixed stage time, by
    which a layer narrows when several requests share each step (`SpecPipeDecoder.worth_a_row`;
    the default is the fixed cost model's ratio for a layer, 157 / 335 µs for the shipped model,
    `minipipe.runtime.cost`)."""

    name = "specpipe"
    one_part_in_flight = False

    def __init__(self, draft: DraftSource, width: int = 4, max_nodes: int = 256, min_path: float = 0.3,
                 calibrate: bool = True, row_cost: float = 0.47):
        self.draft, self.width, self.max_nodes, self.min_path = draft, width, max_nodes, min_path
        self.row_cost = row_cost
        self.calibrate = calibrate

    @property
    def seqs_per_request(self) -> int:
        return 1 + self.max_nodes

    def max_inflight_runs(self, n_stages: int) -> int:
        return n_stages  # one micro-batch per stage: requests' layers of one step travel together

    def max_part_rows(self) -> int:
        return self.width  # one tree layer

    def speculative_cells(self) -> int:
        return 2 * self.max_nodes  # live nodes, and pruned ones whose release is still on its way

    def decoder(self, request, seqs, head) -> SpecPipeDecoder:
        return SpecPipeDecoder(self, request, seqs, head)

    def stats(self) -> SpecPipeStats:
        return SpecPipeStats()
