"""Token trees (SpecInfer): many speculative continuations verified in one pass.

Terms:

* **root** — the last committed token. Its K/V is not in the cache yet, so it is the first row
  of the verification batch; its logits give the target's choice for depth 1.
* **node** — a drafted token, with a parent pointer (the root is node 0), a depth (root = 0),
  the draft's probability for it, and the cumulative probability of its path.
* **branch** — a root-to-leaf path. Each branch gets its own sequence id; a node belongs to
  every branch through it, so in the KV cache it attends to exactly the committed prefix and
  its own ancestors (the visibility rule of `kvcache.py` is the tree attention mask).
* **verification** (greedy, by parent pointer): from the root, take the target's argmax at the
  current node and move to the child with that token, until no child matches. The tokens
  taken are committed: the accepted nodes, plus the last argmax (the bonus token). Children are
  matched through their parent, never by (token, depth) alone — a sibling subtree may hold the
  same token at the same depth (the pitfall seen in SpecInfer's code).

Trees grow by an expansion schedule (SpecInfer's ⟨1,1,3,1,1,1,1,1⟩: at step i every leaf gets its
k_i best children) or best-first by cumulative probability within a node budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .batch import Batch
from .draft import DraftSource

SPECINFER_SCHEDULE = (1, 1, 3, 1, 1, 1, 1, 1)


@dataclass
class Node:
    token: int
    parent: int  # index of the parent node; -1 for the root
    depth: int
    prob: float = 1.0  # the draft's probability for this token given its parent's path
    path_prob: float = 1.0  # product of probs from the root
    children: list[int] = field(default_factory=list)


class TokenTree:
    def __init__(self, root_token: int):
        self.nodes = [Node(int(root_token), -1, 0)]

    def __len__(self) -> int:
        return len(self.nodes)

    def add(self, parent: int, token: int, prob: float) -> int:
        p = self.nodes[parent]
        node = Node(int(token), parent, p.depth + 1, prob, p.path_prob * prob)
        self.nodes.append(node)
        p.children.append(len(self.nodes) - 1)
        return len(self.nodes) - 1

    def path(self, node: int) -> list[int]:
        """Node indices from the first drafted node down to `node` (the root excluded)."""
        out = []
        while node > 0:
            out.append(node)
            node = self.nodes[node].parent
        return out[::-1]

    def tokens_to(self, node: int) -> list[int]:
        return [self.nodes[i].token for i in self.path(node)]

    def leaves(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if not n.children]

    @property
    def depth(self) -> int:
        return max(n.depth for n in self.nodes)

    # ------------------------------------------------------------------------------------------
    # growing

    def expand_schedule(self, draft: DraftSource, context: Sequence[int], schedule: Sequence[int] = SPECINFER_SCHEDULE,
                        min_confidence: float = 0.0) -> "TokenTree":
        """Step i: every current leaf gets its schedule[i] best children (confident ones only)."""
        frontier = [0]
        for width in schedule:
            next_frontier = []
            for leaf in frontier:
                for token, prob in draft.top(list(context) + self.tokens_to(leaf), width):
                    if prob >= min_confidence:
                        next_frontier.append(self.add(leaf, token, prob))
            if not next_frontier:
                break
            frontier = next_frontier
        return self

    def expand_best_first(self, draft: DraftSource, context: Sequence[int], budget: int, width: int = 4,
                          min_path_prob: float = 0.0, max_depth: int = 16) -> "TokenTree":
        """Add the most probable candidate (by path probability) until `budget` nodes are drafted."""
        candidates: list[tuple[float, int, int, float]] = []  # (-path prob, parent, token, prob)

        def offer(parent: int) -> None:
            if self.nodes[parent].depth >= max_depth:
                return
            for token, prob in draft.top(list(context) + self.tokens_to(parent), width):
                candidates.append((-self.nodes[parent].path_prob * prob, parent, token, prob))

        offer(0)
        while len(self.nodes) - 1 < budget and candidates:
            candidates.sort()
            neg_path, parent, token, prob = candidates.pop(0)
            if -neg_path < min_path_prob:
                break
            offer(self.add(parent, token, prob))
        return self

    def merge(self, other: "TokenTree") -> "TokenTree":
        """Add `other`'s nodes to this tree (SpecInfer's merge of several drafts' trees; both
        trees share the root). A node of `other` whose parent chain and token already exist here
        is that node (a shared prefix is one path; its probabilities stay this tree's); the rest
        are added under their matched parents, in `other`'s order."""
        here = {0: 0}  # other's node -> this tree's node
        for i, node in enumerate(other.nodes[1:], start=1):  # a parent always comes before its children
            parent = here[node.parent]
            child = self.match(parent, node.token)
            here[i] = child if child is not None else self.add(parent, node.token, node.prob)
        return self

    # ------------------------------------------------------------------------------------------
    # verifying

    def branch_seqs(self, first_seq: int) -> list[tuple[int, ...]]:
        """Sequence ids per node: leaf b gets first_seq + b; a node has those of its leaves.

        Leaves are numbered in node order, and a node's leaves are gathered from its children's
        (children come after their parent, so one backward pass suffices): the cost is the sum
        of the lists, one entry per (node, leaf below it) — leaves × depth, never leaves²."""
        leaf_number = {leaf: b for b, leaf in enumerate(self.leaves())}
        seqs: list[list[int]] = [[] for _ in self.nodes]
        for i in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[i]
            if not node.children:
                seqs[i] = [first_seq + leaf_number[i]]
            else:
                seqs[i] = [s for c in node.children for s in seqs[c]]
                seqs[i].sort()
        return [tuple(s) for s in seqs]

    def batch(self, root_pos: int, first_seq: int, include_root: bool = True) -> Batch:
        """Flatten into one verification batch (node order = row order).

        Without the root (PipeInfer's runs, whose root's K/V another run computes), row i is
        node i + 1.
        """
        seqs = self.branch_seqs(first_seq)
        nodes = range(0 if include_root else 1, len(self.nodes))
        return Batch(tokens=np.array([self.nodes[i].token for i in nodes], dtype=np.int64),
                     positions=np.array([root_pos + self.nodes[i].depth for i in nodes], dtype=np.int64),
                     seq_ids=tuple(seqs[i] for i in nodes), want_logits=np.ones(len(nodes), dtype=bool))

    def first_branch(self) -> list[int]:
        """Branch 0: from the root, always the first child, down to a leaf (node indices)."""
        path, node = [], 0
        while self.nodes[node].children:
            node = self.nodes[node].children[0]
            path.append(node)
        return path

    def match(self, node: int, token: int) -> int | None:
        """The child of `node` carrying `token`, if any."""
        for c in self.nodes[node].children:
            if self.nodes[c].token == token:
                return c
        return None

    def attention_mask(self) -> np.ndarray:
        """mask[i, j]: node i attends to node j (j is i or an ancestor of i).  -> [n, n] bool"""
        n = len(self.nodes)
        mask = np.zeros((n, n), dtype=bool)
        for i in range(n):
            for j in [0] + self.path(i):
                mask[i, j] = True
        return mask

    def verify(self, target_tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """Greedy verification by parent pointer.

        target_tokens[i] is the target's argmax at node i. Returns (accepted node indices,
        committed tokens = accepted tokens + the bonus token).
        """
        node, accepted, committed = 0, [], []
        while True:
            choice = int(target_tokens[node])
            committed.append(choice)
            child = self.match(node, choice)
            if child is None:
                return accepted, committed
            node = child
            accepted.append(node)

    def leaf_below(self, node: int) -> int:
        """Some leaf in `node`'s subtree (its branch's sequence contains the path to `node`)."""
        while self.nodes[node].children:
            node = self.nodes[node].children[0]
        return node
