"""The engine serves many requests at once, each exactly as greedy decoding would decode it alone.

Oracle: `generate_greedy` of each request by itself. Hypothesis draws arrival schedules of 1-12
requests of different lengths, every strategy, 1-4 stages, drafts from always wrong to always
right, interleavings (chooser mode) or the virtual clock, KV budgets that make requests wait,
and aborts; after everything, every cell and sequence of every stage's cache is free.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, strategies as st

from minipipe.draft import DraftModel, NgramDraft, OracleDraft
from minipipe.engine import Engine
from minipipe.errors import InputError
from minipipe.request import Request
from minipipe.runtime import LocalPipeline, open_pipeline
from minipipe.synthetic import make_random_checkpoint

from .random_pairs import ORACLE_P, RandomPair
from .test_runtime import DrawChooser, assert_no_leaks
from .test_strategies import STRATEGIES, held_resources, make_strategy

TARGET = dict(dim=32, ffn_dim=48, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=31, max_positions=64)
DRAFT = dict(dim=16, ffn_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=31, max_positions=64)
PAIR = RandomPair(TARGET, DRAFT, draft_seed=400)
MAX_NEW = 24


def shared_draft(kind: str, seed: int):
    """One draft source for every request (each request forks its own state from it)."""
    if kind == "model":
        return DraftModel(PAIR.draft_model(seed))
    if kind == "ngram":
        return NgramDraft()
    if kind in ("self", "merged"):
        return PAIR.make_draft(kind, seed, (), MAX_NEW)
    return OracleDraft(lambda prompt, sampling: PAIR.truth(seed, tuple(prompt), MAX_NEW) + [0] * 30, ORACLE_P[kind],
                       PAIR.vocab_size, seed=seed)


requests_st = st.lists(st.tuples(st.lists(st.integers(0, 30), min_size=1, max_size=7),  # prompt
                                 st.integers(0, MAX_NEW),  # max_new_tokens
                                 st.integers(0, 40)),  # arrival (steps or 0.1 ms units)
                       min_size=1, max_size=12)


def oracle(seed: int, prompt, n: int) -> list[int]:
    return PAIR.truth(seed, tuple(prompt), MAX_NEW)[:n]


@given(data=st.data())
def test_every_request_equals_greedy_alone(data):
    name = data.draw(st.sampled_from(STRATEGIES), label="strategy")
    seed = data.draw(st.integers(0, 2), label="seed")
    kind = data.draw(st.sampled_from(["model", "ngram", "self", "merged", "never", "half", "always"]), label="draft")
    specs = data.draw(requests_st, label="requests")
    n_stages = data.draw(st.integers(1, 4), label="stages")
    max_running = data.draw(st.integers(1, 6), label="max running")
    strategy = make_strategy(name, shared_draft(kind, seed))
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    unit = 1.0 if chooser is not None else 1e-4  # chooser time counts stage steps
    pipe = LocalPipeline(PAIR.stage_models(seed, n_stages), n_seqs=Engine.n_seqs(strategy, max_running),
                         chooser=chooser)
    budget = data.draw(st.sampled_from([None, 1.0, 2.5]), label="kv budget (x the largest need)")
    engine = Engine(pipe, strategy, max_running=max_running, max_positions=TARGET["max_positions"])
    if budget is not None:
        engine.kv_cells = int(budget * max(engine.reservation(Request(0, p, n)) for p, n, _ in specs))
    requests = [engine.add(Request(i, prompt, n, arrival_s=t * unit)) for i, (prompt, n, t) in enumerate(specs)]
    aborted = set()
    if data.draw(st.booleans(), label="abort some"):
        for _ in range(data.draw(st.integers(1, 4), label="turns before the abort")):
            if engine.idle():
                break
            engine.step()
        victim = data.draw(st.sampled_from(requests), label="aborted request")
        if engine.abort(victim.id):
            aborted.add(victim.id)
            event("a request was aborted")
    peak = 0
    while not engine.idle() and (engine.waiting or engine.running):
        engine.step()
        peak = max(peak, max(s.cache.n_used for s in pipe.stages))
        if engine.kv_cells is not None:
            assert engine.reserved <= engine.kv_cells
    engine.run()
    for r in requests:
        got = r.result()
        if r.id in aborted:
            assert got.stop_reason == "aborted" or got.tokens == oracle(seed, r.prompt, r.max_new_tokens)
            assert got.tokens == oracle(seed, r.prompt, r.max_new_tokens)[: len(got.tokens)]
        else:
            assert got.tokens == oracle(seed, r.prompt, r.max_new_tokens), r.id
    if engine.kv_cells is not None:
        assert peak <= engine.kv_cells
        if any(r.queued_s and r.queued_s > 0 for r in requests):
            event("a request waited for KV room")
    assert not held_resources(pipe)
    assert sorted(engine.free_blocks) == list(range(max_running)) and engine.reserved == 0


def test_rows_of_several_requests_share_micro_batches():
    """With 4 requests on 2 stages, continuous batching puts several requests' rows in one run;
    SpecPipe-DB puts every request's tree layer into each micro-batch."""
    from minipipe.events import Launched
    from minipipe.trace import Tracer

    prompts = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]]
    for name in ("pipeline", "specpipe"):
        strategy = make_strategy(name, shared_draft("half", 0))
        tracer = Tracer()
        pipe = LocalPipeline(PAIR.stage_models(0, 2), n_seqs=Engine.n_seqs(strategy, 4), tracer=tracer)
        engine = Engine(pipe, strategy, max_running=4, max_positions=64)
        requests = [engine.add(Request(i, p, 12)) for i, p in enumerate(prompts)]
        engine.run()
        for r in requests:
            assert r.result().tokens == oracle(0, r.prompt, 12)
        rows = [e.args["rows"] for e in tracer.events if e.track == "stage 0" and e.kind == "run"]
        shared = sum(1 for n in rows if n >= 2 * (2 if name == "specpipe" else 1))
        assert shared >= 5, (name, rows)  # micro-batches carrying rows of two or more requests


