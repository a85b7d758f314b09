"""SpecPipe, pico version: a dynamic token tree fills the pipeline one tree layer per step, and
pruned rows stop where they are.

Paper: Yin, Xiao et al., "SpecPipe: Accelerating Pipeline Parallelism-based LLM Inference with
Speculative Decoding" (arXiv 2504.04104; its first version is titled "PipeDec"). The paper
publishes no code; this follows its abstract's components with the details reconstructed:

  dynamic token tree     the root is the newest committed token; each node is a drafted token at
                         the position after its parent, with its path's cumulative probability
  one layer per step     at every pipeline step the head sends one new tree layer into stage 0:
                         the `width` best children (by cumulative probability) of the deepest
                         nodes, so the S stages hold S consecutive layers: a diagonal wavefront
  node-wise computation  each node has its own sequence id; when it is created, a KV edit makes
                         its sequence see what its parent's sees (seq_cp), and its row writes
                         only its own: it attends to the committed prefix, its ancestors, itself
  verification           each step, the layer holding the tip (the newest committed node) leaves
                         the last stage; the target's argmax there is committed. Hit: a child of
                         the tip carries it; that child becomes the tip and sequence 0 adopts its
                         cell; the tip's other children are pruned. Miss: no child carries it;
                         the whole tree is pruned and the committed token becomes a new root.
  pruning propagation    pruned node ids join a set; each stage drops pruned rows from its
                         micro-batch before computing it, so they are neither computed nor sent
                         on; their sequences are released (seq_rm) by edits that follow the rows

On a hit a pipeline step commits one token; plain pipelining needs S steps per token. Only
target argmaxes at the tip, whose path is the committed text, are committed: greedy's output.

Simplified compared with minipipe/strategies/specpipe.py on minipipe/runtime/: a synchronous
step (every stage computes one micro-batch per tick, then the head verifies, prunes and grows);
pruned rows are dropped before computing only (the real stages also check before sending); a
fixed width; the prompt prefilled outside the simulation; no end-of-text rule.

    python examples/pico/specpipe.py    # the text, a timeline of the steps, counters, the check
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minipipe import kernels  # noqa: E402
from minipipe.batch import Batch  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.kvcache import KVCache  # noqa: E402
from minipipe.model import StageModel, load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402

WIDTH = 2  # nodes per tree layer
N_STAGES, N_TOKENS = 4, 24  # the demo's knobs


class Draft:
    """The draft model's guesses. Its KV cache holds the last context it was asked about (sequence
    0); for a new context it keeps the common prefix, forgets the rest (seq_rm), runs the new tokens."""

    def __init__(self, model: StageModel):
        self.model, self.cache, self.seen = model, model.new_cache(), []

    def top(self, context: list[int], k: int) -> list[tuple[int, float]]:
        """The k most probable next tokens after `context`, with the draft's probabilities."""
        keep = 0  # positions to keep: the common prefix, but at least the last token is rerun
        while keep < min(len(self.seen), len(context) - 1) and self.seen[keep] == context[keep]:
            keep += 1
        self.cache.seq_rm(0, keep)  # forget positions >= keep
        logits = self.model.forward(self.cache, Batch.chain(context[keep:], keep, want_logits="last"))  # [1, V]
        self.seen = list(context)
        probs = kernels.softmax(logits[0])  # [V]
        best = np.argsort(-probs, kind="stable")[:k]
        return [(int(t), float(probs[t])) for t in best]


@dataclass(eq=False)
class Node:
    """A node of the token tree: a drafted token (or a root) with its own sequence id."""

    id: int
    token: int
    pos: int
    seq: int
    parent: Node | None = None
    path_prob: float = 1.0  # the draft's probability of the path down to here (a product)
    children: list[Node] = field(default_factory=list)

    def subtree(self):
        yield self
        for child in self.children:
            yield from child.subtree()


@dataclass
class MicroBatch:
    batch: Batch  # one row per node; row_ids are the node ids
    hidden: np.ndarray | None = None  # [T, D] between stages, logits [T, V] after the last one


