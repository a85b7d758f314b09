"""What every strategy owes, checked for all of them at once.

* **Stop rules inside multi-token commits.** A verification may commit several tokens at once;
  an end-of-sequence id among them, the token budget or the model's context must cut the
  output exactly where greedy decoding stops, never one token later.
* **Any branch can win.** A tree whose accepted path is not its first branch must commit that
  branch's K/V (the next tokens are only right if it did).
* **Resource accounting.** After a generation every stage's cache is empty: the request freed
  its committed text and every speculative sequence (partitions, tree nodes) it used.
"""

from __future__ import annotations

from hypothesis import given, strategies as st

from minipipe.draft import DraftSource
from minipipe.greedy import generate_greedy
from minipipe.runtime import LocalPipeline
from minipipe.strategies import (PipeInferStrategy, PipelineStrategy, SpecPipeStrategy, SpeculativeStrategy,
                                 TreeStrategy, generate)
from minipipe.synthetic import random_model

from .random_pairs import RandomPair
from .test_runtime import DrawChooser

TARGET = dict(dim=32, ffn_dim=48, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=31, max_positions=64)
DRAFT = dict(dim=16, ffn_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=31, max_positions=64)
PAIR = RandomPair(TARGET, DRAFT, draft_seed=300)
STRATEGIES = ["pipeline", "speculative", "tree", "pipeinfer", "specpipe"]


def make_strategy(name: str, draft: DraftSource):
    return {"pipeline": lambda: PipelineStrategy(),
            "speculative": lambda: SpeculativeStrategy(draft, k=5),
            "tree": lambda: TreeStrategy(draft, schedule=(2, 1, 2, 1)),
            "pipeinfer": lambda: PipeInferStrategy(draft, p_accept=0.0, n_draft=4, branches=2, max_inflight=6),
            "specpipe": lambda: SpecPipeStrategy(draft, width=2)}[name]()


def held_resources(pipe: LocalPipeline) -> list[str]:
    """What a finished generation still holds in the stages' caches: every request frees its
    whole sequence block when it ends (committed text and speculation), so nothing should be."""
    pipe.drain()  # trailing KV edits reach every stage
    held = []
    for stage in pipe.stages:
        if stage.cache.n_used or stage.cache.seqs_in_use():
            held.append(f"stage {stage.index}: {stage.cache.n_used} cells of sequences "
                        f"{stage.cache.seqs_in_use()[:8]}, e.g. {stage.cache.cells()[:3]}")
    return held


@given(data=st.data())
def test_stop_rules_cut_multi_token_commits_where_greedy_stops(data):
    name = data.draw(st.sampled_from(STRATEGIES), label="strategy")
    seed = data.draw(st.integers(0, 2), label="seed")
    prompt = tuple(data.draw(st.lists(st.integers(0, 30), min_size=1, max_size=6), label="prompt"))
    free = PAIR.truth(seed, prompt, 40)  # the unconstrained greedy continuation
    rule = data.draw(st.sampled_from(["eos", "budget", "context"]), label="rule")
    n, eos, max_positions = 40, (), TARGET["max_positions"]
    if rule == "eos":  # an end-of-sequence id that greedy emits mid-way, so drafts run past it
        eos = (free[data.draw(st.integers(1, 20), label="eos index")],)
    elif rule == "budget":
        n = data.draw(st.integers(1, 25), label="max_new_tokens")
    else:
        max_positions = len(prompt) + data.draw(st.integers(1, 25), label="room")
    if rule == "context":  # the last token is fed back at position max_positions - 1
        expected_tokens = free[: max_positions - len(prompt) + 1]
    else:
        expected_tokens = generate_greedy(random_model(seed=seed, **TARGET), list(prompt), n, eos).tokens
    strategy = make_strategy(name, PAIR.make_draft("always", seed, prompt, 40))  # multi-token commits
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    pipe = LocalPipeline(PAIR.stage_models(seed, data.draw(st.integers(1, 3), label="stages")),
                         n_seqs=strategy.n_seqs, chooser=chooser)
    got = generate(strategy, pipe, prompt, n, eos, max_positions)
    assert got.tokens == expected_tokens
    assert got.stop_reason == {"eos": "eos", "budget": "length", "context": "context"}[rule] or (
        rule != "eos" and got.stop_reason == "eos")
    assert not held_resources(pipe)


class SecondGuessRight(DraftSource):
    """Proposes a wrong token first and the right one second at every position, so the accepted
    path of every tree runs through second children: never the first branch."""

    def __init__(self, truth: list[int], n_prompt: int, vocab: int):
        self.truth, self.n_prompt, self.vocab = truth, n_prompt, vocab

    def top(self, context, k):
        j = len(context) - self.n_prompt
        right = self.truth[j] if j < len(self.truth) else 0
        wrong = (right + 1) % self.vocab
        return [(wrong, 0.6), (right, 0.4)][:k]


@given(seed=st.integers(0, 2), n_stages=st.integers(1, 3), prompt=st.lists(st.integers(0, 30), min_size=1, max_size=5))
def test_tree_accepts_a_path_off_the_first_branch(seed, n_stages, prompt):
    truth = PAIR.truth(seed, tuple(prompt), 24)
    strategy = TreeStrategy(SecondGuessRight(truth + [0] * 10, len(prompt), 31), schedule=(2, 2, 2))
    pipe = LocalPipeline(PAIR.stage_models(seed, n_stages), n_seqs=strategy.n_seqs)
    got = generate(strategy, pipe, prompt, 24, max_positions=64)
    assert got.tokens == truth
    stats = got.metrics.extra["speculation"]
    assert stats.accepted >= len(truth) // 2  # (3 accepted + 1 bonus per verification of depth 3)
    assert not held_resources(pipe)


@given(data=st.data())
def test_every_strategy_frees_what_it_used(data):
    name = data.draw(st.sampled_from(STRATEGIES), label="strategy")
    seed = data.draw(st.integers(0, 2), label="seed")
    prompt = tuple(data.draw(st.lists(st.integers(0, 30), min_size=1, max_size=6), label="prompt"))
    n = data.draw(st.integers(1, 30), label="tokens")
    kind = data.draw(st.sampled_from(["model", "ngram", "never", "half", "always"]), label="draft")
    strategy = make_strategy(name, PAIR.make_draft(kind, seed, prompt, n))
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    pipe = LocalPipeline(PAIR.stage_models(seed, data.draw(st.integers(1, 4), label="stages")),
                         n_seqs=strategy.n_seqs, chooser=chooser)
    got = generate(strategy, pipe, prompt, n, max_positions=64)
    assert got.tokens == PAIR.truth(seed, prompt, n)
    assert not held_resources(pipe)