def test_specpipe_db_drafts_every_requests_next_layer_in_one_forward():
    """SpecPipe-DB on the draft's lane: the next layer under every request's newest nodes is
    drafted in one batched forward (`Head.ahead_batch`), not one forward per request. Same
    tokens either way; counted against the per-request path on the same requests."""
    from minipipe.trace import Tracer

    prompts = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]]
    from minipipe.events import Drafted

    lane_forwards, ahead = {}, {}
    for batched in (True, False):
        strategy = make_strategy("specpipe", DraftModel(PAIR.draft_model(0)))
        strategy.row_cost = 0.0  # no load bar: every request keeps a full wavefront to draft for
        tracer = Tracer()
        pipe = LocalPipeline(PAIR.stage_models(0, 2), n_seqs=Engine.n_seqs(strategy, 4), tracer=tracer)
        drafted = []
        engine = Engine(pipe, strategy, max_running=4, max_positions=64,
                        listeners=[lambda e: drafted.append(e) if isinstance(e, Drafted) else None])
        if not batched:
            engine.head.ahead_batch = None  # each request's questions answered on their own
        requests = [engine.add(Request(i, p, 12)) for i, p in enumerate(prompts)]
        engine.run()
        for r in requests:
            assert r.result().tokens == oracle(0, r.prompt, 12)
        assert not held_resources(pipe)
        lane_forwards[batched] = sum(1 for e in tracer.events if e.track == "draft")
        ahead[batched] = sum(e.ahead for e in drafted)  # questions whose answers were drafted ahead
    assert lane_forwards[True] <= 0.5 * lane_forwards[False], lane_forwards
    assert ahead[True] >= 0.8 * ahead[False] > 0, ahead  # ... and the answers are still there ahead of need


