"""Speculative strategies emit exactly the greedy tokens; the pieces they are built from behave.

Oracle: `generate_greedy` on the same target. Drafts range from always wrong to always right,
random models sharing the vocabulary, prompt lookup; trees from chains to wide schedules and
best-first budgets; 1-4 stages; the local runtime with hypothesis-chosen interleavings and the
process runtime.
"""

from __future__ import annotations


import numpy as np
from hypothesis import given, settings, strategies as st

from minipipe.draft import DraftModel, NgramDraft, OracleDraft
from minipipe.greedy import generate_greedy
from minipipe.metrics import SpeculationStats
from minipipe.runtime import LocalPipeline, open_pipeline
from minipipe.strategies import SpeculativeStrategy, TreeStrategy, generate
from minipipe.synthetic import make_random_checkpoint
from minipipe.tree import TokenTree

from .random_pairs import RandomPair
from .test_runtime import DrawChooser, assert_no_leaks
from .test_strategies import held_resources

TARGET = dict(dim=32, ffn_dim=48, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=29, max_positions=80)
DRAFT = dict(dim=16, ffn_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=29, max_positions=80)
PAIR = RandomPair(TARGET, DRAFT, draft_seed=100)
stage_models, truth, make_draft = PAIR.stage_models, PAIR.truth, PAIR.make_draft


schedules = st.lists(st.integers(1, 3), min_size=1, max_size=5)


@given(data=st.data())
def test_speculative_strategies_equal_greedy(data):
    seed = data.draw(st.integers(0, 2), label="seed")
    n_stages = data.draw(st.integers(1, 4), label="stages")
    prompt = tuple(data.draw(st.lists(st.integers(0, 28), min_size=1, max_size=8), label="prompt"))
    n = data.draw(st.integers(1, 20), label="tokens")
    kind = data.draw(st.sampled_from(["model", "ngram", "self", "merged", "never", "always", "half"]), label="draft")
    draft = make_draft(kind, seed, prompt, n, n_stages)
    shape = data.draw(st.sampled_from(["chain", "schedule", "budget"]), label="tree shape")
    if shape == "chain":
        strategy = SpeculativeStrategy(draft, k=data.draw(st.integers(1, 8), label="k"),
                                       min_confidence=data.draw(st.sampled_from([0.0, 0.3]), label="cutoff"))
    elif shape == "schedule":
        strategy = TreeStrategy(draft, schedule=data.draw(schedules, label="schedule"))
    else:
        strategy = TreeStrategy(draft, budget=data.draw(st.integers(1, 8), label="budget"),
                                width=data.draw(st.integers(1, 3), label="width"))
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    pipe = LocalPipeline(stage_models(seed, n_stages), n_seqs=strategy.n_seqs, chooser=chooser)
    got = generate(strategy, pipe, prompt, n, max_positions=TARGET["max_positions"])
    assert got.tokens == truth(seed, prompt, n)
    stats = got.metrics.extra["speculation"]
    assert 0 <= stats.accepted <= stats.drafted
    if kind == "always" and shape == "chain" and n > 2:
        assert stats.accepted > 0
    if kind == "never" and shape == "chain":  # (a tree's second guess may be the right token)
        assert stats.accepted == 0


def test_real_pair_chain_and_tree(pair):
    """A real target with its real draft: some drafts accepted, some rejected, greedy's text."""
    from minipipe.model import load_stage

    prompt = list(pair.prompt)
    expected = generate_greedy(load_stage(pair.target), prompt, 60, pair.eos).tokens
    draft = load_stage(pair.draft)
    for runtime, n_stages, make in (("local", 3, lambda: SpeculativeStrategy(DraftModel(draft), k=5)),
                                    ("local", 2, lambda: TreeStrategy(DraftModel(draft))),
                                    ("process", 2, lambda: SpeculativeStrategy(DraftModel(draft), k=4)),
                                    ("process", 2, lambda: TreeStrategy(DraftModel(draft), budget=6))):
        strategy = make()
        with open_pipeline(pair.target, runtime, n_stages, n_seqs=strategy.n_seqs) as pipe:
            got = generate(strategy, pipe, prompt, 60, pair.eos, pair.max_positions)
        assert got.tokens == expected, (runtime, strategy.name)
        stats = got.metrics.extra["speculation"]
        assert 0 < stats.accepted < stats.drafted  # the draft is sometimes right, sometimes wrong
    assert_no_leaks()


