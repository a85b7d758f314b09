"""SpecInfer's multi-step speculative sampling (MSS): the same distribution, not the same text.

Coupled verification (`minipipe.sampling`) accepts a drafted token exactly when it equals the
target's own keyed sample, so a seeded request gives the same text with and without speculation.
MSS is the classic alternative (SpecInfer, Theorem 4.2; for a chain it is Leviathan et al.'s
speculative sampling): drafts are *sampled* from the draft's distribution q, and each is
accepted with probability min(1, p(x) / q(x)); on a rejection the target's distribution becomes
the residual norm(max(0, p − q)). Every emitted token is distributed exactly as sequential
sampling from the target would distribute it — but the text differs from the seeded sequential
run, because the randomness is consumed differently. minipipe offers it as the contrast a learner
needs (`--verify mss`), and reports, for the same drafts, how many tokens coupled verification
would have accepted.

The walk, from the root (the newest committed token):

    p = target distribution at the node (temperature and filters applied)
    for each child c, in draft order:               # children were drawn without replacement
        accept c with probability min(1, p(c) / q(c))    -> commit c, continue from c
        else: p = norm(max(0, p − q)); q = norm(q with q(c) = 0)
    no child accepted (or a leaf): commit a sample from p, stop

Children of a node are drawn from q without replacement (the Gumbel-top-k trick), so after a
rejection q also drops the rejected token (recursive rejection sampling); for a chain there is
one child and this is plain speculative sampling. Its randomness is keyed by (seed, position)
like the noise of coupled sampling, with its own salt, so a run is reproducible.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .sampling import Sampling
from .tree import TokenTree

MSS_SALT = 0x4D53535F5645524E  # keys MSS's uniforms apart from the sampling noise
DRAFT_SALT = 0x44524146545F5345  # independent (uncoupled) draft samples


def target_distribution(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """softmax(logits / T) over the tokens the filters keep, in float64.  [V] -> [V]"""
    if s.greedy:
        p = np.zeros(logits.shape[0])
        p[int(np.argmax(logits))] = 1.0
        return p
    scores = (logits / np.float32(s.temperature)).astype(np.float32)
    keep = kernels.sampling_candidates(scores, s.top_k, s.top_p, s.min_p)
    z = np.where(keep, scores.astype(np.float64), -np.inf)
    p = np.exp(z - z.max())
    return p / p.sum()


def uniforms(seed: int, position: int, n: int) -> np.ndarray:
    """n uniforms in (0, 1) keyed by (seed, position): MSS's acceptance draws.  -> [n] float64"""
    key = np.array([(int(seed) ^ MSS_SALT) & 0xFFFFFFFFFFFFFFFF, int(position)], dtype=np.uint64)
    words = np.random.Philox(key=key).random_raw(n)
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def verify_mss(tree: TokenTree, logits: np.ndarray, q_at: dict[int, np.ndarray], root_pos: int,
               s: Sampling) -> tuple[list[int], list[int]]:
    """Multi-step speculative sampling over a verified tree.

    logits [n_nodes, V]: the target's logits at each node (row = node); q_at[node]: the draft's
    distribution from which node's children were drawn. Returns (accepted node indices,
    committed tokens = accepted tokens + one token sampled from the final distribution).
    """
    node, accepted, committed = 0, [], []
    while True:
        position = root_pos + tree.nodes[node].depth + 1  # of the token chosen after `node`
        p = target_distribution(logits[node], s)
        children = tree.nodes[node].children
        draws = uniforms(s.seed, position, len(children) + 1)
        q = None
        if children:  # the draft's distribution, over the target's vocabulary
            q = np.zeros(p.shape[0])
            q[: q_at[node].shape[0]] = q_at[node][: p.shape[0]]
        chosen = None
        for i, c in enumerate(children):
            x = tree.nodes[c].token
            if q[x] > 0 and draws[i] <= p[x] / q[x]:
                chosen = c
                break
            residual = np.maximum(p - q, 0.0)
            p = residual / residual.sum() if residual.sum() > 0 else p
            q[x] = 0.0
            q = q / q.sum() if q.sum() > 0 else q
        if chosen is None:  # sample the next token from what is left of p
            token = int(np.searchsorted(np.cumsum(p), draws[-1] * p.sum()))
            committed.append(min(token, p.shape[0] - 1))
            return accepted, committed
        committed.append(tree.nodes[chosen].token)
        accepted.append(chosen)
        node = chosen
