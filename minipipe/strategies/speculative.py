"""Synchronous speculative decoding over the pipeline: `speculative` (a chain) and `tree` (SpecInfer).

One iteration, per request:

    1. draft    — the draft source proposes a chain of up to k tokens (`speculative`) or a token
                  tree (`tree`) after the committed text
    2. verify   — one part through every stage: the root (the newest committed token, whose
                  K/V is not cached yet) plus every drafted token, each branch in its own
                  sequence of a multibuffer partition, so each row attends to the committed
                  prefix and its own ancestors only
    3. accept   — walk from the root by parent pointer while the target's argmax matches a child;
                  commit those tokens plus the target's argmax at the last accepted node (bonus)
    4. KV edits — the committed sequence adopts the accepted rows; the partition is released
                  (rejected rows' cells become free)

A chain is a tree with one branch, so both strategies share this code; they differ only in how
the tree is grown. Only the target's own choices are ever committed (its argmax, or its keyed
sample when the request samples), so the output is sequential decoding's. Several requests
verify in shared micro-batches, each waiting for its own answer.

Verification modes (`verify`), when a request samples:

| mode          | drafts                                   | accepted when                          | text = sequential? |
|---------------|------------------------------------------|----------------------------------------|--------------------|
| `coupled`     | ranked with the target's own noise       | the token equals the target's sample   | yes                |
| `independent` | sampled with noise of their own          | the token equals the target's sample   | yes                |
| `mss`         | sampled with noise of their own          | SpecInfer's multi-step speculative     | no: same           |
|               |                                          | sampling (`minipipe.mss`)              | distribution only  |
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..draft import DraftSource
from ..drafter import Backoff, Drafter
from ..errors import InputError
from ..events import Drafted, Verified
from ..mss import DRAFT_SALT, verify_mss
from ..sampling import GREEDY
from ..metrics import SpeculationStats
from ..multibuffer import KVMultiBuffer
from ..tree import SPECINFER_SCHEDULE, TokenTree
from .base import Decoder, Strategy


class VerifyDecoder(Decoder):
    """One request: draft a tree, verify it in one part, commit, repeat."""

    def __init__(self, strategy: "TreeVerification", request, seqs, head):
        super().__init__(strategy, request, seqs, head)
        self.sampling = request.sampling or GREEDY
        self.mss = strategy.verify == "mss" and not self.sampling.greedy
        draft_sampling = self.sampling
        if strategy.verify != "coupled" and not self.sampling.greedy:  # draft samples of its own
            draft_sampling = replace(self.sampling, seed=self.sampling.seed ^ DRAFT_SALT)
        self.open_draft(strategy.draft.fork(request.prompt, draft_sampling), calibrate=strategy.calibrate)
        if self.mss and not hasattr(self.draft.source, "sampling_distribution"):
            raise InputError(f"--verify mss needs a draft model (its distribution q), not {self.draft.name}")
        self.buffers = KVMultiBuffer(n_partitions=1, width=strategy.max_leaves, base=self.seq)
        self.backoff = Backoff()

    def begin(self) -> None:
        self.verify_next()

    def verify_next(self) -> None:
        root_pos = len(self.committed) - 1  # the newest committed token: its K/V is not cached yet
        # never draft past the token budget or the model's context
        max_depth = min(self.sink.max_new_tokens - len(self.sink.tokens) - 1, self.sink.max_positions - 1 - root_pos)
        tree = TokenTree(self.committed[-1])
        if max_depth > 0 and self.backoff.ready():  # (while drafts are not worth sending, ask less often)
            mark = self.draft_mark()
            self.strategy.grow(tree, self.draft, self.committed, max_depth)
            cost = self.draft_since(mark)
            drafted = tree.nodes[1:]
            self.backoff.drafted(bool(drafted))
            self.emit(Drafted, tokens=tuple(n.token for n in drafted), probs=tuple(n.prob for n in drafted),
                      **cost)
        q_at = self.draft_distributions(tree) if self.mss else None
        part = self.buffers.acquire()
        self.edit(self.buffers.view(self.seq, part, 0, root_pos), "view")
        self.launch(tree.batch(root_pos, part[0]), "verify" if len(tree) > 1 else "plain", info=(tree, part, q_at),
                    return_logits=self.mss)

    def draft_distributions(self, tree: TokenTree) -> dict[int, np.ndarray]:
        """MSS: the draft's distribution at every node with children (what they were drawn from)."""
        source = self.draft.source
        rows, forwards = source.tokens_computed, source.forwards_computed
        q_at = {i: source.sampling_distribution(self.committed + tree.tokens_to(i))
                for i, node in enumerate(tree.nodes) if node.children}
        self.draft.charge(source.tokens_computed - rows, source.forwards_computed - forwards)
        return q_at

    def on_answer(self, launched, answer) -> None:
        tree, part, q_at = launched.info
        root_pos = int(launched.batch.positions[0])
        accepted, committed = tree.verify(answer.tokens)  # coupled: the target's own choice at every node
        coupled = None
        if self.mss:
            coupled = len(accepted)
            accepted, committed = verify_mss(tree, answer.logits, q_at, root_pos, self.sampling)
        self.emit(Verified, part=launched.id, drafted=len(tree) - 1, depth=tree.depth, accepted=len(accepted),
                  coupled_accepted=coupled)
        branch = part[tree.leaves().index(tree.leaf_below(accepted[-1] if accepted else 0))]
        self.edit(self.buffers.commit(branch, root_pos, root_pos + len(accepted) + 1), "commit")
        self.edit(self.buffers.release(part), "release")
        if not self.commit(committed, launched):
            self.verify_next()

    def release_all(self) -> None:
        for part in list(self.buffers.in_use):
            self.edit(self.buffers.release(part), "release")


