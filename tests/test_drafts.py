"""Drafts for real checkpoints, merged trees, the draft's own lane, calibrated confidence and
backoff, trees of a thousand leaves, and the draft server.

Oracles: greedy decoding (`generate_greedy`) for every strategy's tokens; a model loaded from
the checkpoint with only its first K layers (and the head) for self-drafts; plain set algebra on
root-to-node paths for tree merging; hand-counted hits and tries for the calibration.
The property tests that draw self:K and merged drafts for every strategy, greedy and sampled,
are in test_speculation, test_pipeinfer, test_specpipe, test_engine and test_sampling (draft
kinds "self" and "merged").
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipipe.config import load_config
from minipipe.draft import DraftModel, MergedDraft, NgramDraft, OracleDraft, build_draft, merge_guesses, \
    self_draft_model
from minipipe.drafter import Backoff, Calibration
from minipipe.errors import InputError
from minipipe.events import Drafted, Launched
from minipipe.greedy import generate_greedy
from minipipe.model import StageModel, load_stage
from minipipe.runtime import LocalPipeline, open_pipeline
from minipipe.sampling import Sampling
from minipipe.strategies import (PipeInferStrategy, SpecPipeStrategy, SpeculativeStrategy, TreeStrategy, generate,
                                 largest_run)
from minipipe.synthetic import make_random_checkpoint, random_model
from minipipe.tree import TokenTree
from minipipe.weights import Checkpoint, load_stage_weights

from .random_pairs import RandomPair
from .test_runtime import assert_no_leaks
from .test_strategies import held_resources

TARGET = dict(dim=32, ffn_dim=48, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=29, max_positions=96)
DRAFT = dict(dim=16, ffn_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=29, max_positions=96)
PAIR = RandomPair(TARGET, DRAFT, draft_seed=700)


# ----------------------------------------------------------------------------------------------
# self:K


@pytest.mark.parametrize("k, n_stages", [(1, 1), (2, 2), (3, 2)])
def test_self_draft_shares_the_targets_weights_and_is_its_first_layers(tmp_path, k, n_stages):
    """The draft's arrays are the stages' own (no copy), and its logits are bit for bit those of
    a model holding only the checkpoint's first k layers and its head."""
    d = make_random_checkpoint(tmp_path / "t", seed=3, **TARGET)
    from minipipe.runtime import load_stage_models, split_layers

    stages = load_stage_models(d, split_layers(TARGET["n_layers"], n_stages))
    draft = self_draft_model(stages, k)
    assert draft.weights.layers[0].wqkv is stages[0].weights.layers[0].wqkv
    assert draft.weights.head is stages[-1].weights.head and draft.weights.embed is stages[0].weights.embed
    config = load_config(d)
    reference = StageModel(load_stage_weights(Checkpoint(d), config, 0, k, with_embed=True, with_head=True))
    context = [3, 1, 4, 1, 5, 9, 2, 6]
    got = DraftModel(draft).distribution(context)
    want = DraftModel(reference).distribution(context)
    assert np.array_equal(got, want)
    loaded = build_draft(f"self:{k}", d, config)  # no stages in this process: loaded from the checkpoint
    assert np.array_equal(loaded.distribution(context), want)


@pytest.mark.parametrize("spelling", ["self:0", "self:4", "self:x", "self:-1"])
def test_bad_self_spellings_are_refused(tmp_path, spelling):
    d = make_random_checkpoint(tmp_path / "t", seed=3, **TARGET)
    with pytest.raises(InputError, match="self-drafts are spelled self:K with K between 1 and 3"):
        build_draft(spelling, d, load_config(d))


def test_measured_self_agreement_is_the_self_drafts_own(tmp_path):
    """tools/measure_agreement.py measures every K in one pass of the target; each K's matches
    must be those of the real self:K draft run teacher-forced on its own."""
    spec = importlib.util.spec_from_file_location("measure_agreement", PAIR_TOOLS / "measure_agreement.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    target = random_model(seed=5, **TARGET)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # longer than one prefill chunk of 8? (canonical chunks)
    tokens = generate_greedy(target, prompt, 20).tokens
    many = tool.self_draft_matches(target, prompt, tokens, [1, 2, 3])
    for k in (1, 2, 3):
        assert np.array_equal(many[k], tool.draft_matches(self_draft_model([target], k), prompt, tokens))


# ----------------------------------------------------------------------------------------------
# merged drafts


trees = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3)), max_size=12)  # (parent choice, token)


def build_tree(spec) -> TokenTree:
    tree = TokenTree(0)
    for parent, token in spec:
        parent = parent % len(tree)
        if tree.match(parent, token) is None:
            tree.add(parent, token, 0.5)
    return tree


def paths(tree: TokenTree) -> set[tuple[int, ...]]:
    return {tuple(tree.tokens_to(i)) for i in range(len(tree))}


