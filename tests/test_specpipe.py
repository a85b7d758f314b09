"""SpecPipe emits exactly the greedy tokens under any interleaving, draft, width and stage count;
pruned rows are dropped by the stages and every cell of the tree is freed again."""

from __future__ import annotations

from hypothesis import event, given, strategies as st

from minipipe.draft import DraftModel
from minipipe.greedy import generate_greedy
from minipipe.runtime import LocalPipeline, RandomChooser, open_pipeline
from minipipe.strategies import SpecPipeStrategy, generate
from minipipe.synthetic import make_random_checkpoint

from .random_pairs import RandomPair
from .test_runtime import DrawChooser, assert_no_leaks
from .test_strategies import held_resources

TARGET = dict(dim=32, ffn_dim=48, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=23, max_positions=96)
DRAFT = dict(dim=16, ffn_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=23, max_positions=96)
PAIR = RandomPair(TARGET, DRAFT, draft_seed=300)
stage_models, truth, make_draft = PAIR.stage_models, PAIR.truth, PAIR.make_draft


@given(data=st.data())
def test_specpipe_equals_greedy_under_any_interleaving(data):
    seed = data.draw(st.integers(0, 2), label="seed")
    n_stages = data.draw(st.integers(1, 8), label="stages")
    prompt = tuple(data.draw(st.lists(st.integers(0, 22), min_size=1, max_size=8), label="prompt"))
    n = data.draw(st.integers(1, 24), label="tokens")
    kind = data.draw(st.sampled_from(["model", "ngram", "self", "merged", "never", "always", "half", "mostly"]),
                     label="draft")
    strategy = SpecPipeStrategy(make_draft(kind, seed, prompt, n, n_stages),
                                width=data.draw(st.integers(1, 4), label="width"),
                                max_nodes=data.draw(st.sampled_from([16, 64]), label="max nodes"),
                                min_path=data.draw(st.sampled_from([0.0, 0.3]), label="min path"))
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    pipe = LocalPipeline(stage_models(seed, n_stages), n_seqs=strategy.n_seqs, chooser=chooser)
    got = generate(strategy, pipe, prompt, n, max_positions=TARGET["max_positions"])
    assert got.tokens == truth(seed, prompt, n)
    if sum(s.stats.rows_pruned for s in pipe.stages):
        event("pruned rows were dropped by a stage")
    if got.metrics.extra["speculation"].misses:
        event("a miss refilled the pipeline")
    assert not held_resources(pipe)


def test_pruning_drops_rows_and_saves_work():
    dropped = computed = 0
    for seed in range(6):
        prompt = (seed, 4, 2)
        strategy = SpecPipeStrategy(make_draft("half", 0, prompt, 24), width=3)
        pipe = LocalPipeline(stage_models(0, 4), n_seqs=strategy.n_seqs, chooser=RandomChooser(seed))
        got = generate(strategy, pipe, prompt, 24, max_positions=96)
        assert got.tokens == truth(0, prompt, 24)
        dropped += sum(s.stats.rows_pruned for s in pipe.stages)
        computed += sum(s.stats.layers_computed for s in pipe.stages)
        stats = got.metrics.extra["speculation"]
        assert stats.hits and stats.pruned
    assert dropped > 0


def test_specpipe_in_processes_and_on_the_clock(tmp_path):
    prompt = (3, 1, 4)
    for width in (1, 3):
        strategy = SpecPipeStrategy(make_draft("mostly", 1, prompt, 30), width=width)
        pipe = LocalPipeline(stage_models(1, 8), n_seqs=strategy.n_seqs)
        assert generate(strategy, pipe, prompt, 30, max_positions=96).tokens == truth(1, prompt, 30)
    d = make_random_checkpoint(tmp_path / "t", seed=1, **TARGET)
    for n_stages in (2, 4):
        strategy = SpecPipeStrategy(make_draft("mostly", 1, prompt, 30), width=2)
        with open_pipeline(d, "process", n_stages, n_seqs=strategy.n_seqs) as pipe:
            assert generate(strategy, pipe, prompt, 30, max_positions=96).tokens == truth(1, prompt, 30)
    assert_no_leaks()


def test_specpipe_on_a_real_pair(pair):
    from minipipe.model import load_stage

    prompt = list(pair.prompt)
    expected = generate_greedy(load_stage(pair.target), prompt, 60, pair.eos).tokens
    draft = load_stage(pair.draft)
    for runtime, n_stages, width in (("local", 5, 3), ("process", 2, 2), ("process", 3, 1)):
        strategy = SpecPipeStrategy(DraftModel(draft), width=width)
        with open_pipeline(pair.target, runtime, n_stages, n_seqs=strategy.n_seqs) as pipe:
            got = generate(strategy, pipe, prompt, 60, pair.eos, pair.max_positions)
        assert got.tokens == expected, (runtime, n_stages, width)
        stats = got.metrics.extra["speculation"]
        assert stats.hits and stats.misses  # the draft both hits and misses
    assert_no_leaks()
