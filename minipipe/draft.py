"""Draft sources: where speculative tokens come from.

Every source answers one question — "after this context, which next tokens do you guess, and
how sure are you?" — through `top(context, k)`: up to k (token, probability) guesses, best
first. Chains and trees are built from that one call (`propose_chain` here, `tree.py` for trees).
The context is always the full token list (prompt + committed + the speculative path so far).

| source          | guesses from                                   | for                            |
|-----------------|------------------------------------------------|--------------------------------|
| `DraftModel`    | a small Llama sharing the target's vocabulary  | real speculation               |
| `NgramDraft`    | the context itself (prompt lookup): what       | no second model; repetitive    |
|                 | followed the last n tokens when they last      | text (code, chat, lists)       |
|                 | occurred                                       |                                |
| `OracleDraft`   | the target's true greedy continuation, right   | tests and benchmarks:          |
|                 | with probability p per position, else wrong    | controlled acceptance          |
| `self:K`        | the target's own first K layers, final norm    | real checkpoints without a     |
|                 | and head (a `DraftModel` sharing its arrays)   | draft (self-speculation)       |
| `MergedDraft`   | several sources at once; their guesses merged  | SpecInfer's merge-based trees  |

A draft never affects which tokens are emitted (only the target's own choice — its argmax, or its
keyed Gumbel-max sample — is committed); it only decides how much speculative work is useful.
When a request samples, every source drafts *coupled*: it ranks guesses with the same noise the
target's sample at that position uses (`fork(prompt, sampling)`), which keeps acceptance high
when draft and target agree in distribution.

`build_draft` turns the command line's spelling of a source (`--draft-model`) into one; a
decoder sees its request's fork through a `minipipe.drafter.Drafter` (where the draft runs, what
it computed ahead, and how far its confidence is to be trusted). docs/drafts.md compares them.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence

import numpy as np

from . import kernels
from .batch import Batch
from .errors import InputError
from .model import StageModel
from .sampling import GREEDY, Sampling

Guess = tuple[int, float]  # (token, the draft's probability for it)


class DraftSource:
    name = "?"
    sampling: Sampling = GREEDY  # the request's settings: guesses are ranked by its keyed noise

    def reset(self, prompt: Sequence[int]) -> None:
        """A new generation starts after `prompt`."""

    def fork(self, prompt: Sequence[int], sampling: Sampling | None = None) -> "DraftSource":
        """A source for one new request after `prompt`, with its own state (a draft model's
        cache, an oracle's continuation) and shared, read-only parts (the weights).

        With `sampling`, the source drafts *coupled*: it ranks its guesses by its own scores plus
        the same Gumbel noise the target's sample at that position will use (`minipipe.sampling`),
        so when draft and target agree in distribution they tend to pick the same token."""
        clone = copy.copy(self)
        clone.sampling = GREEDY if sampling is None else sampling
        clone.reset(prompt)
        return clone

    def top(self, context: Sequence[int], k: int) -> list[Guess]:
        """Up to k guesses for the token after `context`, most probable first."""
        raise NotImplementedError

    def top_many(self, contexts: Sequence[Sequence[int]], k: int) -> list[list[Guess]]:
        """`top(context, k)` for several contexts; a draft model answers them in one forward."""
        return [self.top(context, k) for context in contexts]

    def propose_chain(self, context: Sequence[int], k: int, min_confidence: float = 0.0) -> list[Guess]:
        """Greedily extend `context` by up to k tokens, stopping early when the draft's own
        top probability falls below `min_confidence` (adaptive speculation length)."""
        path: list[Guess] = []
        context = list(context)
        while len(path) < k:
            guesses = self.top(context, 1)
            if not guesses or guesses[0][1] < min_confidence:
                break
            path.append(guesses[0])
            context.append(guesses[0][0])
        return path

    @property
    def tokens_computed(self) -> int:
        """Draft-model rows computed so far (the cost of drafting); 0 for model-free sources."""
        return 0

    @property
    def forwards_computed(self) -> int:
        """Forward calls those rows took (a batched forward costs less than one per row)."""
        return self.tokens_computed

    def release(self) -> None:
        """The request is over: give back what this fork holds."""


class DraftPool:
    """A draft model's weights and one KV cache that every request's fork shares.

    Each fork keeps its cached text in a sequence of its own, so one forward can compute rows of
    many forks at once (`prefetch`): the engine asks every request for the contexts its next
    offer will need and the pool answers them all in one batched forward — one pass over the
    draft's layers instead of one per request.
    """

    def __init__(self, model: StageModel, capacity: int = 256):
        self.model = model
        self.cache = model.new_cache(n_seqs=1 << 30, capacity=capacity)
        self.free: list[int] = []
        self.next_seq = 0
        self.forwards = 0  # forward calls made for prefetches
        self.rows = 0  # rows computed in them

    def new_seq(self) -> int:
        if self.free:
            return self.free.pop()
        self.next_seq += 1
        return self.next_seq - 1

    def release(self, seq: int) -> None:
        self.cache.seq_rm(seq)
        self.free.append(seq)

    def prefetch(self, queries: list[tuple["DraftModel", list[int]]]) -> int:
        """Compute the distributions after every (fork, context) in one forward; each fork then
        answers `top(context, k)` from memory. Returns the rows computed. Contexts a fork already
        holds, or that need a long suffix (a prompt: the batched prefill path), are left alone.
        A context's new suffix may be several tokens (the committed text moved past what the
        fork holds); every row of it keeps its distribution, so a question about a shorter
        context of the same text later costs nothing."""
        rows, pending = [], []  # (token, position, seq); (fork, context, temp seq, common)
        asked = set()  # (id(fork), context) already in this batch (asked ahead of need, and as a need)
        for fork, context in queries:
            context = [int(t) for t in context]
            key = (id(fork), tuple(context))
            if key[1] in fork.memo or (context == fork.last_context and fork.last_probs is not None) or key in asked:
                continue
            asked.add(key)
            common = min(common_prefix(fork.cached, context), len(context) - 1)
            if len(context) - common > 8:
                continue
            temp = self.new_seq()
            self.cache.seq_cp(fork.seq, temp, 0, common)  # the temp sequence sees the fork's prefix
            rows += [(t, common + i, temp) for i, t in enumerate(context[common:])]
            pending.append((fork, context, temp, common))
        if not rows:
            return 0
        batch = Batch(tokens=np.array([r[0] for r in rows], dtype=np.int64),
                      positions=np.array([r[1] for r in rows], dtype=np.int64),
                      seq_ids=tuple((r[2],) for r in rows), want_logits=np.ones(len(rows), dtype=bool))
        logits = iter(self.model.forward(self.cache, batch))  # [rows, V]
        self.forwards, self.rows = self.forwards + 1, self.rows + len(rows)
        adopted = set()
        for fork, context, temp, common in pending:
            for end in range(common + 1, len(context) + 1):  # the distribution after each row
                fork.memo[tuple(context[:end])] = next(logits)[: fork.vocab]
            if fork not in adopted:  # the fork's first context becomes its cached text
                adopted.add(fork)
                self.cache.seq_rm(fork.seq, common)
                self.cache.seq_cp(temp, fork.seq, common, None)
                fork.cached, fork.last_probs = context, None
            self.release(temp)
        return len(rows)


def prefetch_by_pool(queries: list[tuple["DraftModel", list[int]]], min_queries: int = 1) -> dict[int, int]:
    """(fork, context) questions of forks of draft models, computed in one forward per shared pool
    (`DraftPool.prefetch`): several requests' drafting costs about one request's. Pools with
    fewer than `min_queries` questions are left alone. -> {id(pool): rows computed}"""
    groups: dict[int, tuple] = {}  # id(pool) -> (pool, its questions)
    for fork, context in queries:
        groups.setdefault(id(fork.pool), (fork.pool, []))[1].append((fork, context))
    return {key: pool.prefetch(asked) for key, (pool, asked) in groups.items() if len(asked) >= min_queries}


class DraftModel(DraftSource):
    """A small Llama in the head process; its forks (one per request) share one `DraftPool`.

    A fork's cached text is one sequence of the pool's cache (`cached`, positions 0..n-1). To
    answer for a new context the fork keeps the longest common prefix, drops the rest (`seq_rm`)
    and runs only the new suffix — so extending a chain costs one row per token, and hopping
    between tree branches costs the length of the branch suffix. Contexts the pool prefetched
    for it in a batched forward are answered from memory (`memo`).

    `target_vocab`: the target's vocabulary size. A draft may know a few more tokens than the
    target (padded embeddings); it never proposes those: their probability is 0 and they are
    cut from the distribution, which has `min(draft vocabulary, target_vocab)` entries.
    """

    name = "draft-model"

    def __init__(self, model: StageModel, target_vocab: int | None = None, pool: DraftPool | None = None):
        assert model.is_first and model.is_last, "a draft model holds all its layers"
        self.model = model
        self.vocab = model.config.vocab_size if target_vocab is None else min(target_vocab, model.config.vocab_size)
        self.pool = DraftPool(model) if pool is None else pool
        self.cache = self.pool.cache
        self.seq = self.pool.new_seq()
        self.cached: list[int] = []
        self.memo: dict[tuple, np.ndarray] = {}  # context -> logits [V'], from the pool's prefetch
        self.last_probs: np.ndarray | None = None  # [V'] distribution after the last context asked
        self.last_context: list[int] | None = None  # ... that context
        self.n_rows = self.n_forwards = 0

    @property
    def tokens_computed(self) -> int:
        """Decode rows computed (the prompt's batched prefill is not counted)."""
        return self.n_rows

    @property
    def forwards_computed(self) -> int:
        return self.n_forwards

    def forget_before(self, n: int) -> None:
        """The committed text has `n` tokens: drop remembered distributions after shorter contexts
        (no question will ask about them again)."""
        if self.memo and any(len(key) < n for key in self.memo):
            self.memo = {key: v for key, v in self.memo.items() if len(key) >= n}

    def reset(self, prompt: Sequence[int]) -> None:
        self.cache.seq_rm(self.seq)
        self.cached, self.last_probs, self.memo, self.last_context = [], None, {}, None

    def release(self) -> None:
        """The request is over: its sequence goes back to the pool."""
        self.pool.release(self.seq)
        self.cached, self.memo, self.last_context = [], {}, None

    def fork(self, prompt: Sequence[int], sampling: Sampling | None = None) -> "DraftModel":
        """The same weights and pool, a sequence of its own."""
        clone = DraftModel(self.model, self.vocab, self.pool)
        clone.sampling = GREEDY if sampling is None else sampling
        return clone

    def distribution(self, context: Sequence[int]) -> np.ndarray:
        """The draft's next-token probabilities after `context`, over the ids the target knows.  -> [V']"""
        context = [int(t) for t in context]
        key = tuple(context)
        if key in self.memo:
            self.last_logits = self.memo.pop(key)  # (asked again: `last_context` answers it)
            self.last_probs = kernels.softmax(self.last_logits[None, :])[0]
            self.last_context = context
            return self.last_probs
        if context == self.last_context and self.last_probs is not None:
            return self.last_probs
        common = common_prefix(self.cached, context)
        common = min(common, len(context) - 1)  # recompute at least the last token for its logits
        self.cache.seq_rm(self.seq, common)
        new = context[common:]
        prefill = len(new) > 8  # long suffixes (the prompt) take the batched path
        logits = None
        for start, end in kernels.prefill_chunks(len(new)) if prefill else [(0, len(new))]:
            batch = Batch.chain(new[start:end], common + start, (self.seq,), want_logits="last", prefill=prefill)
            logits = self.model.forward(self.cache, batch)
        if not prefill:  # a long suffix is the prompt: its cost overlaps the target's prefill
            self.n_rows += len(new)
            self.n_forwards += 1
        self.cached = self.last_context = context
        self.last_logits = logits[-1][: self.vocab]  # [V'] ids the target cannot embed: never
        self.last_probs = kernels.softmax(self.last_logits[None, :])[0]
        return self.last_probs

    def top_many(self, contexts: Sequence[Sequence[int]], k: int) -> list[list[Guess]]:
        """Every context's guesses, their new rows computed in one batched forward (`DraftPool.prefetch`)."""
        rows = self.pool.prefetch([(self, list(c)) for c in contexts])
        if rows:
            self.n_rows, self.n_forwards = self.n_rows + rows, self.n_forwards + 1
        return [self.top(context, k) for context in contexts]

    def sampling_distribution(self, context: Sequence[int]) -> np.ndarray:
        """The draft's distribution after `context` at the request's temperature and filters,
        over the target's vocabulary (what MSS calls q).  -> [V'] float64"""
        from .mss import target_distribution

        self.distribution(context)
        return target_distribution(self.last_logits, self.sampling)

    def top(self, context: Sequence[int], k: int) -> list[Guess]:
        """The k best guesses: by probability, or (sampling) by the coupled perturbed scores,
        each with the draft's probability at the request's temperature."""
        probs = self.distribution(context)
        if self.sampling.greedy:
            return [(int(t), float(probs[t])) for t in best_ids(probs, k)]
        scores = self.sampling.scores(self.last_logits, len(context))  # [V'] -inf outside the filters
        best = [t for t in best_ids(scores, k) if np.isfinite(scores[t])]
        tempered = kernels.softmax((self.last_logits / np.float32(self.sampling.temperature))[None, :])[0]
        return [(int(t), float(tempered[t])) for t in best]


def best_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring ids, best first, ties by ascending id (a full stable sort's head,
    without sorting the whole vocabulary).  [V] -> [min(k, V)]"""
    V = scores.shape[0]
    if k >= V:
        return np.argsort(-scores, kind="stable")
    threshold = np.partition(scores, V - k)[V - k]  # the k-th highest score
    candidates = np.flatnonzero(scores >= threshold)  # ascending ids, ties at the boundary included
    return candidates[np.argsort(-scores[candidates], kind="stable")][:k]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (list comparisons run in C: the
    usual case, `b` extending `a`, costs one comparison; otherwise a binary search)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class NgramDraft(DraftSource):
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the
    context's last n tokens (n from `max_n` down to `min_n`).

    Example: context [1, 2, 3, 4, 2, 3], max_n = 3: [4, 2, 3] never occurred before; [2, 3]
    occurred at index 1, followed by 4 — so the guess is 4 (then, chained, whatever followed).

    Probability: Laplace's rule of succession over the matches of that n-gram, (c + 1) / (m + 2)
    for a guess that followed c of its m occurrences: one match gives 2/3, not certainty, and an
    n-gram that always continued the same way approaches 1 as it recurs. It is the draft's own
    claim; a decoder trusts it only as far as this request's measured acceptance of guesses with
    that claim allows (`minipipe.drafter.Calibration`).
    """

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def top(self, context: Sequence[int], k: int) -> list[Guess]:
        ctx = list(context)
        for n in range(min(self.max_n, len(ctx) - 1), self.min_n - 1, -1):
            key = ctx[-n:]
            followers: dict[int, int] = {}
            order: list[int] = []  # most recent occurrence first
            for i in range(len(ctx) - n - 1, -1, -1):
                if ctx[i: i + n] == key:
                    nxt = ctx[i + n]
                    if nxt not in followers:
                        order.append(nxt)
                    followers[nxt] = followers.get(nxt, 0) + 1
            if followers:
                total = sum(followers.values())
                if self.sampling.greedy:
                    ranked = sorted(order, key=lambda t: -followers[t])  # stable: recency breaks ties
                else:  # coupled: the followers' log-frequencies plus the target's noise at this position
                    noise = kernels.gumbel_noise_at(self.sampling.seed, len(ctx), order)
                    score = {t: np.log(followers[t] / total) / self.sampling.temperature + float(g)
                             for t, g in zip(order, noise)}
                    ranked = sorted(order, key=lambda t: -score[t])
                return [(t, (followers[t] + 1) / (total + 2)) for t in ranked[:k]]
        return []


class OracleDraft(DraftSource):
    """Knows the target's continuation (greedy, or sampled with the request's seed); its first guess at each position is right with
    probability `p` (decided once per position, by a seeded coin).

    When the first guess is wrong, the right token may still come later in its ranking: at each
    further rank with probability p/2 (so top-1 accuracy is p, top-2 p + (1-p)·p/2, ... like a
    real draft whose alternatives are sometimes right). `truth` is the greedy continuation after
    the prompt (e.g. from `generate_greedy`), or, for several requests, a function of (prompt,
    sampling settings) giving that request's continuation. The first guess reports probability 1.0 (it never stops a chain early),
    the i-th alternative 0.5**i; every other guess is a distinct wrong token.
    """

    name = "oracle"

    def __init__(self, truth: Sequence[int] | Callable[[list[int], Sampling], Sequence[int]], p: float, vocab_size: int,
                 seed: int = 0):
        self.truth_of = truth if callable(truth) else None
        self.truth = [] if callable(truth) else [int(t) for t in truth]
        self.p, self.vocab_size, self.seed = p, vocab_size, seed
        self.n_prompt = 0
        self.n_calls = self.n_forwards = 0

    @property
    def tokens_computed(self) -> int:
        """Each question costs what one draft-model row would (so the virtual clock charges it)."""
        return self.n_calls

    @property
    def forwards_computed(self) -> int:
        """Questions asked together (`top_many`) cost one forward, like a draft model's batch."""
        return self.n_forwards

    def top_many(self, contexts: Sequence[Sequence[int]], k: int) -> list[list[Guess]]:
        out = [self.top(context, k) for context in contexts]
        self.n_forwards -= max(0, len(contexts) - 1)  # one forward for all of them
        return out

    def reset(self, prompt: Sequence[int]) -> None:
        self.n_prompt = len(prompt)
        if self.truth_of is not None:
            self.truth = [int(t) for t in self.truth_of(list(prompt), self.sampling)]

    def fork(self, prompt: Sequence[int], sampling: Sampling | None = None) -> "OracleDraft":
        clone = copy.copy(self)
        clone.n_calls = clone.n_forwards = 0
        clone.sampling = GREEDY if sampling is None else sampling
        clone.reset(prompt)
        return clone

    def top(self, context: Sequence[int], k: int) -> list[Guess]:
        self.n_calls += 1
        self.n_forwards += 1
        j = len(context) - self.n_prompt  # index into truth of the token to guess
        on_track = 0 <= j < len(self.truth) and list(context[self.n_prompt:]) == self.truth[:j]
        right = self.truth[j] if 0 <= j < len(self.truth) else None
        coin = random.Random(f"{self.seed}:{len(context)}:rank")  # one coin per position, the same for every k
        rank = None  # where the right token sits in the ranking, if anywhere
        if on_track:
            rank, chance = 0, self.p
            while coin.random() >= chance:
                rank, chance = rank + 1, self.p / 2
                if rank >= 64:
                    rank = None
                    break
        if rank is not None and rank >= k:
            rank = None
        others = random.Random(f"{self.seed}:{len(context)}:wrong")
        wrong = [t for t in others.sample(range(self.vocab_size), min(self.vocab_size, k + 1)) if t != right]
        guesses = wrong[:k] if rank is None else wrong[:rank] + [right] + wrong[rank:]
        return [(t, 1.0 if i == 0 else 0.5 ** i) for i, t in enumerate(guesses[:k])]


class MergedDraft(DraftSource):
    """Several draft sources asked together (SpecInfer's merge-based token trees).

    `top(context, k)`: every source's k best guesses, merged — a token several sources guess
    appears once, with the highest probability any of them gave it — most probable first (ties:
    the earlier source first), at most k of them. The tree strategies go further and let each
    source grow its own tree, then merge the trees (`TokenTree.merge`: shared prefixes become one
    path), so one verification checks every source's proposal (`sources`).
    """

    name = "merged"

    def __init__(self, sources: Sequence[DraftSource]):
        if len(sources) < 2:
            raise ValueError("a merged draft needs at least two sources")
        self.sources = list(sources)
        self.name = "+".join(s.name for s in self.sources)

    def fork(self, prompt: Sequence[int], sampling: Sampling | None = None) -> "MergedDraft":
        clone = copy.copy(self)
        clone.sources = [s.fork(prompt, sampling) for s in self.sources]
        clone.sampling = GREEDY if sampling is None else sampling
        return clone

    def reset(self, prompt: Sequence[int]) -> None:
        for s in self.sources:
            s.reset(prompt)

    def release(self) -> None:
        for s in self.sources:
            s.release()

    def top(self, context: Sequence[int], k: int) -> list[Guess]:
        return merge_guesses([s.top(context, k) for s in self.sources], k)

    def top_many(self, contexts: Sequence[Sequence[int]], k: int) -> list[list[Guess]]:
        answers = [s.top_many(contexts, k) for s in self.sources]  # [sources][contexts]
        return [merge_guesses([a[i] for a in answers], k) for i in range(len(contexts))]

    @property
    def tokens_computed(self) -> int:
        return sum(s.tokens_computed for s in self.sources)

    @property
    def forwards_computed(self) -> int:
        return sum(s.forwards_computed for s in self.sources)


def merge_guesses(lists: Sequence[list[Guess]], k: int) -> list[Guess]:
    """One ranking from several: each token once, at the highest probability given to it, most
    probable first (ties: the order the lists came in), the first k."""
    best: dict[int, tuple[float, int]] = {}  # token -> (probability, order of first appearance)
    for guesses in lists:
        for token, prob in guesses:
            seen = best.get(token)
            if seen is None:
                best[token] = (prob, len(best))
            elif prob > seen[0]:
                best[token] = (prob, seen[1])
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[1][1]))
    return [(token, prob) for token, (prob, _) in ranked[:k]]


