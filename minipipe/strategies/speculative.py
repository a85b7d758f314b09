"""Synchronous speculative decoding over the pipeline: `speculative` (a chain) and `tree` (SpecInfer).

One iteration (ALGORITHMS.md §0, §2):

    1. draft    — the head's draft source proposes a chain of up to k tokens (`speculative`) or
                  a token tree (`tree`) after the committed text
    2. verify   — one run through every stage: the root (the last committed token, whose K/V is
                  not cached yet) plus every drafted token, each branch in its own sequence of a
                  multibuffer partition, so each row attends to the committed prefix and its own
                  ancestors only
    3. accept   — walk from the root by parent pointer while the target's argmax matches a child;
                  commit those tokens plus the target's argmax at the last accepted node (bonus)
    4. KV edits — sequence 0 adopts the accepted rows; the partition is released (rejected rows'
                  cells become free)

A chain is a tree with one branch, so both strategies share this code; they differ only in how
the tree is grown. Only target argmaxes are ever committed, so the output is greedy decoding's.
"""

from __future__ import annotations

from ..draft import DraftSource
from ..generation import TokenSink
from ..metrics import SpeculationStats
from ..multibuffer import KVMultiBuffer
from ..runtime.base import Pipeline
from ..transport.messages import Result, Run
from ..tree import SPECINFER_SCHEDULE, TokenTree
from .base import Strategy


class TreeVerification(Strategy):
    """Draft a tree, verify it in one pipeline pass, commit, repeat."""

    max_leaves = 1

    def __init__(self, draft: DraftSource):
        self.draft = draft
        self.buffers = KVMultiBuffer(n_partitions=1, width=self.max_leaves)
        self.n_seqs = self.buffers.n_seqs
        self.stats = SpeculationStats()

    def grow(self, tree: TokenTree, context: list[int], max_depth: int) -> None:
        raise NotImplementedError

    def decode(self, pipe: Pipeline, prompt: list[int], first_token: int, sink: TokenSink) -> None:
        self.draft.reset(prompt)
        while not sink.done:
            root_pos = sink.next_position
            # never draft past the token budget or the model's context
            max_depth = min(sink.max_new_tokens - len(sink.tokens) - 1, sink.max_positions - 1 - root_pos)
            tree = TokenTree(sink.tokens[-1])
            if max_depth > 0:
                rows_before = self.draft.tokens_computed
                self.grow(tree, prompt + sink.tokens, max_depth)
                pipe.draft_work(self.draft.tokens_computed - rows_before)
            part = self.buffers.acquire()
            pipe.submit_edits(self.buffers.view(0, part, 0, root_pos))
            pipe.submit(Run(pipe.new_run_id(), tree.batch(root_pos, part[0]), speculative=len(tree) > 1))
            answer = pipe.receive()
            assert isinstance(answer, Result), "a synchronous verification is never cancelled"
            accepted, committed = tree.verify(answer.tokens)
            self.stats.record(len(tree) - 1, tree.depth, len(accepted))
            branch = part[tree.leaves().index(tree.leaf_below(accepted[-1] if accepted else 0))]
            pipe.submit_edits(self.buffers.commit(branch, root_pos, root_pos + len(accepted) + 1)
                              + self.buffers.release(part))
            sink.add(committed)


class SpeculativeStrategy(TreeVerification):
    """`speculative`: a chain of up to k drafted tokens per verification.

    k: longest chain; min_confidence: stop drafting when the draft's own top probability falls
    below it (adaptive speculation length).
    """

    name = "speculative"

    def __init__(self, draft: DraftSource, k: int = 4, min_confidence: float = 0.0):
        super().__init__(draft)
        self.k, self.min_confidence = k, min_confidence

    def grow(self, tree: TokenTree, context: list[int], max_depth: int) -> None:
        node = 0
        for token, prob in self.draft.propose_chain(context, min(self.k, max_depth), self.min_confidence):
            node = tree.add(node, token, prob)


class TreeStrategy(TreeVerification):
    """`tree` (SpecInfer): a token tree per verification.

    schedule: children per leaf at each depth (SpecInfer's default ⟨1,1,3,1,1,1,1,1⟩); or, with
    `budget`, best-first growth by path probability up to `budget` nodes, `width` candidates per
    node. min_confidence prunes guesses the draft itself doubts.
    """

    name = "tree"

    def __init__(self, draft: DraftSource, schedule=SPECINFER_SCHEDULE, budget: int | None = None, width: int = 3,
                 min_confidence: float = 0.0):
        self.schedule, self.budget, self.width, self.min_confidence = tuple(schedule), budget, width, min_confidence
        self.max_leaves = budget if budget is not None else _product(self.schedule)
        super().__init__(draft)

    def grow(self, tree: TokenTree, context: list[int], max_depth: int) -> None:
        if self.budget is not None:
            tree.expand_best_first(self.draft, context, self.budget, self.width, self.min_confidence, max_depth)
        else:
            tree.expand_schedule(self.draft, context, self.schedule[:max_depth], self.min_confidence)


def _product(widths) -> int:
    out = 1
    for w in widths:
        out *= w
    return out