class TreeVerification(Strategy):
    """Draft a tree, verify it in one pipeline pass, commit, repeat.

    With several draft sources (a `MergedDraft`, `--draft-model` given more than once) each source
    grows its own chain or tree and the trees are merged into one (SpecInfer's merge-based token
    tree: shared prefixes become one path), verified in one pass. `calibrate`: the draft's
    probabilities are this request's measured acceptance of its guesses (`minipipe.drafter`)."""

    leaves_per_source = 1

    def __init__(self, draft: DraftSource, verify: str = "coupled", calibrate: bool = True):
        if verify not in ("coupled", "independent", "mss"):
            raise ValueError(f"unknown verification {verify!r}")
        self.draft, self.verify, self.calibrate = draft, verify, calibrate
        self.n_sources = len(getattr(draft, "sources", [draft]))

    @property
    def max_leaves(self) -> int:
        return self.leaves_per_source * self.n_sources

    @property
    def seqs_per_request(self) -> int:
        return KVMultiBuffer(n_partitions=1, width=self.max_leaves).n_seqs

    def grow(self, tree: TokenTree, draft: Drafter, context: list[int], max_depth: int) -> None:
        """Each source grows its own tree under the root; the trees are merged into `tree`."""
        for source in draft.parts or [draft]:
            own = TokenTree(tree.nodes[0].token)
            self.grow_one(own, source, context, max_depth)
            tree.merge(own)

    def grow_one(self, tree: TokenTree, draft: DraftSource, context: list[int], max_depth: int) -> None:
        raise NotImplementedError

    def decoder(self, request, seqs, head) -> VerifyDecoder:
        return VerifyDecoder(self, request, seqs, head)

    def stats(self) -> SpeculationStats:
        return SpeculationStats()

    def speculative_cells(self) -> int:
        return self.max_part_rows()

    def logits_rows(self) -> int:
        return self.max_part_rows() if self.verify == "mss" else 0

    def max_part_rows(self) -> int:
        return 1 + self.n_sources * self.nodes_per_source()

    def nodes_per_source(self) -> int:
        raise NotImplementedError

    def max_row_seqs(self) -> int:
        """Sequence ids per row on average over the largest verification (the rings hold rows x
        this many): a node carries the sequence of every leaf below it, so the tree holds at most
        leaves x (depth + 1) ids in all — the root all of them, a leaf one."""
        return -(-self.max_leaves * (self.max_depth() + 1) // self.max_part_rows())

    def max_depth(self) -> int:
        raise NotImplementedError


class SpeculativeStrategy(TreeVerification):
    """`speculative`: a chain of up to k drafted tokens per verification.

    k: longest chain. min_confidence: stop drafting where the probability that the whole chain
    so far is accepted — the product of the draft's calibrated probabilities, i.e. of this
    request's measured acceptance — falls below it (adaptive speculation length). An extra row
    costs part of a step, so a chain is worth extending only while the chance that its next
    token is used exceeds that part: when drafts stop being accepted the chain shrinks to
    nothing and a verification is one row, a plain step (the backoff).
    """

    name = "speculative"

    def __init__(self, draft: DraftSource, k: int = 4, min_confidence: float = 0.3, verify: str = "coupled",
                 calibrate: bool = True):
        super().__init__(draft, verify, calibrate)
        self.k, self.min_confidence = k, min_confidence

    def grow_one(self, tree: TokenTree, draft: DraftSource, context: list[int], max_depth: int) -> None:
        node, path_prob, context = 0, 1.0, list(context)
        for _ in range(min(self.k, max_depth)):
            guesses = draft.top(context, 1)
            if not guesses or path_prob * guesses[0][1] < self.min_confidence:
                break
            token, prob = guesses[0]
            path_prob *= prob
            node = tree.add(node, token, prob)
            context.append(token)

    def nodes_per_source(self) -> int:
        return self.k

    def max_depth(self) -> int:
        return self.k


class TreeStrategy(TreeVerification):
    """`tree` (SpecInfer): a token tree per verification.

    schedule: children per leaf at each depth (SpecInfer's default ⟨1,1,3,1,1,1,1,1⟩); or, with
    `budget`, best-first growth by path probability up to `budget` nodes, `width` candidates per
    node. min_confidence prunes guesses the draft itself doubts.
    """

    name = "tree"

    def __init__(self, draft: DraftSource, schedule=SPECINFER_SCHEDULE, budget: int | None = None, width: int = 3,
                 min_confidence: float = 0.0, verify: str = "coupled", calibrate: bool = True):
        self.schedule, self.budget, self.width, self.min_confidence = tuple(schedule), budget, width, min_confidence
        self.leaves_per_source = budget if budget is not None else _product(self.schedule)
        super().__init__(draft, verify, calibrate)

    def grow_one(self, tree: TokenTree, draft: DraftSource, context: list[int], max_depth: int) -> None:
        if self.budget is not None:
            tree.expand_best_first(draft, context, self.budget, self.width, self.min_confidence, max_depth)
        else:
            tree.expand_schedule(draft, context, self.schedule[:max_depth], self.min_confidence)

    def nodes_per_source(self) -> int:
        if self.budget is not None:
            return self.budget
        nodes, width = 0, 1
        for w in self.schedule:
            width *= w
            nodes += width
        return nodes

    def max_depth(self) -> int:
        return self.budget if self.budget is not None else len(self.schedule)


def _product(widths) -> int:
    out = 1
    for w in widths:
        out *= w
    return out