def self_draft_model(stages: Sequence[StageModel], k: int) -> StageModel:
    """Self-speculation (Draft & Verify, LayerSkip): the target's own first `k` layers, then its
    final norm and LM head, as one model. `stages` hold the target's layers in order (a whole
    model, or a pipeline's stage models); the draft shares their arrays — nothing is copied —
    and keeps its own KV cache. Its K/V for layer i equal the target's layer i's only when both
    read the same context: they are separate caches."""
    from dataclasses import replace

    from .weights import StageWeights

    layers = [lw for m in stages for lw in m.weights.layers]
    n_layers = stages[0].config.n_layers
    if not 1 <= k < n_layers or len(layers) < k:
        raise InputError(f"self:{k} needs 1 <= K < the model's {n_layers} layers")
    first, last = stages[0], stages[-1]
    if first.weights.embed is None or last.weights.head is None:
        raise ValueError("self_draft_model needs the first stage (embedding) and the last (norm and head)")
    weights = StageWeights(replace(first.config, n_layers=k), 0, k, layers[:k], first.weights.embed,
                           last.weights.final_norm, last.weights.head)
    return StageModel(weights)


def parse_self(spec: str, n_layers: int) -> int:
    """The K of `self:K` (`self` alone: `default_self_layers`), checked against the model."""
    if spec == "self":
        return default_self_layers(n_layers)
    try:
        k = int(spec.split(":", 1)[1])
    except ValueError:
        k = 0
    if not 1 <= k < n_layers:
        raise InputError(f"self-drafts are spelled self:K with K between 1 and {n_layers - 1} (the model has "
                         f"{n_layers} layers), got {spec!r}")
    return k