def tick(stages: list[StageModel], caches: list[KVCache], inbox: list[deque], pruned: set[int],
         counts: Counter, timeline: list[str] | None) -> MicroBatch | None:
    """One pipeline step; returns the micro-batch that leaves the last stage, if any.

    A stage's inbox holds micro-batches and KV edits in the order the head sent them. The stage
    applies the edits up to the next micro-batch, drops its pruned rows, computes the rest."""
    leaving = None
    for s in reversed(range(len(stages))):  # the last stage first: a micro-batch moves one stage per tick
        downstream = inbox[s + 1] if s + 1 < len(stages) else None
        while inbox[s] and isinstance(inbox[s][0], tuple):  # a KV edit, e.g. ("seq_cp", src, dst)
            edit = inbox[s].popleft()
            getattr(caches[s], edit[0])(*edit[1:])
            if downstream is not None:
                downstream.append(edit)
        mb = inbox[s].popleft() if inbox[s] else None
        if mb is not None:  # pruning propagation: rows of pruned nodes stop here
            keep = np.array([int(i) not in pruned for i in mb.batch.row_ids])  # [T] bool
            counts["rows dropped"] += int((~keep).sum())
            mb = MicroBatch(mb.batch.select(keep), None if mb.hidden is None else mb.hidden[keep])
        if mb is not None and mb.batch.n_rows:
            mb.hidden = stages[s].forward(caches[s], mb.batch, mb.hidden)  # [T, D], or [T, V] at the last stage
            if downstream is not None:
                downstream.append(mb)
            else:
                leaving = mb
        if timeline is not None:  # the rows this stage computed
            timeline[s] += str(mb.batch.n_rows) if mb is not None and mb.batch.n_rows else "."
    return leaving