@given(a=trees, b=trees)
def test_merged_tree_holds_every_path_once(a, b):
    """SpecInfer's merge: the merged tree's root-to-node paths are the union of both trees', each
    once (shared prefixes merged), and children stay matched through their parents."""
    ta, tb = build_tree(a), build_tree(b)
    merged = build_tree(a).merge(tb)
    assert paths(merged) == paths(ta) | paths(tb)
    assert len(merged) == len(paths(merged))
    for i, node in enumerate(merged.nodes[1:], start=1):
        assert node.depth == merged.nodes[node.parent].depth + 1 and i in merged.nodes[node.parent].children


def test_merged_guesses_rank_by_the_best_claim():
    assert merge_guesses([[(5, 0.5), (6, 0.2)], [(6, 0.7), (7, 0.5)]], 3) == [(6, 0.7), (5, 0.5), (7, 0.5)]
    assert merge_guesses([[(5, 0.5)], []], 1) == [(5, 0.5)]


def test_merged_speculative_verifies_one_tree_of_every_sources_chain():
    """`speculative` with two sources sends one tree holding both chains, and stays exact."""
    seed, prompt, n = 1, (1, 2, 3), 16
    truth = PAIR.truth(seed, prompt, n)
    right = OracleDraft(truth + [0] * 30, 1.0, 29, seed=seed)
    wrong = OracleDraft(truth + [0] * 30, 0.0, 29, seed=seed)
    strategy = SpeculativeStrategy(MergedDraft([wrong, right]), k=3, min_confidence=0.0, calibrate=False)
    widths = []
    pipe = LocalPipeline(PAIR.stage_models(seed, 2), n_seqs=strategy.n_seqs)
    got = generate(strategy, pipe, prompt, n, max_positions=96,
                   listeners=[lambda e: widths.append(len(set(e.positions))) if isinstance(e, Launched)
                              and e.kind == "verify" else None])
    assert got.tokens == truth
    assert strategy.max_leaves == 2 and widths and max(widths) >= 2
    stats = got.metrics.extra["speculation"]
    assert stats.accepted >= n // 2  # the right source's chain is accepted although the wrong one comes first


# ----------------------------------------------------------------------------------------------
# calibrated confidence and backoff


def test_calibration_follows_what_the_target_committed():
    cal = Calibration(prior=1.0, memory=0.9)
    committed = [1, 2, 3]
    for step in range(30):  # always wrong with claim 1.0
        cal.guessed(committed, [(99, 1.0)])
        committed.append(step % 7)
        cal.settle(committed)
    assert cal.value(1.0) < 0.1
    for step in range(10):  # now always right
        cal.guessed(committed, [(5, 1.0)])
        committed.append(5)
        cal.settle(committed)
    assert cal.value(1.0) > 0.6
    before = cal.value(0.5)
    cal.guessed([7, 7, 7], [(1, 0.5)])  # its context is not the committed text: says nothing
    cal.settle(committed + [1])
    assert cal.value(0.5) == before


def test_backoff_waits_longer_after_each_empty_draft():
    b = Backoff(most=4)
    asked = []
    for chance in range(16):
        if b.ready():
            asked.append(chance)
            b.drafted(False)
    assert asked == [0, 2, 5, 10, 15]
    b.drafted(True)
    assert b.ready() and b.ready()


@pytest.mark.parametrize("name", ["speculative", "pipeinfer"])
def test_speculation_backs_off_when_drafts_are_not_accepted(name):
    """An always-wrong draft claiming certainty: calibrated, its claims soon fall below the cutoff
    and most chances pass without drafting; uncalibrated, it is believed every time. An
    always-right draft is believed. Tokens are greedy's throughout."""
    seed, prompt, n = 0, (4, 5, 6), 40
    truth = PAIR.truth(seed, prompt, n)

    def run(p, calibrate):
        draft = OracleDraft(truth + [0] * 30, p, 29, seed=seed)
        strategy = (SpeculativeStrategy(draft, k=4, calibrate=calibrate) if name == "speculative" else
                    PipeInferStrategy(draft, n_draft=4, max_inflight=4, calibrate=calibrate))
        got = generate(strategy, LocalPipeline(PAIR.stage_models(seed, 2), n_seqs=strategy.n_seqs), prompt, n,
                       max_positions=96)
        assert got.tokens == truth
        return got.metrics.extra["speculation"]

    wrong, believed = run(0.0, True), run(0.0, False)
    spec = lambda s: s if name == "speculative" else s.speculation  # noqa: E731
    assert spec(wrong).drafted * 4 < spec(believed).drafted
    right = spec(run(1.0, True))
    assert right.accepted == right.drafted and right.accepted > n // 2


# ----------------------------------------------------------------------------------------------
# the draft's own lane


