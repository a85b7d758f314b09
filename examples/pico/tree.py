"""SpecInfer's token-tree verification, pico version (greedy decoding).

Paper: Miao et al., "SpecInfer: Accelerating Large Language Model Serving with Tree-based
Speculative Inference and Verification" (ASPLOS 2024, arXiv 2305.09781): the expansion-based
token tree (section 3), tree-based parallel decoding with a topology-aware causal mask
(section 4), and greedy verification (Algorithm 2, VerifyGreedy). One step:

  1. expand   a token tree under the root (the last committed token, not in the cache yet): with
              the expansion configuration <k1, k2, ...>, at depth d every leaf gets the draft's
              k_d best next tokens as children
  2. decode   ONE target pass over every node of the tree. A node must attend to the committed
              prefix, its ancestors and itself, never to its siblings: the topology-aware causal
              mask. Here the mask is made of sequence ids: each branch (root -> leaf) is a
              sequence; a node belongs to every branch through it; the KV cache lets a row see
              a cell iff they share a sequence and the cell's position is not later.
  3. verify   VerifyGreedy: from the root, take the target's choice at the current node and move
              to the child carrying it (found through the parent, never by token and depth
              alone), until no child matches. The choices taken are committed: the accepted
              nodes plus one bonus token.
  4. KV       sequence 0 (the committed text) adopts the accepted path's cells (seq_cp); every
              branch sequence forgets all its cells (seq_rm), so the rejected nodes' cells are free.

Simplified compared with minipipe/strategies/speculative.py (TreeStrategy, with minipipe/tree.py
and minipipe/multibuffer.py): the stages run one after another (verification is one trip through
the pipeline); expansion only (no best-first budget, no confidence cutoff); one draft model (the
paper also merges trees of several); no end-of-text rule.

    python examples/pico/tree.py
"""

from __future__ import annotations

import math
import sys
from collections import Counter
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

EXPANSION = (1, 1, 3, 1, 1, 1, 1, 1)  # SpecInfer's default: a trunk of 2, a split into 3, three chains of 6
N_STAGES, N_TOKENS = 2, 24  # the demo's knobs


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


def forward(stages: list[StageModel], caches: list[KVCache], batch: Batch) -> np.ndarray:
    """One trip through every stage.  -> logits [T', V] of the rows that want them"""
    hidden = None
    for stage, cache in zip(stages, caches):
        hidden = stage.forward(cache, batch, hidden)  # [T, D] between stages; logits after the last
    return hidden


def path(parent: list[int], i: int) -> list[int]:
    """Node indices from the root (node 0) down to node i."""
    return [] if i < 0 else path(parent, parent[i]) + [i]


def verify_greedy(tokens: list[int], parent: list[int], choices: np.ndarray) -> tuple[int, list[int]]:
    """VerifyGreedy (Algorithm 2): from the root, commit the target's choice at the current node
    and move to the child carrying it, found through its parent (a sibling subtree may hold the
    same token at the same depth), until no child does.  choices: [N] the target's argmax per node.

    Returns the last accepted node and the committed tokens (the accepted ones plus the bonus)."""
    node, committed = 0, []
    while True:
        choice = int(choices[node])
        committed.append(choice)
        child = next((c for c in range(len(tokens)) if parent[c] == node and tokens[c] == choice), None)
        if child is None:
            return node, committed
        node = child


def generate(stages: list[StageModel], draft_model: StageModel, prompt: list[int], n_new: int,
             expansion: tuple[int, ...] = EXPANSION, counts: Counter | None = None) -> list[int]:
    """`n_new` tokens of greedy decoding, verified one token tree at a time; `counts` counts passes and nodes."""
    counts = Counter() if counts is None else counts
    n_branches = math.prod(expansion)  # leaves of a full tree; branch b is sequence 1 + b
    caches = [stage.new_cache(n_seqs=1 + n_branches, capacity=len(prompt) + n_new) for stage in stages]
    draft = Draft(draft_model)
    for start, end in kernels.prefill_chunks(len(prompt)):  # the prompt, in the canonical chunks
        logits = forward(stages, caches, Batch.chain(prompt[start:end], start, want_logits="last", prefill=True))
    out = [int(kernels.argmax_rows(logits)[-1])]  # the first token: the first root

    while len(out) < n_new:
        context = prompt + out
        root_pos = len(context) - 1
        # 1. expand: node 0 is the root; node i holds tokens[i] under parent[i]; no deeper than the budget
        tokens, parent = [out[-1]], [-1]
        leaves = [0]
        for width in expansion[: n_new - len(out) - 1]:
            grown = []
            for leaf in leaves:
                drafted = [tokens[i] for i in path(parent, leaf)[1:]]  # the tokens below the root
                for token, _ in draft.top(context + drafted, width):
                    tokens.append(token)
                    parent.append(leaf)
                    grown.append(len(tokens) - 1)
            leaves = grown
        # 2. decode the whole tree in one pass; the causal mask comes from the branch sequences
        branches = [path(parent, leaf) for leaf in leaves]
        seqs = tuple(tuple(1 + b for b, branch in enumerate(branches) if i in branch) for i in range(len(tokens)))
        depth = np.array([len(path(parent, i)) - 1 for i in range(len(tokens))])  # [N] nodes
        for cache in caches:
            for b in range(len(branches)):
                cache.seq_cp(0, 1 + b, 0, root_pos)  # every branch sees the committed prefix
        batch = Batch(tokens=np.array(tokens), positions=root_pos + depth, seq_ids=seqs,
                      want_logits=np.ones(len(tokens), dtype=bool))  # one row per node
        choices = kernels.argmax_rows(forward(stages, caches, batch))  # [N, V] -> [N]
        # 3. verify: the target's choices decide which path survives
        node, committed = verify_greedy(tokens, parent, choices)
        out += committed
        counts["passes"] += 1
        counts["nodes"] += len(tokens) - 1  # the root is not a guess
        counts["accepted"] += len(committed) - 1  # the last one is the bonus
        # 4. KV: sequence 0 adopts the accepted path (root + accepted nodes); every branch is released
        kept = 1 + next(b for b, branch in enumerate(branches) if node in branch)  # a branch through it
        for cache in caches:
            cache.seq_cp(kept, 0, root_pos, root_pos + int(depth[node]) + 1)
            for b in range(len(branches)):
                cache.seq_rm(1 + b)
    return out


def main() -> None:
    """The shipped tinybard pair after "ROMEO:"; the result is checked against greedy decoding."""
    target_dir, draft_dir = resolve_model(None), resolve_model(None, default=DEFAULT_DRAFT)
    tokenizer, whole = Tokenizer(target_dir), load_stage(target_dir)
    L, S = whole.config.n_layers, N_STAGES
    stages = [load_stage(target_dir, L * s // S, L * (s + 1) // S) for s in range(S)]  # layers [lo, hi) per stage
    prompt = tokenizer.encode("ROMEO:")
    counts = Counter()
    tokens = generate(stages, load_stage(draft_dir), prompt, N_TOKENS, counts=counts)
    print(tokenizer.decode(prompt + tokens))
    print(f"\n{len(tokens) - 1} tokens after the first in {counts['passes']} target passes (greedy: one per token); "
          f"{counts['accepted']} of {counts['nodes']} drafted nodes accepted")
    same = tokens == generate_greedy(whole, prompt, N_TOKENS).tokens
    print(f"same as greedy: {same}")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