def test_process_runtime_tree_on_random_checkpoint(tmp_path):
    d = make_random_checkpoint(tmp_path / "t", seed=0, **TARGET)
    prompt = (3, 1, 4, 1)
    strategy = TreeStrategy(make_draft("half", 0, prompt, 16), schedule=(2, 2, 1))
    with open_pipeline(d, "process", 3, n_seqs=strategy.n_seqs) as pipe:
        assert generate(strategy, pipe, prompt, 16, max_positions=80).tokens == truth(0, prompt, 16)
    assert_no_leaks()


# ------------------------------------------------------------------------------------------------
# the pieces


def test_verification_matches_children_by_parent():
    """A sibling subtree holding the target's token at the same depth must not be accepted."""
    tree = TokenTree(root_token=5)
    a = tree.add(0, 7, 0.5)  # depth 1
    b = tree.add(0, 8, 0.5)  # depth 1
    tree.add(a, 9, 0.5)  # depth 2 under 7
    b9 = tree.add(b, 9, 0.5)  # depth 2 under 8: same token, same depth, other parent
    targets = {0: 8, a: 1, b: 9, 3: 2, b9: 4}
    accepted, committed = tree.verify([targets[i] for i in range(len(tree))])
    assert accepted == [b, b9] and committed == [8, 9, 4]
    targets[0] = 7  # now the path goes through a; a's child 9 is not the target's 1
    accepted, committed = tree.verify([targets[i] for i in range(len(tree))])
    assert accepted == [a] and committed == [7, 1]


@given(schedule=schedules, seed=st.integers(0, 5))
def test_tree_batch_attention_is_the_ancestor_relation(schedule, seed):
    tree = TokenTree(0).expand_schedule(OracleDraft([1] * 10, 0.5, 29, seed), [2, 3], schedule)
    batch = tree.batch(root_pos=2, first_seq=1)
    mask = tree.attention_mask()
    for i in range(len(tree)):
        for j in range(len(tree)):
            sees = bool(set(batch.seq_ids[i]) & set(batch.seq_ids[j])) and batch.positions[j] <= batch.positions[i]
            assert sees == mask[i, j], (i, j)
    assert len(tree.leaves()) <= int(np.prod(schedule))


def test_ngram_draft_example():
    draft = NgramDraft(max_n=3)
    assert draft.top([1, 2, 3, 4, 2, 3], 1)[0][0] == 4
    assert [t for t, _ in draft.propose_chain([1, 2, 3, 4, 2, 3], 3)] == [4, 2, 3]
    assert draft.top([5, 6, 7], 2) == []


def test_oracle_acceptance_is_controlled():
    truth_tokens = list(range(3, 203))
    for p in (0.0, 0.3, 0.9, 1.0):
        oracle = OracleDraft(truth_tokens, p, 1000, seed=1)
        oracle.reset([1])
        right = sum(oracle.top([1] + truth_tokens[:j], 1)[0][0] == truth_tokens[j] for j in range(200))
        assert abs(right / 200 - p) < 0.1


def test_draft_model_reuses_its_cache_exactly():
    model = PAIR.draft_model(0)
    reused = DraftModel(model)
    contexts = [[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 9], [1, 2, 9, 4], [1, 2, 3, 4, 5, 6]]
    for ctx in contexts:
        fresh = DraftModel(model).distribution(ctx)
        assert np.array_equal(reused.distribution(ctx), fresh)


def test_speculation_stats():
    s = SpeculationStats()
    s.record(n_drafted=4, depth=4, n_accepted=2)
    s.record(n_drafted=2, depth=2, n_accepted=2)
    d = s.to_dict()
    assert d["acceptance_rate"] == round(4 / 6, 4) and d["tokens_per_verification"] == 3.0
    assert d["per_position_acceptance"] == [1.0, 1.0, 0.0, 0.0]


def test_mismatched_draft_vocabulary_is_refused(tmp_path):
    import subprocess
    import sys

    target = make_random_checkpoint(tmp_path / "t", seed=0, **TARGET)
    draft = make_random_checkpoint(tmp_path / "d", seed=1, **{**DRAFT, "vocab_size": 300})
    r = subprocess.run([sys.executable, "-m", "minipipe", "generate", "--prompt-ids", "3,4", "--model", str(target),
                        "--strategy", "speculative", "--draft", str(draft), "--max-new-tokens", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "a draft must share the target's tokenizer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@settings(max_examples=10)
@given(seed=st.integers(0, 50))
def test_multibuffer_is_used_consistently(seed):
    """After a generation every partition is free again and no cell is held."""
    strategy = TreeStrategy(make_draft("half", 0, (3, 4), 12), schedule=(2, 1, 2))
    pipe = LocalPipeline(stage_models(0, 2), n_seqs=strategy.n_seqs)
    generate(strategy, pipe, (3, 4), 12, max_positions=80)
    assert not held_resources(pipe)