@pytest.mark.parametrize("name", ["pipeinfer", "specpipe"])
def test_drafting_ahead_on_the_drafts_lane(name):
    """On the virtual clock with a lane, decoders draft ahead of need (SpecPipe: most of its
    questions; PipeInfer: when its runs in flight are at their cap), drafting is charged on the
    "draft" track (never the head's), and tokens are greedy's."""
    from minipipe.runtime.cost import CostModel
    from minipipe.trace import Tracer

    seed, prompt, n = 2, (3, 4), 30
    truth = PAIR.truth(seed, prompt, n)
    draft = OracleDraft(truth + [0] * 30, 0.9, 29, seed=seed)
    strategy = PipeInferStrategy(draft, max_inflight=2) if name == "pipeinfer" else SpecPipeStrategy(draft)
    tracer = Tracer()
    drafted = []
    pipe = LocalPipeline(PAIR.stage_models(seed, 4), n_seqs=strategy.n_seqs, cost=CostModel(), tracer=tracer)
    got = generate(strategy, pipe, prompt, n, max_positions=96,
                   listeners=[lambda e: drafted.append(e) if isinstance(e, Drafted) else None])
    assert got.tokens == truth
    assert sum(e.ahead for e in drafted) > (len(drafted) // 2 if name == "specpipe" else 0)
    tracks = {e.track for e in tracer.events if e.kind == "draft"}
    assert tracks == {"draft"}
    assert not held_resources(pipe)


# ----------------------------------------------------------------------------------------------
# trees that scale


@pytest.mark.parametrize("runtime", ["local", "process"])
def test_a_thousand_leaf_tree_verifies_exactly(tmp_path, runtime):
    """SpecInfer's tree with 10 x 10 x 10 = 1000 leaves (1111 rows, 1000 sequence ids in the
    root's row) in one verification: greedy's tokens, every cell freed."""
    prompt, n = [1, 2, 3, 4, 5], 10
    d = make_random_checkpoint(tmp_path / "t", seed=4, **{**TARGET, "vocab_size": 64})
    truth = generate_greedy(load_stage(d), prompt, n).tokens
    strategy = TreeStrategy(OracleDraft(truth + [0] * 30, 0.5, 64, seed=1), schedule=(10, 10, 10), calibrate=False)
    rows = []
    with open_pipeline(d, runtime, 2, n_seqs=strategy.n_seqs, max_rows=largest_run(strategy),
                       row_seqs=strategy.max_row_seqs()) as pipe:
        got = generate(strategy, pipe, prompt, n, max_positions=96,
                       listeners=[lambda e: rows.append(len(e.tokens)) if isinstance(e, Launched) else None])
        if runtime == "local":
            assert not held_resources(pipe)
    assert got.tokens == truth
    assert max(rows) == 1111
    if runtime == "process":
        assert_no_leaks()


# ----------------------------------------------------------------------------------------------
# the draft server


@pytest.mark.parametrize("name", ["pipeinfer", "specpipe"])
def test_draft_server_drafts_ahead_and_stays_exact(tmp_path, name):
    """The draft in a process of its own (a draft model, the target's first layer and n-grams,
    merged), greedy and sampled, on the process runtime: sequential decoding's tokens. Drafting
    ahead happens: PipeInfer with one run in flight is at its cap after every launch, so it sends
    its next run's drafting to the server each time it has a plan; SpecPipe drafts the next
    layer under every layer it sends, and uses those answers. (Whether PipeInfer's next plan
    survives the answer that arrives meanwhile depends on timing, so its hits are not counted.)"""
    from minipipe.draft_server import DraftServer

    target = make_random_checkpoint(tmp_path / "t", seed=0, **TARGET)
    draft_dir = make_random_checkpoint(tmp_path / "d", seed=1, **DRAFT)
    prompt, n = (1, 2, 3), 20
    for sampling in (None, Sampling(0.8, top_p=0.9, seed=42)):
        want = generate_greedy(load_stage(target), prompt, n, sampling=sampling).tokens
        with DraftServer(f"{draft_dir}+self:1+ngram", target) as server:
            strategy = (PipeInferStrategy(server.source, max_inflight=1) if name == "pipeinfer"
                        else SpecPipeStrategy(server.source, width=2))
            drafted = []
            with open_pipeline(target, "process", 2, n_seqs=strategy.n_seqs) as pipe:
                got = generate(strategy, pipe, prompt, n, max_positions=96, sampling=sampling,
                               listeners=[lambda e: drafted.append(e) if isinstance(e, Drafted) else None])
            assert got.tokens == want
            assert server.ahead_sent > 0
            if name == "specpipe":
                assert sum(e.ahead for e in drafted) > 0
    assert_no_leaks()


def test_draft_server_drafts_a_burst_of_requests_in_one_forward(tmp_path):
    """The server takes every message the head has sent meanwhile and computes the questions of
    all their SpecPipe-style jobs (and plain questions) in one forward of the shared pool; each
    job then finds its answers in memory, the same answers as alone."""
    from minipipe.draft_server import _prefetch_together, _Recorder
    from minipipe.drafter import top_many_job

    draft_dir = make_random_checkpoint(tmp_path / "d", seed=1, **DRAFT)
    draft = DraftModel(load_stage(draft_dir))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    forks = {i: draft.fork(p) for i, p in enumerate(prompts)}
    batch = [("ahead", 0, top_many_job, ([[1, 2, 3, 10], [1, 2, 3, 11]], 2), None),
             ("top", 1, [[4, 5, 12]], 2),
             ("fork", 3, [1], None),  # (not a question)
             ("ahead", 2, top_many_job, ([[6, 7, 8, 9, 13]], 2), None)]
    forwards = draft.pool.forwards
    assert _prefetch_together(batch, forks) > 0
    assert draft.pool.forwards == forwards + 1  # one forward for three requests
    for msg in (m for m in batch if m[0] == "ahead"):
        fork, rows = forks[msg[1]], forks[msg[1]].tokens_computed
        recorder = _Recorder(fork, None)
        top_many_job(recorder, *msg[3])
        assert fork.tokens_computed == rows  # answered from memory
        alone = DraftModel(load_stage(draft_dir)).fork(prompts[msg[1]])
        for (context, k), guesses in recorder.answers.items():
            assert guesses == alone.top(list(context), k)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_the_pools_batched_answers_are_the_drafts_own(data):
    """Questions of several requests answered in batched forwards of the shared pool (suffixes
    of several tokens, shorter contexts of a text asked later, questions asked twice) give the
    guesses of the draft asked alone, and a shorter context of a text the pool has computed is
    answered without a new row."""
    model = PAIR.draft_model(0)
    draft = DraftModel(model)
    prompts = [[1, 2, 3], [4, 5], [6]]
    forks = [draft.fork(p) for p in prompts]
    texts = [list(p) for p in prompts]  # each request's text so far
    for _ in range(data.draw(st.integers(1, 4), label="batches")):
        queries = []
        for i in data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=5), label="requests asked"):
            texts[i] += data.draw(st.lists(st.integers(0, 28), max_size=3), label="new tokens")
            cut = data.draw(st.integers(0, 2), label="shorter by")
            queries.append((forks[i], texts[i][: max(len(prompts[i]), len(texts[i]) - cut)]))
        draft.pool.prefetch(queries)
        for fork, context in queries:
            alone = DraftModel(model).fork(context[:1])
            assert fork.top(context, 3) == alone.top(context, 3)
    fork = draft.fork([7, 8])  # a suffix of three tokens: the two shorter contexts come from memory
    draft.pool.prefetch([(fork, [7, 8, 9, 10, 11])])
    rows = fork.tokens_computed
    for context in ([7, 8, 9], [7, 8, 9, 10], [7, 8, 9, 10, 11]):
        assert fork.top(context, 3) == DraftModel(model).fork([7]).top(context, 3)
    assert fork.tokens_computed == rows


