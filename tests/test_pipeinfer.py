"""PipeInfer emits exactly the greedy tokens, under every interleaving hypothesis finds.

The local runtime in chooser mode lets hypothesis decide which stage moves and how far the
stages get while the head drafts, launches and cancels — so cancellations land before a stage
starts a run, between its layers, and after it finished. Drafts range from always wrong to
always right; knobs, branch counts and stage counts are drawn too.
"""

from __future__ import annotations

from hypothesis import event, given, settings, strategies as st

from minipipe.draft import DraftModel
from minipipe.greedy import generate_greedy
from minipipe.runtime import LocalPipeline, RandomChooser, open_pipeline
from minipipe.strategies import PipeInferStrategy, generate
from minipipe.synthetic import make_random_checkpoint

from .random_pairs import RandomPair
from .test_runtime import DrawChooser, assert_no_leaks
from .test_strategies import held_resources

TARGET = dict(dim=32, ffn_dim=48, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=23, max_positions=96)
DRAFT = dict(dim=16, ffn_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=23, max_positions=96)
PAIR = RandomPair(TARGET, DRAFT, draft_seed=200)
stage_models, truth, make_draft = PAIR.stage_models, PAIR.truth, PAIR.make_draft


@given(data=st.data())
def test_pipeinfer_equals_greedy_under_any_interleaving(data):
    seed = data.draw(st.integers(0, 2), label="seed")
    n_stages = data.draw(st.integers(1, 6), label="stages")
    prompt = tuple(data.draw(st.lists(st.integers(0, 22), min_size=1, max_size=8), label="prompt"))
    n = data.draw(st.integers(1, 24), label="tokens")
    kind = data.draw(st.sampled_from(["model", "ngram", "self", "merged", "never", "always", "half", "mostly"]),
                     label="draft")
    strategy = PipeInferStrategy(
        make_draft(kind, seed, prompt, n, n_stages),
        p_accept=data.draw(st.sampled_from([0.0, 0.2, 0.5, 0.9]), label="p_accept"),
        p_split=data.draw(st.sampled_from([0.0, 0.1, 0.3]), label="p_split"),
        p_recovery=data.draw(st.sampled_from([0.0, 0.1, 0.3]), label="p_recovery"),
        p_decay=data.draw(st.sampled_from([0.0, 0.05]), label="p_decay"),
        n_draft=data.draw(st.integers(1, 6), label="n_draft"),
        branches=data.draw(st.integers(1, 3), label="branches"),
        max_inflight=data.draw(st.integers(1, 8), label="max_inflight"))
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    pipe = LocalPipeline(stage_models(seed, n_stages), n_seqs=strategy.n_seqs, chooser=chooser)
    got = generate(strategy, pipe, prompt, n, max_positions=TARGET["max_positions"])
    assert got.tokens == truth(seed, prompt, n)
    stats = got.metrics.extra["speculation"]
    if stats.runs_cancelled:
        event("some runs cancelled")
    if any(s.stats.cancelled_mid_run for s in pipe.stages):
        event("a cancellation landed between layers")
    assert not held_resources(pipe)


def test_cancellations_land_before_during_and_after_a_stage():
    """Across seeds, each landing point occurs at some stage, and every run still yields greedy's tokens.

    before: a stage skips a cancelled run without computing any of it; between layers: a stage
    stops part-way; after: a stage had finished the run when the head cancelled it.
    """
    from minipipe.trace import Tracer

    landed = {"before": 0, "between layers": 0, "after": 0}
    for seed in range(12):
        prompt = (seed % 5, 3, 7)
        strategy = PipeInferStrategy(make_draft("half", 0, prompt, 20), p_accept=0.0, n_draft=3, max_inflight=6)
        tracer = Tracer()
        pipe = LocalPipeline(stage_models(0, 3), n_seqs=strategy.n_seqs, chooser=RandomChooser(seed, max_budget=4),
                             tracer=tracer)
        assert generate(strategy, pipe, prompt, 20, max_positions=96).tokens == truth(0, prompt, 20)
        cancelled = {e.run_id for e in tracer.events if e.track == "head" and e.kind == "cancel"}
        finished = [e.run_id for e in tracer.events if e.track.startswith("stage") and e.kind == "run"]
        landed["between layers"] += sum(s.stats.cancelled_mid_run for s in pipe.stages)
        landed["before"] += sum(s.stats.runs_cancelled - s.stats.cancelled_mid_run for s in pipe.stages)
        landed["after"] += sum(run_id in cancelled for run_id in finished)
    assert all(landed.values()), landed


def test_pipeinfer_on_the_clock_and_in_processes(tmp_path):
    prompt = (3, 1, 4)
    for kind, branches in (("mostly", 1), ("model", 3)):
        strategy = PipeInferStrategy(make_draft(kind, 1, prompt, 30), p_accept=0.1, n_draft=4, branches=branches)
        pipe = LocalPipeline(stage_models(1, 4), n_seqs=strategy.n_seqs)
        assert generate(strategy, pipe, prompt, 30, max_positions=96).tokens == truth(1, prompt, 30)
    d = make_random_checkpoint(tmp_path / "t", seed=1, **TARGET)
    for n_stages in (2, 3):
        strategy = PipeInferStrategy(make_draft("mostly", 1, prompt, 30), p_accept=0.0, n_draft=3, max_inflight=6)
        with open_pipeline(d, "process", n_stages, n_seqs=strategy.n_seqs) as pipe:
            assert generate(strategy, pipe, prompt, 30, max_positions=96).tokens == truth(1, prompt, 30)
    assert_no_leaks()


def test_pipeinfer_on_a_real_pair(pair):
    from minipipe.model import load_stage

    prompt = list(pair.prompt)
    expected = generate_greedy(load_stage(pair.target), prompt, 60, pair.eos).tokens
    draft = load_stage(pair.draft)
    for runtime, n_stages, branches in (("local", 5, 2), ("process", 2, 1), ("process", 3, 3)):
        strategy = PipeInferStrategy(DraftModel(draft), p_accept=0.3, n_draft=4, branches=branches)
        with open_pipeline(pair.target, runtime, n_stages, n_seqs=strategy.n_seqs) as pipe:
            got = generate(strategy, pipe, prompt, 60, pair.eos, pair.max_positions)
        assert got.tokens == expected, (runtime, n_stages)
    assert_no_leaks()


@settings(max_examples=5)
@given(seed=st.integers(0, 100))
def test_stop_rules_match_greedy(seed):
    """eos inside an accepted chain, the token budget, and the context limit cut exactly where greedy does."""
    prompt = (1, 2)
    free = truth(0, prompt, 30)
    eos = free[7]
    strategy = PipeInferStrategy(make_draft("always", 0, prompt, 30), p_accept=0.0, n_draft=5)
    pipe = LocalPipeline(stage_models(0, 2), n_seqs=strategy.n_seqs, chooser=RandomChooser(seed))
    got = generate(strategy, pipe, prompt, 30, eos_ids=[eos], max_positions=96)
    assert got.tokens == free[: free.index(eos) + 1] and got.stop_reason == "eos"
    strategy = PipeInferStrategy(make_draft("always", 0, prompt, 30), p_accept=0.0, n_draft=5)
    pipe = LocalPipeline(stage_models(0, 2), n_seqs=strategy.n_seqs, chooser=RandomChooser(seed))
    got = generate(strategy, pipe, prompt, 30, max_positions=12)
    assert got.tokens == free[:11] and got.stop_reason == "context"