def generate(stages: list[StageModel], draft_model: StageModel, prompt: list[int], n_new: int,
             width: int = WIDTH, timeline: list[str] | None = None, counts: Counter | None = None) -> list[int]:
    """`n_new` tokens of greedy decoding, SpecPipe style. `timeline` (one string per stage) gets one
    character per step; `counts` counts hits, misses and pruned nodes."""
    S, counts = len(stages), Counter() if counts is None else counts
    n_seqs = 2 + width * (S + 2)  # sequence 0, the tip, and the nodes of the layers in flight
    caches = [stage.new_cache(n_seqs=n_seqs, capacity=len(prompt) + n_new + width * S) for stage in stages]
    draft = Draft(draft_model)
    for start, end in kernels.prefill_chunks(len(prompt)):  # the prompt into sequence 0, stage by stage
        hidden, batch = None, Batch.chain(prompt[start:end], start, want_logits="last", prefill=True)
        for stage, cache in zip(stages, caches):
            hidden = stage.forward(cache, batch, hidden)  # [T, D], then logits [1, V]
    committed = prompt + [int(kernels.argmax_rows(hidden)[-1])]  # the newest token is not cached yet
    end = len(prompt) + n_new  # the committed text's final length
    inbox: list[deque] = [deque() for _ in range(S)]
    pruned: set[int] = set()  # ids of pruned nodes, checked by every stage
    free_seqs = deque(range(1, n_seqs))
    node_ids = itertools.count()

    def send(layer: list[Node], edits: list[tuple]) -> None:  # one micro-batch: a tree layer
        inbox[0].extend(edits)  # the edits travel just ahead of the rows
        inbox[0].append(MicroBatch(Batch(
            tokens=np.array([n.token for n in layer]), positions=np.array([n.pos for n in layer]),
            seq_ids=tuple((n.seq,) for n in layer), want_logits=np.ones(len(layer), dtype=bool),
            row_ids=np.array([n.id for n in layer]))))

    def new_root(token: int, pos: int) -> Node:  # a committed token whose K/V is not cached yet
        root = Node(next(node_ids), token, pos, free_seqs.popleft())
        send([root], [("seq_cp", 0, root.seq, 0, pos)])  # it sees the committed prefix
        inbox[0].append(("seq_cp", root.seq, 0, pos, pos + 1))  # and sequence 0 adopts its cell
        return root

    def prune(node: Node) -> list[tuple]:  # the node and its subtree, everywhere
        edits = []
        for n in node.subtree():
            pruned.add(n.id)
            edits.append(("seq_rm", n.seq))  # release: its cells are freed
            free_seqs.append(n.seq)
            counts["pruned nodes"] += 1
        return edits

    tip = new_root(committed[-1], len(committed) - 1)
    while len(committed) < end:
        counts["steps"] += 1
        mb = tick(stages, caches, inbox, pruned, counts, timeline)
        sent_root = False  # one micro-batch enters the pipeline per step: a new root or a new layer
        # Verification: does the micro-batch that left the pipeline hold the tip's row?
        if mb is not None and tip.id in mb.batch.row_ids:
            token = int(kernels.argmax_rows(mb.hidden)[list(mb.batch.row_ids).index(tip.id)])
            committed.append(token)
            hit = next((c for c in tip.children if c.token == token), None)
            for child in tip.children:
                if child is not hit:  # hit: the other children; miss: all of them (the whole tree)
                    inbox[0].extend(prune(child))
            inbox[0].append(("seq_rm", tip.seq))  # release the old tip: it gets no more children
            free_seqs.append(tip.seq)
            if hit is not None:
                counts["hits"] += 1
                inbox[0].append(("seq_cp", hit.seq, 0, hit.pos, hit.pos + 1))  # sequence 0 adopts its cell
                tip = hit
            else:
                counts["misses"] += 1
                if len(committed) < end:
                    tip, sent_root = new_root(token, len(committed) - 1), True
        # Growth: one new layer, the best `width` children of the deepest leaves (each predicts pos + 1 < end).
        leaves = [n for n in tip.subtree() if not n.children]
        deepest = max(n.pos for n in leaves)
        frontier = [n for n in leaves if n.pos == deepest and n.pos + 2 < end]
        if frontier and not sent_root and len(free_seqs) >= width and len(committed) < end:
            candidates = []  # (cumulative probability, parent, token)
            for leaf in frontier:
                path, n = [], leaf
                while n is not tip:  # the tokens from below the tip down to the leaf
                    path, n = [n.token] + path, n.parent
                for token, prob in draft.top(committed + path, width):
                    candidates.append((leaf.path_prob * prob, leaf, token))
            candidates.sort(key=lambda c: -c[0])
            layer = [Node(next(node_ids), token, parent.pos + 1, free_seqs.popleft(), parent, prob)
                     for prob, parent, token in candidates[:width]]
            for node in layer:
                node.parent.children.append(node)
            send(layer, [("seq_cp", n.parent.seq, n.seq) for n in layer])  # a node sees what its parent sees
    return committed[len(prompt):]


def main() -> None:
    """The shipped tinybard pair on 4 stages after "ROMEO:"; the result is checked against greedy."""
    target_dir, draft_dir = resolve_model(None), resolve_model(None, default=DEFAULT_DRAFT)
    tokenizer, whole = Tokenizer(target_dir), load_stage(target_dir)
    L, S = whole.config.n_layers, N_STAGES
    stages = [load_stage(target_dir, L * s // S, L * (s + 1) // S) for s in range(S)]  # layers [lo, hi) per stage
    prompt = tokenizer.encode("ROMEO:")
    timeline, counts = [""] * S, Counter()
    tokens = generate(stages, load_stage(draft_dir), prompt, N_TOKENS, timeline=timeline, counts=counts)
    print(tokenizer.decode(prompt + tokens))
    print("\ntimeline (one column per step; digit: rows computed, fewer than the width once pruned; .: idle)")
    for s, row in enumerate(timeline):
        print(f"stage {s} |{row}|")
    print(f"{counts['steps']} steps for the {N_TOKENS - 1} tokens after the first (plain pipelining: "
          f"{S * (N_TOKENS - 1)}); "
          f"{counts['hits']} hits, {counts['misses']} misses, {counts['pruned nodes']} nodes pruned "
          f"({counts['rows dropped']} rows dropped by the stages)")
    same = tokens == generate_greedy(whole, prompt, N_TOKENS).tokens
    print(f"same as greedy: {same}")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