def test_draft_server_reports_a_bad_draft_in_one_line(tmp_path):
    from minipipe.draft_server import DraftServer
    from minipipe.errors import MinipipeError

    target = make_random_checkpoint(tmp_path / "t", seed=0, **TARGET)
    with pytest.raises(MinipipeError, match="self-drafts are spelled"):
        DraftServer("self:9", target)


PAIR_TOOLS = __import__("pathlib").Path(__file__).resolve().parents[1] / "tools"


def test_offline_acceptance_equals_a_real_tree_verification():
    """benchmarks/bench_drafts.py counts acceptance without running the target per tree; its
    counts must be those of the `tree` strategy run for real, merged sources included."""
    spec = importlib.util.spec_from_file_location("bench_drafts", PAIR_TOOLS.parent / "benchmarks" / "bench_drafts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seed, prompt, n = 1, (2, 7, 1, 8), 30
    truth = PAIR.truth(seed, prompt, n)
    for draft in (DraftModel(PAIR.draft_model(seed)),
                  MergedDraft([DraftModel(PAIR.draft_model(seed)), NgramDraft(), PAIR.self_draft(seed, 1, k=2)])):
        strategy = TreeStrategy(draft, schedule=(1, 2, 1), calibrate=False)
        real = generate(strategy, LocalPipeline(PAIR.stage_models(seed, 2), n_seqs=strategy.n_seqs), prompt, n,
                        max_positions=96).metrics.extra["speculation"].to_dict()
        offline = bench.simulate(strategy, list(prompt), truth)
        assert (offline["verifications"], offline["accepted"]) == (real["verifications"], real["accepted"])