def default_self_layers(n_layers: int) -> int:
    """`self` without K: half the layers (docs/drafts.md: SmolLM2's measured agreement by K)."""
    return max(1, n_layers // 2)


def build_draft(spec: str | None, target_dir, config, stages: Sequence[StageModel] | None = None,
                truth_of: Callable | None = None) -> DraftSource:
    """A draft source from its command-line spelling (`--draft-model`):

    a checkpoint directory or model name (default: the shipped `tinybard-draft`), `ngram`,
    `oracle:P` or `oracle:P:SEED` (needs `truth_of(prompt, sampling)`: the target's own
    continuation; SEED: its coins, default 0), `self:K`
    (the target's first K layers: shares `stages`' arrays when given, else loads those layers),
    or several of them joined by `+` (a `MergedDraft`)."""
    from .model import load_stage
    from .paths import DEFAULT_DRAFT, resolve_model
    from .weights import Checkpoint, load_stage_weights

    if spec is not None and "+" in spec:
        return MergedDraft([build_draft(part, target_dir, config, stages, truth_of) for part in spec.split("+")])
    if spec == "ngram":
        return NgramDraft()
    if spec is not None and (spec == "oracle" or spec.startswith("oracle:")):
        fields = spec.split(":")[1:]  # oracle:P, or oracle:P:SEED (the seed of its coins)
        try:
            p = float(fields[0]) if fields else 0.8
            seed = int(fields[1]) if len(fields) == 2 else 0
        except ValueError:
            p = math.nan
        if not 0.0 <= p <= 1.0 or len(fields) > 2:  # NaN fails too
            raise InputError(f"oracle drafts are spelled oracle:P with P a probability between 0 and 1 "
                             f"(or oracle:P:SEED), got {spec!r}")
        return OracleDraft(truth_of, p, config.vocab_size, seed=seed)
    if spec is not None and (spec == "self" or spec.startswith("self:")):
        k = parse_self(spec, config.n_layers)
        if stages is None:  # no target in this process: load the first k layers, the norm and the head
            stages = [StageModel(load_stage_weights(Checkpoint(target_dir), config, 0, k, with_embed=True,
                                                    with_head=True))]
        draft = DraftModel(self_draft_model(stages, k), target_vocab=config.vocab_size)
        draft.name = f"self:{k}"
        return draft
    draft_dir = resolve_model(spec, default=DEFAULT_DRAFT)
    model = load_stage(draft_dir)
    check_compatible(target_dir, draft_dir, config.vocab_size, model.config.vocab_size)
    return DraftModel(model, target_vocab=config.vocab_size)


def check_compatible(target_dir, draft_dir, target_vocab: int, draft_vocab: int) -> None:
    """Refuse a draft whose tokenizer differs from the target's (tokens would mean other text)."""
    from pathlib import Path

    from .tokenizer import Tokenizer

    if abs(target_vocab - draft_vocab) > 128:
        raise InputError(f"the draft's vocabulary ({draft_vocab} tokens) does not match the target's "
                         f"({target_vocab}); a draft must share the target's tokenizer (or use --draft ngram)")
    t_path, d_path = Path(target_dir) / "tokenizer.json", Path(draft_dir) / "tokenizer.json"
    if t_path.is_file() and d_path.is_file():
        t_vocab = Tokenizer(target_dir)._tok.get_vocab(with_added_tokens=True)
        d_vocab = Tokenizer(draft_dir)._tok.get_vocab(with_added_tokens=True)
        if t_vocab != d_vocab:
            differing = sorted(set(t_vocab.items()) ^ set(d_vocab.items()), key=lambda kv: kv[1])[:1]
            raise InputError(f"the draft's tokenizer differs from the target's (e.g. {differing[0][0]!r}); "
                             "a draft must share the target's tokenizer (or use --draft ngram)")