def test_specpipe_db_trees_narrow_with_load():
    """With several requests sharing each step, SpecPipe-DB sends fewer rows per committed token
    than the same requests would with no load bar (`SpecPipeDecoder.load_bar`), and one request
    alone is not narrowed; the tokens are greedy decoding's either way."""
    from minipipe.events import Committed, Launched

    prompts = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10], [11, 12], [13], [14, 15, 16], [17, 18]]

    def rows_per_token(n_requests: int, row_cost: float) -> float:
        strategy = make_strategy("specpipe", DraftModel(PAIR.draft_model(0)))
        strategy.row_cost = row_cost
        pipe = LocalPipeline(PAIR.stage_models(0, 4), n_seqs=Engine.n_seqs(strategy, n_requests))
        counts = {"rows": 0, "tokens": 0}

        def count(e):
            if isinstance(e, Launched) and e.kind == "tree layer":
                counts["rows"] += len(e.tokens)
            elif isinstance(e, Committed):
                counts["tokens"] += len(e.tokens)

        engine = Engine(pipe, strategy, max_running=n_requests, max_positions=64, listeners=[count])
        requests = [engine.add(Request(i, p, 16)) for i, p in enumerate(prompts[:n_requests])]
        engine.run()
        for r in requests:
            assert r.result().tokens == oracle(0, r.prompt, 16)
        assert not held_resources(pipe)
        return counts["rows"] / counts["tokens"]

    assert rows_per_token(1, 0.47) == rows_per_token(1, 0.0)  # no bar with one request
    loaded, unbarred = rows_per_token(8, 0.47), rows_per_token(8, 0.0)
    assert loaded <= 0.8 * unbarred, (loaded, unbarred)


def test_a_request_that_arrives_while_a_turn_sends_edits_is_admitted():
    """Found by hypothesis: with time counting stage steps, a request retired at admission
    (no tokens to generate) sends KV edits that take a step, so the next request arrives during
    that turn, with room for it; the engine must admit it next turn, not call it stuck."""
    from minipipe.runtime import RandomChooser

    strategy = make_strategy("pipeline", None)
    pipe = LocalPipeline(PAIR.stage_models(0, 1), n_seqs=Engine.n_seqs(strategy, 1), chooser=RandomChooser(0))
    engine = Engine(pipe, strategy, max_running=1, max_positions=64)
    requests = [engine.add(Request(i, [0], n, arrival_s=t)) for i, (n, t) in enumerate([(0, 0), (0, 1), (3, 1)])]
    engine.run()
    assert [r.result().tokens for r in requests] == [[], [], oracle(0, [0], 3)]
    assert not held_resources(pipe)


def test_a_request_that_can_never_fit_is_refused():
    strategy = make_strategy("pipeline", None)
    pipe = LocalPipeline(PAIR.stage_models(0, 1), n_seqs=Engine.n_seqs(strategy, 2))
    engine = Engine(pipe, strategy, max_running=2, kv_cells=10, max_positions=64)
    with pytest.raises(InputError, match="needs up to 12 KV cells"):
        engine.add(Request("big", [1, 2], 10))
    engine.add(Request("small", [1, 2], 8))
    engine.run()


def test_requests_wait_for_kv_room_in_arrival_order():
    strategy = make_strategy("pipeline", None)
    pipe = LocalPipeline(PAIR.stage_models(0, 2), n_seqs=Engine.n_seqs(strategy, 4))
    engine = Engine(pipe, strategy, max_running=4, kv_cells=20, max_positions=64)
    a, b, c = (engine.add(Request(i, [1, 2, 3], 7, arrival_s=i * 1e-6)) for i in range(3))
    engine.run()
    assert a.queued_s == 0 and b.queued_s < 1e-4  # 10 cells each: two fit (b: once the head is free)
    assert c.admitted_s >= min(a.finished_s, b.finished_s)  # c waits until one of them is done
    for r in (a, b, c):
        assert r.result().tokens == oracle(0, r.prompt, 7)


@pytest.mark.timeout(120)
def test_several_requests_on_real_processes(tmp_path):
    d = make_random_checkpoint(tmp_path / "t", seed=0, **TARGET)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12, 13]]
    for name in ("pipeline", "pipeinfer", "specpipe"):
        strategy = make_strategy(name, shared_draft("half", 0))
        with open_pipeline(d, "process", 2, n_seqs=Engine.n_seqs(strategy, 3)) as pipe:
            engine = Engine(pipe, strategy, max_running=3, max_positions=64)
            requests = [engine.add(Request(i, p, 10 + i, arrival_s=0.002 * i)) for i, p in enumerate(prompts)]
            victim = engine.add(Request("aborted", [1, 1, 1], 20))
            engine.step()
            assert engine.abort("aborted")
            engine.run()
        for r in requests:
            assert r.result().tokens == oracle(0, r.prompt, r.max_new_tokens), (name, r.id)
        assert victim.result().stop_reason == "aborted"
    assert_no_leaks()
